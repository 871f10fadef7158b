//! The federation manager: loads stored and bootstrap bundles at start,
//! applies every change (fetched, set or deleted by hand) to the store first
//! and then to the agent's in-memory set, wakes streams, keeps each fetcher's
//! status for `writ bundle list`, and starts, stops and restarts the fetchers
//! as the configured trust domains change on reload.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::FederationError;
use super::persist;
use super::set::{BundleSource, FederatedBundle};
use crate::agent::Agent;
use crate::audit::{AuditEvent, EventKind};
use crate::bundle::TrustBundle;
use crate::config::{EndpointClientProfile, FederatedTrustDomainConfig, FederationConfig};
use crate::spiffe_id::TrustDomain;
use crate::store::Store;

/// System CA files tried, in order, for `https_web` peers without a
/// `ca_bundle` (Debian/Ubuntu, Fedora/RHEL, openSUSE, Alpine and others).
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// CA files hold hundreds of roots; a system bundle is a few hundred KiB.
const MAX_CA_FILE_BYTES: u64 = 8 << 20;

/// What the last fetch of a configured trust domain did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchStatus {
    pub url: String,
    pub last_attempt: Option<SystemTime>,
    pub last_success: Option<SystemTime>,
    /// Empty after a successful fetch.
    pub last_error: Option<String>,
    pub next_attempt: Option<SystemTime>,
}

/// One line of `writ bundle list`: a bundle held, a configured trust
/// domain, or both.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    pub trust_domain: TrustDomain,
    pub held: Option<Arc<FederatedBundle>>,
    /// Present for trust domains configured in `[[federation.trust_domain]]`.
    pub fetch: Option<FetchStatus>,
}

/// What changed in `[[federation.trust_domain]]` between two configs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FederationChanges {
    /// Newly configured: a fetcher starts.
    pub added: Vec<TrustDomain>,
    /// No longer configured: the fetcher stops; the bundle held stays (and
    /// is still served to workloads federating with it) until deleted.
    pub removed: Vec<TrustDomain>,
    /// URL, profile, endpoint SPIFFE ID, bootstrap file, redirects or the
    /// refresh floor changed: the fetcher restarts with the new settings.
    pub updated: Vec<TrustDomain>,
}

impl FederationChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.updated.is_empty()
    }
}

/// A new federation list, read and checked completely (CA files, bootstrap
/// bundles) but not yet applied: `Federation::apply` cannot fail on a file.
pub struct FederationPlan {
    next: FederationConfig,
    web_roots: BTreeMap<TrustDomain, Arc<RootCertStore>>,
    /// Bootstrap bundles of added or updated trust domains that had nothing
    /// held when the plan was made.
    bootstrap: Vec<TrustBundle>,
    pub changes: FederationChanges,
}

/// The configured trust domains and what their fetchers need.
struct Configured {
    config: FederationConfig,
    web_roots: BTreeMap<TrustDomain, Arc<RootCertStore>>,
}

