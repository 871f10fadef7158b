//! Reloading a running agent, on SIGHUP or the admin `Reload` call: re-read
//! the config file, policies and federation list, check all of it, and only
//! then apply it (entries, policies, log level, federated trust domains).
//! Settings read only at start keep their running values until a restart,
//! and what a reload applies must be valid with them. One reload runs at a
//! time; a refused one changes nothing and says why.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::agent::Agent;
use crate::audit::{AuditEvent, CallerFacts, EventKind};
use crate::config::Config;
use crate::entries::{EntryError, EntryStore};
use crate::federation::{Federation, FederationChanges, FederationError};
use crate::identity::Registry;
use crate::systemd::Notifier;
use crate::telemetry::Health;

/// Changes the running log filter (an EnvFilter directive string); the CLI
/// hands one in when it owns the tracing subscriber.
pub type LogLevelControl = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Every problem in the file, each as `file:line:column: message`.
    #[error("{}", .0.join("\n"))]
    Config(Vec<String>),
    /// The policy problems, each naming its file and line.
    #[error("{0}")]
    Policy(String),
    #[error("federation: {0}")]
    Federation(FederationError),
    /// The new entries clash with entries created through the admin API.
    #[error("{0}")]
    Entries(EntryError),
    #[error("changing the log level: {0}")]
    LogLevel(String),
    /// Checking passed but storing a new trust domain's bootstrap bundle
    /// failed; everything was left (or put back) as it was.
    #[error("applying the federation list: {0}")]
    Apply(FederationError),
}

impl ReloadError {
    /// True when the new configuration itself is at fault (as opposed to
    /// the agent failing to apply a good one).
    pub fn is_invalid_configuration(&self) -> bool {
        matches!(
            self,
            ReloadError::Config(_)
                | ReloadError::Policy(_)
                | ReloadError::Federation(_)
                | ReloadError::Entries(
                    EntryError::ShadowsAdminEntry(_) | EntryError::ConfigHeldByTask(_)
                )
        )
    }

    /// The message on one line, for systemd's STATUS= and `/ready`.
    pub fn one_line(&self) -> String {
        let mut line = String::new();
        for part in self
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            if !line.is_empty() {
                line.push_str(if line.ends_with(':') { " " } else { "; " });
            }
            line.push_str(part);
        }
        line
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// The file re-read; `None` when writ runs on built-in defaults, in
    /// which case nothing was reloaded.
    pub config_path: Option<PathBuf>,
    /// Registration entries from the config file now in force.
    pub entries: usize,
    pub entries_changed: bool,
    /// `built-in`, or the policy files, comma-separated.
    pub policy_source: String,
    pub policy_ids: Vec<String>,
    pub log_level: String,
    pub log_level_changed: bool,
    pub federation: FederationChanges,
    /// Restart-only settings whose running values differ from the file's:
    /// they take effect on restart, and are listed by every reload until then.
    pub restart_required: Vec<String>,
    /// Anything else worth telling the operator.
    pub notes: Vec<String>,
}

/// Who asked for a reload, for the log and the audit trail.
#[derive(Debug, Clone)]
pub enum Trigger {
    Signal,
    AdminApi(CallerFacts),
}

impl Trigger {
    fn name(&self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::AdminApi(_) => "admin_api",
        }
    }
}

/// The parts of a running agent a reload touches.
pub struct ReloaderParts {
    pub agent: Arc<Agent>,
    pub entries: Arc<EntryStore>,
    pub federation: Arc<Federation>,
    pub config: Config,
    pub path: Option<PathBuf>,
    pub log_control: Option<LogLevelControl>,
    pub notifier: Notifier,
    pub health: Arc<Health>,
    /// systemd's STATUS= while all is well.
    pub ready_status: String,
}

pub struct Reloader {
    agent: Arc<Agent>,
    entries: Arc<EntryStore>,
    federation: Arc<Federation>,
    path: Option<PathBuf>,
    log_control: Option<LogLevelControl>,
    notifier: Notifier,
    health: Arc<Health>,
    ready_status: String,
    /// The configuration in force: the last applied file's reloadable
    /// settings with the restart-only ones writ started with. Holding this
    /// lock is what serializes reloads: a SIGHUP arriving during an admin
    /// call waits its turn.
    current: tokio::sync::Mutex<Config>,
}

impl Reloader {
    pub fn new(parts: ReloaderParts) -> Arc<Self> {
        Arc::new(Self {
            agent: parts.agent,
            entries: parts.entries,
            federation: parts.federation,
            path: parts.path,
            log_control: parts.log_control,
            notifier: parts.notifier,
            health: parts.health,
            ready_status: parts.ready_status,
            current: tokio::sync::Mutex::new(parts.config),
        })
    }

