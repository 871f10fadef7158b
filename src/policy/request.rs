//! What writ asks the policy engine: the request types (with their JSON form
//! for `writ policy check`) and their translation into Cedar entities and
//! context under the `Writ` schema.

use std::collections::BTreeMap;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request, RestrictedExpression,
    Schema,
};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, UtcOffset};

use crate::tasks::Task;

/// One decision writ needs, named after the Cedar action it evaluates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", deny_unknown_fields)]
// A request is built for one decision and dropped after it, never held in
// numbers: boxing the delegation's two tasks would only add allocations.
#[allow(clippy::large_enum_variant)]
pub enum PolicyRequest {
    /// A top-level task is about to begin.
    BeginTask { caller: Workload, task: TaskFacts },
    /// A sub-task of `parent` is about to begin (instead of `BeginTask`).
    DelegateTask {
        caller: Workload,
        parent: TaskFacts,
        task: TaskFacts,
    },
    /// A caller asks to end a task.
    EndTask { caller: Workload, task: TaskFacts },
    /// An X.509-SVID for `identity` is about to be issued to `caller`.
    #[serde(rename = "IssueX509SVID")]
    IssueX509Svid {
        caller: Workload,
        identity: IdentityFacts,
    },
    /// A JWT-SVID for `identity` and `audience` is about to be issued.
    #[serde(rename = "IssueJWTSVID")]
    IssueJwtSvid {
        caller: Workload,
        identity: IdentityFacts,
        audience: Vec<String>,
    },
}

/// The attested caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// The caller's default SPIFFE ID, when it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Selectors in their string form (`unix:uid:1000`).
    #[serde(default)]
    pub selectors: Vec<String>,
    pub pid: i32,
    pub uid: u32,
}

/// A task and its declared intent, as policies see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFacts {
    pub id: String,
    pub spiffe_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Every task above this one, parent first, up to the top-level task;
    /// the task is `in` each of them. Empty means "only `parent_id` is
    /// known": writ fills it in from its task tree before deciding
    /// (`Agent::authorize`), and a `writ policy check` request lists them
    /// to be judged the same way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<String>,
    /// 1 for a top-level task.
    #[serde(default = "top_level_depth")]
    pub depth: u32,
    #[serde(default)]
    pub purpose: String,
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default)]
    pub targets: Vec<String>,
    pub data_class: String,
    /// Free-form intent attributes; Cedar tags on the task entity.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    pub ttl_seconds: u64,
    /// SPIFFE ID (or `pid:<n>`) of the workload that began the task.
    pub orchestrator: String,
}

fn top_level_depth() -> u32 {
    1
}

/// An identity about to be issued; `task` is set for a task identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFacts {
    pub spiffe_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskFacts>,
}

impl PolicyRequest {
    /// The Cedar action name (`BeginTask`, `IssueX509SVID`, ...).
    pub fn action_name(&self) -> &'static str {
        match self {
            PolicyRequest::BeginTask { .. } => "BeginTask",
            PolicyRequest::DelegateTask { .. } => "DelegateTask",
            PolicyRequest::EndTask { .. } => "EndTask",
            PolicyRequest::IssueX509Svid { .. } => "IssueX509SVID",
            PolicyRequest::IssueJwtSvid { .. } => "IssueJWTSVID",
        }
    }

    /// The tasks the request names: the resource's (a task, or the task of
    /// an identity) and, for a delegation, the parent.
    pub fn tasks(&self) -> [Option<&TaskFacts>; 2] {
        match self {
            PolicyRequest::BeginTask { task, .. } | PolicyRequest::EndTask { task, .. } => {
                [Some(task), None]
            }
            PolicyRequest::DelegateTask { parent, task, .. } => [Some(parent), Some(task)],
            PolicyRequest::IssueX509Svid { identity, .. }
            | PolicyRequest::IssueJwtSvid { identity, .. } => [identity.task.as_ref(), None],
        }
    }

    /// `tasks`, to change.
    pub fn tasks_mut(&mut self) -> [Option<&mut TaskFacts>; 2] {
        match self {
            PolicyRequest::BeginTask { task, .. } | PolicyRequest::EndTask { task, .. } => {
                [Some(task), None]
            }
            PolicyRequest::DelegateTask { parent, task, .. } => [Some(parent), Some(task)],
            PolicyRequest::IssueX509Svid { identity, .. }
            | PolicyRequest::IssueJwtSvid { identity, .. } => [identity.task.as_mut(), None],
        }
    }

    /// The identity the request is about: the one to be issued, or the
    /// task's.
    pub fn spiffe_id(&self) -> &str {
        match self {
            PolicyRequest::BeginTask { task, .. }
            | PolicyRequest::EndTask { task, .. }
            | PolicyRequest::DelegateTask { task, .. } => &task.spiffe_id,
            PolicyRequest::IssueX509Svid { identity, .. }
            | PolicyRequest::IssueJwtSvid { identity, .. } => &identity.spiffe_id,
        }
    }

    pub fn caller(&self) -> &Workload {
        match self {
            PolicyRequest::BeginTask { caller, .. }
            | PolicyRequest::DelegateTask { caller, .. }
            | PolicyRequest::EndTask { caller, .. }
            | PolicyRequest::IssueX509Svid { caller, .. }
            | PolicyRequest::IssueJwtSvid { caller, .. } => caller,
        }
    }
}

