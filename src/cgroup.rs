//! A cgroup v2 directory a task is bound to, held open. A cgroup can be
//! removed and another made at the same path; reading through the bound
//! directory's descriptor reads the bound cgroup or nothing, never the one
//! that took its path.

use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// An open cgroup directory, with the id and owner it had when opened.
#[derive(Debug)]
pub(crate) struct CgroupDir {
    fd: OwnedFd,
    /// The directory's inode number: the cgroup's id, never reused while
    /// the system runs.
    id: u64,
    owner: u32,
}

impl CgroupDir {
    /// Opens the cgroup at `dir`; fails if nothing is there or it is not a
    /// cgroup (it has no `cgroup.events`).
    pub(crate) fn open(dir: &Path) -> io::Result<CgroupDir> {
        let fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let file = File::from(fd);
        let meta = file.metadata()?;
        let dir = CgroupDir {
            fd: file.into(),
            id: meta.ino(),
            owner: meta.uid(),
        };
        dir.read("cgroup.events")?;
        Ok(dir)
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn owner(&self) -> u32 {
        self.owner
    }

    /// When the cgroup was made: the change time of its `cgroup.controllers`.
    /// kernfs gives a cgroup's directory and files the time they were made;
    /// that file is read-only and not handed over on delegation, so neither
    /// writes nor chown change it (the directory's and `cgroup.type`'s can).
    /// None once the cgroup is gone.
    pub(crate) fn created_at(&self) -> Option<std::time::SystemTime> {
        let stat = rustix::fs::statat(
            &self.fd,
            "cgroup.controllers",
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .ok()?;
        let secs = u64::try_from(stat.st_ctime).ok()?;
        let nanos = u32::try_from(stat.st_ctime_nsec).ok()?;
        std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
    }

    /// One of the cgroup's files. Once the cgroup is removed every file is
    /// gone (ENOENT), even if another cgroup now has its path.
    fn read(&self, name: &str) -> io::Result<String> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut text = String::new();
        File::from(fd).read_to_string(&mut text)?;
        Ok(text)
    }

    /// `populated` from its cgroup.events; None once the cgroup is gone
    /// (or the file is unreadable).
    pub(crate) fn populated(&self) -> Option<bool> {
        let text = self.read("cgroup.events").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("populated "))
            .map(|v| v.trim() == "1")
    }

    /// The CPU time (µs) processes have used in the cgroup and its
    /// descendants: `usage_usec` in its cpu.stat, which cgroup v2 keeps for
    /// every cgroup, cpu controller or not. It only grows while the cgroup
    /// exists, and every process that runs in it adds to it, so a larger
    /// value than at an earlier look means processes were there in between,
    /// even if `populated` reads 0 both times (one that lived a
    /// millisecond, between two wake-ups of a watcher). None if unreadable.
    pub(crate) fn cpu_usage(&self) -> Option<u64> {
        let text = self.read("cpu.stat").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// The id of the cgroup at `dir` now, if there is one.
pub(crate) fn cgroup_id(dir: &Path) -> Option<u64> {
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with the files the kernel keeps stands in for a cgroup.
    fn fake_cgroup(dir: &Path, populated: u8, usage: u64) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("cgroup.events"),
            format!("populated {populated}\nfrozen 0\n"),
        )
        .unwrap();
        std::fs::write(dir.join("cpu.stat"), format!("usage_usec {usage}\n")).unwrap();
    }

    #[test]
    fn a_cgroup_removed_and_made_again_at_its_path_reads_as_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("job");
        fake_cgroup(&path, 1, 10);
        let bound = CgroupDir::open(&path).unwrap();
        assert_eq!(bound.populated(), Some(true));
        assert_eq!(bound.cpu_usage(), Some(10));
        assert_eq!(cgroup_id(&path), Some(bound.id()));

        std::fs::remove_dir_all(&path).unwrap();
        fake_cgroup(&path, 1, 99);
        assert_eq!(bound.populated(), None);
        assert_eq!(bound.cpu_usage(), None);
        assert_ne!(cgroup_id(&path), Some(bound.id()));
    }

    /// On a real cgroup: its creation time stays what it was through what
    /// happens to a bound cgroup (a child made, a process moved in,
    /// controllers handed down, delegation's chown).
    #[test]
    fn a_real_cgroup_keeps_its_creation_time() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to create cgroups");
            return;
        }
        let Some(mount) = writ_attestors::find_cgroup2_mount().unwrap() else {
            eprintln!("SKIPPED: no cgroup v2 mount");
            return;
        };
        let dir = mount.join(format!("writ-created-at-{}", std::process::id()));
        let before = std::time::SystemTime::now();
        std::fs::create_dir(&dir).unwrap();
        let cgroup = CgroupDir::open(&dir).unwrap();
        let made = cgroup.created_at().unwrap();
        assert!(made + std::time::Duration::from_secs(1) >= before);
        std::thread::sleep(std::time::Duration::from_millis(1100));

        let child = dir.join("child");
        std::fs::create_dir(&child).unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let moved = std::fs::write(child.join("cgroup.procs"), sleeper.id().to_string());
        let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap();
        if let Some(controller) = controllers.split_whitespace().next() {
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"));
        }
        for delegated in [dir.clone(), dir.join("cgroup.procs")] {
            std::os::unix::fs::chown(&delegated, Some(65534), Some(65534)).unwrap();
        }
        let after = cgroup.created_at();
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        let removed = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let _ = std::fs::remove_dir(&child);
            std::fs::remove_dir(&dir).is_ok()
        });
        moved.unwrap();
        assert!(removed, "{} was left behind", dir.display());
        assert_eq!(after, Some(made));
    }

    #[test]
    fn only_a_directory_with_cgroup_events_opens() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(CgroupDir::open(&tmp.path().join("missing")).is_err());
        assert!(CgroupDir::open(tmp.path()).is_err());
    }
}
