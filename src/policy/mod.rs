//! Cedar policy: writ's schema, loading and strictly validating policy files
//! (or the built-in permissive policy), and deciding each request with an
//! explanation. Default deny: whatever no policy permits is refused.

mod request;

pub use request::{IdentityFacts, PolicyRequest, RequestBuildError, TaskFacts, Workload};

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cedar_policy::ffi::DetailedError;
use cedar_policy::{
    ActionConstraint, Authorizer, Effect, EntityUid, Policy, PolicyId, PolicySet,
    PrincipalConstraint, ResourceConstraint, Schema, ValidationMode, Validator,
};
use time::OffsetDateTime;

use request::Vocabulary;

/// The schema every policy is validated against and every request built for.
pub const SCHEMA: &str = include_str!("../../policy/schema.cedarschema");
/// The policy in force when the config names no policy files.
pub const BUILTIN_POLICY: &str = include_str!("../../policy/default.cedar");
/// How `source()` names the built-in policy.
pub const BUILTIN_SOURCE: &str = "built-in";

/// One problem in a policy file, located as precisely as Cedar allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    pub file: PathBuf,
    /// 1-based line and column (in characters), when Cedar names a place.
    pub position: Option<(usize, usize)>,
    /// The policy the problem is in, for validation problems.
    pub policy_id: Option<String>,
    pub message: String,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        f.write_str(": ")?;
        if let Some(id) = &self.policy_id {
            write!(f, "policy {id}: ")?;
        }
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("no policy files given")]
    NoFiles,
    #[error("{}: cannot read policy file: {message}", path.display())]
    Read { path: PathBuf, message: String },
    /// Every parse and validation problem found, in file order.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<PolicyProblem>),
    /// writ's own schema failed to load: a build defect, not user input.
    #[error("writ's policy schema is invalid: {0}")]
    Schema(String),
}

impl PolicyError {
    pub fn problems(&self) -> &[PolicyProblem] {
        match self {
            PolicyError::Invalid(problems) => problems,
            _ => &[],
        }
    }
}

fn join_lines(problems: &[PolicyProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Allowed: the permits that matched. Denied: the forbids that matched
    /// (empty when nothing permitted the request).
    pub deciding_policies: Vec<String>,
    /// Policies that failed to evaluate, each as `policy <id>: <message>`
    /// (Cedar counts them as not matching, so an erroring forbid does not
    /// deny), or a request that could not be built (which denies).
    pub errors: Vec<String>,
    /// The ids of the policies that failed to evaluate, in file order.
    pub failed_policies: Vec<String>,
}

impl Decision {
    /// For PermissionDenied answers and logs: `denied by policy: a, b` or
    /// `no policy permits this`. On an allowed decision, names the permits.
    pub fn denial_message(&self) -> String {
        match (self.allowed, self.deciding_policies.is_empty()) {
            (true, _) => format!("allowed by policy: {}", self.deciding_policies.join(", ")),
            (false, false) => format!("denied by policy: {}", self.deciding_policies.join(", ")),
            (false, true) => "no policy permits this".to_owned(),
        }
    }

    /// A request that could not be decided: denied, with the reason.
    pub(crate) fn denied_with_error(error: String) -> Self {
        Decision {
            allowed: false,
            deciding_policies: Vec::new(),
            errors: vec![error],
            failed_policies: Vec::new(),
        }
    }
}

/// Rate-limits the warnings a running writ logs for policies that fail to
/// evaluate. Cedar skips such a policy, so an erroring forbid lets through
/// what it was written to stop; that must be seen, but a policy that errors
/// on every issuance must not flood the log either: each policy is warned
/// about at most once per interval, and the warning says how many failures
/// went unlogged before it.
#[derive(Debug)]
pub struct FailureWarnings {
    interval: Duration,
    /// By policy id: when it was last warned about, and its failures since.
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

/// One warning `FailureWarnings::due` lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureWarning<'a> {
    pub policy: &'a str,
    pub error: &'a str,
    /// Failures of this policy since its last warning, not logged.
    pub unlogged: u64,
}

impl FailureWarnings {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: Mutex::default(),
        }
    }

    /// The failures in `decision` to warn about at `now`; the others are
    /// counted towards their policy's next warning.
    pub fn due<'a>(&self, decision: &'a Decision, now: Instant) -> Vec<FailureWarning<'a>> {
        // A poisoned lock only means another thread panicked while counting.
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut due = Vec::new();
        for (policy, error) in decision.failed_policies.iter().zip(&decision.errors) {
            match seen.get_mut(policy) {
                Some((warned_at, since)) if now.duration_since(*warned_at) < self.interval => {
                    *since += 1;
                }
                Some((warned_at, since)) => {
                    due.push(FailureWarning {
                        policy,
                        error,
                        unlogged: std::mem::take(since),
                    });
                    *warned_at = now;
                }
                None => {
                    due.push(FailureWarning {
                        policy,
                        error,
                        unlogged: 0,
                    });
                    seen.insert(policy.clone(), (now, 0));
                }
            }
        }
        due
    }

    /// Forgets every policy: a reload may have fixed or replaced them.
    pub fn clear(&self) {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// A validated policy set, ready to evaluate. Cloning is cheap; a reload
/// builds a new engine and swaps it in whole, so a bad file never replaces
/// a good policy.
#[derive(Clone)]
pub struct PolicyEngine {
    inner: Arc<Inner>,
}

struct Inner {
    policies: PolicySet,
    authorizer: Authorizer,
    vocabulary: Vocabulary,
    ids: Vec<String>,
    /// Position of each id in `ids`, so decisions list policies in file order.
    order: HashMap<String, usize>,
    /// Actions decided the same for every request (`unconditional_decisions`),
    /// by action name.
    unconditional: HashMap<&'static str, Decision>,
    source: String,
    warnings: Vec<String>,
}

impl fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("source", &self.inner.source)
            .field("policies", &self.inner.ids)
            .finish_non_exhaustive()
    }
}

