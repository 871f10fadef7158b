//! writ's TOML configuration: the typed `Config`, its built-in defaults for
//! root and ordinary users, loading from a file, and validation that reports
//! every problem as `file:line:column: message`.

mod build;
mod duration;
mod environment;
mod parse_error;
mod raw;
mod structure;

pub use duration::{DurationError, MAX_DURATION, duration_serde, format_duration, parse_duration};
pub use environment::Environment;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};
use writ_attestors::Selector;

use crate::spiffe_id::{SpiffeId, TrustDomain};

/// The trust domain writ uses when the config names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "writ.test";
/// The Workload API caps hints at 1024 bytes; an entry's hint must fit.
pub use crate::identity::MAX_HINT_BYTES;
/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

const MIB: u64 = 1024 * 1024;

/// The store inside `data_dir`; SQLite keeps `-wal` and `-shm` files beside it.
pub const STORE_FILE: &str = "writ.db";
/// The state directory's lock inside `data_dir`.
pub const STATE_LOCK_FILE: &str = "writ.lock";
/// The CA's state and keys inside `data_dir`.
pub const CA_DIR: &str = "ca";

/// Everything writ is configured with, already validated. Serializes back
/// to the file format (`to_toml`); reload compares configs with `==`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub trust_domain: TrustDomain,
    pub data_dir: PathBuf,
    pub cpu_scheduling: CpuScheduling,
    pub workload_api: WorkloadApiConfig,
    pub admin_api: AdminApiConfig,
    pub ca: CaConfig,
    pub attestors: AttestorsConfig,
    pub tasks: TasksConfig,
    pub log: LogConfig,
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
    pub federation: FederationConfig,
    pub telemetry: TelemetryConfig,
    /// Written as `[[entry]]` tables in the file.
    #[serde(rename = "entry")]
    pub entries: Vec<EntryConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadApiConfig {
    pub socket_path: PathBuf,
    /// How often an open stream re-attests its caller even when nothing
    /// concerns it, so a caller that changed (exec'd, moved cgroup,
    /// changed uid) is re-judged within this time.
    #[serde(with = "duration_serde")]
    pub reattest_interval: Duration,
    /// Connections one uid may hold open on the socket at once; a new one
    /// past this is closed as it arrives.
    pub max_connections_per_uid: usize,
    /// FetchX509SVID, FetchX509Bundles, FetchJWTBundles streams one uid may
    /// hold open at once, across its connections; past this a new stream is
    /// refused with ResourceExhausted.
    pub max_streams_per_uid: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminApiConfig {
    pub socket_path: PathBuf,
    /// A caller is authorized if it has every selector of at least one set.
    /// No set is empty (validation refuses it: it would match everyone).
    #[serde(serialize_with = "serialize_selector_sets")]
    pub authorized: Vec<Vec<Selector>>,
    /// Callers matching one of these sets may bind tasks to any process;
    /// everyone else only to its own descendants. Default: nobody.
    #[serde(serialize_with = "serialize_selector_sets")]
    pub bind_any_pid: Vec<Vec<Selector>>,
    /// Authorized callers may bind processes running under their own uid
    /// (which they could ptrace anyway). Default: true.
    pub bind_same_uid: bool,
    /// Authorized callers matching one of these sets may create and delete
    /// registration entries. An entry gives any SPIFFE ID to whatever its
    /// selectors match, the caller itself included, so this is the power
    /// to be anyone. Default: the uid writ runs as (as for `authorized`).
    #[serde(serialize_with = "serialize_selector_sets")]
    pub operators: Vec<Vec<Selector>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaConfig {
    #[serde(with = "duration_serde")]
    pub ca_ttl: Duration,
    #[serde(with = "duration_serde")]
    pub x509_svid_ttl: Duration,
    #[serde(with = "duration_serde")]
    pub jwt_svid_ttl: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamCaConfig>,
}

/// An intermediate CA handed to writ by an upstream PKI, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamCaConfig {
    pub cert: PathBuf,
    /// Path to the private key; the key itself never passes through config.
    pub key: PathBuf,
    pub bundle: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestorsConfig {
    pub unix: UnixAttestorConfig,
    pub cgroup: CgroupAttestorConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnixAttestorConfig {
    pub discover_workload_path: bool,
    pub max_hash_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupAttestorConfig {
    /// Absolute, normalized cgroup v2 paths (`/system.slice`).
    pub trusted_roots: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TasksConfig {
    #[serde(with = "duration_serde")]
    pub max_ttl: Duration,
    #[serde(with = "duration_serde")]
    pub default_ttl: Duration,
    #[serde(with = "duration_serde")]
    pub x509_svid_ttl: Duration,
    pub max_depth: u32,
    /// How long a completed task stays in the store (GetTask, ListTasks)
    /// before it is pruned; the audit trail keeps its record for good.
    #[serde(with = "duration_serde")]
    pub completed_retention: Duration,
}

/// The shortest task: its first X.509-SVID is signed as it begins and must
/// live a whole second (`ca::MIN_SVID_TTL`) inside it; a task of a second or
/// less could never hold one.
pub const MIN_TASK_TTL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyConfig {
    /// Cedar policy files, validated against writ's schema at start and on
    /// reload. Empty: the built-in permissive policy (quick start).
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditConfig {
    /// The current audit file; rotated files sit beside it.
    pub path: PathBuf,
    /// Rotate the file once it grows past this many bytes.
    pub max_file_bytes: u64,
    /// Zeroed space kept ready past the last record, so a commit overwrites
    /// blocks that already exist and its fdatasync need not also commit a
    /// new file size. 0: plain appends.
    pub preallocate_bytes: u64,
    /// Write a signed checkpoint after this many records...
    pub checkpoint_every: u64,
    /// ...or after this long, whichever comes first.
    #[serde(with = "duration_serde")]
    pub checkpoint_interval: Duration,
}

impl AuditConfig {
    pub fn defaults_for(data_dir: &Path) -> Self {
        AuditConfig {
            path: data_dir.join("audit/audit.jsonl"),
            max_file_bytes: 64 * 1024 * 1024,
            preallocate_bytes: 1024 * 1024,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
        }
    }
}

/// `[federation]`: serving writ's own bundle to other trust domains and
/// fetching theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederationConfig {
    /// Polls of one bundle endpoint never come closer together than this,
    /// whatever refresh hint the peer sends. Default: 30s.
    #[serde(with = "duration_serde")]
    pub min_refresh_interval: Duration,
    /// Absent: writ serves no bundle endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// Written as `[[federation.trust_domain]]` tables in the file.
    #[serde(rename = "trust_domain", skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<FederatedTrustDomainConfig>,
}

/// The smallest `min_refresh_interval` accepted: polls faster than once a
/// second would only load the peer.
pub const MIN_REFRESH_FLOOR: Duration = Duration::from_secs(1);

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            min_refresh_interval: Duration::from_secs(30),
            bundle_endpoint: None,
            trust_domains: Vec::new(),
        }
    }
}

/// `[federation.bundle_endpoint]`: HTTPS `GET /` serving writ's bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleEndpointConfig {
    #[serde(serialize_with = "serialize_display")]
    pub listen: SocketAddr,
    #[serde(flatten)]
    pub profile: EndpointServerProfile,
    /// Sent as `spiffe_refresh_hint`. Default: 5m.
    #[serde(with = "duration_serde")]
    pub refresh_hint: Duration,
}

/// How the bundle endpoint authenticates itself to its clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "profile", rename_all = "snake_case")]
pub enum EndpointServerProfile {
    /// Present an X509-SVID for `spiffe_id`, minted from writ's own CA.
    HttpsSpiffe { spiffe_id: SpiffeId },
    /// Present a Web PKI certificate chain and key from PEM files.
    HttpsWeb { cert: PathBuf, key: PathBuf },
}

/// `[[federation.trust_domain]]`: a foreign trust domain whose bundle writ
/// fetches from its bundle endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederatedTrustDomainConfig {
    pub name: TrustDomain,
    /// An `https://` URL without userinfo, already checked to parse.
    pub url: String,
    #[serde(flatten)]
    pub profile: EndpointClientProfile,
    /// Bootstrap bundle (SPIFFE JSON or PEM), used until the first fetch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// Follow temporary redirects (302, 307). Default: true.
    pub follow_redirects: bool,
}

