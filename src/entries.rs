//! Registration entries created through the admin API: validated like config
//! entries, persisted in the store, and merged after the config file's entries
//! into the registry the agent serves from.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::params;
use writ_attestors::{Selector, excerpt};

use crate::agent::Agent;
use crate::audit::{AuditEvent, CallerFacts, EventKind};
use crate::config::parse_duration;
use crate::identity::{Entry, EntrySource, MAX_HINT_BYTES, Registry};
use crate::proto::admin as pb;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("entry {} not found", excerpt(.0))]
    NotFound(String),
    #[error("entry {0} comes from the config file; change it there")]
    FromConfig(String),
    #[error("an entry with this SPIFFE ID and selectors already exists ({0})")]
    AlreadyExists(String),
    /// An active task holds the SPIFFE ID, or one above it: the entry
    /// would go on issuing it after the task ends, so the task's end would
    /// not end it, and an ID below a task's passes for part of the task.
    #[error(
        "spiffe_id: {}; an entry takes another, or wait until the task has ended",
        held_phrase(.spiffe_id, .task, .task_spiffe_id)
    )]
    HeldByTask {
        spiffe_id: SpiffeId,
        task: String,
        task_spiffe_id: SpiffeId,
    },
    /// Config entries (new in a reload) whose SPIFFE IDs active tasks
    /// hold, or lie below theirs: each as (entry id, SPIFFE ID, task id,
    /// the task's SPIFFE ID).
    #[error("{}", held_by_tasks_message(.0))]
    ConfigHeldByTask(Vec<(String, SpiffeId, String, SpiffeId)>),
    /// Config entries with the id (the same SPIFFE ID and selectors) of
    /// entries created through the admin API, which they would hide.
    #[error("{}", shadowing_message(.0))]
    ShadowsAdminEntry(Vec<(String, SpiffeId)>),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// `spiffe_id`, said to be active task `task`'s identity (`task_spiffe_id`)
/// or to lie below it.
fn held_phrase(spiffe_id: &SpiffeId, task: &str, task_spiffe_id: &SpiffeId) -> String {
    if spiffe_id == task_spiffe_id {
        format!("{spiffe_id} is the identity of active task {task}")
    } else {
        format!("{spiffe_id} lies below {task_spiffe_id}, the identity of active task {task}")
    }
}

fn held_by_tasks_message(held: &[(String, SpiffeId, String, SpiffeId)]) -> String {
    let listed: Vec<String> = held
        .iter()
        .map(|(entry, spiffe_id, task, task_spiffe_id)| {
            format!(
                "config entry {entry}: {}",
                held_phrase(spiffe_id, task, task_spiffe_id)
            )
        })
        .collect();
    format!(
        "{}: an entry would go on issuing a task's identity (or one below it) after the task ends; give the entry another SPIFFE ID, or reload once the task has ended",
        listed.join("; ")
    )
}

fn shadowing_message(entries: &[(String, SpiffeId)]) -> String {
    let advice = |them: &str, delete: &str| {
        format!(
            "leave {them} out of the config file, or delete the admin entry first ({delete}, while writ runs)"
        )
    };
    match entries {
        [(id, spiffe_id)] => format!(
            "config entry {id} ({spiffe_id}) has the same SPIFFE ID and selectors, and so the same id, as an entry created through the admin API, and would hide it: {}",
            advice("it", &format!("`writ entry delete {id}`"))
        ),
        _ => {
            let listed: Vec<String> = entries
                .iter()
                .map(|(id, spiffe_id)| format!("{id} ({spiffe_id})"))
                .collect();
            format!(
                "config entries {} have the same SPIFFE IDs and selectors, and so the same ids, as entries created through the admin API, and would hide them: {}",
                listed.join(", "),
                advice("them", "`writ entry delete <id>`")
            )
        }
    }
}

/// Refuses config entries that are also admin entries: two entries would
/// share an id, and the stored one would silently never be served.
fn check_not_shadowing(config: &Registry, admin: &[Arc<Entry>]) -> Result<(), EntryError> {
    let shadowed: Vec<(String, SpiffeId)> = config
        .entries()
        .iter()
        .filter(|c| admin.iter().any(|a| a.id == c.id))
        .map(|c| (c.id.clone(), c.spiffe_id.clone()))
        .collect();
    if shadowed.is_empty() {
        Ok(())
    } else {
        Err(EntryError::ShadowsAdminEntry(shadowed))
    }
}

