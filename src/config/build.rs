//! Turns the file as written (`raw`) into a checked `Config`, filling omitted
//! keys from the defaults and collecting every problem with the byte span of
//! the value (or table) at fault, so all of them can be reported at once.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use writ_attestors::Selector;

use super::raw::{
    RawAdminApi, RawAttestors, RawAudit, RawBundleEndpoint, RawCa, RawConfig, RawEntry,
    RawFederatedTrustDomain, RawFederation, RawLog, RawPolicy, RawTasks, RawTelemetry, RawUpstream,
    Text,
};
use super::{
    AdminApiConfig, AttestorsConfig, AuditConfig, BundleEndpointConfig, CaConfig, Config,
    ConfigError, CpuScheduling, EndpointClientProfile, EndpointServerProfile, EntryConfig,
    Environment, FederatedTrustDomainConfig, FederationConfig, LogConfig, LogFormat,
    MAX_HINT_BYTES, MAX_SOCKET_PATH_BYTES, MIN_REFRESH_FLOOR, PolicyConfig, TasksConfig,
    TelemetryConfig, UpstreamCaConfig, WorkloadApiConfig, format_duration, parse_duration,
};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// The largest per-uid connection or stream limit: Linux's default ceiling
/// on open files per process (`fs.nr_open`), past which a limit could never
/// be reached.
const MAX_PER_UID_LIMIT: usize = 1 << 20;

/// Builds the config in `text`. With `running` (on reload), the settings a
/// reload applies are checked against the restart-only settings writ is
/// running with instead of the file's, since a reload keeps those: the
/// entries and federated trust domains against the running trust domain,
/// entry lifetimes against the running `ca.ca_ttl`.
pub(super) fn build(
    text: &str,
    origin: &Path,
    env: &Environment,
    running: Option<&Config>,
) -> Result<Config, Vec<ConfigError>> {
    let raw: RawConfig = match super::structure::parse_all(text) {
        Ok(raw) => raw,
        Err(problems) => {
            let mut errors: Vec<ConfigError> = problems
                .iter()
                .map(|problem| {
                    let span = problem.error.span().unwrap_or(0..0);
                    let mut message = super::parse_error::message(&problem.error);
                    // toml does not say which key is duplicated; its span does.
                    if message == "duplicate key"
                        && let Some(key) =
                            problem.text.get(span.clone()).filter(|key| !key.is_empty())
                    {
                        message = format!("duplicate key `{key}`");
                    }
                    ConfigError::at(origin, text, span.start, message)
                })
                .collect();
            errors.sort_by_key(|err| err.position());
            return Err(errors);
        }
    };
    let mut builder = Builder {
        origin,
        text,
        errors: Vec::new(),
        running: running.map(|config| Running {
            trust_domain: config.trust_domain.clone(),
            ca_ttl: config.ca.ca_ttl,
            endpoint_ids: crate::federation::reserved_ids(
                &config.trust_domain,
                config.federation.bundle_endpoint.as_ref(),
            ),
        }),
    };
    let config = builder.config(raw, env);
    if builder.errors.is_empty() {
        Ok(config)
    } else {
        builder.errors.sort_by_key(|err| err.position());
        Err(builder.errors)
    }
}

/// A value and where it came from: `None` means it is a default.
struct Sourced<T> {
    value: T,
    span: Option<Range<usize>>,
}

impl<T> Sourced<T> {
    fn default(value: T) -> Self {
        Sourced { value, span: None }
    }
}

struct Builder<'a> {
    origin: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
    running: Option<Running>,
}

/// The restart-only settings of a running writ that the reloadable ones
/// depend on.
struct Running {
    trust_domain: TrustDomain,
    ca_ttl: Duration,
    /// The bundle endpoint keeps its identity until a restart.
    endpoint_ids: Vec<SpiffeId>,
}

/// Two listeners on one port whose addresses are the same or one of them
/// the wildcard: the second bind fails. Port 0 picks a free port for each.
fn same_port_overlaps(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// How the audit trail at `path` would land on one of writ's own files in
/// `data_dir`, if it would: recovery at start would take such a file for a
/// trail with a torn tail and move its content aside. Compared lexically
/// (`.` and `..` resolved, symlinks not followed); recovery refuses a
/// newest file that holds no record at all, which catches the rest.
fn clashes_with_own_state(data_dir: &Path, path: &Path) -> Option<String> {
    let data_dir = lexically_normal(data_dir);
    let path = lexically_normal(path);
    let store = data_dir.join(super::STORE_FILE);
    let ca_dir = data_dir.join(super::CA_DIR);
    let state_lock = data_dir.join(super::STATE_LOCK_FILE);
    // SQLite's files beside the store: `<store>-wal`, `-shm`, `-journal`.
    let store_companions = ["-wal", "-shm", "-journal"].map(|s| {
        let mut name = store.as_os_str().to_owned();
        name.push(s);
        PathBuf::from(name)
    });
    if path == store || store_companions.contains(&path) {
        return Some(format!(
            "is writ's store ({} and its -wal/-shm files)",
            store.display()
        ));
    }
    if path.starts_with(&ca_dir) {
        return Some(format!(
            "is inside writ's CA directory {}",
            ca_dir.display()
        ));
    }
    if path == state_lock {
        return Some(format!(
            "is the state directory's lock {}",
            state_lock.display()
        ));
    }
    if crate::audit::lock_path(&path) == state_lock {
        return Some(format!(
            "would put the trail's lock file at {}, the state directory's lock",
            state_lock.display()
        ));
    }
    if path == data_dir {
        return Some(format!("is the data_dir {} itself", data_dir.display()));
    }
    None
}

/// `path` without `.` components and with each `..` taking off the one
/// before it, as the kernel would resolve it if nothing were a symlink.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    normal
}

/// Ends a message that compares a setting with a running restart-only one,
/// which the file may have changed.
fn kept_until_restart(setting: &str) -> String {
    format!(
        " (a changed {setting} takes effect only when writ restarts; a reload keeps the running one)"
    )
}

