//! The federation manager: loads stored and bootstrap bundles at start,
//! applies every change (fetched, set or deleted by hand) to the store first
//! and then to the agent's in-memory set, wakes streams, keeps each fetcher's
//! status for `writ bundle list`, and starts the fetchers.

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
use crate::config::{EndpointClientProfile, FederationConfig};
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

pub struct Federation {
    agent: Arc<Agent>,
    store: Arc<Store>,
    config: FederationConfig,
    web_roots: BTreeMap<TrustDomain, Arc<RootCertStore>>,
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

        let mut web_roots = BTreeMap::new();
        let mut status = BTreeMap::new();
        let mut bootstrap = Vec::new();
        for td in &config.trust_domains {
            status.insert(
                td.name.clone(),
                FetchStatus {
                    url: td.url.clone(),
                    ..FetchStatus::default()
                },
            );
            if let EndpointClientProfile::HttpsWeb { ca_bundle } = &td.profile {
                web_roots.insert(
                    td.name.clone(),
                    Arc::new(load_web_roots(ca_bundle.as_deref())?),
                );
            }
            // Read even when a stored bundle makes it unnecessary, so a
            // broken file is reported now rather than on some later day.
            if let Some(path) = &td.bundle {
                let bundle = read_bundle_file(path, &td.name)?;
                if agent.federated_bundles().get(&td.name).is_none() {
                    bootstrap.push(bundle);
                }
            }
        }
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
            config,
            web_roots,
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

    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// Whether `trust_domain` has a configured bundle endpoint.
    pub fn is_configured(&self, trust_domain: &TrustDomain) -> bool {
        self.config
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
    /// refused: its bundle comes from its CA alone.
    pub async fn set_bundle(
        &self,
        bundle: TrustBundle,
        source: BundleSource,
    ) -> Result<Arc<FederatedBundle>, FederationError> {
        if &bundle.trust_domain == self.agent.trust_domain() {
            return Err(FederationError::OwnTrustDomain(bundle.trust_domain));
        }
        let _serial = self.changes.lock().await;
        let now = SystemTime::now();
        let to_store = bundle.clone();
        self.store
            .write(move |conn| persist::save(conn, &to_store, source, now))
            .await?;
        let previous = self.agent.federated_bundles().get(&bundle.trust_domain);
        let installed = self.agent.federated_bundles().replace(bundle, source, now);
        let event = record_bundle_change(&BundleChange::Set {
            installed: &installed,
            previous: previous.as_deref(),
        });
        self.agent.record_best_effort(event).await;
        self.agent.notify(crate::changes::Change::Documents);
        Ok(installed)
    }

    /// Installs a freshly fetched bundle unless it is exactly what is held
    /// already (the common case between rotations: nothing to write).
    pub(super) async fn install_fetched(&self, bundle: TrustBundle) -> Result<(), FederationError> {
        let unchanged = self
            .agent
            .federated_bundles()
            .get(&bundle.trust_domain)
            .is_some_and(|held| held.source == BundleSource::Fetched && held.bundle == bundle);
        if !unchanged {
            self.set_bundle(bundle, BundleSource::Fetched).await?;
        }
        Ok(())
    }

    /// Forgets the bundle of `trust_domain` (store first). Configured trust
    /// domains are refused: their fetcher would bring the bundle straight
    /// back, so the configuration is the place to end that relationship.
    pub async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<(), FederationError> {
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
        let event = record_bundle_change(&BundleChange::Deleted {
            trust_domain,
            previous: removed.as_deref(),
        });
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
    /// `stop` turns true.
    pub fn spawn_fetchers(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        self.config
            .trust_domains
            .iter()
            .map(|td| {
                tokio::spawn(super::fetcher::run(
                    self.clone(),
                    td.clone(),
                    self.web_roots.get(&td.name).cloned(),
                    stop.clone(),
                ))
            })
            .collect()
    }
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
