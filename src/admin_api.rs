//! writ's admin API on the admin socket (package `writ.admin.v1`): `Tasks`,
//! `Entries`, `Bundles` and `Agent` (reload). Callers are attested exactly
//! like Workload API callers and must match one of the `[admin_api]
//! authorized` selector sets.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::Stream;
use tonic::{Request, Response, Status};
use writ_attestors::{Attestation, Selector, excerpt};

use crate::agent::Agent;
use crate::audit::{AuditEvent, EventKind};
use crate::config::parse_duration;
use crate::entries::{EntryError, EntryStore};
use crate::federation::{BundleFormat, BundleInfo, BundleSource, Federation, FederationError};
use crate::peer::{Caller, PeerInfo};
use crate::proto::admin as pb;
use crate::reload::{ReloadError, ReloadSummary, Reloader, Trigger};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::task_events::RecvError;
use crate::tasks::{
    BeginRequest, Binding, Intent, Orchestrator, Task, TaskError, TaskEvent, TaskManager,
};
use crate::workload_api::agent_status;

/// Selector sets that grant access; a caller needs every selector of one set.
#[derive(Debug, Clone)]
pub struct AdminAuthorization {
    pub authorized: Vec<Vec<Selector>>,
    pub bind_any_pid: Vec<Vec<Selector>>,
    pub bind_same_uid: bool,
    /// Who of the authorized may create and delete registration entries.
    /// An entry names any SPIFFE ID for any selectors, the caller's own
    /// included: without this, every authorized caller could make itself
    /// root's (or another orchestrator's) identity and act on its tasks.
    pub operators: Vec<Vec<Selector>>,
}

fn matches_any(sets: &[Vec<Selector>], have: &[Selector]) -> bool {
    sets.iter()
        .any(|set| !set.is_empty() && set.iter().all(|s| have.binary_search(s).is_ok()))
}

pub struct AdminContext {
    pub agent: Arc<Agent>,
    pub tasks: Arc<TaskManager>,
    pub entries: Arc<EntryStore>,
    pub federation: Arc<Federation>,
    pub reloader: Arc<Reloader>,
    pub auth: AdminAuthorization,
    /// How long a connection's attestation is reused for its next calls
    /// (`[workload_api] reattest_interval`, as for an open stream).
    pub reattest_interval: std::time::Duration,
    /// Open WatchTasks streams per uid (`MAX_TASK_WATCHES_PER_UID`).
    pub task_watches: Arc<crate::peer::PerUidCounts>,
}

/// WatchTasks streams one uid may hold open at once. A stream that does not
/// read may hold up to `task_events::WATCHER_QUEUE_BYTES` of events, so
/// without a bound an authorized caller's stuck streams could hold writ's
/// memory many times over; an orchestrator needs one or two.
pub const MAX_TASK_WATCHES_PER_UID: usize = 16;

/// An attested, authorized admin caller. The attestation is the one
/// authorization was decided on; the rest of the request uses it too rather
/// than reading /proc again microseconds later.
struct AdminCaller {
    caller: Arc<Caller>,
    attestation: Arc<Attestation>,
}

impl AdminCaller {
    fn selectors(&self) -> &[Selector] {
        &self.attestation.selectors
    }

    /// Who asked, as the audit trail names an operator: with the SPIFFE
    /// IDs it holds, as a workload's records name them.
    fn audit_facts(&self, agent: &crate::agent::Agent) -> crate::audit::CallerFacts {
        crate::audit::CallerFacts {
            spiffe_ids: agent
                .entitlements(&self.caller, &self.attestation)
                .iter()
                .map(|e| e.spiffe_id.to_string())
                .collect(),
            pid: self.caller.pid,
            uid: self.caller.uid,
            selectors: selector_strings(self.selectors()),
        }
    }
}

/// The policy action the audit trail names for callers the admin API
/// turns away.
const ADMIN_API: &str = "AdminAPI";

fn selector_strings(selectors: &[Selector]) -> Vec<String> {
    selectors.iter().map(|s| s.to_string()).collect()
}

impl AdminContext {
    fn authorize<T>(&self, request: &Request<T>) -> Result<AdminCaller, Status> {
        let caller = match request.extensions().get::<PeerInfo>() {
            Some(Ok(c)) => c.clone(),
            Some(Err(e)) => {
                return Err(Status::permission_denied(format!(
                    "could not attest caller: {e}"
                )));
            }
            None => return Err(Status::internal("connection carries no peer information")),
        };
        self.authorize_caller(caller, true)
    }

    /// Attests `caller` (reusing its connection's last attestation while
    /// that holds, credentials included) and checks it against
    /// `[admin_api] authorized`. Also how an open WatchTasks stream asks
    /// whether its caller is still authorized (`for_request` false: see
    /// `Agent::attest_reusing`).
    fn authorize_caller(
        &self,
        caller: Arc<Caller>,
        for_request: bool,
    ) -> Result<AdminCaller, Status> {
        let attested = self
            .agent
            .attest_reusing(&caller, self.reattest_interval, for_request);
        let attestation = match attested {
            Ok(attestation) => attestation,
            Err(e) => {
                if let Some(event) = Agent::attestation_failure_event(&caller, ADMIN_API, &e) {
                    self.record_refusal(event);
                }
                return Err(agent_status(e));
            }
        };
        if !matches_any(&self.auth.authorized, &attestation.selectors) {
            let reason = format!(
                "caller (pid {}, uid {}) is not authorized for the admin API",
                caller.pid, caller.uid
            );
            self.record_refusal(Agent::refusal_event(
                EventKind::Denied,
                &caller,
                selector_strings(&attestation.selectors),
                ADMIN_API,
                reason.clone(),
            ));
            return Err(Status::permission_denied(reason));
        }
        Ok(AdminCaller {
            caller,
            attestation,
        })
    }
}

