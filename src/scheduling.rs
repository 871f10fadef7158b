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
//! A policy is per thread on Linux and new threads inherit their creator's.
//! `writ run` applies it on its main thread before the runtime starts any
//! (`cli::prepare_agent`), so every thread follows; any thread already
//! running is moved as well. A policy set by whoever started writ
//! (systemd's `CPUSchedulingPolicy=`, `chrt`) is kept.

use crate::config::CpuScheduling;

/// How many times the thread list is walked: a thread started by a thread
/// not yet moved may appear after the walk that moved its creator.
const PASSES: usize = 3;

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
    #[error("listing writ's threads in /proc/self/task: {0}")]
    List(std::io::Error),
    #[error("moving thread {tid} to SCHED_BATCH: {source}")]
    Set { tid: i32, source: std::io::Error },
}

/// Puts `choice` in force for every thread of this process.
pub fn apply(choice: CpuScheduling) -> Result<Applied, SchedulingError> {
    if choice == CpuScheduling::Inherit {
        return Ok(Applied::Inherited);
    }
    let main_thread = i32::try_from(std::process::id()).unwrap_or(0);
    let started_with = crate::sys::scheduling_policy(main_thread).map_err(SchedulingError::Read)?;
    let reset_on_fork = started_with & libc::SCHED_RESET_ON_FORK != 0;
    if started_with & !libc::SCHED_RESET_ON_FORK != libc::SCHED_OTHER {
        return Ok(Applied::KeptStartPolicy {
            policy: policy_name(started_with & !libc::SCHED_RESET_ON_FORK),
            reset_on_fork,
        });
    }
    for _ in 0..PASSES {
        let mut moved = 0;
        for tid in threads().map_err(SchedulingError::List)? {
            let flag = match crate::sys::scheduling_policy(tid) {
                Ok(policy) if policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_OTHER => {
                    policy & libc::SCHED_RESET_ON_FORK
                }
                // Already moved, or given another policy on purpose.
                Ok(_) => continue,
                // Ended since it was listed.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                Err(e) => return Err(SchedulingError::Read(e)),
            };
            // Kept: clearing the flag takes a privilege writ may not have,
            // and whoever set it meant it for writ's children too.
            match crate::sys::set_scheduling_policy(tid, libc::SCHED_BATCH | flag) {
                Ok(()) => moved += 1,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(source) => return Err(SchedulingError::Set { tid, source }),
            }
        }
        if moved == 0 {
            break;
        }
    }
    Ok(Applied::Batch)
}

fn threads() -> std::io::Result<Vec<i32>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
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
