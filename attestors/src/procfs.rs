//! Reading and parsing the few /proc files attestation needs (stat, status,
//! cgroup): `stat` by path with one open, `status` and `cgroup` through
//! descriptors a pinned process keeps (`ProcFiles`), all into a reused
//! buffer. Parsers are pure functions over bytes so they can be unit-tested.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::error::AttestError;

/// Builds `/proc/<pid>/<file>` paths in one reused buffer.
pub(crate) struct ProcPaths {
    pid: i32,
    buf: String,
    base_len: usize,
}

impl ProcPaths {
    pub(crate) fn new(pid: i32) -> Self {
        let buf = format!("/proc/{pid}/");
        let base_len = buf.len();
        Self { pid, buf, base_len }
    }

    pub(crate) fn file(&mut self, name: &str) -> &Path {
        self.buf.truncate(self.base_len);
        self.buf.push_str(name);
        Path::new(&self.buf)
    }

    /// Reads `/proc/<pid>/<name>` into `buf`, turning "the directory is gone"
    /// into [`AttestError::ProcessGone`].
    pub(crate) fn read(&mut self, name: &str, buf: &mut Vec<u8>) -> Result<(), AttestError> {
        let pid = self.pid;
        let path = self.file(name);
        read_file(path, buf).map_err(|source| io_error(pid, path, source))
    }
}

