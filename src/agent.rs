//! The state every API serves from: attestors, registration entries, active
//! task bindings, the CA, the current SVID per entitlement, the trust bundle
//! and CRLs, plus the change log that wakes each open stream when one of
//! them moves in a way that may concern it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rusqlite::params;
use serde_json::{Map, Value};
use tokio::sync::watch;
use writ_attestors::{AttestError, Attestation, AttestorSet};

use crate::audit::{AuditEvent, AuditLog, CallerFacts, CheckpointSigner, EventKind, TaskFacts};
use crate::bundle::TrustBundle;
use crate::ca::{CaError, CertificateAuthority};
use crate::changes::Change;
use crate::identity::{self, Entitlement, Registry};
use crate::jwt::{self, JwtError, JwtKeySet, JwtSvid, JwtSvidPlan, JwtSvidRequest, ValidatedJwt};
use crate::peer::Caller;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::{Store, StoreError};
use crate::svid::{X509Svid, X509SvidPlan, X509SvidRequest};
use crate::tasks::Task;

/// How long a CRL we sign stays valid (its nextUpdate). We re-sign on
/// every revocation, and at the latest `CRL_REFRESH` after the last one, so
/// a quiet node never serves a CRL past its nextUpdate (which relying
/// parties that check it would refuse) and drops the entries that expired.
const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);
const CRL_REFRESH: Duration = Duration::from_secs(12 * 3600);
/// How soon a CRL that failed to publish is tried again, so that a
/// revocation never waits for the next completion to reach the CRL.
const CRL_RETRY: Duration = Duration::from_secs(5);
/// How long a CA rotation waits for the CRLs of its new roots before it
/// publishes the new bundle regardless (see `rotate_ca`).
const CRL_AFTER_ROTATION_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("caller process {pid} is gone")]
    CallerGone { pid: i32 },
    #[error(
        "caller process {pid} connected as uid {} gid {} and now runs as uid {} gid {}; a connection is served only under the credentials it was opened with: connect again",
        connected.0, connected.1, now.0, now.1
    )]
    CredentialsChanged {
        pid: i32,
        connected: (u32, u32),
        now: (u32, u32),
    },
    #[error("attestation failed: {0}")]
    Attestation(AttestError),
    #[error("minting an SVID failed: {0}")]
    Mint(#[from] CaError),
    #[error("recording the issued SVID failed: {0}")]
    Store(#[from] StoreError),
    #[error("task {0} completed while its SVID was being issued")]
    TaskCompleted(String),
    #[error("the audit trail could not record the issuance: {0}")]
    Audit(String),
    #[error("the CRL publisher has stopped")]
    CrlPublisherStopped,
    #[error("publishing the CRL failed: {0}")]
    CrlPublishFailed(String),
}

/// Records the trail refused, waiting to be written.
#[derive(Default)]
struct Unrecorded {
    events: Vec<AuditEvent>,
    /// Refused while `MAX_UNRECORDED` were already waiting: lost.
    dropped: u64,
}

/// The most refused audit records kept waiting (a few MiB of memory).
const MAX_UNRECORDED: usize = 16_384;

/// The records a stop leaves out of the trail: those it still refused at
/// the last try, and those lost earlier for want of room to keep them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UnrecordedAtStop {
    /// How many of each kind were still waiting, by event name.
    pub kinds: std::collections::BTreeMap<&'static str, usize>,
    /// Refused while `MAX_UNRECORDED` were already waiting: their kinds
    /// were never kept.
    pub dropped: u64,
}

impl UnrecordedAtStop {
    fn of(unrecorded: &Unrecorded) -> Option<Self> {
        if unrecorded.events.is_empty() && unrecorded.dropped == 0 {
            return None;
        }
        let mut kinds = std::collections::BTreeMap::new();
        for event in &unrecorded.events {
            *kinds.entry(event.event.as_str()).or_insert(0) += 1;
        }
        Some(Self {
            kinds,
            dropped: unrecorded.dropped,
        })
    }

    /// Every record left out, kept or dropped.
    pub fn total(&self) -> u64 {
        self.kinds.values().map(|n| *n as u64).sum::<u64>() + self.dropped
    }