/// A running fetcher: it ends when `retire` turns true (or is dropped).
struct FetcherHandle {
    retire: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Fetchers exist only between `spawn_fetchers` and shutdown.
struct Fetchers {
    stop: watch::Receiver<bool>,
    running: BTreeMap<TrustDomain, FetcherHandle>,
}

pub struct Federation {
    agent: Arc<Agent>,
    store: Arc<Store>,
    configured: Mutex<Configured>,
    fetchers: Mutex<Option<Fetchers>>,
    /// Store writes and in-memory swaps happen in the same order under this
    /// lock, so a fetch and a hand-made change can never leave the store
    /// and the served set disagreeing.
    changes: tokio::sync::Mutex<()>,
    status: Mutex<BTreeMap<TrustDomain, FetchStatus>>,
}

impl Federation {
    /// Loads every stored bundle into the agent, then bootstraps configured
    /// trust domains it holds nothing for from their `bundle` file. A
    /// stored bundle wins over the bootstrap file: after a restart writ
    /// continues from the latest bundle it fetched, not from the first.
    pub async fn load(
        agent: Arc<Agent>,
        store: Arc<Store>,
        config: FederationConfig,
    ) -> Result<Arc<Self>, FederationError> {
        let own = agent.trust_domain().clone();
        for row in persist::load_all(&store)? {
            match row {
                Ok(stored) if stored.bundle.trust_domain == own => {
                    tracing::warn!(trust_domain = %own, "ignoring a stored federated bundle for writ's own trust domain");
                }
                Ok(stored) => {
                    agent.federated_bundles().replace(
                        stored.bundle,
                        stored.source,
                        stored.updated_at,
                    );
                }
                Err(bad) => tracing::error!(
                    trust_domain = %bad.trust_domain,
                    reason = %bad.reason,
                    "a stored federated bundle is unreadable; it stays in the store but is not used"
                ),
            }
        }

        let (web_roots, bootstrap) = read_trust_domain_files(&agent, &config, |_| true)?;
        let status: BTreeMap<TrustDomain, FetchStatus> = config
            .trust_domains
            .iter()
            .map(|td| (td.name.clone(), fresh_status(td)))
            .collect();
        let stored_only: Vec<String> = agent
            .federated_bundles()
            .all()
            .keys()
            .filter(|td| !status.contains_key(*td))
            .map(|td| td.to_string())
            .collect();
        if !stored_only.is_empty() {
            tracing::info!(trust_domains = ?stored_only, "serving stored bundles of trust domains without a configured endpoint (remove with `writ bundle delete`)");
        }

        let federation = Arc::new(Self {
            agent,
            store,
            configured: Mutex::new(Configured { config, web_roots }),
            fetchers: Mutex::new(None),
            changes: tokio::sync::Mutex::new(()),
            status: Mutex::new(status),
        });
        for bundle in bootstrap {
            federation
                .set_bundle(bundle, BundleSource::Bootstrap)
                .await?;
        }
        Ok(federation)
    }

    /// The federation settings in force.
    pub fn config(&self) -> FederationConfig {
        lock(&self.configured).config.clone()
    }

    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// Whether `trust_domain` has a configured bundle endpoint.
    pub fn is_configured(&self, trust_domain: &TrustDomain) -> bool {
        lock(&self.configured)
            .config
            .trust_domains
            .iter()
            .any(|td| &td.name == trust_domain)
    }

    /// The latest X.509 authorities held for `trust_domain`: writ's own for
    /// its own trust domain, else the federated bundle's.
    pub fn authorities_of(
        &self,
        trust_domain: &TrustDomain,
    ) -> Option<Vec<CertificateDer<'static>>> {
        if trust_domain == self.agent.trust_domain() {
            return Some(self.agent.own_bundle().bundle.x509_authorities.clone());
        }
        self.agent
            .federated_bundles()
            .get(trust_domain)
            .map(|held| held.bundle.x509_authorities.clone())
    }

    /// Stores `bundle` (replacing whatever was held for its trust domain),
    /// then serves it and wakes every stream. Writ's own trust domain is
    /// refused: its bundle comes from its CA alone. So is a bundle that
    /// would trust nothing (`check_usable`).
    pub async fn set_bundle(
        &self,
        bundle: TrustBundle,
        source: BundleSource,
    ) -> Result<Arc<FederatedBundle>, FederationError> {
        self.set_bundle_by(bundle, source, None).await
    }