impl FederatedTrustDomainConfig {
    /// Whether the endpoint is `https_spiffe` with an ID in this trust
    /// domain: each fetch is then authenticated with this trust domain's
    /// own bundle, so that bundle must hold a usable X.509 authority.
    pub fn is_self_serving(&self) -> bool {
        matches!(
            &self.profile,
            EndpointClientProfile::HttpsSpiffe { endpoint_spiffe_id }
                if endpoint_spiffe_id.trust_domain() == &self.name
        )
    }
}

/// How writ authenticates a foreign bundle endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "profile", rename_all = "snake_case")]
pub enum EndpointClientProfile {
    /// The server presents an X509-SVID for `endpoint_spiffe_id`, checked
    /// against the latest bundle held for that ID's trust domain.
    HttpsSpiffe { endpoint_spiffe_id: SpiffeId },
    /// The server presents a Web PKI certificate for the URL's host, checked
    /// against `ca_bundle` or, without it, the system's CA file.
    HttpsWeb {
        #[serde(skip_serializing_if = "Option::is_none")]
        ca_bundle: Option<PathBuf>,
    },
}

/// `[telemetry]`: the HTTP listener for `/live`, `/ready` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TelemetryConfig {
    /// Absent: no HTTP listener at all.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_option_display"
    )]
    pub listen: Option<SocketAddr>,
    /// The endpoints are unauthenticated and metrics show what this node
    /// does (issuance rates, federated trust domains), so a non-loopback
    /// `listen` is refused unless this says it is intended.
    pub allow_remote: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    /// A `tracing_subscriber::EnvFilter` directive string, already checked
    /// to parse.
    pub level: String,
    pub format: LogFormat,
}

