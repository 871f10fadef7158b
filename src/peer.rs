//! Who is on the other end of a Unix socket connection. At accept time we read
//! SO_PEERCRED and pin the peer process with SO_PEERPIDFD (or pidfd_open on
//! older kernels); the pin lives as long as the connection, so every later RPC
//! on it can prove it is still talking to that same process.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use nix::sys::socket::{getsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;
use writ_attestors::PinnedProcess;

use crate::uds_authority::AuthorityFix;
use crate::write_coalescing::Coalesced;

/// The kernel's account of a connected peer, pinned for the connection's life.
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub process: Arc<PinnedProcess>,
    /// What has been read of the process's ancestors (`ancestors_down_to`).
    /// A process's ancestors can only go away (orphans are adopted by an
    /// ancestor or init), so what was read stays a superset of the truth
    /// for as long as the connection lives, pinned to this one process.
    lineage: Mutex<Option<KnownLineage>>,
    /// The last attestation of this connection's caller, for the next call
    /// on the connection to reuse while it holds (`Agent::attest_reusing`).
    pub recent_attestation: std::sync::Mutex<Option<RecentAttestation>>,
    /// When the connection last read bytes from the caller (`moment`):
    /// every request on it so far was sent before then.
    last_read: std::sync::atomic::AtomicU64,
}

/// A monotonic instant as nanoseconds since the first one asked for, to
/// keep in an atomic.
pub fn moment() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A caller's ancestors as far back as they were read.
struct KnownLineage {
    /// Every ancestor that started at or after this is in `ancestors`: a
    /// parent never started after its child, so the walk up that stopped at
    /// the first one older than this passed every younger one.
    read_down_to: u64,
    /// (pid, start time), parent first.
    ancestors: Vec<(i32, u64)>,
}

/// An attestation and what decides whether it may be reused.
#[derive(Clone)]
pub struct RecentAttestation {
    pub attestation: Arc<writ_attestors::Attestation>,
    pub at: std::time::Instant,
    /// `Agent::cgroup_tasks_begun` when it was taken.
    pub cgroup_tasks_begun: u64,
    /// When the last check that found the caller unchanged began
    /// (`moment`); the attestation's own start at first.
    pub checked_at: u64,
}