    /// `set_bundle`, on behalf of `caller` (an operator over the admin
    /// API), whom the audit record names.
    pub async fn set_bundle_by(
        &self,
        bundle: TrustBundle,
        source: BundleSource,
        caller: Option<crate::audit::CallerFacts>,
    ) -> Result<Arc<FederatedBundle>, FederationError> {
        if &bundle.trust_domain == self.agent.trust_domain() {
            return Err(FederationError::OwnTrustDomain(bundle.trust_domain));
        }
        // A fetched document was checked by its fetcher already, against
        // the profile it was fetched with.
        if source != BundleSource::Fetched {
            self.check_usable(&bundle)?;
        }
        // Stored, listed and served as a SPIFFE document, which may be
        // larger than the form it came in (PEM, or compact JSON): one past
        // the limit every reader applies could not be read back at start.
        let stored_size = bundle.to_spiffe_json().len();
        if stored_size > crate::bundle::MAX_BUNDLE_BYTES {
            return Err(FederationError::InvalidBundle(format!(
                "as a SPIFFE bundle document it is {stored_size} bytes; the limit is {}",
                crate::bundle::MAX_BUNDLE_BYTES
            )));
        }
        let _serial = self.changes.lock().await;
        let now = SystemTime::now();
        let to_store = bundle.clone();
        self.store
            .write(move |conn| persist::save(conn, &to_store, source, now))
            .await?;
        let previous = self.agent.federated_bundles().get(&bundle.trust_domain);
        let installed = self.agent.federated_bundles().replace(bundle, source, now);
        let mut event = record_bundle_change(&BundleChange::Set {
            installed: &installed,
            previous: previous.as_deref(),
        });
        if let Some(caller) = caller {
            event = event.caller(caller);
        }
        self.agent.record_best_effort(event).await;
        self.agent.notify(crate::changes::Change::Documents);
        Ok(installed)
    }

    /// Refuses a bundle that would trust nothing, by the rule a fetched
    /// document for its trust domain obeys: set by hand, it would replace
    /// a good bundle and end the federation with that peer just as surely
    /// (and, with a self-serving endpoint, any way to fetch again).
    fn check_usable(&self, bundle: &TrustBundle) -> Result<(), FederationError> {
        let self_serving = lock(&self.configured)
            .config
            .trust_domains
            .iter()
            .any(|td| td.name == bundle.trust_domain && td.is_self_serving());
        super::usable::check_usable(bundle, self_serving, SystemTime::now()).map_err(|problem| {
            FederationError::Unusable {
                trust_domain: bundle.trust_domain.clone(),
                problem,
            }
        })
    }

    /// Installs a freshly fetched bundle unless it is exactly what is held
    /// already (the common case between rotations: nothing to write).
    pub(super) async fn install_fetched(&self, bundle: TrustBundle) -> Result<(), FederationError> {
        let unchanged = self
            .agent
            .federated_bundles()
            .get(&bundle.trust_domain)
            .is_some_and(|held| {
                held.source == BundleSource::Fetched && held.bundle.same_content(&bundle)
            });
        if !unchanged {
            self.set_bundle(bundle, BundleSource::Fetched).await?;
        }
        Ok(())
    }

    /// Forgets the bundle of `trust_domain` (store first). Configured trust
    /// domains are refused: their fetcher would bring the bundle straight
    /// back, so the configuration is the place to end that relationship.
    pub async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<(), FederationError> {
        self.delete_bundle_by(trust_domain, None).await
    }

    /// `delete_bundle`, on behalf of `caller`, whom the audit record names.
    pub async fn delete_bundle_by(
        &self,
        trust_domain: &TrustDomain,
        caller: Option<crate::audit::CallerFacts>,
    ) -> Result<(), FederationError> {
        if trust_domain == self.agent.trust_domain() {
            return Err(FederationError::OwnTrustDomain(trust_domain.clone()));
        }
        if self.is_configured(trust_domain) {
            return Err(FederationError::Configured(trust_domain.clone()));
        }
        let _serial = self.changes.lock().await;
        let td = trust_domain.clone();
        let stored = self
            .store
            .write(move |conn| persist::delete(conn, &td))
            .await?;
        let removed = self.agent.federated_bundles().remove(trust_domain);
        if !stored && removed.is_none() {
            return Err(FederationError::NotFound(trust_domain.clone()));
        }
        let mut event = record_bundle_change(&BundleChange::Deleted {
            trust_domain,
            previous: removed.as_deref(),
        });
        if let Some(caller) = caller {
            event = event.caller(caller);
        }
        self.agent.record_best_effort(event).await;
        self.agent.notify(crate::changes::Change::Documents);
        Ok(())
    }