impl Workload {
    /// The principal's entity id: its SPIFFE ID, or `pid:<n>` without one.
    pub fn entity_id(&self) -> String {
        match &self.spiffe_id {
            Some(id) => id.clone(),
            None => format!("pid:{}", self.pid),
        }
    }
}

impl TaskFacts {
    /// The facts of an existing task. Its TTL is the lifetime it was given
    /// (expiry minus creation), which is what it was begun with unless a
    /// parent cut it short.
    pub fn from_task(task: &Task) -> Self {
        let ttl_seconds = task
            .expires_at
            .duration_since(task.created_at)
            .map_or(0, |d| d.as_secs());
        TaskFacts {
            id: task.id.clone(),
            spiffe_id: task.spiffe_id.to_string(),
            parent_id: task.parent_id.clone(),
            // Only the task tree knows them; see `ancestors`.
            ancestors: Vec::new(),
            depth: task.depth,
            purpose: task.intent.purpose.clone(),
            tools: task.intent.tools.clone(),
            targets: task.intent.targets.clone(),
            data_class: task.intent.data_class.clone(),
            attributes: task.intent.attributes.clone(),
            ttl_seconds,
            orchestrator: task.orchestrator.clone(),
        }
    }
}

impl From<&Task> for TaskFacts {
    fn from(task: &Task) -> Self {
        TaskFacts::from_task(task)
    }
}

/// A request could not be expressed in Cedar. writ's own requests always
/// can; this guards against a schema/code mismatch and odd input to
/// `writ policy check` (a year Cedar's datetime cannot hold, say).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot build the Cedar request: {0}")]
pub struct RequestBuildError(String);

fn build_error(e: impl std::fmt::Display) -> RequestBuildError {
    RequestBuildError(e.to_string())
}

/// Entity type names and action ids, parsed once per engine so evaluation
/// never parses names.
#[derive(Debug, Clone)]
pub(crate) struct Vocabulary {
    workload: EntityTypeName,
    task: EntityTypeName,
    identity: EntityTypeName,
    begin_task: EntityUid,
    delegate_task: EntityUid,
    end_task: EntityUid,
    issue_x509_svid: EntityUid,
    issue_jwt_svid: EntityUid,
}

impl Vocabulary {
    pub(crate) fn new() -> Result<Self, RequestBuildError> {
        let type_name = |name: &str| name.parse::<EntityTypeName>().map_err(build_error);
        let action = |name: &str| -> Result<EntityUid, RequestBuildError> {
            Ok(EntityUid::from_type_name_and_id(
                type_name("Writ::Action")?,
                EntityId::new(name),
            ))
        };
        Ok(Vocabulary {
            workload: type_name("Writ::Workload")?,
            task: type_name("Writ::Task")?,
            identity: type_name("Writ::Identity")?,
            begin_task: action("BeginTask")?,
            delegate_task: action("DelegateTask")?,
            end_task: action("EndTask")?,
            issue_x509_svid: action("IssueX509SVID")?,
            issue_jwt_svid: action("IssueJWTSVID")?,
        })
    }