    /// The kinds as `task_ended=2, revoked=1`, for the log line.
    pub fn kinds_text(&self) -> String {
        self.kinds
            .iter()
            .map(|(kind, n)| format!("{kind}={n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What the next CRL is made from.
#[derive(Default)]
struct Revocations {
    list: crate::ca::RevocationList,
    next_crl_number: u64,
    /// The highest CRL number the store has reserved for this run.
    reserved_through: u64,
}

/// A CRL this large (DER bytes) is logged as a warning: every Workload API
/// message carries it, and gRPC clients refuse messages over 4 MiB unless
/// told otherwise (go-spiffe, py-spiffe and the `spiffe` crate all keep
/// that default), so a node whose CRL grows past it serves nobody.
const CRL_WARN_BYTES: usize = 1024 * 1024;

/// Whether a CRL of `bytes` is worth a warning, given the size last warned
/// about (0: none since the CRL was last small). Warns on crossing
/// `CRL_WARN_BYTES`, again each time the size doubles, and afresh once the
/// CRL has shrunk below half the threshold: a log line per doubling, not
/// per publication. Returns the new size warned about.
fn crl_size_warning(warned: usize, bytes: usize) -> (usize, bool) {
    if bytes < CRL_WARN_BYTES / 2 {
        (0, false)
    } else if bytes >= CRL_WARN_BYTES && (warned == 0 || bytes >= warned.saturating_mul(2)) {
        (bytes, true)
    } else {
        (warned, false)
    }
}

/// The least time between the starts of two CRL publications, as a
/// multiple of how long the last one took (so at most about a quarter of
/// one core goes to signing CRLs however large they grow).
const CRL_PACING: u32 = 4;

/// CRL numbers reserved per durable write.
const CRL_NUMBER_BLOCK: u64 = 100_000;

/// How far CRL publication has got, in request epochs.
#[derive(Debug, Clone, Default)]
pub struct CrlProgress {
    pub epoch: u64,
    pub failed_epoch: u64,
    pub last_error: String,
}

impl From<AttestError> for AgentError {
    fn from(e: AttestError) -> Self {
        match e {
            AttestError::ProcessGone { pid } => AgentError::CallerGone { pid },
            other => AgentError::Attestation(other),
        }
    }
}

/// An SVID as cached for an entitlement, with when to replace it.
#[derive(Debug)]
pub struct CachedSvid {
    pub svid: X509Svid,
    pub minted_at: SystemTime,
    /// Half-life plus jitter, so SVIDs minted together do not all come due
    /// in the same instant.
    pub rotate_at: SystemTime,
}

pub use crate::jwt_cache::JwtCacheKey;

/// The trust domain's own bundle, with its encodings computed once per change
/// rather than once per response.
pub struct OwnBundle {
    pub bundle: TrustBundle,
    pub x509_der: Vec<u8>,
    /// The JWKS FetchJWTBundles sends for our trust domain.
    pub jwt_jwks: Vec<u8>,
    /// Our JWT authorities, decoded for ValidateJWTSVID.
    pub jwt_keys: Arc<JwtKeySet>,
}

/// The CRLs we publish, with a generation that streams compare.
#[derive(Default)]
pub struct Crls {
    /// Shared by every message that carries them, never copied per stream.
    pub ders: Vec<bytes::Bytes>,
    pub generation: u64,
    /// Revocations they list, and their size in DER bytes.
    pub entries: usize,
    pub bytes: usize,
}

/// Why `TaskIndex::ancestors` found no whole chain.
enum BrokenChain {
    /// This ancestor is no longer active: the chain is completing
    /// (completion cascades downwards).
    Ended(String),
    /// Longer than `MAX_DELEGATION_CHAIN`.
    TooLong,
}

/// Active tasks, indexed the two ways a caller can fall inside a binding,
/// and by id. Every look-up a request makes costs the same with ten active
/// tasks as with ten thousand.
#[derive(Default)]
struct TaskIndex {
    by_id: HashMap<String, Arc<Task>>,
    by_pid: HashMap<i32, Vec<(Arc<Task>, u64)>>,
    /// The start times of the bound processes, each with how many tasks
    /// bind a process started then: the oldest bounds an ancestry walk.
    pid_bound_start_times: std::collections::BTreeMap<u64, usize>,
    by_cgroup: HashMap<String, Vec<Arc<Task>>>,
    /// For each active task, the other X.509 identities (cache keys) sent
    /// beside its SVID: a workload held them while it held the task's key,
    /// so they are re-keyed when the task ends.
    co_held: HashMap<String, std::collections::HashSet<String>>,
}

impl TaskIndex {
    /// The active tasks whose binding holds the attested process, the
    /// connection's `caller` (which keeps what is read of its ancestors);
    /// `cgroup_mount` is where cgroup paths are.
    fn tasks_for(
        &self,
        attestation: &Attestation,
        caller: &Caller,
        cgroup_mount: Option<&std::path::Path>,
    ) -> Vec<Arc<Task>> {
        let mut found: Vec<Arc<Task>> = Vec::new();
        let snapshot = &attestation.snapshot;
        if !self.by_cgroup.is_empty()
            && let Some(path) = &snapshot.cgroup_path
            && let Some(mount) = cgroup_mount
        {
            // The cgroup itself and each ancestor, on whole segments.
            let mut prefix = path.as_str();
            loop {
                if let Some(tasks) = self.by_cgroup.get(prefix) {
                    // Only if the cgroup at the path is still the one bound:
                    // one made again there (before the task's watcher has
                    // seen the first go) holds other processes.
                    let now = crate::cgroup::cgroup_id(&mount.join(prefix.trim_start_matches('/')));
                    found.extend(
                        tasks
                            .iter()
                            .filter(|t| match &t.binding {
                                crate::tasks::Binding::Cgroup { id: Some(id), .. } => {
                                    now == Some(*id)
                                }
                                _ => true,
                            })
                            .cloned(),
                    );
                }
                match prefix.rfind('/') {
                    Some(0) | None => break,
                    Some(i) => prefix = &prefix[..i],
                }
            }
        }
        if let Some(&oldest_bound) = self.pid_bound_start_times.keys().next() {
            // The caller itself, then its ancestors: a task bound to a process
            // covers its descendants. Start times guard every step against
            // PID reuse, and the walk stops at the first ancestor older than
            // every bound process (none above it can be one).
            let lineage = std::iter::once(Ok(vec![(snapshot.pid, snapshot.start_time)])).chain(
                std::iter::once_with(|| caller.ancestors_down_to(snapshot.ppid, oldest_bound)),
            );
            // An unreadable ancestry finds the tasks seen so far: "inside the
            // binding" must be proven, never assumed.
            for (pid, start) in lineage.map_while(Result::ok).flatten() {
                if let Some(tasks) = self.by_pid.get(&pid) {
                    found.extend(
                        tasks
                            .iter()
                            .filter(|(_, st)| *st == start)
                            .map(|(t, _)| t.clone()),
                    );
                }
            }
        }
        // A sub-task narrows its parent's scope: a process inside its binding
        // (a child of the parent's process, a cgroup below the parent's) is
        // also inside the parent's, and holding the parent's identity too
        // would let it act with the scope the sub-task was begun to narrow.
        let above_another: std::collections::HashSet<String> = found
            .iter()
            .flat_map(|task| self.ancestors_of(task))
            .collect();
        found.retain(|task| !above_another.contains(&task.id));
        // The most specific (deepest, then newest) task is the default.
        found.sort_by(|a, b| b.depth.cmp(&a.depth).then(b.created_at.cmp(&a.created_at)));
        found.dedup_by(|a, b| a.id == b.id);
        found
    }

    /// The IDs of the active tasks above `task`: its parent, the parent's
    /// parent, and so on (a sub-task ends with its parent, so each is
    /// active while `task` is).
    fn ancestors_of(&self, task: &Task) -> Vec<String> {
        let mut above = Vec::new();
        let mut next = task.parent_id.clone();
        // Bounded by the depth, should an index ever hold a cycle.
        while let Some(id) = next.take()
            && above.len() < task.depth as usize
        {
            next = self
                .by_id
                .get(&id)
                .and_then(|parent| parent.parent_id.clone());
            above.push(id);
        }
        above
    }

    /// An active task by ID. A scan: the index is keyed by binding, and the
    /// number of active tasks on one node stays small.
    fn by_id(&self, task_id: &str) -> Option<Arc<Task>> {
        self.by_id.get(task_id).cloned()
    }

    fn insert(&mut self, task: Arc<Task>) {
        self.co_held.entry(task.id.clone()).or_default();
        match &task.binding {
            crate::tasks::Binding::Pid { pid, start_time } => {
                self.by_pid
                    .entry(*pid)
                    .or_default()
                    .push((task.clone(), *start_time));
                *self.pid_bound_start_times.entry(*start_time).or_default() += 1;
            }
            crate::tasks::Binding::Cgroup { path, .. } => {
                self.by_cgroup
                    .entry(path.clone())
                    .or_default()
                    .push(task.clone());
            }
        }
        self.by_id.insert(task.id.clone(), task);
    }

    /// The active tasks above a task whose parent is `parent_id`, parent
    /// first.
    fn ancestors(&self, parent_id: Option<&str>) -> Result<Vec<Arc<Task>>, BrokenChain> {
        let mut ancestors: Vec<Arc<Task>> = Vec::new();
        let mut next = parent_id;
        while let Some(id) = next {
            // Task depth is bounded by config; this bound only guards the loop.
            if ancestors.len() >= MAX_DELEGATION_CHAIN {
                return Err(BrokenChain::TooLong);
            }
            let ancestor = self
                .by_id
                .get(id)
                .ok_or_else(|| BrokenChain::Ended(id.to_owned()))?;
            ancestors.push(ancestor.clone());
            next = ancestors.last().and_then(|a| a.parent_id.as_deref());
        }
        Ok(ancestors)
    }

    /// Forgets the task; returns the identities sent beside it.
    fn remove(&mut self, task_id: &str) -> std::collections::HashSet<String> {
        if let Some(task) = self.by_id.remove(task_id) {
            match &task.binding {
                crate::tasks::Binding::Pid { pid, start_time } => {
                    if let Some(bound) = self.by_pid.get_mut(pid) {
                        bound.retain(|(t, _)| t.id != task_id);
                        if bound.is_empty() {
                            self.by_pid.remove(pid);
                        }
                    }
                    if let Some(count) = self.pid_bound_start_times.get_mut(start_time) {
                        *count -= 1;
                        if *count == 0 {
                            self.pid_bound_start_times.remove(start_time);
                        }
                    }
                }
                crate::tasks::Binding::Cgroup { path, .. } => {
                    if let Some(bound) = self.by_cgroup.get_mut(path) {
                        bound.retain(|t| t.id != task_id);
                        if bound.is_empty() {
                            self.by_cgroup.remove(path);
                        }
                    }
                }
            }
        }
        self.co_held.remove(task_id).unwrap_or_default()
    }
}

pub struct Agent {
    policy: RwLock<crate::policy::PolicyEngine>,
    /// Warnings for policies that fail to evaluate, at most one per policy
    /// per `POLICY_FAILURE_WARNING_INTERVAL`.
    policy_failures: crate::policy::FailureWarnings,
    audit: std::sync::OnceLock<Arc<AuditLog>>,
    /// Records of work done that the trail refused (a full disk), kept to
    /// write once it takes them again (`retry_unrecorded`).
    unrecorded: Mutex<Unrecorded>,
    /// Each uid's budget of refusal records (`refusal_budget`).
    refusal_budget: Mutex<crate::refusal_budget::RefusalBudget>,
    validation_keys: RwLock<Option<(Vec<u64>, Arc<JwtKeySet>)>>,
    trust_domain: TrustDomain,
    /// SPIFFE IDs only the bundle endpoint presents (`federation::reserved_ids`).
    reserved_ids: Vec<SpiffeId>,
    attestors: AttestorSet,
    store: Arc<Store>,
    task_svid_ttl: Duration,
    tasks: RwLock<TaskIndex>,
    crls: RwLock<Arc<Crls>>,
    revocations: Mutex<Revocations>,
    crl_requested: watch::Sender<u64>,
    crl_published: watch::Sender<CrlProgress>,
    registry: RwLock<Arc<Registry>>,
    /// Held shared by a task being begun, from its check against the
    /// registration entries until it is active, and exclusively by a change
    /// of entries from its check against the active tasks until it is
    /// installed: so neither check misses what the other is adding.
    identity_claims: tokio::sync::RwLock<()>,
    ca: RwLock<CertificateAuthority>,
    /// The CA's active key for audit checkpoints, replaced when the CA
    /// rotates; see `CaCheckpointSigner`.
    checkpoint_key: Mutex<Option<crate::ca::CheckpointKey>>,
    svids: Mutex<HashMap<String, Arc<CachedSvid>>>,
    /// One mint at a time per identity: when an SVID many streams share is
    /// re-keyed, the first to ask mints and the others wait and take its
    /// SVID, instead of each minting (and recording) its own.
    minting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    jwt_svids: Mutex<crate::jwt_cache::JwtSvidCache>,
    own_bundle: RwLock<Arc<OwnBundle>>,
    /// Bundles of other trust domains; `federation::Federation` changes them.
    federated: crate::federation::FederatedBundles,
    changes: crate::changes::ChangeLog,
    /// How many cgroup-bound tasks have begun: a caller attested before the
    /// latest may since have been moved into its cgroup.
    cgroup_tasks_begun: std::sync::atomic::AtomicU64,
    metrics: Arc<crate::telemetry::Metrics>,
    /// Turns true once when writ begins to stop; open streams end on it.
    stopping: watch::Sender<bool>,
    /// What expired revocations and serials are forgotten by: a wall clock
    /// run ahead must not forget certificates still valid in truth.
    prune_clock: Mutex<crate::prune_clock::PruneClock>,
}

impl Agent {
    pub fn new(
        attestors: AttestorSet,
        registry: Registry,
        ca: CertificateAuthority,
        store: Arc<Store>,
        task_svid_ttl: Duration,
        bundle_sequence: u64,
        reserved_ids: Vec<SpiffeId>,
    ) -> Self {
        let trust_domain = ca.trust_domain().clone();
        let own_bundle = build_own_bundle(&ca, bundle_sequence);
        let checkpoint_key = Mutex::new(ca.checkpoint_key());
        Self {
            trust_domain,
            reserved_ids,
            validation_keys: RwLock::new(None),
            policy: RwLock::new(crate::policy::PolicyEngine::builtin_default()),
            policy_failures: crate::policy::FailureWarnings::new(POLICY_FAILURE_WARNING_INTERVAL),
            audit: std::sync::OnceLock::new(),
            unrecorded: Mutex::new(Unrecorded::default()),
            refusal_budget: Mutex::new(Default::default()),
            attestors,
            store,
            task_svid_ttl,
            tasks: RwLock::new(TaskIndex::default()),
            crls: RwLock::new(Arc::new(Crls::default())),
            revocations: Mutex::new(Revocations::default()),
            crl_requested: watch::channel(0).0,
            crl_published: watch::channel(CrlProgress::default()).0,
            identity_claims: tokio::sync::RwLock::new(()),
            registry: RwLock::new(Arc::new(registry)),
            ca: RwLock::new(ca),
            checkpoint_key,
            svids: Mutex::new(HashMap::new()),
            minting: Mutex::new(HashMap::new()),
            jwt_svids: Mutex::new(Default::default()),
            own_bundle: RwLock::new(Arc::new(own_bundle)),
            federated: Default::default(),
            changes: Default::default(),
            cgroup_tasks_begun: Default::default(),
            metrics: Arc::new(crate::telemetry::Metrics::new()),
            stopping: watch::channel(false).0,
            prune_clock: Mutex::new(crate::prune_clock::PruneClock::start()),
        }
    }

    /// The time by which certificates count as expired for forgetting them
    /// (their revocations, their serials): never ahead of the time really
    /// elapsed since start (`prune_clock`).
    pub fn pruning_now(&self) -> SystemTime {
        lock(&self.prune_clock).now()
    }

    /// Replaces the pruning clock, for tests that need the wall clock to
    /// have run ahead of it.
    #[cfg(test)]
    pub(crate) fn set_prune_clock(&self, clock: crate::prune_clock::PruneClock) {
        *lock(&self.prune_clock) = clock;
    }

    /// Asks every open Workload API stream to end, so a graceful server
    /// shutdown is not held up by streams that would otherwise never end.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    pub fn shutdown_requested(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// The agent's metrics; subsystems count what they do here.
    pub fn metrics(&self) -> &Arc<crate::telemetry::Metrics> {
        &self.metrics
    }

    /// When the CA certificate signing now expires.
    pub fn ca_not_after(&self) -> SystemTime {
        read_lock(&self.ca).active_not_after()
    }

    /// notBefore of the CA root currently signing.
    pub fn ca_not_before(&self) -> SystemTime {
        read_lock(&self.ca).active_not_before()
    }

    /// When the soonest-expiring cached X.509-SVID expires, if any is cached.
    pub fn earliest_svid_expiry(&self) -> Option<SystemTime> {
        lock(&self.svids).values().map(|c| c.svid.not_after).min()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Whether `id` is one no entry or task may hold: the bundle
    /// endpoint's (see `federation::reserved_ids`).
    pub fn is_reserved(&self, id: &SpiffeId) -> bool {
        self.reserved_ids.contains(id)
    }

    /// Attests the caller now: reads its selectors, then proves through the
    /// pidfd that they were read from the process that connected.
    pub fn attest(&self, caller: &Caller) -> Result<Attestation, AgentError> {
        let started = std::time::Instant::now();
        let attested = self.attestors.attest(&caller.process);
        self.metrics
            .attestation_seconds
            .observe(started.elapsed().as_secs_f64());
        let attestation = attested?;
        // The connection speaks for the credentials its process had when it
        // connected (the kernel's SO_PEERCRED), not for ones it took since:
        // a process that connects, hands the connection to a child, then
        // execs a setuid program would otherwise have that child served the
        // program owner's identities.
        let snapshot = &attestation.snapshot;
        if (snapshot.uid, snapshot.gid) != (caller.uid, caller.gid) {
            return Err(AgentError::CredentialsChanged {
                pid: caller.pid,
                connected: (caller.uid, caller.gid),
                now: (snapshot.uid, snapshot.gid),
            });
        }
        Ok(attestation)
    }

    /// `attest`, reusing the last attestation taken on the caller's
    /// connection while it holds, as an open stream does: taken less than
    /// `reattest` ago, with no cgroup-bound task begun since (the caller may
    /// have been moved into its cgroup), and the caller alive, running the
    /// executable it was attested with, and under the same credentials. An
    /// orchestrator calling the admin API on one connection is then fully
    /// attested once per interval instead of on every call.
    ///
    /// The executable and the credentials are read again on every call
    /// (its `exe` link and its `status`): a process can change its uid, gid
    /// or groups without an exec, and a connection is served only under the
    /// ones it connected with (`attest`), at once, as the Workload API
    /// refuses it, not once the interval has passed. A change makes this
    /// attest afresh, which refuses changed uid or gid and re-derives the
    /// selectors of changed groups. The one exception, `for_request`: a
    /// request read before a check of the caller began is covered by that
    /// check, since it was sent before then (`Caller::last_read`); calls
    /// multiplexed on one connection and read together share one check.
    /// A periodic check (an open WatchTasks stream) always reads.
    pub fn attest_reusing(
        &self,
        caller: &Caller,
        reattest: Duration,
        for_request: bool,
    ) -> Result<Arc<Attestation>, AgentError> {
        let cgroup_tasks_begun = self
            .cgroup_tasks_begun
            .load(std::sync::atomic::Ordering::SeqCst);
        let recent = lock(&caller.recent_attestation).clone();
        if let Some(recent) = recent
            && recent.at.elapsed() < reattest
            && recent.cgroup_tasks_begun == cgroup_tasks_begun
        {
            // A check that began after the connection's latest read began
            // after every request on it so far was sent: an exec or a
            // change of credentials before this request shows in it.
            if for_request && recent.checked_at >= caller.last_read() {
                return Ok(recent.attestation);
            }
            let checking_at = crate::peer::moment();
            // The executable is read first: `read_credentials` asks the
            // pidfd whether the process is alive after its own read, which
            // shows both reads were of this process.
            if caller.exe_is(&recent.attestation.snapshot.exe_path)
                && writ_attestors::read_credentials(&caller.process)
                    .is_ok_and(|now| now == recent.attestation.snapshot.credentials())
            {
                if let Some(kept) = lock(&caller.recent_attestation).as_mut()
                    && Arc::ptr_eq(&kept.attestation, &recent.attestation)
                {
                    kept.checked_at = kept.checked_at.max(checking_at);
                }
                return Ok(recent.attestation);
            }
        }
        let at = std::time::Instant::now();
        let checked_at = crate::peer::moment();
        let attestation = Arc::new(self.attest(caller)?);
        *lock(&caller.recent_attestation) = Some(crate::peer::RecentAttestation {
            attestation: attestation.clone(),
            at,
            cgroup_tasks_begun,
            checked_at,
        });
        Ok(attestation)
    }

    pub fn registry(&self) -> Arc<Registry> {
        read_lock(&self.registry).clone()
    }

    pub fn set_registry(&self, registry: Registry) {
        let registry = Arc::new(registry);
        *write_lock(&self.registry) = registry.clone();
        // SVIDs of entries that no longer exist must not be handed out again.
        {
            let live: std::collections::HashSet<&str> =
                registry.entries().iter().map(|e| e.id.as_str()).collect();
            let is_live = |cache_key: &str| {
                cache_key
                    .strip_prefix(crate::identity::ENTRY_CACHE_PREFIX)
                    .is_none_or(|id| live.contains(id))
            };
            lock(&self.svids).retain(|k, _| is_live(k));
            lock(&self.jwt_svids).retain(|k, _| is_live(&k.identity));
        }
        self.notify(Change::Everything);
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The policy set in force; a cheap handle, swapped whole on reload.
    pub fn policy(&self) -> crate::policy::PolicyEngine {
        read_lock(&self.policy).clone()
    }

    pub fn set_policy(&self, engine: crate::policy::PolicyEngine) {
        *write_lock(&self.policy) = engine;
        self.policy_failures.clear();
        // Streams cache what policy let their caller hold.
        self.notify(Change::Everything);
    }

    /// Evaluates `request` against the policy in force, with the ancestors
    /// of its tasks filled in from the task tree. A denial is counted and,
    /// when `record` is set, written to the audit trail with the deciding
    /// policy ids; the decision is returned either way. Policies that failed
    /// to evaluate are logged (see `FailureWarnings`) whatever the outcome:
    /// Cedar skips them, so an erroring forbid would otherwise fail open
    /// unseen.
    pub async fn authorize(
        &self,
        request: &crate::policy::PolicyRequest,
        audit_caller: Option<CallerFacts>,
        record: bool,
    ) -> crate::policy::Decision {
        let now = time::OffsetDateTime::now_utc();
        let decision = match self.with_task_ancestors(request) {
            Ok(None) => self.policy().evaluate(request, now),
            Ok(Some(completed)) => self.policy().evaluate(&completed, now),
            Err(why) => crate::policy::Decision::denied_with_error(why),
        };
        if !decision.failed_policies.is_empty() {
            for warning in self
                .policy_failures
                .due(&decision, std::time::Instant::now())
            {
                tracing::warn!(
                    policy = warning.policy,
                    error = warning.error,
                    action = request.action_name(),
                    allowed = decision.allowed,
                    unlogged_failures = warning.unlogged,
                    "a policy failed to evaluate and was skipped: it neither permitted nor forbade (logged at most once a minute per policy)"
                );
            }
        }
        if !decision.allowed {
            self.metrics().policy_denials.inc();
            if record {
                let mut event = AuditEvent::new(EventKind::Denied, ulid::Ulid::new().to_string())
                    .decision(
                        request.action_name(),
                        false,
                        decision.deciding_policies.clone(),
                    )
                    .reason(decision.denial_message())
                    .policy_errors(&decision.errors)
                    .spiffe_id(request.spiffe_id());
                if let Some(caller) = audit_caller {
                    event = event.caller(caller);
                }
                self.record_refusal(event).await;
            }
        }
        decision
    }

    /// `request` with the `ancestors` of each of its tasks filled in, when
    /// one has a parent and they are not given; `None` when it needs none
    /// (no clone, and no look-up, for top-level tasks and plain entries).
    /// A missing ancestor means the chain is completing (completion
    /// cascades downwards): such a request cannot be judged as a sub-task
    /// of its whole tree, so it is refused rather than judged without it.
    fn with_task_ancestors(
        &self,
        request: &crate::policy::PolicyRequest,
    ) -> Result<Option<crate::policy::PolicyRequest>, String> {
        let incomplete =
            |t: &crate::policy::TaskFacts| t.parent_id.is_some() && t.ancestors.is_empty();
        if !request.tasks().into_iter().flatten().any(incomplete) {
            return Ok(None);
        }
        let mut completed = request.clone();
        let index = read_lock(&self.tasks);
        for task in completed.tasks_mut().into_iter().flatten() {
            if incomplete(task) {
                task.ancestors = task_ancestors(&index, task)?;
            }
        }
        Ok(Some(completed))
    }

    pub fn set_audit(&self, log: Arc<AuditLog>) {
        let _ = self.audit.set(log);
    }

    pub fn audit_log(&self) -> Option<&Arc<AuditLog>> {
        self.audit.get()
    }

    /// Appends a record and returns once it is on disk. Issuance paths call
    /// this before the credential leaves writ and fail when it fails.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AgentError> {
        self.start_record(event).await
    }

    /// `record`, with the record queued before this returns, so the disk
    /// works on it while the caller goes on; await the result before the
    /// credential leaves writ.
    pub fn start_record(
        &self,
        event: AuditEvent,
    ) -> impl Future<Output = Result<(), AgentError>> + Send + use<'_> {
        self.start_record_group(std::slice::from_ref(&event))
    }

    /// `start_record` for records that stand or fall together, written
    /// with one write and made durable by one sync.
    pub fn start_record_group(
        &self,
        events: &[AuditEvent],
    ) -> impl Future<Output = Result<(), AgentError>> + Send + use<'_> {
        let started = std::time::Instant::now();
        let queued = self.audit.get().map(|log| log.start_append_group(events));
        async move {
            let Some(queued) = queued else {
                return Ok(());
            };
            let appended = match queued {
                Ok(on_disk) => on_disk.await,
                Err(e) => Err(e),
            };
            self.metrics
                .audit_write_seconds
                .observe(started.elapsed().as_secs_f64());
            appended.map_err(|e| AgentError::Audit(e.to_string()))
        }
    }

    /// For records whose failure must not change the outcome (denials,
    /// completions already persisted): logged loudly instead.
    pub async fn record_best_effort(&self, event: AuditEvent) {
        let recorded = self.start_record_group(std::slice::from_ref(&event)).await;
        if let Err(e) = recorded {
            tracing::error!(error = %e, event = %event.event, "the audit trail refused a record; kept to write once it can");
            self.keep_unrecorded([event]);
        }
    }

    /// For refusals a caller can cause at will (denied, not attested, its
    /// JWT-SVID rejected): written like `record_best_effort` while the
    /// caller's uid is within its budget, otherwise only counted, for
    /// `record_suppressed_refusals`.
    pub async fn record_refusal(&self, event: AuditEvent) {
        let uid = event.caller.as_ref().map(|c| c.uid);
        let admitted =
            lock(&self.refusal_budget).admit(uid, event.event.as_str(), std::time::Instant::now());
        if admitted {
            self.record_best_effort(event).await;
        } else {
            self.metrics.audit_refusals_suppressed.inc();
        }
    }

    /// The refusal record of `caller` turned away from `action` (a
    /// Workload API method, or `AdminAPI`), for `record_refusal`.
    pub fn refusal_event(
        kind: EventKind,
        caller: &Caller,
        selectors: Vec<String>,
        action: &str,
        reason: String,
    ) -> AuditEvent {
        AuditEvent::new(kind, ulid::Ulid::new().to_string())
            .caller(crate::audit::CallerFacts {
                spiffe_ids: Vec::new(),
                pid: caller.pid,
                uid: caller.uid,
                selectors,
            })
            .decision(action, false, Vec::<String>::new())
            .reason(reason)
    }

    /// The `attestation_failure` record for `caller`, or `None` when it
    /// has simply exited (how every connection of a finished process ends,
    /// nothing to record).
    pub fn attestation_failure_event(
        caller: &Caller,
        action: &str,
        error: &AgentError,
    ) -> Option<AuditEvent> {
        let gone = matches!(error, AgentError::CallerGone { .. }) && caller.process.has_exited();
        (!gone).then(|| {
            Self::refusal_event(
                EventKind::AttestationFailure,
                caller,
                Vec::new(),
                action,
                error.to_string(),
            )
        })
    }

    /// Writes one `refusals_suppressed` record per uid whose refusals went
    /// past its budget since the last call, with their counts by event
    /// kind. Called about once a second.
    pub async fn record_suppressed_refusals(&self) {
        let due = lock(&self.refusal_budget).sweep(std::time::Instant::now());
        for suppressed in due {
            let total = suppressed.total();
            tracing::warn!(
                uid = suppressed.uid,
                refusals = total,
                "a uid was refused more often than the audit trail records one by one (20 a second after a burst of 100); its refusals are counted in a refusals_suppressed record"
            );
            let mut event =
                AuditEvent::new(EventKind::RefusalsSuppressed, ulid::Ulid::new().to_string())
                    .detail("count", total)
                    .detail(
                        "by_event",
                        serde_json::Map::from_iter(
                            suppressed
                                .by_event
                                .iter()
                                .map(|(kind, n)| ((*kind).to_owned(), Value::from(*n))),
                        ),
                    );
            if let Some(uid) = suppressed.uid {
                event = event.caller(crate::audit::CallerFacts {
                    uid,
                    ..Default::default()
                });
            }
            self.record_best_effort(event).await;
        }
    }

    /// Keeps records the trail refused, marked with when they were refused,
    /// for `retry_unrecorded`. Past `MAX_UNRECORDED` they are counted, not
    /// kept.
    fn keep_unrecorded(&self, events: impl IntoIterator<Item = AuditEvent>) {
        let refused_at = unix_secs(SystemTime::now());
        let mut kept = lock(&self.unrecorded);
        for event in events {
            if kept.events.len() >= MAX_UNRECORDED {
                kept.dropped += 1;
                continue;
            }
            kept.events.push(
                event
                    .detail("recorded_late", true)
                    .detail("refused_at", refused_at),
            );
        }
    }

    /// Writes the records the trail refused earlier, in the order they
    /// came; those it refuses again are kept for the next try. Returns how
    /// many it wrote.
    pub async fn retry_unrecorded(&self) -> usize {
        let Some(log) = self.audit.get() else {
            return 0;
        };
        let events = std::mem::take(&mut lock(&self.unrecorded).events);
        if events.is_empty() {
            return 0;
        }
        let outcomes = log.append_all(&events).await;
        let tried = events.len();
        let mut refused: Vec<AuditEvent> = events
            .into_iter()
            .zip(outcomes)
            .filter_map(|(event, outcome)| outcome.is_err().then_some(event))
            .collect();
        let written = tried - refused.len();
        let mut kept = lock(&self.unrecorded);
        if written > 0 {
            tracing::warn!(
                written,
                "audit records the trail refused earlier are now in it (detail recorded_late)"
            );
            if kept.dropped > 0 {
                tracing::error!(
                    lost = kept.dropped,
                    "audit records refused while too many were waiting are lost"
                );
                kept.dropped = 0;
            }
        }
        refused.append(&mut kept.events);
        kept.events = refused;
        written
    }

    /// Once the trail has closed for good: takes the records it never took
    /// and says at ERROR how many, of which kinds, so that a stop does not
    /// discard them without a word (`writ audit verify` cannot tell: they
    /// never reached the chain).
    pub fn report_unrecorded_at_stop(&self) -> Option<UnrecordedAtStop> {
        let left = std::mem::take(&mut *lock(&self.unrecorded));
        let report = UnrecordedAtStop::of(&left)?;
        tracing::error!(
            records = report.total(),
            kinds = %report.kinds_text(),
            lost_earlier = report.dropped,
            "writ stopped with audit records the trail kept refusing (a full disk?); they are not in the trail"
        );
        Some(report)
    }

    /// `record_best_effort` for several records, written in order as one
    /// group: one wait for the disk instead of one per record.
    pub async fn record_all_best_effort(&self, events: Vec<AuditEvent>) {
        let Some(log) = self.audit.get() else {
            return;
        };
        let started = std::time::Instant::now();
        let outcomes = log.append_all(&events).await;
        self.metrics
            .audit_write_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut refused = Vec::new();
        for (event, outcome) in events.into_iter().zip(outcomes) {
            if let Err(e) = outcome {
                tracing::error!(error = %e, event = %event.event, "the audit trail refused a record; kept to write once it can");
                refused.push(event);
            }
        }
        self.keep_unrecorded(refused);
    }

    /// The task facts for an audit record, if the task is active.
    pub fn task_facts_for(&self, task_id: &str) -> Option<TaskFacts> {
        read_lock(&self.tasks)
            .by_id(task_id)
            .map(|t| task_facts(&t))
    }

    /// Every identity the attested caller is entitled to, default first:
    /// the tasks whose binding it is inside, then matching entries.
    pub fn entitlements(&self, caller: &Caller, attestation: &Attestation) -> Vec<Entitlement> {
        let tasks =
            read_lock(&self.tasks).tasks_for(attestation, caller, self.attestors.cgroup_mount());
        let registry = self.registry();
        let from_tasks = tasks.iter().map(|t| self.task_entitlement(t));
        let from_entries = registry
            .matching(&attestation.selectors)
            .map(|e| Entitlement::from_entry(e));
        identity::finalize(from_tasks.chain(from_entries))
    }

    pub(crate) fn task_entitlement(&self, task: &Task) -> Entitlement {
        Entitlement {
            cache_key: task_cache_key(&task.id),
            spiffe_id: task.spiffe_id.clone(),
            x509_svid_ttl: self.task_svid_ttl,
            dns_names: Vec::new(),
            hint: String::new(),
            federates_with: task.federates_with.clone(),
            not_after_cap: Some(task.expires_at),
            task_id: Some(task.id.clone()),
            parent_task_id: task.parent_id.clone(),
        }
    }

    pub fn index_task(&self, task: Arc<Task>) {
        write_lock(&self.tasks).insert(task);
    }

    /// Stops serving a task's identity, forgets its cached SVIDs and drops
    /// the cached SVIDs of the identities sent beside it, so that whoever
    /// asks next (any stream that holds them, not only the task's) gets a
    /// fresh key. Done here, before the completion asks for its CRL, so the
    /// streams the CRL wakes already find the new keys.
    pub fn unindex_task(&self, task_id: &str) {
        let co_held = write_lock(&self.tasks).remove(task_id);
        let key = task_cache_key(task_id);
        lock(&self.jwt_svids).retain(|k, _| k.identity != key);
        let ended_at = SystemTime::now();
        let mut svids = lock(&self.svids);
        svids.remove(&key);
        for held in &co_held {
            // One minted after the task ended was never beside it.
            if svids.get(held).is_some_and(|c| c.minted_at < ended_at) {
                svids.remove(held);
            }
        }
    }

    /// Drops the cached SVIDs that a stream sent beside a task that has
    /// ended, where they are still the ones it sent (`keys[i]` was sent
    /// with serial `serials[i]`). `unindex_task` re-keys them when the task
    /// ends, but an SVID whose mint was still being recorded then is cached
    /// after it, and would be sent again as it was; the stream that carried
    /// the task calls this before its next snapshot. Anything minted since
    /// has another serial and is kept.
    pub fn forget_svids_sent(&self, keys: &[String], serials: &[Vec<u8>]) {
        let mut svids = lock(&self.svids);
        for (key, serial) in keys.iter().zip(serials) {
            if svids.get(key).is_some_and(|c| &c.svid.serial == serial) {
                svids.remove(key);
            }
        }
    }

    /// Notes that the identities `keys` are being sent together: each task
    /// among them (`task_ids`) gains the others as identities held beside
    /// it. A task already ended is skipped; its SVID is not sent.
    pub fn note_held_together(&self, task_ids: &[&str], keys: &[String]) {
        if task_ids.is_empty() || keys.len() < 2 {
            return;
        }
        let mut index = write_lock(&self.tasks);
        for task_id in task_ids {
            let own = task_cache_key(task_id);
            if let Some(held) = index.co_held.get_mut(*task_id) {
                held.extend(keys.iter().filter(|k| **k != own).cloned());
            }
        }
    }

    /// The current SVID for an entitlement: the cached one while it is before
    /// its rotation point, else a freshly minted one (new key, new serial).
    /// A task SVID's serial is on disk before this returns, so a crash can
    /// never leave an issued task SVID out of a later revocation.
    /// `issuance` says whom a new SVID is for; it is only asked when one is
    /// minted (most calls are served from the cache).
    pub async fn svid_for(
        &self,
        entitlement: &Entitlement,
        now: SystemTime,
        issuance: impl FnOnce() -> Issuance,
    ) -> Result<Arc<CachedSvid>, AgentError> {
        if let Some(cached) = self.cached_svid(&entitlement.cache_key, now) {
            return Ok(cached);
        }
        let gate = lock(&self.minting)
            .entry(entitlement.cache_key.clone())
            .or_default()
            .clone();
        let minted = async {
            let _turn = gate.lock().await;
            // Whoever held the turn before may have minted it.
            if let Some(cached) = self.cached_svid(&entitlement.cache_key, now) {
                return Ok(cached);
            }
            self.mint_svid(entitlement, now, &issuance()).await
        }
        .await;
        let mut minting = lock(&self.minting);
        // Forgotten once nobody else holds or waits for this identity's turn.
        if minting
            .get(&entitlement.cache_key)
            .is_some_and(|g| Arc::ptr_eq(g, &gate) && Arc::strong_count(g) == 2)
        {
            minting.remove(&entitlement.cache_key);
        }
        minted
    }

    /// Whether an SVID for `cache_key` is cached, current or not.
    #[cfg(test)]
    pub(crate) fn holds_cached_svid(&self, cache_key: &str) -> bool {
        lock(&self.svids).contains_key(cache_key)
    }

    /// The cached SVID for `cache_key` while it is not yet due for rotation:
    /// what `svid_for` would hand out without minting. Not one whose
    /// notBefore is still to come (the clock was put back since it was
    /// minted): its holder would find it not yet valid, for as long as the
    /// clock had been ahead.
    pub(crate) fn cached_svid(&self, cache_key: &str, now: SystemTime) -> Option<Arc<CachedSvid>> {
        lock(&self.svids)
            .get(cache_key)
            .filter(|cached| cached.svid.not_before <= now && now < cached.rotate_at)
            .cloned()
    }

    /// Mints, records and caches a new SVID for `entitlement`; the caller
    /// holds its turn. Minting happens outside the cache lock: it costs a
    /// keygen and a signature, and other entitlements must not wait for it.
    async fn mint_svid(
        &self,
        entitlement: &Entitlement,
        now: SystemTime,
        issuance: &Issuance,
    ) -> Result<Arc<CachedSvid>, AgentError> {
        // A task no longer indexed is completing: a resolution made before
        // it ended may still name it, but minting now would only sign a key
        // that the store refuses and the trail withdraws.
        let task = match entitlement.task_id.as_deref() {
            None => None,
            Some(task_id) => Some(
                self.task_facts_for(task_id)
                    .ok_or_else(|| AgentError::TaskCompleted(task_id.to_owned()))?,
            ),
        };
        // A task in its last second gets no SVID rather than a refusal from
        // the CA (or one that lives a fraction of a second): the caller's
        // other identities are still served, and the task's own end follows
        // within the second.
        if let (Some(task_id), Some(cap)) = (&entitlement.task_id, entitlement.not_after_cap)
            && crate::ca::room_before(cap, now) < crate::ca::MIN_SVID_TTL
        {
            return Err(AgentError::TaskCompleted(task_id.clone()));
        }
        let request = Self::x509_request(entitlement);
        let issued_event = |plan: &X509SvidPlan, kind: EventKind| {
            let mut event = AuditEvent::new(kind, issuance.correlation_id.clone())
                .spiffe_id(entitlement.spiffe_id.to_string())
                .certificate(plan.serial_hex(), unix_secs(plan.not_after));
            if let Some(caller) = &issuance.caller {
                event = event.caller(caller.clone());
            }
            if let Some(task) = &task {
                event = event.task(task.clone());
            }
            event
        };
        // The issuance must be on disk in the audit trail (and, for a task,
        // its serial in the store) before anyone is handed the SVID; if it
        // cannot be recorded, it is not issued. Both writes are queued as
        // soon as the serial is chosen, so they reach the disk while the key
        // is generated and the certificate signed.
        let mut planned = None;
        let minted = {
            let ca = read_lock(&self.ca);
            ca.mint_x509_svid_with(&request, now, |plan| {
                planned = Some(plan.clone());
                let (policies, errors) = match &issuance.decision {
                    Some(d) => (d.deciding_policies.clone(), d.errors.as_slice()),
                    None => (Vec::new(), &[][..]),
                };
                let recorded = self.start_record(
                    issued_event(plan, EventKind::X509Issued)
                        .decision("IssueX509SVID", true, policies)
                        .policy_errors(errors),
                );
                let stored = entitlement
                    .task_id
                    .as_deref()
                    .map(|task_id| self.start_task_issuance(task_id, plan, &entitlement.spiffe_id));
                (recorded, stored)
            })
        };
        let (svid, (recorded, stored)) = match minted {
            Ok(minted) => minted,
            Err(e) => {
                // The record may already be on its way: say it came to nothing.
                if let Some(plan) = &planned {
                    self.record_best_effort(
                        issued_event(plan, EventKind::X509Withdrawn).reason(e.to_string()),
                    )
                    .await;
                }
                return Err(e.into());
            }
        };
        let (recorded, stored) = match stored {
            None => (recorded.await, Ok(())),
            // Different files: waiting for both costs one fsync, not two.
            Some(stored) => tokio::join!(recorded, stored),
        };
        recorded?;
        if let Err(e) = stored {
            if let Some(plan) = &planned {
                self.record_best_effort(
                    issued_event(plan, EventKind::X509Withdrawn).reason(e.to_string()),
                )
                .await;
            }
            return Err(e);
        }
        // Measured from now, not from the backdated notBefore, so short
        // lifetimes rotate at their real half-life.
        let minted = Arc::new(CachedSvid {
            rotate_at: rotation_point(now, svid.not_after, entitlement.not_after_cap),
            svid,
            minted_at: now,
        });
        self.metrics.svid_issued("x509");
        lock(&self.svids).insert(entitlement.cache_key.clone(), minted.clone());
        // A task that ended while this SVID was being recorded has cleared
        // its cache already (`unindex_task`), and nothing would clear this
        // insert. Its index entry goes before its cache is cleared, so a
        // check after the insert sees one or the other.
        if let Some(task_id) = entitlement.task_id.as_deref()
            && read_lock(&self.tasks).by_id(task_id).is_none()
        {
            let mut svids = lock(&self.svids);
            if svids
                .get(&entitlement.cache_key)
                .is_some_and(|cached| Arc::ptr_eq(cached, &minted))
            {
                svids.remove(&entitlement.cache_key);
            }
        }
        Ok(minted)
    }

    /// Queues the serial of a task SVID about to be signed into the store;
    /// the future fails when the task completed first.
    fn start_task_issuance(
        &self,
        task_id: &str,
        plan: &X509SvidPlan,
        spiffe_id: &crate::spiffe_id::SpiffeId,
    ) -> impl Future<Output = Result<(), AgentError>> + Send + use<> {
        let task_id = task_id.to_owned();
        let serial = plan.serial.clone();
        let issuer = plan.issuer_key_id.clone();
        let spiffe_id = spiffe_id.to_string();
        let not_after = unix_secs(plan.not_after);
        let issued_at = unix_secs(SystemTime::now());
        let tid = task_id.clone();
        let queued = self.store.start_write(move |conn| {
            // Completion revokes "every serial issued for the task" in a
            // transaction of its own; checking the task here, in the same
            // serialized writer, means a serial is either seen by that
            // revocation or refused here — never neither.
            if !crate::store::task_is_active(conn, &tid)? {
                return Ok(false);
            }
            insert_issued(
                conn, &serial, &tid, &issuer, &spiffe_id, not_after, issued_at,
            )?;
            Ok(true)
        });
        async move {
            if !queued?.await? {
                return Err(AgentError::TaskCompleted(task_id));
            }
            Ok(())
        }
    }

    /// Stores and records a task as it begins, minting its first X.509-SVID
    /// in the same breath, as an agent fetches SVIDs for its identities
    /// before workloads ask. `store_task` inserts the task's row; the
    /// serial goes into the same transaction after it (a refusal,
    /// `Ok(Err(_))`, stores neither), and `begun` and the issuance share one
    /// audit write. Beginning a task so costs one commit and one sync, and
    /// the bound process's first fetch finds its SVID ready instead of
    /// waiting for another commit and sync. The issuance record names the
    /// orchestrator as caller and the BeginTask decision; policy still
    /// decides, on every fetch, whether a process may have the SVID.
    ///
    /// When the CA cannot mint for the task (its TTL is under a second, or
    /// no CA is active) the task still begins, without a ready SVID: a
    /// fetch then mints, and fails, exactly as it would have.
    pub async fn begin_task_with_svid<E: Send + 'static>(
        &self,
        task: &Task,
        begun: AuditEvent,
        now: SystemTime,
        store_task: impl FnOnce(&rusqlite::Connection) -> Result<Result<(), E>, StoreError>
        + Send
        + 'static,
    ) -> TaskBeginning<E> {
        let entitlement = self.task_entitlement(task);
        let issued_event = |plan: &X509SvidPlan, kind: EventKind| {
            let mut event = AuditEvent::new(kind, begun.correlation_id.clone())
                .spiffe_id(entitlement.spiffe_id.to_string())
                .certificate(plan.serial_hex(), unix_secs(plan.not_after))
                .task(task_facts(task));
            event.caller = begun.caller.clone();
            event.action = begun.action.clone();
            event.decision = begun.decision.clone();
            event.policies = begun.policies.clone();
            if let Some(errors) = begun.detail.get("errors") {
                event.detail.insert("errors".to_owned(), errors.clone());
            }
            event
        };
        let mut store_task = Some(store_task);
        let mut planned = None;
        let mut queued = None;
        // A sub-task begun in its parent's last second could only have a
        // certificate shorter than a second: the CA refuses it (before the
        // hook runs), and the task begins without one.
        let minted = {
            let ca = read_lock(&self.ca);
            ca.mint_x509_svid_with(&Self::x509_request(&entitlement), now, |plan| {
                planned = Some(plan.clone());
                let recorded = self.start_record_group(&[
                    begun.clone(),
                    issued_event(plan, EventKind::X509Issued),
                ]);
                let (serial, issuer) = (plan.serial.clone(), plan.issuer_key_id.clone());
                let (task_id, spiffe_id) = (task.id.clone(), entitlement.spiffe_id.to_string());
                let not_after = unix_secs(plan.not_after);
                let issued_at = unix_secs(now);
                let store_task = store_task.take();
                let stored = self.store.start_write(move |conn| {
                    if let Some(store_task) = store_task
                        && let Err(refused) = store_task(conn)?
                    {
                        return Ok(Err(refused));
                    }
                    insert_issued(
                        conn, &serial, &task_id, &issuer, &spiffe_id, not_after, issued_at,
                    )?;
                    Ok(Ok(()))
                });
                queued = Some((stored, recorded));
            })
        };
        let (stored, recorded) = match (queued, store_task.take()) {
            (Some((stored, recorded)), _) => {
                tokio::join!(
                    async move {
                        match stored {
                            Ok(committed) => committed.await,
                            Err(e) => Err(e),
                        }
                    },
                    recorded
                )
            }
            // The CA refused before choosing a serial (a TTL under a second,
            // no active CA): nothing was queued, so the task begins without
            // a ready SVID and a fetch mints, and fails, as it always did.
            (None, Some(store_task)) => {
                tokio::join!(
                    async move {
                        match self.store.start_write(store_task) {
                            Ok(committed) => committed.await,
                            Err(e) => Err(e),
                        }
                    },
                    self.start_record(begun.clone())
                )
            }
            (None, None) => (Err(StoreError::Closed), Ok(())),
        };
        let mut outcome = Self::beginning_outcome(stored, recorded);
        match (minted, &planned) {
            (Ok((svid, ())), Some(plan)) if matches!(outcome, TaskBeginning::Begun { .. }) => {
                outcome = TaskBeginning::Begun {
                    first_serial: Some(plan.serial_hex()),
                };
                let cached = Arc::new(CachedSvid {
                    rotate_at: rotation_point(now, svid.not_after, entitlement.not_after_cap),
                    svid,
                    minted_at: now,
                });
                self.metrics.svid_issued("x509");
                lock(&self.svids).insert(entitlement.cache_key.clone(), cached);
            }
            (minted, Some(plan)) => {
                // The serial was recorded (or was on its way) but no SVID
                // will be handed out: say so in the trail.
                let reason = match minted {
                    Err(e) => e.to_string(),
                    Ok(_) => "the task did not begin".to_owned(),
                };
                self.record_best_effort(
                    issued_event(plan, EventKind::X509Withdrawn).reason(reason),
                )
                .await;
            }
            (Err(e), None) => {
                tracing::debug!(error = %e, task = %task.id, "the task's first SVID waits for its first fetch");
            }
            // Minted means the hook ran and planned it.
            (Ok(_), None) => {}
        }
        outcome
    }

    fn beginning_outcome<E>(
        stored: Result<Result<(), E>, StoreError>,
        recorded: Result<(), AgentError>,
    ) -> TaskBeginning<E> {
        match (stored, recorded) {
            (Err(e), _) => TaskBeginning::StoreFailed(e),
            (Ok(Err(refused)), _) => TaskBeginning::Refused(refused),
            (Ok(Ok(())), Err(e)) => TaskBeginning::AuditFailed(e.to_string()),
            (Ok(Ok(())), Ok(())) => TaskBeginning::Begun { first_serial: None },
        }
    }

    /// The longest a JWT-SVID minted now lives.
    pub fn jwt_svid_ttl(&self) -> Duration {
        read_lock(&self.ca).jwt_svid_ttl()
    }

    pub fn crls(&self) -> Arc<Crls> {
        read_lock(&self.crls).clone()
    }

    /// Publishes a CRL that includes every revocation stored before this
    /// call, and returns once it is live. Concurrent callers share one
    /// signing: the publisher takes everything requested so far in one pass,
    /// like a group commit.
    pub async fn publish_crls(&self) -> Result<(), AgentError> {
        let wanted = self.request_crls();
        self.crls_published(wanted).await
    }

    /// Asks for a CRL that includes every revocation stored before this
    /// call; `crls_published` with the returned epoch waits for it.
    pub fn request_crls(&self) -> u64 {
        let mut wanted = 0;
        self.crl_requested.send_modify(|epoch| {
            *epoch += 1;
            wanted = *epoch;
        });
        wanted
    }

    /// Waits until the CRL asked for as `wanted` (or a later one) is live.
    pub async fn crls_published(&self, wanted: u64) -> Result<(), AgentError> {
        let mut published = self.crl_published.subscribe();
        published
            .wait_for(|p| p.epoch >= wanted || p.failed_epoch >= wanted)
            .await
            .map_err(|_| AgentError::CrlPublisherStopped)?;
        let outcome = published.borrow().clone();
        if outcome.epoch >= wanted {
            Ok(())
        } else {
            Err(AgentError::CrlPublishFailed(outcome.last_error))
        }
    }

    /// The publisher: waits for requests, signs once per batch of them;
    /// re-signs `CRL_REFRESH` (by the wall clock) after the last CRL, and
    /// `CRL_RETRY` after a failure.
    pub async fn run_crl_publisher(self: Arc<Self>) {
        self.publish_crls_until_stopped(CRL_REFRESH, CRL_RETRY)
            .await;
    }

    async fn publish_crls_until_stopped(self: Arc<Self>, refresh: Duration, retry: Duration) {
        let mut requested = self.crl_requested.subscribe();
        let mut not_before = std::time::Instant::now();
        // In wall time, like the nextUpdate it guards: a jump or a resume
        // from suspend must not leave an expired CRL served for hours.
        let mut again_at = SystemTime::now() + refresh;
        // The CRL size last warned about (`crl_size_warning`).
        let mut size_warned = 0;
        loop {
            let target = *requested.borrow_and_update();
            let done = self
                .crl_published
                .borrow()
                .epoch
                .max(self.crl_published.borrow().failed_epoch);
            if target > done {
                // Completions arriving back to back are published together:
                // after a CRL took t to make, the next starts no sooner than
                // CRL_PACING × t after it, so a CRL that has grown large
                // cannot take over a core. A lone completion goes at once.
                tokio::time::sleep_until(not_before.into()).await;
                let target = *requested.borrow_and_update();
                let started = std::time::Instant::now();
                let outcome = self.refresh_crls().await;
                not_before = started + started.elapsed() * CRL_PACING;
                match outcome {
                    Ok(()) => {
                        self.crl_published.send_modify(|p| p.epoch = target);
                        again_at = SystemTime::now() + refresh;
                        let crls = self.crls();
                        let warn;
                        (size_warned, warn) = crl_size_warning(size_warned, crls.bytes);
                        if warn {
                            tracing::warn!(
                                crl_bytes = crls.bytes,
                                crl_entries = crls.entries,
                                "the CRL that every Workload API message carries is {} KiB; gRPC clients refuse messages over 4 MiB by default. Revoked certificates stay listed until they expire: a shorter [tasks] x509_svid_ttl (or shorter tasks) keeps the list short",
                                crls.bytes / 1024
                            );
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "publishing a new CRL failed; retrying in {retry:?}");
                        self.crl_published.send_modify(|p| {
                            p.failed_epoch = target;
                            p.last_error = e.to_string();
                        });
                        again_at = SystemTime::now() + retry;
                    }
                }
                continue;
            }
            tokio::select! {
                changed = requested.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                // Also early when the wall clock steps back, which leaves
                // the CRL's thisUpdate in the future: re-signing fixes it.
                _ = crate::wall_clock::sleep_until(again_at) => {
                    self.request_crls();
                }
            }
        }
    }

    /// Loads every stored revocation whose certificate has not expired and
    /// reserves the first block of CRL numbers. Called once at start, before
    /// anything can complete a task; from then on completions add their
    /// revocations here as they commit them (`add_revocations`).
    pub async fn load_revocations(&self) -> Result<(), AgentError> {
        let now_secs = unix_secs(self.pruning_now());
        let (rows, last_reserved) = self
            .store
            .write(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT serial, issuer_key_id, revoked_at, not_after FROM revocations WHERE not_after > ?1",
                )?;
                let rows = stmt
                    .query_map(params![now_secs], |r| {
                        Ok((
                            crate::ca::RevokedCert {
                                serial: r.get(0)?,
                                issuer_key_id: r.get(1)?,
                                revoked_at: UNIX_EPOCH
                                    + Duration::from_secs(r.get::<_, i64>(2)?.max(0) as u64),
                            },
                            r.get::<_, i64>(3)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((rows, crate::store::read_counter(conn, "crl_number")?))
            })
            .await?;
        let mut list = crate::ca::RevocationList::default();
        for (cert, not_after) in &rows {
            list.add(cert, *not_after)?;
        }
        let mut state = lock(&self.revocations);
        state.list = list;
        // Numbers up to the stored value may have been used before a crash.
        state.next_crl_number = last_reserved + 1;
        state.reserved_through = last_reserved;
        Ok(())
    }

    /// Revocations just committed to the store, for the next CRL: each
    /// certificate with its `not_after` (unix seconds).
    pub fn add_revocations<'a>(
        &self,
        added: impl IntoIterator<Item = &'a (crate::ca::RevokedCert, i64)>,
    ) {
        let mut state = lock(&self.revocations);
        for (cert, not_after) in added {
            if let Err(e) = state.list.add(cert, *not_after) {
                // Stored, so the next start lists it; say why this run can't.
                tracing::error!(error = %e, "a revocation cannot be encoded for the CRL");
            }
        }
    }

    /// The next CRL number. Numbers are reserved in durable blocks, so a
    /// CRL costs no write of its own while the number still only grows
    /// across restarts (RFC 5280 asks for an increasing number, not for
    /// consecutive ones).
    async fn next_crl_number(&self) -> Result<u64, AgentError> {
        let (number, reserve_through) = {
            let mut state = lock(&self.revocations);
            let number = state.next_crl_number;
            state.next_crl_number += 1;
            (
                number,
                (number > state.reserved_through).then_some(number + CRL_NUMBER_BLOCK - 1),
            )
        };
        if let Some(through) = reserve_through {
            self.store
                .write(move |conn| crate::store::raise_counter(conn, "crl_number", through))
                .await?;
            let mut state = lock(&self.revocations);
            state.reserved_through = state.reserved_through.max(through);
        }
        Ok(number)
    }

    /// Re-signs the CRLs from every revocation whose certificate has not
    /// yet expired, with a CRL number that only grows, and wakes streams.
    pub async fn refresh_crls(&self) -> Result<(), AgentError> {
        let crl_number = self.next_crl_number().await?;
        let now = SystemTime::now();
        let (ders, entries) = {
            let ca = read_lock(&self.ca);
            let (prepared, entries) = {
                let mut state = lock(&self.revocations);
                // Forgotten only once expired by the time really elapsed:
                // entries kept past a wall clock run ahead cost the CRL no
                // more than it carried before the jump, and the certificates
                // are valid again once the clock is put right.
                state.list.remove_expired(unix_secs(self.pruning_now()));
                let prepared = ca.prepare_crls(&state.list, crl_number, CRL_VALIDITY, now)?;
                (prepared, state.list.len())
            };
            (ca.finish_crls(prepared)?, entries)
        };
        let bytes = ders.iter().map(bytes::Bytes::len).sum();
        {
            let mut crls = write_lock(&self.crls);
            let generation = crls.generation + 1;
            *crls = Arc::new(Crls {
                ders,
                generation,
                entries,
                bytes,
            });
        }
        self.notify(Change::Documents);
        Ok(())
    }

    fn x509_request(entitlement: &Entitlement) -> X509SvidRequest {
        X509SvidRequest {
            spiffe_id: entitlement.spiffe_id.clone(),
            ttl: entitlement.x509_svid_ttl,
            ends_by: entitlement.not_after_cap,
            dns_names: entitlement.dns_names.clone(),
        }
    }

    pub fn own_bundle(&self) -> Arc<OwnBundle> {
        read_lock(&self.own_bundle).clone()
    }

    pub fn federated_bundles(&self) -> &crate::federation::FederatedBundles {
        &self.federated
    }

    /// A receiver that sees a new value whenever anything a stream shows may
    /// have changed.
    #[cfg(test)]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn changes(&self) -> &crate::changes::ChangeLog {
        &self.changes
    }

    pub fn notify(&self, change: Change) {
        if change == Change::TaskBegunForCgroup {
            // Before the change is logged: whoever sees it also sees this.
            self.cgroup_tasks_begun
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.changes.push(change);
    }

    /// An active task whose SPIFFE ID is `spiffe_id` or an ancestor of it
    /// (by whole path segments), as its id and SPIFFE ID: the one holding
    /// `spiffe_id` itself if there is one, else the nearest above it. For
    /// the rare admin call that asks (an entry being created or reloaded);
    /// it looks at every active task. An identity below a task's looks
    /// like part of the task to relying parties, yet an entry holding it
    /// would be neither scoped by the task nor ended with it.
    pub fn active_task_at_or_above(
        &self,
        spiffe_id: &crate::spiffe_id::SpiffeId,
    ) -> Option<(String, crate::spiffe_id::SpiffeId)> {
        read_lock(&self.tasks)
            .by_id
            .values()
            .filter(|t| spiffe_id.is_at_or_below(&t.spiffe_id))
            .max_by_key(|t| t.spiffe_id.path().len())
            .map(|t| (t.id.clone(), t.spiffe_id.clone()))
    }

    /// See the field: a task claims an identity under the shared lock, a
    /// change of entries under the exclusive one.
    pub fn identity_claims(&self) -> &tokio::sync::RwLock<()> {
        &self.identity_claims
    }

    /// An active task by ID (None once it has completed).
    pub fn active_task(&self, task_id: &str) -> Option<Arc<Task>> {
        read_lock(&self.tasks).by_id(task_id)
    }

    /// Mints a JWT-SVID for an entitlement the caller was just found to hold
    /// (a fresh token with its own `jti`; `cached_jwt_svid` decides reuse).
    /// A task identity's token carries the `task` claim and, for a sub-task,
    /// the `act` chain of its delegators, and never outlives the task.
    /// `before_signing` is called once the token's `jti` and lifetime are
    /// fixed, before it is signed (see `mint_jwt_svid_with`).
    pub fn jwt_svid_for<T>(
        &self,
        entitlement: &Entitlement,
        audience: &[String],
        now: SystemTime,
        before_signing: impl FnOnce(&JwtSvidPlan) -> T,
    ) -> Result<(JwtSvid, T), AgentError> {
        let mut extra_claims = Map::new();
        if let Some(task_id) = &entitlement.task_id {
            // The task index is read (and released) before the CA lock is
            // taken, so this path never holds both.
            let index = read_lock(&self.tasks);
            let task = index
                .by_id(task_id)
                .ok_or_else(|| AgentError::TaskCompleted(task_id.clone()))?;
            extra_claims.insert("task".into(), task_claim(&task));
            if let Some(act) = delegation_chain(&index, &task)? {
                extra_claims.insert("act".into(), act);
            }
        }
        let ca = read_lock(&self.ca);
        if let Some(cap) = entitlement.not_after_cap {
            // A task about to end gets no token rather than one that lives
            // a fraction of a second (tokens end on whole seconds too).
            if crate::ca::room_before(cap, now) < crate::ca::MIN_SVID_TTL
                && let Some(task_id) = &entitlement.task_id
            {
                return Err(AgentError::TaskCompleted(task_id.clone()));
            }
        }
        let request = JwtSvidRequest {
            spiffe_id: entitlement.spiffe_id.clone(),
            audience: audience.to_vec(),
            ttl: ca.jwt_svid_ttl(),
            ends_by: entitlement.not_after_cap,
            extra_claims,
        };
        let minted = ca.mint_jwt_svid_with(&request, now, before_signing)?;
        self.metrics.svid_issued("jwt");
        Ok(minted)
    }

    /// A token this process was already given for this identity and
    /// audience, while it is in the first half of its life (as SPIRE's agent
    /// does: a caller fetching before every request gets the same token
    /// until it is due for renewal, not a signature and an fsync each time).
    pub fn cached_jwt_svid(&self, key: &JwtCacheKey, now: SystemTime) -> Option<JwtSvid> {
        lock(&self.jwt_svids).get(key, now)
    }

    /// Remembers a token once its issuance is recorded.
    pub fn cache_jwt_svid(&self, key: JwtCacheKey, svid: JwtSvid, now: SystemTime) {
        lock(&self.jwt_svids).insert(key, svid, now);
    }

    /// JWT keys of our own trust domain and of `federated` (the bundles a
    /// caller's identities federate with), each kept under its own domain.
    /// The last set built is kept until a bundle changes or another caller
    /// federates differently: revisions are never reused across the set, so
    /// they name the selection.
    fn validation_keys(
        &self,
        federated: &[Arc<crate::federation::FederatedBundle>],
    ) -> Arc<JwtKeySet> {
        let own = self.own_bundle();
        if federated.is_empty() {
            return own.jwt_keys.clone();
        }
        let stamp: Vec<u64> = std::iter::once(own.bundle.sequence)
            .chain(federated.iter().map(|b| b.revision))
            .collect();
        if let Some((cached_stamp, keys)) = read_lock(&self.validation_keys).as_ref()
            && *cached_stamp == stamp
        {
            return keys.clone();
        }
        let mut keys = (*own.jwt_keys).clone();
        for bundle in federated {
            keys.set_bundle(&bundle.bundle);
        }
        let keys = Arc::new(keys);
        *write_lock(&self.validation_keys) = Some((stamp, keys.clone()));
        keys
    }

    /// The JWKS of every trust domain, keyed `spiffe://<td>`, as
    /// FetchJWTBundles sends them.
    pub fn jwt_bundles(&self) -> HashMap<String, Vec<u8>> {
        let own = self.own_bundle();
        HashMap::from([(self.trust_domain.id_string(), own.jwt_jwks.clone())])
    }

    /// ValidateJWTSVID: [`jwt::validate`] against our own trust domain's
    /// keys and those of `federated`, the bundles the caller's identities
    /// federate with (as SPIRE does, and as FetchJWTBundles hands out: a
    /// bundle writ holds for others is no reason for this caller to trust
    /// its trust domain). For a token we issued for a task (our trust
    /// domain, a `task` claim — our own key signed it, so the claim is
    /// ours) the task must still be active and be this token's identity.
    pub fn validate_jwt_svid(
        &self,
        token: &str,
        audience: &str,
        federated: &[Arc<crate::federation::FederatedBundle>],
        now: SystemTime,
    ) -> Result<ValidatedJwt, JwtError> {
        let validated = jwt::validate(token, audience, &self.validation_keys(federated), now)?;
        if validated.spiffe_id.trust_domain() == &self.trust_domain
            && let Some(task) = validated.claims.get("task")
        {
            let task_id = task.get("id").and_then(Value::as_str).unwrap_or_default();
            let active = self
                .active_task(task_id)
                .is_some_and(|t| t.spiffe_id == validated.spiffe_id);
            if !active {
                return Err(JwtError::TaskRevoked(task_id.to_owned()));
            }
        }
        Ok(validated)
    }

    /// Runs one step of the CA schedule and returns when the next is due.
    pub async fn rotate_ca(&self, now: SystemTime) -> Result<SystemTime, AgentError> {
        let (outcome, next, roots) = {
            let mut ca = write_lock(&self.ca);
            let outcome = ca.rotate(now)?;
            if outcome.signer_changed {
                *lock(&self.checkpoint_key) = ca.checkpoint_key();
            }
            (outcome, ca.next_rotation_at(), ca.x509_authorities())
        };
        if outcome.authorities_changed {
            // A CRL must be signed by a root the bundle holds: one whose
            // root was just dropped would fail every client that checks
            // each CRL against the bundle, so the CRLs are re-signed
            // (without it) before the new bundle goes out. A failure is
            // logged by the publisher, which retries on its own.
            self.republish_crls_for_new_authorities().await;
        }
        if outcome.authorities_changed || outcome.signer_changed || outcome.jwt_authorities_changed
        {
            let sequence = self
                .store
                .write(|conn| crate::store::bump_counter(conn, "bundle_sequence"))
                .await?;
            let rebuilt = build_own_bundle(&read_lock(&self.ca), sequence);
            *write_lock(&self.own_bundle) = Arc::new(rebuilt);
            if outcome.signer_changed {
                // Re-key every identity under the new signer promptly, so no
                // workload is left holding a chain to the retiring root.
                lock(&self.svids).clear();
            }
            if outcome.jwt_authorities_changed {
                lock(&self.jwt_svids).clear();
            }
            tracing::info!(
                signer_changed = outcome.signer_changed,
                sequence,
                "CA rotated; bundle updated"
            );
            self.record_best_effort(ca_rotated_event(outcome, &roots, sequence))
                .await;
            self.notify(Change::Everything);
        }
        Ok(next)
    }

    /// Asks the CRL publisher for CRLs of the current authorities and
    /// waits for them, but not forever: the publisher runs beside the
    /// rotation, and a CA rotation must not hang on it.
    async fn republish_crls_for_new_authorities(&self) {
        let wanted = self.request_crls();
        match tokio::time::timeout(CRL_AFTER_ROTATION_WAIT, self.crls_published(wanted)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the CRLs could not be re-signed after the CA's roots changed")
            }
            Err(_) => tracing::warn!(
                "the CRLs were not re-signed within {CRL_AFTER_ROTATION_WAIT:?} of a change of the CA's roots; publishing the new bundle anyway"
            ),
        }
    }

    /// Records what loading the CA changed (a first root, or schedule steps
    /// due while writ was down), once the audit trail is open: without it
    /// the trail would not carry a root published at start, and could not
    /// hand trust on from the previous root to it.
    pub async fn record_ca_changes_at_load(&self) {
        let (outcome, roots) = {
            let ca = read_lock(&self.ca);
            (ca.rotated_at_load(), ca.x509_authorities())
        };
        if outcome == crate::ca::RotationOutcome::default() {
            return;
        }
        let sequence = self.own_bundle().bundle.sequence;
        self.record_best_effort(
            ca_rotated_event(outcome, &roots, sequence).detail("at_start", true),
        )
        .await;
    }
}

/// A `ca_rotated` record. It lists the roots published from now on when
/// they changed, so the trail itself carries the CA's chain of roots.
fn ca_rotated_event(
    outcome: crate::ca::RotationOutcome,
    roots: &[rustls_pki_types::CertificateDer<'static>],
    bundle_sequence: u64,
) -> AuditEvent {
    let event = AuditEvent::new(EventKind::CaRotated, ulid::Ulid::new().to_string())
        .detail("signer_changed", outcome.signer_changed)
        .detail("authorities_changed", outcome.authorities_changed)
        .detail("jwt_authorities_changed", outcome.jwt_authorities_changed)
        .detail("x509_signer_unpublished", outcome.x509_signer_unpublished)
        .detail("jwt_signer_unpublished", outcome.jwt_signer_unpublished)
        .detail("bundle_sequence", bundle_sequence);
    if outcome.authorities_changed {
        event.x509_authorities(roots)
    } else {
        event
    }
}

fn build_own_bundle(ca: &CertificateAuthority, sequence: u64) -> OwnBundle {
    let bundle = TrustBundle {
        trust_domain: ca.trust_domain().clone(),
        x509_authorities: ca.x509_authorities(),
        jwt_authorities: ca.jwt_authorities(),
        sequence,
        refresh_hint: Some(Duration::from_secs(300)),
    };
    let x509_der = bundle.x509_der_concat();
    let jwt_jwks = bundle.jwt_jwks_json();
    let mut jwt_keys = JwtKeySet::default();
    jwt_keys.set_bundle(&bundle);
    OwnBundle {
        bundle,
        x509_der,
        jwt_jwks,
        jwt_keys: Arc::new(jwt_keys),
    }
}

/// The `task` claim: which task a token serves and with what intent.
fn task_claim(task: &Task) -> Value {
    let mut claim = Map::new();
    claim.insert("id".into(), task.id.clone().into());
    if let Some(parent) = &task.parent_id {
        claim.insert("parent_id".into(), parent.clone().into());
    }
    claim.insert("purpose".into(), task.intent.purpose.clone().into());
    claim.insert("tools".into(), task.intent.tools.clone().into());
    claim.insert("targets".into(), task.intent.targets.clone().into());
    claim.insert("data_class".into(), task.intent.data_class.clone().into());
    claim.insert("orchestrator".into(), task.orchestrator.clone().into());
    Value::Object(claim)
}

/// Far beyond any configured `[tasks] max_depth`.
const MAX_DELEGATION_CHAIN: usize = 64;

/// How often, at most, a running writ warns about one policy failing to
/// evaluate (`crate::policy::FailureWarnings`).
const POLICY_FAILURE_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// The ids of every task above `task`, parent first, from the active tasks.
fn task_ancestors(
    index: &TaskIndex,
    task: &crate::policy::TaskFacts,
) -> Result<Vec<String>, String> {
    match index.ancestors(task.parent_id.as_deref()) {
        Ok(ancestors) => Ok(ancestors.iter().map(|a| a.id.clone()).collect()),
        Err(BrokenChain::Ended(id)) => Err(format!(
            "task {} is completing: its ancestor task {id} has ended",
            task.id
        )),
        Err(BrokenChain::TooLong) => Err(format!(
            "task {}: its chain of parents is too long",
            task.id
        )),
    }
}

/// The RFC 8693 `act` claim of a sub-task: the parent task is the current
/// actor, its own delegator nests inside, and so on up to the orchestrator
/// that began the top-level task. `None` for a top-level task. A missing
/// ancestor means the chain is completing (completion cascades downwards).
fn delegation_chain(index: &TaskIndex, task: &Task) -> Result<Option<Value>, AgentError> {
    let ancestors = index
        .ancestors(task.parent_id.as_deref())
        .map_err(|_| AgentError::TaskCompleted(task.id.clone()))?;
    let Some(root_orchestrator) = ancestors.last().map(|a| a.orchestrator.clone()) else {
        return Ok(None);
    };
    let mut actors: Vec<String> = ancestors.iter().map(|a| a.spiffe_id.to_string()).collect();
    actors.push(root_orchestrator);
    let mut act: Option<Value> = None;
    for actor in actors.into_iter().rev() {
        let mut level = Map::new();
        level.insert("sub".into(), actor.into());
        if let Some(inner) = act {
            level.insert("act".into(), inner);
        }
        act = Some(Value::Object(level));
    }
    Ok(act)
}

/// Who an issuance is for, as the audit trail records it.
#[derive(Debug, Clone, Default)]
pub struct Issuance {
    pub correlation_id: String,
    pub caller: Option<CallerFacts>,
    /// The policy decision that allowed the issuance, for its record (the
    /// deciding policies, and any that failed to evaluate); `None` for
    /// writ's own identities, which no policy decides.
    pub decision: Option<crate::policy::Decision>,
}

impl Issuance {
    pub fn new(caller: Option<CallerFacts>) -> Self {
        Self {
            correlation_id: ulid::Ulid::new().to_string(),
            caller,
            decision: None,
        }
    }

    /// This issuance, allowed by `decision`.
    pub fn allowed_by(self, decision: crate::policy::Decision) -> Self {
        Self {
            decision: Some(decision),
            ..self
        }
    }
}

/// Signs audit checkpoints with the agent's active CA key. Weak, because
/// the agent owns the audit log that owns this signer.
pub struct CaCheckpointSigner(pub std::sync::Weak<Agent>);

impl CheckpointSigner for CaCheckpointSigner {
    fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        let agent = self.0.upgrade().ok_or("the agent has stopped")?;
        // Not the CA lock: an issuance writes its audit record while it
        // holds that lock, and this runs under the audit trail's lock, so
        // taking it here could deadlock against a CA rotation waiting to
        // write. The key is cloned out so no lock is held while signing.
        let key = lock(&agent.checkpoint_key).clone();
        key.ok_or("no active signing authority")?.sign(message)
    }
}

pub fn task_facts(task: &Task) -> TaskFacts {
    TaskFacts {
        id: task.id.clone(),
        parent_id: task.parent_id.clone(),
        orchestrator: task.orchestrator.clone(),
        tools: task.intent.tools.clone(),
        targets: task.intent.targets.clone(),
        data_class: task.intent.data_class.clone(),
    }
}

/// How `begin_task_with_svid` ended.
pub enum TaskBeginning<E> {
    /// Stored and recorded: the task can be activated. With the serial
    /// (hex) of its first SVID, if one was minted.
    Begun {
        first_serial: Option<String>,
    },
    /// `store_task` refused; nothing was stored.
    Refused(E),
    StoreFailed(StoreError),
    /// Stored, but the trail could not record it: take the task back out.
    AuditFailed(String),
}

/// Notes a task SVID's serial, so the task's completion revokes it.
fn insert_issued(
    conn: &rusqlite::Connection,
    serial: &[u8],
    task_id: &str,
    issuer_key_id: &[u8],
    spiffe_id: &str,
    not_after: i64,
    issued_at: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO issued(serial, task_id, issuer_key_id, spiffe_id, not_after, issued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        serial,
        task_id,
        issuer_key_id,
        spiffe_id,
        not_after,
        issued_at
    ])?;
    Ok(())
}

const TASK_CACHE_KEY_PREFIX: &str = "task:";

pub fn task_cache_key(task_id: &str) -> String {
    format!("{TASK_CACHE_KEY_PREFIX}{task_id}")
}

/// Whether `key` is `task_cache_key(task_id)`, without building it: a
/// stream asks this of every task that ended since it last looked.
pub fn is_task_cache_key(key: &str, task_id: &str) -> bool {
    key.strip_prefix(TASK_CACHE_KEY_PREFIX) == Some(task_id)
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Half-life plus up to a tenth of the lifetime of jitter.
fn rotation_point(
    issued: SystemTime,
    not_after: SystemTime,
    cap: Option<SystemTime>,
) -> SystemTime {
    let lifetime = not_after.duration_since(issued).unwrap_or(Duration::ZERO);
    let jitter_ms = (lifetime.as_millis() / 10) as u64;
    let jitter = if jitter_ms > 0 {
        Duration::from_millis(rand::rng().random_range(0..jitter_ms))
    } else {
        Duration::ZERO
    };
    let half_life = issued + lifetime / 2 + jitter;
    // An SVID capped by its task's end would be replaced by one capped the
    // same way, each half as long as the last: once the replacement would
    // live less than a second, the SVID is kept until it expires, and the
    // task ends with it.
    match cap {
        Some(cap) if crate::ca::room_before(cap, half_life) < crate::ca::MIN_SVID_TTL => not_after,
        _ => half_life,
    }
}

// A poisoned lock means a thread panicked mid-update; the data behind these
// locks is replaced wholesale (never half-written), so carrying on is safe.
fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, Environment};

