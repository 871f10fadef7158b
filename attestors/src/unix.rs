//! unix attestor: who the process runs as (uids, gids and their names) and
//! what it runs (executable path and the SHA-256 of the running binary).
//! Both name lookups and digests are cached, since this runs on every RPC.

use std::collections::HashMap;
use std::fmt::Display;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Group, Uid, User};
use sha2::{Digest, Sha256};

use crate::attestor::Attestor;
use crate::error::AttestError;
use crate::process::{PinnedProcess, namespace_of};
use crate::procfs::{self, ProcPaths};
use crate::selector::Selector;
use crate::snapshot::ProcessSnapshot;

/// NSS lookups (files, LDAP, sssd) cost far more than the rest of an
/// attestation; a renamed user is picked up after this long.
const NAME_TTL: Duration = Duration::from_secs(30);
const MAX_CACHED_NAMES: usize = 4096;
const MAX_CACHED_DIGESTS: usize = 1024;
const HASH_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixConfig {
    /// Emit `unix:path:<exe>`.
    pub discover_workload_path: bool,
    /// Executables larger than this get no `unix:sha256` selector.
    pub max_hash_bytes: u64,
    /// Emit `unix:sha256:<hex>`; off when no entry uses it, to save the I/O.
    pub hash_executable: bool,
}

impl Default for UnixConfig {
    fn default() -> Self {
        Self {
            discover_workload_path: true,
            max_hash_bytes: 100 * 1024 * 1024,
            hash_executable: true,
        }
    }
}

#[derive(Debug)]
pub struct UnixAttestor {
    config: UnixConfig,
    users: NameCache,
    groups: NameCache,
    digests: DigestCache,
    /// writ's own mount namespace, to tell callers that share it.
    own_mount_namespace: Option<(u64, u64)>,
}

impl UnixAttestor {
    pub fn new(config: UnixConfig) -> Self {
        Self {
            config,
            users: NameCache::default(),
            groups: NameCache::default(),
            digests: DigestCache::default(),
            own_mount_namespace: namespace_of(std::process::id() as i32, "mnt"),
        }
    }

    /// `attest` with the clock passed in, so tests can drive the name cache.
    pub fn attest_at(
        &self,
        process: &PinnedProcess,
        snapshot: &ProcessSnapshot,
        out: &mut Vec<Selector>,
        now: Instant,
    ) -> Result<(), AttestError> {
        out.push(Selector::with_key("unix", "uid", snapshot.uid));
        if let Some(name) = self.user_name(snapshot.uid, now) {
            out.push(Selector::with_key("unix", "user", name));
        }
        out.push(Selector::with_key("unix", "gid", snapshot.gid));
        if let Some(name) = self.group_name(snapshot.gid, now) {
            out.push(Selector::with_key("unix", "group", name));
        }
        for &gid in &snapshot.supplementary_gids {
            out.push(Selector::with_key("unix", "supplementary_gid", gid));
            if let Some(name) = self.group_name(gid, now) {
                out.push(Selector::with_key("unix", "supplementary_group", name));
            }
        }

        let Some(exe) = &snapshot.exe_path else {
            return Ok(());
        };
        // The executable's path names a file in the caller's mount
        // namespace: in another (which an unprivileged user can make, with a
        // user namespace) any binary can be mounted at any path, so the
        // path would say nothing about what runs. The digest, read through
        // the file itself, still does.
        let same_mounts = self.own_mount_namespace.is_some()
            && namespace_of(process.pid(), "mnt") == self.own_mount_namespace;
        if self.config.discover_workload_path && !same_mounts {
            tracing::debug!(
                pid = process.pid(),
                "caller in another mount namespace: no unix:path selector"
            );
        } else if self.config.discover_workload_path {
            // A non-UTF-8 or control-character path could never equal an
            // entry's selector, so it is left out rather than mangled.
            match exe.to_str() {
                Some(path) if !path.chars().any(char::is_control) => {
                    out.push(Selector::with_key("unix", "path", path));
                }
                _ => {
                    tracing::debug!(pid = process.pid(), exe = ?exe, "executable path not representable as a selector")
                }
            }
        }
        if self.config.hash_executable
            && let Some(digest) = self.executable_digest(process.pid())?
        {
            out.push(Selector::with_key("unix", "sha256", hex::encode(digest)));
        }
        Ok(())
    }

