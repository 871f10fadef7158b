//! Task lifecycle: an orchestrator begins a task bound to a process or a
//! cgroup; processes inside the binding hold an identity for that task alone;
//! the task completes exactly once — EndTask, process exit, cgroup emptied,
//! TTL, or its parent completing — and completion revokes everything issued
//! for it, durably, before anyone is told it is over.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use writ_attestors::{PinnedProcess, excerpt};

use crate::agent::{Agent, TaskBeginning, task_facts};
use crate::audit::{AuditEvent, CallerFacts, EventKind};
use crate::cgroup::CgroupDir;
use crate::cgroup_watch::CgroupWatcher;
use crate::changes::Change;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::{Store, StoreError};

pub const MAX_TASK_ID_BYTES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("task {} not found", excerpt(.0))]
    NotFound(String),
    #[error("task {0} already exists")]
    AlreadyExists(String),
    #[error("parent_task_id: task {0} has completed")]
    ParentCompleted(String),
    /// The caller works in a task (its default identity is the task's), so
    /// what it begins is a sub-task of that task; and that task has ended.
    #[error(
        "the caller works in task {0}, which has completed: a task begun from inside a task is a sub-task of it"
    )]
    CallerTaskCompleted(String),
    /// Two active tasks never share an identity: each one's certificates,
    /// its revocation and who may act on it are told apart by it.
    #[error("spiffe_id: {spiffe_id} is already the identity of active task {task}")]
    IdentityTaken { spiffe_id: String, task: String },
    /// An identity below an active task's reads as one of its sub-tasks,
    /// so only a sub-task of it (or of a task below it) may hold one.
    #[error(
        "spiffe_id: {spiffe_id} lies below {task_spiffe_id}, the identity of active task {task}; only a sub-task of {task} may hold an identity below it (begin it with parent_task_id {task})"
    )]
    IdentityBelowTask {
        spiffe_id: String,
        task: String,
        task_spiffe_id: String,
    },
    /// The reverse: an active task lies below the identity asked for, and
    /// would read as a sub-task of a task it is not under.
    #[error(
        "spiffe_id: active task {task} has {task_spiffe_id}, which lies below {spiffe_id}; it would read as a sub-task of this one"
    )]
    IdentityAboveTask {
        spiffe_id: String,
        task: String,
        task_spiffe_id: String,
    },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("audit trail unavailable; the task was not begun: {0}")]
    Audit(String),
    #[error("{0}")]
    PolicyDenied(String),
    /// writ ran short of a resource (file descriptors, memory) doing it:
    /// nothing about the request, which may succeed again.
    #[error("{0}")]
    Unavailable(String),
    /// The work ran in a task of its own (so that a caller hanging up could
    /// not stop it halfway) and that task panicked or was stopped.
    #[error("completing task {task}: {reason}")]
    Interrupted { task: String, reason: String },
    /// writ has begun to stop and completes no more tasks: the next start
    /// completes those whose process has gone or TTL has passed.
    #[error(
        "writ is stopping: task {} was not ended; if its process is still running and its TTL has not passed when writ starts again, end it again then",
        excerpt(.0)
    )]
    Stopping(String),
}

/// Tasks whose completion the store refused and that are still waiting
/// for a retry to persist it, in order.
fn not_persisted(inner: &Inner) -> Vec<String> {
    let mut ids: Vec<String> = inner
        .retrying
        .iter()
        .filter(|id| inner.active.contains_key(*id))
        .cloned()
        .collect();
    ids.sort();
    ids
}

/// What `task` stores in its row's `record` column.
fn record_json(task: &Task) -> Result<String, TaskError> {
    serde_json::to_string(&TaskRecord {
        binding: task.binding.clone(),
        intent: task.intent.clone(),
        orchestrator: task.orchestrator.clone(),
        orchestrator_start_time: task.orchestrator_start_time,
        depth: task.depth,
        federates_with: task.federates_with.iter().map(|t| t.to_string()).collect(),
    })
    .map_err(|e| TaskError::Store(StoreError::Corrupt(e.to_string())))
}

/// How much later than a task's (whole-second) `created_at` the cgroup it
/// is bound to may have been made and still be the one it was bound to:
/// the cgroup existed when the task began, within that second.
const CGROUP_CREATION_SLACK: Duration = Duration::from_secs(2);

/// Why restore completes a legacy cgroup task (stored without its cgroup's
/// id) whose path now holds a cgroup made after it began.
const MADE_AGAIN_DETAIL: &str =
    "found after restart: the cgroup at its path was made again after the task began";

/// The store job that inserts a new task's row, refusing a duplicate id
/// and a parent completed before it.
fn task_row_writer(
    task: &Arc<Task>,
) -> Result<impl FnOnce(&rusqlite::Connection) -> TaskRowOutcome + Send + 'static, TaskError> {
    let record = record_json(task)?;
    let t = task.clone();
    Ok(move |conn: &rusqlite::Connection| -> TaskRowOutcome {
        if let Some(parent) = &t.parent_id {
            // Same transaction order as completion: a parent completed
            // before this commit cannot gain a child after it.
            if !crate::store::task_is_active(conn, parent)? {
                return Ok(Err(TaskError::ParentCompleted(parent.clone())));
            }
        }
        // Asked before the identity below, so that a task id asked for
        // again is reported as such, not as its own identity in use.
        let id_taken = conn
            .prepare_cached("SELECT 1 FROM tasks WHERE task_id = ?1")?
            .exists(params![t.id])?;
        if id_taken {
            return Ok(Err(TaskError::AlreadyExists(t.id.clone())));
        }
        // In the same transaction as the insert, in the store's one writer:
        // two begins racing for one identity cannot both find it free.
        if let Some(refused) = identity_conflict(conn, &t)? {
            return Ok(Err(refused));
        }
        let inserted = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO tasks(task_id, spiffe_id, parent_task_id, record, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                t.id,
                t.spiffe_id.to_string(),
                t.parent_id,
                record,
                unix_secs(t.created_at),
                unix_secs(t.expires_at)
            ])?;
        if inserted == 0 {
            return Ok(Err(TaskError::AlreadyExists(t.id.clone())));
        }
        Ok(Ok(()))
    })
}

/// A task row's insert: a store failure, or the task's own refusal.
type TaskRowOutcome = Result<Result<(), TaskError>, StoreError>;

