//! Pinning a process: a pidfd plus its start time, so that a dead caller or a
//! recycled PID can never be mistaken for the live process we attested, and
//! the /proc files its attestations re-read. Also the parent-chain walk used
//! to decide task membership by ancestry, and which namespaces a process
//! shares with writ.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, pidfd_open};

use crate::error::AttestError;
use crate::procfs::{self, ProcFiles, ProcPaths, StatFields};

/// Numbers pinnings in order (see `descends_from`).
static PIN_SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Deeper process trees than this are not real; the bound keeps a walk over
/// a racing /proc finite.
const MAX_ANCESTRY_DEPTH: usize = 4096;

/// A process held by a pidfd. While the pidfd is not readable the process has
/// not exited, so its PID cannot have been reused, so anything read from
/// /proc/<pid> in that window describes this process.
#[derive(Debug)]
pub struct PinnedProcess {
    pid: i32,
    pidfd: OwnedFd,
    start_time: u64,
    /// The parent PID in the `stat` read that pinned it.
    parent_when_pinned: i32,
    /// Order of pinning among all pinned processes.
    pinned_seq: u64,
    /// Opened by the first attestation that found the process alive after
    /// opening them, and kept for the next.
    files: OnceLock<ProcFiles>,
    /// Its PID namespace, once read (`pid_namespace`).
    pid_namespace: OnceLock<(u64, u64)>,
}

impl PinnedProcess {
    /// From a pidfd obtained via SO_PEERPIDFD. Reads the start time from
    /// /proc/<pid>/stat, then confirms through the pidfd that the process is
    /// still alive, which proves the start time we read belongs to it.
    pub fn from_pidfd(pid: i32, pidfd: OwnedFd) -> Result<Self, AttestError> {
        check_pid(pid)?;
        // The kernel states which PID a pidfd refers to; a caller pairing the
        // wrong PID with a pidfd would otherwise pin a stranger.
        match pidfd_fdinfo_pid(&pidfd)? {
            Some(actual) if actual == pid => {}
            Some(-1) => return Err(AttestError::ProcessGone { pid }),
            Some(actual) => {
                return Err(AttestError::PidfdMismatch {
                    expected: pid,
                    actual,
                });
            }
            None => {}
        }
        Self::pin(pid, pidfd)
    }

    /// For kernels without SO_PEERPIDFD, and for a PID named in an API call.
    pub fn open(pid: i32) -> Result<Self, AttestError> {
        let raw = check_pid(pid)?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|errno| {
            if errno == Errno::SRCH {
                AttestError::ProcessGone { pid }
            } else {
                AttestError::PidfdOpen {
                    pid,
                    source: errno.into(),
                }
            }
        })?;
        Self::pin(pid, pidfd)
    }

    fn pin(pid: i32, pidfd: OwnedFd) -> Result<Self, AttestError> {
        // Taken once the pidfd holds the PID and before the stat read: a
        // process pinned with a lower number held its PID before this
        // process's parent was read (`descends_from`).
        let pinned_seq = PIN_SEQUENCE.fetch_add(1, Ordering::SeqCst);
        let stat = read_stat(pid)?;
        let process = Self {
            pid,
            pidfd,
            start_time: stat.start_time,
            parent_when_pinned: stat.ppid,
            pinned_seq,
            files: OnceLock::new(),
            pid_namespace: OnceLock::new(),
        };
        // Ordering matters: the stat read must come before this check. Alive
        // now means alive then, so the PID was still ours when we read it.
        if process.has_exited() {
            return Err(AttestError::ProcessGone { pid });
        }
        Ok(process)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Clock ticks since boot (field 22 of /proc/<pid>/stat).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Readable once the process has exited; suitable for tokio's `AsyncFd`.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The /proc files attestation reads, opened on first use. Opened while
    /// the process is alive they are its own (its PID cannot have been
    /// reused), and they stay its own.
    pub(crate) fn proc_files(&self) -> Result<&ProcFiles, AttestError> {
        if let Some(files) = self.files.get() {
            return Ok(files);
        }
        let opened = ProcFiles::open(self.pid)?;
        if self.has_exited() {
            return Err(AttestError::ProcessGone { pid: self.pid });
        }
        // Another attestation may have opened them meanwhile; either is
        // this process's.
        Ok(self.files.get_or_init(|| opened))
    }

    /// Where the process's executable is now (readlink of its `exe`), or
    /// `None` when that cannot be read. Ask `has_exited` afterwards to know
    /// the answer was this process's.
    pub fn exe_path(&self) -> Option<PathBuf> {
        match self.files.get() {
            Some(files) => files.exe(),
            None => std::fs::read_link(ProcFiles::path_of(self.pid, "exe")).ok(),
        }
    }

    /// The PID namespace the process is in, as [`namespace_of`] gives it;
    /// `None` when unreadable or the process is gone. Read once: a process
    /// never leaves its PID namespace (unshare and setns move only its
    /// future children), so an admin connection asks /proc on its first
    /// call only.
    pub fn pid_namespace(&self) -> Option<(u64, u64)> {
        if let Some(namespace) = self.pid_namespace.get() {
            return Some(*namespace);
        }
        let read = namespace_of(self.pid, "pid")?;
        // Alive after the read: the PID was still this process's.
        if self.has_exited() {
            return None;
        }
        Some(*self.pid_namespace.get_or_init(|| read))
    }

    /// Non-blocking: has the pinned process exited (zombie or reaped)?
    /// A failing poll counts as exited, so an error can never keep a dead
    /// caller's identity alive.
    pub fn has_exited(&self) -> bool {
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        loop {
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            match poll(&mut fds, Some(&zero)) {
                Ok(0) => return false,
                Ok(_) => return true,
                Err(Errno::INTR) => continue,
                Err(errno) => {
                    tracing::warn!(pid = self.pid, %errno, "polling pidfd failed; treating process as exited");
                    return true;
                }
            }
        }
    }

    /// Ok while the pinned process is alive and /proc/<pid>/stat still shows
    /// its start time; otherwise [`AttestError::ProcessGone`].
    pub fn confirm_alive(&self) -> Result<(), AttestError> {
        let gone = AttestError::ProcessGone { pid: self.pid };
        match read_stat(self.pid) {
            Ok(stat) if stat.start_time == self.start_time => {}
            Ok(_) => return Err(gone),
            Err(AttestError::ProcessGone { .. }) => return Err(gone),
            Err(other) => return Err(other),
        }
        if self.has_exited() {
            return Err(gone);
        }
        Ok(())
    }
}