    #[test]
    fn a_task_cache_key_is_recognised_without_being_built() {
        for id in ["t-1", "", "task:t-1", "t-1/x"] {
            assert!(is_task_cache_key(&task_cache_key(id), id), "{id:?}");
        }
        assert!(!is_task_cache_key(&task_cache_key("t-1"), "t-10"));
        assert!(!is_task_cache_key(&task_cache_key("t-10"), "t-1"));
        assert!(!is_task_cache_key("entry:t-1", "t-1"));
        assert!(!is_task_cache_key("t-1", "t-1"));
    }

    #[test]
    fn records_left_out_at_a_stop_are_counted_by_kind() {
        assert_eq!(UnrecordedAtStop::of(&Unrecorded::default()), None);
        let event = |kind| AuditEvent::new(kind, "c".to_owned());
        let left = Unrecorded {
            events: vec![
                event(EventKind::TaskEnded),
                event(EventKind::Revoked),
                event(EventKind::TaskEnded),
            ],
            dropped: 4,
        };
        let report = UnrecordedAtStop::of(&left).expect("some are left");
        assert_eq!(report.kinds_text(), "revoked=1, task_ended=2");
        assert_eq!(report.dropped, 4);
        assert_eq!(report.total(), 7);
        let only_dropped = Unrecorded {
            events: Vec::new(),
            dropped: 1,
        };
        assert_eq!(
            UnrecordedAtStop::of(&only_dropped).map(|r| r.total()),
            Some(1)
        );
    }

