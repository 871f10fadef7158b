//! How many refusal records (a caller denied, not attested, or its JWT-SVID
//! rejected) each uid may have written in full.
//!
//! Any local process may call the Workload API, and every refusal is an
//! fsynced record: unbounded, one user could fill the trail's disk, and a
//! trail that cannot write stops all issuance. So each uid has a token
//! bucket: `BURST` records at once, `RATE` a second after that. A refusal
//! past its budget is counted instead, and the counts are written as one
//! `refusals_suppressed` record per uid and sweep (about a second), so the
//! trail still says who was refused how often, at a bounded cost.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Refusal records a uid may have written back to back.
pub const BURST: f64 = 100.0;
/// Refusal records a uid may have written each second, sustained.
pub const RATE: f64 = 20.0;

/// The budgets of every uid refused lately. `None` is a caller whose uid
/// is not known (its attestation failed before it was read).
#[derive(Debug, Default)]
pub struct RefusalBudget {
    buckets: HashMap<Option<u32>, Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    /// Refusals not written since the last sweep, by event kind.
    suppressed: BTreeMap<&'static str, u64>,
}

/// What a sweep found suppressed for one uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub uid: Option<u32>,
    pub by_event: BTreeMap<&'static str, u64>,
}

impl Suppressed {
    pub fn total(&self) -> u64 {
        self.by_event.values().sum()
    }
}

impl RefusalBudget {
    /// Whether a refusal of `uid` (an `event` kind) is written in full at
    /// `now`; if not, it is counted for the next sweep.
    pub fn admit(&mut self, uid: Option<u32>, event: &'static str, now: Instant) -> bool {
        let bucket = self.buckets.entry(uid).or_insert(Bucket {
            tokens: BURST,
            refilled: now,
            suppressed: BTreeMap::new(),
        });
        bucket.refill(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            *bucket.suppressed.entry(event).or_default() += 1;
            false
        }
    }

    /// The counts suppressed since the last sweep, per uid, reset; uids
    /// whose budget is full again and owe no count are forgotten, so the
    /// map stays as small as the set of uids refused lately.
    pub fn sweep(&mut self, now: Instant) -> Vec<Suppressed> {
        let mut due = Vec::new();
        self.buckets.retain(|uid, bucket| {
            bucket.refill(now);
            if !bucket.suppressed.is_empty() {
                due.push(Suppressed {
                    uid: *uid,
                    by_event: std::mem::take(&mut bucket.suppressed),
                });
                return true;
            }
            bucket.tokens < BURST
        });
        due.sort_by_key(|s| s.uid);
        due
    }
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * RATE).min(BURST);
        self.refilled = now;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_is_written_then_the_rest_counted_by_kind() {
        let t0 = Instant::now();
        let mut budget = RefusalBudget::default();
        let written = (0..150)
            .filter(|i| {
                let kind = if i % 2 == 0 {
                    "denied"
                } else {
                    "jwt_validation_failed"
                };
                budget.admit(Some(1000), kind, t0)
            })
            .count();
        assert_eq!(written, BURST as usize);
        // Another uid has its own budget.
        assert!(budget.admit(Some(1001), "denied", t0));
        let swept = budget.sweep(t0);
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].uid, Some(1000));
        assert_eq!(swept[0].total(), 50);
        assert_eq!(swept[0].by_event["denied"], 25);
        assert_eq!(swept[0].by_event["jwt_validation_failed"], 25);
        // Counted once: the next sweep owes nothing.
        assert!(budget.sweep(t0).is_empty());
    }

    #[test]
    fn the_budget_refills_at_its_rate_and_idle_uids_are_forgotten() {
        let t0 = Instant::now();
        let mut budget = RefusalBudget::default();
        for _ in 0..BURST as usize {
            assert!(budget.admit(None, "attestation_failure", t0));
        }
        assert!(!budget.admit(None, "attestation_failure", t0));
        // Half a second later, RATE / 2 more are written.
        let later = t0 + Duration::from_millis(500);
        let written = (0..100)
            .filter(|_| budget.admit(None, "attestation_failure", later))
            .count();
        assert_eq!(written, (RATE / 2.0) as usize);
        assert_eq!(budget.sweep(later)[0].total(), 1 + 100 - written as u64);
        // Still refilling: kept. Once full and owing nothing: forgotten.
        assert!(budget.sweep(later).is_empty());
        assert_eq!(budget.buckets.len(), 1);
        budget.sweep(later + Duration::from_secs_f64(BURST / RATE + 1.0));
        assert!(budget.buckets.is_empty());
    }
}
