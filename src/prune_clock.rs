//! The time writ forgets expired certificates by.
//!
//! Dropping a revocation, or the serial of a certificate still to be
//! revoked, cannot be undone: if the wall clock has jumped ahead, the
//! certificate is still valid in truth, and once the clock is put right it
//! is valid again without ever being listed. So pruning goes by a time that
//! cannot run ahead of the time that has really passed since writ started:
//! the wall clock at start plus CLOCK_BOOTTIME elapsed since (BOOTTIME, not
//! MONOTONIC, so a suspended host's sleep counts), or the wall clock itself
//! when that is earlier (a clock put back is believed at once: pruning
//! later than the truth only keeps rows a little longer).

use std::time::{Duration, SystemTime};

/// Where pruning time is measured from; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct PruneClock {
    wall_at_start: SystemTime,
    boot_at_start: Duration,
}

impl PruneClock {
    /// Anchored at this moment.
    pub fn start() -> Self {
        Self::anchored(SystemTime::now(), boottime())
    }

    /// Anchored at a wall-clock time and the CLOCK_BOOTTIME reading taken
    /// with it.
    pub fn anchored(wall_at_start: SystemTime, boot_at_start: Duration) -> Self {
        Self {
            wall_at_start,
            boot_at_start,
        }
    }

    /// The time to prune by now.
    pub fn now(&self) -> SystemTime {
        pruning_now(
            SystemTime::now(),
            self.wall_at_start,
            boottime().saturating_sub(self.boot_at_start),
        )
    }
}

/// The earlier of the wall clock and the start's wall clock plus the time
/// elapsed since, so that neither a forward jump nor a start made while the
/// clock was ahead and corrected since can prune early.
pub fn pruning_now(
    wall_now: SystemTime,
    wall_at_start: SystemTime,
    elapsed: Duration,
) -> SystemTime {
    match wall_at_start.checked_add(elapsed) {
        Some(bound) => wall_now.min(bound),
        None => wall_now,
    }
}

/// Time since boot, suspend included.
pub fn boottime() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    // The kernel never reports a negative time since boot; zero, were it
    // to, only makes pruning wait.
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_forward_jump_does_not_advance_pruning() {
        let start = at(1_700_000_000);
        let elapsed = Duration::from_secs(65);
        // The wall clock says an hour and a minute passed; only 65 s did.
        let now = pruning_now(start + HOUR + elapsed, start, elapsed);
        assert_eq!(now, start + elapsed);
    }

    #[test]
    fn a_clock_put_back_is_believed_at_once() {
        // Started an hour ahead, corrected ten minutes later.
        let start = at(1_700_000_000) + HOUR;
        let elapsed = Duration::from_secs(600);
        let wall = at(1_700_000_000) + elapsed;
        assert_eq!(pruning_now(wall, start, elapsed), wall);
    }

    #[test]
    fn a_steady_clock_is_followed() {
        let start = at(1_700_000_000);
        let elapsed = Duration::from_secs(3 * 3600);
        assert_eq!(
            pruning_now(start + elapsed, start, elapsed),
            start + elapsed
        );
    }

    #[test]
    fn boottime_advances() {
        let clock = PruneClock::start();
        let first = boottime();
        assert!(boottime() >= first);
        assert!(clock.now() <= SystemTime::now());
    }
}