    /// writ's services on built-in defaults, their state in `dir`.
    async fn services_in(dir: &std::path::Path) -> crate::service::Services {
        let mut config = Config::builtin_defaults(&Environment::current());
        config.data_dir = dir.to_owned();
        config.audit = crate::config::AuditConfig::defaults_for(dir);
        crate::service::build(&config).await.unwrap()
    }

    fn test_task(id: &str, binding: crate::tasks::Binding) -> Arc<crate::tasks::Task> {
        Arc::new(crate::tasks::test_task(id, binding))
    }

    /// A task bound to a cgroup covers a process in it, or in a cgroup
    /// below it, only while the directory at the path is still the cgroup
    /// bound (same id): one made again there holds other processes, which
    /// must not get the task's identity in the moment before the task's
    /// watcher sees the first one go.
    #[test]
    fn a_cgroup_task_covers_only_the_cgroup_it_bound_not_one_made_again_at_its_path() {
        let mount = tempfile::tempdir().unwrap();
        let job = mount.path().join("agents/job");
        std::fs::create_dir_all(job.join("step")).unwrap();
        let bound_id = crate::cgroup::cgroup_id(&job).unwrap();
        let task = test_task(
            "t-cg",
            crate::tasks::Binding::Cgroup {
                path: "/agents/job".into(),
                id: Some(bound_id),
                cpu_usage_at_bind: None,
                populated_at_bind: false,
            },
        );
        let mut index = TaskIndex::default();
        index.insert(task.clone());
        let in_cgroup = |path: &str| Attestation {
            snapshot: writ_attestors::ProcessSnapshot {
                pid: i32::MAX,
                ppid: 1,
                start_time: 1,
                uid: 0,
                gid: 0,
                supplementary_gids: Vec::new(),
                exe_path: None,
                cgroup_path: Some(path.into()),
            },
            selectors: Vec::new(),
        };
        // No task is bound to a process here, so the caller's ancestry is
        // never asked for: any connection's caller will do.
        let process = writ_attestors::PinnedProcess::open(std::process::id() as i32).unwrap();
        let caller = Caller::new(process.pid(), 0, 0, Arc::new(process));
        let found = |path: &str| -> Vec<String> {
            index
                .tasks_for(&in_cgroup(path), &caller, Some(mount.path()))
                .iter()
                .map(|t| t.id.clone())
                .collect()
        };
        assert_eq!(found("/agents/job"), ["t-cg"]);
        assert_eq!(found("/agents/job/step"), ["t-cg"]);
        assert!(found("/agents/jobs").is_empty(), "not on a whole segment");
        assert!(found("/agents").is_empty());

        // Moved aside rather than removed, so that this file system cannot
        // hand the new directory the old one's inode (cgroupfs never reuses
        // an id while the system runs).
        std::fs::rename(&job, mount.path().join("agents/old-job")).unwrap();
        std::fs::create_dir_all(job.join("step")).unwrap();
        assert_ne!(crate::cgroup::cgroup_id(&job), Some(bound_id));
        assert!(found("/agents/job").is_empty(), "made again at the path");
        assert!(found("/agents/job/step").is_empty());
    }