    /// Reloads once: systemd hears RELOADING, then READY with a status
    /// saying whether it was refused; the reload metrics and `/ready` are
    /// brought up to date either way.
    pub async fn reload(&self, trigger: Trigger) -> Result<ReloadSummary, ReloadError> {
        let mut current = self.current.lock().await;
        self.notifier.reloading();
        let outcome = self.reload_locked(&mut current, &trigger).await;
        self.agent
            .metrics()
            .reload(outcome.is_ok(), SystemTime::now());
        let status = match &outcome {
            Ok(_) => self.ready_status.clone(),
            Err(why) => format!(
                "{}; last reload refused: {}",
                self.ready_status,
                why.one_line()
            ),
        };
        self.health
            .set_reload_outcome(outcome.as_ref().err().map(ReloadError::one_line));
        self.notifier.ready(&status);
        outcome
    }

    async fn reload_locked(
        &self,
        current: &mut Config,
        trigger: &Trigger,
    ) -> Result<ReloadSummary, ReloadError> {
        let Some(path) = &self.path else {
            tracing::info!(
                trigger = trigger.name(),
                "reload: running on built-in defaults; nothing to reload"
            );
            return Ok(ReloadSummary {
                log_level: current.log.level.clone(),
                entries: current.entries.len(),
                policy_source: self.agent.policy().source().to_owned(),
                policy_ids: self.agent.policy().policy_ids(),
                notes: vec![
                    "running on built-in defaults (no config file); nothing to reload".into(),
                ],
                ..ReloadSummary::default()
            });
        };
        let refused = |e: ReloadError| {
            for line in e.to_string().lines() {
                if matches!(e, ReloadError::Policy(_)) {
                    tracing::error!(error = %line, trigger = trigger.name(), "reload refused; keeping the running policies");
                } else {
                    tracing::error!(error = %line, trigger = trigger.name(), "reload refused; keeping the running configuration");
                }
            }
            e
        };

        // Everything is read and checked before anything changes. What will
        // run is the file's reloadable settings with the running restart-only
        // ones, and the file was checked to be valid that way too: an agent
        // must never be left with entries it cannot issue.
        let file = crate::config::validate_reload(path, current)
            .map_err(|errors| ReloadError::Config(errors.iter().map(|e| e.to_string()).collect()))
            .map_err(refused)?;
        let restart_required = restart_required(current, &file);
        let next = keep_restart_only_settings(file, current);
        let policy = crate::service::load_policy(&next.policy.files)
            .map_err(|e| ReloadError::Policy(e.to_string()))
            .map_err(refused)?;
        // What the new policy set warns about (`load_policy` has logged
        // it), and a switch to the built-in policy: both change what is
        // allowed while the reload itself succeeds, so the operator is told.
        let mut policy_warnings = policy.warnings().to_vec();
        if policy.is_builtin() && !current.policy.files.is_empty() {
            let replaced = join(
                &current
                    .policy
                    .files
                    .iter()
                    .map(|f| f.display())
                    .collect::<Vec<_>>(),
            );
            tracing::warn!(
                trigger = trigger.name(),
                replaced = %replaced,
                "reload: [policy] files names no file now; the built-in policy, which permits every action, is in force"
            );
            let warning = format!(
                "[policy] files names no file now: the built-in policy, which permits every action, replaces {replaced}"
            );
            policy_warnings.push(warning);
        }
        let federation = self
            .federation
            .plan(&next.federation)
            .map_err(ReloadError::Federation)
            .map_err(refused)?;
        // Held until applied: no admin entry can appear meanwhile that the
        // new config entries would hide.
        let entries = self
            .entries
            .prepare_config_registry(Registry::from_config(&next))
            .await
            .map_err(ReloadError::Entries)
            .map_err(refused)?;
        if !restart_required.is_empty() {
            tracing::warn!(
                settings = ?restart_required,
                "reload: these settings changed and take effect on restart"
            );
        }

        // The fallible steps go first, so a failure can still put things
        // back: the log level (and back again if the federation step fails).
        let mut notes = policy_warnings.clone();
        let log_level_changed = next.log.level != current.log.level;
        if log_level_changed && let Some(control) = &self.log_control {
            control(&next.log.level)
                .map_err(ReloadError::LogLevel)
                .map_err(refused)?;
            tracing::info!(level = %next.log.level, "log level changed");
        }
        let federation_changes = federation.changes.clone();
        if let Err(e) = self.federation.apply(federation).await {
            if log_level_changed
                && let Some(control) = &self.log_control
                && let Err(back) = control(&current.log.level)
            {
                tracing::error!(error = %back, "could not restore the previous log level");
            }
            return Err(refused(ReloadError::Apply(e)));
        }
        if !federation_changes.removed.is_empty() {
            notes.push(format!(
                "removed trust domains are no longer fetched; their last bundle stays held and served until `writ bundle delete --trust-domain <name>`: {}",
                join(&federation_changes.removed)
            ));
        }

        // From here on nothing can fail.
        entries.install();
        let policy_source = policy.source().to_owned();
        let policy_ids = policy.policy_ids();
        self.agent.set_policy(policy);
        let mut event = AuditEvent::new(EventKind::PolicyReloaded, ulid::Ulid::new().to_string())
            .detail("source", policy_source.clone())
            .detail("policies", policy_ids.clone())
            .detail("trigger", trigger.name())
            .detail("entries", next.entries.len())
            .detail("entries_changed", next.entries != current.entries);
        if !policy_warnings.is_empty() {
            event = event.detail("warnings", policy_warnings);
        }
        if let Trigger::AdminApi(caller) = trigger {
            event = event.caller(caller.clone());
        }
        self.agent.record_best_effort(event).await;

        let summary = ReloadSummary {
            config_path: Some(path.clone()),
            entries: next.entries.len(),
            entries_changed: next.entries != current.entries,
            policy_source,
            policy_ids,
            log_level: next.log.level.clone(),
            log_level_changed,
            federation: federation_changes,
            restart_required,
            notes,
        };
        tracing::info!(
            path = %path.display(),
            trigger = trigger.name(),
            entries = summary.entries,
            policies = summary.policy_ids.len(),
            federation_added = %join(&summary.federation.added),
            federation_removed = %join(&summary.federation.removed),
            federation_updated = %join(&summary.federation.updated),
            "configuration reloaded"
        );
        *current = next;
        Ok(summary)
    }
}

