//! Resolving an attested caller to the identities it is entitled to: the
//! registration entries whose selectors it all has (and, for tasks, the task
//! bindings it falls inside). Who the caller is comes from `peer` and the
//! attestors; this module only decides what such a caller may receive.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use writ_attestors::Selector;

use crate::config::{Config, EntryConfig};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Hints travel in a protobuf string; the Workload API caps them.
pub const MAX_HINT_BYTES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntrySource {
    Config,
    Admin,
}

impl EntrySource {
    pub fn as_str(self) -> &'static str {
        match self {
            EntrySource::Config => "config",
            EntrySource::Admin => "admin",
        }
    }
}

/// A registration entry: processes with all of `selectors` get `spiffe_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Derived from the SPIFFE ID and selector set, so the same entry keeps the
    /// same id across restarts and reloads (and keeps its cached SVID).
    pub id: String,
    pub spiffe_id: SpiffeId,
    /// Sorted and deduplicated.
    pub selectors: Vec<Selector>,
    pub x509_svid_ttl: Duration,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub federates_with: Vec<TrustDomain>,
    pub source: EntrySource,
}

impl Entry {
    pub fn new(
        spiffe_id: SpiffeId,
        mut selectors: Vec<Selector>,
        x509_svid_ttl: Duration,
        source: EntrySource,
    ) -> Self {
        selectors.sort();
        selectors.dedup();
        let id = entry_id(&spiffe_id, &selectors);
        Self {
            id,
            spiffe_id,
            selectors,
            x509_svid_ttl,
            dns_names: Vec::new(),
            hint: String::new(),
            federates_with: Vec::new(),
            source,
        }
    }

    fn from_config(entry: &EntryConfig, default_ttl: Duration) -> Self {
        let mut e = Entry::new(
            entry.spiffe_id.clone(),
            entry.selectors.clone(),
            entry.x509_svid_ttl.unwrap_or(default_ttl),
            EntrySource::Config,
        );
        e.dns_names = entry.dns_names.clone();
        e.hint = entry.hint.clone();
        e.federates_with = entry.federates_with.clone();
        e
    }

    /// True when the caller has every selector the entry names. Both lists
    /// are sorted, so this is a single merge pass.
    pub fn matches(&self, caller_selectors: &[Selector]) -> bool {
        let mut have = caller_selectors.iter();
        'want: for want in &self.selectors {
            for s in have.by_ref() {
                match s.cmp(want) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => continue 'want,
                    std::cmp::Ordering::Greater => return false,
                }
            }
            return false;
        }
        true
    }
}

/// What an entry's cache key (`Entitlement::cache_key`) is its id after.
pub const ENTRY_CACHE_PREFIX: &str = "entry:";

/// Hex digits in an entry id: the first 8 bytes of its SHA-256.
const ENTRY_ID_LEN: usize = 16;

/// Whether `text` has the form of an entry id (not whether one exists).
pub fn is_entry_id(text: &str) -> bool {
    text.len() == ENTRY_ID_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn entry_id(spiffe_id: &SpiffeId, selectors: &[Selector]) -> String {
    let mut h = Sha256::new();
    h.update(spiffe_id.to_string().as_bytes());
    for s in selectors {
        h.update(b"\n");
        h.update(s.to_string().as_bytes());
    }
    hex::encode(&h.finalize()[..ENTRY_ID_LEN / 2])
}

/// The registration entries in force, in their documented order: config
/// entries in file order, then entries created through the admin API in the
/// order they were created.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Vec<Arc<Entry>>,
}

impl Registry {
    pub fn from_config(config: &Config) -> Self {
        let entries = config
            .entries
            .iter()
            .map(|e| Arc::new(Entry::from_config(e, config.ca.x509_svid_ttl)))
            .collect();
        Self { entries }
    }

    pub fn with_admin_entries(mut self, admin: impl IntoIterator<Item = Arc<Entry>>) -> Self {
        self.entries.extend(admin);
        self
    }

    pub fn entries(&self) -> &[Arc<Entry>] {
        &self.entries
    }

    pub fn matching<'a>(
        &'a self,
        selectors: &'a [Selector],
    ) -> impl Iterator<Item = &'a Arc<Entry>> {
        self.entries.iter().filter(move |e| e.matches(selectors))
    }
}

