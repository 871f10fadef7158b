//! Federated bundles on disk: one `federated_bundles` row per trust domain,
//! holding the SPIFFE bundle document, where it came from and when.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};

use super::set::BundleSource;
use crate::bundle::TrustBundle;
use crate::spiffe_id::TrustDomain;
use crate::store::{Store, StoreError};

pub(super) struct StoredBundle {
    pub bundle: TrustBundle,
    pub source: BundleSource,
    pub updated_at: SystemTime,
}

/// A row that could not be read back; it stays in the store untouched.
pub(super) struct UnreadableRow {
    pub trust_domain: String,
    pub reason: String,
}

pub(super) fn load_all(
    store: &Store,
) -> Result<Vec<Result<StoredBundle, UnreadableRow>>, StoreError> {
    store.read(|conn| {
        let mut stmt = conn.prepare(
            "SELECT trust_domain, spiffe_json, source, updated_at FROM federated_bundles ORDER BY trust_domain",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .map(|(name, json, source, updated_at)| {
                let unreadable = |reason: String| UnreadableRow {
                    trust_domain: name.clone(),
                    reason,
                };
                let trust_domain = TrustDomain::new(&name).map_err(|e| unreadable(e.to_string()))?;
                let bundle = TrustBundle::from_spiffe_json(trust_domain, &json)
                    .map_err(|e| unreadable(e.to_string()))?;
                let source = BundleSource::parse(&source)
                    .ok_or_else(|| unreadable(format!("unknown source {source:?}")))?;
                Ok(StoredBundle {
                    bundle,
                    source,
                    updated_at: UNIX_EPOCH + Duration::from_secs(updated_at.max(0) as u64),
                })
            })
            .collect())
    })
}

pub(super) fn save(
    conn: &Connection,
    bundle: &TrustBundle,
    source: BundleSource,
    updated_at: SystemTime,
) -> Result<(), StoreError> {
    let secs = updated_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    conn.execute(
        "INSERT INTO federated_bundles(trust_domain, spiffe_json, source, updated_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(trust_domain) DO UPDATE SET
             spiffe_json = excluded.spiffe_json,
             source = excluded.source,
             updated_at = excluded.updated_at",
        params![
            bundle.trust_domain.name(),
            bundle.to_spiffe_json(),
            source.as_str(),
            secs
        ],
    )?;
    Ok(())
}

/// Returns whether a row was there to delete.
pub(super) fn delete(conn: &Connection, trust_domain: &TrustDomain) -> Result<bool, StoreError> {
    let n = conn.execute(
        "DELETE FROM federated_bundles WHERE trust_domain = ?1",
        params![trust_domain.name()],
    )?;
    Ok(n > 0)
}
