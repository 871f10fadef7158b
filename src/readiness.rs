//! What `/ready` checks each time it is asked: the store answers a read,
//! the audit trail is open (its background thread runs, no sync failed, its
//! path still names the file it appends to),
//! the CA has a signing root that is valid now, and each socket writ
//! serves is still served and, where writ bound it, still the file it
//! bound (same device and inode).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use crate::agent::Agent;
use crate::telemetry::ReadinessProbe;

/// How long `/ready` waits for the store; a probe must answer quickly, and
/// a store that takes longer than this is not serving issuances either.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which file a path named when writ bound it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    /// The identity of the file at `path` itself (a symlink is not followed).
    pub fn of(path: &Path) -> io::Result<FileIdentity> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A listening socket writ serves.
#[derive(Debug)]
pub struct ServedSocket {
    /// For messages: "Workload API" or "admin API".
    what: &'static str,
    path: PathBuf,
    /// Recorded right after bind; `None` for a socket systemd passed in,
    /// whose file belongs to the .socket unit.
    bound: Option<FileIdentity>,
    /// True while the server owning the listener runs.
    serving: Arc<AtomicBool>,
}

impl ServedSocket {
    /// A socket writ bound at `path` just now.
    pub fn bound(what: &'static str, path: &Path) -> io::Result<ServedSocket> {
        Ok(ServedSocket {
            what,
            path: path.to_owned(),
            bound: Some(FileIdentity::of(path)?),
            serving: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A socket passed by systemd: served while its listener is open.
    pub fn passed(what: &'static str, path: &Path) -> ServedSocket {
        ServedSocket {
            what,
            path: path.to_owned(),
            bound: None,
            serving: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set true when the server starts and false when it ends.
    pub fn serving_flag(&self) -> Arc<AtomicBool> {
        self.serving.clone()
    }

    /// Why this socket is not being served, if it is not.
    pub fn problem(&self) -> Option<String> {
        let path = self.path.display();
        if !self.serving.load(Ordering::SeqCst) {
            return Some(format!(
                "{} socket {path}: its server is not running",
                self.what
            ));
        }
        let expected = self.bound?;
        match std::fs::symlink_metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(format!(
                "{} socket {path} was removed; clients can no longer connect (restart writ to bind it again)",
                self.what
            )),
            Err(e) => Some(format!("{} socket {path}: {e}", self.what)),
            Ok(meta)
                if !meta.file_type().is_socket()
                    || (FileIdentity {
                        dev: meta.dev(),
                        ino: meta.ino(),
                    }) != expected =>
            {
                Some(format!(
                    "{} socket {path} is no longer the socket writ bound (it was replaced)",
                    self.what
                ))
            }
            Ok(_) => None,
        }
    }
}

/// Why the CA cannot sign, if it cannot: its active root's validity,
/// judged as the CA judges it before signing.
pub fn ca_problem(
    active_not_before: SystemTime,
    active_not_after: SystemTime,
    now: SystemTime,
) -> Option<String> {
    if active_not_after == SystemTime::UNIX_EPOCH {
        return Some("CA has no active signing root".to_owned());
    }
    let rfc3339 = |t: SystemTime| {
        time::OffsetDateTime::from(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| format!("{t:?}"))
    };
    // notAfter is the last instant the root is valid (RFC 5280).
    if active_not_after < now {
        return Some(format!(
            "CA signing root expired at {}; rotation has not replaced it",
            rfc3339(active_not_after)
        ));
    }
    crate::ca::not_yet_valid(active_not_before, now).then(|| {
        format!(
            "CA signing root is not valid until {} (made while the clock was ahead); rotation has not replaced it",
            rfc3339(active_not_before)
        )
    })
}

/// The agent's readiness checks.
pub struct Readiness {
    agent: Arc<Agent>,
    sockets: Vec<ServedSocket>,
}

impl Readiness {
    pub fn new(agent: Arc<Agent>, sockets: Vec<ServedSocket>) -> Readiness {
        Readiness { agent, sockets }
    }

    async fn store_problem(&self) -> Option<String> {
        let store = self.agent.store().clone();
        let check = tokio::task::spawn_blocking(move || store.check());
        match tokio::time::timeout(STORE_TIMEOUT, check).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(format!("store not answering: {e}")),
            Ok(Err(e)) => Some(format!("store check failed: {e}")),
            Err(_) => Some(format!(
                "store did not answer within {}s",
                STORE_TIMEOUT.as_secs()
            )),
        }
    }

    fn audit_problem(&self) -> Option<String> {
        match self.agent.audit_log() {
            None => Some("audit trail not open".to_owned()),
            Some(log) => log
                .check()
                .err()
                .map(|e| format!("audit trail unavailable: {e}")),
        }
    }
}

impl ReadinessProbe for Readiness {
    fn problems(&self, now: SystemTime) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            let mut problems = Vec::new();
            problems.extend(self.store_problem().await);
            problems.extend(self.audit_problem());
            problems.extend(ca_problem(
                self.agent.ca_not_before(),
                self.agent.ca_not_after(),
                now,
            ));
            problems.extend(self.sockets.iter().filter_map(ServedSocket::problem));
            problems
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_bound_socket_is_served_until_removed_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workload.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let socket = ServedSocket::bound("Workload API", &path).unwrap();
        let problem = socket.problem().unwrap();
        assert!(problem.contains("server is not running"), "{problem}");

        socket.serving_flag().store(true, Ordering::SeqCst);
        assert_eq!(socket.problem(), None);

        std::fs::remove_file(&path).unwrap();
        let problem = socket.problem().unwrap();
        assert!(
            problem.contains(&format!("{} was removed", path.display())),
            "{problem}"
        );

        // Another socket at the same path is not the one writ serves.
        let _other = UnixListener::bind(&path).unwrap();
        let problem = socket.problem().unwrap();
        assert!(problem.contains("replaced"), "{problem}");

        // Nor is a regular file.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert!(socket.problem().unwrap().contains("replaced"));
    }

    #[test]
    fn a_passed_socket_counts_while_its_server_runs() {
        let socket = ServedSocket::passed("admin API", Path::new("/nonexistent/admin.sock"));
        assert!(socket.problem().is_some());
        socket.serving_flag().store(true, Ordering::SeqCst);
        assert_eq!(socket.problem(), None, "the path belongs to systemd");
        socket.serving_flag().store(false, Ordering::SeqCst);
        assert!(socket.problem().unwrap().contains("not running"));
    }

    #[test]
    fn an_expired_or_missing_signing_root_is_reported() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let began = now - Duration::from_secs(3600);
        assert_eq!(ca_problem(began, now + Duration::from_secs(60), now), None);
        let expired = ca_problem(began, now - Duration::from_secs(60), now).unwrap();
        assert!(
            expired.contains("expired at 2023-11-14T22:12:20Z"),
            "{expired}"
        );
        assert_eq!(
            ca_problem(began, now, now),
            None,
            "notAfter itself is still valid"
        );
        assert!(
            ca_problem(SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH, now)
                .unwrap()
                .contains("no active")
        );
    }

    /// A root dated in the future cannot sign either (relying parties
    /// refuse chains to it); one barely ahead, within the allowance the CA
    /// signs with, still counts as valid.
    #[test]
    fn a_signing_root_not_valid_yet_is_reported() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let day = Duration::from_secs(24 * 3600);
        let ahead = ca_problem(now + 2 * day, now + 3 * day, now).unwrap();
        assert!(
            ahead.contains("not valid until 2023-11-16T22:13:20Z"),
            "{ahead}"
        );
        let barely = now + crate::ca::NOT_BEFORE_ALLOWANCE;
        assert_eq!(ca_problem(barely, now + day, now), None);
    }
}