    fn uid(&self, type_name: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(type_name.clone(), EntityId::new(id))
    }

    /// Translates `request` at `now` into what the Cedar authorizer takes.
    /// With `conform_to`, the request and entities are checked against the
    /// schema; that costs more than the evaluation itself, so the engine
    /// passes `None` and the tests check that every kind of request conforms.
    pub(crate) fn cedar_request(
        &self,
        request: &PolicyRequest,
        now: OffsetDateTime,
        conform_to: Option<&Schema>,
    ) -> Result<(Request, Entities), RequestBuildError> {
        self.precheck(request)?;
        let caller = request.caller();
        let principal = self.uid(&self.workload, &caller.entity_id());
        let mut entities = vec![self.workload_entity(principal.clone(), caller)?];
        let mut context = vec![("time".to_owned(), time_record(now)?)];

        let (action, resource) = match request {
            PolicyRequest::BeginTask { task, .. } => {
                let uid = self.push_task(&mut entities, task)?;
                (&self.begin_task, uid)
            }
            PolicyRequest::EndTask { task, .. } => {
                let uid = self.push_task(&mut entities, task)?;
                (&self.end_task, uid)
            }
            PolicyRequest::DelegateTask { parent, task, .. } => {
                let parent_uid = self.push_task(&mut entities, parent)?;
                let uid = self.push_task(&mut entities, task)?;
                context.push((
                    "parent".to_owned(),
                    RestrictedExpression::new_entity_uid(parent_uid),
                ));
                (&self.delegate_task, uid)
            }
            PolicyRequest::IssueX509Svid { identity, .. } => {
                let uid = self.push_identity(&mut entities, identity)?;
                (&self.issue_x509_svid, uid)
            }
            PolicyRequest::IssueJwtSvid {
                identity, audience, ..
            } => {
                let uid = self.push_identity(&mut entities, identity)?;
                context.push(("audience".to_owned(), string_set(audience)));
                (&self.issue_jwt_svid, uid)
            }
        };

        let context = Context::from_pairs(context).map_err(build_error)?;
        let request = Request::new(principal, action.clone(), resource, context, conform_to)
            .map_err(build_error)?;
        let entities = Entities::from_entities(entities, conform_to).map_err(build_error)?;
        Ok((request, entities))
    }

    /// What makes a request inexpressible in Cedar whatever the policies:
    /// checked before building it, and before deciding an action that
    /// needs no request built (`PolicyEngine::evaluate`).
    pub(crate) fn precheck(&self, request: &PolicyRequest) -> Result<(), RequestBuildError> {
        match request {
            // Both are entities in one store; the same id twice would
            // leave policies looking at whichever Cedar kept.
            PolicyRequest::DelegateTask { parent, task, .. } if parent.id == task.id => Err(
                RequestBuildError(format!("task {} cannot be delegated under itself", task.id)),
            ),
            _ => request
                .tasks()
                .into_iter()
                .flatten()
                .try_for_each(check_ancestors),
        }
    }

