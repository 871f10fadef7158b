//! What callers hand the audit log: the event kind and the facts about it
//! (who called, which task, what was decided, what was issued). The log adds
//! sequence number, time and hashes; see `record`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The kinds of event writ records. `Checkpoint` and `AuditStarted` are
/// written by the log itself; `AuditLog::append` refuses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    AttestationFailure,
    X509Issued,
    /// An SVID whose issuance was recorded but that never left writ (its
    /// task completed in between, or signing failed after the record was
    /// queued).
    X509Withdrawn,
    JwtIssued,
    /// A JWT-SVID whose issuance was recorded but that was never signed.
    JwtWithdrawn,
    JwtValidationFailed,
    Denied,
    /// Refusals of one uid past its budget, counted rather than written
    /// one by one (`refusal_budget`).
    RefusalsSuppressed,
    TaskBegun,
    TaskEnded,
    Revoked,
    CaRotated,
    /// A registration entry created over the admin API.
    EntryCreated,
    /// A registration entry deleted over the admin API.
    EntryDeleted,
    FederationBundleChanged,
    PolicyReloaded,
    Checkpoint,
    AuditStarted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AttestationFailure => "attestation_failure",
            EventKind::X509Issued => "x509_issued",
            EventKind::X509Withdrawn => "x509_withdrawn",
            EventKind::JwtIssued => "jwt_issued",
            EventKind::JwtWithdrawn => "jwt_withdrawn",
            EventKind::JwtValidationFailed => "jwt_validation_failed",
            EventKind::Denied => "denied",
            EventKind::RefusalsSuppressed => "refusals_suppressed",
            EventKind::TaskBegun => "task_begun",
            EventKind::TaskEnded => "task_ended",
            EventKind::Revoked => "revoked",
            EventKind::CaRotated => "ca_rotated",
            EventKind::EntryCreated => "entry_created",
            EventKind::EntryDeleted => "entry_deleted",
            EventKind::FederationBundleChanged => "federation_bundle_changed",
            EventKind::PolicyReloaded => "policy_reloaded",
            EventKind::Checkpoint => "checkpoint",
            EventKind::AuditStarted => "audit_started",
        }
    }

    /// Kinds only the log itself may write.
    pub fn is_internal(self) -> bool {
        matches!(self, EventKind::Checkpoint | EventKind::AuditStarted)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The attested caller, as the kernel and the attestors saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerFacts {
    /// The SPIFFE IDs the caller is entitled to (or was issued).
    pub spiffe_ids: Vec<String>,
    pub pid: i32,
    pub uid: u32,
    pub selectors: Vec<String>,
}

/// The task an event concerns, with its declared intent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFacts {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The SPIFFE ID (or other identity) of the orchestrator that began it.
    pub orchestrator: String,
    pub tools: Vec<String>,
    pub targets: Vec<String>,
    pub data_class: String,
}

/// One event to record. Field order here is the order in the record; every
/// absent field is left out of the record rather than written as null.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub event: EventKind,
    /// Ties together the records of one request (and the caller's logs).
    pub correlation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<CallerFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskFacts>,
    /// The policy action evaluated, e.g. `IssueX509SVID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// `allow` or `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Ids of the policies that decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// The identity issued, denied or revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Certificate serial, lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Anything else worth keeping, per event kind.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub detail: Map<String, Value>,
}

impl AuditEvent {
    pub fn new(event: EventKind, correlation_id: impl Into<String>) -> Self {
        Self {
            event,
            correlation_id: correlation_id.into(),
            caller: None,
            task: None,
            action: None,
            decision: None,
            policies: Vec::new(),
            spiffe_id: None,
            serial: None,
            not_after: None,
            jti: None,
            reason: None,
            detail: Map::new(),
        }
    }

    pub fn caller(mut self, caller: CallerFacts) -> Self {
        self.caller = Some(caller);
        self
    }

    pub fn task(mut self, task: TaskFacts) -> Self {
        self.task = Some(task);
        self
    }

    /// The policy decision: `allowed` becomes `allow` or `deny`.
    pub fn decision(
        mut self,
        action: impl Into<String>,
        allowed: bool,
        policies: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.action = Some(action.into());
        self.decision = Some(if allowed { "allow" } else { "deny" }.to_owned());
        self.policies = policies.into_iter().map(Into::into).collect();
        self
    }

    /// Policies that failed to evaluate while the decision was made, as
    /// `detail.errors` (`policy <id>: <message>`); nothing when none did.
    pub fn policy_errors(self, errors: &[String]) -> Self {
        if errors.is_empty() {
            return self;
        }
        self.detail("errors", errors.to_vec())
    }

    pub fn spiffe_id(mut self, spiffe_id: impl Into<String>) -> Self {
        self.spiffe_id = Some(spiffe_id.into());
        self
    }

    /// An issued certificate: its serial (hex) and notAfter (Unix seconds).
    pub fn certificate(mut self, serial: impl Into<String>, not_after: i64) -> Self {
        self.serial = Some(serial.into());
        self.not_after = Some(not_after);
        self
    }

    /// An issued JWT: its `jti` and `exp` (Unix seconds).
    pub fn jwt(mut self, jti: impl Into<String>, expires: i64) -> Self {
        self.jti = Some(jti.into());
        self.not_after = Some(expires);
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn detail(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.detail.insert(key.into(), value.into());
        self
    }

    /// For `ca_rotated`: the X.509 roots the CA publishes from now on, as
    /// `detail.x509_authorities` (standard base64 of each DER certificate).
    /// This is how the trail carries its chain of roots: `verify` trusts a
    /// root listed here once a checkpoint by an already-trusted root
    /// follows the record.
    pub fn x509_authorities<C: AsRef<[u8]>>(self, roots: &[C]) -> Self {
        let encoded: Vec<Value> = roots
            .iter()
            .map(|der| Value::String(BASE64.encode(der.as_ref())))
            .collect();
        self.detail(X509_AUTHORITIES_DETAIL, encoded)
    }
}

/// The `detail` member of a `ca_rotated` record that lists the roots.
pub(crate) const X509_AUTHORITIES_DETAIL: &str = "x509_authorities";