/// Maps an I/O error on a /proc/<pid> file: ENOENT/ESRCH mean the process
/// was reaped, anything else is a real error worth reporting.
pub(crate) fn io_error(pid: i32, path: &Path, source: io::Error) -> AttestError {
    if is_gone(&source) {
        AttestError::ProcessGone { pid }
    } else {
        AttestError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub(crate) fn is_gone(error: &io::Error) -> bool {
    const ESRCH: i32 = 3;
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(ESRCH)
}

/// The /proc/<pid> files an attestation reads, opened once and read again
/// with `pread` from offset 0 (procfs renders them afresh each time): a
/// re-attestation then costs no path lookup, open or close. The descriptors
/// stay bound to the process they were opened for; once it is reaped they
/// fail with ESRCH instead of describing whoever is given its PID next.
#[derive(Debug)]
pub(crate) struct ProcFiles {
    pid: i32,
    /// The `exe` link itself (O_PATH | O_NOFOLLOW): read through the
    /// descriptor, it still names the executable the process runs now, and
    /// no path is looked up per read.
    exe_link: OwnedFd,
    status: File,
    cgroup: File,
}

impl ProcFiles {
    pub(crate) fn open(pid: i32) -> Result<Self, AttestError> {
        let dir_path = format!("/proc/{pid}");
        let dir = rustix::fs::open(
            dir_path.as_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| io_error(pid, Path::new(&dir_path), errno.into()))?;
        let open = |name: &str| -> Result<File, AttestError> {
            rustix::fs::openat(&dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                .map(File::from)
                .map_err(|errno| io_error(pid, &Self::path_of(pid, name), errno.into()))
        };
        let status = open("status")?;
        let cgroup = open("cgroup")?;
        let exe_link = rustix::fs::openat(
            &dir,
            "exe",
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| io_error(pid, &Self::path_of(pid, "exe"), errno.into()))?;
        Ok(Self {
            pid,
            exe_link,
            status,
            cgroup,
        })
    }

    pub(crate) fn path_of(pid: i32, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{pid}/{name}"))
    }

    pub(crate) fn read_status(&self, buf: &mut Vec<u8>) -> Result<(), AttestError> {
        self.read(&self.status, "status", buf)
    }

    pub(crate) fn read_cgroup(&self, buf: &mut Vec<u8>) -> Result<(), AttestError> {
        self.read(&self.cgroup, "cgroup", buf)
    }

    /// readlink of `exe`; `None` when unreadable (kernel thread, zombie,
    /// no permission) or gone.
    pub(crate) fn exe(&self) -> Option<PathBuf> {
        // An empty path reads the link `exe_link` is open on.
        let target = rustix::fs::readlinkat(&self.exe_link, "", Vec::new()).ok()?;
        Some(PathBuf::from(std::ffi::OsString::from_vec(
            target.into_bytes(),
        )))
    }

    fn read(&self, file: &File, name: &str, buf: &mut Vec<u8>) -> Result<(), AttestError> {
        read_whole_at(file, buf).map_err(|e| io_error(self.pid, &Self::path_of(self.pid, name), e))
    }
}

/// Reads a whole procfs file from offset 0 through `pread` until it reports
/// the end. (Reading on from where the last read stopped is cheap: procfs
/// only renders the file again for a read at another offset.)
fn read_whole_at(file: &File, buf: &mut Vec<u8>) -> io::Result<()> {
    read_until_end(buf, |chunk, offset| file.read_at(chunk, offset))
}

/// Reads a whole file into `buf` without the size probe `fs::read` makes
/// (procfs reports size 0 anyway, so the probe is a wasted syscall).
pub(crate) fn read_file(path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut file = File::open(path)?;
    read_until_end(buf, |chunk, _| file.read(chunk))
}

/// Fills `buf` by calling `read` (given the chunk to fill and its offset in
/// the file) until it reports the end.
fn read_until_end(
    buf: &mut Vec<u8>,
    mut read: impl FnMut(&mut [u8], u64) -> io::Result<usize>,
) -> io::Result<()> {
    // Reads fill the room the buffer has (so a buffer sized for the file
    // takes it, and the read that finds the end, without growing), and at
    // least this much.
    const MIN_CHUNK: usize = 1024;
    buf.clear();
    loop {
        let start = buf.len();
        let room = (buf.capacity() - start).max(MIN_CHUNK);
        buf.resize(start + room, 0);
        match read(&mut buf[start..], start as u64) {
            Ok(0) => {
                buf.truncate(start);
                return Ok(());
            }
            Ok(n) => buf.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(start),
            Err(e) => {
                buf.truncate(start);
                return Err(e);
            }
        }
    }
}

pub(crate) fn parse_error(path: PathBuf, detail: impl Into<String>) -> AttestError {
    AttestError::Parse {
        path,
        detail: detail.into(),
    }
}

/// The fields of /proc/<pid>/stat that attestation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatFields {
    pub(crate) ppid: i32,
    /// Field 22: clock ticks since boot. Together with the PID it names one
    /// process for the lifetime of the system.
    pub(crate) start_time: u64,
}

/// Parses /proc/<pid>/stat. The command name (field 2) is in parentheses and
/// may itself contain spaces and ')', so fields are counted from the last ')'.
pub(crate) fn parse_stat(text: &[u8]) -> Result<StatFields, String> {
    let close = text
        .iter()
        .rposition(|&b| b == b')')
        .ok_or("no ')' closing the command name")?;
    let rest = std::str::from_utf8(&text[close + 1..])
        .map_err(|_| "fields after the command name are not ASCII")?;
    // After ')' come field 3 (state), field 4 (ppid), ... field 22 (starttime).
    let mut fields = rest.split_ascii_whitespace();
    let ppid = fields
        .nth(1)
        .ok_or("missing field 4 (ppid)")?
        .parse::<i32>()
        .map_err(|e| format!("field 4 (ppid): {e}"))?;
    let start_time = fields
        .nth(17)
        .ok_or("missing field 22 (starttime)")?
        .parse::<u64>()
        .map_err(|e| format!("field 22 (starttime): {e}"))?;
    Ok(StatFields { ppid, start_time })
}

/// The credential fields of /proc/<pid>/status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatusFields {
    pub(crate) ppid: i32,
    pub(crate) effective_uid: u32,
    pub(crate) effective_gid: u32,
    pub(crate) supplementary_gids: Vec<u32>,
}

pub(crate) fn parse_status(text: &[u8]) -> Result<StatusFields, String> {
    let mut ppid = None;
    let mut uid = None;
    let mut gid = None;
    let mut groups = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        // "Name:" may hold arbitrary bytes, so only the lines we need are
        // decoded.
        if let Some(rest) = line.strip_prefix(b"PPid:") {
            let rest = std::str::from_utf8(rest).map_err(|_| "PPid line is not ASCII")?;
            ppid = Some(
                rest.trim()
                    .parse::<i32>()
                    .map_err(|e| format!("PPid line {:?}: {e}", rest.trim()))?,
            );
        } else if let Some(rest) = line.strip_prefix(b"Uid:") {
            uid = Some(second_id(rest).map_err(|e| format!("Uid line: {e}"))?);
        } else if let Some(rest) = line.strip_prefix(b"Gid:") {
            gid = Some(second_id(rest).map_err(|e| format!("Gid line: {e}"))?);
        } else if let Some(rest) = line.strip_prefix(b"Groups:") {
            let rest = std::str::from_utf8(rest).map_err(|_| "Groups line is not ASCII")?;
            for group in rest.split_ascii_whitespace() {
                groups.push(
                    group
                        .parse::<u32>()
                        .map_err(|e| format!("Groups entry {group:?}: {e}"))?,
                );
            }
        }
    }
    Ok(StatusFields {
        ppid: ppid.ok_or("no PPid line")?,
        effective_uid: uid.ok_or("no Uid line")?,
        effective_gid: gid.ok_or("no Gid line")?,
        supplementary_gids: groups,
    })
}

/// "Uid:\treal\teffective\tsaved\tfs" -> effective.
fn second_id(rest: &[u8]) -> Result<u32, String> {
    let rest = std::str::from_utf8(rest).map_err(|_| "not ASCII".to_owned())?;
    let effective = rest
        .split_ascii_whitespace()
        .nth(1)
        .ok_or("missing the effective id")?;
    effective
        .parse::<u32>()
        .map_err(|e| format!("effective id {effective:?}: {e}"))
}