/// One identity a caller may hold right now, with what minting it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitlement {
    /// Identifies the SVID this entitlement shares with every other caller
    /// entitled the same way (an entry id, or a task id).
    pub cache_key: String,
    pub spiffe_id: SpiffeId,
    pub x509_svid_ttl: Duration,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub federates_with: Vec<TrustDomain>,
    /// A task identity must never outlive its task.
    pub not_after_cap: Option<SystemTime>,
    pub task_id: Option<String>,
    /// For a sub-task's identity, its parent task: the caller holds the
    /// sub-task's identity instead of the parent's, so ending the sub-task
    /// may give the parent's back.
    pub parent_task_id: Option<String>,
}

impl Entitlement {
    pub fn from_entry(entry: &Entry) -> Self {
        Self {
            cache_key: format!("{ENTRY_CACHE_PREFIX}{}", entry.id),
            spiffe_id: entry.spiffe_id.clone(),
            x509_svid_ttl: entry.x509_svid_ttl,
            dns_names: entry.dns_names.clone(),
            hint: entry.hint.clone(),
            federates_with: entry.federates_with.clone(),
            not_after_cap: None,
            task_id: None,
            parent_task_id: None,
        }
    }
}

/// Orders and filters candidate identities into what a response carries:
/// task identities first (the task the caller is working on is its default),
/// then entries in registry order; the first of a repeated SPIFFE ID wins, and
/// an identity whose non-empty hint was already used is dropped, because the
/// Workload API requires hints to be unique within a response.
pub fn finalize(candidates: impl IntoIterator<Item = Entitlement>) -> Vec<Entitlement> {
    let mut seen_ids = HashSet::new();
    let mut seen_hints = HashSet::new();
    let mut out = Vec::new();
    for c in candidates {
        if !seen_ids.insert(c.spiffe_id.clone()) {
            continue;
        }
        if !c.hint.is_empty() && !seen_hints.insert(c.hint.clone()) {
            tracing::warn!(spiffe_id = %c.spiffe_id, hint = %c.hint, "dropping identity with duplicate hint");
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    fn sorted(v: &[&str]) -> Vec<Selector> {
        let mut v: Vec<Selector> = v.iter().map(|s| sel(s)).collect();
        v.sort();
        v
    }

    fn entry(id: &str, selectors: &[&str]) -> Entry {
        Entry::new(
            id.parse().unwrap(),
            selectors.iter().map(|s| sel(s)).collect(),
            Duration::from_secs(3600),
            EntrySource::Config,
        )
    }

    #[test]
    fn entry_matches_only_when_every_selector_is_present() {
        let e = entry(
            "spiffe://x.org/a",
            &["unix:uid:1000", "cgroup:path:/system.slice/a.service"],
        );
        assert!(e.matches(&sorted(&[
            "unix:uid:1000",
            "unix:gid:1000",
            "cgroup:path:/system.slice",
            "cgroup:path:/system.slice/a.service",
        ])));
        assert!(!e.matches(&sorted(&["unix:uid:1000"])));
        assert!(!e.matches(&sorted(&[
            "unix:uid:1001",
            "cgroup:path:/system.slice/a.service"
        ])));
        assert!(!e.matches(&[]));
    }

    #[test]
    fn entry_ids_are_stable_and_ignore_selector_order() {
        let a = entry("spiffe://x.org/a", &["unix:uid:1", "unix:gid:2"]);
        let b = entry("spiffe://x.org/a", &["unix:gid:2", "unix:uid:1"]);
        let c = entry("spiffe://x.org/b", &["unix:gid:2", "unix:uid:1"]);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
    }

    #[test]
    fn finalize_keeps_order_and_drops_duplicate_ids_and_hints() {
        let mut a = Entitlement::from_entry(&entry("spiffe://x.org/a", &["unix:uid:1"]));
        a.hint = "internal".into();
        let a2 = Entitlement::from_entry(&entry("spiffe://x.org/a", &["unix:gid:1"]));
        let mut b = Entitlement::from_entry(&entry("spiffe://x.org/b", &["unix:uid:1"]));
        b.hint = "internal".into();
        let c = Entitlement::from_entry(&entry("spiffe://x.org/c", &["unix:uid:1"]));
        let out = finalize([a.clone(), a2, b, c.clone()]);
        assert_eq!(out, vec![a, c]);
    }
}
