//! The tamper-evident audit trail: one hash-chained JSON Lines record per
//! security event, appended durably (concurrent appends share an fsync),
//! periodically sealed by a CA-signed checkpoint, rotated by size, and
//! verified offline. The record format is specified in `docs/audit.md`.

mod event;
mod files;
mod log;
mod record;
mod recover;
pub(crate) mod verify;

pub use event::{AuditEvent, CallerFacts, EventKind, TaskFacts};
pub use files::{TrailTail, tail_lines, trail_files};
pub(crate) use files::{lock_exclusively, lock_path, writer_is_live};
pub use log::{AuditLog, AuditReceipt, Clock};
pub use record::{CheckpointFacts, CheckpointKind, ZERO_HASH, checkpoint_message};
pub use verify::{
    ModifiedTailStart, TrailEnd, VerifyError, VerifyErrorKind, VerifyOptions, VerifyReport,
};
pub use verify::{verify, verify_with};

use std::path::PathBuf;

/// Signs checkpoints. writ implements it for its CA (ECDSA P-256 over
/// SHA-256 with the CA's active key); tests bring their own keys.
///
/// `sign` runs while the trail's lock is held, in whichever thread appends
/// (or in the trail's background thread), so it must never take a lock
/// that an appender may hold while appending (writ's CA lock, for one):
/// that could deadlock.
pub trait CheckpointSigner: Send + Sync {
    /// Returns (DER ECDSA signature, DER certificate of the signing key).
    fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String>;
}

/// A [`CheckpointSigner`] over an rcgen key pair and its certificate. The
/// key signs as `verify` expects for its type: ECDSA P-256 with SHA-256,
/// P-384 with SHA-384, RSA PKCS#1 v1.5 with SHA-256, or Ed25519.
pub struct KeyPairSigner {
    key: rcgen::KeyPair,
    certificate: Vec<u8>,
}

impl KeyPairSigner {
    pub fn new(key: rcgen::KeyPair, certificate_der: Vec<u8>) -> Result<Self, AuditError> {
        let usable = [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_RSA_SHA256,
            &rcgen::PKCS_ED25519,
        ];
        if !usable.contains(&key.algorithm()) {
            return Err(AuditError::Signer(
                "checkpoint keys sign with ECDSA P-256/SHA-256, P-384/SHA-384, RSA PKCS#1 v1.5/SHA-256 or Ed25519".into(),
            ));
        }
        Ok(Self {
            key,
            certificate: certificate_der,
        })
    }
}

impl std::fmt::Debug for KeyPairSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key; the certificate is public but long.
        f.debug_struct("KeyPairSigner")
            .field("certificate_bytes", &self.certificate.len())
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner for KeyPairSigner {
    fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        use rcgen::SigningKey;
        let signature = self
            .key
            .sign(message)
            .map_err(|e| format!("signing a checkpoint failed: {e}"))?;
        Ok((signature, self.certificate.clone()))
    }
}

/// Why the audit trail could not be opened or written. Every variant means
/// the operation being audited must fail (the caller answers Unavailable).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "audit trail {} is in use by another process (lock {} is held)",
        path.display(),
        lock.display()
    )]
    Locked { path: PathBuf, lock: PathBuf },
    #[error(
        "audit trail {}:{line} cannot be continued: {reason}. Nothing was changed; run `writ audit verify`",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error(
        "audit trail {}: the file holds {bytes} bytes but not one audit record, and does not begin like one: it does not look like a writ audit trail (is [audit] path right?). Nothing was changed",
        path.display()
    )]
    NotATrail { path: PathBuf, bytes: u64 },
    #[error("writing the audit trail failed: {0}")]
    Write(String),
    #[error(
        "the audit trail is unavailable after a failed fsync ({0}); restart writ once the disk is healthy"
    )]
    Poisoned(String),
    #[error("the audit trail is closed")]
    Closed,
    #[error(
        "audit trail {}: the file at this path is no longer the one writ appends to (it was moved, replaced or removed); records since went to the file writ holds open, and a restart continues the trail from the path",
        path.display()
    )]
    Displaced { path: PathBuf },
    #[error("checkpoint signer: {0}")]
    Signer(String),
    #[error("invalid audit event: {0}")]
    InvalidEvent(String),
}

/// Checkpoint signers for the trail's own tests.
#[cfg(test)]
pub(crate) mod test_signers {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::CertificateDer;

    use super::KeyPairSigner;

    /// A CA certificate's parameters (cA, keyCertSign), as writ's roots
    /// have: verify takes checkpoints from no other kind of certificate.
    pub fn ca_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    /// A signer with a fresh self-signed CA root, and that root.
    pub fn ca_signer() -> (Arc<KeyPairSigner>, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let der = ca_params("writ test root")
            .self_signed(&key)
            .unwrap()
            .der()
            .clone();
        (
            Arc::new(KeyPairSigner::new(key, der.to_vec()).unwrap()),
            der,
        )
    }
}