/// Extracts the cgroup v2 path (the `0::` line) from /proc/<pid>/cgroup.
/// `None` when the process has no v2 membership (a pure v1 system), or
/// when its path is not UTF-8: no selector, entry or bound cgroup can name
/// such a path, so the process is attested without cgroup facts (it can
/// only hold less) rather than not at all.
pub(crate) fn parse_cgroup(text: &[u8]) -> Result<Option<String>, String> {
    let mut found: Option<&[u8]> = None;
    for line in text.split(|&b| b == b'\n') {
        if let Some(path) = line.strip_prefix(b"0::") {
            // The kernel refuses '\n' in cgroup names, so a second 0:: line
            // can only mean a format we do not understand; guessing which one
            // is real could hand out the wrong identity.
            if found.is_some() {
                return Err("more than one cgroup v2 (0::) line".into());
            }
            found = Some(path);
        }
    }
    let Some(path) = found else {
        return Ok(None);
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return Ok(None);
    };
    if !path.starts_with('/') {
        return Err(format!("cgroup v2 path {path:?} is not absolute"));
    }
    Ok(Some(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes read through `read_until_end`, handing out at
    /// most `per_read` bytes a call.
    fn read_through(len: usize, per_read: usize, buf: &mut Vec<u8>) {
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        read_until_end(buf, |chunk, offset| {
            let at = (offset as usize).min(len);
            let n = chunk.len().min(per_read).min(len - at);
            chunk[..n].copy_from_slice(&content[at..at + n]);
            Ok(n)
        })
        .unwrap();
        assert_eq!(*buf, content);
    }

    #[test]
    fn whole_files_are_read_however_they_come() {
        for (len, per_read) in [(0, 4096), (1500, 4096), (1500, 7), (20_000, 4096)] {
            read_through(len, per_read, &mut Vec::new());
            read_through(len, per_read, &mut Vec::with_capacity(4096));
        }
    }

    #[test]
    fn a_buffer_with_room_for_the_file_is_not_grown() {
        let mut buf = Vec::with_capacity(4096);
        let before = (buf.as_ptr(), buf.capacity());
        read_through(1500, 4096, &mut buf);
        assert_eq!((buf.as_ptr(), buf.capacity()), before);
    }

    #[test]
    fn stat_is_parsed_from_the_last_paren() {
        let line = b"4242 (evil) 9 (x) y) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200 1 1 1 1\n";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.ppid, 17);
        assert_eq!(stat.start_time, 987654);
    }

    #[test]
    fn stat_of_this_process_matches_status_ppid() {
        let mut buf = Vec::new();
        read_file(Path::new("/proc/self/stat"), &mut buf).unwrap();
        let stat = parse_stat(&buf).unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let ppid: i32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(stat.ppid, ppid);
        assert!(stat.start_time > 0);
    }

    #[test]
    fn stat_rejects_truncated_text() {
        assert!(parse_stat(b"12 (sleep) S 1 2 3").is_err());
        assert!(parse_stat(b"12 sleep S 1").is_err());
        assert!(parse_stat(b"12 (sleep) S x 2").is_err());
    }

    #[test]
    fn status_takes_effective_ids_and_groups() {
        let text = b"Name:\tweird\xff\nUid:\t1000\t1001\t1002\t1003\nGid:\t50\t51\t52\t53\nGroups:\t4 24 27 \nPPid:\t1\n";
        let status = parse_status(text).unwrap();
        assert_eq!(status.effective_uid, 1001);
        assert_eq!(status.effective_gid, 51);
        assert_eq!(status.supplementary_gids, vec![4, 24, 27]);
        assert_eq!(status.ppid, 1);

        let empty_groups =
            parse_status(b"PPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n").unwrap();
        assert!(empty_groups.supplementary_gids.is_empty());
        assert_eq!(empty_groups.ppid, 0);
        assert!(parse_status(b"PPid:\t1\nGid:\t0\t0\t0\t0\n").is_err());
        assert!(parse_status(b"PPid:\t1\nUid:\t0\nGid:\t0\t0\t0\t0\n").is_err());
        // Without its parent the snapshot would be wrong, not just short.
        let no_ppid = parse_status(b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n").unwrap_err();
        assert!(no_ppid.contains("PPid"), "{no_ppid}");
        assert!(parse_status(b"PPid:\tx\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n").is_err());
    }

    #[test]
    fn cgroup_v2_line_in_hybrid_layout() {
        let text =
            b"9:name=systemd:/user.slice\n4:memory:/x\n1:cpu:/\n0::/system.slice/a b.service\n";
        assert_eq!(
            parse_cgroup(text).unwrap().as_deref(),
            Some("/system.slice/a b.service")
        );
        assert_eq!(parse_cgroup(b"4:memory:/x\n").unwrap(), None);
        assert!(parse_cgroup(b"0::/a\n0::/b\n").is_err());
        assert!(parse_cgroup(b"0::relative\n").is_err());
        // A name the kernel allows and no selector can spell.
        assert_eq!(parse_cgroup(b"0::/writ.slice/ff\xff\n").unwrap(), None);
    }
}