    /// Every bundle held and every configured trust domain, by name.
    pub fn list(&self) -> Vec<BundleInfo> {
        let held = self.agent.federated_bundles().all();
        let status = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut names: Vec<&TrustDomain> = held.keys().chain(status.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|td| BundleInfo {
                trust_domain: td.clone(),
                held: held.get(td).cloned(),
                fetch: status.get(td).cloned(),
            })
            .collect()
    }

    pub fn fetch_status(&self, trust_domain: &TrustDomain) -> Option<FetchStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(trust_domain)
            .cloned()
    }

    pub(super) fn record_attempt(
        &self,
        trust_domain: &TrustDomain,
        at: SystemTime,
        error: Option<String>,
        next: SystemTime,
    ) {
        self.agent
            .metrics()
            .federation_fetch(trust_domain.name(), error.is_none());
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = status.get_mut(trust_domain) {
            s.last_attempt = Some(at);
            if error.is_none() {
                s.last_success = Some(at);
            }
            s.last_error = error;
            s.next_attempt = Some(next);
        }
    }

    /// Starts one fetcher per configured trust domain; each stops when
    /// `stop` turns true. Fetchers started later by `apply` obey it too.
    pub fn spawn_fetchers(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        let configured = lock(&self.configured);
        let running = configured
            .config
            .trust_domains
            .iter()
            .map(|td| {
                let handle = self.start_fetcher(&configured, td, stop.clone());
                (td.name.clone(), handle)
            })
            .collect();
        *lock(&self.fetchers) = Some(Fetchers { stop, running });
    }

    fn start_fetcher(
        self: &Arc<Self>,
        configured: &Configured,
        td: &FederatedTrustDomainConfig,
        stop: watch::Receiver<bool>,
    ) -> FetcherHandle {
        let (retire, retired) = watch::channel(false);
        let task = tokio::spawn(super::fetcher::run(
            self.clone(),
            td.clone(),
            configured.web_roots.get(&td.name).cloned(),
            configured.config.min_refresh_interval,
            stop,
            retired,
        ));
        FetcherHandle { retire, task }
    }

    /// The running fetchers' tasks, handed over for the caller to await at
    /// shutdown (after the stop signal). No fetcher starts after this.
    pub fn take_fetcher_tasks(&self) -> Vec<JoinHandle<()>> {
        lock(&self.fetchers)
            .take()
            .map(|f| f.running.into_values().map(|h| h.task).collect())
            .unwrap_or_default()
    }

    /// Reads and checks everything `next` needs (CA files of https_web
    /// trust domains, bootstrap bundle files) and works out what changes.
    /// Nothing is applied; an error names the file and the problem.
    pub fn plan(&self, next: &FederationConfig) -> Result<FederationPlan, FederationError> {
        let current = self.config();
        let mut changes = diff(&current, next);
        let touched =
            |name: &TrustDomain| changes.added.contains(name) || changes.updated.contains(name);
        let (mut web_roots, bootstrap) = read_trust_domain_files(&self.agent, next, touched)?;
        // An unchanged trust domain's bootstrap file is not read again (it
        // only matters while no bundle is held), but its CA file is: a
        // replaced CA bundle under the same path must reach the fetcher,
        // which then restarts as for any other update.
        let mut new_roots = Vec::new();
        {
            let configured = lock(&self.configured);
            for td in next.trust_domains.iter().filter(|td| !touched(&td.name)) {
                let EndpointClientProfile::HttpsWeb { ca_bundle } = &td.profile else {
                    continue;
                };
                let fresh = load_web_roots(ca_bundle.as_deref())?;
                match configured.web_roots.get(&td.name) {
                    Some(held) if held.roots == fresh.roots => {
                        web_roots.insert(td.name.clone(), held.clone());
                    }
                    _ => {
                        web_roots.insert(td.name.clone(), Arc::new(fresh));
                        new_roots.push(td.name.clone());
                    }
                }
            }
        }
        changes.updated.extend(new_roots);
        changes.updated.sort();
        Ok(FederationPlan {
            next: next.clone(),
            web_roots,
            bootstrap,
            changes,
        })
    }

    /// Applies a plan: stores the bootstrap bundles of new trust domains
    /// (all in one transaction; if that fails nothing has changed), then
    /// stops the fetchers of removed and updated trust domains, waits for
    /// them to end, and starts those of added and updated ones. A removed
    /// trust domain's bundle stays held and served, no longer refreshed,
    /// until `writ bundle delete` removes it (as SPIRE keeps a federated
    /// bundle until it is deleted).
    pub async fn apply(self: &Arc<Self>, plan: FederationPlan) -> Result<(), FederationError> {
        let FederationPlan {
            next,
            web_roots,
            bootstrap,
            changes,
        } = plan;
        self.install_bootstraps(bootstrap).await?;

        let retiring: Vec<FetcherHandle> = {
            let mut fetchers = lock(&self.fetchers);
            match fetchers.as_mut() {
                Some(f) => changes
                    .removed
                    .iter()
                    .chain(&changes.updated)
                    .filter_map(|td| f.running.remove(td))
                    .collect(),
                None => Vec::new(),
            }
        };
        for handle in &retiring {
            handle.retire.send_replace(true);
        }
        // A fetch in flight is abandoned at once; one already storing its
        // bundle finishes that first, so the store and the served set
        // agree. Only then can its successor start.
        for handle in retiring {
            let _ = handle.task.await;
        }

        {
            let mut status = lock(&self.status);
            for td in &changes.removed {
                status.remove(td);
                self.agent.metrics().drop_federation_fetch_series(td.name());
            }
            for td in next
                .trust_domains
                .iter()
                .filter(|td| changes.added.contains(&td.name) || changes.updated.contains(&td.name))
            {
                status.insert(td.name.clone(), fresh_status(td));
                self.agent.metrics().federation_fetch_series(td.name.name());
            }
        }
        let mut configured = lock(&self.configured);
        *configured = Configured {
            config: next,
            web_roots,
        };
        let mut fetchers = lock(&self.fetchers);
        if let Some(f) = fetchers.as_mut() {
            let stop = f.stop.clone();
            for td in
                configured.config.trust_domains.iter().filter(|td| {
                    changes.added.contains(&td.name) || changes.updated.contains(&td.name)
                })
            {
                let handle = self.start_fetcher(&configured, td, stop.clone());
                f.running.insert(td.name.clone(), handle);
            }
        }
        for td in &changes.added {
            tracing::info!(trust_domain = %td, "federation: trust domain added; fetching its bundle");
        }
        for td in &changes.updated {
            tracing::info!(trust_domain = %td, "federation: trust domain settings changed; fetcher restarted");
        }
        for td in &changes.removed {
            tracing::info!(trust_domain = %td, "federation: trust domain removed; no longer fetched (its last bundle stays until `writ bundle delete`)");
        }
        Ok(())
    }

    /// Stores and installs bootstrap bundles for trust domains that still
    /// hold nothing, in one store transaction.
    async fn install_bootstraps(&self, bundles: Vec<TrustBundle>) -> Result<(), FederationError> {
        let _serial = self.changes.lock().await;
        let needed: Vec<TrustBundle> = bundles
            .into_iter()
            .filter(|b| {
                self.agent
                    .federated_bundles()
                    .get(&b.trust_domain)
                    .is_none()
            })
            .collect();
        if needed.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        let to_store = needed.clone();
        self.store
            .write(move |conn| {
                for bundle in &to_store {
                    persist::save(conn, bundle, BundleSource::Bootstrap, now)?;
                }
                Ok(())
            })
            .await?;
        for bundle in needed {
            let installed =
                self.agent
                    .federated_bundles()
                    .replace(bundle, BundleSource::Bootstrap, now);
            let event = record_bundle_change(&BundleChange::Set {
                installed: &installed,
                previous: None,
            });
            self.agent.record_best_effort(event).await;
        }
        self.agent.notify(crate::changes::Change::Documents);
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn fresh_status(td: &FederatedTrustDomainConfig) -> FetchStatus {
    FetchStatus {
        url: td.url.clone(),
        ..FetchStatus::default()
    }
}

/// Which trust domains `next` adds, removes and changes relative to
/// `current`. A new refresh floor changes every fetcher's schedule.
pub fn diff(current: &FederationConfig, next: &FederationConfig) -> FederationChanges {
    let before: BTreeMap<&TrustDomain, &FederatedTrustDomainConfig> = current
        .trust_domains
        .iter()
        .map(|td| (&td.name, td))
        .collect();
    let after: BTreeMap<&TrustDomain, &FederatedTrustDomainConfig> =
        next.trust_domains.iter().map(|td| (&td.name, td)).collect();
    let floor_changed = current.min_refresh_interval != next.min_refresh_interval;
    let mut changes = FederationChanges::default();
    for (name, td) in &after {
        match before.get(name) {
            None => changes.added.push((*name).clone()),
            Some(old) if floor_changed || old != td => changes.updated.push((*name).clone()),
            Some(_) => {}
        }
    }
    changes.removed = before
        .keys()
        .filter(|name| !after.contains_key(*name))
        .map(|name| (*name).clone())
        .collect();
    changes
}

/// Loads the CA roots of every https_web trust domain `wanted` selects and
/// reads its bootstrap file; returns the roots and the bootstrap bundles
/// of those holding nothing yet, each checked to trust something (as a
/// fetched document must). A file is read even when a held bundle makes it
/// unnecessary, so a broken one is reported now rather than on some later
/// day.
#[allow(clippy::type_complexity)]
fn read_trust_domain_files(
    agent: &Agent,
    config: &FederationConfig,
    wanted: impl Fn(&TrustDomain) -> bool,
) -> Result<(BTreeMap<TrustDomain, Arc<RootCertStore>>, Vec<TrustBundle>), FederationError> {
    let mut web_roots = BTreeMap::new();
    let mut bootstrap = Vec::new();
    let now = SystemTime::now();
    for td in config.trust_domains.iter().filter(|td| wanted(&td.name)) {
        if let EndpointClientProfile::HttpsWeb { ca_bundle } = &td.profile {
            web_roots.insert(
                td.name.clone(),
                Arc::new(load_web_roots(ca_bundle.as_deref())?),
            );
        }
        if let Some(path) = &td.bundle {
            let bundle = read_bundle_file(path, &td.name)?;
            if agent.federated_bundles().get(&td.name).is_none() {
                // Only a bootstrap bundle about to be installed must be
                // usable. Once a bundle is held the file is never used,
                // and the roots in it expire in the normal course (a
                // SPIRE peer's within a day by default), which must not
                // stop writ from starting or reloading.
                super::usable::check_usable(&bundle, td.is_self_serving(), now).map_err(
                    |problem| FederationError::File {
                        path: path.clone(),
                        reason: FederationError::Unusable {
                            trust_domain: td.name.clone(),
                            problem,
                        }
                        .to_string(),
                    },
                )?;
                bootstrap.push(bundle);
            }
        }
    }
    Ok((web_roots, bootstrap))
}

/// A change to the federated bundle set, as the audit trail will see it.
pub enum BundleChange<'a> {
    Set {
        installed: &'a FederatedBundle,
        previous: Option<&'a FederatedBundle>,
    },
    Deleted {
        trust_domain: &'a TrustDomain,
        previous: Option<&'a FederatedBundle>,
    },
}