/// Response metadata EndTask sets when the task had completed before the
/// call (ending a task is idempotent; this tells the caller it did not).
pub const ALREADY_COMPLETED_HEADER: &str = "writ-task-already-completed";

pub fn task_status(e: TaskError) -> Status {
    match e {
        TaskError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        TaskError::NotFound(_) => Status::not_found(e.to_string()),
        TaskError::AlreadyExists(_) | TaskError::IdentityTaken { .. } => {
            Status::already_exists(e.to_string())
        }
        TaskError::ParentCompleted(_) | TaskError::CallerTaskCompleted(_) => {
            Status::failed_precondition(e.to_string())
        }
        TaskError::PermissionDenied(_)
        | TaskError::PolicyDenied(_)
        | TaskError::IdentityBelowTask { .. }
        | TaskError::IdentityAboveTask { .. } => Status::permission_denied(e.to_string()),
        // Asking again does not mend a damaged record, so not Unavailable.
        TaskError::Store(crate::store::StoreError::Corrupt(_)) => Status::data_loss(e.to_string()),
        TaskError::Store(_)
        | TaskError::Audit(_)
        | TaskError::Unavailable(_)
        | TaskError::Stopping(_) => Status::unavailable(e.to_string()),
        TaskError::Interrupted { .. } => Status::internal(e.to_string()),
    }
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn task_to_proto(t: &Task, issued_serials: Vec<String>) -> pb::Task {
    let (completed_at, reason, detail) = match &t.completion {
        Some(c) => (secs(c.at), c.reason.clone(), c.detail.clone()),
        None => (0, String::new(), String::new()),
    };
    pb::Task {
        task_id: t.id.clone(),
        spiffe_id: t.spiffe_id.to_string(),
        parent_task_id: t.parent_id.clone().unwrap_or_default(),
        binding: Some(pb::Binding {
            target: Some(match &t.binding {
                Binding::Pid { pid, .. } => pb::binding::Target::Pid(*pid),
                Binding::Cgroup { path, .. } => pb::binding::Target::Cgroup(path.clone()),
            }),
        }),
        intent: Some(pb::Intent {
            purpose: t.intent.purpose.clone(),
            tools: t.intent.tools.clone(),
            targets: t.intent.targets.clone(),
            data_class: t.intent.data_class.clone(),
            attributes: t.intent.attributes.clone().into_iter().collect(),
        }),
        orchestrator_spiffe_id: t.orchestrator.clone(),
        created_at: secs(t.created_at),
        expires_at: secs(t.expires_at),
        completed_at,
        completion_reason: reason,
        completion_detail: detail,
        issued_serials,
        federates_with: t.federates_with.iter().map(|t| t.to_string()).collect(),
    }
}

/// Tasks or entries in a ListTasks or ListEntries page when the caller does
/// not say.
const DEFAULT_PAGE_SIZE: usize = 500;
/// The most tasks or entries in one page. A count alone does not keep a
/// page small (a task's intent may be some 270 KB): `MAX_PAGE_BYTES` does.
const MAX_PAGE_SIZE: usize = 1000;
/// The most encoded bytes of tasks or entries in one ListTasks or
/// ListEntries page, whatever its page size: a page ends before the item
/// that would pass it, but always holds one. Every task and entry is far
/// smaller than this (intents and entries are bounded when they are made),
/// so a page stays well within the 4 MiB gRPC clients accept by default.
const MAX_PAGE_BYTES: usize = 1 << 20;

/// What an item of `encoded_len` bytes adds to a page: its field's tag and
/// length as well.
fn in_page(encoded_len: usize) -> usize {
    1 + prost::length_delimiter_len(encoded_len) + encoded_len
}

/// A task as `list_page` counts it: without its serials, which are read
/// after the page (and counted then).
fn listed_task_bytes(task: &Task) -> usize {
    in_page(prost::Message::encoded_len(&task_to_proto(
        task,
        Vec::new(),
    )))
}

/// A ListTasks response of the `listed` tasks, each with its serials,
/// ending before the task that would pass `max_bytes` (but holding at
/// least one); `next` is the cursor after the last task listed, if more
/// follow it.
fn task_page(
    listed: Vec<crate::tasks::ListedTask>,
    serials: Vec<Vec<String>>,
    next: Option<i64>,
    max_bytes: usize,
) -> pb::ListTasksResponse {
    let mut tasks = Vec::with_capacity(listed.len());
    let mut bytes = 0;
    let mut next = next;
    let mut last_cursor = None;
    for (listed, serials) in listed.into_iter().zip(serials) {
        let task = task_to_proto(&listed.task, serials);
        let size = in_page(prost::Message::encoded_len(&task));
        if !tasks.is_empty() && bytes + size > max_bytes {
            // The serials put it over: it starts the next page.
            next = last_cursor;
            break;
        }
        bytes += size;
        last_cursor = Some(listed.cursor);
        tasks.push(task);
    }
    pb::ListTasksResponse {
        tasks,
        next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
    }
}

/// A list request's `page_size` as a number of items.
fn page_size(requested: i32) -> Result<usize, Status> {
    match usize::try_from(requested) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
        Err(_) => Err(Status::invalid_argument(format!(
            "page_size: {requested} is negative"
        ))),
    }
}

