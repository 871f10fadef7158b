//! The log of what changed in the agent, and who is woken for it. Each open
//! stream registers what can concern it (its caller and the identities it
//! last sent); a change wakes only the streams it can concern, and a stream
//! then reads from the log exactly what it has not seen. Without the log,
//! every change (every task begun or ended, every CRL) made every stream
//! re-attest its caller; without the registrations, every change still woke
//! every stream to find out, a cost that grew with streams × changes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, watch};

use crate::peer::Caller;

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

/// The change log: a generation counter for whoever wants to hear of every
/// change, the most recent changes by generation, and the registered
/// streams.
pub struct ChangeLog {
    shared: Arc<Shared>,
}

struct Shared {
    generation: watch::Sender<u64>,
    /// Counts `Change::Everything` alone.
    far_reaching: watch::Sender<u64>,
    recent: Mutex<VecDeque<(u64, Change)>>,
    streams: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    mailboxes: HashMap<u64, Arc<Mailbox>>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                generation: watch::channel(0).0,
                far_reaching: watch::channel(0).0,
                recent: Mutex::new(VecDeque::with_capacity(RETAINED)),
                streams: Mutex::default(),
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The newest generation: the last one logged, or the one published before
/// anything was (`published`, read under the same lock).
fn newest(recent: &VecDeque<(u64, Change)>, published: u64) -> u64 {
    recent.back().map_or(published, |(g, _)| *g)
}

impl ChangeLog {
    /// Records a change, wakes the streams it may concern, and tells every
    /// `subscribe`r.
    pub fn push(&self, change: Change) {
        let ended_keys: Vec<String> = match &change {
            Change::TasksEnded { ids, .. } => ids
                .iter()
                .map(|t| crate::agent::task_cache_key(t))
                .collect(),
            _ => Vec::new(),
        };
        let shared = &*self.shared;
        let mut recent = lock(&shared.recent);
        let generation = newest(&recent, *shared.generation.borrow()) + 1;
        if recent.len() == RETAINED {
            recent.pop_front();
        }
        // Offered under the log's lock: a stream that reads a generation
        // has been offered every change up to it, so when it finds itself
        // unconcerned it may skip those changes without reading them
        // (`Subscription::catch_up`).
        for mailbox in lock(&shared.streams).mailboxes.values() {
            mailbox.offer(&change, &ended_keys);
        }
        if change == Change::Everything {
            shared.far_reaching.send_modify(|n| *n += 1);
        }
        recent.push_back((generation, change));
        // Published under the lock, so generations reach subscribers in the
        // order they were logged.
        shared.generation.send_replace(generation);
    }

    /// A receiver that sees every new generation, whatever changed.
    #[cfg(test)]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.generation.subscribe()
    }

    /// A receiver that sees a new value on each `Change::Everything` alone
    /// (entries, policy, the CA), for what depends on nothing narrower.
    pub fn subscribe_far_reaching(&self) -> watch::Receiver<u64> {
        self.shared.far_reaching.subscribe()
    }

    /// Registers a stream serving `caller`. It is offered every change from
    /// now on, and reads the log from the generation it was registered at.
    pub fn register(&self, caller: Arc<Caller>) -> Subscription {
        let mailbox = Arc::new(Mailbox {
            caller,
            state: Mutex::new(MailboxState::default()),
            wake: Notify::new(),
        });
        let mut registry = lock(&self.shared.streams);
        let id = registry.next_id;
        registry.next_id += 1;
        registry.mailboxes.insert(id, mailbox.clone());
        drop(registry);
        Subscription {
            log: self.shared.clone(),
            id,
            mailbox,
            seen: self.current(),
        }
    }

    /// The generation now.
    pub fn current(&self) -> u64 {
        newest(&lock(&self.shared.recent), *self.shared.generation.borrow())
    }

    /// Everything after generation `seen`, and the generation it reaches.
    /// A gap older than what is retained reads as `Everything`.
    #[cfg(test)]
    fn since(&self, seen: u64) -> (u64, Pending) {
        let shared = &*self.shared;
        Self::since_locked(&lock(&shared.recent), *shared.generation.borrow(), seen)
    }

