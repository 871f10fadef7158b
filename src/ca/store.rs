//! The CA directory on disk: `state.json` (certificates and which role each
//! plays) plus one 0600 PKCS#8 PEM file per private key. Every write is a
//! temp file + fsync + rename + directory fsync; `state.json` is written last
//! and is the commit point, so a crash leaves either the old or the new state.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CaError;

pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const STATE_VERSION: u32 = 1;
/// Every key file the CA writes ends so; see `CertificateAuthority`.
pub(crate) const KEY_SUFFIX: &str = ".key.pem";
const DIR_MODE: u32 = 0o700;
const KEY_MODE: u32 = 0o600;
const STATE_MODE: u32 = 0o600;
/// Far above any real state or key file; stops a misplaced huge file from
/// being read into memory.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// The lifecycle position of a key. Shared by every key kind the CA holds:
/// X.509 roots and JWT signing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// Signs new credentials.
    Active,
    /// Published ahead of use, so relying parties know it before it signs.
    Next,
    /// No longer signs, but stays published (and keeps its key for CRLs)
    /// until it expires.
    Retired,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StateFile {
    pub version: u32,
    pub trust_domain: String,
    /// Empty in a state written by upstream mode before any root existed.
    pub x509_authorities: Vec<StoredAuthority>,
    /// Absent in state files written before writ signed JWT-SVIDs.
    #[serde(default)]
    pub jwt_authorities: Vec<StoredJwtKey>,
    /// Roots dropped once they expired, oldest first: certificates only
    /// (their key files are deleted), kept so that audit checkpoints they
    /// signed still verify from this directory. Never published. Absent in
    /// state files written before writ kept them, and while it is empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expired_x509_authorities: Vec<ExpiredAuthority>,
}

/// A root that no longer exists as a key, only as a public certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExpiredAuthority {
    /// The CA certificate, PEM.
    pub certificate: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredAuthority {
    pub role: Role,
    /// The CA certificate, PEM.
    pub certificate: String,
    /// File name (no directory) of its PKCS#8 PEM key inside the CA directory.
    pub key_file: String,
}

/// A JWT signing key. It has no certificate, so its validity window is
/// recorded here (Unix seconds), as the rotation schedule needs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredJwtKey {
    pub role: Role,
    pub key_id: String,
    pub not_before: i64,
    pub not_after: i64,
    /// File name (no directory) of its PKCS#8 PEM key inside the CA directory.
    pub key_file: String,
}

pub(crate) struct CaDir {
    path: PathBuf,
}

impl CaDir {
    /// Creates the directory (0700) if needed; refuses one that group or
    /// others can reach, since it holds the trust domain's root keys.
    pub(crate) fn open_or_create(path: &Path) -> Result<Self, CaError> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(path)
            .map_err(|e| io_err(path, e))?;
        let meta = fs::metadata(path).map_err(|e| io_err(path, e))?;
        if !meta.is_dir() {
            return Err(CaError::CorruptState {
                path: path.to_owned(),
                reason: "not a directory".into(),
            });
        }
        check_private(path, meta.permissions().mode(), DIR_MODE)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Names the directory without creating, checking or reading it, for
    /// a CA that is only ever used in memory (checking upstream files).
    pub(crate) fn unopened(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn state_path(&self) -> PathBuf {
        self.path.join(STATE_FILE)
    }

    /// `Ok(None)` only when there is no state file at all (first start).
    pub(crate) fn read_state(&self) -> Result<Option<StateFile>, CaError> {
        read_state_file(&self.state_path())
    }

    pub(crate) fn write_state(&self, state: &StateFile) -> Result<(), CaError> {
        let mut bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| CaError::Internal(format!("cannot serialise CA state: {e}")))?;
        bytes.push(b'\n');
        self.atomic_write(STATE_FILE, &bytes, STATE_MODE)
    }

    /// Reads a key file named in the state, refusing names that leave the
    /// directory and files that group or others can read.
    pub(crate) fn read_key(&self, name: &str) -> Result<(PathBuf, String), CaError> {
        let path = self.key_path(name)?;
        let text = read_private_text_file(&path)?;
        Ok((path, text))
    }

    /// Names of the key files present in the directory.
    pub(crate) fn key_files(&self) -> Result<Vec<String>, CaError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(|e| io_err(&self.path, e))? {
            let entry = entry.map_err(|e| io_err(&self.path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(KEY_SUFFIX) && !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    pub(crate) fn write_key(&self, name: &str, pem: &str) -> Result<(), CaError> {
        self.key_path(name)?;
        self.atomic_write(name, pem.as_bytes(), KEY_MODE)
    }

    /// Best effort: a leftover key of an expired CA is harmless, so failure
    /// is reported to the caller for logging only.
    pub(crate) fn remove_key(&self, name: &str) -> Result<(), CaError> {
        let path = self.key_path(name)?;
        fs::remove_file(&path).map_err(|e| io_err(&path, e))
    }

    fn key_path(&self, name: &str) -> Result<PathBuf, CaError> {
        let plain = !name.is_empty()
            && name != STATE_FILE
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !plain {
            return Err(CaError::CorruptState {
                path: self.state_path(),
                reason: format!("key file name {name:?} is not a plain file name"),
            });
        }
        Ok(self.path.join(name))
    }

    fn atomic_write(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), CaError> {
        let target = self.path.join(name);
        let tmp = self
            .path
            .join(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| {
            // A stale temp file from a crashed run would make create_new fail.
            match fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            // The umask can only remove bits; set the exact mode regardless.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            file.write_all(bytes)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &target)?;
            File::open(&self.path)?.sync_all()
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&target, e)
        })
    }
}

/// Reads and parses the state file at `path` without touching anything
/// else in its directory; `Ok(None)` when it does not exist.
pub(crate) fn read_state_file(path: &Path) -> Result<Option<StateFile>, CaError> {
    let bytes = match read_limited(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, e)),
    };
    let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| CaError::CorruptState {
        path: path.to_owned(),
        reason: format!("not a valid CA state file: {e}"),
    })?;
    if state.version != STATE_VERSION {
        return Err(CaError::CorruptState {
            path: path.to_owned(),
            reason: format!(
                "state version {} is not supported (this writ reads version {STATE_VERSION})",
                state.version
            ),
        });
    }
    Ok(Some(state))
}