fn join(items: &[impl std::fmt::Display]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The settings that differ between `current` and `next` but are only read
/// at start: the sockets, state, CPU scheduling policy, CA, attestors, task
/// limits, audit trail, bundle endpoint listener and telemetry listener. Kept in step with
/// `keep_restart_only_settings`.
pub fn restart_required(current: &Config, next: &Config) -> Vec<String> {
    let checks: [(&str, bool); 12] = [
        ("trust_domain", current.trust_domain != next.trust_domain),
        ("data_dir", current.data_dir != next.data_dir),
        (
            "cpu_scheduling",
            current.cpu_scheduling != next.cpu_scheduling,
        ),
        ("workload_api", current.workload_api != next.workload_api),
        ("admin_api", current.admin_api != next.admin_api),
        ("ca", current.ca != next.ca),
        ("attestors", current.attestors != next.attestors),
        ("tasks", current.tasks != next.tasks),
        ("audit", current.audit != next.audit),
        (
            "federation.bundle_endpoint",
            current.federation.bundle_endpoint != next.federation.bundle_endpoint,
        ),
        ("telemetry", current.telemetry != next.telemetry),
        ("log.format", current.log.format != next.log.format),
    ];
    checks
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| (*name).to_owned())
        .collect()
}

/// The configuration a reload puts in force: `file`'s reloadable settings
/// (entries, policies, `log.level`, the federated trust domains and their
/// refresh floor) with `running`'s restart-only ones, which stay as they are
/// until writ restarts. Naming every field means a new one cannot be added
/// without deciding which kind it is.
fn keep_restart_only_settings(file: Config, running: &Config) -> Config {
    let Config {
        trust_domain: _,
        data_dir: _,
        cpu_scheduling: _,
        workload_api: _,
        admin_api: _,
        ca: _,
        attestors: _,
        tasks: _,
        log,
        policy,
        audit: _,
        federation,
        telemetry: _,
        entries,
    } = file;
    Config {
        trust_domain: running.trust_domain.clone(),
        data_dir: running.data_dir.clone(),
        cpu_scheduling: running.cpu_scheduling,
        workload_api: running.workload_api.clone(),
        admin_api: running.admin_api.clone(),
        ca: running.ca.clone(),
        attestors: running.attestors.clone(),
        tasks: running.tasks.clone(),
        log: crate::config::LogConfig {
            level: log.level,
            format: running.log.format,
        },
        policy,
        audit: running.audit.clone(),
        federation: crate::config::FederationConfig {
            bundle_endpoint: running.federation.bundle_endpoint.clone(),
            ..federation
        },
        telemetry: running.telemetry.clone(),
        entries,
    }
}