fn check_pid(pid: i32) -> Result<Pid, AttestError> {
    if pid <= 0 {
        return Err(AttestError::InvalidPid { pid });
    }
    Pid::from_raw(pid).ok_or(AttestError::InvalidPid { pid })
}

/// The "Pid:" line of the pidfd's fdinfo: the PID in our namespace, -1 once
/// the process is reaped, 0 if it lives outside our PID namespace. `None` on
/// kernels too old to print it.
fn pidfd_fdinfo_pid(pidfd: &OwnedFd) -> Result<Option<i32>, AttestError> {
    let path = PathBuf::from(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()));
    let mut buf = Vec::with_capacity(256);
    procfs::read_file(&path, &mut buf).map_err(|source| AttestError::Io {
        path: path.clone(),
        source,
    })?;
    for line in buf.split(|&b| b == b'\n') {
        if let Some(value) = line.strip_prefix(b"Pid:") {
            let value = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<i32>().ok())
                .ok_or_else(|| procfs::parse_error(path.clone(), "unreadable Pid line"))?;
            return Ok(Some(value));
        }
    }
    Ok(None)
}

pub(crate) fn read_stat(pid: i32) -> Result<StatFields, AttestError> {
    let mut paths = ProcPaths::new(pid);
    // A `stat` line is a few hundred bytes: room for it and the read that
    // finds its end.
    let mut buf = Vec::with_capacity(1024);
    read_stat_with(&mut paths, &mut buf)
}

pub(crate) fn read_stat_with(
    paths: &mut ProcPaths,
    buf: &mut Vec<u8>,
) -> Result<StatFields, AttestError> {
    paths.read("stat", buf)?;
    procfs::parse_stat(buf)
        .map_err(|detail| procfs::parse_error(paths.file("stat").to_path_buf(), detail))
}

/// The parent of `pid` and the parent's start time; `None` for PID 1 and
/// kernel threads (ppid 0). A parent that started after its child is a
/// recycled PID (the real parent died and the child was reparented between
/// our two reads), so the read is retried rather than trusted.
pub fn parent_of(pid: i32) -> Result<Option<(i32, u64)>, AttestError> {
    check_pid(pid)?;
    const ATTEMPTS: usize = 3;
    for _ in 0..ATTEMPTS {
        let child = read_stat(pid)?;
        if child.ppid <= 0 {
            return Ok(None);
        }
        match read_stat(child.ppid) {
            Ok(parent) if parent.start_time <= child.start_time => {
                return Ok(Some((child.ppid, parent.start_time)));
            }
            Ok(_) | Err(AttestError::ProcessGone { .. }) => continue,
            Err(other) => return Err(other),
        }
    }
    Err(AttestError::ProcessGone { pid })
}