impl Caller {
    /// A caller pinned by `process`, with nothing read about it yet.
    pub fn new(pid: i32, uid: u32, gid: u32, process: Arc<PinnedProcess>) -> Caller {
        Caller {
            pid,
            uid,
            gid,
            process,
            lineage: Mutex::new(None),
            recent_attestation: std::sync::Mutex::new(None),
            last_read: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Notes that the connection read bytes from the caller just now.
    pub fn note_read(&self) {
        self.last_read
            .fetch_max(moment(), std::sync::atomic::Ordering::Release);
    }

    /// When the connection last read bytes from the caller (`moment`).
    pub fn last_read(&self) -> u64 {
        self.last_read.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether a task bound to process (`pid`, `start_time`) and its
    /// descendants covers this caller: the caller itself or an ancestor.
    /// `None` while the caller's ancestors have not been read back as far
    /// as `start_time` (`ancestors_down_to`).
    pub fn may_descend_from(&self, pid: i32, start_time: u64) -> Option<bool> {
        let own_start = self.process.start_time();
        if (self.pid, own_start) == (pid, start_time) {
            return Some(true);
        }
        // An ancestor cannot have started after its descendant.
        if start_time > own_start {
            return Some(false);
        }
        self.known_lineage()
            .as_ref()
            .filter(|known| known.read_down_to <= start_time)
            .map(|known| known.ancestors.contains(&(pid, start_time)))
    }

    /// The caller's ancestors (pid, start time) that started at or after
    /// `down_to`, parent first. Read from /proc (from `ppid`, the parent as
    /// last attested) the first time, then again only when asked to reach
    /// further back: every task begun or ended re-resolves the streams it
    /// concerns, and re-reading the lineage each time cost more than the
    /// attestation. A failed read is not kept; the next call tries again.
    pub fn ancestors_down_to(
        &self,
        ppid: i32,
        down_to: u64,
    ) -> Result<Vec<(i32, u64)>, writ_attestors::AttestError> {
        if let Some(known) = self
            .known_lineage()
            .as_ref()
            .filter(|known| known.read_down_to <= down_to)
        {
            return Ok(known
                .ancestors
                .iter()
                .copied()
                .filter(|&(_, start)| start >= down_to)
                .collect());
        }
        let read = writ_attestors::ancestors(self.pid, ppid, self.process.start_time(), down_to)?;
        let mut known = self.known_lineage();
        // Another call may have read further back meanwhile; keep that.
        if known.as_ref().is_none_or(|k| k.read_down_to > down_to) {
            *known = Some(KnownLineage {
                read_down_to: down_to,
                ancestors: read.clone(),
            });
        }
        Ok(read)
    }

    fn known_lineage(&self) -> std::sync::MutexGuard<'_, Option<KnownLineage>> {
        // Replaced whole under the lock, never half-written: a panic
        // elsewhere while it was held leaves it usable.
        self.lineage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stands in for a read of the ancestors, as far back as there are.
    #[cfg(test)]
    pub(crate) fn know_ancestors(&self, ancestors: Vec<(i32, u64)>) {
        *self.known_lineage() = Some(KnownLineage {
            read_down_to: 0,
            ancestors,
        });
    }

    /// Whether the caller is alive and provably still runs the executable
    /// it was attested with (`attested_exe`). An exec changes what the
    /// caller is (a setuid binary even its uid), so it calls for a fresh
    /// attestation; an executable writ cannot read proves nothing.
    pub fn runs_same_executable(&self, attested_exe: &Option<std::path::PathBuf>) -> bool {
        // Alive after the read: it was this process's executable.
        self.exe_is(attested_exe) && !self.process.has_exited()
    }

    /// Whether the caller's `exe` link names `attested_exe` now; `false`
    /// when it cannot be read. Ask `has_exited` afterwards to know the
    /// answer was this process's.
    pub fn exe_is(&self, attested_exe: &Option<std::path::PathBuf>) -> bool {
        self.process
            .exe_path()
            .is_some_and(|now| attested_exe.as_ref() == Some(&now))
    }
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("pid", &self.pid)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .finish()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("reading SO_PEERCRED failed: {0}")]
    Credentials(nix::Error),
    #[error("peer has no PID in this PID namespace")]
    NoPid,
    #[error("pinning peer process {pid} failed: {detail}")]
    Pin { pid: i32, detail: String },
}

/// What handlers find in `request.extensions()`: the pinned caller, or why we
/// could not pin it (the RPC is then refused, never served unattested).
pub type PeerInfo = Result<Arc<Caller>, Arc<PeerError>>;

/// Reads the peer's credentials and pins its process.
pub fn identify(stream: &UnixStream) -> Result<Caller, PeerError> {
    let creds =
        getsockopt(&stream.as_fd(), sockopt::PeerCredentials).map_err(PeerError::Credentials)?;
    let pid = creds.pid();
    // A peer in a PID namespace we cannot see is reported as pid 0.
    if pid <= 0 {
        return Err(PeerError::NoPid);
    }
    let pinned = match getsockopt(&stream.as_fd(), sockopt::PeerPidfd) {
        // SO_PEERPIDFD names the process that connect()ed, taken by the kernel
        // at connect time, so PID reuse between connect and now cannot fool us.
        Ok(pidfd) => PinnedProcess::from_pidfd(pid, pidfd),
        // Kernels before 6.5: pin by PID now and compare start times later.
        // There is a window between connect and this call; that is the best
        // these kernels allow and the reason SO_PEERPIDFD is preferred.
        Err(nix::Error::ENOPROTOOPT) | Err(nix::Error::EINVAL) => PinnedProcess::open(pid),
        Err(e) => {
            return Err(PeerError::Pin {
                pid,
                detail: format!("SO_PEERPIDFD: {e}"),
            });
        }
    }
    .map_err(|e| PeerError::Pin {
        pid,
        detail: e.to_string(),
    })?;
    Ok(Caller::new(pid, creds.uid(), creds.gid(), Arc::new(pinned)))
}

/// A connection together with the peer identified at accept time. Reads go
/// through `AuthorityFix`, so gRPC clients that put the socket path in
/// `:authority` (py-spiffe, grpc-java) are understood; writes through
/// `Coalesced`, so a message split into many frames is one socket write.
pub struct PeerStream {
    stream: Coalesced<AuthorityFix<UnixStream>>,
    peer: PeerInfo,
    /// Until the client has sent the HTTP/2 preface and a frame header:
    /// when that is due, and how many bytes have come so far.
    preface: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
    /// Held for as long as the connection lives.
    _slot: Option<UidSlot>,
}

/// How long a new connection has to send the HTTP/2 preface and its first
/// frame. Clients send them as soon as they connect; a connection that
/// sends nothing would otherwise hold a socket and a pidfd of writ's for
/// as long as its peer likes.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/2 client preface (24 bytes) and one frame header (9).
const PREFACE_BYTES: usize = 24 + 9;

/// Connections one uid may hold open at once on one socket, unless
/// configured otherwise (`workload_api.max_connections_per_uid`; the admin
/// socket always has this). A SPIFFE client holds one; without a bound, one
/// user's processes could hold every descriptor writ may open, and writ
/// would serve no one.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 1024;

/// How many of something (connections, streams) each uid holds.
#[derive(Default)]
pub struct PerUidCounts(Mutex<HashMap<u32, usize>>);

impl PerUidCounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one more for `uid`, if it holds fewer than `limit`.
    pub fn take(self: &Arc<Self>, uid: u32, limit: usize) -> Option<UidSlot> {
        let mut counts = self.lock();
        let held = counts.entry(uid).or_default();
        if *held >= limit {
            return None;
        }
        *held += 1;
        Some(UidSlot {
            counts: self.clone(),
            uid,
        })
    }
}

/// One place in a uid's count, given back when dropped.
pub struct UidSlot {
    counts: Arc<PerUidCounts>,
    uid: u32,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(held) = counts.get_mut(&self.uid) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before
            && let Ok(caller) = &this.peer
        {
            caller.note_read();
        }
        if let Some((due, received)) = &mut this.preface {
            *received += buf.filled().len() - before;
            if *received >= PREFACE_BYTES {
                this.preface = None;
            } else if read.is_pending() && due.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no HTTP/2 preface within {PREFACE_TIMEOUT:?}"),
                )));
            }
        }
        read
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts connections forever, identifying each peer. Accept errors (such as
/// running out of file descriptors) are logged and retried after a pause rather
/// than ending the server.
pub fn incoming(
    listener: UnixListener,
    max_connections_per_uid: usize,
) -> impl Stream<Item = io::Result<PeerStream>> {
    let counts = Arc::new(PerUidCounts::default());
    futures::stream::unfold((listener, counts), move |(listener, counts)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let peer = identify(&stream);
                    match &peer {
                        // A peer writ could not pin now (it ran out of
                        // descriptors, or the peer already left) is hung up
                        // on, not served refusals for as long as it keeps
                        // the connection: clients reconnect, and the next
                        // connection is pinned afresh.
                        Err(e @ (PeerError::Pin { .. } | PeerError::Credentials(_))) => {
                            tracing::debug!(error = %e, "could not pin the peer; closing its connection");
                            continue;
                        }
                        Err(e) => tracing::debug!(error = %e, "could not identify peer"),
                        Ok(_) => {}
                    }
                    let slot = match &peer {
                        Ok(caller) => match counts.take(caller.uid, max_connections_per_uid) {
                            Some(slot) => Some(slot),
                            None => {
                                tracing::warn!(
                                    uid = caller.uid,
                                    pid = caller.pid,
                                    limit = max_connections_per_uid,
                                    "uid holds as many connections as it may; closing a new one"
                                );
                                continue;
                            }
                        },
                        Err(_) => None,
                    };
                    let item = PeerStream {
                        stream: Coalesced::new(AuthorityFix::new(stream)),
                        peer: peer.map(Arc::new).map_err(Arc::new),
                        preface: Some((Box::pin(tokio::time::sleep(PREFACE_TIMEOUT)), 0)),
                        _slot: slot,
                    };
                    return Some((Ok(item), (listener, counts)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// Resolves when the pinned process exits. A pidfd becomes readable exactly
/// then, and stays readable. Each waiter registers its own dup of the pidfd:
/// epoll refuses the same descriptor twice, and one process can be watched by
/// several streams and a task at once.
pub async fn wait_for_exit(process: &PinnedProcess) {
    let watch = process
        .pidfd()
        .try_clone_to_owned()
        .and_then(|fd| crate::sys::async_fd(fd, tokio::io::Interest::READABLE));
    match watch {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(e) => {
            tracing::warn!(pid = process.pid(), error = %e, "cannot watch pidfd; polling for exit");
            while !process.has_exited() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_are_read_back_as_far_as_asked_and_kept() {
        let process = PinnedProcess::open(std::process::id() as i32).unwrap();
        let snapshot = writ_attestors::read_snapshot(&process).unwrap();
        let caller = Caller::new(process.pid(), snapshot.uid, snapshot.gid, Arc::new(process));
        let parent = PinnedProcess::open(snapshot.ppid).unwrap();
        let parent_key = (parent.pid(), parent.start_time());

        let near = caller
            .ancestors_down_to(snapshot.ppid, parent.start_time())
            .unwrap();
        assert_eq!(near.first(), Some(&parent_key));
        assert!(near.iter().all(|&(_, start)| start >= parent.start_time()));
        assert_eq!(
            caller.may_descend_from(parent_key.0, parent_key.1),
            Some(true)
        );
        assert_eq!(
            caller.may_descend_from(parent_key.0, parent_key.1 + 1),
            Some(false),
            "the same PID with another start time is another process"
        );
        assert_eq!(
            caller.may_descend_from(i32::MAX, 0),
            None,
            "older than what was read: unknown"
        );

        let all = caller.ancestors_down_to(snapshot.ppid, 0).unwrap();
        assert!(all.len() >= near.len() && all.starts_with(&near));
        assert_eq!(caller.may_descend_from(i32::MAX, 0), Some(false));

        // What is kept answers from then on, however far back it reaches.
        let stand_in = (i32::MAX, 7);
        caller.know_ancestors(vec![stand_in]);
        assert_eq!(
            caller.ancestors_down_to(snapshot.ppid, 0).unwrap(),
            vec![stand_in]
        );
        assert_eq!(caller.ancestors_down_to(snapshot.ppid, 8).unwrap(), vec![]);
        assert_eq!(caller.may_descend_from(stand_in.0, stand_in.1), Some(true));
    }
}
