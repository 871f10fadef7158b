//! Waiting for a wall-clock time. Certificates, CRLs and keys end at wall
//! times, but tokio's timers run on the monotonic clock, which neither
//! follows a step of the wall clock nor (on Linux) advances while the
//! machine is suspended: one long sleep would wake hours after the deadline
//! it was computed for. This module owns the one wait that notices both.

use std::time::{Duration, SystemTime};

/// How often a wait reads the wall clock again. SPIRE re-checks its CA
/// every 5–10 s; a few seconds bounds how long a jump or a resume from
/// suspend goes unnoticed, at the cost of a timer wake-up per wait.
pub(crate) const RECHECK: Duration = Duration::from_secs(5);

/// How far the wall clock may fall behind the monotonic time slept before
/// the wait counts it as stepped back. Timers fire late rather than early,
/// and NTP slews at most 0.5 ms/s, so only a real step gets this far.
const STEP_BACK: Duration = Duration::from_secs(1);

/// Sleeps until the wall clock reads `deadline` (at once if it already
/// does), reading it every [`RECHECK`]. Returns early when the wall clock
/// steps back, since what the caller computed `deadline` from (a
/// certificate's notBefore, a CRL's thisUpdate) may then be in the future
/// and need redoing; callers re-evaluate whenever this returns.
pub(crate) async fn sleep_until(deadline: SystemTime) {
    sleep_until_with(deadline, RECHECK, SystemTime::now).await;
}

/// `sleep_until` with the slice length and the clock given, so tests can
/// move the wall clock.
async fn sleep_until_with(
    deadline: SystemTime,
    recheck: Duration,
    mut now: impl FnMut() -> SystemTime,
) {
    let mut before = now();
    loop {
        let left = match deadline.duration_since(before) {
            Ok(left) if !left.is_zero() => left,
            _ => return,
        };
        let slice = left.min(recheck);
        tokio::time::sleep(slice).await;
        let after = now();
        let expected = before
            .checked_add(slice)
            .and_then(|t| t.checked_sub(STEP_BACK));
        if expected.is_some_and(|expected| after < expected) {
            return;
        }
        before = after;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Instant;

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);
    const SLICE: Duration = Duration::from_millis(20);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    /// A wall clock that reads `base(n)` plus the real time elapsed at its
    /// `n`-th reading (from 1), and a count of its readings.
    fn scripted(base: impl Fn(u32) -> SystemTime) -> (impl FnMut() -> SystemTime, Rc<Cell<u32>>) {
        let reads = Rc::new(Cell::new(0));
        let counter = reads.clone();
        let started = Instant::now();
        let clock = move || {
            counter.set(counter.get() + 1);
            base(counter.get()) + started.elapsed()
        };
        (clock, reads)
    }

    #[tokio::test]
    async fn a_deadline_already_past_returns_at_once() {
        let (clock, reads) = scripted(|_| t0());
        let waited = tokio::time::timeout(
            Duration::from_secs(1),
            sleep_until_with(t0() - DAY, Duration::from_secs(3600), clock),
        )
        .await;
        assert!(waited.is_ok(), "a past deadline must not be slept on");
        assert_eq!(reads.get(), 1);
    }

    /// A day away by the wall clock, which then jumps a day ahead (or the
    /// machine resumes from a day's suspend): the wait ends at the next
    /// re-check, not a day of monotonic time later.
    #[tokio::test]
    async fn a_forward_jump_is_noticed_at_the_next_recheck() {
        let (clock, reads) = scripted(|n| {
            if n >= 3 {
                t0() + DAY + Duration::from_secs(60)
            } else {
                t0()
            }
        });
        let waited = tokio::time::timeout(
            Duration::from_secs(5),
            sleep_until_with(t0() + DAY, SLICE, clock),
        )
        .await;
        assert!(waited.is_ok(), "the jump past the deadline went unnoticed");
        assert_eq!(reads.get(), 3, "one reading per slice");
    }

    /// With a steady clock the wait lasts until the deadline, in slices.
    #[tokio::test]
    async fn a_steady_clock_waits_until_the_deadline_in_slices() {
        let (clock, reads) = scripted(|_| t0());
        let started = Instant::now();
        sleep_until_with(t0() + 5 * SLICE, SLICE, clock).await;
        assert!(started.elapsed() >= 5 * SLICE);
        assert!(reads.get() >= 5, "read {} times", reads.get());
    }

    /// A step back returns early: what the caller derived the deadline from
    /// may now lie in the future.
    #[tokio::test]
    async fn a_step_back_returns_early() {
        let (clock, reads) = scripted(|n| if n >= 2 { t0() - 2 * DAY } else { t0() });
        let waited = tokio::time::timeout(
            Duration::from_secs(5),
            sleep_until_with(t0() + DAY, SLICE, clock),
        )
        .await;
        assert!(waited.is_ok(), "the step back went unnoticed");
        assert_eq!(reads.get(), 2);
    }
}
