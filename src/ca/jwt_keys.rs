//! The CA's JWT signing keys as the schedule and the state file see them:
//! creating one with its validity window, and loading stored ones back with
//! the same checks X.509 roots get (private key file, consistent roles).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::authority::BACKDATE;
use super::schedule::Scheduled;
use super::store::{self, CaDir, Role, StoredJwtKey};
use super::{CaError, clock};
use crate::jwt::JwtSigningKey;

/// 9999-12-31T23:59:59Z, the last second a certificate can express; JWT
/// key windows stay in the same range so schedule arithmetic cannot overflow.
const LAST_EXPRESSIBLE_SECOND: i64 = 253_402_300_799;

/// One JWT signing key and its place in the rotation schedule.
#[derive(Clone)]
pub(crate) struct JwtEntry {
    pub(crate) role: Role,
    pub(crate) key_file: String,
    pub(crate) not_before: SystemTime,
    /// Tokens it signs expire no later than this.
    pub(crate) not_after: SystemTime,
    pub(crate) not_after_unix: i64,
    pub(crate) key: Arc<JwtSigningKey>,
}

impl Scheduled for JwtEntry {
    fn role(&self) -> Role {
        self.role
    }
    fn set_role(&mut self, role: Role) {
        self.role = role;
    }
    fn not_before(&self) -> SystemTime {
        self.not_before
    }
    fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// A fresh key, valid for `life` from now. Its window starts `BACKDATE`
/// early, exactly like a root created at the same instant, so JWT keys and
/// roots created together also rotate together (one bundle change, not two).
pub(crate) fn create(now: SystemTime, life: Duration) -> Result<JwtEntry, CaError> {
    let key = JwtSigningKey::generate()?;
    let now_unix = clock::to_unix(now)?;
    let life_secs = i64::try_from(life.as_secs()).map_err(|_| CaError::TimeOutOfRange)?;
    let not_before_unix = now_unix - BACKDATE.as_secs() as i64;
    let not_after_unix = now_unix
        .checked_add(life_secs)
        .filter(|t| *t <= LAST_EXPRESSIBLE_SECOND)
        .ok_or(CaError::TimeOutOfRange)?;
    Ok(JwtEntry {
        role: Role::Next,
        key_file: key_file_name(key.key_id()),
        not_before: clock::from_unix(not_before_unix),
        not_after: clock::from_unix(not_after_unix),
        not_after_unix,
        key: Arc::new(key),
    })
}

fn key_file_name(key_id: &str) -> String {
    format!("jwt-{key_id}{}", store::KEY_SUFFIX)
}

pub(crate) fn to_stored(entry: &JwtEntry) -> Result<StoredJwtKey, CaError> {
    Ok(StoredJwtKey {
        role: entry.role,
        key_id: entry.key.key_id().to_owned(),
        not_before: clock::to_unix(entry.not_before)?,
        not_after: entry.not_after_unix,
        key_file: entry.key_file.clone(),
    })
}

/// Rebuilds the JWT keys of a state file. Each key file must be private and
/// hold a P-256 key; the roles must leave at most one active and one next
/// key. An empty list is fine: the schedule creates the first key.
pub(crate) fn load(dir: &CaDir, stored: Vec<StoredJwtKey>) -> Result<Vec<JwtEntry>, CaError> {
    let corrupt = |reason: String| CaError::CorruptState {
        path: dir.state_path(),
        reason,
    };
    let mut entries = Vec::with_capacity(stored.len());
    for s in stored {
        if !(0..=LAST_EXPRESSIBLE_SECOND).contains(&s.not_before)
            || !(0..=LAST_EXPRESSIBLE_SECOND).contains(&s.not_after)
            || s.not_after <= s.not_before
        {
            return Err(corrupt(format!(
                "JWT key {:?} has an impossible validity window",
                s.key_id
            )));
        }
        let (key_path, key_text) = dir.read_key(&s.key_file)?;
        let bad_file = |reason: String| CaError::CorruptState {
            path: key_path.clone(),
            reason,
        };
        let block =
            pem::parse(&key_text).map_err(|e| bad_file(format!("not a valid PEM key: {e}")))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(bad_file(format!(
                "holds a {:?} block, expected PRIVATE KEY",
                block.tag()
            )));
        }
        let key = JwtSigningKey::from_pkcs8(&s.key_id, block.contents())
            .map_err(|e| bad_file(e.to_string()))?;
        entries.push(JwtEntry {
            role: s.role,
            key_file: s.key_file,
            not_before: clock::from_unix(s.not_before),
            not_after: clock::from_unix(s.not_after),
            not_after_unix: s.not_after,
            key: Arc::new(key),
        });
    }
    let count = |role| entries.iter().filter(|e| e.role == role).count();
    if !entries.is_empty() && (count(Role::Active) != 1 || count(Role::Next) > 1) {
        return Err(corrupt(format!(
            "expected one active and at most one next JWT key, found {} and {}",
            count(Role::Active),
            count(Role::Next)
        )));
    }
    let mut ids: Vec<&str> = entries.iter().map(|e| e.key.key_id()).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != entries.len() {
        return Err(corrupt("two JWT keys share a key ID".into()));
    }
    entries.sort_by_key(|e| e.not_before);
    Ok(entries)
}