    /// Removing a task leaves no trace of it in any of the index's maps,
    /// and leaves every other task where it was.
    #[test]
    fn the_task_index_forgets_exactly_the_task_removed() {
        let pid = |pid, start_time| crate::tasks::Binding::Pid { pid, start_time };
        let mut index = TaskIndex::default();
        index.insert(test_task("a", pid(10, 100)));
        index.insert(test_task("b", pid(10, 100)));
        index.insert(test_task("c", pid(11, 50)));
        index.insert(test_task(
            "d",
            crate::tasks::Binding::Cgroup {
                path: "/x".into(),
                id: None,
                cpu_usage_at_bind: None,
                populated_at_bind: false,
            },
        ));
        assert_eq!(index.pid_bound_start_times.keys().next(), Some(&50));
        index.remove("c");
        assert!(index.by_id("c").is_none() && !index.by_pid.contains_key(&11));
        assert_eq!(index.pid_bound_start_times.keys().next(), Some(&100));
        index.remove("a");
        assert_eq!(index.by_pid[&10].len(), 1);
        assert_eq!(index.pid_bound_start_times[&100], 1);
        index.remove("b");
        index.remove("d");
        index.remove("never there");
        assert!(index.by_id.is_empty() && index.by_pid.is_empty() && index.by_cgroup.is_empty());
        assert!(index.pid_bound_start_times.is_empty() && index.co_held.is_empty());
    }

