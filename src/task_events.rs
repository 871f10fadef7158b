//! Task events for WatchTasks: every watcher has a queue of its own, and
//! what a queue may hold is bounded in bytes.
//!
//! Why not a broadcast channel (as before): its ring is bounded by a count
//! of events, and an event carries the whole task, whose intent alone may
//! be some 270 KB. One watcher that stopped reading (hung, paused, or
//! just slow) pinned the whole 4096-event ring, over a gigabyte, until it
//! read again or lagged out. Here the task manager puts each event in
//! every watcher's queue, and a watcher whose queue would pass
//! [`WATCHER_QUEUE_BYTES`] is dropped at once: its queued events are freed,
//! and its next read says how many it missed (WatchTasks ends its stream
//! with DATA_LOSS, as a lagging broadcast receiver did). So a watcher pins
//! at most that many bytes, however large the tasks or however long it
//! does not read; events are shared (`Arc<Task>`), so many watchers of the
//! same events cost less, not more.
//!
//! Ordering and delivery are those of the broadcast channel: events are
//! queued under one lock in the order they are sent, so every watcher sees
//! them in that order, each once, from the moment it subscribed; a watcher
//! dropped for falling behind is told so, never silently skipped ahead.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;

use crate::tasks::{Task, TaskEvent};

/// The most bytes of events (as [`event_bytes`] counts them) one watcher's
/// queue may hold: about fifteen events of tasks with maximum-size intents,
/// or thousands of ordinary ones. A reading watcher keeps its queue near
/// empty; one that reaches this has stopped reading or cannot keep up.
pub const WATCHER_QUEUE_BYTES: usize = 4 << 20;

/// What one queued event is counted as: the text it carries (which is what
/// can be large) and a fixed allowance for the task's structure, the
/// queue's slot and the allocations around them.
pub fn event_bytes(event: &TaskEvent) -> usize {
    let (task, serials) = match event {
        TaskEvent::Begun(task, serials) | TaskEvent::Completed(task, serials) => (task, serials),
    };
    const PER_EVENT: usize = 512;
    const PER_STRING: usize = 32;
    PER_EVENT + task_text_bytes(task) + serials.iter().map(|s| s.len() + PER_STRING).sum::<usize>()
}

fn task_text_bytes(task: &Task) -> usize {
    const PER_STRING: usize = 32;
    let intent = &task.intent;
    let listed = |items: &[String]| items.iter().map(|s| s.len() + PER_STRING).sum::<usize>();
    let binding = match &task.binding {
        crate::tasks::Binding::Cgroup { path, .. } => path.len(),
        crate::tasks::Binding::Pid { .. } => 0,
    };
    task.id.len()
        + task.spiffe_id.path().len()
        + task.spiffe_id.trust_domain().name().len()
        + task.parent_id.as_ref().map_or(0, String::len)
        + binding
        + task.orchestrator.len()
        + intent.purpose.len()
        + listed(&intent.tools)
        + listed(&intent.targets)
        + intent.data_class.len()
        + intent
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2 * PER_STRING)
            .sum::<usize>()
        + task
            .federates_with
            .iter()
            .map(|t| t.name().len() + PER_STRING)
            .sum::<usize>()
        + task
            .completion
            .as_ref()
            .map_or(0, |c| c.reason.len() + c.detail.len())
}

/// Why [`EventReceiver::recv`] has no event to give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// The watcher's queue passed its budget: it was dropped, with this
    /// many events unread, and receives nothing more (so it misses every
    /// later one too: "at least").
    #[error("fell behind and missed at least {0} events")]
    Lagged(u64),
    /// The sender is gone (the task manager was dropped).
    #[error("task events have stopped")]
    Closed,
}

#[derive(Default)]
struct QueueState {
    events: VecDeque<(TaskEvent, usize)>,
    bytes: usize,
    /// Set when the watcher is dropped for falling behind: the events it
    /// missed.
    lagged: Option<u64>,
    closed: bool,
}

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// Woken on every change of `state`; one waiter (the receiver), so a
    /// wake-up given while it is not waiting is kept for its next wait.
    ready: Notify,
}

impl Queue {
    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Shared {
    queues: Mutex<Vec<Arc<Queue>>>,
}

impl Shared {
    fn queues(&self) -> MutexGuard<'_, Vec<Arc<Queue>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side, held by the task manager.
pub struct TaskEvents {
    shared: Arc<Shared>,
    budget: usize,
}

impl Default for TaskEvents {
    fn default() -> Self {
        Self::with_budget(WATCHER_QUEUE_BYTES)
    }
}

impl TaskEvents {
    /// Watchers' queues hold at most `budget` bytes each (but always the
    /// one event they are sent, if they hold nothing else).
    pub fn with_budget(budget: usize) -> Self {
        Self {
            shared: Arc::default(),
            budget,
        }
    }

