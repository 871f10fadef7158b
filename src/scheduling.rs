//! The CPU scheduling policy writ's threads run under (`cpu_scheduling`).
//!
//! Every task passes work between writ's threads (runtime workers, the
//! store's writer, the audit trail's syncer) and its clients several times,
//! and each of those threads wakes again when its fdatasync returns. Under
//! the default policy a woken thread preempts whatever runs on its CPU, so
//! under load most of those wake-ups are also a forced context switch, and
//! the preempted thread is switched back in later. `SCHED_BATCH` keeps each
//! thread's share of the CPU (its weight and nice value are unchanged) but
//! lets the running thread go on until it blocks or its slice ends. An idle
//! CPU still takes a woken thread at once, so an unloaded machine sees no
//! difference; a loaded one switches far less (docs/benchmarks.md, task
//! churn).
//!
//! A policy is per thread on Linux and new threads inherit their creator's,
//! so `writ run` sets it on its main thread before any other thread exists
//! (`cli::main`): the runtime's workers, the store's and the audit trail's
//! threads all start under it. A policy set by whoever started writ
//! (systemd's `CPUSchedulingPolicy=`, `chrt`) is kept.

use crate::config::CpuScheduling;

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The threads now run under `SCHED_BATCH`.
    Batch,
    /// writ was started under another policy than the default, and keeps
    /// it. With `SCHED_RESET_ON_FORK` on a realtime or deadline policy the
    /// threads writ starts run under `SCHED_OTHER`: the kernel resets them.
    KeptStartPolicy {
        policy: &'static str,
        reset_on_fork: bool,
    },
    /// `cpu_scheduling = "inherit"`: nothing was changed.
    Inherited,
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulingError {
    #[error("reading the scheduling policy writ was started with: {0}")]
    Read(std::io::Error),
    #[error("moving writ's main thread to SCHED_BATCH: {0}")]
    Set(std::io::Error),
}

/// Puts `choice` in force for the calling thread and every thread it starts
/// afterwards; called before writ starts any.
pub fn apply(choice: CpuScheduling) -> Result<Applied, SchedulingError> {
    if choice == CpuScheduling::Inherit {
        return Ok(Applied::Inherited);
    }
    // 0: the calling thread.
    let started_with = crate::sys::scheduling_policy(0).map_err(SchedulingError::Read)?;
    let reset_on_fork = started_with & libc::SCHED_RESET_ON_FORK;
    if started_with & !libc::SCHED_RESET_ON_FORK != libc::SCHED_OTHER {
        return Ok(Applied::KeptStartPolicy {
            policy: policy_name(started_with & !libc::SCHED_RESET_ON_FORK),
            reset_on_fork: reset_on_fork != 0,
        });
    }
    // The flag is kept: clearing it takes a privilege writ may not have, and
    // whoever set it meant it for writ's children too. (It resets only
    // realtime policies and negative nice values, so threads still inherit
    // SCHED_BATCH.)
    crate::sys::set_scheduling_policy(0, libc::SCHED_BATCH | reset_on_fork)
        .map_err(SchedulingError::Set)?;
    Ok(Applied::Batch)
}

fn policy_name(policy: i32) -> &'static str {
    match policy {
        libc::SCHED_OTHER => "SCHED_OTHER",
        libc::SCHED_BATCH => "SCHED_BATCH",
        libc::SCHED_IDLE => "SCHED_IDLE",
        libc::SCHED_FIFO => "SCHED_FIFO",
        libc::SCHED_RR => "SCHED_RR",
        // SCHED_DEADLINE (6) and anything newer.
        _ => "another policy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherit_changes_nothing() {
        let before = crate::sys::scheduling_policy(0).expect("own policy");
        assert_eq!(
            apply(CpuScheduling::Inherit).expect("apply"),
            Applied::Inherited
        );
        assert_eq!(
            crate::sys::scheduling_policy(0).expect("own policy"),
            before
        );
    }
}