/// Text of one policy file and the name its problems are reported under.
struct SourceFile {
    path: PathBuf,
    text: String,
}

impl PolicyEngine {
    /// Parses every file and validates the whole set against writ's schema
    /// in strict mode. Every problem is reported, parse errors with
    /// file:line:column, validation errors with the policy id and file.
    pub fn load(files: &[PathBuf]) -> Result<Self, PolicyError> {
        if files.is_empty() {
            return Err(PolicyError::NoFiles);
        }
        let sources = files
            .iter()
            .map(|path| read_source(path))
            .collect::<Result<Vec<_>, _>>()?;
        let label = files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Self::build(&sources, label)
    }

    /// The built-in permissive policy (`policy/default.cedar`): real Cedar,
    /// evaluated like any other, with one explicit permit per action.
    pub fn builtin_default() -> Self {
        let source = SourceFile {
            path: PathBuf::from("default.cedar"),
            text: BUILTIN_POLICY.to_owned(),
        };
        match Self::build(&[source], BUILTIN_SOURCE.to_owned()) {
            Ok(engine) => engine,
            // Compiled in and covered by tests, so only a broken build gets here.
            Err(e) => unreachable!("the built-in policy does not load: {e}"),
        }
    }

    fn build(sources: &[SourceFile], label: String) -> Result<Self, PolicyError> {
        let schema = load_schema()?;
        let vocabulary = Vocabulary::new().map_err(|e| PolicyError::Schema(e.to_string()))?;
        let mut problems = Vec::new();
        let mut policies = PolicySet::new();
        let mut ids = Vec::new();
        // Which file each policy came from, to place validation errors.
        let mut origin: HashMap<String, usize> = HashMap::new();
        // Files that parse but hold no policy: likely a mistake, and with
        // nothing else loaded they deny everything.
        let mut empty_files = Vec::new();

        for (index, source) in sources.iter().enumerate() {
            let parsed = match PolicySet::from_str(&source.text) {
                Ok(parsed) => parsed,
                Err(errors) => {
                    for error in errors.iter() {
                        problems.push(problem(source, None, &DetailedError::from(error)));
                    }
                    continue;
                }
            };
            if parsed.policies().next().is_none() && parsed.templates().next().is_none() {
                empty_files.push(source.path.display().to_string());
            }
            for template in parsed.templates() {
                problems.push(PolicyProblem {
                    file: source.path.clone(),
                    position: None,
                    policy_id: Some(file_policy_id(&source.path, template.id())),
                    message: "is a template (uses ?principal or ?resource); writ only takes static policies".to_owned(),
                });
            }
            let mut file_policies: Vec<&Policy> = parsed.policies().collect();
            // Cedar numbers policies in file order (policy0, policy1, ...);
            // keep that order so ids and reports read like the file.
            file_policies.sort_by_key(|p| policy_number(p.id()));
            for policy in file_policies {
                let id = match policy.annotation("id") {
                    Some(id) if !id.trim().is_empty() => id.to_owned(),
                    _ => file_policy_id(&source.path, policy.id()),
                };
                if let Some(&first) = origin.get(&id) {
                    problems.push(PolicyProblem {
                        file: source.path.clone(),
                        position: None,
                        policy_id: Some(id.clone()),
                        message: format!(
                            "the id is already used by a policy in {}",
                            sources[first].path.display()
                        ),
                    });
                    continue;
                }
                match policies.add(policy.new_id(PolicyId::new(&id))) {
                    Ok(()) => {
                        origin.insert(id.clone(), index);
                        ids.push(id);
                    }
                    Err(e) => problems.push(PolicyProblem {
                        file: source.path.clone(),
                        position: None,
                        policy_id: Some(id),
                        message: e.to_string(),
                    }),
                }
            }
        }

        let validator = Validator::new(schema);
        let result = validator.validate(&policies, ValidationMode::Strict);
        for error in result.validation_errors() {
            let id = raw_id(error.policy_id());
            let detail = DetailedError::from(error);
            match origin.get(&id) {
                Some(&index) => problems.push(problem(&sources[index], Some(id), &detail)),
                None => problems.push(PolicyProblem {
                    file: PathBuf::from(&label),
                    position: None,
                    policy_id: Some(id),
                    message: detail.message,
                }),
            }
        }
        if !problems.is_empty() {
            sort_problems(&mut problems, sources);
            return Err(PolicyError::Invalid(problems));
        }
        let mut warnings: Vec<String> = empty_files
            .iter()
            .map(|file| format!("{file}: holds no policies"))
            .collect();
        if ids.is_empty() {
            warnings.push(format!(
                "no policies loaded from {label}: every request is denied"
            ));
        }
        let validator_warnings = result.validation_warnings().map(|w| {
            let id = raw_id(w.policy_id());
            let detail = DetailedError::from(w);
            match origin.get(&id) {
                Some(&index) => problem(&sources[index], Some(id), &detail).to_string(),
                None => format!("policy {id}: {}", detail.message),
            }
        });
        warnings.extend(validator_warnings);

        let order: HashMap<String, usize> = ids.iter().cloned().zip(0..).collect();
        let unconditional = unconditional_decisions(&policies, &vocabulary, &order);
        Ok(PolicyEngine {
            inner: Arc::new(Inner {
                policies,
                authorizer: Authorizer::new(),
                vocabulary,
                order,
                unconditional,
                ids,
                source: label,
                warnings,
            }),
        })
    }