    fn user_name(&self, uid: u32, now: Instant) -> Option<Arc<str>> {
        self.users.get(uid, now, |uid| {
            User::from_uid(Uid::from_raw(uid)).map(|user| user.map(|u| u.name))
        })
    }

    fn group_name(&self, gid: u32, now: Instant) -> Option<Arc<str>> {
        self.groups.get(gid, now, |gid| {
            Group::from_gid(Gid::from_raw(gid)).map(|group| group.map(|g| g.name))
        })
    }

    /// SHA-256 of the binary the process is actually running. Opening
    /// /proc/<pid>/exe reaches that inode even if the path on disk was
    /// deleted or replaced since exec.
    fn executable_digest(&self, pid: i32) -> Result<Option<[u8; 32]>, AttestError> {
        let mut paths = ProcPaths::new(pid);
        let path = paths.file("exe");
        let io_error = |source: io::Error| procfs::io_error(pid, path, source);

        // One stat on the hot path; the hash only on a miss.
        let key = FileKey::of(&std::fs::metadata(path).map_err(io_error)?);
        if let Some(digest) = self.digests.get(&key) {
            return Ok(Some(digest));
        }

        let mut file = File::open(path).map_err(io_error)?;
        let key = FileKey::of(&file.metadata().map_err(io_error)?);
        let max = self.config.max_hash_bytes;
        if key.size > max {
            tracing::warn!(
                pid,
                size = key.size,
                max_hash_bytes = max,
                "executable too large to hash; no unix:sha256 selector"
            );
            return Ok(None);
        }
        let mut hasher = Sha256::new();
        let mut chunk = vec![0u8; HASH_CHUNK];
        let mut total: u64 = 0;
        loop {
            let n = match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e)),
            };
            total += n as u64;
            if total > max {
                tracing::warn!(
                    pid,
                    max_hash_bytes = max,
                    "executable grew past max_hash_bytes while hashing; no unix:sha256 selector"
                );
                return Ok(None);
            }
            hasher.update(&chunk[..n]);
        }
        // A binary rewritten mid-hash would yield a digest of neither
        // version; better no selector than a wrong one.
        if FileKey::of(&file.metadata().map_err(io_error)?) != key {
            tracing::warn!(
                pid,
                "executable changed while being hashed; no unix:sha256 selector"
            );
            return Ok(None);
        }
        let digest: [u8; 32] = hasher.finalize().into();
        self.digests.insert(key, digest);
        Ok(Some(digest))
    }
}

impl Attestor for UnixAttestor {
    fn name(&self) -> &'static str {
        "unix"
    }

    fn attest(
        &self,
        process: &PinnedProcess,
        snapshot: &ProcessSnapshot,
        out: &mut Vec<Selector>,
    ) -> Result<(), AttestError> {
        self.attest_at(process, snapshot, out, Instant::now())
    }
}

/// uid/gid -> name, with negative answers cached too (most service uids have
/// no name in some setups). Lookup failures are not cached.
#[derive(Debug, Default)]
struct NameCache {
    entries: Mutex<HashMap<u32, CachedName>>,
}

#[derive(Debug, Clone)]
struct CachedName {
    looked_up: Instant,
    name: Option<Arc<str>>,
}

impl NameCache {
    fn get<E: Display>(
        &self,
        id: u32,
        now: Instant,
        lookup: impl FnOnce(u32) -> Result<Option<String>, E>,
    ) -> Option<Arc<str>> {
        let fresh = |entry: &CachedName| now.saturating_duration_since(entry.looked_up) < NAME_TTL;
        {
            let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = entries.get(&id).filter(|e| fresh(e)) {
                return entry.name.clone();
            }
        }
        // Looked up without the lock held: a slow NSS backend must not stall
        // every other attestation.
        let name = match lookup(id) {
            Ok(name) => name
                .filter(|n| !n.is_empty() && !n.chars().any(char::is_control))
                .map(Arc::<str>::from),
            Err(error) => {
                tracing::warn!(id, %error, "user/group name lookup failed");
                return None;
            }
        };
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_CACHED_NAMES && !entries.contains_key(&id) {
            entries.retain(|_, e| fresh(e));
            if entries.len() >= MAX_CACHED_NAMES {
                entries.clear();
            }
        }
        entries.insert(
            id,
            CachedName {
                looked_up: now,
                name: name.clone(),
            },
        );
        name
    }
}

