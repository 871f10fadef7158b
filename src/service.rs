//! Wiring the agent together: build it from a validated config, bind the
//! sockets with the right modes, serve the Workload API with health and
//! reflection beside it, run the federation bundle endpoint and fetchers,
//! drive CA rotation, hand reloads to the `reload` module, and stop cleanly.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::stat::Mode;
use tokio::net::UnixListener;
use tonic::server::NamedService;
use writ_attestors::{AttestorConfig, AttestorSet, CgroupConfig, UnixConfig};

use crate::admin_api::{
    AdminAuthorization, AdminContext, AgentService, BundlesService, EntriesService, TasksService,
};
use crate::agent::Agent;
use crate::ca::{CaSettings, CertificateAuthority, UpstreamCaFiles};
use crate::config::Config;
use crate::entries::{EntryError, EntryStore};
use crate::federation::{BundleEndpoint, Federation, FederationError};
use crate::identity::Registry;
use crate::peer;
use crate::proto::admin::agent_server::AgentServer;
use crate::proto::admin::bundles_server::BundlesServer;
use crate::proto::admin::entries_server::EntriesServer;
use crate::proto::admin::tasks_server::TasksServer;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::readiness::{Readiness, ServedSocket};
use crate::reload::{Reloader, ReloaderParts, reload_on_sighup};
use crate::store::{Store, StoreError};
use crate::systemd::{Notifier, PassedSockets, SystemdError};
use crate::tasks::{TaskError, TaskLimits, TaskManager};
use crate::telemetry::metrics::seconds_until;
use crate::telemetry::{Health, Refresh, TelemetryError, TelemetryServer};
use crate::workload_api::WorkloadApi;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("refusing state directory {path}: {reason}")]
    UnsafeDataDir { path: PathBuf, reason: String },
    #[error("refusing socket directory {path}: {reason}")]
    UnsafeSocketDir { path: PathBuf, reason: String },
    #[error("{path} already has a server listening; is another writ running?")]
    SocketInUse { path: PathBuf },
    #[error(
        "state directory {path} is in use by another writ{holder} (lock {lock} is held); one writ per state directory: stop it, or give this one another data_dir"
    )]
    DataDirInUse {
        path: PathBuf,
        lock: PathBuf,
        /// " (pid N)" when the lock file names its holder.
        holder: String,
    },
    #[error(
        "audit trail {} is in use by another writ, perhaps an older version (its writer lock {} is held); stop that writ first: older writs lock only their audit trail, not the state directory, and this one would migrate the store under it",
        path.display(),
        lock.display()
    )]
    AuditTrailInUse { path: PathBuf, lock: PathBuf },
    #[error(
        "the store {} is missing or empty, but the CA state {} shows writ has run with this data directory before; a new store would lose every revocation recorded in the old one, and the certificates revoked there would be valid again. Restore {} from a backup; or, to start over, remove {} as well, so that writ creates a new CA and every certificate issued before is distrusted{upstream}",
        store.display(),
        ca_state.display(),
        store.display(),
        ca_dir.display()
    )]
    StoreLost {
        store: PathBuf,
        ca_state: PathBuf,
        ca_dir: PathBuf,
        /// What starting over does not do with an upstream CA.
        upstream: &'static str,
    },
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
    #[error("loading policies:\n{0}")]
    Policy(String),
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
    #[error("systemd socket activation: {0}")]
    Systemd(#[from] SystemdError),
    #[error("telemetry: {0}")]
    Telemetry(#[from] TelemetryError),
}

/// Everything a running agent is made of; built once from config.
pub struct Services {
    pub agent: Arc<Agent>,
    pub store: Arc<Store>,
    pub tasks: Arc<TaskManager>,
    pub entries: Arc<EntryStore>,
    pub federation: Arc<Federation>,
    /// Held while these services live: a second writ on the same state
    /// directory would share the CA and the store but keep its own view of
    /// the active tasks, and answer for tasks it does not run.
    _data_dir_lock: DataDirLock,
}

/// Builds the agent from config: data dir, store, CA, attestors, entries and
/// tasks (restored from the store). Used by `run` and by benchmarks.
pub async fn build(config: &Config) -> Result<Services, ServiceError> {
    // A bad policy file is the config's fault: found before anything is
    // created or opened.
    let policy = load_policy(&config.policy.files)?;
    create_private_dir(&config.data_dir)?;
    let data_dir_lock = lock_data_dir(&config.data_dir)?;
    // Older writs take only the audit trail's writer lock, not the state
    // directory's: one still running is found by that lock, before the store
    // is opened (which migrates its schema, and the older writ then refuses
    // to start again) or anything else is changed.
    if crate::audit::writer_is_live(&config.audit.path) {
        return Err(ServiceError::AuditTrailInUse {
            path: config.audit.path.clone(),
            lock: crate::audit::lock_path(&config.audit.path),
        });
    }
    let store_path = config.data_dir.join(crate::config::STORE_FILE);
    refuse_a_lost_store(&store_path, config)?;
    let store = Arc::new(Store::open(&store_path)?);
    let ca = CertificateAuthority::load_or_create(ca_settings(config), SystemTime::now())?;
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
        crate::federation::reserved_ids(
            &config.trust_domain,
            config.federation.bundle_endpoint.as_ref(),
        ),
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
            completed_retention: config.tasks.completed_retention,
        },
        cgroup_mount,
    );
    let federation =
        Federation::load(agent.clone(), store.clone(), config.federation.clone()).await?;
    // The audit trail opens before anything is issued or restored, so every
    // issuance from here on has its record.
    // The counter above was bumped by every earlier start too.
    let audit = crate::audit::AuditLog::open_after_earlier_runs(
        &config.audit,
        Arc::new(crate::agent::CaCheckpointSigner(Arc::downgrade(&agent))),
        sequence > 1,
    )?;
    agent.set_audit(audit);
    let restored = async {
        agent.record_ca_changes_at_load().await;
        agent.set_policy(policy);
        agent.load_revocations().await?;
        tokio::spawn(agent.clone().run_crl_publisher());
        tasks.restore().await?;
        tasks.spawn_pruner();
        agent.publish_crls().await?;
        Ok::<(), ServiceError>(())
    }
    .await;
    if let Err(e) = restored {
        end_tasks_then_close_trail(&tasks, &agent, tokio::time::Instant::now()).await;
        return Err(e);
    }
    Ok(Services {
        agent,
        store,
        tasks,
        entries,
        federation,
        _data_dir_lock: data_dir_lock,
    })
}