/// Catches SIGHUP from now on. `writ run` calls it before the agent is
/// built: a SIGHUP's default action ends the process, so one that came
/// while writ started (a `systemctl reload` racing the start) killed it
/// with its audit trail left open. Caught, it waits in the returned stream
/// and is taken as one reload once writ is ready (several as one).
pub fn listen_for_sighup() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload is available through the admin API only");
            None
        }
    }
}

/// Reloads on every SIGHUP `hangups` (from `listen_for_sighup`) receives,
/// until the task is aborted.
pub async fn reload_on_sighup(
    reloader: Arc<Reloader>,
    hangups: Option<tokio::signal::unix::Signal>,
) {
    let Some(mut hangups) = hangups else {
        return;
    };
    while hangups.recv().await.is_some() {
        // The outcome is logged, counted and shown on /ready by reload().
        let _ = reloader.reload(Trigger::Signal).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Environment;

    #[test]
    fn only_start_time_settings_need_a_restart() {
        let current = Config::builtin_defaults(&Environment::current());
        let mut next = current.clone();
        assert!(restart_required(&current, &next).is_empty());
        next.log.level = "debug".into();
        next.entries.clear();
        next.policy.files = vec!["/etc/writ/policy.cedar".into()];
        next.federation.min_refresh_interval = std::time::Duration::from_secs(5);
        assert!(
            restart_required(&current, &next).is_empty(),
            "live settings were reported as needing a restart"
        );
        next.workload_api.socket_path = "/elsewhere.sock".into();
        next.tasks.max_depth += 1;
        next.federation.bundle_endpoint = Some(crate::config::BundleEndpointConfig {
            listen: "127.0.0.1:8443".parse().unwrap(),
            profile: crate::config::EndpointServerProfile::HttpsSpiffe {
                spiffe_id: "spiffe://writ.test/writ/bundle-endpoint".parse().unwrap(),
            },
            refresh_hint: std::time::Duration::from_secs(300),
        });
        assert_eq!(
            restart_required(&current, &next),
            ["workload_api", "tasks", "federation.bundle_endpoint"]
        );
    }

    #[test]
    fn a_reload_keeps_every_restart_only_setting_at_its_running_value() {
        let running = Config::builtin_defaults(&Environment::current());
        let mut file = running.clone();
        file.trust_domain = crate::spiffe_id::TrustDomain::new("other.test").unwrap();
        file.data_dir = "/elsewhere".into();
        file.cpu_scheduling = crate::config::CpuScheduling::Inherit;
        file.workload_api.socket_path = "/elsewhere/w.sock".into();
        file.admin_api.bind_same_uid = !running.admin_api.bind_same_uid;
        file.ca.x509_svid_ttl *= 2;
        file.attestors.unix.discover_workload_path = !running.attestors.unix.discover_workload_path;
        file.tasks.max_depth += 1;
        file.audit.checkpoint_every += 1;
        file.federation.bundle_endpoint = Some(crate::config::BundleEndpointConfig {
            listen: "127.0.0.1:8443".parse().unwrap(),
            profile: crate::config::EndpointServerProfile::HttpsSpiffe {
                spiffe_id: "spiffe://other.test/writ/bundle-endpoint".parse().unwrap(),
            },
            refresh_hint: std::time::Duration::from_secs(300),
        });
        file.telemetry.listen = Some("127.0.0.1:9600".parse().unwrap());
        file.log.format = crate::config::LogFormat::Json;
        // ...and every reloadable one.
        file.log.level = "debug".into();
        file.policy.files = vec!["/etc/writ/policy.cedar".into()];
        file.federation.min_refresh_interval *= 2;
        file.entries.clear();
        assert_eq!(restart_required(&running, &file).len(), 12);

        let next = keep_restart_only_settings(file.clone(), &running);
        assert!(
            restart_required(&running, &next).is_empty(),
            "{:?}",
            restart_required(&running, &next)
        );
        // Still pending, as the file still differs from what runs.
        assert_eq!(restart_required(&next, &file).len(), 12);
        assert_eq!(next.log.level, "debug");
        assert_eq!(next.policy, file.policy);
        assert_eq!(
            next.federation.min_refresh_interval,
            file.federation.min_refresh_interval
        );
        assert!(next.entries.is_empty());
    }

    #[test]
    fn errors_fold_onto_one_line_for_status() {
        let e = ReloadError::Policy(
            "loading policies:\n  a.cedar:1:5: bad\n  b.cedar:2:1: worse".into(),
        );
        assert_eq!(
            e.one_line(),
            "loading policies: a.cedar:1:5: bad; b.cedar:2:1: worse"
        );
        assert!(e.is_invalid_configuration());
        let e = ReloadError::LogLevel("gone".into());
        assert!(!e.is_invalid_configuration());
    }
}
