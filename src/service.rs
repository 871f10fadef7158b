//! Wiring the agent together: build it from a validated config, bind the
//! sockets with the right modes, serve the Workload API with health and
//! reflection beside it, run the federation bundle endpoint and fetchers,
//! drive CA rotation, and stop cleanly.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::stat::Mode;
use tokio::net::UnixListener;
use writ_attestors::{AttestorConfig, AttestorSet, CgroupConfig, UnixConfig};

use crate::admin_api::{
    AdminAuthorization, AdminContext, BundlesService, EntriesService, TasksService,
};
use crate::agent::Agent;
use crate::ca::{CaSettings, CertificateAuthority, UpstreamCaFiles};
use crate::config::Config;
use crate::entries::{EntryError, EntryStore};
use crate::federation::{BundleEndpoint, Federation, FederationError};
use crate::identity::Registry;
use crate::peer;
use crate::proto::admin::bundles_server::BundlesServer;
use crate::proto::admin::entries_server::EntriesServer;
use crate::proto::admin::tasks_server::TasksServer;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::store::{Store, StoreError};
use crate::tasks::{TaskError, TaskLimits, TaskManager};
use crate::workload_api::{DEFAULT_REATTEST_INTERVAL, WorkloadApi};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("refusing state directory {path}: {reason}")]
    UnsafeDataDir { path: PathBuf, reason: String },
    #[error("{path} already has a server listening; is another writ running?")]
    SocketInUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("binding {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("loading the CA: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("setting up attestors: {0}")]
    Attestors(#[from] writ_attestors::AttestError),
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("building reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("opening the audit trail: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("restoring tasks: {0}")]
    Tasks(#[from] TaskError),
    #[error("loading entries: {0}")]
    Entries(#[from] EntryError),
    #[error("publishing CRLs: {0}")]
    Crl(#[from] crate::agent::AgentError),
    #[error("federation: {0}")]
    Federation(#[from] FederationError),
}

/// Everything a running agent is made of; built once from config.
pub struct Services {
    pub agent: Arc<Agent>,
    pub store: Arc<Store>,
    pub tasks: Arc<TaskManager>,
    pub entries: Arc<EntryStore>,
    pub federation: Arc<Federation>,
}

/// Builds the agent from config: data dir, store, CA, attestors, entries and
/// tasks (restored from the store). Used by `run` and by benchmarks.
pub async fn build(config: &Config) -> Result<Services, ServiceError> {
    create_private_dir(&config.data_dir)?;
    let store = Arc::new(Store::open(&config.data_dir.join("writ.db"))?);
    let ca = CertificateAuthority::load_or_create(
        CaSettings {
            trust_domain: config.trust_domain.clone(),
            dir: config.data_dir.join("ca"),
            ca_ttl: config.ca.ca_ttl,
            svid_ttl: config.ca.x509_svid_ttl,
            jwt_svid_ttl: config.ca.jwt_svid_ttl,
            upstream: config.ca.upstream.as_ref().map(|u| UpstreamCaFiles {
                cert: u.cert.clone(),
                key: u.key.clone(),
                bundle: u.bundle.clone(),
            }),
        },
        SystemTime::now(),
    )?;
    let registry = Registry::from_config(config);
    // Hashing executables costs real time on a cold cache; skip it entirely
    // unless some entry actually asks for a digest.
    let hash_executable = registry.entries().iter().any(|e| {
        e.selectors
            .iter()
            .any(|s| s.kind() == "unix" && s.value().starts_with("sha256:"))
    });
    let attestors = AttestorSet::new(AttestorConfig {
        unix: UnixConfig {
            discover_workload_path: config.attestors.unix.discover_workload_path,
            max_hash_bytes: config.attestors.unix.max_hash_bytes,
            hash_executable,
        },
        cgroup: CgroupConfig {
            trusted_roots: config.attestors.cgroup.trusted_roots.clone(),
            mount: None,
        },
    })?;
    let cgroup_mount = attestors.cgroup_mount().map(|p| p.to_owned());
    // Bumped on every start (and every CA change), so the sequence relying
    // parties see only ever grows, across restarts too.
    let sequence = store
        .write(|conn| crate::store::bump_counter(conn, "bundle_sequence"))
        .await?;
    let agent = Arc::new(Agent::new(
        attestors,
        Registry::default(),
        ca,
        store.clone(),
        config.tasks.x509_svid_ttl,
        sequence,
    ));
    let entries = EntryStore::open(
        agent.clone(),
        store.clone(),
        registry,
        config.ca.x509_svid_ttl,
        config.ca.ca_ttl,
    )?;
    let tasks = TaskManager::new(
        agent.clone(),
        store.clone(),
        TaskLimits {
            max_ttl: config.tasks.max_ttl,
            default_ttl: config.tasks.default_ttl,
            x509_svid_ttl: config.tasks.x509_svid_ttl,
            max_depth: config.tasks.max_depth,
            trusted_cgroup_roots: config.attestors.cgroup.trusted_roots.clone(),
        },
        cgroup_mount,
    );
    let federation =
        Federation::load(agent.clone(), store.clone(), config.federation.clone()).await?;
    // The audit trail opens before anything is issued or restored, so every
    // issuance from here on has its record.
    let audit = crate::audit::AuditLog::open(
        &config.audit,
        Arc::new(crate::agent::CaCheckpointSigner(Arc::downgrade(&agent))),
    )?;
    agent.set_audit(audit);
    tokio::spawn(agent.clone().run_crl_publisher());
    tasks.restore().await?;
    agent.publish_crls().await?;
    Ok(Services {
        agent,
        store,
        tasks,
        entries,
        federation,
    })
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    // Everything writ creates is private unless it says otherwise (sockets
    // and their directories are opened up explicitly below).
    nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    let services = build(&config).await?;
    let agent = services.agent.clone();

    let workload_socket = config.workload_api.socket_path.clone();
    let admin_socket = config.admin_api.socket_path.clone();
    let workload_listener = bind_socket(&workload_socket, 0o777, 0o755)?;
    let admin_listener = bind_socket(&admin_socket, 0o770, 0o755)?;
    let bundle_endpoint = match &config.federation.bundle_endpoint {
        Some(endpoint) => {
            Some(BundleEndpoint::bind(agent.clone(), endpoint, config.ca.x509_svid_ttl).await?)
        }
        None => None,
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
    };

    let rotation = tokio::spawn(rotate_ca_forever(agent.clone()));
    let reloader = tokio::spawn(reload_on_sighup(
        config.clone(),
        config_path,
        services.entries.clone(),
    ));

    let admin = Arc::new(AdminContext {
        agent: agent.clone(),
        tasks: services.tasks.clone(),
        entries: services.entries.clone(),
        federation: services.federation.clone(),
        auth: AdminAuthorization {
            authorized: config.admin_api.authorized.clone(),
            bind_any_pid: config.admin_api.bind_any_pid.clone(),
            bind_same_uid: config.admin_api.bind_same_uid,
        },
    });

    println!(
        "writ: serving the SPIFFE Workload API for trust domain {} on unix://{}",
        agent.trust_domain(),
        workload_socket.display()
    );
    println!("writ: admin API on unix://{}", admin_socket.display());
    tracing::info!(socket = %workload_socket.display(), admin = %admin_socket.display(), trust_domain = %agent.trust_domain(), "writ started");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut federation_tasks = services.federation.spawn_fetchers(stop_rx.clone());
    if let Some(endpoint) = bundle_endpoint {
        let addr = endpoint
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        println!("writ: SPIFFE bundle endpoint on https://{addr}/");
        tracing::info!(%addr, "bundle endpoint started");
        federation_tasks.push(tokio::spawn(endpoint.run(stop_rx.clone())));
    }
    let stop_signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let workload_server = tonic::transport::Server::builder()
        .add_service(health_service.clone())
        .add_service(reflection()?)
        .add_service(SpiffeWorkloadApiServer::new(WorkloadApi::new(
            agent.clone(),
            DEFAULT_REATTEST_INTERVAL,
        )))
        .serve_with_incoming_shutdown(
            peer::incoming(workload_listener),
            stop_signal(stop_rx.clone()),
        );
    let admin_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection()?)
        .add_service(TasksServer::new(TasksService(admin.clone())))
        .add_service(EntriesServer::new(EntriesService(admin.clone())))
        .add_service(BundlesServer::new(BundlesService(admin)))
        .serve_with_incoming_shutdown(peer::incoming(admin_listener), stop_signal(stop_rx));
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (served, admin_served) = tokio::join!(workload_server, admin_server);

    // The stop signal reached them too; an in-flight fetch still finishes
    // its store write before its task sees it.
    for task in federation_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    rotation.abort();
    reloader.abort();
    remove_socket(&workload_socket);
    remove_socket(&admin_socket);
    if let Some(audit) = services.agent.audit_log().cloned() {
        // Writes the closing checkpoint: a trail that ends without one is
        // known to have been cut short or to belong to a crashed run. It
        // waits on the writer thread, so not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || audit.close()).await;
    }
    services.store.close();
    tracing::info!("writ stopped");
    served?;
    admin_served?;
    Ok(())
}

/// On SIGHUP, re-reads the config file and applies what can change while
/// running (registration entries). The new file is validated completely
/// first; a bad file changes nothing and says why. Settings that need a
/// restart (sockets, data dir, trust domain, CA) are reported, not applied.
async fn reload_on_sighup(mut current: Config, path: Option<PathBuf>, entries: Arc<EntryStore>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload is unavailable");
        return;
    };
    while hangups.recv().await.is_some() {
        let Some(path) = &path else {
            tracing::info!("SIGHUP: running on built-in defaults; nothing to reload");
            continue;
        };
        match crate::config::validate_file(path) {
            Err(errors) => {
                for e in &errors {
                    tracing::error!(error = %e, "reload refused; keeping the running configuration");
                }
            }
            Ok(next) => {
                let needs_restart = next.trust_domain != current.trust_domain
                    || next.data_dir != current.data_dir
                    || next.workload_api != current.workload_api
                    || next.admin_api != current.admin_api
                    || next.ca != current.ca
                    || next.federation != current.federation;
                if needs_restart {
                    tracing::warn!(
                        "reload: trust domain, data dir, sockets, admin, CA or federation settings changed; they take effect on restart"
                    );
                }
                entries
                    .set_config_registry(Registry::from_config(&next))
                    .await;
                tracing::info!(path = %path.display(), entries = next.entries.len(), "configuration reloaded");
                current = next;
            }
        }
    }
}

async fn rotate_ca_forever(agent: Arc<Agent>) {
    loop {
        let next = match agent.rotate_ca(SystemTime::now()).await {
            Ok(next) => next,
            Err(e) => {
                // Keep serving with the current CA; it stays valid for a
                // while, and a transient disk error may clear.
                tracing::error!(error = %e, "CA rotation failed; retrying in 30s");
                SystemTime::now() + Duration::from_secs(30)
            }
        };
        let wait = next
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1));
        tokio::time::sleep(wait).await;
    }
}

