//! Finding where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo.
//! It is /sys/fs/cgroup on unified hosts but elsewhere on hybrid ones (often
//! /sys/fs/cgroup/unified), so it is discovered, never assumed.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::error::AttestError;
use crate::procfs;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One cgroup2 line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub mount_point: PathBuf,
    /// Which cgroup directory the mount shows as its top: "/" for the whole
    /// hierarchy, something deeper for a bind mount of a subtree.
    pub root: PathBuf,
}

/// The mount point of the whole cgroup v2 hierarchy, or `None` when there is
/// no cgroup2 mount (a pure v1 host).
pub fn find_cgroup2_mount() -> Result<Option<PathBuf>, AttestError> {
    let path = Path::new(MOUNTINFO);
    let mut buf = Vec::with_capacity(8192);
    procfs::read_file(path, &mut buf).map_err(|source| AttestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mounts = parse_cgroup2_mounts(&buf)
        .map_err(|detail| procfs::parse_error(path.to_path_buf(), detail))?;
    Ok(select_cgroup2_mount(&mounts).map(Path::to_path_buf))
}

/// The first mount that shows the hierarchy from its root; a bind mount of a
/// subtree would map cgroup paths to the wrong directories.
pub fn select_cgroup2_mount(mounts: &[Cgroup2Mount]) -> Option<&Path> {
    mounts
        .iter()
        .find(|m| m.root == Path::new("/"))
        .map(|m| m.mount_point.as_path())
}

/// Every cgroup2 mount in mountinfo text, in order. Lines are
/// `id parent major:minor root mount-point options [optional...] - fstype source super-options`.
pub fn parse_cgroup2_mounts(text: &[u8]) -> Result<Vec<Cgroup2Mount>, String> {
    let mut mounts = Vec::new();
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let line_no = index + 1;
        if fields.len() < 6 {
            return Err(format!("line {line_no}: fewer than 6 fields"));
        }
        let separator = fields
            .iter()
            .skip(6)
            .position(|f| *f == b"-")
            .map(|p| p + 6)
            .ok_or_else(|| format!("line {line_no}: no \" - \" separator"))?;
        let fstype = fields
            .get(separator + 1)
            .ok_or_else(|| format!("line {line_no}: no filesystem type after \" - \""))?;
        if *fstype != b"cgroup2" {
            continue;
        }
        mounts.push(Cgroup2Mount {
            root: unescape(fields[3]),
            mount_point: unescape(fields[4]),
        });
    }
    Ok(mounts)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(digits) = field.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
23 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 master:2 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn hybrid_layout_finds_the_unified_mount_not_v1() {
        let mounts = parse_cgroup2_mounts(HYBRID.as_bytes()).unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(
            select_cgroup2_mount(&mounts),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unified_layout_and_pure_v1() {
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let mounts = parse_cgroup2_mounts(unified.as_bytes()).unwrap();
        assert_eq!(
            select_cgroup2_mount(&mounts),
            Some(Path::new("/sys/fs/cgroup"))
        );

        let v1_only = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert!(parse_cgroup2_mounts(v1_only.as_bytes()).unwrap().is_empty());
    }

    #[test]
    fn subtree_bind_mounts_are_skipped_and_escapes_decoded() {
        let text = "\
50 23 0:26 /system.slice/x.service /run/x/cg rw - cgroup2 cgroup2 rw
51 23 0:26 / /mnt/cgroup\\040two rw - cgroup2 none rw
";
        let mounts = parse_cgroup2_mounts(text.as_bytes()).unwrap();
        assert_eq!(mounts[0].root, Path::new("/system.slice/x.service"));
        assert_eq!(
            select_cgroup2_mount(&mounts),
            Some(Path::new("/mnt/cgroup two"))
        );
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let err =
            parse_cgroup2_mounts(b"23 1 253:0 / / rw - ext4 /dev/vda rw\nnonsense\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse_cgroup2_mounts(b"23 1 253:0 / / rw -\n").is_err());
    }

    #[test]
    fn this_machine_has_a_discoverable_cgroup2_mount() {
        let mount = find_cgroup2_mount()
            .unwrap()
            .expect("cgroup2 is mounted on the test host");
        assert!(mount.join("cgroup.procs").exists(), "{}", mount.display());
        assert!(mount.join("cgroup.controllers").exists());
    }
}