/// The first item of `items` equal to an earlier one, as its index and the
/// earlier one's. Lists whose order carries no meaning (tools, DNS names,
/// trust domains, selectors) are refused with a repeat rather than stored
/// with it.
pub fn first_repeat<T: Eq + std::hash::Hash>(
    items: impl IntoIterator<Item = T>,
) -> Option<(usize, usize)> {
    let mut first_at = std::collections::HashMap::new();
    items
        .into_iter()
        .enumerate()
        .find_map(|(n, item)| first_at.insert(item, n).map(|first| (n, first)))
}

/// The refusal of an API request whose list `given` repeats an item, its
/// items compared as `compared` (parsed, or without case) gives them:
/// `item 2 ("jira") repeats item 0`.
pub fn repeated_item<T: Eq + std::hash::Hash>(
    given: &[impl AsRef<str>],
    compared: impl IntoIterator<Item = T>,
) -> Option<String> {
    first_repeat(compared).map(|(n, first)| {
        format!(
            "item {n} ({:?}) repeats item {first}",
            excerpt(given[n].as_ref())
        )
    })
}

/// The most selectors, DNS names and `federates_with` trust domains one
/// entry created through the admin API may have. With the longest items
/// (`MAX_SELECTOR_BYTES`, 253-byte names, 255-byte trust domains) and hint
/// an entry is some 300 KB: it always fits in one ListEntries page, so no
/// entry can make `writ entry list` fail for every operator.
pub const MAX_ENTRY_ITEMS: usize = 64;
/// The longest selector: a path of PATH_MAX (4096) bytes with its type and
/// key.
pub const MAX_SELECTOR_BYTES: usize = 4096 + 64;

fn invalid(field: &'static str, reason: impl Into<String>) -> EntryError {
    EntryError::Invalid {
        field,
        reason: reason.into(),
    }
}

pub struct EntryStore {
    agent: Arc<Agent>,
    store: Arc<Store>,
    trust_domain: TrustDomain,
    default_ttl: Duration,
    max_ttl: Duration,
    config_registry: Mutex<Registry>,
    /// Serializes create/delete so the registry is rebuilt in commit order.
    /// Shared with the registries built from it: a rebuild, one per create
    /// or delete, copies pointers, not entries.
    admin_entries: tokio::sync::Mutex<Vec<Arc<Entry>>>,
}

impl EntryStore {
    /// Loads persisted admin entries and installs the merged registry.
    /// Refuses a config entry that is also a stored admin entry (the store
    /// is left as it is).
    pub fn open(
        agent: Arc<Agent>,
        store: Arc<Store>,
        config_registry: Registry,
        default_ttl: Duration,
        max_ttl: Duration,
    ) -> Result<Arc<Self>, EntryError> {
        let trust_domain = agent.trust_domain().clone();
        let admin: Vec<Arc<Entry>> = store
            .read(load_entries)?
            .into_iter()
            .map(Arc::new)
            .collect();
        check_not_shadowing(&config_registry, &admin)?;
        // Created before the identity was reserved (by an older writ, or
        // before the bundle endpoint took it): kept, so it can be listed
        // in the log and deleted, but never served (see `install`).
        for entry in admin.iter().filter(|e| agent.is_reserved(&e.spiffe_id)) {
            tracing::error!(
                entry = %entry.id,
                spiffe_id = %entry.spiffe_id,
                "a stored registration entry holds a reserved SPIFFE ID and is not served: {}; delete it with `writ entry delete {}`",
                crate::federation::reserved_id_reason(&entry.spiffe_id),
                entry.id
            );
        }
        let this = Arc::new(Self {
            agent,
            store,
            trust_domain,
            default_ttl,
            max_ttl,
            config_registry: Mutex::new(config_registry),
            admin_entries: tokio::sync::Mutex::new(admin.clone()),
        });
        this.install(&admin);
        Ok(this)
    }

    fn install(&self, admin: &[Arc<Entry>]) {
        let base = self
            .config_registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.agent.set_registry(
            base.with_admin_entries(
                admin
                    .iter()
                    .filter(|e| !self.agent.is_reserved(&e.spiffe_id))
                    .cloned(),
            ),
        );
    }