/// `cpu_scheduling`: the policy writ's threads run under (see `scheduling`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuScheduling {
    /// `SCHED_BATCH`, unless writ was started under a policy other than the
    /// default, which it then keeps.
    #[default]
    Batch,
    /// The policy writ was started with, whatever it is.
    Inherit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryConfig {
    pub spiffe_id: SpiffeId,
    /// Never empty.
    #[serde(serialize_with = "serialize_selectors")]
    pub selectors: Vec<Selector>,
    /// Overrides `ca.x509_svid_ttl` for this entry.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "duration_serde::option::serialize"
    )]
    pub x509_svid_ttl: Option<Duration>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub federates_with: Vec<TrustDomain>,
}

/// A problem with a config file. Everything found in the file itself says
/// where: `<file>:<line>:<column>: <message>`, 1-based, columns in characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config file: {message}", path.display())]
    Read {
        path: PathBuf,
        kind: std::io::ErrorKind,
        message: String,
    },
    #[error("{}:{line}:{column}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl ConfigError {
    /// Locates `offset` (a byte offset into `text`) as line and column.
    fn at(file: &Path, text: &str, offset: usize, message: impl Into<String>) -> ConfigError {
        let (line, column) = line_and_column(text, offset);
        ConfigError::Invalid {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    /// `(line, column)` for errors inside the file; `None` for read errors.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ConfigError::Read { message, .. } | ConfigError::Invalid { message, .. } => message,
        }
    }
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    // Spans from toml always fall on character boundaries; the fallback only
    // guards against a bad offset turning into a panic.
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

impl Config {
    /// The configuration writ runs with when there is no config file: the
    /// `writ.test` trust domain, paths for `env`'s user, and one entry
    /// `spiffe://writ.test/user/<name>` for processes of that user's uid.
    pub fn builtin_defaults(env: &Environment) -> Config {
        let mut config = Config::defaults_without_entries(env);
        let uid_selector = Selector::with_key("unix", "uid", env.uid);
        // A user name like "first.last@corp" is not a valid path segment;
        // the uid always is.
        let spiffe_id = config
            .trust_domain
            .spiffe_id(&format!("/user/{}", env.user_name))
            .or_else(|_| config.trust_domain.spiffe_id(&format!("/user/{}", env.uid)));
        if let Ok(spiffe_id) = spiffe_id {
            config.entries.push(EntryConfig {
                spiffe_id,
                selectors: vec![uid_selector],
                x509_svid_ttl: None,
                dns_names: Vec::new(),
                hint: String::new(),
                federates_with: Vec::new(),
            });
        }
        config
    }

    /// What a config file starts from: every default, but no entries, so
    /// a file lists exactly the entries it means.
    fn defaults_without_entries(env: &Environment) -> Config {
        let data_dir = env.default_data_dir();
        let audit = AuditConfig::defaults_for(&data_dir);
        let socket_dir = env.default_socket_dir(&data_dir);
        Config {
            trust_domain: default_trust_domain(),
            cpu_scheduling: CpuScheduling::default(),
            workload_api: WorkloadApiConfig {
                socket_path: socket_dir.join("workload.sock"),
                reattest_interval: crate::workload_api::DEFAULT_REATTEST_INTERVAL,
                max_connections_per_uid: crate::peer::DEFAULT_MAX_CONNECTIONS_PER_UID,
                max_streams_per_uid: crate::workload_api::DEFAULT_MAX_STREAMS_PER_UID,
            },
            admin_api: AdminApiConfig {
                socket_path: socket_dir.join("admin.sock"),
                authorized: vec![vec![Selector::with_key("unix", "uid", env.uid)]],
                bind_any_pid: Vec::new(),
                bind_same_uid: true,
                operators: vec![vec![Selector::with_key("unix", "uid", env.uid)]],
            },
            data_dir,
            ca: CaConfig::default(),
            attestors: AttestorsConfig::default(),
            tasks: TasksConfig::default(),
            policy: PolicyConfig::default(),
            audit,
            log: LogConfig::default(),
            federation: FederationConfig::default(),
            telemetry: TelemetryConfig::default(),
            entries: Vec::new(),
        }
    }