    /// A receiver of every event sent from now on.
    pub fn subscribe(&self) -> EventReceiver {
        let queue = Arc::new(Queue::default());
        self.shared.queues().push(queue.clone());
        EventReceiver {
            queue,
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Queues `event` for every watcher, dropping those it would put over
    /// their budget.
    pub fn send(&self, event: TaskEvent) {
        let mut queues = self.shared.queues();
        // Most of the time nobody watches: nothing to count or queue.
        if queues.is_empty() {
            return;
        }
        let size = event_bytes(&event);
        queues.retain(|queue| {
            let mut state = queue.state();
            let keep = if !state.events.is_empty() && state.bytes + size > self.budget {
                let missed = state.events.len() as u64 + 1;
                // Freed now, not when the watcher next reads (it may never).
                state.events = VecDeque::new();
                state.bytes = 0;
                state.lagged = Some(missed);
                false
            } else {
                state.events.push_back((event.clone(), size));
                state.bytes += size;
                true
            };
            drop(state);
            queue.ready.notify_one();
            keep
        });
    }

    /// Watchers subscribed and not dropped.
    #[cfg(test)]
    fn watchers(&self) -> usize {
        self.shared.queues().len()
    }
}

impl Drop for TaskEvents {
    fn drop(&mut self) {
        for queue in self.shared.queues().drain(..) {
            queue.state().closed = true;
            queue.ready.notify_one();
        }
    }
}

/// One watcher's end: its events in the order they were sent.
pub struct EventReceiver {
    queue: Arc<Queue>,
    shared: Weak<Shared>,
}

impl EventReceiver {
    /// The next event, waiting for one if none is queued.
    pub async fn recv(&mut self) -> Result<TaskEvent, RecvError> {
        loop {
            if let Some(ready) = self.take() {
                return ready;
            }
            self.queue.ready.notified().await;
        }
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<Result<TaskEvent, RecvError>> {
        self.take()
    }

    fn take(&mut self) -> Option<Result<TaskEvent, RecvError>> {
        let mut state = self.queue.state();
        if let Some((event, size)) = state.events.pop_front() {
            state.bytes -= size;
            return Some(Ok(event));
        }
        if let Some(missed) = state.lagged {
            return Some(Err(RecvError::Lagged(missed)));
        }
        state.closed.then_some(Err(RecvError::Closed))
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.queues().retain(|q| !Arc::ptr_eq(q, &self.queue));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{Binding, Intent};

    fn task(id: &str, purpose_bytes: usize) -> Arc<Task> {
        let task = crate::tasks::test_task(
            id,
            Binding::Pid {
                pid: 1,
                start_time: 1,
            },
        );
        Arc::new(Task {
            intent: Intent {
                purpose: "p".repeat(purpose_bytes),
                ..Intent::default()
            },
            ..task
        })
    }

    fn id(event: &TaskEvent) -> &str {
        match event {
            TaskEvent::Begun(t, _) | TaskEvent::Completed(t, _) => &t.id,
        }
    }

    #[tokio::test]
    async fn every_watcher_gets_every_event_in_order_from_when_it_subscribed() {
        let events = TaskEvents::default();
        let mut early = events.subscribe();
        events.send(TaskEvent::Begun(task("a", 10), Vec::new()));
        let mut late = events.subscribe();
        events.send(TaskEvent::Begun(task("b", 10), Vec::new()));
        events.send(TaskEvent::Completed(task("a", 10), Vec::new()));
        for (receiver, want) in [(&mut early, &["a", "b", "a"][..]), (&mut late, &["b", "a"])] {
            for want in want {
                assert_eq!(id(&receiver.recv().await.unwrap()), *want);
            }
            assert!(receiver.try_recv().is_none());
        }
        // A receiver waiting when the event comes is woken by it.
        let waiting = tokio::spawn(async move { early.recv().await.map(|e| id(&e).to_owned()) });
        tokio::task::yield_now().await;
        events.send(TaskEvent::Begun(task("c", 10), Vec::new()));
        assert_eq!(waiting.await.unwrap().unwrap(), "c");
        assert_eq!(id(&late.recv().await.unwrap()), "c");
        drop(events);
        assert_eq!(late.recv().await.unwrap_err(), RecvError::Closed);
    }

    /// A watcher that does not read pins no more than its budget: past it,
    /// it is dropped and what it held is freed at once, while a watcher
    /// that reads goes on receiving everything.
    #[tokio::test]
    async fn a_watcher_that_stops_reading_is_dropped_at_its_byte_budget() {
        let big = task("big", 270_000);
        let size = event_bytes(&TaskEvent::Begun(big.clone(), Vec::new()));
        assert!(size > 270_000, "{size}");
        let events = TaskEvents::with_budget(4 * size);
        let mut stuck = events.subscribe();
        let mut reading = events.subscribe();
        for n in 0..4 {
            events.send(TaskEvent::Begun(big.clone(), Vec::new()));
            assert!(reading.recv().await.is_ok(), "event {n}");
        }
        // The budget holds four; the stuck watcher's queue is full.
        assert_eq!(Arc::strong_count(&big), 1 + 4);
        assert_eq!(events.watchers(), 2);
        events.send(TaskEvent::Completed(big.clone(), Vec::new()));
        assert!(reading.recv().await.is_ok());
        // Dropped, and its four events and the fifth are not held for it.
        assert_eq!(events.watchers(), 1);
        assert_eq!(Arc::strong_count(&big), 1);
        assert_eq!(stuck.recv().await.unwrap_err(), RecvError::Lagged(5));
        for _ in 0..100 {
            events.send(TaskEvent::Begun(big.clone(), Vec::new()));
            assert!(reading.recv().await.is_ok());
        }
        assert_eq!(Arc::strong_count(&big), 1);
        assert!(matches!(stuck.try_recv(), Some(Err(RecvError::Lagged(5)))));

        // One event larger than the whole budget still reaches a watcher
        // that holds nothing else.
        let small = TaskEvents::with_budget(1000);
        let mut watcher = small.subscribe();
        small.send(TaskEvent::Begun(big.clone(), Vec::new()));
        assert!(watcher.recv().await.is_ok());
        // A receiver that goes away leaves the sender's list.
        drop(watcher);
        assert_eq!(small.watchers(), 0);
    }
}