    /// With nothing revoked, the publisher still re-signs the CRL once its
    /// refresh interval has passed since the last one, so a quiet node's CRL
    /// never reaches its nextUpdate.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_quiet_node_re_signs_its_crl() {
        let dir = tempfile::tempdir().unwrap();
        let agent = services_in(dir.path()).await.agent;
        let first = agent.crls().generation;
        // Beside the service's own publisher (which waits 12 h), one that
        // refreshes every 100 ms; nothing requests a CRL.
        let publisher = tokio::spawn(
            agent
                .clone()
                .publish_crls_until_stopped(Duration::from_millis(100), Duration::from_secs(1)),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while agent.crls().generation < first + 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the CRL was not re-signed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        publisher.abort();
    }

    /// A CRL is signed by a root the bundle holds: when the CA's roots
    /// change, the CRLs are re-signed before the new bundle goes out, and
    /// a dropped root's CRL is not served any more (clients that check
    /// every CRL against the bundle would fail on it).
    #[tokio::test(flavor = "multi_thread")]
    async fn crls_are_re_signed_when_the_roots_change_without_a_dropped_roots_crl() {
        let dir = tempfile::tempdir().unwrap();
        let agent = services_in(dir.path()).await.agent;
        let now = SystemTime::now();
        let (root_a, a_end) = {
            let ca = read_lock(&agent.ca);
            (ca.active_key_id().to_vec(), ca.active_not_after())
        };
        let revoked = crate::ca::RevokedCert {
            serial: vec![0x42; 16],
            issuer_key_id: root_a,
            revoked_at: now,
        };
        agent.add_revocations(&[(revoked, unix_secs(now) + 3600)]);
        agent.publish_crls().await.unwrap();
        assert_eq!(agent.crls().ders.len(), 1, "root A's CRL");

        // Root B is added at A's half-life (rotate_ca takes the time it
        // runs at): the CRLs are re-signed, A's still among them.
        let before = agent.crls().generation;
        agent
            .rotate_ca(now + Duration::from_secs(13 * 3600))
            .await
            .unwrap();
        assert_eq!(read_lock(&agent.ca).x509_authorities().len(), 2);
        assert!(agent.crls().generation > before);
        assert_eq!(agent.crls().ders.len(), 1);

        // A expires and is dropped: its CRL leaves with it at once, not at
        // the next revocation or the 12-hourly refresh.
        agent.rotate_ca(a_end).await.unwrap();
        assert_eq!(read_lock(&agent.ca).x509_authorities().len(), 1);
        assert!(
            agent.crls().ders.is_empty(),
            "a dropped root's CRL is still served"
        );
    }