    /// Loads and validates `path`. On failure returns the first problem in
    /// file order; `validate_file` returns all of them.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        validate_file(path).map_err(first_error)
    }

    /// Parses and validates `text`, naming `origin` in errors. Defaults come
    /// from the current user (`Environment::current()`).
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        Config::from_toml_str_with_env(text, origin, &Environment::current()).map_err(first_error)
    }

    /// Parses and validates `text` with defaults for `env`, returning every
    /// problem found, in file order.
    pub fn from_toml_str_with_env(
        text: &str,
        origin: &Path,
        env: &Environment,
    ) -> Result<Config, Vec<ConfigError>> {
        build::build(text, origin, env, None)
    }

    /// Renders the config as TOML that loads back to an equal `Config`
    /// (for printing the effective configuration).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

/// Loads `path` for `writ validate`: the config, or every problem in it.
pub fn validate_file(path: &Path) -> Result<Config, Vec<ConfigError>> {
    validate_file_with_env(path, &Environment::current())
}

/// `validate_file` with injected defaults.
pub fn validate_file_with_env(path: &Path, env: &Environment) -> Result<Config, Vec<ConfigError>> {
    let text = read_text(path)?;
    build::build(&text, path, env, None)
}

/// Loads `path` for a reload of a writ running with `running`. The file
/// must be valid as written, since the next start reads it; and since a
/// reload keeps the restart-only settings at their running values, what it
/// applies (entries, federated trust domains) must also be valid with
/// those: an entry in a new trust_domain, or living longer than the
/// running `ca.ca_ttl`, is refused until a restart. Returns the file's
/// config, restart-only settings as written.
pub fn validate_reload(path: &Path, running: &Config) -> Result<Config, Vec<ConfigError>> {
    let env = Environment::current();
    let text = read_text(path)?;
    let config = build::build(&text, path, &env, None)?;
    build::build(&text, path, &env, Some(running))?;
    Ok(config)
}

fn read_text(path: &Path) -> Result<String, Vec<ConfigError>> {
    let bytes = std::fs::read(path).map_err(|err| {
        vec![ConfigError::Read {
            path: path.to_owned(),
            kind: err.kind(),
            message: err.to_string(),
        }]
    })?;
    String::from_utf8(bytes).map_err(|err| {
        let valid = err.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&err.as_bytes()[..valid]);
        vec![ConfigError::at(
            path,
            &text,
            valid,
            "the file is not valid UTF-8",
        )]
    })
}

fn first_error(mut errors: Vec<ConfigError>) -> ConfigError {
    // build never returns an empty list; the fallback keeps this total.
    if errors.is_empty() {
        return ConfigError::Invalid {
            file: PathBuf::new(),
            line: 1,
            column: 1,
            message: "invalid configuration".to_owned(),
        };
    }
    errors.swap_remove(0)
}

fn default_trust_domain() -> TrustDomain {
    // The constant is a valid name; the type has no infallible constructor.
    match TrustDomain::new(DEFAULT_TRUST_DOMAIN) {
        Ok(trust_domain) => trust_domain,
        Err(err) => unreachable!("DEFAULT_TRUST_DOMAIN is invalid: {err}"),
    }
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            ca_ttl: Duration::from_secs(24 * 3600),
            x509_svid_ttl: Duration::from_secs(3600),
            jwt_svid_ttl: Duration::from_secs(5 * 60),
            upstream: None,
        }
    }
}

impl Default for AttestorsConfig {
    fn default() -> Self {
        AttestorsConfig {
            unix: UnixAttestorConfig {
                discover_workload_path: true,
                max_hash_bytes: 100 * MIB,
            },
            cgroup: CgroupAttestorConfig {
                trusted_roots: vec!["/system.slice".to_owned(), "/writ.slice".to_owned()],
            },
        }
    }
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            max_ttl: Duration::from_secs(3600),
            default_ttl: Duration::from_secs(10 * 60),
            x509_svid_ttl: Duration::from_secs(10 * 60),
            max_depth: 4,
            completed_retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn serialize_display<S: Serializer, T: std::fmt::Display>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn serialize_option_display<S: Serializer, T: std::fmt::Display>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer.collect_str(value),
        None => serializer.serialize_none(),
    }
}

fn serialize_selectors<S: Serializer>(
    selectors: &[Selector],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(selectors.iter().map(Selector::to_string))
}

fn serialize_selector_sets<S: Serializer>(
    sets: &[Vec<Selector>],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(
        sets.iter()
            .map(|set| set.iter().map(Selector::to_string).collect::<Vec<_>>()),
    )
}

#[cfg(test)]
mod tests;
