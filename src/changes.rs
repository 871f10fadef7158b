//! The log of what changed in the agent, so each open stream can tell
//! whether a change concerns its caller. Without it every change (every task
//! begun or ended, every CRL) made every stream re-attest its caller and
//! re-evaluate policy, a cost that grew with streams × changes.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;

/// How many changes are kept for streams that have not caught up yet. A
/// stream further behind than this treats the gap as `Everything`.
const RETAINED: usize = 4096;

/// One change, as precise as its source can make it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Entries, policy, CA or anything else that can change any caller's
    /// identities: every stream re-resolves its caller.
    Everything,
    /// Only what every message carries beside the identities (the CRL, the
    /// federated bundles): streams resend, identities stay as resolved.
    Documents,
    /// A task bound to this process (pid, start time) and its descendants
    /// began.
    TaskBegunForProcess { pid: i32, start_time: u64 },
    /// A task bound to a cgroup began: any caller may be inside it.
    TaskBegunForCgroup,
    /// These tasks completed; streams that carried them re-resolve. With
    /// `crl_epoch`, the completion has asked for the CRL that revokes their
    /// certificates, and a stream waits for it, so that one message carries
    /// both the identities without the task and the new CRL.
    TasksEnded {
        ids: Vec<String>,
        crl_epoch: Option<u64>,
    },
}

/// What a stream has not seen yet, folded into one summary.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub everything: bool,
    pub documents: bool,
    pub cgroup_task_begun: bool,
    pub processes_bound: Vec<(i32, u64)>,
    pub tasks_ended: Vec<String>,
    /// The latest CRL publication any of `tasks_ended` asked for.
    pub crl_for_ended: Option<u64>,
}

impl Pending {
    fn add(&mut self, change: &Change) {
        match change {
            Change::Everything => self.everything = true,
            Change::Documents => self.documents = true,
            Change::TaskBegunForProcess { pid, start_time } => {
                self.processes_bound.push((*pid, *start_time))
            }
            Change::TaskBegunForCgroup => self.cgroup_task_begun = true,
            Change::TasksEnded { ids, crl_epoch } => {
                self.tasks_ended.extend(ids.iter().cloned());
                self.crl_for_ended = self.crl_for_ended.max(*crl_epoch);
            }
        }
    }
}

/// The change log: a generation counter streams wait on, and the most
/// recent changes by generation.
pub struct ChangeLog {
    generation: watch::Sender<u64>,
    recent: Mutex<VecDeque<(u64, Change)>>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        Self {
            generation: watch::channel(0).0,
            recent: Mutex::new(VecDeque::with_capacity(RETAINED)),
        }
    }
}

impl ChangeLog {
    /// Records a change and wakes every subscriber.
    pub fn push(&self, change: Change) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let generation = recent.back().map_or(*self.generation.borrow(), |(g, _)| *g) + 1;
        if recent.len() == RETAINED {
            recent.pop_front();
        }
        recent.push_back((generation, change));
        // Published under the lock, so generations reach subscribers in the
        // order they were logged.
        self.generation.send_replace(generation);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The generation now.
    #[cfg(test)]
    fn current(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Everything after generation `seen`, and the generation it reaches.
    /// A gap older than what is retained reads as `Everything`.
    pub fn since(&self, seen: u64) -> (u64, Pending) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let now = recent.back().map_or(*self.generation.borrow(), |(g, _)| *g);
        let mut pending = Pending::default();
        if now <= seen {
            return (now, pending);
        }
        let oldest = recent.front().map_or(now + 1, |(g, _)| *g);
        if oldest > seen + 1 {
            pending.everything = true;
        }
        // Generations in the log are consecutive, so the first one after
        // `seen` sits at a known offset: no scan over what was already seen.
        let first = usize::try_from((seen + 1).saturating_sub(oldest))
            .map_or(recent.len(), |offset| offset.min(recent.len()));
        for (_, change) in recent.range(first..) {
            pending.add(change);
        }
        (now, pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_sees_exactly_the_changes_after_its_generation() {
        let log = ChangeLog::default();
        log.push(Change::Documents);
        let seen = log.current();
        log.push(Change::TaskBegunForProcess {
            pid: 7,
            start_time: 70,
        });
        log.push(Change::TasksEnded {
            ids: vec!["t1".into()],
            crl_epoch: Some(3),
        });
        log.push(Change::TasksEnded {
            ids: vec!["t2".into()],
            crl_epoch: None,
        });
        let (now, pending) = log.since(seen);
        assert_eq!(now, seen + 3);
        assert!(
            !pending.documents,
            "the change before `seen` is not repeated"
        );
        assert_eq!(pending.processes_bound, vec![(7, 70)]);
        assert_eq!(pending.tasks_ended, vec!["t1".to_owned(), "t2".to_owned()]);
        assert_eq!(pending.crl_for_ended, Some(3));
        assert!(!pending.everything);
        let (again, nothing) = log.since(now);
        assert_eq!(again, now);
        assert_eq!(nothing, Pending::default());
    }

    #[test]
    fn falling_behind_the_retained_window_means_everything() {
        let log = ChangeLog::default();
        let seen = log.current();
        for _ in 0..RETAINED + 1 {
            log.push(Change::Documents);
        }
        let (_, pending) = log.since(seen);
        assert!(pending.everything);
        let (_, recent) = log.since(log.current() - 1);
        assert!(
            !recent.everything,
            "a subscriber one behind is not in a gap"
        );
        assert!(recent.documents);
    }

    #[test]
    fn after_the_window_wraps_a_subscriber_gets_exactly_what_followed_it() {
        let log = ChangeLog::default();
        for _ in 0..RETAINED + 10 {
            log.push(Change::Documents);
        }
        let seen = log.current();
        for pid in 1..=3 {
            log.push(Change::TaskBegunForProcess { pid, start_time: 0 });
        }
        let (_, pending) = log.since(seen);
        assert!(!pending.documents && !pending.everything);
        assert_eq!(pending.processes_bound, vec![(1, 0), (2, 0), (3, 0)]);
        let (_, last) = log.since(seen + 2);
        assert_eq!(last.processes_bound, vec![(3, 0)]);
    }

    #[tokio::test]
    async fn pushing_wakes_subscribers() {
        let log = ChangeLog::default();
        let mut rx = log.subscribe();
        rx.borrow_and_update();
        log.push(Change::Everything);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 1);
    }
}