    /// Checks new config-file entries (on reload) against the admin
    /// entries. Admin entries cannot be created or deleted until the
    /// returned update is installed or dropped, so the check still holds
    /// when it is installed.
    pub async fn prepare_config_registry(
        &self,
        registry: Registry,
    ) -> Result<ConfigRegistryUpdate<'_>, EntryError> {
        let admin = self.admin_entries.lock().await;
        check_not_shadowing(&registry, &admin)?;
        let claims = self.agent.identity_claims().write().await;
        self.check_not_held_by_tasks(&registry)?;
        Ok(ConfigRegistryUpdate {
            store: self,
            admin,
            registry,
            _claims: claims,
        })
    }

    /// Refuses config entries that would take an active task's identity
    /// or one below it, as `create` refuses admin entries. Only identities
    /// no running config entry has are looked up: a reload that keeps an
    /// entry adds nothing a task could lose to it.
    fn check_not_held_by_tasks(&self, registry: &Registry) -> Result<(), EntryError> {
        let running = self
            .config_registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let held: Vec<(String, SpiffeId, String, SpiffeId)> = registry
            .entries()
            .iter()
            .filter(|new| {
                !running
                    .entries()
                    .iter()
                    .any(|old| old.spiffe_id == new.spiffe_id)
            })
            .filter_map(|new| {
                self.agent
                    .active_task_at_or_above(&new.spiffe_id)
                    .map(|(task, task_spiffe_id)| {
                        (new.id.clone(), new.spiffe_id.clone(), task, task_spiffe_id)
                    })
            })
            .collect();
        if held.is_empty() {
            Ok(())
        } else {
            Err(EntryError::ConfigHeldByTask(held))
        }
    }

    /// Validates, stores and installs an entry, then records who created
    /// it: an entry decides who receives an identity, as much as an
    /// issuance does.
    pub async fn create(
        &self,
        req: pb::CreateEntryRequest,
        caller: CallerFacts,
    ) -> Result<Entry, EntryError> {
        let entry = self.validate(req)?;
        let mut admin = self.admin_entries.lock().await;
        if self
            .agent
            .registry()
            .entries()
            .iter()
            .any(|e| e.id == entry.id)
        {
            return Err(EntryError::AlreadyExists(entry.id));
        }
        // Held until the entry is installed: no task begins meanwhile, so
        // none can take its identity between this check and then.
        let _claims = self.agent.identity_claims().write().await;
        if let Some((task, task_spiffe_id)) = self.agent.active_task_at_or_above(&entry.spiffe_id) {
            return Err(EntryError::HeldByTask {
                spiffe_id: entry.spiffe_id,
                task,
                task_spiffe_id,
            });
        }
        let row = entry.clone();
        self.store
            .write(move |conn| store_entry(conn, &row))
            .await?;
        admin.push(Arc::new(entry.clone()));
        self.install(&admin);
        drop(admin);
        self.agent
            .record_best_effort(entry_event(EventKind::EntryCreated, &entry, caller))
            .await;
        Ok(entry)
    }

    /// Deletes an entry created over the admin API, and records who did.
    pub async fn delete(&self, id: &str, caller: CallerFacts) -> Result<(), EntryError> {
        if id.is_empty() {
            return Err(invalid("id", "required"));
        }
        let mut admin = self.admin_entries.lock().await;
        if !admin.iter().any(|e| e.id == id) {
            let in_config = self
                .config_registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entries()
                .iter()
                .any(|e| e.id == id);
            return Err(if in_config {
                EntryError::FromConfig(id.to_owned())
            } else {
                EntryError::NotFound(id.to_owned())
            });
        }
        let key = id.to_owned();
        self.store
            .write(move |conn| {
                conn.execute("DELETE FROM entries WHERE id = ?1", params![key])?;
                Ok(())
            })
            .await?;
        let deleted = admin.iter().find(|e| e.id == id).cloned();
        admin.retain(|e| e.id != id);
        self.install(&admin);
        drop(admin);
        if let Some(entry) = deleted {
            self.agent
                .record_best_effort(entry_event(EventKind::EntryDeleted, &entry, caller))
                .await;
        }
        Ok(())
    }

    fn validate(&self, req: pb::CreateEntryRequest) -> Result<Entry, EntryError> {
        let spiffe_id: SpiffeId = req
            .spiffe_id
            .parse()
            .map_err(|e: crate::spiffe_id::SpiffeIdError| invalid("spiffe_id", e.to_string()))?;
        if spiffe_id.trust_domain() != &self.trust_domain {
            return Err(invalid(
                "spiffe_id",
                format!("must be in trust domain {}", self.trust_domain),
            ));
        }
        if spiffe_id.is_trust_domain_id() {
            return Err(invalid("spiffe_id", "must have a path"));
        }
        if self.agent.is_reserved(&spiffe_id) {
            return Err(invalid(
                "spiffe_id",
                crate::federation::reserved_id_reason(&spiffe_id),
            ));
        }
        if req.selectors.is_empty() {
            return Err(invalid("selectors", "at least one selector is required"));
        }
        // Before anything else reads them: each is copied into the entry,
        // the store, and every ListEntries page that carries it.
        for (field, count) in [
            ("selectors", req.selectors.len()),
            ("dns_names", req.dns_names.len()),
            ("federates_with", req.federates_with.len()),
        ] {
            if count > MAX_ENTRY_ITEMS {
                return Err(invalid(
                    field,
                    format!("{count} given; an entry has at most {MAX_ENTRY_ITEMS}"),
                ));
            }
        }
        if let Some((n, long)) = req
            .selectors
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > MAX_SELECTOR_BYTES)
        {
            return Err(invalid(
                "selectors",
                format!(
                    "selector {n} ({:?}) is longer than {MAX_SELECTOR_BYTES} bytes",
                    excerpt(long)
                ),
            ));
        }
        let selectors = req
            .selectors
            .iter()
            .map(|s| {
                let selector = s
                    .parse::<Selector>()
                    .map_err(|e| invalid("selectors", e.to_string()))?;
                match selector.unmatchable() {
                    None => Ok(selector),
                    Some(why) => Err(invalid("selectors", why)),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        // An entry matches a set of selectors: a repeat says nothing more,
        // and most likely was meant as another selector.
        if let Some(why) = repeated_item(&req.selectors, &selectors) {
            return Err(invalid("selectors", why));
        }
        let ttl = if req.x509_svid_ttl.is_empty() {
            self.default_ttl
        } else {
            let ttl = parse_duration(&req.x509_svid_ttl)
                .map_err(|e| invalid("x509_svid_ttl", e.to_string()))?;
            // Certificates live whole seconds and the store keeps whole
            // seconds: a fraction would be lost on restart, and under a
            // second no SVID can be minted at all (every fetch of a matching
            // workload would fail).
            if ttl.subsec_nanos() != 0 {
                return Err(invalid(
                    "x509_svid_ttl",
                    format!(
                        "{:?} is not a whole number of seconds",
                        excerpt(&req.x509_svid_ttl)
                    ),
                ));
            }
            ttl
        };
        if ttl.is_zero() || ttl > self.max_ttl {
            return Err(invalid(
                "x509_svid_ttl",
                format!(
                    "must be positive and at most the CA lifetime ({}s)",
                    self.max_ttl.as_secs()
                ),
            ));
        }
        if req.hint.len() > MAX_HINT_BYTES {
            return Err(invalid(
                "hint",
                format!("longer than {MAX_HINT_BYTES} bytes"),
            ));
        }
        // The hint reaches workloads and their operators' terminals (`writ
        // api fetch` prints it): an escape sequence there could forge what
        // they are shown.
        if let Some(found) = writ_attestors::find_unshowable(&req.hint, &[]) {
            return Err(invalid(
                "hint",
                format!("contains {found}; such characters are not allowed"),
            ));
        }
        for name in &req.dns_names {
            crate::svid::validate_new_dns_name(name)
                .map_err(|e| invalid("dns_names", e.to_string()))?;
        }
        // DNS names compare without regard to case.
        if let Some(why) = repeated_item(
            &req.dns_names,
            req.dns_names.iter().map(|name| name.to_ascii_lowercase()),
        ) {
            return Err(invalid("dns_names", why));
        }
        let federates_with = req
            .federates_with
            .iter()
            .map(|t| {
                crate::federation::federated_trust_domain(t, Some(&self.trust_domain))
                    .map_err(|e| invalid("federates_with", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(why) = repeated_item(&req.federates_with, &federates_with) {
            return Err(invalid("federates_with", why));
        }
        let mut entry = Entry::new(spiffe_id, selectors, ttl, EntrySource::Admin);
        entry.dns_names = req.dns_names;
        entry.hint = req.hint;
        entry.federates_with = federates_with;
        Ok(entry)
    }
}

/// Config-file entries checked by [`EntryStore::prepare_config_registry`],
/// ready to replace the running ones; admin entries are kept.
pub struct ConfigRegistryUpdate<'a> {
    store: &'a EntryStore,
    admin: tokio::sync::MutexGuard<'a, Vec<Arc<Entry>>>,
    registry: Registry,
    /// No task begins until the new entries are installed (see
    /// `Agent::identity_claims`).
    _claims: tokio::sync::RwLockWriteGuard<'a, ()>,
}

impl ConfigRegistryUpdate<'_> {
    pub fn install(self) {
        *self
            .store
            .config_registry
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = self.registry;
        self.store.install(&self.admin);
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn store_entry(conn: &rusqlite::Connection, row: &Entry) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO entries(id, spiffe_id, selectors, x509_svid_ttl, dns_names, hint, federates_with, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            row.id,
            row.spiffe_id.to_string(),
            json(&row.selectors.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            row.x509_svid_ttl.as_secs() as i64,
            json(&row.dns_names),
            row.hint,
            json(&row.federates_with.iter().map(|t| t.to_string()).collect::<Vec<_>>()),
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0),
        ],
    )?;
    Ok(())
}

/// Every stored entry, as it was created. Only their form is checked here,
/// not the rules `validate` applies: an entry an older writ accepted (a path
/// selector not in the kernel's form, writ's own trust domain in
/// `federates_with`) matches nothing or adds nothing, and refusing to start
/// over it would leave the admin no way to list or delete it.
fn load_entries(conn: &rusqlite::Connection) -> Result<Vec<Entry>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, spiffe_id, selectors, x509_svid_ttl, dns_names, hint, federates_with
         FROM entries ORDER BY created_at, rowid",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(id, spiffe_id, selectors, ttl, dns, hint, fed)| {
            let corrupt = |what: String| StoreError::Corrupt(format!("entry {id}: {what}"));
            let spiffe_id: SpiffeId = spiffe_id.parse().map_err(|e| corrupt(format!("{e}")))?;
            let selectors: Vec<String> =
                serde_json::from_str(&selectors).map_err(|e| corrupt(e.to_string()))?;
            let selectors = selectors
                .iter()
                .map(|s| s.parse::<Selector>().map_err(|e| corrupt(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            let dns_names: Vec<String> =
                serde_json::from_str(&dns).map_err(|e| corrupt(e.to_string()))?;
            let fed: Vec<String> =
                serde_json::from_str(&fed).map_err(|e| corrupt(e.to_string()))?;
            let federates_with = fed
                .iter()
                .map(|t| TrustDomain::new(t).map_err(|e| corrupt(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            let mut entry = Entry::new(
                spiffe_id,
                selectors,
                Duration::from_secs(ttl.max(1) as u64),
                EntrySource::Admin,
            );
            if entry.id != id {
                return Err(corrupt("stored id does not match its content".into()));
            }
            entry.dns_names = dns_names;
            entry.hint = hint;
            entry.federates_with = federates_with;
            Ok(entry)
        })
        .collect()
}

/// The audit record of an entry created or deleted over the admin API:
/// the caller, and what the entry grants to whom.
fn entry_event(kind: EventKind, entry: &Entry, caller: CallerFacts) -> AuditEvent {
    AuditEvent::new(kind, ulid::Ulid::new().to_string())
        .caller(caller)
        .spiffe_id(entry.spiffe_id.to_string())
        .detail("entry_id", entry.id.clone())
        .detail(
            "selectors",
            entry
                .selectors
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .detail("x509_svid_ttl_secs", entry.x509_svid_ttl.as_secs())
        .detail("dns_names", entry.dns_names.clone())
        .detail(
            "federates_with",
            entry
                .federates_with
                .iter()
                .map(|td| td.to_string())
                .collect::<Vec<_>>(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn entries_stored_before_a_rule_was_added_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("writ.db")).unwrap();
        let selectors = [
            "unix:path:/a/../b",
            "cgroup:path:/system.slice/",
            "unix:uid:4294967296",
        ]
        .map(|s| s.parse::<Selector>().unwrap())
        .to_vec();
        assert!(selectors.iter().all(|s| s.unmatchable().is_some()));
        let mut entry = Entry::new(
            "spiffe://writ.test/old".parse().unwrap(),
            selectors,
            Duration::from_secs(3600),
            EntrySource::Admin,
        );
        entry.federates_with = vec![TrustDomain::new("writ.test").unwrap()];
        let row = entry.clone();
        store.write(move |c| store_entry(c, &row)).await.unwrap();
        assert_eq!(store.read(load_entries).unwrap(), [entry]);
        store.close();
    }
}