/// Refuses to start a new store (none at `store`, or an empty file) where
/// the CA has state already: the store is created before the CA on a first
/// start, so a CA without it means the store was lost, and with it the
/// revocations the CRLs are built from.
fn refuse_a_lost_store(store: &Path, config: &Config) -> Result<(), ServiceError> {
    let store_is_new = match std::fs::metadata(store) {
        Ok(meta) => meta.len() == 0,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        // Store::open names the problem better.
        Err(_) => false,
    };
    let ca_dir = config.data_dir.join(crate::config::CA_DIR);
    let ca_state = ca_dir.join(crate::ca::STATE_FILE);
    if !store_is_new || !ca_state.exists() {
        return Ok(());
    }
    Err(ServiceError::StoreLost {
        store: store.to_owned(),
        ca_state,
        ca_dir,
        upstream: if config.ca.upstream.is_some() {
            " (with [ca.upstream], certificates issued before chain to the upstream CA and stay trusted until they expire, unless the upstream certificate writ signs with is replaced too)"
        } else {
            ""
        },
    })
}

/// Held for as long as writ runs: the state directory's own `flock` and
/// its `writ.lock`.
struct DataDirLock {
    _dir: std::fs::File,
    _file: std::fs::File,
}

/// Takes the state directory's locks (exclusive `flock`s, released when the
/// process ends however it ends) and writes our pid in `writ.lock` for the
/// message another writ gets. The directory itself is locked first: a
/// `writ.lock` deleted by hand while writ runs would otherwise let a second
/// writ lock a new one and reach the store and the CA. `writ.lock` is still
/// taken, as writs before the directory lock take only that one.
fn lock_data_dir(dir: &Path) -> Result<DataDirLock, ServiceError> {
    use std::io::{Seek, Write};
    let path = dir.join(crate::config::STATE_LOCK_FILE);
    let in_use = |lock: &Path| {
        let holder = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .map_or(String::new(), |pid| format!(" (pid {pid})"));
        ServiceError::DataDirInUse {
            path: dir.to_owned(),
            lock: lock.to_owned(),
            holder,
        }
    };
    let dir_file = std::fs::File::open(dir).map_err(|source| ServiceError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    match rustix::fs::flock(
        &dir_file,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    ) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Err(in_use(dir)),
        Err(e) => {
            return Err(ServiceError::CreateDir {
                path: dir.to_owned(),
                source: e.into(),
            });
        }
    }
    let io_err = |source| ServiceError::CreateDir {
        path: path.clone(),
        source,
    };
    let Some(mut file) = crate::audit::lock_exclusively(&path).map_err(io_err)? else {
        return Err(in_use(&path));
    };
    file.set_len(0).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    writeln!(file, "{}", std::process::id()).map_err(io_err)?;
    Ok(DataDirLock {
        _dir: dir_file,
        _file: file,
    })
}

