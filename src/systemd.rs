//! Living under systemd: state notifications on `$NOTIFY_SOCKET` (READY,
//! STATUS, RELOADING, STOPPING, WATCHDOG) and the listening sockets a
//! `.socket` unit passes in (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`).
//! Outside systemd every call here is a no-op.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{PidfdFlags, PidfdGetfdFlags};
use sd_notify::NotifyState;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("LISTEN_FDS: {0}")]
    ListenFds(io::Error),
    #[error(
        "taking passed socket fd {fd}: {source} (writ copies passed sockets with pidfd_getfd(2); under SystemCallFilter= allow it)"
    )]
    TakeFd { fd: i32, source: io::Error },
    #[error("passed fd {fd} ({name:?}) is not a listening Unix stream socket")]
    NotAListener { fd: i32, name: String },
}

/// Sends state changes to the service manager, if there is one.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` once. The variable is left in the environment
    /// (removing it needs `unsafe`); writ starts no children that could
    /// mistake it for their own.
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            // systemd going away is not a reason to stop serving workloads.
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    /// Sockets are served: `Type=notify` units count as started from here.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// Reload begins. systemd (253+) pairs RELOADING with the monotonic
    /// time it was sent, so it can tell this reload from an older one.
    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Pets the watchdog at half its period, when `WatchdogSec=` set one for
    /// this process. The pets come from the runtime, so a wedged runtime
    /// stops them and systemd restarts writ.
    pub fn spawn_watchdog(&self) -> Option<JoinHandle<()>> {
        if !self.enabled {
            return None;
        }
        let period = sd_notify::watchdog_enabled()?;
        let interval = (period / 2).max(Duration::from_millis(1));
        let notifier = self.clone();
        Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                ticks.tick().await;
                notifier.send(&[NotifyState::Watchdog]);
            }
        }))
    }
}

/// Listening sockets passed by systemd, by name (`FileDescriptorName=`)
/// and by the path they are bound to.
#[derive(Debug, Default)]
pub struct PassedSockets {
    sockets: Vec<(String, Option<PathBuf>, UnixListener)>,
}

impl PassedSockets {
    /// Takes the sockets systemd passed to *this* process: `LISTEN_PID`
    /// must name us, so variables inherited from a parent that was itself
    /// socket-activated are ignored.
    pub fn from_env() -> Result<PassedSockets, SystemdError> {
        if let Ok(pid) = std::env::var("LISTEN_PID")
            && pid.parse::<u32>().ok() != Some(std::process::id())
        {
            tracing::warn!(
                listen_pid = %pid,
                "LISTEN_PID names another process; ignoring LISTEN_FDS and binding the sockets myself"
            );
            return Ok(PassedSockets::default());
        }
        let passed: Vec<(i32, String)> = sd_notify::listen_fds_with_names()
            .map_err(SystemdError::ListenFds)?
            .collect();
        if passed.is_empty() {
            return Ok(PassedSockets::default());
        }
        // Turning a bare fd number into an owned socket needs `unsafe`;
        // pidfd_getfd hands us an owned duplicate of our own fd instead.
        // The original stays open (close-on-exec), unused.
        let me = rustix::process::pidfd_open(rustix::process::getpid(), PidfdFlags::empty())
            .map_err(|e| SystemdError::TakeFd {
                fd: -1,
                source: e.into(),
            })?;
        let mut sockets = Vec::with_capacity(passed.len());
        for (fd, name) in passed {
            let owned =
                rustix::process::pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()).map_err(|e| {
                    SystemdError::TakeFd {
                        fd,
                        source: e.into(),
                    }
                })?;
            let is_listener = rustix::net::sockopt::socket_type(&owned)
                .is_ok_and(|t| t == rustix::net::SocketType::STREAM)
                && rustix::net::sockopt::socket_acceptconn(&owned).unwrap_or(false);
            if !is_listener {
                return Err(SystemdError::NotAListener { fd, name });
            }
            let listener = UnixListener::from(owned);
            let path = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_owned));
            sockets.push((name, path, listener));
        }
        Ok(PassedSockets { sockets })
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The socket named `name`, or else the one bound at `path` (for units
    /// that name no descriptors).
    pub fn take(&mut self, name: &str, path: &Path) -> Option<UnixListener> {
        let index = self
            .sockets
            .iter()
            .position(|(n, _, _)| n == name)
            .or_else(|| {
                self.sockets
                    .iter()
                    .position(|(_, p, _)| p.as_deref() == Some(path))
            })?;
        Some(self.sockets.remove(index).2)
    }

    /// Names of sockets passed but not taken, for a warning.
    pub fn leftover(&self) -> HashMap<String, Option<PathBuf>> {
        self.sockets
            .iter()
            .map(|(n, p, _)| (n.clone(), p.clone()))
            .collect()
    }
}