    fn since_locked(recent: &VecDeque<(u64, Change)>, published: u64, seen: u64) -> (u64, Pending) {
        let now = newest(recent, published);
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

/// What the log keeps for one stream.
struct Mailbox {
    caller: Arc<Caller>,
    state: Mutex<MailboxState>,
    wake: Notify,
}

#[derive(Default)]
struct MailboxState {
    /// Cache keys of the identities the stream last sent.
    keys: Vec<String>,
    /// A change that may concern the stream was logged since it last
    /// caught up.
    concerned: bool,
    /// Newer documents were published since the stream's last snapshot.
    documents: bool,
}

impl Mailbox {
    /// Flags a change that may concern the stream and wakes it. Errs
    /// towards yes: a needless wake costs one look at the log, a missed one
    /// a stale stream.
    fn offer(&self, change: &Change, ended_keys: &[String]) {
        let mut state = lock(&self.state);
        let concerned = match change {
            Change::Everything | Change::TaskBegunForCgroup => true,
            // Before the caller's lineage is read, any older process may
            // be an ancestor.
            Change::TaskBegunForProcess { pid, start_time } => self
                .caller
                .may_descend_from(*pid, *start_time)
                .unwrap_or(true),
            Change::TasksEnded { .. } => ended_keys.iter().any(|k| state.keys.contains(k)),
            Change::Documents => {
                // Once flagged, later publications need no wake: the stream
                // is already waiting to send the newest documents.
                if !state.documents {
                    state.documents = true;
                    drop(state);
                    self.wake.notify_one();
                }
                return;
            }
        };
        if concerned {
            state.concerned = true;
            drop(state);
            self.wake.notify_one();
        }
    }
}

/// A stream's registration; dropping it unregisters the stream.
pub struct Subscription {
    log: Arc<Shared>,
    id: u64,
    mailbox: Arc<Mailbox>,
    /// The generation the stream has seen everything up to.
    seen: u64,
}

impl Subscription {
    /// Says which identities the stream now holds, so that the end of one
    /// of their tasks wakes it. Call it before catching up with
    /// `read_log_anyway`: a task that ended before this call is found in
    /// the log, one that ends after it wakes the stream.
    pub fn hold(&self, keys: &[String]) {
        let mut state = lock(&self.mailbox.state);
        if state.keys != keys {
            state.keys = keys.to_vec();
        }
    }

    /// Resolves once a change that may concern the stream has been logged,
    /// or documents newer than the stream's last snapshot were published,
    /// since the stream last caught up (at once if that already happened).
    /// It may also resolve with nothing new: a wake-up left over from
    /// before the last catch-up is kept, and the stream then finds nothing
    /// to do. Documents published again before a snapshot took the last
    /// ones do not wake it a second time.
    pub async fn woken(&self) {
        self.mailbox.wake.notified().await;
    }

    /// What the stream has not seen yet; it has seen everything after this.
    /// The log is read only if a change concerned the stream, or if
    /// `read_log_anyway` (what the stream holds changed since it last
    /// caught up); otherwise nothing it has not seen concerns it, and only
    /// newer documents are reported.
    pub fn catch_up(&mut self, read_log_anyway: bool) -> Pending {
        let recent = lock(&self.log.recent);
        let mut state = lock(&self.mailbox.state);
        let concerned = std::mem::take(&mut state.concerned);
        let documents = state.documents;
        drop(state);
        let published = *self.log.generation.borrow();
        let (now, mut pending) = if concerned || read_log_anyway {
            ChangeLog::since_locked(&recent, published, self.seen)
        } else {
            (newest(&recent, published), Pending::default())
        };
        self.seen = now;
        pending.documents |= documents;
        pending
    }

    /// A snapshot is about to be taken: it carries every document published
    /// until now, and a later publication wakes the stream again.
    pub fn documents_taken(&self) {
        lock(&self.mailbox.state).documents = false;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.log.streams).mailboxes.remove(&self.id);
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

    #[test]
    fn only_far_reaching_changes_reach_far_reaching_subscribers() {
        let log = ChangeLog::default();
        let mut rx = log.subscribe_far_reaching();
        rx.borrow_and_update();
        log.push(Change::Documents);
        log.push(Change::TaskBegunForCgroup);
        log.push(Change::TasksEnded {
            ids: vec!["t".into()],
            crl_epoch: None,
        });
        assert!(!rx.has_changed().unwrap());
        log.push(Change::Everything);
        assert!(rx.has_changed().unwrap());
    }

    /// This test process as a stream's caller.
    fn this_process() -> Arc<Caller> {
        let process = writ_attestors::PinnedProcess::open(std::process::id() as i32).unwrap();
        Arc::new(Caller::new(process.pid(), 0, 0, Arc::new(process)))
    }

    /// Whether the stream has a wake-up waiting, without waiting for one.
    fn was_woken(subscription: &Subscription) -> bool {
        use futures::FutureExt as _;
        subscription.woken().now_or_never().is_some()
    }

    #[test]
    fn a_task_ending_wakes_only_the_streams_that_held_it() {
        let log = ChangeLog::default();
        let mut holder = log.register(this_process());
        let mut bystander = log.register(this_process());
        holder.hold(&["entry:a".into(), crate::agent::task_cache_key("t1")]);
        bystander.hold(&["entry:a".into()]);

        log.push(Change::TasksEnded {
            ids: vec!["t1".into()],
            crl_epoch: Some(4),
        });
        assert!(was_woken(&holder));
        assert!(!was_woken(&bystander));
        let pending = holder.catch_up(false);
        assert_eq!(holder.seen, log.current());
        assert_eq!(pending.tasks_ended, vec!["t1".to_owned()]);
        assert_eq!(pending.crl_for_ended, Some(4));
        let pending = bystander.catch_up(false);
        assert_eq!(
            bystander.seen,
            log.current(),
            "the bystander moves past it unread"
        );
        assert_eq!(pending, Pending::default());
    }

    #[test]
    fn a_task_bound_to_a_process_wakes_the_streams_it_may_cover() {
        let log = ChangeLog::default();
        let caller = this_process();
        let (pid, start) = (caller.pid, caller.process.start_time());
        let stream = log.register(caller.clone());
        // A process that started after the caller cannot be its ancestor.
        log.push(Change::TaskBegunForProcess {
            pid: 1,
            start_time: start + 1,
        });
        assert!(!was_woken(&stream));
        // The caller itself.
        log.push(Change::TaskBegunForProcess {
            pid,
            start_time: start,
        });
        assert!(was_woken(&stream));
        // An older process, while the caller's ancestors are unknown: maybe.
        log.push(Change::TaskBegunForProcess {
            pid: 1,
            start_time: 0,
        });
        assert!(was_woken(&stream));
        // Once they are known, only an ancestor.
        caller.know_ancestors(vec![(1, 0)]);
        log.push(Change::TaskBegunForProcess {
            pid: 2,
            start_time: 0,
        });
        assert!(!was_woken(&stream));
        log.push(Change::TaskBegunForProcess {
            pid: 1,
            start_time: 0,
        });
        assert!(was_woken(&stream));
    }

    #[test]
    fn far_reaching_changes_wake_every_stream() {
        let log = ChangeLog::default();
        let mut streams = [log.register(this_process()), log.register(this_process())];
        for change in [Change::Everything, Change::TaskBegunForCgroup] {
            log.push(change);
            for stream in &streams {
                assert!(was_woken(stream));
                assert!(!was_woken(stream), "one wake-up per change");
            }
        }
        let pending = streams[0].catch_up(false);
        assert!(pending.everything && pending.cgroup_task_begun);
    }

    #[test]
    fn newer_documents_wake_a_stream_once_until_its_next_snapshot() {
        let log = ChangeLog::default();
        let mut stream = log.register(this_process());
        log.push(Change::Documents);
        assert!(was_woken(&stream));
        // Already waiting to send the newest documents: no more wake-ups.
        log.push(Change::Documents);
        log.push(Change::Documents);
        assert!(!was_woken(&stream));
        assert!(stream.catch_up(false).documents);
        assert!(
            stream.catch_up(false).documents,
            "still due until a snapshot carries them"
        );
        stream.documents_taken();
        assert!(!stream.catch_up(false).documents);
        log.push(Change::Documents);
        assert!(was_woken(&stream));
    }

    #[test]
    fn a_task_that_ended_before_the_stream_held_it_is_read_from_the_log() {
        let log = ChangeLog::default();
        let mut stream = log.register(this_process());
        // The stream resolved t1, then t1 ended before the stream said it
        // holds it: no wake-up, but the log has it.
        log.push(Change::TasksEnded {
            ids: vec!["t1".into()],
            crl_epoch: None,
        });
        assert!(!was_woken(&stream));
        stream.hold(&[crate::agent::task_cache_key("t1")]);
        let pending = stream.catch_up(true);
        assert_eq!(pending.tasks_ended, vec!["t1".to_owned()]);
    }

    #[test]
    fn an_unconcerned_stream_never_falls_behind_the_retained_window() {
        let log = ChangeLog::default();
        let mut stream = log.register(this_process());
        stream.hold(&["entry:a".into()]);
        for round in 0..3 {
            for i in 0..RETAINED {
                log.push(Change::TasksEnded {
                    ids: vec![format!("other-{round}-{i}")],
                    crl_epoch: None,
                });
            }
            let pending = stream.catch_up(false);
            assert_eq!(pending, Pending::default(), "nothing read, no gap");
            assert_eq!(stream.seen, log.current());
        }
    }

    #[test]
    fn a_dropped_subscription_is_offered_nothing_more() {
        let log = ChangeLog::default();
        let stream = log.register(this_process());
        drop(stream);
        assert!(lock(&log.shared.streams).mailboxes.is_empty());
        log.push(Change::Everything);
    }
}