/// The ancestors of a process, parent first, as (pid, start time), read from
/// /proc one `stat` per level. `ppid` and `start_time` are the process's own
/// (from a snapshot just taken). The walk ends at PID 1, after
/// MAX_ANCESTRY_DEPTH levels, or at the first ancestor that started before
/// `stop_below` (ancestors only get older, so none above it can have started
/// later). A parent that started after its child is a recycled PID: that level
/// is re-read through `parent_of`, which retries.
pub fn ancestors(
    pid: i32,
    ppid: i32,
    start_time: u64,
    stop_below: u64,
) -> Result<Vec<(i32, u64)>, AttestError> {
    let mut found = Vec::new();
    // A process started before `stop_below` has only older ancestors: no
    // /proc read can find one that qualifies.
    if start_time < stop_below {
        return Ok(found);
    }
    let mut buf = Vec::with_capacity(512);
    let (mut child_pid, mut child_start, mut next) = (pid, start_time, ppid);
    for _ in 0..MAX_ANCESTRY_DEPTH {
        if next <= 0 {
            break;
        }
        let mut paths = ProcPaths::new(next);
        let parent = match read_stat_with(&mut paths, &mut buf) {
            Ok(parent) if parent.start_time <= child_start => Some(parent),
            Ok(_) | Err(AttestError::ProcessGone { .. }) => None,
            Err(other) => return Err(other),
        };
        let (parent_pid, parent_start, grandparent) = match parent {
            Some(p) => (next, p.start_time, p.ppid),
            None => match parent_of(child_pid)? {
                Some((p, st)) => (p, st, read_stat(p)?.ppid),
                None => break,
            },
        };
        if parent_start < stop_below {
            break;
        }
        found.push((parent_pid, parent_start));
        (child_pid, child_start, next) = (parent_pid, parent_start, grandparent);
    }
    Ok(found)
}

/// True if `process` descends from `ancestor`, both pinned. When `ancestor`
/// was pinned first and is still alive, it held its PID when `process` was
/// pinned; if that PID was then `process`'s parent, no /proc read is needed.
/// Otherwise the chain is walked (`is_descendant_of`).
pub fn descends_from(process: &PinnedProcess, ancestor: &PinnedProcess) -> bool {
    if process.parent_when_pinned == ancestor.pid
        && ancestor.pinned_seq < process.pinned_seq
        && !ancestor.has_exited()
    {
        return true;
    }
    is_descendant_of(process.pid, ancestor.pid, ancestor.start_time)
}

/// True if `pid` is the process (`ancestor_pid`, `ancestor_start_time`) or one
/// of its descendants. Any doubt (unreadable /proc, a recycled PID in the
/// chain) answers false, since "yes" grants a task's identity.
pub fn is_descendant_of(pid: i32, ancestor_pid: i32, ancestor_start_time: u64) -> bool {
    if pid <= 0 || ancestor_pid <= 0 {
        return false;
    }
    let mut paths = ProcPaths::new(pid);
    // A `stat` line is a few hundred bytes: room for it and the read that
    // finds its end.
    let mut buf = Vec::with_capacity(1024);
    let Ok(mut current) = read_stat_with(&mut paths, &mut buf) else {
        return false;
    };
    let mut current_pid = pid;
    for _ in 0..MAX_ANCESTRY_DEPTH {
        // A descendant cannot have started before its ancestor; this also
        // ends the walk long before PID 1 in the common case.
        if current.start_time < ancestor_start_time {
            return false;
        }
        if current_pid == ancestor_pid {
            return current.start_time == ancestor_start_time;
        }
        if current.ppid <= 0 {
            return false;
        }
        let mut parent_paths = ProcPaths::new(current.ppid);
        let Ok(parent) = read_stat_with(&mut parent_paths, &mut buf) else {
            return false;
        };
        if parent.start_time > current.start_time {
            return false;
        }
        current_pid = current.ppid;
        current = parent;
    }
    false
}

/// Runs `sh -c script` with piped stdin (close it to let a script ending
/// in `read x` finish) and returns it with the PID it prints first.
#[cfg(test)]
pub(crate) fn sh_reporting_pid(script: &str) -> (std::process::Child, i32) {
    use std::io::BufRead;
    let mut child = std::process::Command::new("sh")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().parse().unwrap())
}