fn ca_settings(config: &Config) -> CaSettings {
    CaSettings {
        trust_domain: config.trust_domain.clone(),
        dir: config.data_dir.join(crate::config::CA_DIR),
        ca_ttl: config.ca.ca_ttl,
        svid_ttl: config.ca.x509_svid_ttl,
        jwt_svid_ttl: config.ca.jwt_svid_ttl,
        upstream: config.ca.upstream.as_ref().map(|u| UpstreamCaFiles {
            cert: u.cert.clone(),
            key: u.key.clone(),
            bundle: u.bundle.clone(),
        }),
    }
}

/// What a start checks in the files a valid config names, without creating
/// or opening anything (no state directory, socket or port): the Cedar
/// policies against writ's schema, the upstream CA files (down to one SVID
/// signed and verified), and the federation files (CA files, bootstrap
/// bundles, the bundle endpoint's certificate and key). Every problem
/// found, for `writ validate`.
pub fn check_files(config: &Config) -> Vec<ServiceError> {
    let mut problems = Vec::new();
    if let Err(e) = load_policy(&config.policy.files) {
        problems.push(e);
    }
    if let Err(e) = CertificateAuthority::check_settings(&ca_settings(config), SystemTime::now()) {
        problems.push(e.into());
    }
    problems.extend(
        crate::federation::check_files(&config.federation)
            .into_iter()
            .map(ServiceError::from),
    );
    problems
}

pub use crate::reload::LogLevelControl;