/// Why `task` may not take its SPIFFE ID, if it may not: the ID is that of
/// an active task (two live tasks would share certificates' subject, and
/// whoever holds one could act on the other), or lies below the ID of an
/// active task that is neither its parent nor one of that parent's
/// ancestors (it would pass for a sub-task of a task it is not under, and
/// escape that task's scope and its end). Completed tasks do not count:
/// their certificates are revoked. Looks up the ID and each of its
/// ancestors' paths in the index of active tasks' IDs, so the cost grows
/// with the ID's depth, not with the number of tasks.
fn identity_conflict(
    conn: &rusqlite::Connection,
    task: &Task,
) -> Result<Option<TaskError>, StoreError> {
    // The parent and its ancestors, as the store has them: an identity
    // below theirs is what a sub-task has.
    let mut lineage = std::collections::HashSet::new();
    let mut next = task.parent_id.clone();
    while let Some(id) = next {
        if !lineage.insert(id.clone()) {
            break;
        }
        next = conn
            .prepare_cached("SELECT parent_task_id FROM tasks WHERE task_id = ?1")?
            .query_row(params![id], |r| r.get::<_, Option<String>>(0))
            .optional()?
            .flatten();
    }
    let full = task.spiffe_id.to_string();
    let base_len = full.len() - task.spiffe_id.path().len();
    // Every "/" after the trust domain ends an ancestor's path; the whole
    // ID last.
    let ends = full[base_len..]
        .match_indices('/')
        .map(|(at, _)| base_len + at)
        .filter(|end| *end > base_len)
        .chain(std::iter::once(full.len()));
    let mut holders = conn.prepare_cached(
        "SELECT task_id FROM tasks WHERE spiffe_id = ?1 AND completed_at IS NULL",
    )?;
    for end in ends {
        let prefix = &full[..end];
        let owners = holders
            .query_map(params![prefix], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        for owner in owners {
            if end == full.len() {
                return Ok(Some(TaskError::IdentityTaken {
                    spiffe_id: full,
                    task: owner,
                }));
            }
            if !lineage.contains(&owner) {
                return Ok(Some(TaskError::IdentityBelowTask {
                    spiffe_id: full.clone(),
                    task: owner,
                    task_spiffe_id: prefix.to_owned(),
                }));
            }
        }
    }
    // Nor may an active task lie below it: the new task has no sub-tasks
    // yet. Below means after "<id>/", so the range ["<id>/", "<id>0") of
    // the index ('0' follows '/').
    let below = conn
        .prepare_cached(
            "SELECT task_id, spiffe_id FROM tasks
             WHERE completed_at IS NULL AND spiffe_id >= ?1 AND spiffe_id < ?2 LIMIT 1",
        )?
        .query_row(params![format!("{full}/"), format!("{full}0")], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?;
    if let Some((task, task_spiffe_id)) = below {
        return Ok(Some(TaskError::IdentityAboveTask {
            spiffe_id: full,
            task,
            task_spiffe_id,
        }));
    }
    Ok(None)
}

fn invalid(field: &'static str, reason: impl Into<String>) -> TaskError {
    TaskError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    /// A process, pinned by pidfd; its descendants are inside the binding too.
    Pid { pid: i32, start_time: u64 },
    /// A cgroup v2 path (relative to the cgroup2 mount) and its sub-cgroups.
    Cgroup {
        path: String,
        /// The cgroup's id (its directory's inode number, never reused
        /// while the system runs) when the task began: a cgroup removed and
        /// made again at the same path while writ was down is another
        /// cgroup, whose processes the task was never bound to. Absent in
        /// records stored before it was kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The CPU time its processes had used in it when the task began
        /// (`cgroup_cpu_usage`): more later means processes ran in it
        /// since, even if none is there now. Absent where the kernel does
        /// not keep it, and in records stored before it was kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu_usage_at_bind: Option<u64>,
        /// It held processes when the task began, so it has emptied once it
        /// holds none: after a restart too, though processes moved out
        /// while writ was down left its CPU time as it was. Absent (false)
        /// in records stored before it was kept.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        populated_at_bind: bool,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub purpose: String,
    pub tools: Vec<String>,
    pub targets: Vec<String>,
    pub data_class: String,
    pub attributes: BTreeMap<String, String>,
}

/// Who asked for an EndTask and the policy decision that let them: the
/// ended task's `task_ended` record carries both, so the trail alone says
/// who ended a task early and under which policies.
#[derive(Debug, Clone)]
pub struct Requester {
    pub caller: CallerFacts,
    pub action: String,
    pub decision: crate::policy::Decision,
}

impl Requester {
    fn annotate(&self, event: AuditEvent) -> AuditEvent {
        event
            .caller(self.caller.clone())
            .decision(
                self.action.clone(),
                self.decision.allowed,
                self.decision.deciding_policies.clone(),
            )
            .policy_errors(&self.decision.errors)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionReason {
    EndTask,
    ProcessExited,
    CgroupEmpty,
    TtlExpired,
    ParentCompleted,
    /// Found active at start-up with a stored record this writ cannot read
    /// (damaged, or written by a newer writ): it cannot be re-pinned, so
    /// it is ended and its certificates revoked.
    RecordUnreadable,
    /// Found active at start-up holding an identity that a registration
    /// entry (added to the config while writ was down) holds too, or lies
    /// below: tasks and entries never share one, and the entry goes on.
    IdentityTaken,
}

impl CompletionReason {
    pub const ALL: [CompletionReason; 7] = [
        CompletionReason::EndTask,
        CompletionReason::ProcessExited,
        CompletionReason::CgroupEmpty,
        CompletionReason::TtlExpired,
        CompletionReason::ParentCompleted,
        CompletionReason::RecordUnreadable,
        CompletionReason::IdentityTaken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CompletionReason::EndTask => "end_task",
            CompletionReason::ProcessExited => "process_exited",
            CompletionReason::CgroupEmpty => "cgroup_empty",
            CompletionReason::TtlExpired => "ttl_expired",
            CompletionReason::ParentCompleted => "parent_completed",
            CompletionReason::RecordUnreadable => "record_unreadable",
            CompletionReason::IdentityTaken => "identity_taken",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub at: SystemTime,
    pub reason: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub parent_id: Option<String>,
    /// 1 for a top-level task.
    pub depth: u32,
    pub binding: Binding,
    pub intent: Intent,
    pub orchestrator: String,
    /// The start time of the orchestrator's process (see
    /// `PinnedProcess::start_time`), when `orchestrator` names it by PID
    /// (`pid:<N>`, a caller that held no SPIFFE ID): a PID alone comes
    /// round again for another process. `None` in records written before
    /// it was kept.
    pub orchestrator_start_time: Option<u64>,
    /// Trust domains whose bundles the task's processes receive.
    pub federates_with: Vec<TrustDomain>,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub completion: Option<Completion>,
}

/// What is stored in the `record` column beside the indexed fields.
#[derive(Serialize, Deserialize)]
struct TaskRecord {
    binding: Binding,
    intent: Intent,
    orchestrator: String,
    /// Absent from records of older writs (read as `None`), and left out
    /// when there is none, so such records stay as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    orchestrator_start_time: Option<u64>,
    depth: u32,
    #[serde(default)]
    federates_with: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum TaskEvent {
    /// With the serial of the SVID minted as the task began, if one was.
    Begun(Arc<Task>, Vec<String>),
    /// With the serials its completion revoked: every one issued for it.
    Completed(Arc<Task>, Vec<String>),
}

/// Limits from `[tasks]` in config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLimits {
    pub max_ttl: Duration,
    pub default_ttl: Duration,
    pub x509_svid_ttl: Duration,
    pub max_depth: u32,
    pub trusted_cgroup_roots: Vec<String>,
    /// How long a completed task stays in the store before it is pruned.
    pub completed_retention: Duration,
}

/// How often the store is pruned of what no task needs any more.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Rows of each kind one prune transaction may remove, so that a backlog
/// (the first start after an upgrade, a long stop) never holds the store's
/// writer for long: the rest follows in further transactions.
const PRUNE_BATCH: usize = 2_000;

/// One page of a task listing (`TaskManager::list_page`).
#[derive(Debug)]
pub struct TaskPage {
    pub tasks: Vec<ListedTask>,
    /// Where the next page starts, if there is one.
    pub next: Option<i64>,
}

/// A task on a page, with the cursor a page that goes on after it starts
/// from.
#[derive(Debug)]
pub struct ListedTask {
    pub cursor: i64,
    pub task: Task,
}

/// A BeginTask request after the admin layer has parsed its wire form.
#[derive(Debug, Clone, Default)]
pub struct BeginRequest {
    pub task_id: Option<String>,
    pub pid: Option<i32>,
    pub cgroup: Option<String>,
    pub spiffe_id: Option<SpiffeId>,
    pub intent: Intent,
    pub ttl: Option<Duration>,
    pub parent_task_id: Option<String>,
    pub federates_with: Vec<TrustDomain>,
}

/// Who is asking, as far as task rules care.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    /// The caller, as pinned when it connected.
    pub process: Arc<PinnedProcess>,
    /// The caller's default SPIFFE ID, if it has one.
    pub spiffe_id: Option<SpiffeId>,
    pub uid: u32,
    /// The caller's attested selectors, for policy decisions.
    pub selectors: Vec<String>,
    /// May bind processes that are not its descendants.
    pub may_bind_any_pid: bool,
    /// May bind processes running under its own uid.
    pub may_bind_same_uid: bool,
    /// The active task the caller works in, when its default identity is
    /// that task's: a task it begins is then a sub-task of this one.
    pub task_id: Option<String>,
}

/// Whether a caller may delegate from `task` or end it: the task's own
/// orchestrator (the same SPIFFE ID, or the same process when it held
/// none), a process working in the task (whose default identity is the
/// task's), or a caller allowed to bind any process. Any other authorized
/// caller is a stranger to the task: it could otherwise hand out
/// identities in another orchestrator's lineage, or end its work.
///
/// "The same process" is the same PID *and* start time, as everywhere
/// writ pins a process: once the orchestrator has exited, another process
/// given its PID is a stranger. A task recorded before start times were
/// kept (`orchestrator_start_time` is `None`) matches no caller by
/// process: writ cannot tell its orchestrator from a newcomer on the same
/// PID, and refusing leaves it to a `bind_any_pid` caller, or its TTL.
pub fn may_act_on(
    task: &Task,
    caller_spiffe_id: Option<&SpiffeId>,
    caller_process: &PinnedProcess,
    may_bind_any_pid: bool,
) -> bool {
    may_bind_any_pid
        || match caller_spiffe_id {
            Some(id) => task.orchestrator == id.to_string() || *id == task.spiffe_id,
            None => {
                task.orchestrator == format!("pid:{}", caller_process.pid())
                    && task.orchestrator_start_time == Some(caller_process.start_time())
            }
        }
}

pub fn validate_task_id(id: &str) -> Result<(), TaskError> {
    if id.is_empty() {
        return Err(invalid("task_id", "must not be empty"));
    }
    if id.len() > MAX_TASK_ID_BYTES {
        return Err(invalid(
            "task_id",
            format!("longer than {MAX_TASK_ID_BYTES} bytes"),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(
            "task_id",
            format!("contains {c:?}; allowed: A-Z a-z 0-9 . _ -"),
        ));
    }
    if id == "." || id == ".." {
        return Err(invalid("task_id", "must not be \".\" or \"..\""));
    }
    Ok(())
}

/// PATH_MAX: no longer path names a cgroup directory.
const MAX_CGROUP_PATH_BYTES: usize = 4096;

/// A cgroup path must be absolute, normalized, and under a trusted root, so a
/// workload cannot bind a task to a look-alike path in a subtree it owns.
pub fn validate_cgroup_path(path: &str, trusted_roots: &[String]) -> Result<(), TaskError> {
    if path.len() > MAX_CGROUP_PATH_BYTES {
        return Err(invalid(
            "binding.cgroup",
            format!(
                "is {} bytes; a cgroup path has at most {MAX_CGROUP_PATH_BYTES}",
                path.len()
            ),
        ));
    }
    if let Some(unshowable) = writ_attestors::find_unshowable(path, &[]) {
        return Err(invalid("binding.cgroup", format!("holds {unshowable}")));
    }
    if !path.starts_with('/') {
        return Err(invalid(
            "binding.cgroup",
            format!(
                "{} is not an absolute cgroup v2 path",
                writ_attestors::excerpt(path)
            ),
        ));
    }
    if path
        .split('/')
        .skip(1)
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(invalid(
            "binding.cgroup",
            "must be normalized (no empty, . or .. segments)",
        ));
    }
    if !trusted_roots
        .iter()
        .any(|root| writ_attestors::cgroup::is_under(path, root))
    {
        return Err(invalid(
            "binding.cgroup",
            format!(
                "{} is not under a trusted root ({})",
                writ_attestors::excerpt(path),
                trusted_roots.join(", ")
            ),
        ));
    }
    Ok(())
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn from_unix_secs(s: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s.max(0) as u64)
}

struct ActiveTask {
    task: Arc<Task>,
    watcher: Option<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct Inner {
    active: HashMap<String, ActiveTask>,
    children: HashMap<String, Vec<String>>,
    /// Tasks being begun (stored, not yet active) or completed (no longer
    /// active, not yet durably complete): EndTask waits for them to settle
    /// rather than report a task in between.
    in_flight: HashMap<String, Arc<watch::Sender<()>>>,
    /// Tasks whose completion failed to persist and is being retried.
    retrying: std::collections::HashSet<String>,
    /// How far writ has got in stopping; asked under this lock by every
    /// completion as it takes its tasks, so none slips past `finish_stop`.
    stop: StopState,
    /// Completions that have taken their tasks out of the active set and
    /// not yet written their audit records: the trail must not close
    /// under one.
    completing: usize,
}

/// Where writ is in stopping, as the task manager sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum StopState {
    #[default]
    Running,
    /// Watchers are stopped and their triggers refused, so that nothing
    /// completes behind the closing trail's back; EndTask (still answered
    /// while the connections drain) and retries of completions the store
    /// refused still complete.
    Stopping,
    /// Nothing completes any more: the trail is about to close.
    Stopped,
}

/// Why a completion runs, which decides whether a stop refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// EndTask, or a restore at start.
    Request,
    /// A watcher (process exit, cgroup emptied, TTL) or a parent gone.
    /// Refused once a stop has begun: the next start finds the process
    /// gone, the cgroup empty or the TTL passed, and completes the task
    /// then, as after a crash.
    Watcher,
    /// A completion the store refused, tried again.
    Retry,
}

impl StopState {
    fn refuses(self, trigger: Trigger) -> bool {
        match self {
            StopState::Running => false,
            StopState::Stopping => trigger == Trigger::Watcher,
            StopState::Stopped => true,
        }
    }
}

/// Counts a completion in `Inner::completing` while it lives.
struct Completing {
    manager: Arc<TaskManager>,
}

impl Completing {
    /// `inner` is the manager's locked state, the same step that took the
    /// completion's tasks out of the active set.
    fn mark(manager: &Arc<TaskManager>, inner: &mut Inner) -> Self {
        inner.completing += 1;
        Self {
            manager: manager.clone(),
        }
    }
}

impl Drop for Completing {
    fn drop(&mut self) {
        let mut inner = self.manager.inner();
        inner.completing = inner.completing.saturating_sub(1);
    }
}

impl Inner {
    /// Puts `task` in the active set, and under its parent when
    /// `under_parent` (an orphan is not: its parent is gone).
    fn insert_active(
        &mut self,
        task: &Arc<Task>,
        watcher: Option<tokio::task::AbortHandle>,
        under_parent: bool,
    ) {
        self.active.insert(
            task.id.clone(),
            ActiveTask {
                task: task.clone(),
                watcher,
            },
        );
        if let Some(parent) = &task.parent_id
            && under_parent
        {
            self.children
                .entry(parent.clone())
                .or_default()
                .push(task.id.clone());
        }
    }
}

/// Settles the tasks it marked in flight when dropped, whichever way the
/// work ends: their waiters then look again.
struct InFlight {
    manager: Arc<TaskManager>,
    ids: Vec<String>,
    flight: Arc<watch::Sender<()>>,
}

impl InFlight {
    /// Marks `ids` in flight; `inner` is the manager's locked state, so the
    /// mark is made in the same step as whatever took them out of (or has
    /// not yet put them in) the active set.
    fn mark(manager: &Arc<TaskManager>, inner: &mut Inner, ids: Vec<String>) -> Self {
        let flight = Arc::new(watch::channel(()).0);
        for id in &ids {
            inner
                .in_flight
                .entry(id.clone())
                .or_insert_with(|| flight.clone());
        }
        Self {
            manager: manager.clone(),
            ids,
            flight,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = self.manager.inner();
        for id in &self.ids {
            if inner
                .in_flight
                .get(id)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                inner.in_flight.remove(id);
            }
        }
        // The last sender goes with this, which wakes every waiter.
    }
}

/// The first wait before retrying a completion the store refused, doubled
/// after each failure up to `COMPLETION_RETRY_MAX`.
const COMPLETION_RETRY_FIRST: Duration = Duration::from_secs(1);
const COMPLETION_RETRY_MAX: Duration = Duration::from_secs(60);
/// How often a completion the store refused is retried once writ is
/// stopping: its stop waits a few seconds at most, so backing off further
/// would leave most of them untried.
const COMPLETION_RETRY_WHILE_STOPPING: Duration = Duration::from_millis(200);
/// How often `finish_stop` looks whether the completions it waits for are
/// done.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long `finish_stop` waits, past its deadline, for completions that
/// are already writing to the store and the trail.
const COMPLETIONS_IN_PROGRESS_DEADLINE: Duration = Duration::from_secs(5);

pub struct TaskManager {
    agent: Arc<Agent>,
    store: Arc<Store>,
    limits: TaskLimits,
    cgroup_mount: Option<PathBuf>,
    /// Every cgroup-bound task's watcher waits on it.
    cgroups: CgroupWatcher,
    inner: Mutex<Inner>,
    /// Every WatchTasks watcher's queue (bounded in bytes, not count).
    events: crate::task_events::TaskEvents,
    /// Turns true when writ begins to stop; wakes the completion retries,
    /// so that they try again within the stop's wait.
    stopping: watch::Sender<bool>,
}

impl TaskManager {
    pub fn new(
        agent: Arc<Agent>,
        store: Arc<Store>,
        limits: TaskLimits,
        cgroup_mount: Option<PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Self {
            agent,
            store,
            limits,
            cgroup_mount,
            cgroups: CgroupWatcher::default(),
            inner: Mutex::new(Inner::default()),
            events: crate::task_events::TaskEvents::default(),
            stopping: watch::channel(false).0,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> crate::task_events::EventReceiver {
        self.events.subscribe()
    }

    pub fn active_count(&self) -> usize {
        self.inner().active.len()
    }

    /// Validates, persists and activates a task. Returns it once it is durable
    /// and processes in its binding can fetch its identity.
    pub async fn begin(
        self: &Arc<Self>,
        req: BeginRequest,
        caller: &Orchestrator,
    ) -> Result<Arc<Task>, TaskError> {
        Ok(self.begin_issuing(req, caller).await?.0)
    }

    /// `begin`, with the serial of the SVID minted as the task began (none
    /// when the CA could not mint one then: its first fetch mints).
    pub async fn begin_issuing(
        self: &Arc<Self>,
        req: BeginRequest,
        caller: &Orchestrator,
    ) -> Result<(Arc<Task>, Vec<String>), TaskError> {
        let mut req = req;
        let now = SystemTime::now();
        let id = match &req.task_id {
            Some(id) => {
                validate_task_id(id)?;
                id.clone()
            }
            None => ulid::Ulid::new().to_string(),
        };
        validate_intent(&req.intent)?;

        // A process working in a task begins sub-tasks of it, whether it
        // names the task or not: as a task of its own, derived from its own
        // identity (the task's), what it began would read as a sub-task
        // while escaping the task's scope, its TTL and its end.
        let implicit_parent = match (&req.parent_task_id, &caller.task_id) {
            (None, Some(own)) => {
                req.parent_task_id = Some(own.clone());
                Some(own.clone())
            }
            _ => None,
        };
        let begun = self
            .begin_checked(req, caller, id, now, implicit_parent.is_some())
            .await;
        match (begun, implicit_parent) {
            (Err(TaskError::ParentCompleted(p)), Some(own)) if p == own => {
                Err(TaskError::CallerTaskCompleted(own))
            }
            (begun, _) => begun,
        }
    }

    /// `begin_issuing` once the task's id is chosen and its parent is in the
    /// request; `implicit`: the caller did not name it (it is the caller's
    /// own task).
    async fn begin_checked(
        self: &Arc<Self>,
        mut req: BeginRequest,
        caller: &Orchestrator,
        id: String,
        now: SystemTime,
        implicit: bool,
    ) -> Result<(Arc<Task>, Vec<String>), TaskError> {
        // Until the task is active, no entry may be created or reloaded:
        // its check against the entries below would miss one added
        // meanwhile, and the entry's against the active tasks this task.
        let _claims = self.agent.identity_claims().read().await;
        let parent = match &req.parent_task_id {
            Some(pid) => Some(self.active_parent(pid).await?),
            None => None,
        };
        // Names the parent in refusals; one the caller did not name is
        // said to be the caller's own task.
        let of_parent = |p: &Task| {
            if implicit {
                format!(
                    "task {} (the caller works in it, so the new task is its sub-task)",
                    p.id
                )
            } else {
                format!("parent task {}", p.id)
            }
        };
        if let Some(parent) = &parent
            && !may_act_on(
                parent,
                caller.spiffe_id.as_ref(),
                &caller.process,
                caller.may_bind_any_pid,
            )
        {
            return Err(TaskError::PermissionDenied(format!(
                "task {} was begun by {}: only it, processes working in the task, or a caller allowed bind_any_pid may begin sub-tasks of it",
                parent.id, parent.orchestrator
            )));
        }
        let depth = parent.as_ref().map_or(1, |p| p.depth + 1);
        if depth > self.limits.max_depth {
            return Err(invalid(
                "parent_task_id",
                format!(
                    "sub-task depth {depth} exceeds the limit of {}{}",
                    self.limits.max_depth,
                    parent
                        .as_ref()
                        .filter(|_| implicit)
                        .map_or(String::new(), |p| format!(" under {}", of_parent(p)))
                ),
            ));
        }
        if let Some(parent) = &parent {
            check_within_parent_scope(&req.intent, &parent.intent, &of_parent(parent))?;
            // Its parent's attributes are a sub-task's too: a sub-task may
            // add keys, never change one (an approval its parent waits
            // for, a ticket it works on), and Issue* policies see them.
            inherit_attributes(&mut req.intent, &parent.intent, &of_parent(parent))?;
            // Work done for a task handles its data: a sub-task that names
            // no data class has its parent's, so policy and relying parties
            // never read an unlabelled sub-task as less restricted.
            if req.intent.data_class.is_empty() {
                req.intent.data_class = parent.intent.data_class.clone();
            }
            if let Some(td) = req
                .federates_with
                .iter()
                .find(|td| !parent.federates_with.contains(td))
            {
                return Err(invalid(
                    "federates_with",
                    format!(
                        "{td} is not among the federated trust domains of {}",
                        of_parent(parent)
                    ),
                ));
            }
        }
        if let Some(td) = req
            .federates_with
            .iter()
            .find(|td| *td == self.agent.trust_domain())
        {
            return Err(invalid(
                "federates_with",
                crate::federation::FederatesWithError::OwnTrustDomain(td.clone()).to_string(),
            ));
        }

        // TTL: bounded by config, and a sub-task never outlives its parent.
        let ttl = req.ttl.unwrap_or(self.limits.default_ttl);
        if ttl < crate::config::MIN_TASK_TTL {
            return Err(invalid(
                "ttl",
                format!(
                    "must be at least {} (a task SVID lives whole seconds, at least one)",
                    crate::config::format_duration(crate::config::MIN_TASK_TTL)
                ),
            ));
        }
        if ttl > self.limits.max_ttl {
            return Err(invalid(
                "ttl",
                format!(
                    "{}s exceeds the maximum of {}s",
                    ttl.as_secs(),
                    self.limits.max_ttl.as_secs()
                ),
            ));
        }
        let mut expires_at = now + ttl;
        if let Some(parent) = &parent {
            if req.ttl.is_some() && expires_at > parent.expires_at {
                return Err(invalid(
                    "ttl",
                    format!("a sub-task cannot outlive {}", of_parent(parent)),
                ));
            }
            expires_at = expires_at.min(parent.expires_at);
        }

        let (binding, watch) = self.resolve_binding(&req, caller)?;

        let spiffe_id = match (&req.spiffe_id, &parent, &caller.spiffe_id) {
            (Some(explicit), _, _) => {
                if explicit.trust_domain() != self.agent.trust_domain() {
                    return Err(invalid(
                        "spiffe_id",
                        format!("must be in trust domain {}", self.agent.trust_domain()),
                    ));
                }
                // Refused here: an SVID needs a path, and a task begun
                // without one would fail every fetch its processes make.
                if explicit.is_trust_domain_id() {
                    return Err(invalid(
                        "spiffe_id",
                        format!("{explicit} has no path; an SVID's SPIFFE ID must have one"),
                    ));
                }
                // An orchestrator names identities in its own lineage only
                // (below its own SPIFFE ID, or its parent task's for a
                // sub-task): otherwise any authorized caller could give a
                // process any identity of the trust domain, root's
                // included. Policy then decides within that.
                let lineage = parent
                    .as_ref()
                    .map(|p| &p.spiffe_id)
                    .or(caller.spiffe_id.as_ref());
                let within = lineage.is_some_and(|root| {
                    explicit
                        .path()
                        .strip_prefix(root.path())
                        .is_some_and(|rest| rest.starts_with('/'))
                });
                if !within && !caller.may_bind_any_pid {
                    return Err(TaskError::PermissionDenied(format!(
                        "spiffe_id {explicit} is outside the caller's lineage ({}); only a caller allowed bind_any_pid may name any identity",
                        match (&parent, lineage) {
                            (Some(p), Some(l)) =>
                                format!("below {l}, the identity of {}", of_parent(p)),
                            (None, Some(l)) => format!("below {l}"),
                            (_, None) => "the caller holds no SPIFFE ID".to_owned(),
                        }
                    )));
                }
                explicit.clone()
            }
            (None, Some(parent), _) => parent
                .spiffe_id
                .join(&format!("task/{id}"))
                .map_err(|e| invalid("task_id", e.to_string()))?,
            (None, None, Some(own)) => own
                .join(&format!("task/{id}"))
                .map_err(|e| invalid("task_id", e.to_string()))?,
            (None, None, None) => {
                return Err(invalid(
                    "spiffe_id",
                    "the caller holds no SPIFFE ID to derive the task identity from; give one explicitly",
                ));
            }
        };
        // Given or derived: a custom endpoint ID may well end in /task/<id>.
        if self.agent.is_reserved(&spiffe_id) {
            let field = if req.spiffe_id.is_some() {
                "spiffe_id"
            } else {
                "task_id"
            };
            return Err(invalid(
                field,
                crate::federation::reserved_id_reason(&spiffe_id),
            ));
        }
        // An entry's identity goes on being issued to whatever the entry
        // matches: a task holding it too could not be told apart by relying
        // parties, and ending the task would not end what that identity may
        // do. Nor may an entry lie below the task's identity, where relying
        // parties would take it for part of the task. Given or derived.
        if let Some(entry) = self
            .agent
            .registry()
            .entries()
            .iter()
            .find(|entry| entry.spiffe_id.is_at_or_below(&spiffe_id))
        {
            let (what, field) = if req.spiffe_id.is_some() {
                ("spiffe_id", "a task takes an identity of its own")
            } else {
                (
                    "task_id",
                    "a task takes an identity of its own: choose another task id",
                )
            };
            let place = if entry.spiffe_id == spiffe_id {
                "is the identity of a registration entry".to_owned()
            } else {
                format!("has registration entry {} below it", entry.spiffe_id)
            };
            return Err(TaskError::PermissionDenied(format!(
                "{what}: {spiffe_id} {place}; {field}"
            )));
        }

        let task = Arc::new(Task {
            id: id.clone(),
            spiffe_id,
            parent_id: parent.as_ref().map(|p| p.id.clone()),
            depth,
            binding,
            intent: req.intent.clone(),
            orchestrator: caller
                .spiffe_id
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("pid:{}", caller.process.pid())),
            // Only a PID-named orchestrator is matched by process.
            orchestrator_start_time: caller
                .spiffe_id
                .is_none()
                .then(|| caller.process.start_time()),
            federates_with: req.federates_with.clone(),
            created_at: now,
            expires_at,
            completion: None,
        });
        // Intent is checked against policy before anything is stored: a
        // sub-task is judged as a delegation, with its parent in context.
        let workload = crate::policy::Workload {
            spiffe_id: caller.spiffe_id.as_ref().map(|s| s.to_string()),
            selectors: caller.selectors.clone(),
            pid: caller.process.pid(),
            uid: caller.uid,
        };
        let request = match &parent {
            Some(parent) => crate::policy::PolicyRequest::DelegateTask {
                caller: workload,
                parent: crate::policy::TaskFacts::from(&**parent),
                task: crate::policy::TaskFacts::from(&*task),
            },
            None => crate::policy::PolicyRequest::BeginTask {
                caller: workload,
                task: crate::policy::TaskFacts::from(&*task),
            },
        };
        let audit_caller = CallerFacts {
            spiffe_ids: caller.spiffe_id.iter().map(|s| s.to_string()).collect(),
            pid: caller.process.pid(),
            uid: caller.uid,
            selectors: caller.selectors.clone(),
        };
        let decision = self
            .agent
            .authorize(&request, Some(audit_caller), true)
            .await;
        if !decision.allowed {
            return Err(TaskError::PolicyDenied(decision.denial_message()));
        }
        // Recorded as it is stored: a task the trail does not know about is
        // never begun. Both writes are durable, in different files, and
        // waiting for them together costs one fsync's latency, not two.
        let begun = AuditEvent::new(EventKind::TaskBegun, ulid::Ulid::new().to_string())
            .caller(CallerFacts {
                spiffe_ids: caller.spiffe_id.iter().map(|s| s.to_string()).collect(),
                pid: caller.process.pid(),
                uid: caller.uid,
                selectors: Vec::new(),
            })
            .task(task_facts(&task))
            .spiffe_id(task.spiffe_id.to_string())
            .decision(
                if task.parent_id.is_some() {
                    "DelegateTask"
                } else {
                    "BeginTask"
                },
                true,
                decision.deciding_policies.clone(),
            )
            .policy_errors(&decision.errors)
            .detail("purpose", task.intent.purpose.clone())
            .detail("expires_at", unix_secs(task.expires_at))
            .detail(
                "binding",
                serde_json::to_value(&task.binding).unwrap_or_default(),
            );
        // The task's first SVID is minted now, its serial stored with the
        // task and its record written with `begun`: one commit and one sync
        // for both, and the bound process finds the SVID ready.
        let store_task = task_row_writer(&task)?;
        // From its commit until it is active, EndTask waits for it.
        let _settling = {
            let mut inner = self.inner();
            InFlight::mark(self, &mut inner, vec![task.id.clone()])
        };
        let first_serials: Vec<String> = match self
            .agent
            .begin_task_with_svid(&task, begun, now, store_task)
            .await
        {
            TaskBeginning::Begun { first_serial } => first_serial.into_iter().collect(),
            TaskBeginning::Refused(e) => return Err(e),
            TaskBeginning::StoreFailed(e) => return Err(e.into()),
            TaskBeginning::AuditFailed(e) => {
                // Never activated, so its SVID never left writ: take the task
                // back out of the store rather than leave one the trail lacks.
                self.forget_unbegun(&task.id).await;
                return Err(TaskError::Audit(e));
            }
        };
        self.activate(task.clone(), watch, first_serials.clone());
        Ok((task, first_serials))
    }

    fn resolve_binding(
        &self,
        req: &BeginRequest,
        caller: &Orchestrator,
    ) -> Result<(Binding, BindingWatch), TaskError> {
        match (req.pid, &req.cgroup) {
            (Some(_), Some(_)) => Err(invalid("binding", "give either pid or cgroup, not both")),
            (None, None) => Err(invalid("binding", "a pid or a cgroup is required")),
            (Some(pid), None) => {
                if pid <= 0 {
                    return Err(invalid("binding.pid", "must be a positive PID"));
                }
                // A PID is a number in some PID namespace, and writ reads it
                // in its own: from a caller in another (a container) it would
                // name whatever process has that number here.
                if !shares_pid_namespace_with_us(&caller.process) {
                    return Err(invalid(
                        "binding.pid",
                        format!(
                            "the caller (pid {} to writ) runs in another PID namespace, where PID {pid} is not the process writ would see under that number; bind a cgroup instead, or call from writ's PID namespace",
                            caller.process.pid()
                        ),
                    ));
                }
                let pinned = PinnedProcess::open(pid).map_err(|e| match thread_group_of(pid) {
                    Some(process) if process != pid => invalid(
                        "binding.pid",
                        format!(
                            "{pid} is a thread of process {process}, not a process; bind the process"
                        ),
                    ),
                    _ if e.is_resource_exhaustion() => TaskError::Unavailable(format!(
                        "writ could not pin process {pid} for want of resources ({e}); try again"
                    )),
                    _ => invalid("binding.pid", format!("cannot pin process {pid}: {e}")),
                })?;
                // A caller may bind its own descendants; with bind_same_uid,
                // processes of its own uid (which it could ptrace anyway);
                // anything else only if authorized for arbitrary PIDs.
                let allowed = caller.may_bind_any_pid
                    || writ_attestors::descends_from(&pinned, &caller.process)
                    || (caller.may_bind_same_uid
                        && writ_attestors::read_snapshot(&pinned)
                            .is_ok_and(|s| s.uid == caller.uid));
                if !allowed {
                    return Err(TaskError::PermissionDenied(format!(
                        "process {pid} is neither a descendant of the caller (pid {}) nor {}; only a caller listed in [admin_api] bind_any_pid may bind any process",
                        caller.process.pid(),
                        if caller.may_bind_same_uid {
                            "running under the caller's uid"
                        } else {
                            "allowed by bind_same_uid"
                        }
                    )));
                }
                let binding = Binding::Pid {
                    pid,
                    start_time: pinned.start_time(),
                };
                Ok((binding, BindingWatch::Process(Arc::new(pinned))))
            }
            (None, Some(path)) => {
                validate_cgroup_path(path, &self.limits.trusted_cgroup_roots)?;
                let dir = self.cgroup_dir(path).ok_or_else(|| {
                    invalid("binding.cgroup", "no cgroup v2 hierarchy is mounted")
                })?;
                // Held open from here on, so the cgroup judged is the cgroup
                // bound and watched, whatever is made at its path later.
                let Ok(cgroup) = CgroupDir::open(&dir) else {
                    return Err(invalid(
                        "binding.cgroup",
                        format!("cgroup {} does not exist", writ_attestors::excerpt(path)),
                    ));
                };
                let (id, owner) = (cgroup.id(), cgroup.owner());
                // As for a PID: a caller may hand a task identity only to
                // processes it controls. A cgroup's owner decides who is
                // moved into it (a delegated cgroup is its user's), so the
                // caller must own it, unless it may bind anything.
                let allowed =
                    caller.may_bind_any_pid || (caller.may_bind_same_uid && owner == caller.uid);
                if !allowed {
                    return Err(TaskError::PermissionDenied(format!(
                        "cgroup {} is owned by uid {owner}, not by the caller (uid {}){}",
                        writ_attestors::excerpt(path),
                        caller.uid,
                        if caller.may_bind_same_uid {
                            ""
                        } else {
                            ", and bind_same_uid is off"
                        }
                    )));
                }
                // Read now, not when the watcher first looks: processes
                // that leave before then have still emptied it.
                let cpu_usage_at_bind = cgroup.cpu_usage();
                let held_processes = cgroup.populated() == Some(true);
                Ok((
                    Binding::Cgroup {
                        path: path.clone(),
                        id: Some(id),
                        cpu_usage_at_bind,
                        populated_at_bind: held_processes,
                    },
                    BindingWatch::Cgroup {
                        cgroup: Arc::new(cgroup),
                        dir,
                        held_processes,
                        cpu_usage_at_bind,
                    },
                ))
            }
        }
    }

    /// The directory of the cgroup at `path` (as bindings store it), if a
    /// cgroup v2 hierarchy is mounted.
    fn cgroup_dir(&self, path: &str) -> Option<PathBuf> {
        self.cgroup_mount
            .as_ref()
            .map(|m| m.join(path.trim_start_matches('/')))
    }

    /// Removes a stored task that was never activated (its audit record
    /// could not be written). Failing that, restart finds it and completes
    /// or resumes it like any other.
    async fn forget_unbegun(&self, id: &str) {
        let id = id.to_owned();
        let removed = self
            .store
            .write(move |conn| {
                // Only its first SVID's serial can be stored: the task was
                // never activated, so nothing else was issued for it, and
                // that SVID never left writ.
                conn.prepare_cached("DELETE FROM issued WHERE task_id = ?1")?
                    .execute(params![id])?;
                conn.prepare_cached(
                    "DELETE FROM tasks WHERE task_id = ?1 AND completed_at IS NULL",
                )?
                .execute(params![id])?;
                Ok(())
            })
            .await;
        if let Err(e) = removed {
            tracing::error!(error = %e, "removing a task whose audit record failed");
        }
    }

    /// Makes a persisted task live: indexed for identity lookups, watched
    /// for its completion triggers, announced to watchers.
    fn activate(
        self: &Arc<Self>,
        task: Arc<Task>,
        watch: BindingWatch,
        first_serials: Vec<String>,
    ) {
        let parent_gone = {
            let mut inner = self.inner();
            let parent_gone = task
                .parent_id
                .as_ref()
                .is_some_and(|p| !inner.active.contains_key(p));
            // An orphan is active too, for as long as its completion takes:
            // completion works on the active set (and EndTask finds it).
            // It is neither watched nor served. Once writ is stopping, no
            // task is watched: the next start looks at its binding.
            let watched = !parent_gone && inner.stop == StopState::Running;
            let watcher = watched.then(|| self.spawn_watcher(task.clone(), watch));
            inner.insert_active(&task, watcher, !parent_gone);
            parent_gone
        };
        if parent_gone {
            // The parent completed while this sub-task was being stored.
            let manager = self.clone();
            let id = task.id.clone();
            self.events.send(TaskEvent::Begun(task, first_serials));
            tokio::spawn(async move {
                match manager
                    .complete_reporting(
                        &id,
                        CompletionReason::ParentCompleted,
                        String::new(),
                        None,
                        Trigger::Watcher,
                    )
                    .await
                {
                    Ok(_) => {}
                    Err(TaskError::Stopping(_)) => {
                        tracing::debug!(task = %id, "writ is stopping; the orphaned sub-task completes at the next start");
                    }
                    Err(e) => {
                        tracing::error!(task = %id, error = %e, "completing an orphaned sub-task failed");
                    }
                }
            });
            return;
        }
        self.agent.index_task(task.clone());
        let change = match &task.binding {
            Binding::Pid { pid, start_time } => Change::TaskBegunForProcess {
                pid: *pid,
                start_time: *start_time,
            },
            Binding::Cgroup { .. } => Change::TaskBegunForCgroup,
        };
        self.events.send(TaskEvent::Begun(task, first_serials));
        self.agent.notify(change);
    }

    fn spawn_watcher(
        self: &Arc<Self>,
        task: Arc<Task>,
        watch: BindingWatch,
    ) -> tokio::task::AbortHandle {
        let manager = self.clone();
        let handle = tokio::spawn(async move {
            let ttl = task
                .expires_at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let reason = tokio::select! {
                _ = tokio::time::sleep(ttl) => CompletionReason::TtlExpired,
                reason = wait_binding_ends(watch, &manager.cgroups) => reason,
            };
            // Complete from a fresh task: completion aborts this watcher, and
            // must not be cancelled half-way by that.
            let id = task.id.clone();
            tokio::spawn(async move {
                match manager
                    .complete_reporting(&id, reason, String::new(), None, Trigger::Watcher)
                    .await
                {
                    Ok(_) => {}
                    Err(TaskError::Stopping(_)) => {
                        tracing::debug!(task = %id, reason = reason.as_str(), "writ is stopping; the task completes at the next start");
                    }
                    Err(e) => {
                        tracing::error!(task = %id, error = %e, "completing a task failed");
                    }
                }
            });
        });
        handle.abort_handle()
    }

    /// Ends a task on request. Err if unknown; Ok with the completed task
    /// (completed now, or earlier by another trigger).
    /// The task, and the serials issued for it (all revoked), in issue
    /// order. A task completed before is reported as it is.
    pub async fn end(
        self: &Arc<Self>,
        id: &str,
        detail: String,
    ) -> Result<(Arc<Task>, Vec<String>), TaskError> {
        let (task, serials, _) = self.end_reporting(id, detail, None).await?;
        Ok((task, serials))
    }

    /// `end`, and whether this call ended the task (false: it had ended
    /// already, by this trigger or another).
    /// `requested_by`, when given, names the EndTask's caller and the
    /// decision that allowed it in the ended task's record.
    pub async fn end_reporting(
        self: &Arc<Self>,
        id: &str,
        detail: String,
        requested_by: Option<Requester>,
    ) -> Result<(Arc<Task>, Vec<String>, bool), TaskError> {
        let requested_by = requested_by.map(Arc::new);
        loop {
            if let Some((task, serials)) = self
                .complete_reporting(
                    id,
                    CompletionReason::EndTask,
                    detail.clone(),
                    requested_by.clone(),
                    Trigger::Request,
                )
                .await?
            {
                return Ok((task, serials, true));
            }
            // Not active: being begun, being completed by another trigger,
            // or settled. Reported only once settled, so that a task said to
            // be over is durably over, and one being begun is ended.
            if self.settled(id).await {
                break;
            }
        }
        match self.get(id)? {
            Some(t) => Ok((Arc::new(t), self.issued_serials(id)?, false)),
            None => Err(TaskError::NotFound(id.to_owned())),
        }
    }

    /// Completes `id` and every sub-task below it, exactly once: the first
    /// trigger takes the tasks out of the active set under the lock, so later
    /// triggers find nothing to do. Returns the root task if this call
    /// completed it.
    pub async fn complete(
        self: &Arc<Self>,
        id: &str,
        reason: CompletionReason,
        detail: String,
    ) -> Result<Option<Arc<Task>>, TaskError> {
        Ok(self
            .complete_reporting(id, reason, detail, None, Trigger::Request)
            .await?
            .map(|(task, _)| task))
    }

    /// The active task `id`, to begin a sub-task under; one still being
    /// begun or completed is waited for, so that the answer does not depend
    /// on the moment it is asked. A completed parent is a state the caller
    /// can see (FailedPrecondition), an unknown one a mistake in the request.
    async fn active_parent(&self, id: &str) -> Result<Arc<Task>, TaskError> {
        self.until_settled(id).await;
        if let Some(active) = self.inner().active.get(id) {
            return Ok(active.task.clone());
        }
        match self.get(id)? {
            Some(_) => Err(TaskError::ParentCompleted(id.to_owned())),
            None => Err(invalid(
                "parent_task_id",
                format!("no task {}", excerpt(id)),
            )),
        }
    }

    /// Returns once nothing is in flight for `id` (neither its begin nor
    /// its completion).
    pub async fn until_settled(&self, id: &str) {
        loop {
            let mut changed = match self.inner().in_flight.get(id) {
                Some(flight) => flight.subscribe(),
                None => return,
            };
            let _ = changed.changed().await;
        }
    }

    /// Whether `id` has settled: true at once if it is neither in flight
    /// nor active, else false once what was in flight has finished (or at
    /// once if it is active: it became so since the caller looked).
    async fn settled(&self, id: &str) -> bool {
        let mut changed = {
            let inner = self.inner();
            match inner.in_flight.get(id) {
                Some(flight) => flight.subscribe(),
                None => return !inner.active.contains_key(id),
            }
        };
        // Resolves with an error once the last sender is dropped.
        let _ = changed.changed().await;
        false
    }

    /// `complete`, also returning the serials the root task's completion
    /// revoked (every one issued for it), in issue order. The work runs in
    /// a task of its own: once a completion has taken its tasks out of the
    /// active set it must reach the store, whether or not whoever asked is
    /// still waiting (a client hanging up on EndTask drops its request).
    async fn complete_reporting(
        self: &Arc<Self>,
        id: &str,
        reason: CompletionReason,
        detail: String,
        requested_by: Option<Arc<Requester>>,
        trigger: Trigger,
    ) -> Result<Option<(Arc<Task>, Vec<String>)>, TaskError> {
        let manager = self.clone();
        let task = id.to_owned();
        tokio::spawn(async move {
            manager
                .complete_now(&task, reason, detail, requested_by, trigger)
                .await
        })
        .await
        .map_err(|e| TaskError::Interrupted {
            task: id.to_owned(),
            reason: e.to_string(),
        })?
    }

    /// The body of `complete_reporting`. A completion the store refuses puts
    /// its tasks back in the active set (still unserved) and is retried in
    /// the background until it persists.
    async fn complete_now(
        self: &Arc<Self>,
        id: &str,
        reason: CompletionReason,
        detail: String,
        requested_by: Option<Arc<Requester>>,
        trigger: Trigger,
    ) -> Result<Option<(Arc<Task>, Vec<String>)>, TaskError> {
        let (victims, _in_flight, _completing): (Vec<(Arc<Task>, CompletionReason)>, _, _) = {
            let mut inner = self.inner();
            if inner.stop.refuses(trigger) && inner.active.contains_key(id) {
                return Err(TaskError::Stopping(id.to_owned()));
            }
            let mut out = Vec::new();
            let mut queue = vec![(id.to_owned(), reason)];
            while let Some((tid, why)) = queue.pop() {
                let Some(active) = inner.active.remove(&tid) else {
                    continue;
                };
                if let Some(w) = active.watcher {
                    w.abort();
                }
                if let Some(kids) = inner.children.remove(&tid) {
                    queue.extend(
                        kids.into_iter()
                            .map(|k| (k, CompletionReason::ParentCompleted)),
                    );
                }
                if let Some(p) = &active.task.parent_id
                    && let Some(siblings) = inner.children.get_mut(p)
                {
                    siblings.retain(|s| s != &tid);
                }
                out.push((active.task, why));
            }
            let ids = out.iter().map(|(t, _)| t.id.clone()).collect();
            let in_flight = InFlight::mark(self, &mut inner, ids);
            let completing = Completing::mark(self, &mut inner);
            (out, in_flight, completing)
        };
        if victims.is_empty() {
            return Ok(None);
        }
        // Stop serving the identities at once, before the slower durable part.
        // Streams hear of it once the CRL is asked for (below), so that each
        // sends one message with both; one that looks meanwhile finds the
        // identities gone already.
        for (task, _) in &victims {
            self.agent.unindex_task(&task.id);
        }
        let ended_ids: Vec<String> = victims.iter().map(|(t, _)| t.id.clone()).collect();

        let now = SystemTime::now();
        // A sub-task ended with its parent says which completion took it
        // (the request's detail is about the task it named).
        let detail_of = |task: &Task| {
            if task.id == id {
                detail.clone()
            } else {
                format!("ended with task {id}")
            }
        };
        let rows: Vec<(String, &'static str, String)> = victims
            .iter()
            .map(|(t, why)| (t.id.clone(), why.as_str(), detail_of(t)))
            .collect();
        let at = unix_secs(now);
        let revoked = self
            .store
            .write(move |conn| {
                let mut revoked: Vec<(String, Vec<(crate::ca::RevokedCert, i64)>)> = Vec::new();
                for (tid, why, d) in &rows {
                    conn.prepare_cached(
                        "UPDATE tasks SET completed_at = ?2, completion_reason = ?3, completion_detail = ?4
                         WHERE task_id = ?1 AND completed_at IS NULL",
                    )?
                    .execute(params![tid, at, why, d])?;
                    let serials =
                        revoke_issued(conn, "FROM issued i WHERE i.task_id = ?1", tid, at, why)?;
                    if !serials.is_empty() {
                        revoked.push((tid.clone(), serials));
                    }
                }
                Ok(revoked)
            })
            .await;
        let revoked = match revoked {
            Ok(n) => n,
            Err(e) => {
                // The identities are no longer served, but the revocation is
                // not on disk: say so loudly, and keep trying. The tasks go
                // back to the active set, unwatched and unserved, so that
                // the retry (or an EndTask, or their parent's completion)
                // completes them; a restart would too.
                tracing::error!(error = %e, task = id, "persisting task completion failed; retrying");
                self.agent.notify(Change::TasksEnded {
                    ids: ended_ids,
                    crl_epoch: None,
                });
                self.reinstate(&victims);
                self.retry_completion(id, reason, detail, requested_by);
                return Err(e.into());
            }
        };
        let revoked_serials: usize = revoked.iter().map(|(_, serials)| serials.len()).sum();
        self.agent
            .metrics()
            .revocations
            .inc_by(revoked_serials as u64);
        self.agent
            .add_revocations(revoked.iter().flat_map(|(_, entries)| entries));
        let crl_epoch = (revoked_serials > 0).then(|| self.agent.request_crls());
        self.agent.notify(Change::TasksEnded {
            ids: ended_ids,
            crl_epoch,
        });
        let revoked: Vec<(String, Vec<String>)> = revoked
            .into_iter()
            .map(|(task_id, entries)| {
                let serials = entries
                    .iter()
                    .map(|(c, _)| hex::encode(&c.serial))
                    .collect();
                (task_id, serials)
            })
            .collect();
        // The completion is already durable in the store; the audit records
        // cannot undo it, so a failure to write them is logged, not returned.
        // They are written while the CRL is signed: both must finish before
        // the caller hears the task is over, neither needs the other.
        let correlation_id = ulid::Ulid::new().to_string();
        let mut records: Vec<AuditEvent> = victims
            .iter()
            .map(|(task, why)| {
                let ended = AuditEvent::new(EventKind::TaskEnded, correlation_id.clone())
                    .task(task_facts(task))
                    .spiffe_id(task.spiffe_id.to_string())
                    .reason(why.as_str())
                    .detail("detail", detail_of(task));
                // Sub-tasks ended with it name their parent as the reason;
                // who asked is on the record of the task they asked to end.
                match requested_by.as_deref() {
                    Some(by) if task.id == id => by.annotate(ended),
                    _ => ended,
                }
            })
            .collect();
        records.extend(revoked.iter().map(|(task_id, serials)| {
            AuditEvent::new(EventKind::Revoked, correlation_id.clone())
                .reason("task completed")
                .detail("task_id", task_id.clone())
                .detail("serials", serials.clone())
        }));
        let publish = async {
            if let Some(wanted) = crl_epoch
                && let Err(e) = self.agent.crls_published(wanted).await
            {
                tracing::error!(error = %e, "publishing a new CRL failed");
            }
        };
        tokio::join!(publish, self.agent.record_all_best_effort(records));
        let mut root = None;
        for (task, why) in victims {
            let mut done = (*task).clone();
            done.completion = Some(Completion {
                at: now,
                reason: why.as_str().to_owned(),
                detail: detail_of(&task),
            });
            let done = Arc::new(done);
            // Every completion is in the audit trail and on WatchTasks; at
            // info level a busy node would log thousands of lines a second.
            tracing::debug!(task = %done.id, reason = why.as_str(), "task completed");
            self.agent.metrics().task_completed(why.as_str());
            let serials = revoked
                .iter()
                .find(|(task_id, _)| *task_id == done.id)
                .map(|(_, serials)| serials.clone())
                .unwrap_or_default();
            if done.id == id {
                root = Some((done.clone(), serials.clone()));
            }
            self.events.send(TaskEvent::Completed(done, serials));
        }
        Ok(root)
    }

    /// Puts tasks whose completion did not persist back in the active set,
    /// with their parent links, neither watched nor indexed.
    fn reinstate(&self, victims: &[(Arc<Task>, CompletionReason)]) {
        let mut inner = self.inner();
        for (task, _) in victims {
            inner.insert_active(task, None, true);
        }
    }

    /// Retries completing `id` with backoff until it persists or something
    /// else completes it; one retry loop per task at a time (a retry that
    /// fails finds its own loop running and starts no other).
    fn retry_completion(
        self: &Arc<Self>,
        id: &str,
        reason: CompletionReason,
        detail: String,
        requested_by: Option<Arc<Requester>>,
    ) {
        if !self.inner().retrying.insert(id.to_owned()) {
            return;
        }
        let manager = self.clone();
        let id = id.to_owned();
        let mut stopping = self.stopping.subscribe();
        tokio::spawn(async move {
            let mut wait = COMPLETION_RETRY_FIRST;
            loop {
                if *stopping.borrow_and_update() {
                    tokio::time::sleep(COMPLETION_RETRY_WHILE_STOPPING).await;
                } else {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stopping.wait_for(|s| *s) => {}
                    }
                }
                match manager
                    .complete_now(
                        &id,
                        reason,
                        detail.clone(),
                        requested_by.clone(),
                        Trigger::Retry,
                    )
                    .await
                {
                    Ok(_) => break,
                    // Left in `retrying`: `finish_stop` names it as not
                    // durably completed.
                    Err(TaskError::Stopping(_)) => return,
                    Err(e) => {
                        tracing::warn!(task = %id, error = %e, "retrying a task's completion failed");
                        wait = (wait * 2).min(COMPLETION_RETRY_MAX);
                    }
                }
            }
            manager.inner().retrying.remove(&id);
        });
    }

    /// The first step of a stop: from now on no watcher completes a task
    /// (the next start completes those whose process went or whose TTL
    /// passed meanwhile, as after a crash), and completions the store
    /// refused are retried at once, then often, for `finish_stop`.
    pub fn begin_stop(&self) {
        {
            let mut inner = self.inner();
            if inner.stop == StopState::Running {
                inner.stop = StopState::Stopping;
            }
            for active in inner.active.values_mut() {
                if let Some(watcher) = active.watcher.take() {
                    watcher.abort();
                }
            }
        }
        self.stopping.send_replace(true);
    }

    /// Waits until `done` holds of the manager's state, or `deadline`
    /// passes; whether it held. Only a stop waits so, so a poll will do.
    async fn wait_for_state(
        &self,
        deadline: tokio::time::Instant,
        done: impl Fn(&Inner) -> bool,
    ) -> bool {
        loop {
            if done(&self.inner()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(STOP_POLL_INTERVAL).await;
        }
    }

    /// The last step of a stop, just before the audit trail closes. Waits
    /// until `deadline` for completions the store refused to persist on
    /// retry; then refuses every completion, and waits (up to
    /// `COMPLETIONS_IN_PROGRESS_DEADLINE` more) for those already under
    /// way, so that each one both reaches the store and writes its audit
    /// records before the trail closes. Returns the tasks whose completion
    /// never persisted (each logged at ERROR): a restart finds them active.
    pub async fn finish_stop(&self, deadline: tokio::time::Instant) -> Vec<String> {
        self.begin_stop();
        self.wait_for_state(deadline, |inner| {
            inner.completing == 0 && not_persisted(inner).is_empty()
        })
        .await;
        self.inner().stop = StopState::Stopped;
        let last = tokio::time::Instant::now() + COMPLETIONS_IN_PROGRESS_DEADLINE;
        if !self
            .wait_for_state(last, |inner| inner.completing == 0)
            .await
        {
            tracing::error!(
                completing = self.inner().completing,
                "task completions still under way as writ stops; their audit records may be missing from the trail"
            );
        }
        let lost = not_persisted(&self.inner());
        for id in &lost {
            tracing::error!(
                task = %id,
                "writ stopped before this task's completion (and its sub-tasks') could be made durable: the store kept refusing it. After a restart the task is active again unless its process has gone or its TTL has passed; end it again then"
            );
        }
        lost
    }

    pub fn get(&self, id: &str) -> Result<Option<Task>, TaskError> {
        if let Some(a) = self.inner().active.get(id) {
            return Ok(Some((*a.task).clone()));
        }
        let id = id.to_owned();
        self.store
            .read(move |conn| {
                conn.query_row(
                    &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = ?1"),
                    params![id],
                    row_to_task,
                )
                .optional()
                .map_err(StoreError::from)
            })?
            .transpose()
    }

    /// One page of tasks, in the order they were stored (the order they
    /// began): the first `limit` after `after` (a previous page's cursor),
    /// and the cursor to go on from if more follow. The page also ends
    /// before the task that would take the `size` of its tasks past
    /// `max_bytes`, so that rows of large intents are not all read (and
    /// held) for a page that cannot carry them; it holds at least one task
    /// however large. Read from the store for both kinds of listing, by
    /// rowid (active ones through their partial index), so a page costs
    /// the same however many tasks are retained.
    pub fn list_page(
        &self,
        include_completed: bool,
        after: Option<i64>,
        limit: usize,
        max_bytes: usize,
        size: fn(&Task) -> usize,
    ) -> Result<TaskPage, TaskError> {
        let query = format!(
            "SELECT {TASK_COLUMNS}, rowid FROM tasks WHERE rowid > ?1{} ORDER BY rowid LIMIT ?2",
            if include_completed {
                ""
            } else {
                " AND completed_at IS NULL"
            }
        );
        // One more than asked for tells whether another page follows.
        let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let (rows, more) = self.store.read(move |conn| {
            let mut stmt = conn.prepare_cached(&query)?;
            let mut found = stmt.query(params![after.unwrap_or(0), fetch])?;
            let mut rows = Vec::new();
            let mut bytes = 0usize;
            while let Some(r) = found.next()? {
                let row = (r.get::<_, i64>(9)?, row_to_task(r)?);
                if rows.len() == limit {
                    return Ok((rows, true));
                }
                let row_size = row.1.as_ref().map_or(0, size);
                if !rows.is_empty() && bytes.saturating_add(row_size) > max_bytes {
                    return Ok((rows, true));
                }
                bytes = bytes.saturating_add(row_size);
                rows.push(row);
            }
            Ok((rows, false))
        })?;
        let next = if more {
            rows.last().map(|(rowid, _)| *rowid)
        } else {
            None
        };
        // One unreadable row does not hide every other task; `get` names it.
        let tasks = rows
            .into_iter()
            .filter_map(|(cursor, row)| {
                row.inspect_err(|e| tracing::warn!(error = %e, "ListTasks left out a task"))
                    .ok()
                    .map(|task| ListedTask { cursor, task })
            })
            .collect();
        Ok(TaskPage { tasks, next })
    }

    /// Serials issued for a task, hex.
    pub fn issued_serials(&self, id: &str) -> Result<Vec<String>, TaskError> {
        let mut by_task = self.issued_serials_of(vec![id.to_owned()])?;
        Ok(by_task.pop().unwrap_or_default())
    }

    /// `issued_serials` of each of `ids`, in the same order, in one read.
    pub fn issued_serials_of(&self, ids: Vec<String>) -> Result<Vec<Vec<String>>, TaskError> {
        Ok(self.store.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT serial FROM issued WHERE task_id = ?1 ORDER BY issued_at",
            )?;
            ids.iter()
                .map(|id| {
                    let rows = stmt
                        .query_map(params![id], |r| r.get::<_, Vec<u8>>(0))?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(rows.into_iter().map(hex::encode).collect())
                })
                .collect()
        })?)
    }

    /// Prunes the store now and then every `PRUNE_INTERVAL` until writ stops.
    pub fn spawn_pruner(self: &Arc<Self>) {
        let manager = self.clone();
        let mut stopping = self.agent.shutdown_requested();
        tokio::spawn(async move {
            loop {
                if let Err(e) = manager.prune().await {
                    tracing::warn!(error = %e, "pruning the store failed; trying again later");
                }
                tokio::select! {
                    _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
            }
        });
    }

    /// Removes from the store what nothing needs any more (`store::prune`):
    /// revocations and serials of expired certificates, and tasks completed
    /// longer than `completed_retention` ago (and no longer in reach of a
    /// JWT-SVID minted for them, see `store::prune`). A pruned task is gone from
    /// GetTask and ListTasks; the audit trail keeps its records.
    pub async fn prune(&self) -> Result<crate::store::Pruned, TaskError> {
        let retention =
            i64::try_from(self.limits.completed_retention.as_secs()).unwrap_or(i64::MAX);
        let jwt_svid_ttl = self.agent.jwt_svid_ttl();
        let mut total = crate::store::Pruned::default();
        loop {
            // Not the wall clock: a jump ahead would drop revocations and
            // serials of certificates still valid, for good.
            let now = unix_secs(self.agent.pruning_now());
            let completed_before = now.saturating_sub(retention);
            let pruned = self
                .store
                .write(move |conn| {
                    crate::store::prune(conn, now, completed_before, jwt_svid_ttl, PRUNE_BATCH)
                })
                .await?;
            total.revocations += pruned.revocations;
            total.issued += pruned.issued;
            total.tasks += pruned.tasks;
            // Another pass when a batch was full, or when removed sub-tasks
            // may have freed their parents (each pass goes one level up).
            let more = [pruned.revocations, pruned.issued, pruned.tasks]
                .iter()
                .any(|n| *n >= PRUNE_BATCH)
                || pruned.tasks > 0;
            if !more {
                break;
            }
        }
        if total.total() > 0 {
            tracing::debug!(
                revocations = total.revocations,
                serials = total.issued,
                tasks = total.tasks,
                "pruned the store"
            );
        }
        Ok(total)
    }

    /// After a restart: re-pins tasks whose binding still lives, and completes
    /// the rest (process gone, cgroup empty, TTL passed, parent gone).
    pub async fn restore(self: &Arc<Self>) -> Result<(), TaskError> {
        let rows = self.store.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {TASK_COLUMNS}, rowid FROM tasks WHERE completed_at IS NULL
                 ORDER BY created_at, task_id"
            ))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(9)?, row_to_task(r)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        let mut tasks = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for (rowid, task) in rows {
            match task {
                Ok(task) => tasks.push(task),
                Err(e) => unreadable.push((rowid, e.to_string())),
            }
        }
        // Their sub-tasks are not restored either: they find no parent below.
        self.complete_unreadable(unreadable).await?;
        // No process or cgroup outlives a reboot, but after one a PID and
        // start time, or a cgroup's id, can come round again (early boot is
        // much the same each time): tasks of another boot are not matched
        // against this one's processes at all. The boot is recorded only
        // once they are completed, so a restore cut short runs again.
        let boot = crate::store::current_boot();
        let recorded = self.store.read(crate::store::recorded_boot)?;
        let other_boot = matches!((recorded, boot), (Some(then), Some(now)) if then != now);
        // Writs before the boot id recorded none: a task of theirs begun
        // before this boot started is of an earlier one all the same.
        let booted_at = match recorded {
            None => crate::store::boot_time(),
            Some(_) => None,
        };
        let of_other_boot =
            |task: &Task| other_boot || booted_at.is_some_and(|booted| task.created_at < booted);
        // Parents before children, so each child finds its parent active.
        tasks.sort_by_key(|t| t.depth);
        let now = SystemTime::now();
        // Stored before any task is served, so a later restart starts from
        // the deadline brought forward rather than bringing it forward
        // again from its own later `now`.
        let clamped = clamp_restored_deadlines(&mut tasks, now);
        if !clamped.is_empty() {
            tracing::warn!(
                tasks = clamped.len(),
                "the clock was put back since tasks began: their ends are brought forward so that none lives longer than its TTL from now"
            );
            self.store
                .write(move |conn| {
                    let mut stmt = conn.prepare_cached(
                        "UPDATE tasks SET expires_at = ?2 WHERE task_id = ?1 AND completed_at IS NULL",
                    )?;
                    for (id, expires_at) in &clamped {
                        stmt.execute(params![id, unix_secs(*expires_at)])?;
                    }
                    Ok(())
                })
                .await?;
        }
        let mut to_complete = Vec::new();
        let mut restored = std::collections::HashSet::new();
        // Legacy cgroup tasks kept, with their cgroup's id now known.
        let mut ids_learned = Vec::new();
        for task in tasks {
            let mut task = Arc::new(task);
            let mut made_again = false;
            let mut id_learned = None;
            // A sub-task outlives no parent: one whose parent is completed
            // (or gone from the store) completes with it. Parents come
            // first, so every active parent is in `restored` by now.
            let orphaned = task
                .parent_id
                .as_ref()
                .is_some_and(|p| !restored.contains(p));
            restored.insert(task.id.clone());
            let task_of_other_boot = of_other_boot(&task);
            let alive = match &task.binding {
                Binding::Pid { .. } if task_of_other_boot => Err(CompletionReason::ProcessExited),
                Binding::Cgroup { .. } if task_of_other_boot => Err(CompletionReason::CgroupEmpty),
                Binding::Pid { pid, start_time } => match PinnedProcess::open(*pid) {
                    Ok(p) if p.start_time() == *start_time => {
                        Ok(BindingWatch::Process(Arc::new(p)))
                    }
                    _ => Err(CompletionReason::ProcessExited),
                },
                // Still the cgroup the task was bound to (one made again at
                // its path belongs to other processes), and either populated
                // or, bound before its processes started, still waiting for
                // them: no process has run in it since.
                Binding::Cgroup {
                    path,
                    id,
                    cpu_usage_at_bind,
                    populated_at_bind,
                } => match self
                    .cgroup_dir(path)
                    .and_then(|dir| Some((CgroupDir::open(&dir).ok()?, dir)))
                {
                    // Stored without the id (by an older writ): the
                    // cgroup now there is the task's only if it was made
                    // before the task began. A creation time that cannot
                    // be read (the cgroup just removed) proves nothing.
                    Some((cgroup, _))
                        if id.is_none()
                            && cgroup.created_at().is_none_or(|made| {
                                made > task.created_at + CGROUP_CREATION_SLACK
                            }) =>
                    {
                        made_again = true;
                        Err(CompletionReason::CgroupEmpty)
                    }
                    Some((cgroup, dir)) if id.is_none_or(|id| cgroup.id() == id) => {
                        if id.is_none() {
                            id_learned = Some(cgroup.id());
                        }
                        // Without its CPU time at the start, an empty cgroup
                        // may have emptied while writ was down: it is taken
                        // to have held processes, so it has.
                        let mut watch = BindingWatch::Cgroup {
                            cgroup: Arc::new(cgroup),
                            held_processes: *populated_at_bind || cpu_usage_at_bind.is_none(),
                            cpu_usage_at_bind: *cpu_usage_at_bind,
                            dir,
                        };
                        if watch.cgroup_emptied() {
                            Err(CompletionReason::CgroupEmpty)
                        } else {
                            Ok(watch)
                        }
                    }
                    _ => Err(CompletionReason::CgroupEmpty),
                },
            };
            // Activate first even if it is to complete at once: completion
            // works on the active set, and runs the revocation path.
            let watch = alive
                .as_ref()
                .ok()
                .cloned()
                .unwrap_or(BindingWatch::Nothing);
            // When its process is gone too, which came first is unknown
            // (nothing saw the process go), but the TTL's moment is known:
            // a passed TTL is the reason, whatever else happened meanwhile,
            // so the same circumstances always read the same.
            // An entry taking (or sitting below) a live task's identity can
            // only come from a config edited while writ was down: the
            // entry is configuration, the task a grant that ends here.
            let identity_taken = self
                .agent
                .registry()
                .entries()
                .iter()
                .find(|entry| entry.spiffe_id.is_at_or_below(&task.spiffe_id))
                .map(|entry| entry.spiffe_id.clone());
            if let Some(entry) = &identity_taken {
                tracing::warn!(task = %task.id, spiffe_id = %task.spiffe_id, entry = %entry, "a registration entry holds this task's identity or one below it; the task is ended");
            }
            // Likewise the bundle endpoint's identity, once the config
            // gives the endpoint the ID a live task holds: federated peers
            // accept writ's bundle from whoever presents it.
            let identity_reserved = self.agent.is_reserved(&task.spiffe_id);
            if identity_reserved {
                tracing::warn!(task = %task.id, spiffe_id = %task.spiffe_id, "this task's identity is now reserved for the federation bundle endpoint; the task is ended");
            }
            let found = if task_of_other_boot {
                "found after a reboot"
            } else {
                "found after restart"
            };
            let reason = match alive {
                _ if orphaned => Some((CompletionReason::ParentCompleted, found)),
                _ if task.expires_at <= now => Some((CompletionReason::TtlExpired, found)),
                _ if identity_taken.is_some() || identity_reserved => {
                    Some((CompletionReason::IdentityTaken, found))
                }
                Err(r) if made_again => Some((r, MADE_AGAIN_DETAIL)),
                Err(r) => Some((r, found)),
                Ok(_) => None,
            };
            match reason {
                Some((r, detail)) => {
                    // Completed below, once: no watcher or TTL timer of its
                    // own to race that completion with another reason.
                    self.activate_restored_to_complete(task.clone());
                    to_complete.push((task.id.clone(), r, detail));
                }
                None => {
                    if let Some(learned) = id_learned
                        && let Binding::Cgroup { id, .. } = &mut Arc::make_mut(&mut task).binding
                    {
                        *id = Some(learned);
                        ids_learned.push((task.id.clone(), record_json(&task)?));
                    }
                    self.activate_restored(task.clone(), watch)
                }
            }
        }
        // Stored, so that later restarts check the id: a cgroup made again
        // at the path after this is then found by it.
        if !ids_learned.is_empty() {
            self.store
                .write(move |conn| {
                    let mut stmt = conn.prepare_cached(
                        "UPDATE tasks SET record = ?2 WHERE task_id = ?1 AND completed_at IS NULL",
                    )?;
                    for (id, record) in &ids_learned {
                        stmt.execute(params![id, record])?;
                    }
                    Ok(())
                })
                .await?;
        }
        for (id, reason, detail) in to_complete {
            self.complete(&id, reason, detail.into()).await?;
        }
        if let Some(boot) = boot
            && recorded != Some(boot)
        {
            self.store
                .write(move |conn| crate::store::record_boot(conn, boot))
                .await?;
        }
        Ok(())
    }

    /// Ends active tasks whose stored record cannot be read (by rowid, as
    /// not even their id may be), revoking what was issued for them: writ
    /// cannot tell what they were bound to, so it serves them no more, and
    /// starts rather than refusing to over one damaged row.
    async fn complete_unreadable(&self, rows: Vec<(i64, String)>) -> Result<(), TaskError> {
        if rows.is_empty() {
            return Ok(());
        }
        let reason = CompletionReason::RecordUnreadable.as_str();
        let at = unix_secs(SystemTime::now());
        let problems = rows.clone();
        let revoked = self
            .store
            .write(move |conn| {
                let mut revoked = Vec::new();
                for (rowid, problem) in &problems {
                    // The id is its own column, so usually still readable:
                    // the audit records name the task when they can.
                    let task_id: Option<String> = conn
                        .query_row("SELECT task_id FROM tasks WHERE rowid = ?1", [rowid], |r| {
                            r.get(0)
                        })
                        .ok();
                    conn.execute(
                        "UPDATE tasks SET completed_at = ?2, completion_reason = ?3, completion_detail = ?4
                         WHERE rowid = ?1 AND completed_at IS NULL",
                        params![rowid, at, reason, problem],
                    )?;
                    let serials = revoke_issued(
                        conn,
                        "FROM issued i JOIN tasks t ON i.task_id = t.task_id WHERE t.rowid = ?1",
                        rowid,
                        at,
                        reason,
                    )?;
                    revoked.push((task_id, serials));
                }
                Ok(revoked)
            })
            .await?;
        let serials: usize = revoked.iter().map(|(_, certs)| certs.len()).sum();
        self.agent.metrics().revocations.inc_by(serials as u64);
        self.agent
            .add_revocations(revoked.iter().flat_map(|(_, certs)| certs));
        if serials > 0 {
            let wanted = self.agent.request_crls();
            if let Err(e) = self.agent.crls_published(wanted).await {
                tracing::error!(error = %e, "publishing a new CRL failed");
            }
        }
        let correlation_id = ulid::Ulid::new().to_string();
        let mut records = Vec::new();
        for ((_, problem), (task_id, certs)) in rows.iter().zip(&revoked) {
            tracing::error!(task = task_id.as_deref().unwrap_or("(unreadable)"), %problem, revoked = certs.len(), "ended a task whose stored record cannot be read");
            self.agent.metrics().task_completed(reason);
            let serials: Vec<String> = certs.iter().map(|(c, _)| hex::encode(&c.serial)).collect();
            let mut ended = AuditEvent::new(EventKind::TaskEnded, correlation_id.clone())
                .reason(reason)
                .detail("detail", problem.clone());
            let mut revocation = AuditEvent::new(EventKind::Revoked, correlation_id.clone())
                .reason("task completed")
                .detail("detail", problem.clone());
            if let Some(id) = task_id {
                ended = ended.detail("task_id", id.clone());
                revocation = revocation.detail("task_id", id.clone());
            }
            records.push(ended);
            records.push(revocation.detail("serials", serials));
        }
        self.agent.record_all_best_effort(records).await;
        Ok(())
    }

    fn activate_restored(self: &Arc<Self>, task: Arc<Task>, watch: BindingWatch) {
        let watcher = self.spawn_watcher(task.clone(), watch);
        self.inner().insert_active(&task, Some(watcher), true);
        self.agent.index_task(task);
    }

    /// `activate_restored` for a task `restore` completes at once.
    fn activate_restored_to_complete(self: &Arc<Self>, task: Arc<Task>) {
        self.inner().insert_active(&task, None, true);
        self.agent.index_task(task);
    }
}

/// When a restored task ends: at its stored deadline, but no later than
/// its TTL (`expires_at - created_at`) from `now`. The deadline was set by
/// the wall clock at its start; one that ran ahead then (and was put right
/// since) would otherwise give the task its TTL plus the clock's error.
fn restored_deadline(
    created_at: SystemTime,
    expires_at: SystemTime,
    now: SystemTime,
) -> SystemTime {
    let ttl = expires_at
        .duration_since(created_at)
        .unwrap_or(Duration::ZERO);
    // Whole seconds, as stored, so the task served and the task read back
    // end at the same moment.
    let from_now = from_unix_secs(unix_secs(now.checked_add(ttl).unwrap_or(expires_at)));
    expires_at.min(from_now)
}

/// Brings forward the deadline of each of `tasks` (parents before their
/// sub-tasks) that `restored_deadline` cuts short, a sub-task's to no later
/// than its parent's, and returns those changed.
fn clamp_restored_deadlines(tasks: &mut [Task], now: SystemTime) -> Vec<(String, SystemTime)> {
    let mut deadlines: HashMap<String, SystemTime> = HashMap::new();
    let mut clamped = Vec::new();
    for task in tasks {
        let mut deadline = restored_deadline(task.created_at, task.expires_at, now);
        if let Some(parent) = task.parent_id.as_ref().and_then(|p| deadlines.get(p)) {
            deadline = deadline.min(*parent);
        }
        if deadline < task.expires_at {
            task.expires_at = deadline;
            clamped.push((task.id.clone(), deadline));
        }
        deadlines.insert(task.id.clone(), task.expires_at);
    }
    clamped
}

/// Revokes at `at`, for `reason`, every serial issued for one task, and
/// returns them with their expiry. `issued` is the `FROM` clause that picks
/// the task's rows of `issued` (aliased `i`), naming the task as `?1`.
fn revoke_issued(
    conn: &rusqlite::Connection,
    issued: &str,
    task: impl rusqlite::ToSql,
    at: i64,
    reason: &str,
) -> Result<Vec<(crate::ca::RevokedCert, i64)>, StoreError> {
    conn.prepare_cached(&format!(
        "INSERT OR IGNORE INTO revocations(serial, issuer_key_id, not_after, revoked_at, task_id, reason)
         SELECT i.serial, i.issuer_key_id, i.not_after, ?2, i.task_id, ?3 {issued}"
    ))?
    .execute(params![task, at, reason])?;
    let revoked_at = from_unix_secs(at);
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT i.serial, i.issuer_key_id, i.not_after {issued} ORDER BY i.issued_at"
    ))?;
    let revoked = stmt
        .query_map(params![task], |r| {
            Ok((
                crate::ca::RevokedCert {
                    serial: r.get(0)?,
                    issuer_key_id: r.get(1)?,
                    revoked_at,
                },
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(revoked)
}

/// The columns `row_to_task` reads, in its order.
const TASK_COLUMNS: &str = "task_id, spiffe_id, parent_task_id, record, created_at, expires_at,
     completed_at, completion_reason, completion_detail";

/// A stored task, or why its row cannot be one (named by its id as far as
/// that can be read). A value of the wrong type is such a reason too, never
/// an error of the whole query: one damaged row must not hide the others.
fn row_to_task(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Task, TaskError>> {
    use rusqlite::types::ValueRef;
    let id = match r.get_ref(0)? {
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Blob(b) => format!("x'{}'", hex::encode(b)),
        ValueRef::Null => "NULL".to_owned(),
    };
    let corrupt =
        |what: String| TaskError::Store(StoreError::Corrupt(format!("task {id}: {what}")));
    if !matches!(r.get_ref(0)?, ValueRef::Text(_)) {
        return Ok(Err(corrupt("task_id is not text".into())));
    }
    macro_rules! column {
        ($i:expr, $name:literal) => {
            match r.get($i) {
                Ok(v) => v,
                Err(e) => return Ok(Err(corrupt(format!("{}: {e}", $name)))),
            }
        };
    }
    let spiffe_id: String = column!(1, "spiffe_id");
    let parent_id: Option<String> = column!(2, "parent_task_id");
    let record: String = column!(3, "record");
    let created_at: i64 = column!(4, "created_at");
    let expires_at: i64 = column!(5, "expires_at");
    let completed_at: Option<i64> = column!(6, "completed_at");
    let reason: Option<String> = column!(7, "completion_reason");
    let detail: Option<String> = column!(8, "completion_detail");
    let record: TaskRecord = match serde_json::from_str(&record) {
        Ok(r) => r,
        Err(e) => return Ok(Err(corrupt(e.to_string()))),
    };
    let spiffe_id: SpiffeId = match spiffe_id.parse() {
        Ok(s) => s,
        Err(e) => return Ok(Err(corrupt(format!("{e}")))),
    };
    let federates_with = match record
        .federates_with
        .iter()
        .map(|t| TrustDomain::new(t))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(v) => v,
        Err(e) => return Ok(Err(corrupt(format!("federates_with: {e}")))),
    };
    Ok(Ok(Task {
        id: id.clone(),
        spiffe_id,
        parent_id,
        depth: record.depth,
        binding: record.binding,
        intent: record.intent,
        orchestrator: record.orchestrator,
        orchestrator_start_time: record.orchestrator_start_time,
        federates_with,
        created_at: from_unix_secs(created_at),
        expires_at: from_unix_secs(expires_at),
        completion: completed_at.map(|at| Completion {
            at: from_unix_secs(at),
            reason: reason.unwrap_or_default(),
            detail: detail.unwrap_or_default(),
        }),
    }))
}

const MAX_INTENT_ITEMS: usize = 64;
const MAX_INTENT_STRING: usize = 1024;

/// The longest `EndTask` reason accepted (as for an intent's purpose).
pub const MAX_END_REASON_BYTES: usize = 4 * MAX_INTENT_STRING;

/// Refuses a control character (C0, DEL or C1) in intent text or an end
/// reason. Such text often comes from an agent's prompt or a ticket, and
/// goes to operators' terminals (`writ task get`), audit records, JWT
/// claims and policies, where an escape sequence or a carriage return
/// could forge or hide what is shown. Free text (a purpose, an end reason)
/// may still break lines and indent: a reason made of a command's output
/// is common, and refusing it would leave the task running. Names (tools,
/// targets, a data class, attributes) may not.
fn refuse_control_characters(
    field: &'static str,
    what: impl FnOnce() -> String,
    text: &str,
) -> Result<(), TaskError> {
    refuse_controls_except(field, what, text, &[])
}

/// `refuse_control_characters`, but line feeds and tabs are allowed.
fn refuse_control_characters_in_free_text(
    field: &'static str,
    what: impl FnOnce() -> String,
    text: &str,
) -> Result<(), TaskError> {
    refuse_controls_except(field, what, text, &['\n', '\t'])
}

fn refuse_controls_except(
    field: &'static str,
    what: impl FnOnce() -> String,
    text: &str,
    allowed: &[char],
) -> Result<(), TaskError> {
    match writ_attestors::find_unshowable(text, allowed) {
        None => Ok(()),
        Some(found) => Err(invalid(
            field,
            format!(
                "{} contains {found}; such characters are not allowed",
                what()
            ),
        )),
    }
}

/// An `EndTask` reason: stored with the task and in its audit record, and
/// sent to every watcher, so bounded and checked like an intent's purpose.
pub fn validate_end_reason(reason: &str) -> Result<(), TaskError> {
    if reason.len() > MAX_END_REASON_BYTES {
        return Err(invalid(
            "reason",
            format!("longer than {MAX_END_REASON_BYTES} bytes"),
        ));
    }
    refuse_control_characters_in_free_text("reason", || "the reason".into(), reason)
}

fn validate_intent(intent: &Intent) -> Result<(), TaskError> {
    if intent.purpose.len() > 4 * MAX_INTENT_STRING {
        return Err(invalid("intent.purpose", "longer than 4096 bytes"));
    }
    refuse_control_characters_in_free_text(
        "intent.purpose",
        || "the purpose".into(),
        &intent.purpose,
    )?;
    for (field, list) in [
        ("intent.tools", &intent.tools),
        ("intent.targets", &intent.targets),
    ] {
        if list.len() > MAX_INTENT_ITEMS {
            return Err(invalid(
                field,
                format!("more than {MAX_INTENT_ITEMS} items"),
            ));
        }
        for (n, item) in list.iter().enumerate() {
            if item.is_empty() {
                return Err(invalid(field, format!("item {n} is empty")));
            }
            if item.len() > MAX_INTENT_STRING {
                return Err(invalid(
                    field,
                    format!(
                        "item {n} ({:?}) is longer than {MAX_INTENT_STRING} bytes",
                        excerpt(item)
                    ),
                ));
            }
            refuse_control_characters(field, || format!("item {n} ({:?})", excerpt(item)), item)?;
        }
        // A repeat adds nothing to the scope, but each copy is stored,
        // signed into the task's JWT claim and audited.
        if let Some(why) = crate::entries::repeated_item(list, list) {
            return Err(invalid(field, why));
        }
    }
    if intent.data_class.len() > MAX_INTENT_STRING {
        return Err(invalid("intent.data_class", "too long"));
    }
    refuse_control_characters(
        "intent.data_class",
        || "the data class".into(),
        &intent.data_class,
    )?;
    if intent.attributes.len() > MAX_INTENT_ITEMS {
        return Err(invalid(
            "intent.attributes",
            format!("more than {MAX_INTENT_ITEMS} entries"),
        ));
    }
    // Attributes become Cedar tags on the task, which policies read by
    // key: an empty key is one no policy could name.
    if intent.attributes.contains_key("") {
        return Err(invalid(
            "intent.attributes",
            "a key is empty; every attribute needs a non-empty key",
        ));
    }
    // Bounded like tools and targets: every attribute is stored with the
    // task, put in its JWT claim and audit records, and sent to watchers.
    if let Some((key, value)) = intent
        .attributes
        .iter()
        .find(|(k, v)| k.len() > MAX_INTENT_STRING || v.len() > MAX_INTENT_STRING)
    {
        return Err(invalid(
            "intent.attributes",
            format!(
                "attribute {:?} (key {} bytes, value {} bytes): keys and values are at most {MAX_INTENT_STRING} bytes",
                excerpt(key),
                key.len(),
                value.len()
            ),
        ));
    }
    for (key, value) in &intent.attributes {
        refuse_control_characters(
            "intent.attributes",
            || format!("the key {:?}", excerpt(key)),
            key,
        )?;
        refuse_control_characters(
            "intent.attributes",
            || format!("the value of {:?}", excerpt(key)),
            value,
        )?;
    }
    Ok(())
}

/// Whether `process` is in writ's PID namespace. Unreadable counts as
/// not: a PID from a caller whose namespace is unknown is not trusted.
fn shares_pid_namespace_with_us(process: &PinnedProcess) -> bool {
    // Neither writ nor the caller can leave its PID namespace, so each is
    // read once: writ's here, the caller's once per pinned caller.
    static OURS: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    let ours = match OURS.get() {
        Some(ours) => *ours,
        None => match writ_attestors::namespace_of(std::process::id() as i32, "pid") {
            Some(read) => *OURS.get_or_init(|| read),
            None => return false,
        },
    };
    process.pid_namespace() == Some(ours)
}

/// The process (thread group) that thread `tid` belongs to, from
/// `/proc/<tid>/status`: a thread's id names a /proc entry too, though no
/// pidfd can be opened for it.
fn thread_group_of(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A sub-task may narrow its parent's scope, never widen it. `of_parent`
/// names the parent in a refusal ("parent task t-1").
fn check_within_parent_scope(
    child: &Intent,
    parent: &Intent,
    of_parent: &str,
) -> Result<(), TaskError> {
    if let Some(t) = child.tools.iter().find(|t| !parent.tools.contains(t)) {
        return Err(invalid(
            "intent.tools",
            format!(
                "tool {t:?} is not among the tools {:?} of {of_parent}",
                parent.tools
            ),
        ));
    }
    if let Some(t) = child.targets.iter().find(|t| !parent.targets.contains(t)) {
        return Err(invalid(
            "intent.targets",
            format!(
                "target {t:?} is not among the targets {:?} of {of_parent}",
                parent.targets
            ),
        ));
    }
    if !child.data_class.is_empty() && child.data_class != parent.data_class {
        return Err(invalid(
            "intent.data_class",
            format!(
                "{:?} differs from the data class {:?} of {of_parent}",
                child.data_class, parent.data_class
            ),
        ));
    }
    Ok(())
}

/// Gives a sub-task its parent's attributes beside its own: it may add
/// keys, and repeat a parent's key with the same value, but not change
/// one. The merged set is bounded like any task's.
fn inherit_attributes(
    child: &mut Intent,
    parent: &Intent,
    of_parent: &str,
) -> Result<(), TaskError> {
    // Values are up to 1 KiB each: a refusal shows their start.
    let shown = |v: &str| {
        let mut s: String = v.chars().take(64).collect();
        if s.len() < v.len() {
            s.push('…');
        }
        s
    };
    for (key, value) in &parent.attributes {
        match child.attributes.get(key) {
            Some(own) if own != value => {
                return Err(invalid(
                    "intent.attributes",
                    format!(
                        "attribute {:?} is {:?} in {of_parent} and may not be changed (asked for {:?}); a sub-task inherits its parent's attributes and may only add new keys",
                        shown(key),
                        shown(value),
                        shown(own)
                    ),
                ));
            }
            Some(_) => {}
            None => {
                child.attributes.insert(key.clone(), value.clone());
            }
        }
    }
    if child.attributes.len() > MAX_INTENT_ITEMS {
        return Err(invalid(
            "intent.attributes",
            format!(
                "more than {MAX_INTENT_ITEMS} entries with the {} inherited from {of_parent}",
                parent.attributes.len()
            ),
        ));
    }
    Ok(())
}

/// What a task's watcher waits on for its binding to end.
#[derive(Clone)]
enum BindingWatch {
    /// The pinned process's exit.
    Process(Arc<PinnedProcess>),
    /// The cgroup at `dir` emptying. `held_processes`: it held some when
    /// it was bound, so it has emptied once it holds none, however late
    /// the watcher first looks. One bound empty must hold a process first:
    /// seen there, or told by its CPU time having grown past
    /// `cpu_usage_at_bind`. `cgroup` is the bound cgroup held open: once
    /// it is removed it reads as gone, and so emptied, even if another
    /// cgroup is made at its path (`dir`, where the watcher listens).
    Cgroup {
        cgroup: Arc<CgroupDir>,
        dir: PathBuf,
        held_processes: bool,
        cpu_usage_at_bind: Option<u64>,
    },
    /// Nothing: a restored task whose binding is gone, completed at once.
    Nothing,
}

impl BindingWatch {
    /// For a cgroup: it is gone, or holds no process now and has held
    /// some since the task began. Notes a process seen there.
    fn cgroup_emptied(&mut self) -> bool {
        let BindingWatch::Cgroup {
            cgroup,
            held_processes,
            cpu_usage_at_bind,
            ..
        } = self
        else {
            return false;
        };
        match cgroup.populated() {
            None => true,
            Some(true) => {
                *held_processes = true;
                false
            }
            Some(false) => {
                *held_processes
                    || cpu_usage_at_bind
                        .is_some_and(|then| cgroup.cpu_usage().is_some_and(|now| now > then))
            }
        }
    }
}

/// Resolves when the binding ends: the pinned process exits, or the cgroup
/// empties (or disappears). Never resolves for a binding with nothing to watch.
async fn wait_binding_ends(watch: BindingWatch, cgroups: &CgroupWatcher) -> CompletionReason {
    match watch {
        BindingWatch::Process(process) => {
            crate::peer::wait_for_exit(&process).await;
            CompletionReason::ProcessExited
        }
        watch @ BindingWatch::Cgroup { .. } => {
            wait_cgroup_empty(watch, cgroups).await;
            CompletionReason::CgroupEmpty
        }
        BindingWatch::Nothing => std::future::pending().await,
    }
}

/// The kernel signals every change of cgroup.events as a file modification,
/// so the watch wakes us exactly when `populated` may have flipped. A cgroup
/// bound before the task's processes are started in it has not emptied: it
/// empties once it has held a process and holds none (or once it is gone).
async fn wait_cgroup_empty(mut watch: BindingWatch, cgroups: &CgroupWatcher) {
    let BindingWatch::Cgroup { dir, .. } = &watch else {
        return;
    };
    let dir = dir.clone();
    loop {
        let wakeups = cgroups.watch(&dir);
        let watch_again_at =
            tokio::time::Instant::now() + crate::cgroup_watch::WATCH_RETRY_INTERVAL;
        loop {
            // Check after arming the watch, so a flip in between is not missed.
            if watch.cgroup_emptied() {
                return;
            }
            match &wakeups {
                Some(wakeups) => {
                    // false: the kernel dropped a watch of it, which tells
                    // nothing of the cgroup; look, and watch it anew.
                    if !wakeups.changed().await {
                        break;
                    }
                }
                // Polled for a while: ask for a watch again.
                None if tokio::time::Instant::now() >= watch_again_at => break,
                None => tokio::time::sleep(crate::cgroup_watch::FALLBACK_INTERVAL).await,
            }
        }
    }
}

/// A top-level task of `spiffe://writ.test/orch`, active for a minute from
/// now, with no intent: for tests that need a `Task` value, not a begun one.
#[cfg(test)]
pub(crate) fn test_task(id: &str, binding: Binding) -> Task {
    Task {
        id: id.into(),
        spiffe_id: format!("spiffe://writ.test/orch/task/{id}")
            .parse()
            .expect("a test task id is a path segment"),
        parent_id: None,
        depth: 1,
        binding,
        intent: Intent::default(),
        orchestrator: "spiffe://writ.test/orch".into(),
        orchestrator_start_time: None,
        federates_with: Vec::new(),
        created_at: SystemTime::now(),
        expires_at: SystemTime::now() + Duration::from_secs(60),
        completion: None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A task begun by a caller without a SPIFFE ID belongs to that
    /// process, by PID and start time: a newcomer on the same PID is a
    /// stranger, and so is every caller for a record that kept no start
    /// time (written by an older writ).
    #[test]
    fn a_pid_named_orchestrator_is_matched_by_pid_and_start_time() {
        let me = PinnedProcess::open(std::process::id() as i32).unwrap();
        let task = |start_time: Option<u64>| Task {
            id: "t".into(),
            spiffe_id: "spiffe://writ.test/x".parse().unwrap(),
            parent_id: None,
            depth: 1,
            binding: Binding::Pid {
                pid: 1,
                start_time: 1,
            },
            intent: Intent::default(),
            orchestrator: format!("pid:{}", me.pid()),
            orchestrator_start_time: start_time,
            federates_with: Vec::new(),
            created_at: SystemTime::now(),
            expires_at: SystemTime::now(),
            completion: None,
        };
        assert!(may_act_on(&task(Some(me.start_time())), None, &me, false));
        assert!(!may_act_on(
            &task(Some(me.start_time() + 1)),
            None,
            &me,
            false
        ));
        assert!(!may_act_on(&task(None), None, &me, false));
        assert!(may_act_on(&task(None), None, &me, true));
        // A record from before start times were kept reads as `None`.
        let record = TaskRecord {
            binding: task(None).binding,
            intent: Intent::default(),
            orchestrator: "pid:7".into(),
            orchestrator_start_time: Some(5),
            depth: 1,
            federates_with: Vec::new(),
        };
        let mut old = serde_json::to_value(&record).unwrap();
        assert_eq!(old["orchestrator_start_time"], 5);
        old.as_object_mut()
            .unwrap()
            .remove("orchestrator_start_time");
        let read: TaskRecord = serde_json::from_value(old).unwrap();
        assert_eq!(read.orchestrator_start_time, None);
    }

    #[test]
    fn task_ids() {
        for ok in ["t-42", "01JBX0", "a.b_c-d", &"x".repeat(128)] {
            validate_task_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(129)] {
            assert!(validate_task_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cgroup_paths_must_be_under_a_trusted_root_on_whole_segments() {
        let roots = vec!["/writ.slice".to_string()];
        validate_cgroup_path("/writ.slice/t-1", &roots).unwrap();
        validate_cgroup_path("/writ.slice", &roots).unwrap();
        for bad in [
            "/writ.slice2/t",
            "/user.slice/writ.slice/t",
            "writ.slice/t",
            "/writ.slice/../x",
            "/writ.slice//t",
        ] {
            assert!(validate_cgroup_path(bad, &roots).is_err(), "{bad}");
        }
        // What the caller sent is named, escaped and shortened, never
        // echoed raw: an escape sequence or a carriage return would rewrite
        // the reader's terminal.
        let message = |path: &str| validate_cgroup_path(path, &roots).unwrap_err().to_string();
        let sneaky = message("/writ.slice/a\u{1b}[31mRED\u{1b}[0m\rFAKE");
        assert!(
            sneaky.contains("control character U+001B") && !sneaky.contains('\u{1b}'),
            "{sneaky}"
        );
        assert!(message("/writ.slice/a\0b").contains("U+0000"));
        let long = message(&format!("/user.slice/{}", "a".repeat(4000)));
        assert!(
            long.len() < 1_000 && long.contains("(4012 bytes)"),
            "{long}"
        );
        let too_long = message(&format!("/writ.slice/{}", "a".repeat(5000)));
        assert!(too_long.contains("at most 4096"), "{too_long}");
    }

    /// A task that completes after a stream resolved it but before its SVID's
    /// serial is stored: the issuance record already on its way is followed
    /// by an `x509_withdrawn` record for the same serial, and no SVID is
    /// handed out.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_svid_for_a_task_completed_meanwhile_is_withdrawn_on_the_record() {
        let agent = TestAgent::start().await;
        let svc = &agent.svc;
        let task = agent.begin("t-race").await.unwrap();
        // Completed in the store, as completion's transaction does, while
        // the caller still holds the entitlement it resolved before.
        svc.store
            .write(|c| {
                c.execute(
                    "UPDATE tasks SET completed_at = 1 WHERE task_id = 't-race'",
                    [],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        // Past the rotation point of the SVID minted as the task began (half
        // of its 60 s): the race is in its rotation.
        let issued = agent
            .svid_for_task(&task, SystemTime::now() + Duration::from_secs(40))
            .await;
        assert!(
            matches!(issued, Err(crate::agent::AgentError::TaskCompleted(ref id)) if id == "t-race"),
            "{issued:?}"
        );
        let records = agent.trail();
        let trail = format!("{records:?}");
        let of = |kind: &str| -> Vec<&serde_json::Value> {
            records.iter().filter(|r| r["event"] == kind).collect()
        };
        let (recorded, withdrawn) = (of("x509_issued"), of("x509_withdrawn"));
        // The SVID minted as the task began, then the rotation that raced.
        assert_eq!(recorded.len(), 2, "{trail}");
        assert_eq!(withdrawn.len(), 1, "{trail}");
        assert_eq!(withdrawn[0]["serial"], recorded[1]["serial"]);
        assert_eq!(withdrawn[0]["task"]["id"], "t-race");
        assert!(
            withdrawn[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("t-race")),
            "{}",
            withdrawn[0]
        );
    }

    /// Completion unindexes a task before its slower durable part. A stream
    /// still holding a resolution made earlier (one woken meanwhile by some
    /// other change) must not mint for the task in that window: no key is
    /// signed, no serial stored, nothing recorded and withdrawn.
    #[tokio::test(flavor = "multi_thread")]
    async fn no_svid_is_minted_for_a_task_already_unindexed_by_its_completion() {
        let agent = TestAgent::start().await;
        let svc = &agent.svc;
        let task = agent.begin("t-ending").await.unwrap();
        svc.agent.unindex_task(&task.id);
        let issued = agent.svid_for_task(&task, SystemTime::now()).await;
        assert!(
            matches!(issued, Err(crate::agent::AgentError::TaskCompleted(ref id)) if id == "t-ending"),
            "{issued:?}"
        );
        let of = |kind: &str| agent.records_of(kind).len();
        assert_eq!(of("x509_issued"), 1, "only the SVID minted as it began");
        assert_eq!(of("x509_withdrawn"), 0);
        let stored: i64 = svc
            .store
            .read(|c| {
                c.query_row(
                    "SELECT count(*) FROM issued WHERE task_id = 't-ending'",
                    [],
                    |r| r.get(0),
                )
                .map_err(Into::into)
            })
            .unwrap();
        assert_eq!(stored, 1);
    }

    /// Near its task's end an SVID is rotated at half-life only while the
    /// replacement can live a whole second; then it is kept to its expiry,
    /// and in the task's last second none is minted (the stream serves the
    /// caller's other identities, not an error from the CA).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_task_svid_is_not_replaced_by_one_shorter_than_a_second() {
        let agent = TestAgent::start().await;
        let task = agent.begin("t-tail").await.unwrap();
        // Certificates end on whole seconds: the last second of the task
        // that one can reach.
        let end = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                task.expires_at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        let serial = |s: &crate::agent::CachedSvid| s.svid.serial.clone();

        // 3 s left: a fresh SVID to the task's end, due at its half-life
        // (plus under 10% jitter), when 1.2 to 1.5 s remain.
        let first = agent
            .svid_for_task(&task, end - Duration::from_secs(3))
            .await
            .unwrap();
        assert_eq!(
            first.svid.not_after, end,
            "to the task's end, never past it"
        );
        assert!(first.rotate_at < end, "{first:?}");

        // The replacement's own half-life would leave under a second, so
        // it is kept to the end.
        let second = agent.svid_for_task(&task, first.rotate_at).await.unwrap();
        assert_ne!(serial(&second), serial(&first));
        assert_eq!(second.svid.not_after, end);
        assert_eq!(second.rotate_at, end, "{second:?}");
        let again = agent
            .svid_for_task(&task, end - Duration::from_millis(1))
            .await
            .unwrap();
        assert_eq!(serial(&again), serial(&second), "served from the cache");

        // Then the task's last fraction of a second: no SVID, no record.
        let issued_before = agent.svc.tasks.issued_serials("t-tail").unwrap().len();
        let last = agent.svid_for_task(&task, end).await;
        assert!(
            matches!(last, Err(crate::agent::AgentError::TaskCompleted(ref id)) if id == "t-tail"),
            "{last:?}"
        );
        assert_eq!(
            agent.svc.tasks.issued_serials("t-tail").unwrap().len(),
            issued_before
        );
        assert_eq!(agent.records_of("x509_withdrawn").len(), 0);
    }

    /// A sub-task begun in its parent's last second begins without an SVID
    /// rather than with one that would live a fraction of a second.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_sub_task_begun_in_its_parents_last_second_gets_no_svid_yet() {
        let agent = TestAgent::start().await;
        // Between the parent's end less 1 s and its last whole second less
        // 1 s, the CA would still sign (the TTL is over a second) but the
        // certificate would end on that whole second, under a second away.
        // Begun half-way through a second, the parent leaves half a second
        // of such moments; the test waits for the middle one. (Waking late
        // only makes the CA refuse, which passes too.)
        let into_second = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_millis();
        let to_half = (1500 - u64::from(into_second)) % 1000;
        tokio::time::sleep(Duration::from_millis(to_half)).await;
        let parent = agent
            .begin_task("t-parent", None, Some(Duration::from_secs(2)))
            .await
            .unwrap();
        let fraction = Duration::from_nanos(u64::from(
            parent
                .expires_at
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
        ));
        let wait = (parent.expires_at - Duration::from_secs(1) - fraction / 2)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        let child = agent
            .begin_task("t-child", Some("t-parent"), None)
            .await
            .unwrap();
        assert_eq!(child.expires_at, parent.expires_at);
        assert!(
            agent
                .svc
                .tasks
                .issued_serials("t-child")
                .unwrap()
                .is_empty()
        );
        assert_eq!(agent.records_of("x509_withdrawn").len(), 0);
        let issued = agent.records_of("x509_issued");
        assert_eq!(issued.len(), 1, "only the parent's: {issued:?}");
    }

    /// A real agent on a temporary state dir, and a child process to bind
    /// tasks to.
    struct TestAgent {
        svc: crate::service::Services,
        config: crate::config::Config,
        child: std::process::Child,
        _dir: tempfile::TempDir,
    }

    impl TestAgent {
        async fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let env = crate::config::Environment::current();
            let mut config = crate::config::Config::builtin_defaults(&env);
            config.data_dir = dir.path().join("state");
            config.audit = crate::config::AuditConfig::defaults_for(&config.data_dir);
            let svc = crate::service::build(&config).await.unwrap();
            let child = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap();
            Self {
                svc,
                config,
                child,
                _dir: dir,
            }
        }

        /// The task's X.509-SVID as a stream that resolved the task asks
        /// for it: from the cache, or minted at `now`.
        async fn svid_for_task(
            &self,
            task: &Task,
            now: SystemTime,
        ) -> Result<Arc<crate::agent::CachedSvid>, crate::agent::AgentError> {
            let agent = &self.svc.agent;
            let entitlement = agent.task_entitlement(task);
            agent
                .svid_for(&entitlement, now, || crate::agent::Issuance::new(None))
                .await
        }

        async fn begin(&self, id: &str) -> Result<Arc<Task>, TaskError> {
            self.begin_task(id, None, Some(Duration::from_secs(60)))
                .await
        }

        /// A task bound to the child, under `parent` if given, asking for
        /// `ttl` (a sub-task asking for none ends with its parent).
        async fn begin_task(
            &self,
            id: &str,
            parent: Option<&str>,
            ttl: Option<Duration>,
        ) -> Result<Arc<Task>, TaskError> {
            let orchestrator = self.orchestrator();
            self.svc
                .tasks
                .begin(
                    BeginRequest {
                        task_id: Some(id.into()),
                        pid: Some(self.child.id() as i32),
                        cgroup: None,
                        spiffe_id: None,
                        intent: Intent::default(),
                        ttl,
                        parent_task_id: parent.map(str::to_owned),
                        federates_with: Vec::new(),
                    },
                    &orchestrator,
                )
                .await
        }

        /// This test process, as an orchestrator that may bind anything.
        fn orchestrator(&self) -> Orchestrator {
            let me = PinnedProcess::open(std::process::id() as i32).unwrap();
            Orchestrator {
                process: Arc::new(me),
                spiffe_id: Some(
                    self.svc
                        .agent
                        .trust_domain()
                        .spiffe_id("/orchestrator")
                        .unwrap(),
                ),
                uid: rustix::process::getuid().as_raw(),
                selectors: Vec::new(),
                may_bind_any_pid: true,
                may_bind_same_uid: true,
                task_id: None,
            }
        }

        fn records_of(&self, kind: &str) -> Vec<serde_json::Value> {
            self.trail()
                .into_iter()
                .filter(|r| r["event"] == kind)
                .collect()
        }

        fn trail(&self) -> Vec<serde_json::Value> {
            std::fs::read_to_string(&self.config.audit.path)
                .unwrap()
                .trim_end_matches('\0')
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    impl Drop for TestAgent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Holds the store's writer until the returned sender is used or
    /// dropped: writes queued meanwhile wait behind it. Returns once the
    /// writer is held.
    async fn hold_writer(
        agent: &TestAgent,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (entered, writer_held) = tokio::sync::oneshot::channel::<()>();
        let store = agent.svc.store.clone();
        let blocker = tokio::spawn(async move {
            store
                .write(move |_| {
                    let _ = entered.send(());
                    let _ = held.recv();
                    Ok(())
                })
                .await
        });
        writer_held.await.unwrap();
        (release, blocker)
    }

    /// The one value `sql` selects for the task `id` (its `?1`).
    fn query_for<T: rusqlite::types::FromSql>(agent: &TestAgent, sql: &str, id: &str) -> T {
        agent
            .svc
            .store
            .read(|c| Ok(c.query_row(sql, params![id], |r| r.get(0))?))
            .unwrap()
    }

    fn count(agent: &TestAgent, sql: &'static str) -> i64 {
        agent
            .svc
            .store
            .read(|c| Ok(c.query_row(sql, [], |r| r.get(0))?))
            .unwrap()
    }

    /// A sub-task whose row commits just before its parent's completion
    /// does not outlive the parent: it completes at once, is never served,
    /// and its SVID is revoked.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_sub_task_begun_as_its_parent_completes_completes_with_it() {
        let agent = Arc::new(TestAgent::start().await);
        agent.begin("t-p").await.unwrap();
        let (release, blocker) = hold_writer(&agent).await;
        let a = agent.clone();
        let child = tokio::spawn(async move { a.begin_task("t-c", Some("t-p"), None).await });
        // The sub-task's row is queued, then the parent's completion after it.
        until_in_flight(&agent, "t-c").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tasks = agent.svc.tasks.clone();
        let end = tokio::spawn(async move { tasks.end("t-p", String::new()).await });
        until_in_flight(&agent, "t-p").await;
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        child.await.unwrap().unwrap();
        end.await.unwrap().unwrap();
        // EndTask on the sub-task reports it once its completion is durable.
        let (ended, serials) = agent.svc.tasks.end("t-c", String::new()).await.unwrap();
        assert_completed_and_revoked(&agent, &ended, &serials, "parent_completed");
        assert!(agent.svc.agent.active_task("t-c").is_none());
    }

    /// Returns once `id` is being begun or completed.
    async fn until_in_flight(agent: &TestAgent, id: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !agent.svc.tasks.inner().in_flight.contains_key(id) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never in flight"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `task` is reported completed for `reason`, and exactly `serials`
    /// (at least one) are revoked in the store.
    fn assert_completed_and_revoked(
        agent: &TestAgent,
        task: &Task,
        serials: &[String],
        reason: &str,
    ) {
        let completion = task.completion.as_ref().expect("reported completed");
        assert_eq!(completion.reason, reason);
        let revoked: i64 = query_for(
            agent,
            "SELECT count(*) FROM revocations WHERE task_id = ?1",
            &task.id,
        );
        assert_eq!(revoked as usize, serials.len());
        assert!(!serials.is_empty());
    }

    /// Begins `id`, holds the store's writer, and has the task complete as
    /// if its process had exited: returns once that completion is in
    /// flight, with the writer's release and blocker (see `hold_writer`)
    /// and the completion.
    async fn exit_held_in_flight(
        agent: &TestAgent,
        id: &'static str,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
        tokio::task::JoinHandle<Result<Option<Arc<Task>>, TaskError>>,
    ) {
        agent.begin(id).await.unwrap();
        let (release, blocker) = hold_writer(agent).await;
        let tasks = agent.svc.tasks.clone();
        let trigger = tokio::spawn(async move {
            tasks
                .complete(id, CompletionReason::ProcessExited, String::new())
                .await
        });
        until_in_flight(agent, id).await;
        (release, blocker, trigger)
    }

    /// EndTask while another trigger's completion is in flight waits for it
    /// and reports the task once its revocation is durable.
    #[tokio::test(flavor = "multi_thread")]
    async fn end_waits_for_a_completion_in_flight() {
        let agent = TestAgent::start().await;
        let (release, blocker, trigger) = exit_held_in_flight(&agent, "t-x").await;
        let tasks = agent.svc.tasks.clone();
        let end = tokio::spawn(async move { tasks.end("t-x", "done".into()).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !end.is_finished(),
            "EndTask answered before the completion was durable"
        );
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        trigger.await.unwrap().unwrap();
        let (task, serials) = end.await.unwrap().unwrap();
        assert_completed_and_revoked(&agent, &task, &serials, "process_exited");
    }

    /// Runs `sql` on the store's writer (triggers that make it refuse a
    /// write, and dropping them).
    async fn run_sql(agent: &TestAgent, sql: &str) {
        let sql = sql.to_owned();
        agent
            .svc
            .store
            .write(move |c| {
                c.execute_batch(&sql)?;
                Ok(())
            })
            .await
            .unwrap();
    }

    /// A wall clock run ahead of the time really elapsed forgets nothing:
    /// the serials of an active task, and the revocations a CRL lists, are
    /// kept until their certificates have expired in truth (an excursion of
    /// an hour, then the clock put right, left a valid SVID unrevoked).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_clock_run_ahead_prunes_no_serial_or_revocation_still_valid() {
        let agent = TestAgent::start().await;
        agent.begin("t-ahead").await.unwrap();
        // Certificates that expired an hour ago by the wall clock, while
        // only 0 s have passed since an anchor taken two hours "before"
        // now: in truth they are valid for an hour more.
        run_sql(
            &agent,
            "UPDATE issued SET not_after = not_after - 3660 WHERE task_id = 't-ahead';",
        )
        .await;
        let ahead = crate::prune_clock::PruneClock::anchored(
            SystemTime::now() - Duration::from_secs(7200),
            crate::prune_clock::boottime(),
        );
        agent.svc.agent.set_prune_clock(ahead);
        agent.svc.tasks.prune().await.unwrap();
        let (_, serials) = agent.svc.tasks.end("t-ahead", String::new()).await.unwrap();
        assert_eq!(serials.len(), 1, "the task's SVID was forgotten unrevoked");
        agent.svc.agent.refresh_crls().await.unwrap();
        assert_eq!(agent.svc.agent.crls().entries, 1, "the CRL lost it");
        agent.svc.tasks.prune().await.unwrap();
        assert_eq!(count(&agent, "SELECT count(*) FROM revocations"), 1);
        // Once the time elapsed catches up, both go.
        agent
            .svc
            .agent
            .set_prune_clock(crate::prune_clock::PruneClock::start());
        agent.svc.tasks.prune().await.unwrap();
        agent.svc.agent.refresh_crls().await.unwrap();
        assert_eq!(count(&agent, "SELECT count(*) FROM revocations"), 0);
        assert_eq!(count(&agent, "SELECT count(*) FROM issued"), 0);
        assert_eq!(agent.svc.agent.crls().entries, 0);
    }

    /// A completed task stays in the store, its id taken, for as long as a
    /// JWT-SVID minted for it could validate, whatever the retention: its
    /// tokens name it by id, and a new task of that id would make them
    /// valid again (an ended task's token validated once its id was reused).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_completed_task_is_kept_while_its_jwt_svids_could_validate() {
        let agent = TestAgent::start().await;
        let brief_retention = manager_with(&agent, None, Duration::from_secs(1));
        let jwt_ttl = agent.svc.agent.jwt_svid_ttl().as_secs() as i64;
        assert!(jwt_ttl > 100, "the default JWT-SVID TTL is 5 minutes");
        let now = unix_secs(SystemTime::now());
        // Dates `task`'s completion and deadline (its serials long
        // expired), prunes, and says how many tasks the store still holds.
        let tasks_left_after = async |task: &str, completed_ago: i64, expires_in: i64| {
            run_sql(
                &agent,
                &format!(
                    "UPDATE issued SET not_after = 0;
                     UPDATE tasks SET completed_at = {}, expires_at = {} WHERE task_id = '{task}';",
                    now - completed_ago,
                    now + expires_in
                ),
            )
            .await;
            brief_retention.prune().await.unwrap();
            count(&agent, "SELECT count(*) FROM tasks")
        };
        agent.begin("t-jwt").await.unwrap();
        agent.svc.tasks.end("t-jwt", String::new()).await.unwrap();
        // Ended 100 s ago, well past the retention: a token minted just
        // before lives on until its TTL ends.
        assert_eq!(tasks_left_after("t-jwt", 100, 600).await, 1);
        // Its deadline ended its tokens sooner, but validators allow 30 s
        // of skew past it.
        assert_eq!(tasks_left_after("t-jwt", 100, -20).await, 1);
        assert_eq!(tasks_left_after("t-jwt", 100, -31).await, 0);
        // Ended a TTL and the skew ago, with its deadline still to come.
        agent.begin("t-jwt-2").await.unwrap();
        agent.svc.tasks.end("t-jwt-2", String::new()).await.unwrap();
        assert_eq!(tasks_left_after("t-jwt-2", jwt_ttl + 20, 600).await, 1);
        assert_eq!(tasks_left_after("t-jwt-2", jwt_ttl + 31, 600).await, 0);
        // An earlier run minted with a longer TTL (shortened since, across
        // a restart): its tokens are still out there, and so the id stays
        // taken by their TTL, not this run's.
        run_sql(
            &agent,
            "UPDATE meta SET value = 3600 WHERE key = 'longest_jwt_svid_ttl_secs';",
        )
        .await;
        agent.begin("t-jwt-3").await.unwrap();
        agent.svc.tasks.end("t-jwt-3", String::new()).await.unwrap();
        assert_eq!(tasks_left_after("t-jwt-3", jwt_ttl + 31, 7200).await, 1);
        assert_eq!(tasks_left_after("t-jwt-3", 3600 + 31, 7200).await, 0);
    }

    /// A completion the store refuses is retried until it persists, and an
    /// EndTask after the failure completes the task rather than report it
    /// uncompleted.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_completion_the_store_refuses_is_retried() {
        let agent = TestAgent::start().await;
        for id in ["t-f1", "t-f2"] {
            agent.begin(id).await.unwrap();
        }
        run_sql(
            &agent,
            "CREATE TEMP TRIGGER fail_completion BEFORE UPDATE OF completed_at ON tasks
                     BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .await;
        for id in ["t-f1", "t-f2"] {
            let refused = agent.svc.tasks.end(id, String::new()).await;
            assert!(
                matches!(refused, Err(TaskError::Store(_))),
                "{id}: {refused:?}"
            );
            assert!(
                agent.svc.agent.active_task(id).is_none(),
                "{id} is still served"
            );
        }
        run_sql(&agent, "DROP TRIGGER temp.fail_completion;").await;
        // t-f1 by the background retry alone.
        common_wait(Duration::from_secs(10), || {
            count(
                &agent,
                "SELECT count(*) FROM tasks WHERE task_id = 't-f1' AND completed_at IS NOT NULL",
            ) == 1
        })
        .await;
        // t-f2 by EndTask asked again (or the retry, whichever comes first).
        for id in ["t-f1", "t-f2"] {
            let (task, serials) = agent.svc.tasks.end(id, String::new()).await.unwrap();
            assert!(task.completion.is_some(), "{id} reported uncompleted");
            assert!(!serials.is_empty());
        }
        let unrevoked = count(
            &agent,
            "SELECT count(*) FROM issued WHERE serial NOT IN (SELECT serial FROM revocations)",
        );
        assert_eq!(unrevoked, 0);
    }

    fn completed_in_store(agent: &TestAgent, id: &str) -> bool {
        query_for::<i64>(
            agent,
            "SELECT count(*) FROM tasks WHERE task_id = ?1 AND completed_at IS NOT NULL",
            id,
        ) == 1
    }

    /// Once a stop has begun, a task whose process exits is not completed
    /// (the trail is about to close, and its records could miss it): the
    /// next start completes it, as after a crash.
    #[tokio::test(flavor = "multi_thread")]
    async fn no_task_completes_once_the_stop_begins() {
        let mut agent = TestAgent::start().await;
        agent.begin("t-s").await.unwrap();
        agent.svc.tasks.begin_stop();
        agent.child.kill().unwrap();
        agent.child.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!completed_in_store(&agent, "t-s"));
        assert!(agent.records_of("task_ended").is_empty());
        let lost = agent
            .svc
            .tasks
            .finish_stop(tokio::time::Instant::now())
            .await;
        assert!(lost.is_empty(), "{lost:?}");
        assert!(!completed_in_store(&agent, "t-s"));

        let next = restarted(&agent);
        next.restore().await.unwrap();
        let task = next.get("t-s").unwrap().unwrap();
        let completion = task.completion.expect("completed at the next start");
        assert_eq!(completion.reason, "process_exited");
        let ended = agent.records_of("task_ended");
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0]["reason"], "process_exited", "{ended:?}");
    }

    /// A completion under way when the stop begins finishes, store and
    /// audit records both, before `finish_stop` lets the trail close.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_completion_under_way_at_the_stop_is_recorded_before_the_trail_closes() {
        let agent = TestAgent::start().await;
        let (release, blocker, trigger) = exit_held_in_flight(&agent, "t-w").await;
        agent.svc.tasks.begin_stop();
        let tasks = agent.svc.tasks.clone();
        let stop =
            tokio::spawn(async move { tasks.finish_stop(tokio::time::Instant::now()).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !stop.is_finished(),
            "the stop did not wait for the completion under way"
        );
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        let lost = stop.await.unwrap();
        assert!(lost.is_empty(), "{lost:?}");
        crate::service::close_audit_trail(&agent.svc.agent).await;
        assert!(trigger.await.unwrap().unwrap().is_some());
        assert!(completed_in_store(&agent, "t-w"));
        assert_eq!(agent.records_of("task_ended").len(), 1);
        assert_eq!(agent.records_of("revoked").len(), 1);
    }

    /// A stop gives completions the store refused until its deadline to
    /// persist (retrying them at once), names the ones that never did, and
    /// completes nothing after it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_stop_waits_for_refused_completions_and_names_those_never_persisted() {
        let agent = TestAgent::start().await;
        for id in ["t-r1", "t-r2"] {
            agent.begin(id).await.unwrap();
        }
        run_sql(
            &agent,
            "CREATE TEMP TRIGGER fail_r1 BEFORE UPDATE OF completed_at ON tasks
                     WHEN OLD.task_id = 't-r1' BEGIN SELECT RAISE(ABORT, 'injected'); END;
                     CREATE TEMP TRIGGER fail_r2 BEFORE UPDATE OF completed_at ON tasks
                     WHEN OLD.task_id = 't-r2' BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .await;
        for id in ["t-r1", "t-r2"] {
            let refused = agent.svc.tasks.end(id, String::new()).await;
            assert!(
                matches!(refused, Err(TaskError::Store(_))),
                "{id}: {refused:?}"
            );
        }
        agent.svc.tasks.begin_stop();
        let started = tokio::time::Instant::now();
        let deadline = started + Duration::from_secs(3);
        let tasks = agent.svc.tasks.clone();
        let stop = tokio::spawn(async move { tasks.finish_stop(deadline).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The disk has room again, for t-r1 only.
        run_sql(&agent, "DROP TRIGGER temp.fail_r1;").await;
        let lost = stop.await.unwrap();
        assert_eq!(lost, ["t-r2"]);
        assert!(tokio::time::Instant::now() >= deadline);
        assert!(completed_in_store(&agent, "t-r1"));
        assert!(!completed_in_store(&agent, "t-r2"));
        // Nothing completes after the stop, even once the store would take it.
        run_sql(&agent, "DROP TRIGGER temp.fail_r2;").await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!completed_in_store(&agent, "t-r2"));
        let refused = agent.svc.tasks.end("t-r2", String::new()).await;
        assert!(
            matches!(refused, Err(TaskError::Stopping(_))),
            "{refused:?}"
        );
        let ended: Vec<_> = agent
            .records_of("task_ended")
            .into_iter()
            .map(|r| r["task"]["id"].clone())
            .collect();
        assert_eq!(ended, [serde_json::json!("t-r1")], "{ended:?}");
    }

    /// Records the trail still refuses when writ stops are counted, by
    /// kind, rather than dropped without a word.
    #[tokio::test(flavor = "multi_thread")]
    async fn records_the_trail_refuses_to_the_end_are_counted_at_the_stop() {
        let agent = TestAgent::start().await;
        agent.begin("t-u").await.unwrap();
        agent.svc.agent.audit_log().expect("audit trail").close();
        agent.svc.tasks.end("t-u", String::new()).await.unwrap();
        agent
            .svc
            .tasks
            .finish_stop(tokio::time::Instant::now())
            .await;
        let report = crate::service::close_audit_trail(&agent.svc.agent)
            .await
            .expect("records left out are reported");
        assert_eq!(report.kinds_text(), "revoked=1, task_ended=1");
        assert_eq!(report.total(), 2);
    }

    async fn common_wait(timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// After a restart, a sub-task whose parent is completed in the store
    /// is completed too, not resumed.
    #[tokio::test(flavor = "multi_thread")]
    async fn restore_completes_a_sub_task_whose_parent_is_completed() {
        let agent = TestAgent::start().await;
        agent.begin("t-p").await.unwrap();
        agent.begin_task("t-c", Some("t-p"), None).await.unwrap();
        agent
            .svc
            .store
            .write(|c| {
                c.execute(
                    "UPDATE tasks SET completed_at = 1, completion_reason = 'end_task' WHERE task_id = 't-p'",
                    [],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let fresh = restarted(&agent);
        fresh.restore().await.unwrap();
        let c = fresh.get("t-c").unwrap().unwrap();
        let completion = c.completion.expect("the sub-task was resumed");
        assert_eq!(completion.reason, "parent_completed");
    }

    /// A sub-task under a completed parent gets the same answer whenever it
    /// asks, even while the parent's completion is still being stored; one
    /// asked for while its parent is being begun waits for it; an unknown
    /// parent is a mistake in the request.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_sub_task_under_a_completed_parent_is_refused_the_same_way_whenever_asked() {
        let agent = Arc::new(TestAgent::start().await);
        let (release, blocker) = hold_writer(&agent).await;
        let a = agent.clone();
        let parent = tokio::spawn(async move { a.begin("t-p").await });
        until_in_flight(&agent, "t-p").await;
        let a = agent.clone();
        let early = tokio::spawn(async move { a.begin_task("t-c0", Some("t-p"), None).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        parent.await.unwrap().unwrap();
        early.await.unwrap().unwrap();

        let (release, blocker) = hold_writer(&agent).await;
        let tasks = agent.svc.tasks.clone();
        let end = tokio::spawn(async move { tasks.end("t-p", String::new()).await });
        until_in_flight(&agent, "t-p").await;
        let a = agent.clone();
        let during = tokio::spawn(async move { a.begin_task("t-c1", Some("t-p"), None).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        end.await.unwrap().unwrap();
        let after = agent.begin_task("t-c2", Some("t-p"), None).await;
        for refused in [during.await.unwrap(), after] {
            assert!(
                matches!(refused, Err(TaskError::ParentCompleted(ref p)) if p == "t-p"),
                "{refused:?}"
            );
        }
        let unknown = agent.begin_task("t-c3", Some("t-never"), None).await;
        assert!(
            matches!(
                unknown,
                Err(TaskError::Invalid {
                    field: "parent_task_id",
                    ..
                })
            ),
            "{unknown:?}"
        );
    }

    /// After a reboot no bound process or cgroup is the one a task was
    /// bound to, whatever its PID, start time or id: restore completes every
    /// task of the previous boot (even one whose PID and start time match a
    /// live process), revokes it, and then records this boot.
    #[tokio::test(flavor = "multi_thread")]
    async fn restore_after_a_reboot_completes_every_task_of_the_boot_before() {
        let Some(now) = crate::store::current_boot() else {
            eprintln!("SKIPPED: no boot id in /proc/sys/kernel/random/boot_id");
            return;
        };
        let agent = TestAgent::start().await;
        agent.begin("t-before").await.unwrap();
        let serials = agent.svc.tasks.issued_serials("t-before").unwrap();
        let recorded =
            |agent: &TestAgent| agent.svc.store.read(crate::store::recorded_boot).unwrap();
        assert_eq!(recorded(&agent), Some(now));
        // Same boot: the task, its process alive, resumes.
        let same_boot = restarted(&agent);
        same_boot.restore().await.unwrap();
        assert!(
            same_boot
                .get("t-before")
                .unwrap()
                .unwrap()
                .completion
                .is_none()
        );
        // As if the store had last been used in another boot.
        agent
            .svc
            .store
            .write(move |c| crate::store::record_boot(c, now ^ 1))
            .await
            .unwrap();
        let rebooted = restarted(&agent);
        rebooted.restore().await.unwrap();
        let task = rebooted.get("t-before").unwrap().unwrap();
        assert_completed_and_revoked(&agent, &task, &serials, "process_exited");
        assert_eq!(task.completion.unwrap().detail, "found after a reboot");
        assert_eq!(recorded(&agent), Some(now));
    }

    /// A store from a writ that recorded no boot id: its tasks begun
    /// before this boot are of an earlier one, and completed even when a
    /// live process has their PID and start time; those begun since are
    /// restored as before.
    #[tokio::test(flavor = "multi_thread")]
    async fn restore_without_a_recorded_boot_completes_tasks_begun_before_this_boot() {
        let Some(booted) = crate::store::boot_time() else {
            eprintln!("SKIPPED: no btime in /proc/stat");
            return;
        };
        let agent = TestAgent::start().await;
        agent.begin("t-legacy").await.unwrap();
        let serials = agent.svc.tasks.issued_serials("t-legacy").unwrap();
        // As the older writ left it: no boot recorded.
        let forget_boot = "DELETE FROM meta WHERE key = 'boot'";
        run_sql(&agent, forget_boot).await;
        let same_boot = restarted(&agent);
        same_boot.restore().await.unwrap();
        let task = same_boot.get("t-legacy").unwrap().unwrap();
        assert!(task.completion.is_none(), "{:?}", task.completion);

        run_sql(&agent, forget_boot).await;
        let before_boot = unix_secs(booted) - 60;
        agent
            .svc
            .store
            .write(move |c| {
                c.execute(
                    "UPDATE tasks SET created_at = ?1 WHERE task_id = 't-legacy'",
                    params![before_boot],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let rebooted = restarted(&agent);
        rebooted.restore().await.unwrap();
        let task = rebooted.get("t-legacy").unwrap().unwrap();
        assert_completed_and_revoked(&agent, &task, &serials, "process_exited");
        assert_eq!(task.completion.unwrap().detail, "found after a reboot");
    }

    /// A task begun while the clock was two days ahead, restored once it
    /// is put right, lives no longer than its TTL from now: served, read
    /// back and stored with the deadline brought forward, and its SVIDs
    /// capped by it.
    #[tokio::test(flavor = "multi_thread")]
    async fn restore_after_the_clock_was_put_back_keeps_a_task_to_its_ttl() {
        let agent = TestAgent::start().await;
        let ttl = Duration::from_secs(600);
        agent.begin_task("t-long", None, Some(ttl)).await.unwrap();
        run_sql(
            &agent,
            "UPDATE tasks SET created_at = created_at + 172800, expires_at = expires_at + 172800
             WHERE task_id = 't-long';",
        )
        .await;
        let fresh = restarted(&agent);
        let latest = SystemTime::now() + ttl;
        fresh.restore().await.unwrap();
        let task = fresh.get("t-long").unwrap().unwrap();
        assert!(task.completion.is_none());
        assert!(
            task.expires_at <= latest,
            "ends {:?} after its TTL",
            task.expires_at.duration_since(latest)
        );
        assert!(task.expires_at + Duration::from_secs(5) >= latest);
        let stored = count(
            &agent,
            "SELECT expires_at FROM tasks WHERE task_id = 't-long'",
        );
        assert_eq!(stored, unix_secs(task.expires_at));
        let entitlement = agent.svc.agent.task_entitlement(&task);
        assert_eq!(entitlement.not_after_cap, Some(task.expires_at));
    }

    #[test]
    fn a_restored_deadline_is_at_most_the_ttl_from_now() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        // Begun two days ahead, ten minutes asked for.
        assert_eq!(restored_deadline(at(172_800), at(173_400), at(0)), at(600));
        // Begun in the past: its own deadline, whatever is left of it.
        assert_eq!(
            restored_deadline(at(1_000), at(1_600), at(1_300)),
            at(1_600)
        );
        assert_eq!(
            restored_deadline(at(1_000), at(1_600), at(2_000)),
            at(1_600)
        );
    }

    #[test]
    fn a_restored_sub_task_ends_no_later_than_its_parent() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let mut parent = test_task(
            "t-p",
            Binding::Pid {
                pid: 1,
                start_time: 1,
            },
        );
        parent.created_at = at(100_000);
        parent.expires_at = at(100_600);
        let mut child = test_task(
            "t-c",
            Binding::Pid {
                pid: 1,
                start_time: 1,
            },
        );
        child.parent_id = Some("t-p".into());
        child.created_at = at(99_000);
        child.expires_at = at(100_600);
        let mut tasks = vec![parent, child];
        let clamped = clamp_restored_deadlines(&mut tasks, at(0));
        assert_eq!(
            clamped,
            [("t-p".to_owned(), at(600)), ("t-c".to_owned(), at(600))]
        );
        assert_eq!(tasks[1].expires_at, at(600));
    }

    /// An SVID minted before the clock was put back is not served from the
    /// cache while its notBefore is still to come.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_cached_svid_not_yet_valid_is_not_served() {
        let agent = TestAgent::start().await;
        let task = agent.begin("t-back").await.unwrap();
        let now = SystemTime::now();
        agent.svid_for_task(&task, now).await.unwrap();
        let key = agent.svc.agent.task_entitlement(&task).cache_key;
        assert!(agent.svc.agent.cached_svid(&key, now).is_some());
        let put_back = now - Duration::from_secs(3 * 3600);
        assert!(agent.svc.agent.cached_svid(&key, put_back).is_none());
    }

    /// A task manager over the same store and agent, as after a restart.
    fn restarted(agent: &TestAgent) -> Arc<TaskManager> {
        manager_with_cgroups(agent, None)
    }

    /// A task manager over the agent's store, trusting `/writ.slice` under
    /// `cgroup_mount` if given.
    fn manager_with_cgroups(agent: &TestAgent, cgroup_mount: Option<&Path>) -> Arc<TaskManager> {
        manager_with(agent, cgroup_mount, agent.config.tasks.completed_retention)
    }

    /// `manager_with_cgroups`, keeping completed tasks for `retention`.
    fn manager_with(
        agent: &TestAgent,
        cgroup_mount: Option<&Path>,
        retention: Duration,
    ) -> Arc<TaskManager> {
        let t = &agent.config.tasks;
        TaskManager::new(
            agent.svc.agent.clone(),
            agent.svc.store.clone(),
            TaskLimits {
                max_ttl: t.max_ttl,
                default_ttl: t.default_ttl,
                x509_svid_ttl: t.x509_svid_ttl,
                max_depth: t.max_depth,
                trusted_cgroup_roots: vec!["/writ.slice".into()],
                completed_retention: retention,
            },
            cgroup_mount.map(Path::to_path_buf),
        )
    }

    /// An admin caller's check made after its connection last read covers
    /// every request read so far: such a request reuses the attestation
    /// without reading /proc. A periodic check (an open WatchTasks) always
    /// reads, and so does a request once the connection has read again.
    #[tokio::test]
    async fn an_admin_check_since_the_last_read_covers_the_requests_read_before_it() {
        let agent = TestAgent::start().await;
        let agent = &agent.svc.agent;
        let process = PinnedProcess::open(std::process::id() as i32).unwrap();
        let caller = crate::peer::Caller::new(process.pid(), 0, 0, Arc::new(process));
        let hour = Duration::from_secs(3600);
        caller.note_read();
        agent.attest_reusing(&caller, hour, true).unwrap();
        // Kept as if attested running something else: a check now fails
        // and attests afresh, so only an unchecked reuse returns it.
        let stale = || {
            let mut kept = caller.recent_attestation.lock().unwrap();
            let recent = kept.as_mut().unwrap();
            let mut elsewhere = (*recent.attestation).clone();
            elsewhere.snapshot.exe_path = Some("/nonexistent/elsewhere".into());
            recent.attestation = Arc::new(elsewhere);
            recent.attestation.clone()
        };
        let marked = stale();
        let reused = agent.attest_reusing(&caller, hour, true).unwrap();
        assert!(
            Arc::ptr_eq(&reused, &marked),
            "nothing read since the check"
        );
        let periodic = agent.attest_reusing(&caller, hour, false).unwrap();
        assert!(!Arc::ptr_eq(&periodic, &marked), "a periodic check reads");
        let marked = stale();
        caller.note_read();
        let after_a_read = agent.attest_reusing(&caller, hour, true).unwrap();
        assert!(!Arc::ptr_eq(&after_a_read, &marked), "read since the check");
        assert_ne!(after_a_read.snapshot.exe_path, marked.snapshot.exe_path);
    }

    /// A cgroup that could not be watched (a limit reached) is polled, and
    /// watched once a later attempt succeeds.
    #[tokio::test(start_paused = true)]
    async fn a_cgroup_polled_for_want_of_a_watch_is_watched_again_later() {
        let mount = tempfile::tempdir().unwrap();
        let job = fake_job_cgroup(mount.path());
        std::fs::write(job.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let cgroups = Arc::new(CgroupWatcher::default());
        cgroups.refuse_watches(1);
        let watch = BindingWatch::Cgroup {
            cgroup: Arc::new(crate::cgroup::CgroupDir::open(&job).unwrap()),
            dir: job.clone(),
            held_processes: true,
            cpu_usage_at_bind: None,
        };
        let waiter = {
            let cgroups = cgroups.clone();
            tokio::spawn(async move { wait_cgroup_empty(watch, &cgroups).await })
        };
        tokio::time::sleep(crate::cgroup_watch::FALLBACK_INTERVAL * 3).await;
        assert_eq!(cgroups.watched_inodes(), 0, "refused, so polling");
        tokio::time::sleep(crate::cgroup_watch::WATCH_RETRY_INTERVAL).await;
        assert!(cgroups.watched_inodes() > 0, "watched on a later attempt");
        assert!(!waiter.is_finished());
        waiter.abort();
    }

    /// The directory standing in for the cgroup `/writ.slice/job` under a
    /// fake cgroup2 mount at `mount`; the test writes its files.
    fn fake_job_cgroup(mount: &Path) -> PathBuf {
        let job = mount.join("writ.slice/job");
        std::fs::create_dir_all(&job).unwrap();
        job
    }

    /// A BeginTask for `id`, bound to the cgroup `/writ.slice/job`.
    fn job_cgroup_request(id: &str) -> BeginRequest {
        BeginRequest {
            task_id: Some(id.into()),
            cgroup: Some("/writ.slice/job".into()),
            ttl: Some(Duration::from_secs(600)),
            ..BeginRequest::default()
        }
    }

    /// Task `id` is stored and not completed.
    fn is_active(manager: &TaskManager, id: &str) -> bool {
        manager
            .get(id)
            .unwrap()
            .is_some_and(|t| t.completion.is_none())
    }

    /// Waits for task `id` to complete, and checks it completed because
    /// its cgroup emptied.
    async fn ends_as_emptied(completions: &mut crate::task_events::EventReceiver, id: &str) {
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Ok(TaskEvent::Completed(task, _)) = completions.recv().await
                    && task.id == id
                {
                    return task;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("task {id} did not end"));
        assert_eq!(
            ended.completion.as_ref().map(|c| c.reason.as_str()),
            Some(CompletionReason::CgroupEmpty.as_str())
        );
    }

    /// A cgroup that held processes when it was bound has emptied once it
    /// holds none, even if they left before the task's watcher first
    /// looked (a busy runtime starts it late). The watcher used to learn
    /// from its own first look whether the cgroup had held processes: one
    /// emptied before then seemed never populated, and the task lived to
    /// its TTL.
    /// A file stands in for the kernel's `cgroup.events`; on a
    /// current-thread runtime the watcher runs only once the test awaits.
    #[tokio::test]
    async fn a_cgroup_emptied_before_its_watcher_looks_ends_the_task() {
        let agent = TestAgent::start().await;
        let mount = tempfile::tempdir().unwrap();
        let job = fake_job_cgroup(mount.path());
        let events = job.join("cgroup.events");
        std::fs::write(&events, "populated 1\nfrozen 0\n").unwrap();
        let manager = manager_with_cgroups(&agent, Some(mount.path()));
        let mut completions = manager.subscribe();
        manager
            .begin(job_cgroup_request("t-cgroup"), &agent.orchestrator())
            .await
            .unwrap();
        std::fs::write(&events, "populated 0\nfrozen 0\n").unwrap();
        ends_as_emptied(&mut completions, "t-cgroup").await;
    }

    /// A cgroup bound empty ends its task once its CPU time has grown (a
    /// process ran there and left between two looks), and not on a
    /// notification alone: the kernel delivers cgroup.events changes up to
    /// 10 ms late, so one may come from processes that left before the task
    /// began. Files stand in for the kernel's, as above.
    #[tokio::test]
    async fn a_cgroup_bound_empty_ends_once_its_cpu_time_shows_a_process_came_and_went() {
        let agent = TestAgent::start().await;
        let mount = tempfile::tempdir().unwrap();
        let job = fake_job_cgroup(mount.path());
        let events = job.join("cgroup.events");
        let cpu_stat = job.join("cpu.stat");
        std::fs::write(&events, "populated 0\nfrozen 0\n").unwrap();
        std::fs::write(&cpu_stat, "usage_usec 700\nuser_usec 400\n").unwrap();
        let manager = manager_with_cgroups(&agent, Some(mount.path()));
        let mut completions = manager.subscribe();
        manager
            .begin(job_cgroup_request("t-brief"), &agent.orchestrator())
            .await
            .unwrap();
        let stored = manager.get("t-brief").unwrap().unwrap();
        assert!(
            matches!(
                stored.binding,
                Binding::Cgroup {
                    cpu_usage_at_bind: Some(700),
                    ..
                }
            ),
            "{:?}",
            stored.binding
        );

        // A late notification, nothing run since: still waiting.
        std::fs::write(&events, "populated 0\nfrozen 0\n").unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Some(Ok(event)) = completions.try_recv() {
            assert!(
                !matches!(event, TaskEvent::Completed(..)),
                "ended on a stale notice"
            );
        }
        assert!(is_active(&manager, "t-brief"));

        std::fs::write(&cpu_stat, "usage_usec 1100\nuser_usec 600\n").unwrap();
        std::fs::write(&events, "populated 0\nfrozen 0\n").unwrap();
        ends_as_emptied(&mut completions, "t-brief").await;

        // Two more tasks, begun by a run of writ that then stops: on a
        // runtime of its own, dropped with their watchers. The first is
        // bound without a cpu.stat (an older kernel): only `populated`
        // counts for it.
        let (before_restart, orchestrator) = (manager.clone(), agent.orchestrator());
        let cpu_stat_then = cpu_stat.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                std::fs::remove_file(&cpu_stat_then).unwrap();
                before_restart
                    .begin(job_cgroup_request("t-old-kernel"), &orchestrator)
                    .await
                    .unwrap();
                std::fs::write(&cpu_stat_then, "usage_usec 1100\nuser_usec 600\n").unwrap();
                before_restart
                    .begin(job_cgroup_request("t-waiting"), &orchestrator)
                    .await
                    .unwrap();
            });
        })
        .join()
        .unwrap();
        let stored = manager.get("t-old-kernel").unwrap().unwrap();
        assert!(matches!(
            stored.binding,
            Binding::Cgroup {
                cpu_usage_at_bind: None,
                ..
            }
        ));

        // At a restart, the empty cgroup is still waiting for its
        // processes where its CPU time says none has run; without that
        // record, it is taken to have emptied while writ was down.
        let fresh = manager_with_cgroups(&agent, Some(mount.path()));
        let mut completions = fresh.subscribe();
        fresh.restore().await.unwrap();
        let old = fresh.get("t-old-kernel").unwrap().unwrap();
        assert_eq!(
            old.completion.map(|c| c.reason),
            Some(CompletionReason::CgroupEmpty.as_str().to_owned())
        );
        assert!(is_active(&fresh, "t-waiting"));
        std::fs::write(&cpu_stat, "usage_usec 1500\nuser_usec 800\n").unwrap();
        std::fs::write(&events, "populated 0\nfrozen 0\n").unwrap();
        ends_as_emptied(&mut completions, "t-waiting").await;
    }

    /// Begins task `id` on `/writ.slice/job` under the fake mount, as a run
    /// of writ that then stops: on a runtime of its own, dropped with the
    /// task's watcher.
    fn begin_in_a_run_that_stops(agent: &TestAgent, mount: &Path, id: &'static str) {
        let manager = manager_with_cgroups(agent, Some(mount));
        let orchestrator = agent.orchestrator();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime
                .block_on(manager.begin(job_cgroup_request(id), &orchestrator))
                .unwrap();
        })
        .join()
        .unwrap();
    }

    /// A cgroup task stored by an older writ has no cgroup id. Restored,
    /// the cgroup at its path is its own only if it was made before the
    /// task began (by its `cgroup.controllers`' change time, here the fake
    /// file's): then its id is stored for later restarts; one made after
    /// (again at the path while writ was down) ends the task.
    #[tokio::test]
    async fn after_a_restart_a_legacy_cgroup_task_is_kept_only_by_a_cgroup_made_before_it() {
        let agent = TestAgent::start().await;
        let mount = tempfile::tempdir().unwrap();
        let job = fake_job_cgroup(mount.path());
        std::fs::write(job.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        std::fs::write(job.join("cgroup.controllers"), "").unwrap();
        begin_in_a_run_that_stops(&agent, mount.path(), "t-legacy");
        let stored_id = |agent: &TestAgent| -> Option<i64> {
            query_for(
                agent,
                "SELECT json_extract(record, '$.binding.cgroup.id') FROM tasks WHERE task_id = ?1",
                "t-legacy",
            )
        };
        let job_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&job).unwrap()) as i64;
        assert_eq!(stored_id(&agent), Some(job_id));
        let forget_id = "UPDATE tasks SET record = json_remove(record, '$.binding.cgroup.id')
                         WHERE task_id = 't-legacy'";
        run_sql(&agent, forget_id).await;

        let fresh = manager_with_cgroups(&agent, Some(mount.path()));
        fresh.restore().await.unwrap();
        assert!(is_active(&fresh, "t-legacy"));
        assert_eq!(stored_id(&agent), Some(job_id), "the id was not stored");
        drop(fresh);

        // As if the task had begun a minute before the cgroup was made.
        run_sql(&agent, forget_id).await;
        run_sql(
            &agent,
            "UPDATE tasks SET created_at = created_at - 60 WHERE task_id = 't-legacy'",
        )
        .await;
        let fresh = manager_with_cgroups(&agent, Some(mount.path()));
        fresh.restore().await.unwrap();
        let completion = fresh.get("t-legacy").unwrap().unwrap().completion.unwrap();
        assert_eq!(completion.reason, CompletionReason::CgroupEmpty.as_str());
        assert_eq!(completion.detail, MADE_AGAIN_DETAIL);
    }

    /// A cgroup that held processes when its task began has emptied once it
    /// holds none, even if they were moved out while writ was down, which
    /// adds no CPU time there: a probe's restart took such a cgroup for one
    /// still waiting for its processes, and newcomers got the task.
    #[tokio::test]
    async fn after_a_restart_a_cgroup_populated_when_bound_and_empty_now_has_emptied() {
        let agent = TestAgent::start().await;
        let mount = tempfile::tempdir().unwrap();
        let job = fake_job_cgroup(mount.path());
        let events = job.join("cgroup.events");
        std::fs::write(&events, "populated 1\nfrozen 0\n").unwrap();
        std::fs::write(job.join("cpu.stat"), "usage_usec 700\nuser_usec 400\n").unwrap();
        begin_in_a_run_that_stops(&agent, mount.path(), "t-moved-out");

        std::fs::write(&events, "populated 0\nfrozen 0\n").unwrap();
        let fresh = manager_with_cgroups(&agent, Some(mount.path()));
        fresh.restore().await.unwrap();
        let task = fresh.get("t-moved-out").unwrap().unwrap();
        assert_eq!(
            task.completion.map(|c| c.reason),
            Some(CompletionReason::CgroupEmpty.as_str().to_owned())
        );
    }

    /// An active task whose stored record cannot be read (damaged, or
    /// written by a newer writ) does not stop writ from starting: it is
    /// ended, its serials revoked and published, its sub-tasks end with
    /// it, and every other task is restored and still listed.
    #[tokio::test(flavor = "multi_thread")]
    async fn restore_ends_tasks_whose_record_is_unreadable_and_restores_the_rest() {
        let agent = TestAgent::start().await;
        agent.begin("t-ok").await.unwrap();
        agent.begin("t-json").await.unwrap();
        agent.begin("t-blob").await.unwrap();
        agent
            .begin_task("t-sub", Some("t-json"), None)
            .await
            .unwrap();
        let bad_serials: Vec<String> = ["t-json", "t-blob"]
            .iter()
            .flat_map(|id| agent.svc.tasks.issued_serials(id).unwrap())
            .collect();
        assert_eq!(bad_serials.len(), 2);
        agent
            .svc
            .store
            .write(|c| {
                c.execute(
                    "UPDATE tasks SET record = '{\"binding\": {\"Future\": 1}}' WHERE task_id = 't-json'",
                    [],
                )?;
                c.execute("UPDATE tasks SET record = x'00ff' WHERE task_id = 't-blob'", [])?;
                Ok(())
            })
            .await
            .unwrap();
        let fresh = restarted(&agent);
        fresh.restore().await.unwrap();

        assert!(fresh.get("t-ok").unwrap().unwrap().completion.is_none());
        let sub = fresh.get("t-sub").unwrap().unwrap();
        assert_eq!(sub.completion.unwrap().reason, "parent_completed");
        for id in ["t-json", "t-blob"] {
            let e = fresh.get(id).unwrap_err().to_string();
            assert!(e.contains(id), "{e}");
            let reason: String = query_for(
                &agent,
                "SELECT completion_reason FROM tasks WHERE task_id = ?1",
                id,
            );
            assert_eq!(reason, "record_unreadable");
        }
        // Listed a task at a time: a page whose one row is unreadable is
        // empty, and the listing goes on past it.
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let page = fresh.list_page(true, after, 1, usize::MAX, |_| 0).unwrap();
            pages.push(
                page.tasks
                    .into_iter()
                    .map(|t| t.task.id)
                    .collect::<Vec<_>>(),
            );
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, [vec!["t-ok"], vec![], vec![], vec!["t-sub"]]);
        let all = fresh.list_page(true, None, 10, usize::MAX, |_| 0).unwrap();
        let listed: Vec<&str> = all.tasks.iter().map(|t| t.task.id.as_str()).collect();
        assert_eq!(listed, ["t-ok", "t-sub"]);
        assert_eq!(all.next, None);
        let active = fresh.list_page(false, None, 10, usize::MAX, |_| 0).unwrap();
        let listed: Vec<&str> = active.tasks.iter().map(|t| t.task.id.as_str()).collect();
        assert_eq!(listed, ["t-ok"]);
        // Revoked in the store and in the CRL writ now publishes.
        let crls = agent.svc.agent.crls();
        let mut published = std::collections::HashSet::new();
        for der in &crls.ders {
            use x509_parser::prelude::FromDer as _;
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
            published.extend(
                crl.iter_revoked_certificates()
                    .map(|r| hex::encode(r.raw_serial())),
            );
        }
        for serial in &bad_serials {
            assert!(published.contains(serial), "{serial} not in the CRL");
        }
        // Their records name them: the id is a column of its own.
        let named = |kind: &str, reason: &str| {
            let mut ids: Vec<String> = agent
                .records_of(kind)
                .iter()
                .filter(|r| r["reason"] == reason)
                .map(|r| r["detail"]["task_id"].as_str().unwrap_or("").to_owned())
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(
            named("task_ended", "record_unreadable"),
            ["t-blob", "t-json"]
        );
        let revoked_for: Vec<String> = agent
            .records_of("revoked")
            .iter()
            .filter(|r| r["detail"]["task_id"] == "t-blob" || r["detail"]["task_id"] == "t-json")
            .map(|r| r["detail"]["serials"].to_string())
            .collect();
        assert_eq!(revoked_for.len(), 2, "{revoked_for:?}");
    }

    /// EndTask racing BeginTask (the task stored, not yet active) waits for
    /// it to become active and ends it: never an uncompleted answer for a
    /// task that then goes live.
    #[tokio::test(flavor = "multi_thread")]
    async fn end_racing_begin_ends_the_task() {
        let agent = Arc::new(TestAgent::start().await);
        for i in 0..100 {
            let id = format!("t-r{i}");
            let a = agent.clone();
            let begun_id = id.clone();
            let begin = tokio::spawn(async move { a.begin(&begun_id).await });
            let mut answers = Vec::new();
            while !begin.is_finished() {
                if let Ok((task, _)) = agent.svc.tasks.end(&id, String::new()).await {
                    answers.push(task.completion.is_some());
                }
                tokio::task::yield_now().await;
            }
            begin.await.unwrap().unwrap();
            assert!(
                answers.iter().all(|completed| *completed),
                "{id}: EndTask reported it uncompleted"
            );
            if !answers.is_empty() {
                assert!(
                    agent.svc.agent.active_task(&id).is_none(),
                    "{id}: ended, then went live"
                );
            }
            let _ = agent.svc.tasks.end(&id, String::new()).await;
        }
    }

    /// A task that ends while one of its SVIDs is being recorded leaves no
    /// SVID in the cache: the completion clears the cache before the mint
    /// finishes, and the mint must not put its SVID back for good.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_svid_minted_as_its_task_ends_is_not_left_in_the_cache() {
        let agent = TestAgent::start().await;
        let task = agent.begin("t-race").await.unwrap();
        let key = crate::agent::task_cache_key("t-race");
        assert!(agent.svc.agent.holds_cached_svid(&key));

        // The store's writer is held, so the next mint waits on its write.
        let (release, blocker) = hold_writer(&agent).await;
        // Past the first SVID's rotation point, so a new one is minted.
        let later = SystemTime::now() + Duration::from_secs(45);
        let mint = {
            let svc_agent = agent.svc.agent.clone();
            let task = task.clone();
            tokio::spawn(async move {
                let entitlement = svc_agent.task_entitlement(&task);
                svc_agent
                    .svid_for(&entitlement, later, || crate::agent::Issuance::new(None))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!mint.is_finished(), "the mint did not wait for the store");
        // The completion's first step, while the mint waits.
        agent.svc.agent.unindex_task("t-race");
        assert!(!agent.svc.agent.holds_cached_svid(&key));
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        let _ = mint.await.unwrap();
        assert!(
            !agent.svc.agent.holds_cached_svid(&key),
            "the ended task's SVID was cached again"
        );
    }

    /// An identity sent beside a task, minted before the task ended and
    /// cached after (its mint was still being recorded), escapes the task's
    /// re-key; the stream that carried the task drops it when it sees the
    /// cache still holds what it sent. A newer SVID is left alone.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_identity_sent_beside_an_ended_task_is_not_sent_again() {
        let agent = TestAgent::start().await;
        let svc = &agent.svc.agent;
        let entry = svc
            .registry()
            .entries()
            .first()
            .cloned()
            .expect("the built-in entry");
        let beside = crate::identity::Entitlement::from_entry(&entry);
        let task = agent.begin("t-beside").await.unwrap();
        let task_key = crate::agent::task_cache_key("t-beside");
        let keys = vec![task_key.clone(), beside.cache_key.clone()];
        svc.note_held_together(&["t-beside"], &keys);
        let task_svid = agent.svid_for_task(&task, SystemTime::now()).await.unwrap();
        // Its snapshot began before the task ended; its mint is cached after.
        let snapshot_began = SystemTime::now();
        svc.unindex_task("t-beside");
        let sent = svc
            .svid_for(&beside, snapshot_began, || {
                crate::agent::Issuance::new(None)
            })
            .await
            .unwrap();
        assert!(svc.holds_cached_svid(&beside.cache_key));
        let serials = vec![task_svid.svid.serial.clone(), sent.svid.serial.clone()];
        svc.forget_svids_sent(&keys, &serials);
        assert!(
            !svc.holds_cached_svid(&beside.cache_key),
            "what was sent beside the task would be sent again"
        );
        // One minted since is another key, and stays.
        let fresh = svc
            .svid_for(&beside, SystemTime::now(), || {
                crate::agent::Issuance::new(None)
            })
            .await
            .unwrap();
        assert_ne!(fresh.svid.serial, sent.svid.serial);
        svc.forget_svids_sent(&keys, &serials);
        assert!(svc.holds_cached_svid(&beside.cache_key));
    }

    /// BeginTask mints the task's first SVID: its serial is stored with the
    /// task and recorded beside `task_begun`, and the bound process's first
    /// fetch is served that SVID without another issuance.
    #[tokio::test(flavor = "multi_thread")]
    async fn begin_issues_the_first_svid_with_the_task() {
        let agent = TestAgent::start().await;
        let task = agent.begin("t-first").await.unwrap();
        let stored = agent.svc.tasks.issued_serials("t-first").unwrap();
        assert_eq!(stored.len(), 1, "{stored:?}");

        let trail = agent.trail();
        let begun = trail
            .iter()
            .find(|r| r["event"] == "task_begun")
            .expect("task_begun");
        let issued: Vec<_> = trail
            .iter()
            .filter(|r| r["event"] == "x509_issued")
            .collect();
        assert_eq!(issued.len(), 1, "{trail:?}");
        assert_eq!(issued[0]["serial"], stored[0].as_str());
        assert_eq!(issued[0]["correlation_id"], begun["correlation_id"]);
        assert_eq!(issued[0]["task"]["id"], "t-first");
        assert_eq!(issued[0]["action"], "BeginTask");
        assert_eq!(issued[0]["spiffe_id"], task.spiffe_id.to_string());

        let entitlement = agent.svc.agent.task_entitlement(&task);
        let served = agent
            .svc
            .agent
            .svid_for(&entitlement, SystemTime::now(), || {
                crate::agent::Issuance::new(None)
            })
            .await
            .unwrap();
        assert_eq!(hex::encode(&served.svid.serial), stored[0]);
        let after = agent.records_of("x509_issued");
        assert_eq!(after.len(), 1, "the first fetch minted again: {after:?}");
    }

    /// Streams sharing an identity all ask for it at once when it is
    /// re-keyed (here: past its rotation point): one mints, the others wait
    /// for its turn and take the same SVID.
    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_callers_share_one_mint() {
        let agent = Arc::new(TestAgent::start().await);
        let task = agent.begin("t-shared").await.unwrap();
        let entitlement = agent.svc.agent.task_entitlement(&task);
        let later = SystemTime::now() + Duration::from_secs(40);
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let (agent, entitlement) = (agent.clone(), entitlement.clone());
                tokio::spawn(async move {
                    agent
                        .svc
                        .agent
                        .svid_for(&entitlement, later, || crate::agent::Issuance::new(None))
                        .await
                        .unwrap()
                        .svid
                        .serial
                        .clone()
                })
            })
            .collect();
        let mut serials = std::collections::BTreeSet::new();
        for caller in callers {
            serials.insert(caller.await.unwrap());
        }
        assert_eq!(serials.len(), 1, "{serials:?}");
        // The SVID minted as the task began, and one rotation.
        assert_eq!(agent.records_of("x509_issued").len(), 2);
    }

    /// When the trail cannot record the beginning, BeginTask fails and
    /// neither the task nor its first SVID's serial stays in the store.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_begin_the_trail_cannot_record_leaves_nothing_stored() {
        let agent = TestAgent::start().await;
        agent.svc.agent.audit_log().expect("audit trail").close();
        let refused = agent.begin("t-unrecorded").await;
        assert!(
            matches!(refused, Err(TaskError::Audit(_))),
            "{:?}",
            refused.map(|t| t.id.clone())
        );
        assert!(
            agent
                .svc
                .tasks
                .issued_serials("t-unrecorded")
                .unwrap()
                .is_empty()
        );
        let stored: i64 = agent
            .svc
            .store
            .write(|c| {
                Ok(c.query_row(
                    "SELECT count(*) FROM tasks WHERE task_id = 't-unrecorded'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
            .unwrap();
        assert_eq!(stored, 0);
        assert!(agent.svc.tasks.get("t-unrecorded").unwrap().is_none());
    }

    #[test]
    fn an_attribute_with_an_empty_key_is_refused() {
        let mut intent = Intent::default();
        intent.attributes.insert("ticket".into(), "42".into());
        validate_intent(&intent).unwrap();
        intent.attributes.insert(String::new(), "v".into());
        let err = validate_intent(&intent).unwrap_err();
        assert!(
            matches!(
                err,
                TaskError::Invalid {
                    field: "intent.attributes",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("key is empty"), "{err}");
    }

    #[test]
    fn a_thread_is_told_apart_from_its_process() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let process = std::process::id() as i32;
        assert_ne!(tid, process);
        assert_eq!(thread_group_of(tid), Some(process));
        assert_eq!(thread_group_of(process), Some(process));
        drop(done_tx);
        thread.join().unwrap();
    }

    /// Intent text reaches operators' terminals, audit records, JWT claims
    /// and policies: a control character could forge or hide what they show.
    #[test]
    fn control_characters_are_refused_in_every_intent_field_and_the_end_reason() {
        let good = Intent {
            purpose: "summarise tickets, é ✓".into(),
            tools: vec!["jira".into()],
            targets: vec!["tickets".into()],
            data_class: "internal".into(),
            attributes: [("ticket".to_owned(), "T-1".to_owned())].into(),
        };
        validate_intent(&good).unwrap();
        validate_end_reason("done; see T-1 ✓").unwrap();
        // Nor invisible formatting characters, which disguise a name to
        // the people who read it.
        for hidden in ["read\u{200b}_only", "a\u{202e}gnp.exe", "\u{feff}jira"] {
            let disguised = Intent {
                tools: vec![hidden.into()],
                ..good.clone()
            };
            let err = validate_intent(&disguised).unwrap_err().to_string();
            assert!(
                err.starts_with("intent.tools: ") && err.contains("invisible formatting character"),
                "{err}"
            );
            assert!(validate_end_reason(hidden).is_err());
        }
        // Free text may break lines and indent; names may not.
        validate_end_reason("failed:\n\texit status 2\n").unwrap();
        let multi_line = Intent {
            purpose: "summarise:\n\t- tickets\n".into(),
            ..good.clone()
        };
        validate_intent(&multi_line).unwrap();
        type Spoil = fn(&mut Intent, &str);
        let cases: [(&str, Spoil); 6] = [
            ("intent.purpose", |i, bad| i.purpose = format!("a{bad}b")),
            ("intent.tools", |i, bad| i.tools.push(format!("t{bad}"))),
            ("intent.targets", |i, bad| i.targets = vec![bad.to_owned()]),
            ("intent.data_class", |i, bad| i.data_class = bad.to_owned()),
            ("intent.attributes", |i, bad| {
                i.attributes.insert(format!("k{bad}"), "v".into());
            }),
            ("intent.attributes", |i, bad| {
                i.attributes.insert("k".into(), format!("v{bad}"));
            }),
        ];
        for bad in [
            "\0",
            "\n",
            "\r",
            "\t",
            "\u{7}",
            "\u{1b}[2J",
            "\u{7f}",
            "\u{9b}",
        ] {
            for (field, spoil) in cases {
                if field == "intent.purpose" && (bad == "\n" || bad == "\t") {
                    continue;
                }
                let mut intent = good.clone();
                spoil(&mut intent, bad);
                let err = validate_intent(&intent).unwrap_err();
                assert!(matches!(err, TaskError::Invalid { .. }), "{err:?}");
                let err = err.to_string();
                assert!(
                    err.starts_with(&format!("{field}: ")) && err.contains("control character"),
                    "{bad:?}: {err}"
                );
                // The message itself carries no control character.
                assert!(!err.chars().any(char::is_control), "{err:?}");
            }
            if bad == "\n" || bad == "\t" {
                continue;
            }
            let err = validate_end_reason(&format!("bye{bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("reason: ") && err.contains("control character"),
                "{err}"
            );
        }
    }

    /// Refusals name the field and the item, and show a long value only in
    /// part: the message is sent as a gRPC header, which clients limit.
    #[test]
    fn a_refused_intent_item_is_named_by_position_and_shown_shortened() {
        let long = "q".repeat(20_000);
        let intent = Intent {
            tools: vec!["jira".into(), long.clone()],
            ..Intent::default()
        };
        let err = validate_intent(&intent).unwrap_err().to_string();
        assert!(err.starts_with("intent.tools: item 1 ("), "{err}");
        assert!(err.contains("(20000 bytes)") && err.len() < 300, "{err}");
        let intent = Intent {
            targets: vec![String::new()],
            ..Intent::default()
        };
        let err = validate_intent(&intent).unwrap_err().to_string();
        assert_eq!(err, "intent.targets: item 0 is empty");
        let err = TaskError::NotFound(long).to_string();
        assert!(err.starts_with("task qqq") && err.len() < 300, "{err}");
    }

    #[test]
    fn a_repeated_tool_or_target_is_refused_naming_both_places() {
        let intent = Intent {
            tools: vec!["jira".into(), "github".into(), "jira".into()],
            ..Intent::default()
        };
        let err = validate_intent(&intent).unwrap_err().to_string();
        assert_eq!(err, "intent.tools: item 2 (\"jira\") repeats item 0");
        let intent = Intent {
            targets: vec!["db".into(), "db".into()],
            ..Intent::default()
        };
        let err = validate_intent(&intent).unwrap_err().to_string();
        assert_eq!(err, "intent.targets: item 1 (\"db\") repeats item 0");
        // The same text in both lists is no repeat.
        let intent = Intent {
            tools: vec!["db".into()],
            targets: vec!["db".into()],
            ..Intent::default()
        };
        validate_intent(&intent).unwrap();
    }

    #[test]
    fn attribute_keys_and_values_are_bounded_like_tools() {
        let mut intent = Intent::default();
        intent
            .attributes
            .insert("k".repeat(MAX_INTENT_STRING), "v".repeat(MAX_INTENT_STRING));
        validate_intent(&intent).unwrap();
        for (key, value) in [
            ("k".repeat(MAX_INTENT_STRING + 1), String::new()),
            ("ticket".to_owned(), "v".repeat(MAX_INTENT_STRING + 1)),
        ] {
            let mut intent = Intent::default();
            intent.attributes.insert(key.clone(), value.clone());
            let err = validate_intent(&intent).unwrap_err().to_string();
            assert!(err.starts_with("intent.attributes:"), "{err}");
            assert!(
                err.contains(&format!(
                    "key {} bytes, value {} bytes",
                    key.len(),
                    value.len()
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn a_sub_task_keeps_its_parents_attributes_within_the_bound() {
        let attrs = |range: std::ops::Range<usize>| Intent {
            attributes: range.map(|n| (format!("k{n}"), "v".to_owned())).collect(),
            ..Default::default()
        };
        let parent = attrs(0..40);
        let mut child = attrs(30..60);
        inherit_attributes(&mut child, &parent, "parent task p").unwrap();
        assert_eq!(child.attributes.len(), 60);
        // Each within the bound, but not together.
        let mut child = attrs(30..70);
        let err = inherit_attributes(&mut child, &parent, "parent task p")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("intent.attributes:") && err.contains("40 inherited"),
            "{err}"
        );
        // A long value is shown by its start.
        let mut parent = Intent::default();
        parent.attributes.insert("k".into(), "x".repeat(1000));
        let mut child = Intent::default();
        child.attributes.insert("k".into(), "y".repeat(1000));
        let err = inherit_attributes(&mut child, &parent, "parent task p")
            .unwrap_err()
            .to_string();
        assert!(err.len() < 500 && err.contains('…'), "{err}");
    }

    #[test]
    fn sub_task_scope_cannot_widen() {
        let parent = Intent {
            tools: vec!["jira".into(), "search".into()],
            targets: vec!["tickets".into()],
            data_class: "internal".into(),
            ..Default::default()
        };
        let narrower = Intent {
            tools: vec!["jira".into()],
            targets: vec![],
            data_class: String::new(),
            ..Default::default()
        };
        check_within_parent_scope(&narrower, &parent, "parent task p").unwrap();
        let mut wider = narrower.clone();
        wider.tools.push("shell".into());
        let err = check_within_parent_scope(&wider, &parent, "parent task p")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("intent.tools:") && err.contains("shell"),
            "{err}"
        );
        let mut other_target = narrower.clone();
        other_target.targets = vec!["prod-db".into()];
        assert!(
            check_within_parent_scope(&other_target, &parent, "parent task p")
                .unwrap_err()
                .to_string()
                .starts_with("intent.targets:")
        );
        let mut other_class = narrower;
        other_class.data_class = "secret".into();
        assert!(
            check_within_parent_scope(&other_class, &parent, "parent task p")
                .unwrap_err()
                .to_string()
                .starts_with("intent.data_class:")
        );
    }
}