    /// Decides `request` at `now`. Anything that keeps the request from
    /// being evaluated denies it, with the reason in `errors`.
    pub fn evaluate(&self, request: &PolicyRequest, now: OffsetDateTime) -> Decision {
        let inner = &*self.inner;
        if let Some(decision) = inner.unconditional.get(request.action_name()) {
            return match inner.vocabulary.precheck(request) {
                Ok(()) => decision.clone(),
                Err(e) => Decision::denied_with_error(e.to_string()),
            };
        }
        self.evaluate_in_cedar(request, now)
    }

    /// `evaluate` through Cedar, whatever the action.
    fn evaluate_in_cedar(&self, request: &PolicyRequest, now: OffsetDateTime) -> Decision {
        let inner = &*self.inner;
        let (cedar_request, entities) = match inner.vocabulary.cedar_request(request, now, None) {
            Ok(built) => built,
            Err(e) => return Decision::denied_with_error(e.to_string()),
        };
        let response = inner
            .authorizer
            .is_authorized(&cedar_request, &inner.policies, &entities);
        let diagnostics = response.diagnostics();
        let mut deciding_policies: Vec<String> = diagnostics.reason().map(raw_id).collect();
        deciding_policies.sort_by_key(|id| inner.order.get(id).copied());
        let mut failed: Vec<(String, String)> = diagnostics
            .errors()
            .map(|error| match error {
                cedar_policy::AuthorizationError::PolicyEvaluationError(e) => {
                    let id = raw_id(e.policy_id());
                    let message = format!("policy {id}: {}", e.inner());
                    (id, message)
                }
            })
            .collect();
        failed.sort_by_key(|(id, _)| inner.order.get(id).copied());
        let (failed_policies, errors) = failed.into_iter().unzip();
        Decision {
            allowed: response.decision() == cedar_policy::Decision::Allow,
            deciding_policies,
            errors,
            failed_policies,
        }
    }

    /// Ids of every policy in force, in file order.
    pub fn policy_ids(&self) -> Vec<String> {
        self.inner.ids.clone()
    }

    /// `built-in`, or the policy files as given, comma-separated.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// What is loaded but looks wrong: files holding no policy, no policy at
    /// all (every request denied), and validator warnings (policies that
    /// can never apply, and the like). They do not stop a load.
    pub fn warnings(&self) -> &[String] {
        &self.inner.warnings
    }

    pub fn is_builtin(&self) -> bool {
        self.inner.source == BUILTIN_SOURCE
    }
}