/// Identifies file contents without reading them: a write changes mtime and
/// ctime, and ctime cannot be set back from user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Default)]
struct DigestCache {
    entries: Mutex<HashMap<FileKey, [u8; 32]>>,
}

impl DigestCache {
    fn get(&self, key: &FileKey) -> Option<[u8; 32]> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(key).copied()
    }

    fn insert(&self, key: FileKey, digest: [u8; 32]) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        // Stale keys (upgraded binaries) are never hit again; dropping all at
        // the bound is simpler than LRU and costs only re-hashing.
        if entries.len() >= MAX_CACHED_DIGESTS {
            entries.clear();
        }
        entries.insert(key, digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::path::PathBuf;

    fn exe_of(pid: i32) -> PathBuf {
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
    }

    #[test]
    fn names_are_cached_for_the_ttl_then_looked_up_again() {
        let cache = NameCache::default();
        let calls = Cell::new(0);
        let lookup = |id: u32| -> Result<Option<String>, String> {
            calls.set(calls.get() + 1);
            Ok(Some(format!("user{id}")))
        };
        let t0 = Instant::now();
        assert_eq!(cache.get(7, t0, lookup).as_deref(), Some("user7"));
        assert_eq!(
            cache.get(7, t0 + NAME_TTL / 2, lookup).as_deref(),
            Some("user7")
        );
        assert_eq!(calls.get(), 1);
        assert_eq!(
            cache.get(7, t0 + NAME_TTL, lookup).as_deref(),
            Some("user7")
        );
        assert_eq!(calls.get(), 2);
        assert_eq!(cache.get(8, t0, lookup).as_deref(), Some("user8"));
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn absent_names_are_cached_but_failures_are_not() {
        let cache = NameCache::default();
        let calls = Cell::new(0);
        let t0 = Instant::now();
        let absent = |_: u32| -> Result<Option<String>, String> {
            calls.set(calls.get() + 1);
            Ok(None)
        };
        assert_eq!(cache.get(1, t0, absent), None);
        assert_eq!(cache.get(1, t0, absent), None);
        assert_eq!(calls.get(), 1);

        let failing = |_: u32| -> Result<Option<String>, String> {
            calls.set(calls.get() + 1);
            Err("ldap down".into())
        };
        assert_eq!(cache.get(2, t0, failing), None);
        assert_eq!(cache.get(2, t0, failing), None);
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn names_with_control_characters_are_dropped() {
        let cache = NameCache::default();
        let got = cache.get(3, Instant::now(), |_| -> Result<_, String> {
            Ok(Some("a\nb".into()))
        });
        assert_eq!(got, None);
    }

    #[test]
    fn digest_of_own_executable_matches_the_file_and_is_cached() {
        let attestor = UnixAttestor::new(UnixConfig::default());
        let pid = std::process::id() as i32;
        let digest = attestor.executable_digest(pid).unwrap().unwrap();
        let expected: [u8; 32] = Sha256::digest(std::fs::read(exe_of(pid)).unwrap()).into();
        assert_eq!(digest, expected);
        let key = FileKey::of(&std::fs::metadata(exe_of(pid)).unwrap());
        assert_eq!(attestor.digests.get(&key), Some(expected));
    }

    #[test]
    fn oversized_executables_are_not_hashed() {
        let attestor = UnixAttestor::new(UnixConfig {
            max_hash_bytes: 1,
            ..UnixConfig::default()
        });
        assert_eq!(
            attestor
                .executable_digest(std::process::id() as i32)
                .unwrap(),
            None
        );
    }
}
