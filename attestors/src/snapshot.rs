//! One read of the /proc facts every attestor works from: credentials, parent,
//! executable and cgroup. Each file is read once per attestation; attestors
//! derive selectors from this snapshot instead of going back to /proc.

use std::path::PathBuf;

use crate::error::AttestError;
use crate::process::PinnedProcess;
use crate::procfs::{self, ProcFiles};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSnapshot {
    pub pid: i32,
    pub ppid: i32,
    pub start_time: u64,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    pub supplementary_gids: Vec<u32>,
    /// readlink of /proc/<pid>/exe; `None` when unreadable (kernel thread,
    /// zombie, no permission). Ends in " (deleted)" if the file was removed.
    pub exe_path: Option<PathBuf>,
    /// The cgroup v2 path from the `0::` line of /proc/<pid>/cgroup.
    pub cgroup_path: Option<String>,
}

impl ProcessSnapshot {
    /// The credentials the snapshot was read with.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            uid: self.uid,
            gid: self.gid,
            supplementary_gids: self.supplementary_gids.clone(),
        }
    }
}

/// A process's effective uid and gid and its supplementary groups: what a
/// process can change about itself without an exec (setresuid, setgroups),
/// and what `unix:uid`, `unix:gid` and group selectors are derived from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub supplementary_gids: Vec<u32>,
}

/// Reads the process's credentials as they are now: one read of its
/// `status` file (kept open since its first attestation), confirmed as the
/// pinned process's by the pidfd afterwards. Cheap enough to ask before an
/// earlier attestation is trusted again.
pub fn read_credentials(process: &PinnedProcess) -> Result<Credentials, AttestError> {
    let pid = process.pid();
    let mut buf = Vec::with_capacity(STATUS_BUFFER_BYTES);
    let status = read_status(pid, process.proc_files()?, &mut buf)?;
    if process.has_exited() {
        return Err(AttestError::ProcessGone { pid });
    }
    Ok(Credentials {
        uid: status.effective_uid,
        gid: status.effective_gid,
        supplementary_gids: status.supplementary_gids,
    })
}

/// Room for a `status` file (about 1.5 KiB) and the read that finds its
/// end, so neither grows the buffer.
const STATUS_BUFFER_BYTES: usize = 4096;

/// The process's `status` file, read into `buf` and parsed.
fn read_status(
    pid: i32,
    files: &ProcFiles,
    buf: &mut Vec<u8>,
) -> Result<procfs::StatusFields, AttestError> {
    files.read_status(buf)?;
    procfs::parse_status(buf)
        .map_err(|detail| procfs::parse_error(ProcFiles::path_of(pid, "status"), detail))
}

/// Reads the snapshot, then asks the pidfd whether the process is still
/// alive: a PID is only reused after its process has exited and been reaped,
/// so alive at the end means every file read was this process's. That is
/// why no `stat` read is needed to compare start times. Attestors that read
/// more afterwards rely on the final check in `AttestorSet::attest`.
pub fn read_snapshot(process: &PinnedProcess) -> Result<ProcessSnapshot, AttestError> {
    let pid = process.pid();
    let files = process.proc_files()?;
    let mut buf = Vec::with_capacity(STATUS_BUFFER_BYTES);
    let status = read_status(pid, files, &mut buf)?;

    let exe_path = files.exe();

    files.read_cgroup(&mut buf)?;
    let cgroup_path = procfs::parse_cgroup(&buf)
        .map_err(|detail| procfs::parse_error(ProcFiles::path_of(pid, "cgroup"), detail))?;

    if process.has_exited() {
        return Err(AttestError::ProcessGone { pid });
    }

    Ok(ProcessSnapshot {
        pid,
        ppid: status.ppid,
        start_time: process.start_time(),
        uid: status.effective_uid,
        gid: status.effective_gid,
        supplementary_gids: status.supplementary_gids,
        exe_path,
        cgroup_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn credentials_now_match_the_snapshots() {
        let me = PinnedProcess::open(std::process::id() as i32).unwrap();
        let snapshot = read_snapshot(&me).unwrap();
        assert_eq!(read_credentials(&me).unwrap(), snapshot.credentials());
    }

    #[test]
    fn snapshot_of_this_process_matches_independent_sources() {
        let me = PinnedProcess::open(std::process::id() as i32).unwrap();
        let snapshot = read_snapshot(&me).unwrap();
        assert_eq!(snapshot.pid, me.pid());
        assert_eq!(snapshot.start_time, me.start_time());
        assert_eq!(snapshot.ppid as u32, std::os::unix::process::parent_id());
        assert_eq!(snapshot.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(snapshot.gid, nix::unistd::getegid().as_raw());
        let mut groups: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        groups.sort_unstable();
        let mut seen = snapshot.supplementary_gids.clone();
        seen.sort_unstable();
        assert_eq!(seen, groups);
        let exe = snapshot.exe_path.unwrap();
        assert_eq!(
            std::fs::metadata(&exe).unwrap().ino(),
            std::fs::metadata(std::env::current_exe().unwrap())
                .unwrap()
                .ino()
        );
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let expected = cgroup.lines().find_map(|l| l.strip_prefix("0::"));
        assert_eq!(snapshot.cgroup_path.as_deref(), expected);
    }

    /// The files a first snapshot opened are read afresh by the next: a
    /// process reparented and then exec'd in between is seen as it is now.
    #[test]
    fn a_second_snapshot_sees_what_changed_since_the_first() {
        use std::io::Write;
        // sh starts a second sh in the background, reports its PID, and
        // exits when its stdin closes; the second waits on a fifo, then
        // execs sleep.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("go");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let script = format!(
            "sh -c 'read x < {fifo}; exec sleep 60' & echo $!; read x",
            fifo = fifo.display()
        );
        let (mut parent, pid) = crate::process::sh_reporting_pid(&script);
        let pinned = PinnedProcess::open(pid).unwrap();
        let before = read_snapshot(&pinned).unwrap();
        assert_eq!(before.ppid, parent.id() as i32);
        let exe_before = before.exe_path.clone().unwrap();
        assert!(!exe_before.ends_with("sleep"), "{exe_before:?}");

        drop(parent.stdin.take());
        parent.wait().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .unwrap()
            .write_all(b"go\n")
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let after = loop {
            let now = read_snapshot(&pinned).unwrap();
            if now.exe_path.as_ref().is_some_and(|p| p.ends_with("sleep")) {
                break now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never exec'd: {now:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_ne!(after.ppid, parent.id() as i32, "reparented when sh exited");
        assert_eq!(after.start_time, before.start_time);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// An exited but unreaped child still has every /proc file the snapshot
    /// reads, with its PID not yet free; the pidfd check is what refuses it.
    #[test]
    fn a_process_that_exited_is_gone_even_before_it_is_reaped() {
        // The child waits on its stdin so it is pinned while still alive;
        // closing the pipe is what lets it exit.
        let mut child = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pinned = PinnedProcess::open(child.id() as i32).unwrap();
        drop(child.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !pinned.has_exited() {
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            std::path::Path::new(&format!("/proc/{}/status", child.id())).exists(),
            "the zombie's /proc entry should still be there"
        );
        let outcome = read_snapshot(&pinned);
        child.wait().unwrap();
        assert!(
            matches!(outcome, Err(AttestError::ProcessGone { pid }) if pid == pinned.pid()),
            "{outcome:?}"
        );
    }
}