    /// Every action, by the name `PolicyRequest::action_name` gives it.
    pub(crate) fn actions(&self) -> [(&'static str, &EntityUid); 5] {
        [
            ("BeginTask", &self.begin_task),
            ("DelegateTask", &self.delegate_task),
            ("EndTask", &self.end_task),
            ("IssueX509SVID", &self.issue_x509_svid),
            ("IssueJWTSVID", &self.issue_jwt_svid),
        ]
    }

    fn workload_entity(
        &self,
        uid: EntityUid,
        caller: &Workload,
    ) -> Result<Entity, RequestBuildError> {
        let mut attrs = vec![
            ("selectors".to_owned(), string_set(&caller.selectors)),
            (
                "uid".to_owned(),
                RestrictedExpression::new_long(i64::from(caller.uid)),
            ),
            (
                "pid".to_owned(),
                RestrictedExpression::new_long(i64::from(caller.pid)),
            ),
        ];
        if let Some(id) = &caller.spiffe_id {
            attrs.push(("spiffe_id".to_owned(), string(id)));
        }
        Entity::new_with_tags(uid, attrs, [], []).map_err(build_error)
    }

    fn push_task(
        &self,
        entities: &mut Vec<Entity>,
        task: &TaskFacts,
    ) -> Result<EntityUid, RequestBuildError> {
        let uid = self.uid(&self.task, &task.id);
        let mut attrs = vec![
            ("spiffe_id".to_owned(), string(&task.spiffe_id)),
            ("depth".to_owned(), long(u64::from(task.depth))),
            ("purpose".to_owned(), string(&task.purpose)),
            ("tools".to_owned(), string_set(&task.tools)),
            ("targets".to_owned(), string_set(&task.targets)),
            ("data_class".to_owned(), string(&task.data_class)),
            ("ttl_seconds".to_owned(), long(task.ttl_seconds)),
            ("orchestrator".to_owned(), string(&task.orchestrator)),
        ];
        if let Some(parent) = &task.parent_id {
            attrs.push(("parent_id".to_owned(), string(parent)));
        }
        // Every ancestor is a direct parent of the entity, so `in` sees the
        // whole chain although only this task (and a delegation's parent)
        // is in the entity store.
        let parents: Vec<EntityUid> = if task.ancestors.is_empty() {
            task.parent_id
                .iter()
                .map(|p| self.uid(&self.task, p))
                .collect()
        } else {
            task.ancestors
                .iter()
                .map(|a| self.uid(&self.task, a))
                .collect()
        };
        let tags = task.attributes.iter().map(|(k, v)| (k.clone(), string(v)));
        entities
            .push(Entity::new_with_tags(uid.clone(), attrs, parents, tags).map_err(build_error)?);
        Ok(uid)
    }

    fn push_identity(
        &self,
        entities: &mut Vec<Entity>,
        identity: &IdentityFacts,
    ) -> Result<EntityUid, RequestBuildError> {
        let uid = self.uid(&self.identity, &identity.spiffe_id);
        let mut attrs = vec![("spiffe_id".to_owned(), string(&identity.spiffe_id))];
        if let Some(task) = &identity.task {
            let task_uid = self.push_task(entities, task)?;
            attrs.push((
                "task".to_owned(),
                RestrictedExpression::new_entity_uid(task_uid),
            ));
        }
        entities.push(Entity::new_with_tags(uid.clone(), attrs, [], []).map_err(build_error)?);
        Ok(uid)
    }
}

/// `ancestors` must start with the parent and not name the task itself:
/// anything else is a chain writ would never build.
fn check_ancestors(task: &TaskFacts) -> Result<(), RequestBuildError> {
    let Some(first) = task.ancestors.first() else {
        return Ok(());
    };
    if task.parent_id.as_ref() != Some(first) {
        return Err(RequestBuildError(format!(
            "task {}: ancestors must start with its parent_id",
            task.id
        )));
    }
    if task.ancestors.contains(&task.id) {
        return Err(RequestBuildError(format!(
            "task {} cannot be its own ancestor",
            task.id
        )));
    }
    Ok(())
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn string_set(values: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(values.iter().map(|v| string(v)))
}

/// Cedar's Long is an i64; a u64 beyond it saturates, which for TTLs and
/// depths still compares as "too large".
fn long(value: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(value).unwrap_or(i64::MAX))
}

/// `context.time`: the instant in UTC, split the way policies test it.
///
/// No Cedar `datetime` here: building one parses its text with regular
/// expressions on every call, which would cost more than the evaluation;
/// `unix` (seconds) serves for comparing instants.
fn time_record(now: OffsetDateTime) -> Result<RestrictedExpression, RequestBuildError> {
    let utc = now.to_offset(UtcOffset::UTC);
    let timestamp = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second(),
    );
    RestrictedExpression::new_record([
        (
            "hour".to_owned(),
            RestrictedExpression::new_long(i64::from(utc.hour())),
        ),
        (
            "minute".to_owned(),
            RestrictedExpression::new_long(i64::from(utc.minute())),
        ),
        ("weekday".to_owned(), string(&utc.weekday().to_string())),
        (
            "timestamp".to_owned(),
            RestrictedExpression::new_string(timestamp),
        ),
        (
            "unix".to_owned(),
            RestrictedExpression::new_long(utc.unix_timestamp()),
        ),
    ])
    .map_err(build_error)
}