fn read_limited(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// Reads an operator-supplied file writ trusts (upstream CA certificates
/// and roots, the bundle endpoint's certificate) with the same size bound
/// as our own files. Whoever can write it decides what writ trusts and
/// publishes, so it is refused if group or others may write it, or if a
/// user other than writ's or root owns it. The checks are made on the file
/// opened, so they hold for the file read.
pub(crate) fn read_trusted_text_file(path: &Path) -> Result<String, CaError> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let meta = file.metadata().map_err(|e| io_err(path, e))?;
    check_trusted(path, &meta)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_err(path, e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(io_err(
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_FILE_BYTES} bytes"),
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|_| {
        io_err(
            path,
            io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text (expected PEM)"),
        )
    })
}

/// A private key file, writ's own or one an operator supplies (the
/// upstream CA's, the bundle endpoint's): refused if group or others may
/// read or write it, or if a user other than writ's or root owns it (its
/// owner could read it, or swap the key). The checks are made on the file
/// opened, so they hold for the file read.
pub(crate) fn read_private_text_file(path: &Path) -> Result<String, CaError> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let meta = file.metadata().map_err(|e| io_err(path, e))?;
    check_owner(path, &meta)?;
    check_private(path, meta.permissions().mode(), KEY_MODE)?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| io_err(path, e))?;
    Ok(text)
}

/// What a file writ trusts (`meta` of the file opened) must be: owned by
/// writ's user or root, and writable by no one else. Federation's trust
/// files (bootstrap bundles, https_web CA files) are held to it too.
pub(crate) fn check_trusted(path: &Path, meta: &fs::Metadata) -> Result<(), CaError> {
    check_owner(path, meta)?;
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(CaError::WritableTrustFile {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Only writ's own user and root may own a file writ trusts or keeps secret.
fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), CaError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let owner = meta.uid();
    if owner != me && owner != 0 {
        return Err(CaError::ForeignOwner {
            path: path.to_owned(),
            owner,
            me,
        });
    }
    Ok(())
}

fn check_private(path: &Path, mode: u32, want: u32) -> Result<(), CaError> {
    if mode & 0o077 != 0 {
        return Err(CaError::InsecurePermissions {
            path: path.to_owned(),
            mode: mode & 0o7777,
            want,
        });
    }
    Ok(())
}

fn io_err(path: &Path, source: io::Error) -> CaError {
    CaError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_set_exact_modes_and_leave_no_temp_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::open_or_create(&tmp.path().join("ca")).unwrap();
        assert_eq!(
            fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        dir.write_key("k.pem", "secret").unwrap();
        dir.write_key("k.pem", "secret2").unwrap();
        let meta = fs::metadata(dir.path().join("k.pem")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(dir.read_key("k.pem").unwrap().1, "secret2");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["k.pem".to_owned()]);
    }

    #[test]
    fn refuses_loose_permissions_and_odd_names() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ca");
        let dir = CaDir::open_or_create(&path).unwrap();
        dir.write_key("k.pem", "secret").unwrap();
        fs::set_permissions(path.join("k.pem"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            dir.read_key("k.pem"),
            Err(CaError::InsecurePermissions { mode: 0o644, .. })
        ));
        for bad in ["../x", "a/b", ".hidden", "", STATE_FILE] {
            assert!(
                matches!(dir.read_key(bad), Err(CaError::CorruptState { .. })),
                "{bad}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            CaDir::open_or_create(&path),
            Err(CaError::InsecurePermissions { mode: 0o755, .. })
        ));
    }

    /// A trust file may be world-readable but not writable by others; a
    /// private file neither. Both must belong to writ's user or root.
    #[test]
    fn trusted_and_private_files_are_checked_for_mode_and_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("roots.pem");
        fs::write(&path, "pem").unwrap();
        for (mode, ok) in [(0o644, true), (0o444, true), (0o664, false), (0o646, false)] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let read = read_trusted_text_file(&path);
            assert_eq!(read.is_ok(), ok, "{mode:o}: {read:?}");
            if !ok {
                assert!(matches!(read, Err(CaError::WritableTrustFile { .. })));
            }
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private_text_file(&path).unwrap(), "pem");
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            for read in [read_trusted_text_file(&path), read_private_text_file(&path)] {
                let err = read.unwrap_err();
                assert!(
                    matches!(err, CaError::ForeignOwner { owner: 65534, .. }),
                    "{err}"
                );
                assert!(err.to_string().contains("roots.pem"), "{err}");
            }
        }
    }
}