/// Creates the state directory 0700, or checks an existing one: it holds the
/// CA key, so one owned by another user (say a pre-created `/tmp/writ-<uid>`)
/// is refused, and one of ours with looser permissions is tightened.
fn create_private_dir(path: &Path) -> Result<(), ServiceError> {
    use std::os::unix::fs::MetadataExt;
    let fail = |source: io::Error| ServiceError::CreateDir {
        path: path.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(fail)?;
    let meta = std::fs::metadata(path).map_err(fail)?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(ServiceError::UnsafeDataDir {
            path: path.to_owned(),
            reason: format!("it is owned by uid {}, not by us (uid {me})", meta.uid()),
        });
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.mode() & 0o777), "tightening state directory to 0700");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    }
    Ok(())
}

/// Binds a Unix socket at `path`: creates its directory with `dir_mode`,
/// replaces a stale socket left by a crash (but never a live one, nor a
/// non-socket file), and sets the socket's mode.
pub fn bind_socket(
    path: &Path,
    socket_mode: u32,
    dir_mode: u32,
) -> Result<UnixListener, ServiceError> {
    if let Some(dir) = path.parent() {
        let existed = dir.exists();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)
            .map_err(|source| ServiceError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        if !existed {
            // DirBuilder's mode is filtered by our umask.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode)).map_err(
                |source| ServiceError::CreateDir {
                    path: dir.to_owned(),
                    source,
                },
            )?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServiceError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            return Err(ServiceError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ServiceError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode)).map_err(
        |source| ServiceError::Bind {
            path: path.to_owned(),
            source,
        },
    )?;
    Ok(listener)
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove socket");
    }
}
