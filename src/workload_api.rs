//! The SPIFFE Workload API (`SpiffeWorkloadAPI`) as served on the workload
//! socket: the security-header check, attestation of the pinned caller on
//! every RPC and before every stream update, and the full-state streams.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use writ_attestors::Attestation;

use crate::agent::{Agent, AgentError, Issuance};
use crate::audit::{AuditEvent, CallerFacts, EventKind};
use crate::identity::Entitlement;
use crate::peer::{Caller, PeerInfo};
use crate::proto::workload as pb;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;

/// The header every Workload API request must carry. Its presence proves the
/// request came from a gRPC client that meant to call the Workload API, not a
/// browser or proxy tricked into forwarding to the socket.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How often an idle stream re-attests its caller even when nothing else
/// happens, so a process that exec'd into another binary (same PID, new
/// selectors) is re-judged rather than trusted indefinitely.
pub const DEFAULT_REATTEST_INTERVAL: Duration = Duration::from_secs(5);

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct WorkloadApi {
    agent: Arc<Agent>,
    reattest_interval: Duration,
    max_streams_per_uid: usize,
    /// Open streams per uid.
    streams: Arc<crate::peer::PerUidCounts>,
}

/// Streams one uid may hold open at once, unless configured otherwise
/// (`workload_api.max_streams_per_uid`). A SPIFFE client holds one to
/// three; each open stream costs writ its HTTP/2 send buffer (up to about
/// 0.5 MB for a client that does not read), so without a bound one user's
/// processes could hold writ's memory through thousands of connections.
pub const DEFAULT_MAX_STREAMS_PER_UID: usize = 1024;

impl WorkloadApi {
    /// Starts a full-state stream: the first snapshot is taken here, so a
    /// caller with nothing to receive gets the error as the RPC's status
    /// rather than as a stream message; the stream is registered for
    /// changes first, so none between that snapshot and the stream's start
    /// is missed.
    async fn open_stream<T: Send + 'static>(
        &self,
        caller: Arc<Caller>,
        snapshot: SnapshotFn<T>,
    ) -> Result<Response<StreamOf<T>>, Status> {
        let Some(slot) = self.streams.take(caller.uid, self.max_streams_per_uid) else {
            return Err(Status::resource_exhausted(format!(
                "uid {} holds {} open streams, as many as one uid may (workload_api.max_streams_per_uid); close some first",
                caller.uid, self.max_streams_per_uid
            )));
        };
        let subscription = self.agent.changes().register(caller.clone());
        let first = snapshot(
            self.agent.clone(),
            caller.clone(),
            Vec::new(),
            Reuse::Nothing,
        )
        .await?;
        Ok(Response::new(spawn_stream(
            self.agent.clone(),
            caller,
            self.reattest_interval,
            subscription,
            first,
            snapshot,
            slot,
        )))
    }

    pub fn new(agent: Arc<Agent>, reattest_interval: Duration, max_streams_per_uid: usize) -> Self {
        Self {
            agent,
            reattest_interval,
            max_streams_per_uid,
            streams: Arc::default(),
        }
    }
}

/// Checks the security header and returns the pinned caller.
pub fn authenticate<T>(request: &Request<T>) -> Result<Arc<Caller>, Status> {
    // Exactly one value, as SPIRE requires: with `get` alone a request
    // carrying `true` and then `false` would pass, its reverse not.
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(_), Some(_)) => {
            return Err(Status::invalid_argument(format!(
                "security header {SECURITY_HEADER} must be sent once, with the value \"true\""
            )));
        }
        (Some(v), None) if v.as_bytes() == b"true" => {}
        (Some(_), None) => {
            return Err(Status::invalid_argument(format!(
                "security header {SECURITY_HEADER} must be \"true\""
            )));
        }
        (None, _) => {
            return Err(Status::invalid_argument(format!(
                "security header {SECURITY_HEADER} missing from request metadata"
            )));
        }
    }
    match request.extensions().get::<PeerInfo>() {
        Some(Ok(caller)) => Ok(caller.clone()),
        Some(Err(e)) => Err(Status::permission_denied(format!(
            "could not attest caller: {e}"
        ))),
        None => Err(Status::internal("connection carries no peer information")),
    }
}

pub fn agent_status(e: AgentError) -> Status {
    match e {
        AgentError::CallerGone { pid } => {
            Status::permission_denied(format!("caller process {pid} has exited"))
        }
        e @ AgentError::CredentialsChanged { .. } => Status::permission_denied(e.to_string()),
        AgentError::Attestation(e) => Status::unavailable(format!("attestation failed: {e}")),
        AgentError::Mint(e) => Status::unavailable(format!("could not issue SVID: {e}")),
        AgentError::Store(e) => Status::unavailable(format!("could not record issuance: {e}")),
        // The identity vanished between resolving and issuing; the caller
        // retries and resolves again without it.
        AgentError::TaskCompleted(t) => Status::unavailable(format!("task {t} just completed")),
        AgentError::Audit(e) => {
            Status::unavailable(format!("audit trail unavailable; nothing issued: {e}"))
        }
        e @ (AgentError::CrlPublisherStopped | AgentError::CrlPublishFailed(_)) => {
            Status::unavailable(e.to_string())
        }
    }
}

/// An attested caller and the identities it may hold, default first.
pub struct Entitled {
    pub attestation: Attestation,
    pub entitlements: Vec<Entitlement>,
}

impl Entitled {
    /// The caller as policies see it: its default SPIFFE ID and selectors.
    pub fn policy_workload(&self, caller: &Caller) -> crate::policy::Workload {
        crate::policy::Workload {
            spiffe_id: self.entitlements.first().map(|e| e.spiffe_id.to_string()),
            selectors: self
                .attestation
                .selectors
                .iter()
                .map(|s| s.to_string())
                .collect(),
            pid: caller.pid,
            uid: self.attestation.snapshot.uid,
        }
    }