/// Every change to which foreign authorities writ trusts and hands to
/// workloads passes through here, after it is stored and before streams are
/// woken: logged, and returned as the audit record the caller appends.
fn record_bundle_change(change: &BundleChange<'_>) -> AuditEvent {
    let id = ulid::Ulid::new().to_string();
    match change {
        BundleChange::Set {
            installed,
            previous,
        } => {
            let authorities_changed = previous.is_none_or(|p| p.revision != installed.revision);
            tracing::info!(
                event = "federation.bundle_changed",
                trust_domain = %installed.bundle.trust_domain,
                source = %installed.source,
                sequence = installed.bundle.sequence,
                x509_authorities = installed.bundle.x509_authorities.len(),
                jwt_authorities = installed.bundle.jwt_authorities.len(),
                previous_sequence = previous.map(|p| p.bundle.sequence),
                authorities_changed,
                "federated bundle updated"
            );
            AuditEvent::new(EventKind::FederationBundleChanged, id)
                .reason("set")
                .detail("trust_domain", installed.bundle.trust_domain.to_string())
                .detail("source", installed.source.to_string())
                .detail("sequence", installed.bundle.sequence)
                .detail("previous_sequence", previous.map(|p| p.bundle.sequence))
                .detail("x509_authorities", installed.bundle.x509_authorities.len())
                .detail("jwt_authorities", installed.bundle.jwt_authorities.len())
                .detail("authorities_changed", authorities_changed)
        }
        BundleChange::Deleted {
            trust_domain,
            previous,
        } => {
            tracing::info!(
                event = "federation.bundle_deleted",
                trust_domain = %trust_domain,
                previous_sequence = previous.map(|p| p.bundle.sequence),
                "federated bundle deleted"
            );
            AuditEvent::new(EventKind::FederationBundleChanged, id)
                .reason("deleted")
                .detail("trust_domain", trust_domain.to_string())
                .detail("previous_sequence", previous.map(|p| p.bundle.sequence))
        }
    }
}