/// How long open connections get to finish after a stop is requested
/// before they are dropped.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Concurrent gRPC calls on one connection. A SPIFFE client holds one to
/// three streams (X.509, bundles, JWT bundles); each open stream costs writ
/// its HTTP/2 send buffer and queued messages (CRL included), so without a
/// bound one process that opened thousands and never read grew writ by
/// gigabytes.
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Says where writ serves, on standard output. A closed or full stdout
/// (`writ run | head -1`, a logger gone) must not stop the agent, so a
/// failed write is dropped: the same lines go to the log too.
fn announce(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Runs the agent until `shutdown` resolves. `hangups` (from
/// `reload::listen_for_sighup`, taken before the agent starts so that a
/// SIGHUP while it starts is not fatal) asks for reloads once it is ready.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    log_control: Option<LogLevelControl>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hangups: Option<tokio::signal::unix::Signal>,
) -> Result<(), ServiceError> {
    // Everything writ creates is private unless it says otherwise (sockets
    // and their directories are opened up explicitly below).
    nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    raise_open_file_limit();
    let notifier = Notifier::from_env();
    let mut passed = PassedSockets::from_env()?;
    // Each socket describes only what it serves (its own descriptor set)
    // and lists it with health and reflection: naming any service turns off
    // listing every service registered.
    // Both reflection versions: grpcurl and grpcio-reflection clients
    // still ask v1alpha, newer ones v1.
    let reflection = |descriptors: &'static [u8], served: &[&str]| {
        let builder = || {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(descriptors)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
                .with_service_name(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
                .with_service_name(
                    tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
                );
            served
                .iter()
                .fold(builder, |builder, name| builder.with_service_name(*name))
        };
        Ok::<_, ServiceError>((builder().build_v1()?, builder().build_v1alpha()?))
    };
    let (workload_reflection, workload_reflection_v1alpha) = reflection(
        crate::proto::WORKLOAD_FILE_DESCRIPTOR_SET,
        &[<SpiffeWorkloadApiServer<WorkloadApi> as NamedService>::NAME],
    )?;
    let (admin_reflection, admin_reflection_v1alpha) = reflection(
        crate::proto::ADMIN_FILE_DESCRIPTOR_SET,
        &[
            <TasksServer<TasksService> as NamedService>::NAME,
            <EntriesServer<EntriesService> as NamedService>::NAME,
            <BundlesServer<BundlesService> as NamedService>::NAME,
            <AgentServer<AgentService> as NamedService>::NAME,
        ],
    )?;
    let services = build(&config).await?;
    let agent = services.agent.clone();
    let metrics = agent.metrics().clone();
    let health = Arc::new(Health::default());
    for trust_domain in &config.federation.trust_domains {
        metrics.federation_fetch_series(trust_domain.name.name());
    }

    let workload_socket = config.workload_api.socket_path.clone();
    let admin_socket = config.admin_api.socket_path.clone();
    let mut bound = BoundSockets::default();
    let listening = match listen(&config, &services, &health, &mut passed, &mut bound).await {
        Ok(listening) => listening,
        Err(e) => {
            // A socket taken or a port in use is no crash: the sockets writ
            // made go, and the trail ends with its closing checkpoint.
            bound.remove_all();
            end_tasks_then_close_trail(&services.tasks, &agent, tokio::time::Instant::now()).await;
            services.store.close();
            return Err(e);
        }
    };
    let Listening {
        workload: workload_listener,
        admin: admin_listener,
        workload_served,
        admin_served,
        bundle_endpoint,
        telemetry,
    } = listening;
    let socket_activated = !bound.contains(&workload_socket) || !bound.contains(&admin_socket);

    let (health_reporter, _) = tonic_health::server::health_reporter();
    let health_service = crate::health::server(health_reporter.clone(), agent.shutdown_requested());
    health_reporter
        .set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>()
        .await;

    let rotation = tokio::spawn(rotate_ca_forever(agent.clone()));
    let ready_status = format!(
        "serving trust domain {} on {}",
        agent.trust_domain(),
        workload_socket.display()
    );
    let reloader = Reloader::new(ReloaderParts {
        agent: agent.clone(),
        entries: services.entries.clone(),
        federation: services.federation.clone(),
        config: config.clone(),
        path: config_path,
        log_control,
        notifier: notifier.clone(),
        health: health.clone(),
        ready_status: ready_status.clone(),
    });
    let sighup = tokio::spawn(reload_on_sighup(reloader.clone(), hangups));

    let admin = Arc::new(AdminContext {
        agent: agent.clone(),
        tasks: services.tasks.clone(),
        entries: services.entries.clone(),
        federation: services.federation.clone(),
        reloader,
        auth: AdminAuthorization {
            authorized: config.admin_api.authorized.clone(),
            bind_any_pid: config.admin_api.bind_any_pid.clone(),
            bind_same_uid: config.admin_api.bind_same_uid,
            operators: config.admin_api.operators.clone(),
        },
        reattest_interval: config.workload_api.reattest_interval,
        task_watches: Arc::default(),
    });

    announce(format_args!(
        "writ: serving the SPIFFE Workload API for trust domain {} on unix://{}",
        agent.trust_domain(),
        workload_socket.display()
    ));
    announce(format_args!(
        "writ: admin API on unix://{}",
        admin_socket.display()
    ));
    tracing::info!(socket = %workload_socket.display(), admin = %admin_socket.display(), trust_domain = %agent.trust_domain(), socket_activated, "writ started");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    services.federation.spawn_fetchers(stop_rx.clone());
    let mut background = vec![tokio::spawn(retry_unrecorded_forever(
        agent.clone(),
        stop_rx.clone(),
    ))];
    if let Some(endpoint) = bundle_endpoint {
        let addr = endpoint
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        announce(format_args!(
            "writ: SPIFFE bundle endpoint on https://{addr}/"
        ));
        tracing::info!(%addr, "bundle endpoint started");
        background.push(tokio::spawn(endpoint.run(stop_rx.clone())));
    }
    if let Some(telemetry) = telemetry {
        let addr = telemetry
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        announce(format_args!("writ: health and metrics on http://{addr}/"));
        tracing::info!(%addr, "telemetry listener started");
        background.push(tokio::spawn(telemetry.run(stop_rx.clone())));
    }
    let stop_signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let workload_server = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(health_service.clone())
        .add_service(workload_reflection)
        .add_service(workload_reflection_v1alpha)
        .add_service(SpiffeWorkloadApiServer::new(WorkloadApi::new(
            agent.clone(),
            config.workload_api.reattest_interval,
            config.workload_api.max_streams_per_uid,
        )))
        .serve_with_incoming_shutdown(
            peer::incoming(
                workload_listener,
                config.workload_api.max_connections_per_uid,
            ),
            stop_signal(stop_rx.clone()),
        );
    let admin_server = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(health_service)
        .add_service(admin_reflection)
        .add_service(admin_reflection_v1alpha)
        .add_service(TasksServer::new(TasksService(admin.clone())))
        .add_service(EntriesServer::new(EntriesService(admin.clone())))
        .add_service(BundlesServer::new(BundlesService(admin.clone())))
        .add_service(AgentServer::new(AgentService(admin)))
        .serve_with_incoming_shutdown(
            peer::incoming(admin_listener, peer::DEFAULT_MAX_CONNECTIONS_PER_UID),
            stop_signal(stop_rx),
        );
    let mut workload_task = tokio::spawn(while_serving(
        workload_served.serving_flag(),
        workload_server,
    ));
    let mut admin_task = tokio::spawn(while_serving(admin_served.serving_flag(), admin_server));
    // The servers own the listeners from here; connections made since the
    // bind were queued by the kernel and are accepted now.
    health.serving(Arc::new(Readiness::new(
        agent.clone(),
        vec![workload_served, admin_served],
    )));
    let grpc_health = tokio::spawn(mirror_readiness(
        health.clone(),
        health_reporter.clone(),
        stop_tx.subscribe(),
    ));
    notifier.ready(&ready_status);
    let watchdog = notifier.spawn_watchdog();

    let (mut workload_done, mut admin_done) = (None, None);
    let stopped_by_request = tokio::select! {
        _ = shutdown => true,
        // A server that ends by itself has failed; stop the rest.
        joined = &mut workload_task => { workload_done = Some(joined); false }
        joined = &mut admin_task => { admin_done = Some(joined); false }
    };
    // Readiness goes first, so probes stop routing work here before the
    // sockets close.
    health
        .stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    grpc_health.abort();
    set_grpc_health(&health_reporter, false).await;
    notifier.stopping();
    let _ = stop_tx.send(true);
    agent.begin_shutdown();
    // No watcher completes a task from here on: one completed now could
    // reach the store after the trail has closed, and be missing from it.
    // Completions the store refused get until then to persist.
    let stop_deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
    services.tasks.begin_stop();

    let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
        let workload = match workload_done.take() {
            Some(joined) => joined,
            None => (&mut workload_task).await,
        };
        let admin = match admin_done.take() {
            Some(joined) => joined,
            None => (&mut admin_task).await,
        };
        (workload, admin)
    })
    .await;
    let (served, admin_served) = match drained {
        Ok((workload, admin)) => (flatten(workload), flatten(admin)),
        Err(_) => {
            tracing::warn!(
                deadline = ?DRAIN_DEADLINE,
                open_streams = metrics.open_streams.get(),
                "connections still open at the drain deadline; closing them"
            );
            workload_task.abort();
            admin_task.abort();
            (Ok(()), Ok(()))
        }
    };
    if !stopped_by_request {
        tracing::error!("a gRPC server stopped on its own; shutting down");
    }

    // The stop signal reached them too; an in-flight fetch still finishes
    // its store write before its task sees it.
    background.extend(services.federation.take_fetcher_tasks());
    for task in background {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    rotation.abort();
    sighup.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    bound.remove_all();
    end_tasks_then_close_trail(&services.tasks, &services.agent, stop_deadline).await;
    services.store.close();
    tracing::info!("writ stopped");
    served?;
    admin_served?;
    Ok(())
}