    /// The caller as the audit trail records it.
    pub fn caller_facts(&self, caller: &Caller) -> CallerFacts {
        CallerFacts {
            spiffe_ids: self
                .entitlements
                .iter()
                .map(|e| e.spiffe_id.to_string())
                .collect(),
            pid: caller.pid,
            uid: self.attestation.snapshot.uid,
            selectors: self
                .attestation
                .selectors
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// The caller's entitlements that policy lets it receive now, in order,
/// each with the decision that allowed it; PermissionDenied with the
/// deciding policies when none is left. A denial is recorded in the audit
/// trail when `record_denial` says so for its entitlement.
async fn permitted(
    agent: &Agent,
    entitled: &Entitled,
    caller: &Caller,
    facts: &CallerFacts,
    record_denial: impl Fn(&Entitlement) -> bool,
    request: impl Fn(
        crate::policy::Workload,
        crate::policy::IdentityFacts,
    ) -> crate::policy::PolicyRequest,
) -> Result<Vec<(Entitlement, crate::policy::Decision)>, Status> {
    let mut allowed = Vec::with_capacity(entitled.entitlements.len());
    let mut last_denial = None;
    for entitlement in &entitled.entitlements {
        let request = request(
            entitled.policy_workload(caller),
            identity_facts(agent, entitlement),
        );
        let decision = agent
            .authorize(&request, Some(facts.clone()), record_denial(entitlement))
            .await;
        if decision.allowed {
            allowed.push((entitlement.clone(), decision));
        } else {
            last_denial = Some(decision.denial_message());
        }
    }
    if allowed.is_empty() {
        return Err(Status::permission_denied(
            last_denial.unwrap_or_else(|| "no identity issued".to_owned()),
        ));
    }
    Ok(allowed)
}

/// What an X.509-SVID stream asks policy about `identity` for `caller`.
fn x509_request(
    caller: crate::policy::Workload,
    identity: crate::policy::IdentityFacts,
) -> crate::policy::PolicyRequest {
    crate::policy::PolicyRequest::IssueX509Svid { caller, identity }
}

/// The identity about to be issued, as policies see it.
fn identity_facts(agent: &Agent, entitlement: &Entitlement) -> crate::policy::IdentityFacts {
    crate::policy::IdentityFacts {
        spiffe_id: entitlement.spiffe_id.to_string(),
        task: entitlement
            .task_id
            .as_deref()
            .and_then(|t| agent.active_task(t))
            .map(|t| crate::policy::TaskFacts::from(&*t)),
    }
}

/// Attests the caller and resolves what it may hold; no identity at all is
/// PermissionDenied, which clients treat as "retry with backoff". Refusals
/// are recorded in the audit trail (a caller that has simply exited is not:
/// that is how every stream ends).
/// `attested` is the caller's attestation when a stream knows it still
/// holds (see `Reuse::Attestation`); otherwise the caller is attested now.
async fn entitled(
    agent: &Agent,
    caller: &Caller,
    action: &str,
    attested: Option<&Attestation>,
) -> Result<Entitled, Status> {
    let attestation = match attested.cloned().map_or_else(|| agent.attest(caller), Ok) {
        Ok(a) => a,
        Err(e) => {
            if let Some(event) = Agent::attestation_failure_event(caller, action, &e) {
                agent.record_refusal(event).await;
            }
            return Err(agent_status(e));
        }
    };
    let entitled = Entitled {
        entitlements: agent.entitlements(caller, &attestation),
        attestation,
    };
    if entitled.entitlements.is_empty() {
        tracing::debug!(pid = caller.pid, selectors = ?entitled.attestation.selectors, "no identity for caller");
        agent
            .record_refusal(
                AuditEvent::new(EventKind::Denied, ulid::Ulid::new().to_string())
                    .caller(entitled.caller_facts(caller))
                    .decision(action, false, Vec::<String>::new())
                    .reason("no registration entry or task binding matches the caller"),
            )
            .await;
        return Err(Status::permission_denied("no identity issued"));
    }
    Ok(entitled)
}

/// What a stream last sent, to skip sending identical full states.
#[derive(PartialEq, Eq, Clone, Default)]
struct Fingerprint {
    serials: Vec<Vec<u8>>,
    bundle_sequence: u64,
    crl_generation: u64,
    /// Revisions of the federated bundles sent, in trust domain order.
    federated: Vec<u64>,
}

struct Snapshot<T> {
    message: T,
    fingerprint: Fingerprint,
    /// Cache keys of the identities in `message`, so the next snapshot can
    /// tell which identities the caller lost.
    keys: Vec<String>,
    /// The earliest moment something in `message` is due for rotation.
    refresh_at: Option<SystemTime>,
    /// The latest notBefore of the SVIDs in `message`: were the clock put
    /// back before it, they are not yet valid and are due at once.
    valid_from: Option<SystemTime>,
    /// How the caller was resolved for this snapshot, for the stream to
    /// reuse while no change concerns it.
    resolved: Arc<Resolved>,
}

/// The longest a stream waits for the CRL of a task it carried before it
/// sends the update without it anyway (the CRL then follows on its own).
const CRL_WAIT_LIMIT: Duration = Duration::from_millis(250);

/// How many bytes per second resending newer documents may take, summed
/// over every open stream. Each resend costs writ an encoding and a socket
/// write of the whole CRL and its client a read and a decode: at 256 MiB/s,
/// resends to 224 streams that held no task took over a quarter of writ's
/// CPU in the task-churn bench (`--idle-streams 224`, docs/benchmarks.md).
/// With a few streams or a small
/// CRL the hold stays a fraction of a millisecond, so one task at a time is
/// never held; `DOCUMENTS_HOLD_LIMIT` bounds how stale any stream's CRL gets.
const DOCUMENTS_RESEND_BUDGET: u64 = 64 << 20;
/// The longest a stream holds newer documents back, however costly resends
/// are: the same bound as a stream waiting for its task's CRL.
const DOCUMENTS_HOLD_LIMIT: Duration = CRL_WAIT_LIMIT;

/// How long after its last message a stream holds back one that only brings
/// newer documents (a CRL, federated bundles), so that resending them to
/// every stream stays within `DOCUMENTS_RESEND_BUDGET`. Each such message
/// carries the whole CRL, which under task churn is tens of KiB and is
/// re-signed every few milliseconds; every open stream used to resend it for
/// every publication, a third of all messages in the task-churn bench. With
/// a few streams or a small CRL the hold is a fraction of a millisecond.
fn documents_hold(open_streams: u64, documents_bytes: u64) -> Duration {
    let total = open_streams.saturating_mul(documents_bytes);
    let micros = total.saturating_mul(1_000_000) / DOCUMENTS_RESEND_BUDGET;
    Duration::from_micros(micros).min(DOCUMENTS_HOLD_LIMIT)
}

/// Spaces out a stream's messages that only bring newer documents
/// (`documents_hold`). A stream that sent a message less than the hold ago
/// waits out the rest of it, so a busy caller gets the new CRL with its own
/// next update and an idle one at once; nothing that concerns the caller's
/// identities waits, and what is finally sent is the newest state.
#[derive(Debug)]
struct DocumentsHold {
    last_sent: Instant,
    /// How long newer documents wait after `last_sent`, when any are
    /// waiting.
    waiting: Option<Duration>,
}

impl DocumentsHold {
    fn new(now: Instant) -> Self {
        Self {
            last_sent: now,
            waiting: None,
        }
    }

    fn message_sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// A snapshot is taken: it carries every document published so far.
    fn snapshot_taken(&mut self) {
        self.waiting = None;
    }

    /// Newer documents were published; `hold` is what resending them costs
    /// now (`documents_hold`).
    fn documents_changed(&mut self, hold: Duration) {
        self.waiting = Some(hold);
    }

    /// When the waiting documents are to be sent, if any are waiting.
    fn due(&self) -> Option<Instant> {
        self.waiting.map(|hold| self.last_sent + hold)
    }

    fn is_due(&self, now: Instant) -> bool {
        self.due().is_some_and(|due| now >= due)
    }
}

type SnapshotFuture<T> = futures::future::BoxFuture<'static, Result<Snapshot<T>, Status>>;

/// Takes a stream's next full state, reusing what the stream has judged
/// still current of how it last resolved the caller.
type SnapshotFn<T> = fn(Arc<Agent>, Arc<Caller>, Vec<String>, Reuse) -> SnapshotFuture<T>;

/// What a stream's next snapshot takes from the last resolution.
enum Reuse {
    /// Nothing: the caller is attested and resolved afresh.
    Nothing,
    /// The attestation, within its re-attest interval and with the caller
    /// still running the same executable. What the caller is entitled to
    /// may have changed (a task was bound to it or to an ancestor): that,
    /// and policy over it, are resolved again. A task bound to a process
    /// changes nothing attested, as its binding is by PID and start time.
    Attestation(Arc<Resolved>),
    /// Everything: nothing the caller may hold has changed.
    Resolution(Arc<Resolved>),
}

/// A caller as a stream last resolved it: attested, its entitlements, and
/// (for X.509-SVID streams) those policy let it hold. Reused for updates
/// that do not concern the caller, so that a change elsewhere (another
/// task, a new CRL) costs a stream a message, not an attestation.
pub struct Resolved {
    entitled: Entitled,
    permitted: Vec<Entitlement>,
    /// When the caller was attested; the re-attest interval runs from here.
    at: Instant,
}

impl Resolved {
    fn new(entitled: Entitled, permitted: Vec<Entitlement>, attested_at: Instant) -> Arc<Self> {
        Arc::new(Self {
            entitled,
            permitted,
            at: attested_at,
        })
    }

    /// The caller's attestation and when it was taken, if `reuse` keeps it.
    fn attestation_of(reuse: &Reuse) -> (Option<&Attestation>, Instant) {
        match reuse {
            Reuse::Attestation(r) | Reuse::Resolution(r) => (Some(&r.entitled.attestation), r.at),
            Reuse::Nothing => (None, Instant::now()),
        }
    }

    /// Whether a task bound to process (`pid`, `start_time`) may cover this
    /// caller. Errs towards yes: a yes only costs a fresh resolution.
    fn may_be_inside(&self, caller: &Caller, pid: i32, start_time: u64) -> bool {
        if let Some(known) = caller.may_descend_from(pid, start_time) {
            return known;
        }
        // Read all the way back, once for the connection's life.
        let me = &self.entitled.attestation.snapshot;
        match caller.ancestors_down_to(me.ppid, 0) {
            Ok(read) => read.contains(&(pid, start_time)),
            Err(_) => true,
        }
    }

    /// This resolution without the identities of tasks that have ended.
    /// A task ending only takes identities away, and what remains was
    /// judged for the same attested facts, so nothing is re-attested or
    /// re-evaluated: the resolution keeps its age, and the re-attest
    /// interval still bounds it.
    fn without_tasks(&self, ended: &[String]) -> Arc<Self> {
        let keep = |e: &Entitlement| e.task_id.as_ref().is_none_or(|id| !ended.contains(id));
        Arc::new(Self {
            entitled: Entitled {
                attestation: self.entitled.attestation.clone(),
                entitlements: self
                    .entitled
                    .entitlements
                    .iter()
                    .filter(|e| keep(e))
                    .cloned()
                    .collect(),
            },
            permitted: self.permitted.iter().filter(|e| keep(e)).cloned().collect(),
            at: self.at,
        })
    }

    /// This resolution without the identities (cache keys) in `refused`,
    /// which policy has just refused to renew. Nothing is re-attested: the
    /// caller is still entitled to them, and the next fresh resolution asks
    /// policy about them again.
    fn without_permits(&self, refused: &[String]) -> Arc<Self> {
        Arc::new(Self {
            entitled: Entitled {
                attestation: self.entitled.attestation.clone(),
                entitlements: self.entitled.entitlements.clone(),
            },
            permitted: self
                .permitted
                .iter()
                .filter(|e| !refused.contains(&e.cache_key))
                .cloned()
                .collect(),
            at: self.at,
        })
    }

    /// Whether the pending changes leave this resolution current for a
    /// stream that last sent the identities `keys`.
    fn still_current(
        &self,
        caller: &Caller,
        pending: &crate::changes::Pending,
        keys: &[String],
    ) -> bool {
        !pending.everything
            && !pending.cgroup_task_begun
            && !pending
                .tasks_ended
                .iter()
                .any(|t| keys.iter().any(|k| crate::agent::is_task_cache_key(k, t)))
            && !pending
                .processes_bound
                .iter()
                .any(|(pid, st)| self.may_be_inside(caller, *pid, *st))
    }

    /// Whether the pending changes leave the caller's attestation standing
    /// (within the re-attest interval, which the stream checks): none can
    /// change what the caller is, only what it is entitled to. A task bound
    /// to a cgroup can: the caller may have moved into it since it was
    /// attested, so its cgroup is read again. Anything else far-reaching
    /// (`Everything`: entries, policy, the CA, or a stream too far behind
    /// to know) re-attests too, as before.
    fn attestation_holds(&self, caller: &Caller, pending: &crate::changes::Pending) -> bool {
        !pending.everything && !pending.cgroup_task_begun && self.same_executable(caller)
    }

    /// The caller still runs the executable it was attested with. An exec
    /// changes what the caller is, so it forces a fresh attestation at once
    /// rather than at the next re-attest interval.
    fn same_executable(&self, caller: &Caller) -> bool {
        caller.runs_same_executable(&self.entitled.attestation.snapshot.exe_path)
    }
}

fn x509_svid_snapshot(
    agent: Arc<Agent>,
    caller: Arc<Caller>,
    previous_keys: Vec<String>,
    reuse: Reuse,
) -> SnapshotFuture<pb::X509svidResponse> {
    Box::pin(async move {
        // Denials are recorded on a stream's first response, and for an
        // identity the stream held until now (policy took it away: once,
        // as it is not held after), not on every refresh.
        let record_denial =
            |e: &Entitlement| previous_keys.is_empty() || previous_keys.contains(&e.cache_key);
        // With a fresh resolution, the decision that allowed each identity
        // (in `permitted` order); none when the last resolution is reused.
        let (mut resolved, decisions) = match reuse {
            Reuse::Resolution(resolved) => (resolved, Vec::new()),
            ref partial => {
                let (attested, attested_at) = Resolved::attestation_of(partial);
                let entitled = entitled(&agent, &caller, "IssueX509SVID", attested).await?;
                let facts = entitled.caller_facts(&caller);
                // Each identity is checked against policy for this caller.
                let allowed = permitted(
                    &agent,
                    &entitled,
                    &caller,
                    &facts,
                    record_denial,
                    x509_request,
                )
                .await?;
                let (permitted, decisions) = allowed.into_iter().unzip();
                (Resolved::new(entitled, permitted, attested_at), decisions)
            }
        };
        // Built only if an SVID is minted: most snapshots are served from
        // the cache, and the facts cost a string per selector.
        let issuance = std::sync::OnceLock::new();
        let issuance = || {
            issuance
                .get_or_init(|| Issuance::new(Some(resolved.entitled.caller_facts(&caller))))
                .clone()
        };
        let entitlements = &resolved.permitted;
        let now = SystemTime::now();
        let keys: Vec<String> = entitlements.iter().map(|e| e.cache_key.clone()).collect();
        // When a task among these ends, the identities sent beside it are
        // re-keyed (`Agent::unindex_task`): noted before its SVID is sent,
        // once per set (a resend of the same identities noted it already).
        if keys != previous_keys {
            let task_ids: Vec<&str> = entitlements
                .iter()
                .filter_map(|e| e.task_id.as_deref())
                .collect();
            agent.note_held_together(&task_ids, &keys);
        }
        let own = agent.own_bundle();
        let crls = agent.crls();
        let federated = crate::federation::bundles_for(&agent, entitlements);
        let mut svids = Vec::with_capacity(entitlements.len());
        let mut serials = Vec::with_capacity(entitlements.len());
        let mut refresh_at: Option<SystemTime> = None;
        let mut valid_from: Option<SystemTime> = None;
        let mut keys = keys;
        // Identities policy refused to renew, and why.
        let mut refused: Vec<String> = Vec::new();
        let mut last_denial = None;
        for (i, entitlement) in entitlements.iter().enumerate() {
            let minted = match agent.cached_svid(&entitlement.cache_key, now) {
                Some(cached) => Ok(cached),
                None => {
                    // A new SVID is minted only with policy's say-so at
                    // this moment: a rotation from a reused resolution asks
                    // again, so that a rule on the time (or on anything
                    // else that changed unseen) stops the next rotation.
                    // What is served from the cache was allowed when it was
                    // minted, and costs no evaluation.
                    let decision = match decisions.get(i) {
                        Some(decision) => decision.clone(),
                        None => {
                            let request = x509_request(
                                resolved.entitled.policy_workload(&caller),
                                identity_facts(&agent, entitlement),
                            );
                            let facts = issuance().caller;
                            let decision = agent
                                .authorize(&request, facts, record_denial(entitlement))
                                .await;
                            if !decision.allowed {
                                last_denial = Some(decision.denial_message());
                                refused.push(entitlement.cache_key.clone());
                                keys.retain(|k| k != &entitlement.cache_key);
                                continue;
                            }
                            decision
                        }
                    };
                    agent
                        .svid_for(entitlement, now, || issuance().allowed_by(decision))
                        .await
                }
            };
            let cached = match minted {
                Ok(cached) => cached,
                // The task ended between resolving and issuing: the full
                // state is simply the state without it, and the completion's
                // own notification brings the next update.
                Err(AgentError::TaskCompleted(_)) => {
                    keys.retain(|k| k != &entitlement.cache_key);
                    continue;
                }
                Err(e) => return Err(agent_status(e)),
            };
            refresh_at = Some(refresh_at.map_or(cached.rotate_at, |r| r.min(cached.rotate_at)));
            let not_before = cached.svid.not_before;
            valid_from = Some(valid_from.map_or(not_before, |v| v.max(not_before)));
            serials.push(cached.svid.serial.clone());
            svids.push(pb::X509svid {
                spiffe_id: entitlement.spiffe_id.to_string(),
                x509_svid: cached.svid.chain_der_concat(),
                x509_svid_key: cached.svid.private_key_pkcs8_der().to_vec(),
                bundle: own.x509_der.clone(),
                hint: entitlement.hint.clone(),
            });
        }
        if svids.is_empty() {
            // Every identity was a task that has just ended, or policy
            // refused to renew it.
            return Err(Status::permission_denied(
                last_denial.unwrap_or_else(|| "no identity issued".to_owned()),
            ));
        }
        // Reused until the caller is resolved afresh, the refused identities
        // are not asked about again at every update (nor their denials
        // recorded); a fresh resolution judges them anew.
        if !refused.is_empty() {
            resolved = resolved.without_permits(&refused);
        }
        Ok(Snapshot {
            message: pb::X509svidResponse {
                svids,
                crl: crls.ders.clone(),
                federated_bundles: crate::federation::x509_bundle_map(&federated),
            },
            fingerprint: Fingerprint {
                serials,
                bundle_sequence: own.bundle.sequence,
                crl_generation: crls.generation,
                federated: crate::federation::revisions(&federated),
            },
            keys,
            refresh_at,
            valid_from,
            resolved,
        })
    })
}

/// A bundle stream's caller: any identity at all entitles it; policy
/// decides issuance, not who may see public bundles.
async fn bundle_reader(
    agent: &Agent,
    caller: &Caller,
    action: &str,
    reuse: Reuse,
) -> Result<Arc<Resolved>, Status> {
    Ok(match reuse {
        Reuse::Resolution(resolved) => resolved,
        ref partial => {
            let (attested, attested_at) = Resolved::attestation_of(partial);
            let entitled = entitled(agent, caller, action, attested).await?;
            Resolved::new(entitled, Vec::new(), attested_at)
        }
    })
}

fn x509_bundles_snapshot(
    agent: Arc<Agent>,
    caller: Arc<Caller>,
    _previous: Vec<String>,
    reuse: Reuse,
) -> SnapshotFuture<pb::X509BundlesResponse> {
    Box::pin(async move {
        // Like SPIRE (without allow_unauthenticated_verifiers), bundles go
        // only to callers that hold an identity here.
        let resolved = bundle_reader(&agent, &caller, "FetchX509Bundles", reuse).await?;
        let entitlements = &resolved.entitled.entitlements;
        // Kept so that the end of a task this caller held re-resolves it: a
        // caller left with no identity loses the bundles too.
        let keys = entitlements.iter().map(|e| e.cache_key.clone()).collect();
        let own = agent.own_bundle();
        let crls = agent.crls();
        let federated = crate::federation::bundles_for(&agent, entitlements);
        let mut bundles = crate::federation::x509_bundle_map(&federated);
        bundles.insert(agent.trust_domain().id_string(), own.x509_der.clone());
        Ok(Snapshot {
            message: pb::X509BundlesResponse {
                crl: crls.ders.clone(),
                bundles,
            },
            fingerprint: Fingerprint {
                serials: Vec::new(),
                bundle_sequence: own.bundle.sequence,
                crl_generation: crls.generation,
                federated: crate::federation::revisions(&federated),
            },
            keys,
            refresh_at: None,
            valid_from: None,
            resolved,
        })
    })
}

/// The JWT bundle stream's full state: the JWKS of every trust domain.
/// JWT key rotation bumps the bundle sequence, so the sequence alone tells
/// whether anything changed.
fn jwt_bundles_snapshot(
    agent: Arc<Agent>,
    caller: Arc<Caller>,
    _previous: Vec<String>,
    reuse: Reuse,
) -> SnapshotFuture<pb::JwtBundlesResponse> {
    Box::pin(async move {
        // As for X.509 bundles: only callers holding an identity here, and
        // federated trust domains only where an identity federates with them.
        let resolved = bundle_reader(&agent, &caller, "FetchJWTBundles", reuse).await?;
        let keys = resolved
            .entitled
            .entitlements
            .iter()
            .map(|e| e.cache_key.clone())
            .collect();
        let federated = crate::federation::bundles_for(&agent, &resolved.entitled.entitlements);
        // The sequence is read before the keys: a rotation in between then
        // shows as a newer sequence next time, never as a missed update.
        let sequence = agent.own_bundle().bundle.sequence;
        let mut bundles = agent.jwt_bundles();
        bundles.extend(crate::federation::jwt_bundle_map(&federated));
        Ok(Snapshot {
            message: pb::JwtBundlesResponse { bundles },
            fingerprint: Fingerprint {
                serials: Vec::new(),
                bundle_sequence: sequence,
                crl_generation: 0,
                federated: crate::federation::revisions(&federated),
            },
            keys,
            refresh_at: None,
            valid_from: None,
            resolved,
        })
    })
}

/// How long until a stream's SVIDs are due for rotation, if it carries
/// any: at `refresh_at`, or at once when the clock has been put back before
/// `valid_from` (an SVID not yet valid is no use to its holder; the next
/// snapshot mints one valid now, see `Agent::cached_svid`).
fn rotation_wait(
    refresh_at: Option<SystemTime>,
    valid_from: Option<SystemTime>,
    now: SystemTime,
) -> Option<Duration> {
    let at = refresh_at?;
    if valid_from.is_some_and(|from| now < from) {
        return Some(Duration::ZERO);
    }
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// FetchJWTSVID's audience: at least one value, none empty.
fn check_jwt_audience(audience: &[String]) -> Result<(), Status> {
    if audience.is_empty() {
        return Err(Status::invalid_argument("audience is required"));
    }
    if audience.iter().any(String::is_empty) {
        return Err(Status::invalid_argument(
            "audience values must not be empty",
        ));
    }
    Ok(())
}

/// Drives one full-state stream: sends a snapshot at once, then again
/// whenever a change concerns it, an SVID comes due, or the re-attest
/// interval passes — but only if the state differs from what was last sent.
/// The caller is resolved again when a change may alter its identities:
/// from its last attestation when only its entitlements can have changed
/// (`Reuse::Attestation`), attested afresh otherwise, when it has exec'd,
/// and at least every re-attest interval. Changes that only touch what
/// travels beside the identities (a new CRL) reuse the last resolution.
/// Ends when the caller exits or hangs up, or loses every identity.
fn spawn_stream<T>(
    agent: Arc<Agent>,
    caller: Arc<Caller>,
    reattest: Duration,
    mut subscription: crate::changes::Subscription,
    first: Snapshot<T>,
    snapshot: SnapshotFn<T>,
    slot: crate::peer::UidSlot,
) -> StreamOf<T>
where
    T: Send + 'static,
{
    let (tx, rx) = mpsc::channel(2);
    let open = crate::telemetry::StreamGuard::open(agent.metrics());
    let mut stopping = agent.shutdown_requested();
    tokio::spawn(async move {
        // Counted open for as long as this task serves the stream.
        let _open = (open, slot);
        let mut last: Option<Fingerprint> = None;
        let mut keys: Vec<String> = Vec::new();
        let mut pending = Some(Ok(first));
        // What the next snapshot may reuse.
        let mut reuse = Reuse::Nothing;
        // The CRL publication a task this stream carried is waiting for.
        let mut crl_for_ended: Option<u64> = None;
        let mut documents = DocumentsHold::new(Instant::now());
        // Watched for the stream's whole life: registering a pidfd with the
        // reactor on every wake-up cost a dup, two epoll_ctl and a close
        // each time.
        let caller_exited = crate::peer::wait_for_exit(&caller.process);
        tokio::pin!(caller_exited);
        loop {
            let current = match pending.take() {
                // The stream was registered before `first` was taken, so a
                // change since then is still unseen and is read below.
                Some(first) => first,
                None => {
                    documents.snapshot_taken();
                    subscription.documents_taken();
                    let reuse = std::mem::replace(&mut reuse, Reuse::Nothing);
                    snapshot(agent.clone(), caller.clone(), keys.clone(), reuse).await
                }
            };
            let (resolved, refresh_at, valid_from) = match current {
                Ok(snap) => {
                    keys = snap.keys;
                    if last.as_ref() != Some(&snap.fingerprint) {
                        last = Some(snap.fingerprint);
                        if tx.send(Ok(snap.message)).await.is_err() {
                            return;
                        }
                        documents.message_sent(Instant::now());
                    }
                    (snap.resolved, snap.refresh_at, snap.valid_from)
                }
                Err(status) => {
                    if caller.process.has_exited() {
                        return;
                    }
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            // From here on, the end of a task among these wakes the stream;
            // one that ended before is in the log, which is read at once.
            subscription.hold(&keys);
            let mut read_log_anyway = true;
            // Wait for something that concerns this stream.
            loop {
                let reattest_due = resolved.at + reattest;
                let rotation_due = rotation_wait(refresh_at, valid_from, SystemTime::now())
                    .map(|until| Instant::now() + until);
                let wake_at = [rotation_due, documents.due()]
                    .into_iter()
                    .flatten()
                    .fold(reattest_due, Instant::min);
                if !read_log_anyway {
                    tokio::select! {
                        _ = subscription.woken() => {}
                        _ = tokio::time::sleep_until(wake_at.into()) => {}
                        _ = &mut caller_exited => {
                            tracing::debug!(pid = caller.pid, "caller exited; ending stream");
                            return;
                        }
                        _ = tx.closed() => return,
                        // Ending the stream (OK status) lets the client
                        // reconnect to the next writ instead of waiting on a
                        // dead one.
                        _ = stopping.wait_for(|s| *s) => return,
                    }
                }
                let unseen = subscription.catch_up(std::mem::take(&mut read_log_anyway));
                let now = Instant::now();
                if now >= reattest_due || !resolved.still_current(&caller, &unseen, &keys) {
                    if now < reattest_due && resolved.attestation_holds(&caller, &unseen) {
                        reuse = Reuse::Attestation(resolved.clone());
                    }
                    let ended: Vec<String> = unseen
                        .tasks_ended
                        .iter()
                        .filter(|t| keys.iter().any(|k| crate::agent::is_task_cache_key(k, t)))
                        .cloned()
                        .collect();
                    if !ended.is_empty() {
                        crl_for_ended = unseen.crl_for_ended;
                        // What was sent beside them is sent anew, re-keyed.
                        if let Some(sent) = &last {
                            agent.forget_svids_sent(&keys, &sent.serials);
                        }
                        // When identities only went away, they are dropped
                        // from the last resolution rather than the caller
                        // resolved again.
                        let rest = crate::changes::Pending {
                            tasks_ended: Vec::new(),
                            crl_for_ended: None,
                            ..unseen
                        };
                        // Ending a sub-task may give back its parent's
                        // identity (a process holds the deepest task of a
                        // lineage), so that is resolved afresh.
                        let may_give_back = resolved.entitled.entitlements.iter().any(|e| {
                            e.parent_task_id.is_some()
                                && e.task_id.as_ref().is_some_and(|id| ended.contains(id))
                        });
                        if !may_give_back
                            && matches!(reuse, Reuse::Attestation(_))
                            && resolved.still_current(&caller, &rest, &keys)
                        {
                            let remaining = resolved.without_tasks(&ended);
                            // A caller left with no identity is judged
                            // afresh from its attestation instead, so that
                            // every stream kind refuses it (bundle streams
                            // too) and the refusal is on the audit trail.
                            if !remaining.entitled.entitlements.is_empty() {
                                reuse = Reuse::Resolution(remaining);
                            }
                        }
                    }
                    break;
                }
                // Something is to be sent from the last resolution; a caller
                // that exec'd since is resolved afresh first. (A change with
                // nothing to send costs a stream nothing at all.)
                if unseen.documents {
                    let documents_bytes = agent.crls().bytes as u64;
                    let open_streams =
                        u64::try_from(agent.metrics().open_streams.get()).unwrap_or(0);
                    documents.documents_changed(documents_hold(open_streams, documents_bytes));
                }
                if documents.is_due(now) || rotation_due.is_some_and(|r| now >= r) {
                    if resolved.same_executable(&caller) {
                        reuse = Reuse::Resolution(resolved.clone());
                    }
                    break;
                }
            }
            // A task this stream carried has ended and the CRL revoking it is
            // being signed: wait for it (a fraction of a millisecond), so one
            // message drops the task, re-keys the rest and carries the CRL,
            // instead of a second message for the CRL alone.
            if let Some(epoch) = crl_for_ended.take() {
                let _ = tokio::time::timeout(CRL_WAIT_LIMIT, agent.crls_published(epoch)).await;
                // The snapshot below shows everything logged until now (the
                // CRL among it); a change meanwhile that concerns the caller
                // means it is resolved again rather than reused.
                let meanwhile = subscription.catch_up(false);
                reuse = match reuse {
                    Reuse::Resolution(r) if !r.still_current(&caller, &meanwhile, &keys) => {
                        if r.attestation_holds(&caller, &meanwhile) {
                            Reuse::Attestation(r)
                        } else {
                            Reuse::Nothing
                        }
                    }
                    Reuse::Attestation(r) if !r.attestation_holds(&caller, &meanwhile) => {
                        Reuse::Nothing
                    }
                    kept => kept,
                };
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = StreamOf<pb::X509svidResponse>;
    type FetchX509BundlesStream = StreamOf<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = StreamOf<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = StreamOf<pb::WitsvidResponse>;
    type FetchWITBundlesStream = StreamOf<pb::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = authenticate(&request)?;
        self.open_stream(caller, x509_svid_snapshot).await
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = authenticate(&request)?;
        self.open_stream(caller, x509_bundles_snapshot).await
    }

    /// One token per identity the caller holds (default first), or for the
    /// one `spiffe_id` names. The caller is attested exactly as for X.509.
    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let caller = authenticate(&request)?;
        let mut req = request.into_inner();
        check_jwt_audience(&req.audience)?;
        // A repeated value adds nothing to the token's `aud`: a request
        // with repeats gets the token of the request without them.
        let mut seen = std::collections::HashSet::new();
        req.audience.retain(|value| seen.insert(value.clone()));
        let wanted: Option<crate::spiffe_id::SpiffeId> = if req.spiffe_id.is_empty() {
            None
        } else {
            Some(req.spiffe_id.parse().map_err(|e| {
                Status::invalid_argument(format!(
                    "spiffe_id {:?}: {e}",
                    writ_attestors::excerpt(&req.spiffe_id)
                ))
            })?)
        };
        let entitled = entitled(&self.agent, &caller, "IssueJWTSVID", None).await?;
        let facts = entitled.caller_facts(&caller);
        let correlation_id = ulid::Ulid::new().to_string();
        let audience = req.audience.clone();
        let mut entitlements = permitted(
            &self.agent,
            &entitled,
            &caller,
            &facts,
            |_| true,
            |caller, identity| crate::policy::PolicyRequest::IssueJwtSvid {
                caller,
                identity,
                audience: audience.clone(),
            },
        )
        .await?;
        if let Some(wanted) = &wanted {
            entitlements.retain(|(e, _)| &e.spiffe_id == wanted);
            if entitlements.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity {wanted} issued to the caller"
                )));
            }
        }
        let now = SystemTime::now();
        let mut svids = Vec::with_capacity(entitlements.len());
        for (entitlement, decision) in &entitlements {
            let cache_key = crate::agent::JwtCacheKey {
                pid: caller.pid,
                start_time: caller.process.start_time(),
                identity: entitlement.cache_key.clone(),
                audience: req.audience.clone(),
            };
            if let Some(svid) = self.agent.cached_jwt_svid(&cache_key, now) {
                svids.push(pb::Jwtsvid {
                    spiffe_id: svid.spiffe_id.to_string(),
                    svid: svid.token,
                    hint: entitlement.hint.clone(),
                });
                continue;
            }
            let task = entitlement
                .task_id
                .as_deref()
                .and_then(|t| self.agent.task_facts_for(t));
            let issued_event = |plan: &crate::jwt::JwtSvidPlan, kind: EventKind| {
                let mut event = AuditEvent::new(kind, correlation_id.clone())
                    .caller(facts.clone())
                    .spiffe_id(entitlement.spiffe_id.to_string())
                    .jwt(plan.jti.clone(), unix_secs(plan.expires_at))
                    .detail("audience", req.audience.clone())
                    .detail("key_id", plan.key_id.clone());
                if let Some(task) = &task {
                    event = event.task(task.clone());
                }
                event
            };
            // On disk before the token leaves; no record, no token. It is
            // queued once the token's jti is fixed and synced while it is
            // signed.
            let mut planned = None;
            let minted = self
                .agent
                .jwt_svid_for(entitlement, &req.audience, now, |plan| {
                    planned = Some(plan.clone());
                    self.agent.start_record(
                        issued_event(plan, EventKind::JwtIssued)
                            .decision("IssueJWTSVID", true, decision.deciding_policies.clone())
                            .policy_errors(&decision.errors),
                    )
                });
            let (svid, recorded) = match minted {
                Ok(minted) => minted,
                Err(e) => {
                    if let Some(plan) = &planned {
                        self.agent
                            .record_best_effort(
                                issued_event(plan, EventKind::JwtWithdrawn).reason(e.to_string()),
                            )
                            .await;
                    }
                    return Err(match e {
                        // Audiences that would make an oversized token.
                        AgentError::Mint(crate::ca::CaError::InvalidJwtRequest(m)) => {
                            Status::invalid_argument(m)
                        }
                        other => agent_status(other),
                    });
                }
            };
            recorded.await.map_err(agent_status)?;
            tracing::debug!(pid = caller.pid, spiffe_id = %svid.spiffe_id, jti = %svid.jti, "JWT-SVID issued");
            svids.push(pb::Jwtsvid {
                spiffe_id: svid.spiffe_id.to_string(),
                svid: svid.token.clone(),
                hint: entitlement.hint.clone(),
            });
            self.agent.cache_jwt_svid(cache_key, svid, now);
        }
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let caller = authenticate(&request)?;
        self.open_stream(caller, jwt_bundles_snapshot).await
    }

    /// Any caller that attests (alive, selectors readable) may validate, as
    /// with SPIRE: validation reveals nothing a bundle does not, and a
    /// relying party need not hold an identity of its own. Every refusal of
    /// the token is InvalidArgument with the reason.
    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let caller = authenticate(&request)?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid is required"));
        }
        let attestation = self.agent.attest(&caller).map_err(agent_status)?;
        let entitlements = self.agent.entitlements(&caller, &attestation);
        let federated = crate::federation::bundles_for(&self.agent, &entitlements);
        match self
            .agent
            .validate_jwt_svid(&req.svid, &req.audience, &federated, SystemTime::now())
        {
            Ok(valid) => Ok(Response::new(pb::ValidateJwtsvidResponse {
                spiffe_id: valid.spiffe_id.to_string(),
                claims: Some(crate::jwt::claims_to_struct(&valid.claims)),
            })),
            Err(e) => {
                tracing::debug!(pid = caller.pid, reason = %e, "JWT-SVID refused");
                self.agent
                    .record_refusal(
                        AuditEvent::new(
                            EventKind::JwtValidationFailed,
                            ulid::Ulid::new().to_string(),
                        )
                        .caller(CallerFacts {
                            pid: caller.pid,
                            uid: caller.uid,
                            ..Default::default()
                        })
                        .decision("ValidateJWTSVID", false, Vec::<String>::new())
                        .reason(e.to_string())
                        // An excerpt: the caller chooses its length.
                        .detail(
                            "audience",
                            writ_attestors::excerpt(&req.audience).to_string(),
                        ),
                    )
                    .await;
                Err(Status::invalid_argument(format!("invalid JWT-SVID: {e}")))
            }
        }
    }

    async fn fetch_witsvid(
        &self,
        request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        authenticate(&request)?;
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        authenticate(&request)?;
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use writ_attestors::PinnedProcess;

    fn this_process() -> (Caller, writ_attestors::ProcessSnapshot) {
        let process = PinnedProcess::open(std::process::id() as i32).unwrap();
        let snapshot = writ_attestors::read_snapshot(&process).unwrap();
        let caller = Caller::new(process.pid(), snapshot.uid, snapshot.gid, Arc::new(process));
        (caller, snapshot)
    }

    fn resolution(snapshot: &writ_attestors::ProcessSnapshot) -> Arc<Resolved> {
        Resolved::new(
            Entitled {
                attestation: Attestation {
                    snapshot: snapshot.clone(),
                    selectors: Vec::new(),
                },
                entitlements: Vec::new(),
            },
            Vec::new(),
            Instant::now(),
        )
    }

    /// A stream asks, for every process a task is bound to, whether the task
    /// may cover its caller. The caller's lineage is read for the first
    /// question and kept on the connection: later resolutions answer from it
    /// instead of walking /proc again.
    #[test]
    fn a_callers_lineage_is_read_once_per_connection() {
        let (caller, snapshot) = this_process();
        let parent = PinnedProcess::open(snapshot.ppid).unwrap();
        let first = resolution(&snapshot);
        assert!(first.may_be_inside(&caller, parent.pid(), parent.start_time()));
        assert_eq!(
            caller.may_descend_from(parent.pid(), parent.start_time()),
            Some(true),
            "the lineage is kept"
        );
        // The same PID with another start time is a different process.
        assert!(!first.may_be_inside(&caller, parent.pid(), parent.start_time() + 1));
        // Itself, and nothing that started after it, needs no lineage.
        assert!(first.may_be_inside(&caller, snapshot.pid, snapshot.start_time));
        assert!(!first.may_be_inside(&caller, 1, snapshot.start_time + 1));

        // A fresh connection whose kept lineage says otherwise: a later
        // resolution answers from what the connection kept.
        let (other, _) = this_process();
        let stand_in = (i32::MAX, 1);
        other.know_ancestors(vec![stand_in]);
        let later = resolution(&snapshot);
        assert!(later.may_be_inside(&other, stand_in.0, stand_in.1));
        assert!(!later.may_be_inside(&other, parent.pid(), parent.start_time()));
    }

    #[test]
    fn newer_documents_wait_out_the_hold_after_a_message_and_no_longer() {
        let hold = Duration::from_millis(8);
        let start = Instant::now();
        let mut documents = DocumentsHold::new(start);
        assert_eq!(
            documents.due(),
            None,
            "nothing waits before documents change"
        );

        let soon = start + hold / 4;
        documents.documents_changed(hold);
        assert_eq!(documents.due(), Some(start + hold));
        assert!(!documents.is_due(soon), "a message went out a moment ago");
        assert!(documents.is_due(start + hold));

        // A message sent for another reason carries them: nothing waits.
        documents.snapshot_taken();
        documents.message_sent(soon);
        assert_eq!(documents.due(), None);

        // Long after the last message, newer documents go at once.
        let idle = soon + hold * 3;
        documents.documents_changed(hold);
        assert!(documents.is_due(idle));
    }

    #[test]
    fn the_hold_grows_with_what_a_resend_to_every_stream_costs() {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        // No CRL, or no one else to send it to: nothing to hold back for.
        assert_eq!(documents_hold(1_000, 0), Duration::ZERO);
        // A bound worker and a relying party, a 40 KiB CRL: about a
        // millisecond, far inside the 10 ms a completion may take to reach
        // every stream.
        let pair = ms(documents_hold(2, 40 << 10));
        assert!((1.0..1.5).contains(&pair), "{pair} ms");
        // 32 busy streams, a 100 KiB CRL: about 49 ms.
        let busy = ms(documents_hold(32, 100 << 10));
        assert!((48.5..49.0).contains(&busy), "{busy} ms");
        // Thousands of streams and a huge CRL: capped.
        assert_eq!(documents_hold(10_000, 1 << 20), DOCUMENTS_HOLD_LIMIT);
        assert_eq!(documents_hold(u64::MAX, u64::MAX), DOCUMENTS_HOLD_LIMIT);
    }

    /// After the clock is put back before an SVID's notBefore, the stream
    /// rotates it at once rather than at its (now far) rotation point.
    #[test]
    fn svids_not_yet_valid_are_due_at_once() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let refresh = Some(t0 + Duration::from_secs(1800));
        let from = Some(t0);
        assert_eq!(
            rotation_wait(refresh, from, t0 + Duration::from_secs(600)),
            Some(Duration::from_secs(1200))
        );
        assert_eq!(
            rotation_wait(refresh, from, t0 - Duration::from_secs(3 * 3600)),
            Some(Duration::ZERO)
        );
        assert_eq!(
            rotation_wait(refresh, from, t0 + Duration::from_secs(3600)),
            Some(Duration::ZERO)
        );
        assert_eq!(rotation_wait(None, None, t0), None);
    }
}