/// The namespace of `kind` (`"mnt"`, `"pid"`, ...) process `pid` is in, as
/// the (device, inode) of `/proc/<pid>/ns/<kind>`: two processes share a
/// namespace exactly when these are equal. None if unreadable.
pub fn namespace_of(pid: i32, kind: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pid_namespace_of_a_live_process_only() {
        let me = PinnedProcess::open(std::process::id() as i32).unwrap();
        let ours = namespace_of(std::process::id() as i32, "pid");
        assert!(ours.is_some());
        assert_eq!(me.pid_namespace(), ours);
        assert_eq!(me.pid_namespace(), ours, "the kept answer");

        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pinned = PinnedProcess::open(child.id() as i32).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            pinned.pid_namespace(),
            None,
            "gone, so nothing it says counts"
        );
    }

    #[test]
    fn the_kept_exe_link_follows_an_exec() {
        use std::io::Write;
        let (mut child, pid) = sh_reporting_pid("echo $$; read go; exec sleep 30");
        let pinned = PinnedProcess::open(pid).unwrap();
        pinned.proc_files().unwrap();
        let before = pinned.exe_path().unwrap();
        assert_ne!(before.file_name().unwrap(), "sleep");
        writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut now = pinned.exe_path();
        while now.as_deref() == Some(before.as_path()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            now = pinned.exe_path();
        }
        assert_eq!(
            now.as_deref().and_then(|p| p.file_name()),
            Some(std::ffi::OsStr::new("sleep")),
            "read through the descriptor opened before the exec"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(pinned.exe_path(), None, "nothing once reaped");
    }

    #[test]
    fn pins_itself_and_sees_itself_alive() {
        let me = PinnedProcess::open(std::process::id() as i32).unwrap();
        assert!(!me.has_exited());
        me.confirm_alive().unwrap();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let start: u64 = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(19)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(me.start_time(), start);
    }

    #[test]
    fn rejects_non_positive_pids() {
        for pid in [0, -1, i32::MIN] {
            assert!(matches!(
                PinnedProcess::open(pid),
                Err(AttestError::InvalidPid { .. })
            ));
            assert!(!is_descendant_of(pid, 1, 0));
        }
    }

    #[test]
    fn is_own_descendant_but_not_of_a_wrong_start_time() {
        let me = PinnedProcess::open(std::process::id() as i32).unwrap();
        assert!(is_descendant_of(me.pid(), me.pid(), me.start_time()));
        assert!(!is_descendant_of(me.pid(), me.pid(), me.start_time() + 1));
    }

    #[test]
    fn parent_of_self_matches_getppid() {
        let (ppid, ppid_start) = parent_of(std::process::id() as i32).unwrap().unwrap();
        assert_eq!(ppid as u32, std::os::unix::process::parent_id());
        assert!(is_descendant_of(
            std::process::id() as i32,
            ppid,
            ppid_start
        ));
        assert_eq!(parent_of(1).unwrap(), None);
    }

    #[test]
    fn descends_from_answers_for_children_grandchildren_and_strangers() {
        let me = PinnedProcess::open(std::process::id() as i32).unwrap();
        // sh, and a sleep it starts in the background.
        let (mut child, sleep_pid) = sh_reporting_pid("sleep 60 & echo $!; read x");
        let grandchild = PinnedProcess::open(sleep_pid).unwrap();
        let pinned_child = PinnedProcess::open(child.id() as i32).unwrap();

        // Pinned after its parent: settled from the pin.
        assert!(descends_from(&pinned_child, &me));
        // Pinned before its parent: walked.
        assert!(descends_from(&grandchild, &pinned_child));
        assert!(descends_from(&grandchild, &me));
        // Never upwards or sideways.
        assert!(!descends_from(&me, &pinned_child));
        assert!(!descends_from(&pinned_child, &grandchild));

        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(grandchild.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        drop(child.stdin.take());
        child.wait().unwrap();
        // A parent that has exited settles nothing.
        assert!(!descends_from(&grandchild, &pinned_child));
    }

    #[test]
    fn ancestors_follow_parent_of_to_the_top_and_stop_where_asked() {
        let me = std::process::id() as i32;
        let own = read_stat(me).unwrap();
        let walked = ancestors(me, own.ppid, own.start_time, 0).unwrap();
        let mut expected = Vec::new();
        let mut pid = me;
        while let Some((parent, start)) = parent_of(pid).unwrap() {
            expected.push((parent, start));
            pid = parent;
        }
        assert_eq!(walked, expected);
        assert!(!walked.is_empty());
        // Nothing above an ancestor older than the cut-off is returned.
        let (_, parent_start) = walked[0];
        let pruned = ancestors(me, own.ppid, own.start_time, parent_start + 1).unwrap();
        assert!(pruned.is_empty());
        let kept = ancestors(me, own.ppid, own.start_time, parent_start).unwrap();
        assert_eq!(kept[0], walked[0]);
        assert!(kept.iter().all(|(_, st)| *st >= parent_start));
        // A process older than the cut-off is not walked at all: these PIDs
        // do not exist, and reading them would fail.
        assert_eq!(ancestors(i32::MAX, i32::MAX - 1, 5, 10).unwrap(), vec![]);
    }
}