/// The actions that every policy applying to them decides without looking at
/// the request: no `when` or `unless`, and `principal` and `resource`
/// unconstrained. Cedar would decide each such action the same way for every
/// request (a matching forbid denies, else a matching permit allows, else
/// nothing permits it), so that decision is made once, here, instead of
/// building a request's entities every time, which costs more than Cedar's
/// evaluation itself. The built-in policy is such a set; so is a production
/// set's `permit (principal, action == IssueX509SVID, resource)`.
fn unconditional_decisions(
    policies: &PolicySet,
    vocabulary: &Vocabulary,
    order: &HashMap<String, usize>,
) -> HashMap<&'static str, Decision> {
    let applies_to = |policy: &Policy, action: &EntityUid| match policy.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => &uid == action,
        // writ's schema declares no action groups: `in` is membership.
        ActionConstraint::In(uids) => uids.contains(action),
    };
    let unconditional = |policy: &Policy| {
        !policy.has_non_scope_constraint()
            && policy.principal_constraint() == PrincipalConstraint::Any
            && policy.resource_constraint() == ResourceConstraint::Any
    };
    let mut decisions = HashMap::new();
    for (name, action) in vocabulary.actions() {
        let applying: Vec<&Policy> = policies
            .policies()
            .filter(|p| applies_to(p, action))
            .collect();
        if !applying.iter().all(|p| unconditional(p)) {
            continue;
        }
        let ids = |effect: Effect| {
            let mut ids: Vec<String> = applying
                .iter()
                .filter(|p| p.effect() == effect)
                .map(|p| raw_id(p.id()))
                .collect();
            ids.sort_by_key(|id| order.get(id).copied());
            ids
        };
        let forbids = ids(Effect::Forbid);
        let decision = if forbids.is_empty() {
            let permits = ids(Effect::Permit);
            Decision {
                allowed: !permits.is_empty(),
                deciding_policies: permits,
                errors: Vec::new(),
                failed_policies: Vec::new(),
            }
        } else {
            Decision {
                allowed: false,
                deciding_policies: forbids,
                errors: Vec::new(),
                failed_policies: Vec::new(),
            }
        };
        decisions.insert(name, decision);
    }
    decisions
}

fn load_schema() -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(schema, _warnings)| schema)
        .map_err(|e| PolicyError::Schema(DetailedError::from(&e).message))
}

fn read_source(path: &Path) -> Result<SourceFile, PolicyError> {
    let read_error = |message: String| PolicyError::Read {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| read_error(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        read_error(format!(
            "not valid UTF-8 (at byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    Ok(SourceFile {
        path: path.to_owned(),
        text,
    })
}

/// `file.cedar:policy0`, from Cedar's own per-file numbering.
fn file_policy_id(path: &Path, cedar_id: &PolicyId) -> String {
    format!("{}:{}", path.display(), raw_id(cedar_id))
}

/// The id as written. `PolicyId`'s Display escapes it (`"` becomes `\"`),
/// which would stop it matching the ids writ reports and looks up.
fn raw_id(id: &PolicyId) -> String {
    AsRef::<str>::as_ref(id).to_owned()
}

fn policy_number(id: &PolicyId) -> usize {
    raw_id(id)
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

fn problem(
    source: &SourceFile,
    policy_id: Option<String>,
    detail: &DetailedError,
) -> PolicyProblem {
    let position = detail
        .source_locations
        .first()
        .map(|label| line_and_column(&source.text, label.loc.start));
    // Cedar repeats the policy id in validation messages; the problem
    // already names it.
    let mut message = match &policy_id {
        Some(id) => detail
            .message
            .strip_prefix(&format!("for policy `{id}`, "))
            .unwrap_or(&detail.message)
            .to_owned(),
        None => detail.message.clone(),
    };
    if let Some(label) = detail
        .source_locations
        .first()
        .and_then(|l| l.label.as_deref())
        .filter(|l| !l.is_empty())
    {
        message.push_str(": ");
        message.push_str(label);
    }
    if let Some(help) = &detail.help {
        message.push_str(" (");
        message.push_str(help);
        message.push(')');
    }
    PolicyProblem {
        file: source.path.clone(),
        position,
        policy_id,
        message,
    }
}

/// Reports read in file order, then by position, whatever order Cedar
/// found them in.
fn sort_problems(problems: &mut [PolicyProblem], sources: &[SourceFile]) {
    let file_index = |p: &PolicyProblem| {
        sources
            .iter()
            .position(|s| s.path == p.file)
            .unwrap_or(usize::MAX)
    };
    problems.sort_by_key(|p| (file_index(p), p.position.unwrap_or((usize::MAX, 0))));
}

/// `(line, column)`, 1-based, for a byte offset into `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