/// Where a ListTasks page starts: after the task a `page_token` names (a
/// previous page's `next_page_token`), or at the first.
fn page_start(token: &str) -> Result<Option<i64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    match token.parse::<i64>() {
        Ok(after) if after > 0 => Ok(Some(after)),
        _ => Err(Status::invalid_argument(format!(
            "page_token: {:?} is not a next_page_token from ListTasks",
            excerpt(token)
        ))),
    }
}

/// Where a ListEntries page starts in the registry: after the entry a
/// `page_token` names (the last of the previous page), or at the first.
/// The registry keeps its order as entries come and go, so the next page
/// goes on after that entry; if the entry is gone, where the listing stood
/// is lost, and the caller must start again rather than miss entries.
fn entry_page_start(entries: &[Arc<crate::identity::Entry>], token: &str) -> Result<usize, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    if !crate::identity::is_entry_id(token) {
        return Err(Status::invalid_argument(format!(
            "page_token: {:?} is not a next_page_token from ListEntries",
            excerpt(token)
        )));
    }
    entries
        .iter()
        .position(|e| e.id == token)
        .map(|at| at + 1)
        .ok_or_else(|| {
            Status::aborted(format!(
                "page_token: entry {token}, where the previous page ended, is no longer \
                 registered; the entries changed while they were listed, so list them again \
                 from the first page"
            ))
        })
}

/// The first entries of `rest` that fit in a page of `limit` entries and
/// `max_bytes` encoded (at least one, however large), and the token for the
/// page after it.
fn entry_page(
    rest: &[Arc<crate::identity::Entry>],
    limit: usize,
    max_bytes: usize,
) -> pb::ListEntriesResponse {
    let mut entries = Vec::new();
    let mut bytes = 0;
    for entry in rest.iter().take(limit) {
        let entry = entry_to_proto(entry);
        let size = in_page(prost::Message::encoded_len(&entry));
        if !entries.is_empty() && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        entries.push(entry);
    }
    let next_page_token = match entries.last() {
        Some(last) if entries.len() < rest.len() => last.id.clone(),
        _ => String::new(),
    };
    pb::ListEntriesResponse {
        entries,
        next_page_token,
    }
}