/// The listeners of a starting agent, bound but not yet served.
struct Listening {
    workload: UnixListener,
    admin: UnixListener,
    workload_served: ServedSocket,
    admin_served: ServedSocket,
    bundle_endpoint: Option<BundleEndpoint>,
    telemetry: Option<TelemetryServer>,
}

/// Takes the sockets systemd passed, or binds them (each one writ binds
/// goes into `bound` at once, so a later failure can remove it), then the
/// bundle endpoint and telemetry listeners.
async fn listen(
    config: &Config,
    services: &Services,
    health: &Arc<Health>,
    passed: &mut PassedSockets,
    bound: &mut BoundSockets,
) -> Result<Listening, ServiceError> {
    let workload_socket = &config.workload_api.socket_path;
    let admin_socket = &config.admin_api.socket_path;
    let workload = listener_for(passed, "workload", workload_socket, 0o777, bound)?;
    let admin = listener_for(passed, "admin", admin_socket, 0o770, bound)?;
    let workload_served = served_socket("Workload API", workload_socket, bound)?;
    let admin_served = served_socket("admin API", admin_socket, bound)?;
    if !passed.is_empty() {
        tracing::warn!(unused = ?passed.leftover(), "systemd passed sockets writ does not use (names must be \"workload\" or \"admin\", or paths must match the config)");
    }
    let agent = &services.agent;
    let bundle_endpoint = match &config.federation.bundle_endpoint {
        Some(endpoint) => {
            Some(BundleEndpoint::bind(agent.clone(), endpoint, config.ca.x509_svid_ttl).await?)
        }
        None => None,
    };
    let telemetry = match config.telemetry.listen {
        Some(addr) => Some(
            TelemetryServer::bind(
                addr,
                agent.metrics().clone(),
                health.clone(),
                refresh_gauges(services),
            )
            .await?,
        ),
        None => None,
    };
    Ok(Listening {
        workload,
        admin,
        workload_served,
        admin_served,
        bundle_endpoint,
        telemetry,
    })
}