    /// A CRL growing by small steps is warned about once per doubling past
    /// the threshold, and again after it has shrunk and grown back.
    #[test]
    fn a_growing_crl_is_warned_about_once_per_doubling() {
        const MIB: usize = 1024 * 1024;
        let mut warned = 0;
        let mut warnings = Vec::new();
        let sizes = (0..=40)
            .map(|i| i * MIB / 8)
            .chain([MIB / 4, MIB / 2 + 1, 3 * MIB / 2]);
        for bytes in sizes {
            let (now, warn) = crl_size_warning(warned, bytes);
            warned = now;
            if warn {
                warnings.push(bytes);
            }
        }
        assert_eq!(
            warnings,
            vec![MIB, 2 * MIB, 4 * MIB, 3 * MIB / 2],
            "crossing 1 MiB, each doubling, then afresh after shrinking below 512 KiB"
        );
        // Shrinking to just above half the threshold keeps the last warning.
        assert_eq!(crl_size_warning(4 * MIB, MIB / 2 + 1), (4 * MIB, false));
        assert_eq!(crl_size_warning(0, MIB - 1), (0, false));
    }

    /// An issuance appends its audit record while it holds the CA, and the
    /// trail may sign a checkpoint for that append while appenders wait: if
    /// signing took the CA lock, a CA rotation waiting to write between the
    /// two would deadlock all three.
    #[tokio::test]
    async fn checkpoints_are_signed_without_the_ca_lock() {
        let dir = tempfile::tempdir().unwrap();
        let svc = services_in(dir.path()).await;
        let agent = svc.agent.clone();
        let active = read_lock(&agent.ca).checkpoint_key().unwrap();

        let held = write_lock(&agent.ca);
        let signer = CaCheckpointSigner(Arc::downgrade(&agent));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(signer.sign(b"checkpoint message"));
        });
        let signed = rx.recv_timeout(Duration::from_secs(5));
        drop(held);
        let (signature, certificate) = signed
            .expect("signing a checkpoint must not wait for the CA lock")
            .unwrap();
        let (_, expected) = active.sign(b"other").unwrap();
        assert_eq!(certificate, expected, "signed with the active CA key");
        crate::audit::verify::check_checkpoint_signature(
            &certificate,
            b"checkpoint message",
            &signature,
        )
        .unwrap();

        if let Some(audit) = agent.audit_log() {
            audit.close();
        }
        svc.store.close();
    }
}