fn begin_request(req: pb::BeginTaskRequest) -> Result<BeginRequest, Status> {
    let bad = |field: &str, why: String| Status::invalid_argument(format!("{field}: {why}"));
    let (pid, cgroup) = match req.binding.and_then(|b| b.target) {
        Some(pb::binding::Target::Pid(p)) => (Some(p), None),
        Some(pb::binding::Target::Cgroup(c)) => (None, Some(c)),
        None => return Err(bad("binding", "a pid or a cgroup is required".into())),
    };
    let spiffe_id = if req.spiffe_id.is_empty() {
        None
    } else {
        Some(
            req.spiffe_id
                .parse::<SpiffeId>()
                .map_err(|e| bad("spiffe_id", e.to_string()))?,
        )
    };
    let ttl = if req.ttl.is_empty() {
        None
    } else {
        Some(parse_duration(&req.ttl).map_err(|e| bad("ttl", e.to_string()))?)
    };
    let intent = req.intent.unwrap_or_default();
    // Bounded as an entry's is: every listing and watch event carries it.
    if req.federates_with.len() > crate::entries::MAX_ENTRY_ITEMS {
        return Err(bad(
            "federates_with",
            format!(
                "{} trust domains given; a task has at most {}",
                req.federates_with.len(),
                crate::entries::MAX_ENTRY_ITEMS
            ),
        ));
    }
    let federates_with = req
        .federates_with
        .iter()
        .map(|t| {
            crate::spiffe_id::TrustDomain::new(t)
                .map_err(|e| bad("federates_with", format!("{:?}: {e}", excerpt(t))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(why) = crate::entries::repeated_item(&req.federates_with, &federates_with) {
        return Err(bad("federates_with", why));
    }
    Ok(BeginRequest {
        task_id: (!req.task_id.is_empty()).then_some(req.task_id),
        pid,
        cgroup,
        spiffe_id,
        intent: Intent {
            purpose: intent.purpose,
            tools: intent.tools,
            targets: intent.targets,
            data_class: intent.data_class,
            attributes: intent.attributes.into_iter().collect::<BTreeMap<_, _>>(),
        },
        ttl,
        // proto3 strings have no presence: an empty parent_task_id is
        // indistinguishable from one not sent, so it can only mean "none".
        // The CLI refuses an empty --parent (and --id, --ttl, --spiffe-id)
        // for that reason; other clients must not send empty for a parent.
        parent_task_id: (!req.parent_task_id.is_empty()).then_some(req.parent_task_id),
        federates_with,
    })
}

pub struct TasksService(pub Arc<AdminContext>);

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TaskEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::tasks_server::Tasks for TasksService {
    type WatchTasksStream = EventStream;

    async fn begin_task(
        &self,
        request: Request<pb::BeginTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let ctx = &self.0;
        let admin = ctx.authorize(&request)?;
        let req = begin_request(request.into_inner())?;
        // The orchestrator's own identity is its default Workload API
        // identity. When that is a task's (the caller works in the task;
        // inside several, the first of them), what it begins is a sub-task
        // of that task.
        let attestation = &admin.attestation;
        let (own_id, own_task) = ctx
            .agent
            .entitlements(&admin.caller, attestation)
            .into_iter()
            .next()
            .map_or((None, None), |e| (Some(e.spiffe_id), e.task_id));
        let orchestrator = Orchestrator {
            process: admin.caller.process.clone(),
            spiffe_id: own_id,
            task_id: own_task,
            uid: attestation.snapshot.uid,
            selectors: attestation
                .selectors
                .iter()
                .map(|s| s.to_string())
                .collect(),
            may_bind_any_pid: matches_any(&ctx.auth.bind_any_pid, admin.selectors()),
            may_bind_same_uid: ctx.auth.bind_same_uid,
        };
        // In a task of its own: a client that hangs up must not stop a
        // begin between storing the task and making it active.
        let tasks = ctx.tasks.clone();
        let (task, serials) =
            tokio::spawn(async move { tasks.begin_issuing(req, &orchestrator).await })
                .await
                .map_err(|e| Status::internal(format!("beginning the task: {e}")))?
                .map_err(task_status)?;
        Ok(Response::new(task_to_proto(&task, serials)))
    }

    async fn end_task(
        &self,
        request: Request<pb::EndTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let ctx = &self.0;
        let admin = ctx.authorize(&request)?;
        let req = request.into_inner();
        if req.task_id.is_empty() {
            return Err(Status::invalid_argument("task_id: required"));
        }
        crate::tasks::validate_end_reason(&req.reason).map_err(task_status)?;
        // Ending an active task is a decision too (a completed one is
        // reported as it is, whoever asks). One still being begun is judged
        // once it is active; one that begins after the look is judged on a
        // second look, never ended on the strength of the first.
        let active = loop {
            ctx.tasks.until_settled(&req.task_id).await;
            if let Some(active) = ctx.agent.active_task(&req.task_id) {
                break active;
            }
            match ctx.tasks.get(&req.task_id).map_err(task_status)? {
                Some(task) if task.completion.is_some() => {
                    let serials = ctx
                        .tasks
                        .issued_serials(&req.task_id)
                        .map_err(task_status)?;
                    let mut response = Response::new(task_to_proto(&task, serials));
                    response.metadata_mut().insert(
                        ALREADY_COMPLETED_HEADER,
                        tonic::metadata::MetadataValue::from_static("true"),
                    );
                    return Ok(response);
                }
                Some(_) => continue,
                None => {
                    return Err(task_status(crate::tasks::TaskError::NotFound(
                        req.task_id.clone(),
                    )));
                }
            }
        };
        let attestation = &admin.attestation;
        let own_id = ctx
            .agent
            .entitlements(&admin.caller, attestation)
            .into_iter()
            .next()
            .map(|e| e.spiffe_id);
        if !crate::tasks::may_act_on(
            &active,
            own_id.as_ref(),
            &admin.caller.process,
            matches_any(&ctx.auth.bind_any_pid, admin.selectors()),
        ) {
            return Err(Status::permission_denied(format!(
                "task {} was begun by {}: only it, processes working in the task, or a caller allowed bind_any_pid may end it",
                active.id, active.orchestrator
            )));
        }
        let selectors: Vec<String> = admin.selectors().iter().map(|s| s.to_string()).collect();
        let request = crate::policy::PolicyRequest::EndTask {
            caller: crate::policy::Workload {
                spiffe_id: own_id.as_ref().map(|s| s.to_string()),
                selectors: selectors.clone(),
                pid: admin.caller.pid,
                uid: attestation.snapshot.uid,
            },
            task: crate::policy::TaskFacts::from(&*active),
        };
        let facts = crate::audit::CallerFacts {
            spiffe_ids: own_id.iter().map(|s| s.to_string()).collect(),
            pid: admin.caller.pid,
            uid: attestation.snapshot.uid,
            selectors,
        };
        let decision = ctx
            .agent
            .authorize(&request, Some(facts.clone()), true)
            .await;
        if !decision.allowed {
            return Err(Status::permission_denied(decision.denial_message()));
        }
        let requested_by = crate::tasks::Requester {
            caller: facts,
            action: request.action_name().to_owned(),
            decision,
        };
        let (task, serials, ended_now) = ctx
            .tasks
            .end_reporting(&req.task_id, req.reason, Some(requested_by))
            .await
            .map_err(task_status)?;
        let mut response = Response::new(task_to_proto(&task, serials));
        if !ended_now {
            response.metadata_mut().insert(
                ALREADY_COMPLETED_HEADER,
                tonic::metadata::MetadataValue::from_static("true"),
            );
        }
        Ok(response)
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let ctx = &self.0;
        ctx.authorize(&request)?;
        let id = request.into_inner().task_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("task_id: required"));
        }
        let task = ctx
            .tasks
            .get(&id)
            .map_err(task_status)?
            .ok_or_else(|| Status::not_found(format!("task {} not found", excerpt(&id))))?;
        let serials = ctx.tasks.issued_serials(&id).map_err(task_status)?;
        Ok(Response::new(task_to_proto(&task, serials)))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let ctx = &self.0;
        ctx.authorize(&request)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let after = page_start(&request.page_token)?;
        let page = ctx
            .tasks
            .list_page(
                request.include_completed,
                after,
                limit,
                MAX_PAGE_BYTES,
                listed_task_bytes,
            )
            .map_err(task_status)?;
        let serials = ctx
            .tasks
            .issued_serials_of(page.tasks.iter().map(|t| t.task.id.clone()).collect())
            .map_err(task_status)?;
        Ok(Response::new(task_page(
            page.tasks,
            serials,
            page.next,
            MAX_PAGE_BYTES,
        )))
    }

    async fn watch_tasks(
        &self,
        request: Request<pb::WatchTasksRequest>,
    ) -> Result<Response<Self::WatchTasksStream>, Status> {
        let ctx = self.0.clone();
        let caller = ctx.authorize(&request)?.caller;
        let Some(slot) = ctx.task_watches.take(caller.uid, MAX_TASK_WATCHES_PER_UID) else {
            return Err(Status::resource_exhausted(format!(
                "uid {} holds {MAX_TASK_WATCHES_PER_UID} task watches, as many as one uid may; close some first",
                caller.uid
            )));
        };
        // Subscribed before the call returns, so the caller sees every
        // event from then on. Events wait in the watcher's own queue
        // (bounded in bytes, crate::task_events) and become messages only
        // as the stream is read: nothing else holds them for a watcher
        // that does not read. When the watcher hangs up the stream is
        // dropped, and its queue with it.
        let events = ctx.tasks.subscribe();
        let stopping = ctx.agent.shutdown_requested();
        // The stream outlives the call that authorized it: its caller may
        // change its credentials, exec another program, or otherwise stop
        // matching `authorized`, and would go on receiving every task's
        // intent. So it is authorized again before each event it is sent,
        // and every re-attest interval while no event comes.
        let recheck_every = ctx
            .reattest_interval
            .max(std::time::Duration::from_millis(100));
        let mut recheck =
            tokio::time::interval_at(tokio::time::Instant::now() + recheck_every, recheck_every);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watch = WatchState {
            events,
            stopping,
            recheck,
            ctx,
            caller,
            _slot: slot,
        };
        let stream = futures::stream::unfold(Some(watch), |state| async move {
            let mut watch = state?;
            let received = loop {
                let woke = tokio::select! {
                    received = watch.events.recv() => Some(received),
                    // A watch never ends by itself: without this, every open
                    // watcher held a stopping writ to its drain deadline, and
                    // then saw a broken connection.
                    _ = watch.stopping.wait_for(|s| *s) => {
                        let stop = Status::unavailable("writ is stopping; watch again once it is back");
                        return Some((Err(stop), None));
                    }
                    _ = watch.recheck.tick() => None,
                };
                match woke {
                    Some(received) => break received,
                    None => {
                        if let Err(refused) = watch.still_authorized() {
                            return Some((Err(refused), None));
                        }
                    }
                }
            };
            let (kind, task, serials) = match received {
                Ok(TaskEvent::Begun(t, serials)) => (pb::task_event::Kind::Begun, t, serials),
                Ok(TaskEvent::Completed(t, serials)) => {
                    (pb::task_event::Kind::Completed, t, serials)
                }
                Err(RecvError::Lagged(n)) => {
                    let lost = Status::data_loss(format!(
                        "watcher fell behind and missed at least {n} events (more than {} MiB of them waited to be read); list tasks and watch again",
                        crate::task_events::WATCHER_QUEUE_BYTES >> 20
                    ));
                    return Some((Err(lost), None));
                }
                Err(RecvError::Closed) => return None,
            };
            // Checked once the event is in hand, just before it goes out.
            if let Err(refused) = watch.still_authorized() {
                return Some((Err(refused), None));
            }
            let event = pb::TaskEvent {
                kind: kind as i32,
                task: Some(task_to_proto(&task, serials)),
            };
            Some((Ok(event), Some(watch)))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// What a WatchTasks stream carries between its messages.
struct WatchState {
    events: crate::task_events::EventReceiver,
    stopping: tokio::sync::watch::Receiver<bool>,
    recheck: tokio::time::Interval,
    ctx: Arc<AdminContext>,
    caller: Arc<crate::peer::Caller>,
    /// The uid's place among its watches, given back with the stream.
    _slot: crate::peer::UidSlot,
}

impl WatchState {
    fn still_authorized(&self) -> Result<(), Status> {
        self.ctx
            .authorize_caller(self.caller.clone(), false)
            .map(|_| ())
    }
}

pub struct EntriesService(pub Arc<AdminContext>);

fn entry_status(e: EntryError) -> Status {
    match e {
        EntryError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        EntryError::NotFound(_) => Status::not_found(e.to_string()),
        EntryError::FromConfig(_) => Status::failed_precondition(e.to_string()),
        EntryError::AlreadyExists(_) | EntryError::HeldByTask { .. } => {
            Status::already_exists(e.to_string())
        }
        EntryError::ShadowsAdminEntry(_) | EntryError::ConfigHeldByTask(_) => {
            Status::failed_precondition(e.to_string())
        }
        EntryError::Store(_) => Status::unavailable(e.to_string()),
    }
}

pub fn entry_to_proto(e: &crate::identity::Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        selectors: e.selectors.iter().map(|s| s.to_string()).collect(),
        x509_svid_ttl: crate::config::format_duration(e.x509_svid_ttl),
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        source: e.source.as_str().to_owned(),
        federates_with: e.federates_with.iter().map(|t| t.to_string()).collect(),
    }
}

impl AdminContext {
    /// `authorize`, for a call that changes what writ trusts or issues
    /// (registration entries, federated bundles, a reload): the caller must
    /// match `[admin_api] operators` as well. Orchestrators need only
    /// `authorized`; an entry or a bundle would let one take any identity,
    /// or make workloads trust a CA of its choosing for another domain.
    fn authorize_operator<T>(
        &self,
        request: &Request<T>,
        call: &str,
    ) -> Result<AdminCaller, Status> {
        let admin = self.authorize(request)?;
        if !matches_any(&self.auth.operators, admin.selectors()) {
            let reason = format!(
                "caller (pid {}, uid {}) may not {call}: it matches no selector set of [admin_api] operators",
                admin.caller.pid, admin.caller.uid
            );
            self.record_refusal(Agent::refusal_event(
                EventKind::Denied,
                &admin.caller,
                selector_strings(admin.selectors()),
                ADMIN_API,
                reason.clone(),
            ));
            return Err(Status::permission_denied(reason));
        }
        Ok(admin)
    }

    /// Records a caller the admin API turned away, within its uid's budget
    /// of refusal records (`Agent::record_refusal`), without holding up the
    /// answer: the refusal stands whatever the trail does.
    fn record_refusal(&self, event: AuditEvent) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let agent = self.agent.clone();
            runtime.spawn(async move { agent.record_refusal(event).await });
        }
    }
}

#[tonic::async_trait]
impl pb::entries_server::Entries for EntriesService {
    async fn create_entry(
        &self,
        request: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let ctx = &self.0;
        let admin = ctx.authorize_operator(&request, "create entries")?;
        let entry = ctx
            .entries
            .create(request.into_inner(), admin.audit_facts(&ctx.agent))
            .await
            .map_err(entry_status)?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let ctx = &self.0;
        let admin = ctx.authorize_operator(&request, "delete entries")?;
        ctx.entries
            .delete(&request.into_inner().id, admin.audit_facts(&ctx.agent))
            .await
            .map_err(entry_status)?;
        Ok(Response::new(pb::DeleteEntryResponse {}))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let ctx = &self.0;
        ctx.authorize(&request)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let registry = ctx.agent.registry();
        let entries = registry.entries();
        let start = entry_page_start(entries, &request.page_token)?;
        Ok(Response::new(entry_page(
            &entries[start..],
            limit,
            MAX_PAGE_BYTES,
        )))
    }
}

pub struct BundlesService(pub Arc<AdminContext>);

fn federation_status(e: FederationError) -> Status {
    match e {
        FederationError::OwnTrustDomain(_) | FederationError::Configured(_) => {
            Status::failed_precondition(e.to_string())
        }
        FederationError::NotFound(_) => Status::not_found(e.to_string()),
        // A bundle that would trust nothing is bad input like a malformed
        // one: only another bundle mends it, so not FailedPrecondition,
        // even where the trust domain's configured profile decides.
        FederationError::InvalidBundle(_) | FederationError::Unusable { .. } => {
            Status::invalid_argument(e.to_string())
        }
        FederationError::Store(_) => Status::unavailable(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn parse_trust_domain(text: &str) -> Result<TrustDomain, Status> {
    if text.is_empty() {
        return Err(Status::invalid_argument("trust_domain: required"));
    }
    TrustDomain::new(text)
        .map_err(|e| Status::invalid_argument(format!("trust_domain {:?}: {e}", excerpt(text))))
}

fn own_bundle_to_proto(ctx: &AdminContext) -> pb::Bundle {
    let own = ctx.agent.own_bundle();
    pb::Bundle {
        trust_domain: own.bundle.trust_domain.to_string(),
        spiffe_json: own.bundle.to_spiffe_json(),
        pem: own.bundle.to_pem(),
        sequence: own.bundle.sequence,
        source: "own".into(),
        updated_at: 0,
        fetch: None,
    }
}

fn opt_secs(t: Option<SystemTime>) -> i64 {
    t.map_or(0, secs)
}

fn bundle_info_to_proto(info: &BundleInfo) -> pb::Bundle {
    let fetch = info.fetch.as_ref().map(|f| pb::FetchStatus {
        url: f.url.clone(),
        last_attempt: opt_secs(f.last_attempt),
        last_success: opt_secs(f.last_success),
        last_error: f.last_error.clone().unwrap_or_default(),
        next_attempt: opt_secs(f.next_attempt),
    });
    match &info.held {
        Some(held) => pb::Bundle {
            trust_domain: info.trust_domain.to_string(),
            spiffe_json: held.bundle.to_spiffe_json(),
            pem: held.bundle.to_pem(),
            sequence: held.bundle.sequence,
            source: held.source.as_str().into(),
            updated_at: secs(held.updated_at),
            fetch,
        },
        None => pb::Bundle {
            trust_domain: info.trust_domain.to_string(),
            source: "pending".into(),
            fetch,
            ..Default::default()
        },
    }
}

#[tonic::async_trait]
impl pb::bundles_server::Bundles for BundlesService {
    async fn get_bundle(
        &self,
        request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let ctx = &self.0;
        ctx.authorize(&request)?;
        let wanted = request.into_inner().trust_domain;
        if wanted.is_empty() {
            return Ok(Response::new(own_bundle_to_proto(ctx)));
        }
        let td = parse_trust_domain(&wanted)?;
        if &td == ctx.agent.trust_domain() {
            return Ok(Response::new(own_bundle_to_proto(ctx)));
        }
        match ctx.agent.federated_bundles().get(&td) {
            Some(held) => Ok(Response::new(bundle_info_to_proto(&BundleInfo {
                fetch: ctx.federation.fetch_status(&td),
                trust_domain: td,
                held: Some(held),
            }))),
            None => Err(Status::not_found(format!(
                "no bundle held for trust domain {td}"
            ))),
        }
    }

    async fn list_bundles(
        &self,
        request: Request<pb::ListBundlesRequest>,
    ) -> Result<Response<pb::ListBundlesResponse>, Status> {
        let ctx = &self.0;
        ctx.authorize(&request)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        // Bundles of other trust domains are as large as their peers make
        // them (up to 1 MiB each): a page is bounded in bytes, as ListTasks'
        // and ListEntries' are, so the listing never passes what clients
        // accept.
        let mut all = vec![own_bundle_to_proto(ctx)];
        all.extend(ctx.federation.list().iter().map(bundle_info_to_proto));
        let start = if request.page_token.is_empty() {
            0
        } else {
            all.iter()
                .position(|b| b.trust_domain == request.page_token)
                .map(|at| at + 1)
                .ok_or_else(|| {
                    Status::aborted(format!(
                        "page_token: trust domain {}, where the previous page ended, is no longer held; the bundles changed while they were listed, so list them again from the first page",
                        excerpt(&request.page_token)
                    ))
                })?
        };
        let mut bundles = Vec::new();
        let mut bytes = 0;
        let mut rest = all.into_iter().skip(start).peekable();
        while let Some(next) = rest.peek() {
            let size = in_page(prost::Message::encoded_len(next));
            if bundles.len() == limit || (!bundles.is_empty() && bytes + size > MAX_PAGE_BYTES) {
                break;
            }
            bytes += size;
            bundles.extend(rest.next());
        }
        let next_page_token = match (rest.peek(), bundles.last()) {
            (Some(_), Some(last)) => last.trust_domain.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListBundlesResponse {
            bundles,
            next_page_token,
        }))
    }

    async fn set_bundle(
        &self,
        request: Request<pb::SetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let ctx = &self.0;
        let admin = ctx.authorize_operator(&request, "set federated bundles")?;
        let req = request.into_inner();
        let td = parse_trust_domain(&req.trust_domain)?;
        if &td == ctx.agent.trust_domain() {
            return Err(federation_status(FederationError::OwnTrustDomain(td)));
        }
        let format = match pb::BundleFormat::try_from(req.format) {
            Ok(pb::BundleFormat::Spiffe) => BundleFormat::Spiffe,
            Ok(pb::BundleFormat::Pem) => BundleFormat::Pem,
            _ => {
                return Err(Status::invalid_argument(
                    "format: required (BUNDLE_FORMAT_SPIFFE or BUNDLE_FORMAT_PEM)",
                ));
            }
        };
        if req.data.is_empty() {
            return Err(Status::invalid_argument("data: the bundle is empty"));
        }
        let bundle = crate::federation::parse_bundle(td.clone(), &req.data, Some(format))
            .map_err(federation_status)?;
        let held = ctx
            .federation
            .set_bundle_by(
                bundle,
                BundleSource::Static,
                Some(admin.audit_facts(&ctx.agent)),
            )
            .await
            .map_err(federation_status)?;
        Ok(Response::new(bundle_info_to_proto(&BundleInfo {
            fetch: ctx.federation.fetch_status(&td),
            trust_domain: td,
            held: Some(held),
        })))
    }

    async fn delete_bundle(
        &self,
        request: Request<pb::DeleteBundleRequest>,
    ) -> Result<Response<pb::DeleteBundleResponse>, Status> {
        let ctx = &self.0;
        let admin = ctx.authorize_operator(&request, "delete federated bundles")?;
        let td = parse_trust_domain(&request.into_inner().trust_domain)?;
        ctx.federation
            .delete_bundle_by(&td, Some(admin.audit_facts(&ctx.agent)))
            .await
            .map_err(federation_status)?;
        Ok(Response::new(pb::DeleteBundleResponse {}))
    }
}

pub struct AgentService(pub Arc<AdminContext>);

fn reload_status(e: ReloadError) -> Status {
    if e.is_invalid_configuration() {
        Status::failed_precondition(format!(
            "reload refused; the running configuration is unchanged:\n{e}"
        ))
    } else {
        Status::unavailable(format!(
            "reload failed; the running configuration is unchanged: {e}"
        ))
    }
}

fn names(tds: &[TrustDomain]) -> Vec<String> {
    tds.iter().map(|t| t.to_string()).collect()
}

pub fn reload_to_proto(summary: &ReloadSummary) -> pb::ReloadResponse {
    pb::ReloadResponse {
        config_path: summary
            .config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        entries: u32::try_from(summary.entries).unwrap_or(u32::MAX),
        entries_changed: summary.entries_changed,
        policy_source: summary.policy_source.clone(),
        policy_ids: summary.policy_ids.clone(),
        log_level: summary.log_level.clone(),
        log_level_changed: summary.log_level_changed,
        federation: Some(pb::FederationChanges {
            added: names(&summary.federation.added),
            removed: names(&summary.federation.removed),
            updated: names(&summary.federation.updated),
        }),
        restart_required: summary.restart_required.clone(),
        notes: summary.notes.clone(),
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let ctx = &self.0;
        let admin = ctx.authorize_operator(&request, "reload the configuration")?;
        let summary = ctx
            .reloader
            .reload(Trigger::AdminApi(admin.audit_facts(&ctx.agent)))
            .await
            .map_err(reload_status)?;
        Ok(Response::new(reload_to_proto(&summary)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::{Entry, EntrySource};

    fn entries(count: usize, selectors_each: usize) -> Vec<Arc<Entry>> {
        (0..count)
            .map(|n| {
                let selectors = (0..selectors_each)
                    .map(|s| format!("unix:uid:{s}").parse().unwrap())
                    .collect();
                Arc::new(Entry::new(
                    format!("spiffe://x.org/e{n}").parse().unwrap(),
                    selectors,
                    Duration::from_secs(3600),
                    EntrySource::Admin,
                ))
            })
            .collect()
    }

    fn listed_task(cursor: i64, purpose_bytes: usize) -> crate::tasks::ListedTask {
        let task = crate::tasks::test_task(
            &format!("t{cursor}"),
            Binding::Pid {
                pid: 1,
                start_time: 1,
            },
        );
        crate::tasks::ListedTask {
            cursor,
            task: Task {
                intent: Intent {
                    purpose: "p".repeat(purpose_bytes),
                    ..Intent::default()
                },
                ..task
            },
        }
    }

    /// A task page ends at its byte budget, serials counted: the task that
    /// would pass it starts the next page (and a page holds at least one).
    #[test]
    fn a_task_page_ends_before_the_task_that_would_pass_its_bytes() {
        let one = listed_task_bytes(&listed_task(1, 400).task);
        assert!((400..600).contains(&one), "{one}");
        let tasks = || (1..=3).map(|n| listed_task(n, 400)).collect::<Vec<_>>();
        let page = task_page(tasks(), vec![Vec::new(); 3], Some(9), 10 * one);
        assert_eq!(page.tasks.len(), 3);
        assert_eq!(page.next_page_token, "9");
        let page = task_page(tasks(), vec![Vec::new(); 3], None, 10 * one);
        assert_eq!(page.next_page_token, "");
        // The second task's serials take the page past its budget.
        let serials = vec![Vec::new(), vec!["ab".repeat(20); 200], Vec::new()];
        let page = task_page(tasks(), serials, None, 10 * one);
        let ids: Vec<&str> = page.tasks.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["t1"]);
        assert_eq!(page.next_page_token, "1");
        // A task larger than the budget has a page of its own.
        let page = task_page(vec![listed_task(5, 5000)], vec![Vec::new()], Some(5), 100);
        assert_eq!(page.tasks.len(), 1);
        assert_eq!(page.next_page_token, "5");
    }

    fn listed(page: &pb::ListEntriesResponse) -> Vec<&str> {
        page.entries.iter().map(|e| e.spiffe_id.as_str()).collect()
    }

    #[test]
    fn an_entry_page_ends_at_its_size_or_its_bytes_whichever_comes_first() {
        let small = entries(3, 1);
        let page = entry_page(&small, 2, MAX_PAGE_BYTES);
        assert_eq!(listed(&page), ["spiffe://x.org/e0", "spiffe://x.org/e1"]);
        assert_eq!(page.next_page_token, small[1].id);
        let last = entry_page(&small[2..], 2, MAX_PAGE_BYTES);
        assert_eq!(listed(&last), ["spiffe://x.org/e2"]);
        assert!(last.next_page_token.is_empty());

        // Entries of about 600 bytes in pages of at most 1,000 bytes: one
        // each, the last with no token after it.
        let large = entries(2, 50);
        let one = prost::Message::encoded_len(&entry_to_proto(&large[0]));
        assert!((500..1000).contains(&one), "{one}");
        let page = entry_page(&large, 10, 1000);
        assert_eq!(listed(&page), ["spiffe://x.org/e0"]);
        assert_eq!(page.next_page_token, large[0].id);
        // An entry larger than the budget still gets a page of its own.
        let page = entry_page(&large[1..], 10, 100);
        assert_eq!(listed(&page), ["spiffe://x.org/e1"]);
        assert!(page.next_page_token.is_empty());
        assert!(entry_page(&[], 10, 100).entries.is_empty());
    }
}