/// Reads a bundle file: a SPIFFE bundle document if it starts with `{`,
/// PEM certificates otherwise.
pub fn read_bundle_file(
    path: &Path,
    trust_domain: &TrustDomain,
) -> Result<TrustBundle, FederationError> {
    let text = super::read_limited(path)?;
    super::parse_bundle(trust_domain.clone(), text.as_bytes(), None).map_err(|e| {
        FederationError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    })
}

/// Reads every file `config` names for its trust domains, as a start does,
/// without an agent: each https_web trust domain's CA file (or the
/// system's) and each bootstrap bundle. Every problem found.
pub(super) fn check_trust_domain_files(config: &FederationConfig) -> Vec<FederationError> {
    let mut problems = Vec::new();
    for td in &config.trust_domains {
        if let EndpointClientProfile::HttpsWeb { ca_bundle } = &td.profile
            && let Err(e) = load_web_roots(ca_bundle.as_deref())
        {
            problems.push(e);
        }
        if let Some(path) = &td.bundle
            && let Err(e) = read_bundle_file(path, &td.name)
        {
            problems.push(e);
        }
    }
    problems
}

fn load_web_roots(ca_bundle: Option<&Path>) -> Result<RootCertStore, FederationError> {
    let path = match ca_bundle {
        Some(path) => path.to_owned(),
        None => SYSTEM_CA_FILES
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .ok_or_else(|| FederationError::NoSystemRoots(SYSTEM_CA_FILES.join(", ")))?
            .to_owned(),
    };
    let bad = |reason: String| FederationError::File {
        path: path.clone(),
        reason,
    };
    let text = super::read_limited_to(&path, MAX_CA_FILE_BYTES)?;
    let certs: Vec<CertificateDer<'static>> = pem::parse_many(&text)
        .map_err(|e| bad(format!("not PEM: {e}")))?
        .into_iter()
        .filter(|block| block.tag() == "CERTIFICATE")
        .map(|block| CertificateDer::from(block.into_contents()))
        .collect();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad("holds no usable CA certificate".into()));
    }
    Ok(roots)
}