impl Builder<'_> {
    fn error(&mut self, span: Range<usize>, message: String) {
        self.errors
            .push(ConfigError::at(self.origin, self.text, span.start, message));
    }

    fn config(&mut self, raw: RawConfig, env: &Environment) -> Config {
        let defaults = Config::defaults_without_entries(env);

        let trust_domain = match &raw.trust_domain {
            None => Some(defaults.trust_domain.clone()),
            Some(text) => match TrustDomain::new(text.get_ref()) {
                Ok(trust_domain) => Some(trust_domain),
                Err(err) => {
                    self.error(
                        text.span(),
                        format!("trust_domain {:?}: {err}", text.get_ref()),
                    );
                    None
                }
            },
        };

        let data_dir = match &raw.data_dir {
            None => Sourced::default(defaults.data_dir.clone()),
            Some(text) => Sourced {
                value: self
                    .absolute_path("data_dir", text)
                    .unwrap_or_else(|| defaults.data_dir.clone()),
                span: Some(text.span()),
            },
        };
        let cpu_scheduling = match &raw.cpu_scheduling {
            None => defaults.cpu_scheduling,
            Some(text) => match text.get_ref().as_str() {
                "batch" => CpuScheduling::Batch,
                "inherit" => CpuScheduling::Inherit,
                other => {
                    self.error(
                        text.span(),
                        format!(
                            "cpu_scheduling {other:?} is unknown; use \"batch\" or \"inherit\""
                        ),
                    );
                    defaults.cpu_scheduling
                }
            },
        };
        // Socket defaults follow the data_dir in use, not the default one.
        let socket_dir = env.default_socket_dir(&data_dir.value);

        let (raw_workload_socket, raw_reattest, raw_connections, raw_streams) =
            match raw.workload_api {
                Some(api) => (
                    api.socket_path,
                    api.reattest_interval,
                    api.max_connections_per_uid,
                    api.max_streams_per_uid,
                ),
                None => (None, None, None, None),
            };
        let reattest_interval = self.positive_duration(
            "workload_api.reattest_interval",
            raw_reattest.as_ref(),
            defaults.workload_api.reattest_interval,
        );
        let max_connections_per_uid = self.per_uid_limit(
            "workload_api.max_connections_per_uid",
            raw_connections,
            defaults.workload_api.max_connections_per_uid,
        );
        let max_streams_per_uid = self.per_uid_limit(
            "workload_api.max_streams_per_uid",
            raw_streams,
            defaults.workload_api.max_streams_per_uid,
        );
        let workload_socket = self.socket_path(
            "workload_api.socket_path",
            raw_workload_socket,
            socket_dir.join("workload.sock"),
            &data_dir,
        );
        let admin_api = self.admin_api(
            raw.admin_api,
            &socket_dir,
            &data_dir,
            defaults.admin_api.clone(),
        );
        if let (Some(workload), Some(admin)) = (&workload_socket, &admin_api)
            && workload.value == admin.socket_path.value
        {
            let span = admin.socket_path.span.clone().or(workload.span.clone());
            self.error(
                span.unwrap_or(0..0),
                format!(
                    "admin_api.socket_path and workload_api.socket_path are both {}; each API needs its own socket",
                    workload.value.display()
                ),
            );
        }

        let ca = self.ca(raw.ca);
        let attestors = self.attestors(raw.attestors, defaults.attestors);
        let tasks = self.tasks(raw.tasks, ca.as_ref());
        let log = self.log(raw.log, defaults.log);
        let policy = self.policy(raw.policy);
        let audit = self.audit(raw.audit, &data_dir.value);
        // What a reload applies is checked against what it keeps running.
        let (own_trust_domain, entry_ca_ttl) = match &self.running {
            Some(running) => (
                Some(running.trust_domain.clone()),
                Some(Sourced::default(running.ca_ttl)),
            ),
            None => (trust_domain.clone(), ca.as_ref().map(CheckedCa::ca_ttl)),
        };
        let federation = self.federation(
            raw.federation,
            trust_domain.as_ref(),
            own_trust_domain.as_ref(),
        );
        let telemetry_span = raw
            .telemetry
            .as_ref()
            .and_then(|t| t.listen.as_ref())
            .map(|listen| listen.span());
        let telemetry = self.telemetry(raw.telemetry);
        // Found here rather than at start, where the second bind would fail
        // after the sockets were bound.
        if let (Some(span), Some(telemetry), Some(endpoint)) = (
            telemetry_span,
            telemetry.listen,
            federation.bundle_endpoint.as_ref().map(|e| e.listen),
        ) && same_port_overlaps(telemetry, endpoint)
        {
            self.error(
                span,
                format!(
                    "telemetry.listen {telemetry} and federation.bundle_endpoint.listen {endpoint} cannot both be bound; give them different ports"
                ),
            );
        }
        // Those of the endpoint running now and of the one the file
        // configures for the next start: an entry may hold neither.
        let mut reserved: Vec<SpiffeId> = self
            .running
            .as_ref()
            .map(|running| running.endpoint_ids.clone())
            .unwrap_or_default();
        if let Some(own) = &own_trust_domain {
            reserved.extend(crate::federation::reserved_ids(
                own,
                federation.bundle_endpoint.as_ref(),
            ));
        }
        let entries = self.entries(
            &raw.entry,
            own_trust_domain.as_ref(),
            entry_ca_ttl.as_ref(),
            &reserved,
        );

        Config {
            trust_domain: trust_domain.unwrap_or(defaults.trust_domain),
            data_dir: data_dir.value,
            cpu_scheduling,
            workload_api: WorkloadApiConfig {
                socket_path: workload_socket.map_or(defaults.workload_api.socket_path, |s| s.value),
                reattest_interval: reattest_interval
                    .map_or(defaults.workload_api.reattest_interval, |r| r.value),
                max_connections_per_uid,
                max_streams_per_uid,
            },
            admin_api: admin_api.map_or(defaults.admin_api, |admin| AdminApiConfig {
                socket_path: admin.socket_path.value,
                authorized: admin.authorized,
                bind_any_pid: admin.bind_any_pid,
                bind_same_uid: admin.bind_same_uid,
                operators: admin.operators,
            }),
            ca: ca.map_or_else(CaConfig::default, |ca| ca.config),
            attestors,
            tasks,
            log,
            policy,
            audit,
            federation,
            telemetry,
            entries,
        }
    }

    fn telemetry(&mut self, raw: Option<RawTelemetry>) -> TelemetryConfig {
        let Some(raw) = raw else {
            return TelemetryConfig::default();
        };
        let allow_remote = raw.allow_remote.unwrap_or(false);
        let listen = raw.listen.and_then(|text| {
            let Ok(addr) = text.get_ref().parse::<std::net::SocketAddr>() else {
                self.error(
                    text.span(),
                    format!(
                        "telemetry.listen {:?} is not an IP address and port such as \"127.0.0.1:9600\"",
                        text.get_ref()
                    ),
                );
                return None;
            };
            if !addr.ip().is_loopback() && !allow_remote {
                self.error(
                    text.span(),
                    format!(
                        "telemetry.listen {addr} is not a loopback address; the health and metrics endpoints have no authentication, so set telemetry.allow_remote = true if other hosts should reach them"
                    ),
                );
                return None;
            }
            Some(addr)
        });
        TelemetryConfig {
            listen,
            allow_remote,
        }
    }

    fn policy(&mut self, raw: Option<RawPolicy>) -> PolicyConfig {
        let files = raw.and_then(|p| p.files).unwrap_or_default();
        PolicyConfig {
            files: files
                .iter()
                .enumerate()
                .filter_map(|(i, f)| self.absolute_path(&format!("policy.files[{i}]"), f))
                .collect(),
        }
    }

    fn audit(&mut self, raw: Option<RawAudit>, data_dir: &Path) -> AuditConfig {
        let defaults = AuditConfig::defaults_for(data_dir);
        let Some(raw) = raw else { return defaults };
        let path = match &raw.path {
            Some(text) => match self.absolute_path("audit.path", text) {
                Some(path) => {
                    if let Some(clash) = clashes_with_own_state(data_dir, &path) {
                        self.error(
                            text.span(),
                            format!(
                                "audit.path {:?} {clash}; the audit trail needs a file of its own",
                                text.get_ref()
                            ),
                        );
                    }
                    path
                }
                None => defaults.path.clone(),
            },
            None => defaults.path.clone(),
        };
        let mut positive = |key: &str, value: Option<Spanned<u64>>, default: u64| match value {
            Some(v) if *v.get_ref() == 0 => {
                self.error(v.span(), format!("{key} must be at least 1"));
                default
            }
            Some(v) => v.into_inner(),
            None => default,
        };
        let max_file_bytes = positive(
            "audit.max_file_bytes",
            raw.max_file_bytes,
            defaults.max_file_bytes,
        );
        let checkpoint_every = positive(
            "audit.checkpoint_every",
            raw.checkpoint_every,
            defaults.checkpoint_every,
        );
        let checkpoint_interval = self
            .positive_duration(
                "audit.checkpoint_interval",
                raw.checkpoint_interval.as_ref(),
                defaults.checkpoint_interval,
            )
            .map_or(defaults.checkpoint_interval, |d| d.value);
        AuditConfig {
            path,
            max_file_bytes,
            preallocate_bytes: raw.preallocate_bytes.unwrap_or(defaults.preallocate_bytes),
            checkpoint_every,
            checkpoint_interval,
        }
    }

    /// An absolute path; `None` (with an error recorded) otherwise.
    fn absolute_path(&mut self, key: &str, text: &Text) -> Option<PathBuf> {
        let value = text.get_ref();
        let problem = if value.is_empty() {
            "is empty; it must be an absolute path"
        } else if value.contains('\0') {
            "contains a NUL character"
        } else if !Path::new(value).is_absolute() {
            "must be an absolute path (start with '/')"
        } else {
            return Some(PathBuf::from(value));
        };
        self.error(text.span(), format!("{key} {value:?} {problem}"));
        None
    }

    /// The configured socket path, or `default` if the key is absent; either
    /// way it must fit in `sun_path`.
    fn socket_path(
        &mut self,
        key: &str,
        text: Option<Text>,
        default: PathBuf,
        data_dir: &Sourced<PathBuf>,
    ) -> Option<Sourced<PathBuf>> {
        let socket = match &text {
            // A defaulted socket path that is too long is the data_dir's
            // fault (it lives under it) when the file set one.
            None => Sourced {
                value: default,
                span: data_dir.span.clone(),
            },
            Some(text) => Sourced {
                value: self.absolute_path(key, text)?,
                span: Some(text.span()),
            },
        };
        let length = socket.value.as_os_str().len();
        if length > MAX_SOCKET_PATH_BYTES {
            let origin = if text.is_some() {
                ""
            } else {
                " (derived from data_dir)"
            };
            self.error(
                socket.span.clone().unwrap_or(0..0),
                format!(
                    "{key} {}{origin} is {length} bytes long; a Unix socket path can be at most {MAX_SOCKET_PATH_BYTES}",
                    socket.value.display()
                ),
            );
            return None;
        }
        Some(socket)
    }

    fn admin_api(
        &mut self,
        raw: Option<RawAdminApi>,
        socket_dir: &Path,
        data_dir: &Sourced<PathBuf>,
        defaults: AdminApiConfig,
    ) -> Option<CheckedAdminApi> {
        let (socket_text, authorized, bind_any_pid, bind_same_uid, operators) = match raw {
            Some(raw) => (
                raw.socket_path,
                raw.authorized,
                raw.bind_any_pid,
                raw.bind_same_uid,
                raw.operators,
            ),
            None => (None, None, None, None, None),
        };
        let socket_path = self.socket_path(
            "admin_api.socket_path",
            socket_text,
            socket_dir.join("admin.sock"),
            data_dir,
        );
        let authorized = match authorized {
            None => Some(defaults.authorized),
            Some(sets) => self.selector_sets("admin_api.authorized", &sets),
        };
        let bind_any_pid = match bind_any_pid {
            None => Some(defaults.bind_any_pid),
            Some(sets) => self.selector_sets("admin_api.bind_any_pid", &sets),
        };
        let operators = match operators {
            None => Some(defaults.operators),
            Some(sets) => self.selector_sets("admin_api.operators", &sets),
        };
        Some(CheckedAdminApi {
            socket_path: socket_path?,
            authorized: authorized?,
            bind_any_pid: bind_any_pid?,
            bind_same_uid: bind_same_uid.unwrap_or(defaults.bind_same_uid),
            operators: operators?,
        })
    }

    fn selector_sets(
        &mut self,
        field: &str,
        sets: &[Spanned<Vec<Text>>],
    ) -> Option<Vec<Vec<Selector>>> {
        let mut valid = true;
        let mut parsed_sets = Vec::with_capacity(sets.len());
        for (set_index, set) in sets.iter().enumerate() {
            if set.get_ref().is_empty() {
                self.error(
                    set.span(),
                    format!(
                        "{field}[{set_index}] is an empty selector set, which every caller would match; list at least one selector"
                    ),
                );
                valid = false;
                continue;
            }
            let key = format!("{field}[{set_index}]");
            match self.selectors(&key, set.get_ref()) {
                Some(selectors) => parsed_sets.push(selectors),
                None => valid = false,
            }
        }
        valid.then_some(parsed_sets)
    }

    fn selectors(&mut self, key: &str, texts: &[Text]) -> Option<Vec<Selector>> {
        let mut valid = true;
        let mut selectors = Vec::with_capacity(texts.len());
        for (index, text) in texts.iter().enumerate() {
            match text.get_ref().parse::<Selector>() {
                Ok(selector) => match selector.unmatchable() {
                    None => selectors.push(selector),
                    Some(why) => {
                        self.error(text.span(), format!("{key}[{index}]: {why}"));
                        valid = false;
                    }
                },
                Err(err) => {
                    self.error(text.span(), format!("{key}[{index}]: {err}"));
                    valid = false;
                }
            }
        }
        // A selector set matches as a set: a repeat adds nothing, and most
        // likely was meant as another selector. Only when every item parsed
        // do the indexes line up with the file's.
        if valid && let Some((n, first)) = crate::entries::first_repeat(&selectors) {
            let list = key.rsplit_once('.').map_or(key, |(_, last)| last);
            self.error(
                texts[n].span(),
                format!(
                    "{key}[{n}] {:?} repeats {list}[{first}]",
                    texts[n].get_ref()
                ),
            );
            valid = false;
        }
        valid.then_some(selectors)
    }

    /// A per-uid limit: a whole number from 1 to `MAX_PER_UID_LIMIT`; absent
    /// means `default`.
    fn per_uid_limit(&mut self, key: &str, raw: Option<Spanned<i64>>, default: usize) -> usize {
        let Some(raw) = raw else {
            return default;
        };
        match usize::try_from(*raw.get_ref()) {
            Ok(limit) if (1..=MAX_PER_UID_LIMIT).contains(&limit) => limit,
            _ => {
                self.error(
                    raw.span(),
                    format!(
                        "{key} must be a whole number from 1 to {MAX_PER_UID_LIMIT}, not {}",
                        raw.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// A duration that must be positive; absent means `default`.
    fn positive_duration(
        &mut self,
        key: &str,
        text: Option<&Text>,
        default: Duration,
    ) -> Option<Sourced<Duration>> {
        let Some(text) = text else {
            return Some(Sourced::default(default));
        };
        match parse_duration(text.get_ref()) {
            Ok(Duration::ZERO) => {
                self.error(text.span(), format!("{key} must be greater than zero"));
                None
            }
            Ok(value) => Some(Sourced {
                value,
                span: Some(text.span()),
            }),
            Err(err) => {
                self.error(text.span(), format!("{key}: {err}"));
                None
            }
        }
    }

    /// As `positive_duration`, and an error below `minimum`.
    fn duration_at_least(
        &mut self,
        key: &str,
        text: Option<&Text>,
        default: Duration,
        minimum: Duration,
    ) -> Option<Sourced<Duration>> {
        let value = self.positive_duration(key, text, default)?;
        if value.value < minimum
            && let Some(text) = text
        {
            self.error(
                text.span(),
                format!("{key} must be at least {}", format_duration(minimum)),
            );
            return None;
        }
        Some(value)
    }

    /// A certificate's or token's lifetime: at least `MIN_SVID_TTL`, and in
    /// whole seconds, as X.509 and JWT times are (and as the store keeps
    /// them). Shorter, nothing could be issued at all; a fraction would be
    /// dropped without a word.
    fn lifetime(
        &mut self,
        key: &str,
        text: Option<&Text>,
        default: Duration,
    ) -> Option<Sourced<Duration>> {
        let value = self.duration_at_least(key, text, default, crate::ca::MIN_SVID_TTL)?;
        if value.value.subsec_nanos() != 0
            && let Some(text) = text
        {
            self.error(
                text.span(),
                format!("{key} must be a whole number of seconds"),
            );
            return None;
        }
        Some(value)
    }

    /// Records an error unless `shorter` is at most `longer`. It points at
    /// `shorter` when the file set it, else at `longer`, which must then be
    /// the one the file changed (the defaults are consistent).
    fn at_most(
        &mut self,
        (shorter_key, shorter): (&str, &Sourced<Duration>),
        (longer_key, longer): (&str, &Sourced<Duration>),
        reason: &str,
    ) {
        if shorter.value <= longer.value {
            return;
        }
        let span = shorter.span.clone().or(longer.span.clone()).unwrap_or(0..0);
        self.error(
            span,
            format!(
                "{shorter_key} ({}) is longer than {longer_key} ({}); {reason}",
                format_duration(shorter.value),
                format_duration(longer.value)
            ),
        );
    }

    fn ca(&mut self, raw: Option<RawCa>) -> Option<CheckedCa> {
        let defaults = CaConfig::default();
        let raw = raw.unwrap_or(RawCa {
            ca_ttl: None,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            upstream: None,
        });
        let ca_ttl = self.positive_duration("ca.ca_ttl", raw.ca_ttl.as_ref(), defaults.ca_ttl);
        let x509_svid_ttl = self.lifetime(
            "ca.x509_svid_ttl",
            raw.x509_svid_ttl.as_ref(),
            defaults.x509_svid_ttl,
        );
        let jwt_svid_ttl = self.lifetime(
            "ca.jwt_svid_ttl",
            raw.jwt_svid_ttl.as_ref(),
            defaults.jwt_svid_ttl,
        );
        if let (Some(ca_ttl), Some(x509_svid_ttl)) = (&ca_ttl, &x509_svid_ttl) {
            self.at_most(
                ("ca.x509_svid_ttl", x509_svid_ttl),
                ("ca.ca_ttl", ca_ttl),
                "an SVID cannot outlive the CA that signs it",
            );
        }
        if let (Some(ca_ttl), Some(jwt_svid_ttl)) = (&ca_ttl, &jwt_svid_ttl) {
            self.at_most(
                ("ca.jwt_svid_ttl", jwt_svid_ttl),
                ("ca.ca_ttl", ca_ttl),
                "a JWT-SVID cannot outlive the key that signs it",
            );
        }
        let upstream = match raw.upstream {
            None => Some(None),
            Some(upstream) => self.upstream(&upstream).map(Some),
        };
        let (ca_ttl, x509_svid_ttl, jwt_svid_ttl) = (ca_ttl?, x509_svid_ttl?, jwt_svid_ttl?);
        Some(CheckedCa {
            config: CaConfig {
                ca_ttl: ca_ttl.value,
                x509_svid_ttl: x509_svid_ttl.value,
                jwt_svid_ttl: jwt_svid_ttl.value,
                upstream: upstream?,
            },
            ca_ttl_span: ca_ttl.span,
        })
    }

    fn upstream(&mut self, raw: &Spanned<RawUpstream>) -> Option<UpstreamCaConfig> {
        let table = raw.get_ref();
        let mut file = |name: &str, what: &str, text: &Option<Text>| match text {
            Some(text) => self.absolute_path(&format!("ca.upstream.{name}"), text),
            None => {
                self.error(
                    raw.span(),
                    format!("ca.upstream is missing `{name}` (the PEM file with {what})"),
                );
                None
            }
        };
        let cert = file("cert", "the intermediate CA certificate", &table.cert);
        let key = file("key", "the intermediate CA's private key", &table.key);
        let bundle = file("bundle", "the upstream root certificates", &table.bundle);
        Some(UpstreamCaConfig {
            cert: cert?,
            key: key?,
            bundle: bundle?,
        })
    }

    fn attestors(
        &mut self,
        raw: Option<RawAttestors>,
        defaults: AttestorsConfig,
    ) -> AttestorsConfig {
        let mut config = defaults;
        let Some(raw) = raw else {
            return config;
        };
        if let Some(unix) = raw.unix {
            if let Some(discover) = unix.discover_workload_path {
                config.unix.discover_workload_path = discover;
            }
            if let Some(max_hash_bytes) = unix.max_hash_bytes {
                config.unix.max_hash_bytes = max_hash_bytes;
            }
        }
        if let Some(roots) = raw.cgroup.and_then(|cgroup| cgroup.trusted_roots) {
            config.cgroup.trusted_roots = Vec::with_capacity(roots.len());
            for (index, root) in roots.iter().enumerate() {
                match cgroup_path_problem(root.get_ref()) {
                    None => config.cgroup.trusted_roots.push(root.get_ref().clone()),
                    Some(problem) => self.error(
                        root.span(),
                        format!(
                            "attestors.cgroup.trusted_roots[{index}] {:?} is not an absolute, normalized cgroup path: {problem}",
                            root.get_ref()
                        ),
                    ),
                }
            }
        }
        config
    }

    fn tasks(&mut self, raw: Option<RawTasks>, ca: Option<&CheckedCa>) -> TasksConfig {
        let defaults = TasksConfig::default();
        let raw = raw.unwrap_or(RawTasks {
            max_ttl: None,
            default_ttl: None,
            x509_svid_ttl: None,
            max_depth: None,
            completed_retention: None,
        });
        let max_ttl = self.duration_at_least(
            "tasks.max_ttl",
            raw.max_ttl.as_ref(),
            defaults.max_ttl,
            super::MIN_TASK_TTL,
        );
        let default_ttl = self.duration_at_least(
            "tasks.default_ttl",
            raw.default_ttl.as_ref(),
            defaults.default_ttl,
            super::MIN_TASK_TTL,
        );
        let x509_svid_ttl = self.lifetime(
            "tasks.x509_svid_ttl",
            raw.x509_svid_ttl.as_ref(),
            defaults.x509_svid_ttl,
        );
        if let (Some(max_ttl), Some(default_ttl)) = (&max_ttl, &default_ttl) {
            self.at_most(
                ("tasks.default_ttl", default_ttl),
                ("tasks.max_ttl", max_ttl),
                "a task's default lifetime must be allowed by its maximum",
            );
        }
        if let (Some(max_ttl), Some(x509_svid_ttl)) = (&max_ttl, &x509_svid_ttl) {
            self.at_most(
                ("tasks.x509_svid_ttl", x509_svid_ttl),
                ("tasks.max_ttl", max_ttl),
                "a task's certificate should not outlive the longest task",
            );
        }
        if let (Some(ca), Some(x509_svid_ttl)) = (ca, &x509_svid_ttl) {
            let ca_ttl = ca.ca_ttl();
            self.at_most(
                ("tasks.x509_svid_ttl", x509_svid_ttl),
                ("ca.ca_ttl", &ca_ttl),
                "an SVID cannot outlive the CA that signs it",
            );
        }
        let completed_retention = self.positive_duration(
            "tasks.completed_retention",
            raw.completed_retention.as_ref(),
            defaults.completed_retention,
        );
        let max_depth = match raw.max_depth {
            Some(depth) if *depth.get_ref() == 0 => {
                self.error(
                    depth.span(),
                    "tasks.max_depth must be at least 1 (1 allows top-level tasks only)".to_owned(),
                );
                defaults.max_depth
            }
            Some(depth) => depth.into_inner(),
            None => defaults.max_depth,
        };
        TasksConfig {
            max_ttl: max_ttl.map_or(defaults.max_ttl, |ttl| ttl.value),
            default_ttl: default_ttl.map_or(defaults.default_ttl, |ttl| ttl.value),
            x509_svid_ttl: x509_svid_ttl.map_or(defaults.x509_svid_ttl, |ttl| ttl.value),
            max_depth,
            completed_retention: completed_retention
                .map_or(defaults.completed_retention, |kept| kept.value),
        }
    }

    fn log(&mut self, raw: Option<RawLog>, defaults: LogConfig) -> LogConfig {
        let mut config = defaults;
        let Some(raw) = raw else {
            return config;
        };
        if let Some(level) = raw.level {
            let value = level.get_ref();
            if value.trim().is_empty() {
                self.error(
                    level.span(),
                    "log.level is empty; use a level such as \"info\" or EnvFilter directives such as \"info,writ=debug\"".to_owned(),
                );
            } else if let Err(err) = tracing_subscriber::EnvFilter::builder().parse(value) {
                self.error(
                    level.span(),
                    format!("log.level {value:?} is not a valid tracing filter: {err}"),
                );
            } else if let Some(word) = bare_target(value) {
                // EnvFilter reads a lone word as a target to log, which turns
                // every other target off: "infoo" would silence writ.
                self.error(
                    level.span(),
                    format!(
                        "log.level: {word:?} is neither a level (trace, debug, info, warn, error, off) nor a target=level directive; a lone word names a target and turns off every other log line (for all of one target's lines write \"{word}=trace\")"
                    ),
                );
            } else {
                config.level = value.clone();
            }
        }
        if let Some(format) = raw.format {
            match format.get_ref().as_str() {
                "text" => config.format = LogFormat::Text,
                "json" => config.format = LogFormat::Json,
                other => self.error(
                    format.span(),
                    format!("log.format {other:?} is unknown; use \"text\" or \"json\""),
                ),
            }
        }
        config
    }

    /// `trust_domain` is the file's, which the bundle endpoint serves (from
    /// the next start); `own` is the one the peers are checked against.
    fn federation(
        &mut self,
        raw: Option<RawFederation>,
        trust_domain: Option<&TrustDomain>,
        own: Option<&TrustDomain>,
    ) -> FederationConfig {
        let defaults = FederationConfig::default();
        let Some(raw) = raw else { return defaults };
        let min_refresh_interval = match self.positive_duration(
            "federation.min_refresh_interval",
            raw.min_refresh_interval.as_ref(),
            defaults.min_refresh_interval,
        ) {
            Some(interval) if interval.value < MIN_REFRESH_FLOOR => {
                self.error(
                    interval.span.unwrap_or(0..0),
                    format!(
                        "federation.min_refresh_interval ({}) is shorter than {}; polling faster only loads the peer",
                        format_duration(interval.value),
                        format_duration(MIN_REFRESH_FLOOR)
                    ),
                );
                defaults.min_refresh_interval
            }
            Some(interval) => interval.value,
            None => defaults.min_refresh_interval,
        };
        let bundle_endpoint = raw
            .bundle_endpoint
            .as_ref()
            .and_then(|endpoint| self.bundle_endpoint(endpoint, trust_domain));

        let mut trust_domains: Vec<FederatedTrustDomainConfig> = Vec::new();
        // Non-self-serving endpoints are checked once every name is known.
        let mut endpoint_ids: Vec<(usize, Range<usize>, SpiffeId)> = Vec::new();
        let mut seen: HashMap<TrustDomain, usize> = HashMap::new();
        for (index, table) in raw.trust_domain.iter().enumerate() {
            let Some(checked) = self.federated_trust_domain(index, table, own) else {
                continue;
            };
            let name_span = table
                .get_ref()
                .name
                .as_ref()
                .map_or(table.span(), Spanned::span);
            if let Some(first) = seen.get(&checked.name) {
                self.error(
                    name_span,
                    format!(
                        "federation.trust_domain[{index}] repeats trust domain {} of federation.trust_domain[{first}]; each trust domain is fetched from one endpoint",
                        checked.name
                    ),
                );
                continue;
            }
            seen.insert(checked.name.clone(), index);
            if let EndpointClientProfile::HttpsSpiffe { endpoint_spiffe_id } = &checked.profile
                && endpoint_spiffe_id.trust_domain() != &checked.name
            {
                let span = table
                    .get_ref()
                    .endpoint_spiffe_id
                    .as_ref()
                    .map_or(table.span(), Spanned::span);
                endpoint_ids.push((index, span, endpoint_spiffe_id.clone()));
            }
            trust_domains.push(checked);
        }
        for (index, span, endpoint_id) in endpoint_ids {
            let endpoint_td = endpoint_id.trust_domain();
            if Some(endpoint_td) != own && !seen.contains_key(endpoint_td) {
                let note = match self.running {
                    Some(_) => kept_until_restart("trust_domain"),
                    None => String::new(),
                };
                self.error(
                    span,
                    format!(
                        "federation.trust_domain[{index}].endpoint_spiffe_id {endpoint_id} is in trust domain {endpoint_td}, which writ has no bundle source for; use an ID in the fetched trust domain, or configure {endpoint_td} as a federation.trust_domain too{note}"
                    ),
                );
            }
        }
        FederationConfig {
            min_refresh_interval,
            bundle_endpoint,
            trust_domains,
        }
    }

    /// "https_spiffe" or "https_web"; `None` (with an error) otherwise.
    fn profile_name(&mut self, key: &str, text: &Text) -> Option<bool> {
        match text.get_ref().as_str() {
            "https_spiffe" => Some(true),
            "https_web" => Some(false),
            other => {
                self.error(
                    text.span(),
                    format!("{key} {other:?} is unknown; use \"https_spiffe\" or \"https_web\""),
                );
                None
            }
        }
    }

    /// Reports a key that only means something under the other profile.
    fn wrong_profile_key(&mut self, key: &str, text: &Option<Text>, profile: &str) -> bool {
        if let Some(text) = text {
            self.error(
                text.span(),
                format!("{key} applies to profile {profile} only"),
            );
            return true;
        }
        false
    }

    fn bundle_endpoint(
        &mut self,
        table: &Spanned<RawBundleEndpoint>,
        trust_domain: Option<&TrustDomain>,
    ) -> Option<BundleEndpointConfig> {
        const KEY: &str = "federation.bundle_endpoint";
        let raw = table.get_ref();
        let listen = match &raw.listen {
            None => {
                self.error(
                    table.span(),
                    format!("{KEY} has no listen address (such as \"127.0.0.1:8443\"); remove the table to serve no bundle endpoint"),
                );
                None
            }
            Some(text) => match text.get_ref().parse::<std::net::SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.error(
                        text.span(),
                        format!(
                            "{KEY}.listen {:?} is not an IP address and port such as \"127.0.0.1:8443\" or \"[::]:8443\"",
                            text.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let spiffe_profile = match &raw.profile {
            None => Some(true),
            Some(text) => self.profile_name(&format!("{KEY}.profile"), text),
        };
        let profile = match spiffe_profile {
            None => None,
            Some(true) => {
                let stray_cert =
                    self.wrong_profile_key(&format!("{KEY}.cert"), &raw.cert, "https_web");
                let stray_key =
                    self.wrong_profile_key(&format!("{KEY}.key"), &raw.key, "https_web");
                let spiffe_id = match &raw.spiffe_id {
                    None => trust_domain
                        .and_then(|td| td.spiffe_id(crate::federation::DEFAULT_ENDPOINT_PATH).ok()),
                    Some(text) => self.spiffe_id_in(KEY, text, trust_domain, false),
                };
                if stray_cert || stray_key {
                    None
                } else {
                    spiffe_id.map(|spiffe_id| EndpointServerProfile::HttpsSpiffe { spiffe_id })
                }
            }
            Some(false) => {
                let stray = self.wrong_profile_key(
                    &format!("{KEY}.spiffe_id"),
                    &raw.spiffe_id,
                    "https_spiffe",
                );
                let mut file = |name: &str, what: &str, text: &Option<Text>| match text {
                    Some(text) => self.absolute_path(&format!("{KEY}.{name}"), text),
                    None => {
                        self.error(
                            table.span(),
                            format!("{KEY} with profile https_web needs `{name}` (the PEM file with {what})"),
                        );
                        None
                    }
                };
                let cert = file("cert", "the server certificate chain", &raw.cert);
                let key = file("key", "the server's private key", &raw.key);
                match (cert, key, stray) {
                    (Some(cert), Some(key), false) => {
                        Some(EndpointServerProfile::HttpsWeb { cert, key })
                    }
                    _ => None,
                }
            }
        };
        let refresh_hint = match self.positive_duration(
            &format!("{KEY}.refresh_hint"),
            raw.refresh_hint.as_ref(),
            Duration::from_secs(300),
        ) {
            Some(hint) if hint.value.subsec_nanos() != 0 || hint.value < Duration::from_secs(1) => {
                self.error(
                    hint.span.unwrap_or(0..0),
                    format!("{KEY}.refresh_hint must be a whole number of seconds, at least 1s (bundle documents carry it in seconds)"),
                );
                None
            }
            other => other.map(|hint| hint.value),
        };
        Some(BundleEndpointConfig {
            listen: listen?,
            profile: profile?,
            refresh_hint: refresh_hint?,
        })
    }

    fn federated_trust_domain(
        &mut self,
        index: usize,
        table: &Spanned<RawFederatedTrustDomain>,
        own: Option<&TrustDomain>,
    ) -> Option<FederatedTrustDomainConfig> {
        let key = format!("federation.trust_domain[{index}]");
        let raw = table.get_ref();
        let name = match &raw.name {
            None => {
                self.error(
                    table.span(),
                    format!("{key} has no name (the trust domain to fetch)"),
                );
                None
            }
            Some(text) => match TrustDomain::new(text.get_ref()) {
                Ok(td) if Some(&td) == own => {
                    let message = match self.running {
                        None => format!(
                            "{key}.name {td} is writ's own trust domain; federation is only with other trust domains"
                        ),
                        Some(_) => format!(
                            "{key}.name {td} is the trust domain writ is running in; federation is only with other trust domains{}",
                            kept_until_restart("trust_domain")
                        ),
                    };
                    self.error(text.span(), message);
                    None
                }
                Ok(td) => Some(td),
                Err(err) => {
                    self.error(
                        text.span(),
                        format!("{key}.name {:?}: {err}", text.get_ref()),
                    );
                    None
                }
            },
        };
        let url = match &raw.url {
            None => {
                self.error(
                    table.span(),
                    format!("{key} has no url (the peer's bundle endpoint)"),
                );
                None
            }
            Some(text) => match crate::federation::EndpointUrl::parse(text.get_ref()) {
                Ok(_) => Some(text.get_ref().clone()),
                Err(err) => {
                    self.error(text.span(), format!("{key}.url: {err}"));
                    None
                }
            },
        };
        let spiffe_profile = match &raw.profile {
            None => {
                self.error(
                    table.span(),
                    format!("{key} has no profile; set \"https_spiffe\" or \"https_web\" (it is never guessed from the URL)"),
                );
                None
            }
            Some(text) => self.profile_name(&format!("{key}.profile"), text),
        };
        let bundle = match &raw.bundle {
            None => Some(None),
            Some(text) => self.absolute_path(&format!("{key}.bundle"), text).map(Some),
        };
        let profile = match spiffe_profile {
            None => None,
            Some(true) => {
                let stray = self.wrong_profile_key(
                    &format!("{key}.ca_bundle"),
                    &raw.ca_bundle,
                    "https_web",
                );
                let endpoint_spiffe_id = match &raw.endpoint_spiffe_id {
                    None => {
                        self.error(
                            table.span(),
                            format!("{key} with profile https_spiffe needs endpoint_spiffe_id (SPIRE's is spiffe://<trust domain>/spire/server)"),
                        );
                        None
                    }
                    Some(text) => match text.get_ref().parse::<SpiffeId>() {
                        Ok(id) if id.is_trust_domain_id() => {
                            self.error(
                                text.span(),
                                format!("{key}.endpoint_spiffe_id {id} has no path; an X509-SVID's SPIFFE ID always has one"),
                            );
                            None
                        }
                        Ok(id) => Some(id),
                        Err(err) => {
                            self.error(
                                text.span(),
                                format!("{key}.endpoint_spiffe_id {:?}: {err}", text.get_ref()),
                            );
                            None
                        }
                    },
                };
                // A self-serving endpoint is authenticated with its own
                // trust domain's bundle, so the first fetch needs one.
                if let (Some(id), Some(name), Some(None)) = (&endpoint_spiffe_id, &name, &bundle)
                    && id.trust_domain() == name
                {
                    self.error(
                        table.span(),
                        format!("{key} with profile https_spiffe needs `bundle`: the bootstrap bundle of {name} (SPIFFE JSON or PEM) that authenticates the first fetch"),
                    );
                }
                match (endpoint_spiffe_id, stray) {
                    (Some(endpoint_spiffe_id), false) => {
                        Some(EndpointClientProfile::HttpsSpiffe { endpoint_spiffe_id })
                    }
                    _ => None,
                }
            }
            Some(false) => {
                let stray = self.wrong_profile_key(
                    &format!("{key}.endpoint_spiffe_id"),
                    &raw.endpoint_spiffe_id,
                    "https_spiffe",
                );
                let ca_bundle = match &raw.ca_bundle {
                    None => Some(None),
                    Some(text) => self
                        .absolute_path(&format!("{key}.ca_bundle"), text)
                        .map(Some),
                };
                match (ca_bundle, stray) {
                    (Some(ca_bundle), false) => Some(EndpointClientProfile::HttpsWeb { ca_bundle }),
                    _ => None,
                }
            }
        };
        Some(FederatedTrustDomainConfig {
            name: name?,
            url: url?,
            profile: profile?,
            bundle: bundle?,
            follow_redirects: raw.follow_redirects.unwrap_or(true),
        })
    }

    fn entries(
        &mut self,
        raw: &[Spanned<RawEntry>],
        trust_domain: Option<&TrustDomain>,
        ca_ttl: Option<&Sourced<Duration>>,
        reserved: &[SpiffeId],
    ) -> Vec<EntryConfig> {
        let mut entries = Vec::with_capacity(raw.len());
        // (spiffe_id, selector set) -> (index, line) of the first entry.
        let mut seen: HashMap<(SpiffeId, BTreeSet<Selector>), (usize, usize)> = HashMap::new();
        for (index, entry) in raw.iter().enumerate() {
            let Some(checked) = self.entry(index, entry, trust_domain, ca_ttl) else {
                continue;
            };
            let span = entry
                .get_ref()
                .spiffe_id
                .as_ref()
                .map_or(entry.span(), Spanned::span);
            if reserved.contains(&checked.spiffe_id) {
                self.error(
                    span,
                    format!(
                        "entry[{index}].spiffe_id {}",
                        crate::federation::reserved_id_reason(&checked.spiffe_id)
                    ),
                );
                continue;
            }
            let key = (
                checked.spiffe_id.clone(),
                checked.selectors.iter().cloned().collect::<BTreeSet<_>>(),
            );
            if let Some((first_index, first_line)) = seen.get(&key) {
                self.error(
                    span,
                    format!(
                        "entry[{index}] repeats entry[{first_index}] (line {first_line}): same spiffe_id {} and the same selectors",
                        checked.spiffe_id
                    ),
                );
                continue;
            }
            let (line, _) = super::line_and_column(self.text, entry.span().start);
            seen.insert(key, (index, line));
            entries.push(checked);
        }
        entries
    }

    fn entry(
        &mut self,
        index: usize,
        entry: &Spanned<RawEntry>,
        trust_domain: Option<&TrustDomain>,
        ca_ttl: Option<&Sourced<Duration>>,
    ) -> Option<EntryConfig> {
        let key = format!("entry[{index}]");
        let raw = entry.get_ref();

        let spiffe_id = match &raw.spiffe_id {
            None => {
                self.error(entry.span(), format!("{key} has no spiffe_id"));
                None
            }
            Some(text) => self.spiffe_id_in(&key, text, trust_domain, self.running.is_some()),
        };

        let selectors = match &raw.selectors {
            None => {
                self.error(
                    entry.span(),
                    format!(
                        "{key} has no selectors; an entry needs at least one to match a process"
                    ),
                );
                None
            }
            Some(list) if list.get_ref().is_empty() => {
                self.error(
                    list.span(),
                    format!(
                        "{key}.selectors is empty; an entry needs at least one to match a process"
                    ),
                );
                None
            }
            Some(list) => self.selectors(&format!("{key}.selectors"), list.get_ref()),
        };

        // The bounds CreateEntry puts on an entry, so that no entry, from
        // the file or the admin API, can make `writ entry list` fail.
        let mut within_bounds = true;
        for (field, span, count) in [
            (
                "selectors",
                raw.selectors.as_ref().map(Spanned::span),
                raw.selectors.as_ref().map_or(0, |l| l.get_ref().len()),
            ),
            (
                "dns_names",
                raw.dns_names.iter().flatten().next().map(Spanned::span),
                raw.dns_names.as_ref().map_or(0, Vec::len),
            ),
            (
                "federates_with",
                raw.federates_with
                    .iter()
                    .flatten()
                    .next()
                    .map(Spanned::span),
                raw.federates_with.as_ref().map_or(0, Vec::len),
            ),
        ] {
            if count > crate::entries::MAX_ENTRY_ITEMS {
                self.error(
                    span.unwrap_or_else(|| entry.span()),
                    format!(
                        "{key}.{field} has {count} items; an entry has at most {}",
                        crate::entries::MAX_ENTRY_ITEMS
                    ),
                );
                within_bounds = false;
            }
        }
        for (n, text) in raw.selectors.iter().flat_map(|l| l.get_ref()).enumerate() {
            if text.get_ref().len() > crate::entries::MAX_SELECTOR_BYTES {
                self.error(
                    text.span(),
                    format!(
                        "{key}.selectors[{n}] is {} bytes long; a selector has at most {}",
                        text.get_ref().len(),
                        crate::entries::MAX_SELECTOR_BYTES
                    ),
                );
                within_bounds = false;
            }
        }

        let x509_svid_ttl = match &raw.x509_svid_ttl {
            None => Some(None),
            Some(text) => {
                let ttl_key = format!("{key}.x509_svid_ttl");
                let ttl = self.lifetime(&ttl_key, Some(text), Duration::ZERO);
                if let (Some(ttl), Some(ca_ttl)) = (&ttl, ca_ttl) {
                    match self.running {
                        None => self.at_most(
                            (&ttl_key, ttl),
                            ("ca.ca_ttl", ca_ttl),
                            "an SVID cannot outlive the CA that signs it",
                        ),
                        Some(_) => self.at_most(
                            (&ttl_key, ttl),
                            ("the running ca.ca_ttl", ca_ttl),
                            &format!(
                                "an SVID cannot outlive the CA that signs it{}",
                                kept_until_restart("ca.ca_ttl")
                            ),
                        ),
                    }
                }
                ttl.map(|ttl| Some(ttl.value))
            }
        };

        let mut dns_valid = true;
        let mut dns_names = Vec::new();
        for (dns_index, name) in raw.dns_names.iter().flatten().enumerate() {
            match dns_name_problem(name.get_ref()) {
                None => dns_names.push(name.get_ref().clone()),
                Some(problem) => {
                    self.error(
                        name.span(),
                        format!(
                            "{key}.dns_names[{dns_index}] {:?} is not a valid DNS name: {problem}",
                            name.get_ref()
                        ),
                    );
                    dns_valid = false;
                }
            }
        }

        let hint = match &raw.hint {
            None => Some(String::new()),
            Some(text) if text.get_ref().len() > MAX_HINT_BYTES => {
                self.error(
                    text.span(),
                    format!(
                        "{key}.hint is {} bytes long; the Workload API allows at most {MAX_HINT_BYTES}",
                        text.get_ref().len()
                    ),
                );
                None
            }
            Some(text) => match writ_attestors::find_unshowable(text.get_ref(), &[]) {
                Some(found) => {
                    self.error(
                        text.span(),
                        format!(
                            "{key}.hint contains {found}; the hint reaches workloads' terminals, where such a character could forge or hide what they show"
                        ),
                    );
                    None
                }
                None => Some(text.get_ref().clone()),
            },
        };

        let mut federation_valid = true;
        let mut federates_with = Vec::new();
        for (td_index, text) in raw.federates_with.iter().flatten().enumerate() {
            let td_key = format!("{key}.federates_with[{td_index}]");
            match crate::federation::federated_trust_domain(text.get_ref(), trust_domain) {
                Err(crate::federation::FederatesWithError::OwnTrustDomain(td))
                    if self.running.is_some() =>
                {
                    self.error(
                        text.span(),
                        format!(
                            "{td_key} names {td}, the trust domain writ is running in; federation is only with other trust domains{}",
                            kept_until_restart("trust_domain")
                        ),
                    );
                    federation_valid = false;
                }
                Ok(td) => federates_with.push(td),
                Err(err) => {
                    self.error(text.span(), format!("{td_key} {err}"));
                    federation_valid = false;
                }
            }
        }

        // Only when every item is valid do the lists line up with the file's.
        let raw_dns = raw.dns_names.as_deref().unwrap_or_default();
        if dns_valid
            && let Some((n, first)) =
                crate::entries::first_repeat(dns_names.iter().map(|name| name.to_ascii_lowercase()))
        {
            self.error(
                raw_dns[n].span(),
                format!(
                    "{key}.dns_names[{n}] {:?} repeats dns_names[{first}]",
                    dns_names[n]
                ),
            );
            dns_valid = false;
        }
        let raw_federates = raw.federates_with.as_deref().unwrap_or_default();
        if federation_valid && let Some((n, first)) = crate::entries::first_repeat(&federates_with)
        {
            // Named as the trust domain both spell when they differ
            // ("spiffe://b.test" repeats "b.test").
            let as_written = raw_federates[n].get_ref();
            let differently = if *as_written == raw_federates[first].get_ref().as_str() {
                String::new()
            } else {
                format!(" ({})", federates_with[first])
            };
            self.error(
                raw_federates[n].span(),
                format!("{key}.federates_with[{n}] {as_written:?} repeats federates_with[{first}]{differently}"),
            );
            federation_valid = false;
        }
        if !(dns_valid && federation_valid && within_bounds) {
            return None;
        }
        Some(EntryConfig {
            spiffe_id: spiffe_id?,
            selectors: selectors?,
            x509_svid_ttl: x509_svid_ttl?,
            dns_names,
            hint: hint?,
            federates_with,
        })
    }

    /// A SPIFFE ID with a path in `trust_domain`: the file's, or with
    /// `running`, the one writ is running in.
    fn spiffe_id_in(
        &mut self,
        key: &str,
        text: &Text,
        trust_domain: Option<&TrustDomain>,
        running: bool,
    ) -> Option<SpiffeId> {
        let spiffe_id = match text.get_ref().parse::<SpiffeId>() {
            Ok(spiffe_id) => spiffe_id,
            Err(err) => {
                self.error(
                    text.span(),
                    format!("{key}.spiffe_id {:?}: {err}", text.get_ref()),
                );
                return None;
            }
        };
        if spiffe_id.is_trust_domain_id() {
            self.error(
                text.span(),
                format!(
                    "{key}.spiffe_id {spiffe_id} has no path; a workload's SPIFFE ID needs one (e.g. {spiffe_id}/agent/name)"
                ),
            );
            return None;
        }
        // If trust_domain itself is invalid that is already reported; there
        // is nothing meaningful to compare against.
        let trust_domain = trust_domain?;
        if spiffe_id.trust_domain() != trust_domain {
            let (whose, note) = if running {
                (
                    "writ's running trust_domain",
                    kept_until_restart("trust_domain"),
                )
            } else {
                ("writ's trust_domain", String::new())
            };
            self.error(
                text.span(),
                format!(
                    "{key}.spiffe_id {spiffe_id} is in trust domain {}, but {whose} is {trust_domain}{note}",
                    spiffe_id.trust_domain()
                ),
            );
            return None;
        }
        Some(spiffe_id)
    }
}

struct CheckedAdminApi {
    socket_path: Sourced<PathBuf>,
    authorized: Vec<Vec<Selector>>,
    bind_any_pid: Vec<Vec<Selector>>,
    bind_same_uid: bool,
    operators: Vec<Vec<Selector>>,
}

struct CheckedCa {
    config: CaConfig,
    ca_ttl_span: Option<Range<usize>>,
}

impl CheckedCa {
    fn ca_ttl(&self) -> Sourced<Duration> {
        Sourced {
            value: self.config.ca_ttl,
            span: self.ca_ttl_span.clone(),
        }
    }
}

/// Why `path` is not an absolute, normalized cgroup v2 path, if it is not.
/// Normalized matters because selectors are matched by prefix: a root
/// written `/a/../b` or `/a/` would never match what the kernel reports.
fn cgroup_path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("it is empty");
    }
    if !path.starts_with('/') {
        return Some("it must start with '/'");
    }
    if path.chars().any(char::is_control) {
        return Some("it contains a control character");
    }
    if path == "/" {
        return None;
    }
    if path.ends_with('/') {
        return Some("it must not end with '/'");
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Some("it has an empty segment (\"//\")");
        }
        if segment == "." || segment == ".." {
            return Some("it has a \".\" or \"..\" segment");
        }
    }
    None
}

/// Why `name` cannot go in a certificate's DNS SAN, if it cannot: the same
/// rule minting applies, so a config that validates never fails to mint.
fn dns_name_problem(name: &str) -> Option<String> {
    crate::svid::validate_new_dns_name(name)
        .err()
        .map(|e| e.reason)
}

/// The first directive of a tracing filter that is a lone word other than a
/// level: EnvFilter takes it for a target and logs nothing else.
fn bare_target(filter: &str) -> Option<&str> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    filter.split(',').map(str::trim).find(|directive| {
        !directive.is_empty()
            && !directive.contains(['=', '['])
            && !LEVELS.iter().any(|l| directive.eq_ignore_ascii_case(l))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        for good in [
            "localhost",
            "researcher.internal",
            "*.agents.example.org",
            "a-b.Example.ORG",
            "xn--bcher-kva.example",
            &format!("{}.example", "a".repeat(63)),
        ] {
            assert_eq!(dns_name_problem(good), None, "{good}");
        }
        for (bad, problem) in [
            ("", "empty"),
            ("a.", "must not end with '.'"),
            (".a", "empty label"),
            ("a..b", "empty label"),
            ("-a.b", "starts or ends with '-'"),
            ("a-.b", "starts or ends with '-'"),
            ("*", "leftmost label"),
            ("a.*.b", "leftmost label"),
            ("*a.b", "leftmost label"),
            ("a_b.c", "contains '_'"),
            ("a b", "contains ' '"),
            ("é.com", "contains 'é'"),
        ] {
            let found = dns_name_problem(bad).unwrap_or_default();
            assert!(found.contains(problem), "{bad:?}: {found:?}");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert!(
            dns_name_problem(&long_label)
                .unwrap()
                .contains("longer than 63")
        );
        let long_name = vec!["a".repeat(50); 6].join(".");
        assert!(
            dns_name_problem(&long_name)
                .unwrap()
                .contains("longer than 253")
        );
    }

    #[test]
    fn cgroup_paths() {
        for good in ["/", "/system.slice", "/writ.slice/a.b/c@1.service"] {
            assert_eq!(cgroup_path_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "system.slice",
            "/a/",
            "//",
            "/a//b",
            "/a/./b",
            "/..",
            "/a\nb",
        ] {
            assert!(cgroup_path_problem(bad).is_some(), "{bad:?}");
        }
    }
}