/// The socket files writ bound itself, to remove when it stops (or fails
/// to start). A socket systemd passed in belongs to its .socket unit,
/// which keeps listening (and starts writ again on the next connection).
/// Each with the file it named at bind: a path another process has bound
/// since (a second writ started on it) is that process's, and is left.
#[derive(Default)]
struct BoundSockets(Vec<(PathBuf, Option<crate::readiness::FileIdentity>)>);

impl BoundSockets {
    fn contains(&self, path: &Path) -> bool {
        self.0.iter().any(|(p, _)| p == path)
    }

    fn push(&mut self, path: &Path) {
        let bound = crate::readiness::FileIdentity::of(path).ok();
        self.0.push((path.to_owned(), bound));
    }

    fn remove_all(&mut self) {
        for (path, bound) in self.0.drain(..) {
            match (bound, crate::readiness::FileIdentity::of(&path)) {
                (_, Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
                (Some(bound), Ok(now)) if now != bound => tracing::info!(
                    path = %path.display(),
                    "not removing the socket: another process has bound its path since"
                ),
                _ => remove_socket(&path),
            }
        }
    }
}

/// Lets no task complete any more (those the store refused get until
/// `deadline` to persist), then closes the trail: in that order, so that no
/// completion lands behind the trail's closing checkpoint.
async fn end_tasks_then_close_trail(
    tasks: &crate::tasks::TaskManager,
    agent: &Agent,
    deadline: tokio::time::Instant,
) {
    tasks.finish_stop(deadline).await;
    close_audit_trail(agent).await;
}

/// Writes the trail's closing checkpoint, signed by the CA, so it must run
/// while the agent lives: a trail that ends without one is known to have
/// been cut short or to belong to a crashed run. It waits on the trail's
/// background thread, so not on a runtime worker. Call it once no task
/// can complete any more (`TaskManager::finish_stop`). Returns what the
/// trail never took, which is logged.
pub(crate) async fn close_audit_trail(agent: &Agent) -> Option<crate::agent::UnrecordedAtStop> {
    agent.retry_unrecorded().await;
    agent.record_suppressed_refusals().await;
    if let Some(audit) = agent.audit_log().cloned() {
        let _ = tokio::task::spawn_blocking(move || audit.close()).await;
    }
    agent.report_unrecorded_at_stop()
}

/// How often gRPC health (`grpc.health.v1` on the Workload API socket)
/// re-checks what `/ready` checks.
const GRPC_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps `grpc.health.v1` telling what `/ready` tells, so `writ healthcheck
/// --socket` and gRPC-aware probes see the same readiness as HTTP ones.
async fn mirror_readiness(
    health: Arc<Health>,
    reporter: tonic_health::server::HealthReporter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut was_ready = true;
    loop {
        let problems = health.not_ready(SystemTime::now()).await;
        let ready = problems.is_empty();
        if ready != was_ready {
            if ready {
                tracing::info!("ready again; gRPC health is SERVING");
            } else {
                tracing::warn!(problems = ?problems, "not ready; gRPC health is NOT_SERVING");
            }
            set_grpc_health(&reporter, ready).await;
            was_ready = ready;
        }
        tokio::select! {
            _ = tokio::time::sleep(GRPC_HEALTH_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn set_grpc_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    // The server as a whole ("") and the Workload API by name.
    reporter.set_service_status("", status).await;
    if serving {
        reporter
            .set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>()
            .await;
    } else {
        reporter
            .set_not_serving::<SpiffeWorkloadApiServer<WorkloadApi>>()
            .await;
    }
}

fn flatten(
    joined: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServiceError> {
    match joined {
        Ok(served) => Ok(served?),
        // Only a panic gets here (the tasks are aborted only on the other
        // path); the panic itself was already reported.
        Err(e) => {
            tracing::error!(error = %e, "a gRPC server task failed");
            Ok(())
        }
    }
}

/// Runs `server`, with `serving` true from now (before the task is first
/// polled, so `/ready` never sees a gap) until the server ends.
fn while_serving<F: Future>(
    serving: Arc<std::sync::atomic::AtomicBool>,
    server: F,
) -> impl Future<Output = F::Output> {
    use std::sync::atomic::Ordering;
    serving.store(true, Ordering::SeqCst);
    async move {
        let ended = server.await;
        serving.store(false, Ordering::SeqCst);
        ended
    }
}

/// What readiness watches for a socket: the file writ bound (device and
/// inode, taken now, right after the bind), or a passed listener.
/// Each connected caller holds a few descriptors (its socket, its pidfd
/// and the /proc files its attestations re-read), so the soft limit on open
/// files, often 1024 outside systemd, is raised to the hard limit, as Go
/// programs such as SPIRE's agent do at start.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current >= limit.maximum {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = ?limit.current, to = ?limit.maximum, "raised the open-file limit")
        }
        Err(errno) => {
            tracing::warn!(%errno, soft = ?limit.current, "could not raise the open-file limit")
        }
    }
}

fn served_socket(
    what: &'static str,
    path: &Path,
    bound: &BoundSockets,
) -> Result<ServedSocket, ServiceError> {
    if !bound.contains(path) {
        return Ok(ServedSocket::passed(what, path));
    }
    ServedSocket::bound(what, path).map_err(|source| ServiceError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// The socket systemd passed under `name` (or bound at `path`), or a fresh
/// one bound by writ, which then goes into `bound`.
fn listener_for(
    passed: &mut PassedSockets,
    name: &str,
    path: &Path,
    mode: u32,
    bound: &mut BoundSockets,
) -> Result<UnixListener, ServiceError> {
    match passed.take(name, path) {
        Some(listener) => {
            let fail = |source| ServiceError::Bind {
                path: path.to_owned(),
                source,
            };
            listener.set_nonblocking(true).map_err(fail)?;
            let listener = UnixListener::from_std(listener).map_err(fail)?;
            tracing::info!(name, path = %path.display(), "using the socket passed by systemd");
            Ok(listener)
        }
        None => {
            let listener = bind_socket(path, mode, 0o755)?;
            bound.push(path);
            Ok(listener)
        }
    }
}

/// Gauges describing current state, brought up to date at each scrape.
fn refresh_gauges(services: &Services) -> Refresh {
    let agent = services.agent.clone();
    let tasks = services.tasks.clone();
    let federation = services.federation.clone();
    Box::new(move |metrics, now| {
        metrics
            .tasks_active
            .set(i64::try_from(tasks.active_count()).unwrap_or(i64::MAX));
        metrics
            .ca_expiry_seconds
            .set(seconds_until(agent.ca_not_after(), now));
        // NaN, not 0, while nothing is cached: 0 would read as "expiring
        // now" to an alert rule.
        let svid_expiry = agent
            .earliest_svid_expiry()
            .map_or(f64::NAN, |expiry| seconds_until(expiry, now));
        metrics.svid_expiry_seconds.set(svid_expiry);
        let crls = agent.crls();
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.crl_entries.set(gauge(crls.entries));
        metrics.crl_bytes.set(gauge(crls.bytes));
        for info in federation.list() {
            // For a fetched trust domain: since the newer of this run's last
            // successful fetch and when the bundle held was taken (fetched,
            // set or bootstrapped, kept across restarts), so that a writ
            // restarted into failing fetches still shows an age that grows.
            let Some(fetch) = info.fetch else {
                continue;
            };
            let held_since = info.held.as_ref().map(|held| held.updated_at);
            if let Some(taken) = fetch.last_success.max(held_since) {
                metrics
                    .federation_bundle_age_seconds
                    .get_or_create(&[("trust_domain", info.trust_domain.to_string())])
                    .set(-seconds_until(taken, now));
            }
        }
    })
}

/// The configured Cedar policies, validated against writ's schema; with no
/// files, the built-in permissive policy (the quick start).
pub(crate) fn load_policy(files: &[PathBuf]) -> Result<crate::policy::PolicyEngine, ServiceError> {
    if files.is_empty() {
        return Ok(crate::policy::PolicyEngine::builtin_default());
    }
    let engine = crate::policy::PolicyEngine::load(files).map_err(|e| {
        let problems: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
        ServiceError::Policy(if problems.is_empty() {
            e.to_string()
        } else {
            problems.join("\n")
        })
    })?;
    for warning in engine.warnings() {
        tracing::warn!(warning = %warning, "policy warning");
    }
    tracing::info!(source = %engine.source(), policies = engine.policy_ids().len(), "policies loaded");
    Ok(engine)
}

/// How often records the audit trail refused (a full disk) are offered
/// to it again.
const UNRECORDED_RETRY: Duration = Duration::from_secs(1);

/// Offers the trail the records it refused, every `UNRECORDED_RETRY`,
/// until writ stops (closing the trail tries once more), and writes the
/// counts of refusals past their uid's budget.
async fn retry_unrecorded_forever(agent: Arc<Agent>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(UNRECORDED_RETRY) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        agent.retry_unrecorded().await;
        agent.record_suppressed_refusals().await;
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
        // By the wall clock, re-read every few seconds: the schedule is in
        // wall time, and after a jump or a resume from suspend one long
        // monotonic sleep would leave an expired root signing for hours.
        // At least a second apart, so an overdue step that keeps failing
        // cannot spin.
        let earliest = SystemTime::now() + Duration::from_secs(1);
        crate::wall_clock::sleep_until(next.max(earliest)).await;
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

/// Whoever may rename or create entries in a socket's directory can put
/// their own server at its path (and have the socket's mode set on a file
/// of their choosing), so the directory must be writable by nobody but us
/// and root: owned by one of us, and if group or others may write to it,
/// sticky (as /tmp is), so that no one else can replace our socket.
fn check_socket_dir(dir: &Path) -> Result<(), ServiceError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|source| ServiceError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |reason: String| ServiceError::UnsafeSocketDir {
        path: dir.to_owned(),
        reason,
    };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(refuse(format!(
            "it is owned by uid {}, who could replace writ's socket; it must be owned by uid {me} or root",
            meta.uid()
        )));
    }
    const STICKY: u32 = 0o1000;
    if meta.mode() & 0o022 != 0 && meta.mode() & STICKY == 0 {
        return Err(refuse(format!(
            "its mode {:04o} lets group or others replace writ's socket; remove their write access or set the sticky bit",
            meta.mode() & 0o7777
        )));
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
        check_socket_dir(dir)?;
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
