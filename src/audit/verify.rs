//! Offline verification of a trail: every line's hash, the unbroken chain
//! of `seq` and `prev` across rotated files, every checkpoint's signature
//! and the trust of its certificate (given roots, plus roots the trail's own
//! `ca_rotated` records hand on), and whether the trail was sealed by a
//! close checkpoint. Reports the first broken record by file and line.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::event::X509_AUTHORITIES_DETAIL;
use super::files::{open_snapshot, writer_is_live};
use super::record::{
    CheckpointFacts, LineError, RecordView, ZERO_HASH, checkpoint_message, parse_line, parse_time,
};
use super::recover::MODIFIED_TAIL_MOVED_TO;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Accept a trail that does not end with a close checkpoint even though
    /// no writer holds it (writ crashed, or is about to restart): verify up
    /// to the last complete record and ignore a torn last line. Without
    /// this, such an ending is reported as possible truncation.
    pub allow_open_end: bool,
}

/// How the trail ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrailEnd {
    /// Its last record is a close checkpoint.
    Closed,
    /// A writer holds the trail's lock; the last `unsigned_records` are not
    /// covered by a checkpoint yet.
    Live { unsigned_records: u64 },
    /// Nothing holds it and it was not closed (accepted only with
    /// `allow_open_end`): the last `unsigned_records` could have been
    /// followed by records that were removed.
    Open {
        unsigned_records: u64,
        torn_bytes: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub checkpoints: u64,
    /// The files read, oldest first.
    pub files: Vec<PathBuf>,
    pub last_checkpoint_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub end: TrailEnd,
    /// `audit_started` records that say the run before them ended without
    /// a close checkpoint (a crash, or records cut from its end).
    pub unclean_starts: Vec<u64>,
    /// `audit_started` records that say writ had run with its data directory
    /// before, yet found no trail: the history before them is gone.
    pub missing_trail_starts: Vec<u64>,
    /// `audit_started` records that say the trail ended in whole lines
    /// changed after writ wrote them, which that start moved aside: where
    /// each such record is, and where the lines went. The trail is intact
    /// as it stands, but it was tampered with, so the CLI fails on these.
    pub modified_tail_starts: Vec<ModifiedTailStart>,
    /// Roots trusted because a `ca_rotated` record listed them and a
    /// checkpoint by an already-trusted root followed (beyond those given).
    pub learned_roots: u64,
}

/// See [`VerifyReport::modified_tail_starts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModifiedTailStart {
    pub file: PathBuf,
    /// 1-based.
    pub line: u64,
    pub seq: u64,
    pub moved_to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyErrorKind {
    /// A file could not be read, or there is no trail.
    Io,
    /// A line is not a record (or is incomplete).
    Malformed,
    /// A record's bytes do not match its hash.
    Modified,
    /// `seq`/`prev` do not continue from the record before: records were
    /// removed, inserted or reordered.
    Chain,
    /// A checkpoint is inconsistent or its signature does not verify.
    Checkpoint,
    /// A checkpoint is signed by a certificate the trusted roots do not vouch for.
    Untrusted,
    /// The trail ends without a close checkpoint and nothing is writing it.
    Truncated,
}

/// The first problem found: where (file, 1-based line, seq when known) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is not about one line.
    pub line: u64,
    pub seq: Option<u64>,
    pub kind: VerifyErrorKind,
    pub reason: String,
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Verifies the trail at `path` (its rotated files too) with default
/// options: an unclosed end is an error unless a writer holds the trail.
pub fn verify(
    path: &Path,
    trusted_roots: &[CertificateDer<'_>],
) -> Result<VerifyReport, VerifyError> {
    verify_with(path, trusted_roots, &VerifyOptions::default())
}

pub fn verify_with(
    path: &Path,
    trusted_roots: &[CertificateDer<'_>],
    options: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let fail_io = |file: &Path, e: io::Error| VerifyError {
        file: file.to_owned(),
        line: 0,
        seq: None,
        kind: VerifyErrorKind::Io,
        reason: e.to_string(),
    };
    // Checked before reading: a writer that starts later only appends.
    let live = writer_is_live(path);
    let snapshot = open_snapshot(path).map_err(|e| fail_io(path, e))?;
    if snapshot.is_empty() {
        return Err(VerifyError {
            file: path.to_owned(),
            line: 0,
            seq: None,
            kind: VerifyErrorKind::Io,
            reason: super::files::NO_TRAIL.into(),
        });
    }
    let mut walk = Walk {
        roots: trusted_roots
            .iter()
            .map(|r| r.clone().into_owned())
            .collect(),
        announced: Vec::new(),
        learned_roots: 0,
        trust_cache: HashMap::new(),
        next_seq: 0,
        prev: ZERO_HASH.to_owned(),
        records: 0,
        checkpoints: 0,
        last_checkpoint_seq: None,
        last: None,
        unclean_starts: Vec::new(),
        missing_trail_starts: Vec::new(),
        modified_tail_starts: Vec::new(),
    };
    let mut torn_bytes = 0;
    let last_index = snapshot.len() - 1;
    let mut files = Vec::with_capacity(snapshot.len());
    for (index, (file_path, file)) in snapshot.into_iter().enumerate() {
        files.push(file_path.clone());
        let file_path = &file_path;
        let mut reader = BufReader::new(file);
        let mut line_no = 0u64;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| fail_io(file_path, e))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if line.last() != Some(&b'\n') {
                // The writer keeps zeroed space ready after the last record
                // of the newest file; it holds no record.
                let written = line.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                if index == last_index && written == 0 {
                    break;
                }
                // Only the very end of the trail can be mid-write.
                if index == last_index && (live || options.allow_open_end) {
                    torn_bytes = written as u64;
                    break;
                }
                return Err(VerifyError {
                    file: file_path.clone(),
                    line: line_no,
                    seq: None,
                    kind: VerifyErrorKind::Malformed,
                    reason: if index == last_index {
                        "the last line is incomplete (no newline): a write cut short when writ stopped; writ moves it aside when it next starts (or verify with --allow-open)".into()
                    } else {
                        "the file ends in an incomplete line, but it is not the newest file".into()
                    },
                });
            }
            line.pop();
            walk.record(file_path, line_no, &line)?;
        }
    }

    let end = match &walk.last {
        // Bytes after a close checkpoint were not written by writ's close.
        Some(last) if last.closed && torn_bytes == 0 => TrailEnd::Closed,
        _ => {
            let unsigned_records = match (walk.last_checkpoint_seq, &walk.last) {
                (_, None) => 0,
                (Some(cp), Some(last)) => last.seq - cp,
                (None, Some(last)) => last.seq + 1,
            };
            if live {
                TrailEnd::Live { unsigned_records }
            } else if options.allow_open_end {
                TrailEnd::Open {
                    unsigned_records,
                    torn_bytes,
                }
            } else {
                let last = walk.last.as_ref();
                return Err(VerifyError {
                    file: last.map_or_else(|| files[last_index].clone(), |l| l.file.clone()),
                    line: last.map_or(0, |l| l.line),
                    seq: last.map(|l| l.seq),
                    kind: VerifyErrorKind::Truncated,
                    reason: match walk.last_checkpoint_seq {
                        Some(cp) => format!(
                            "the trail ends here without a close checkpoint and no writ is writing it: records after the last checkpoint (seq {cp}) may have been removed, or writ stopped without closing (a crash); {unsigned_records} record(s) since that checkpoint are unsigned"
                        ),
                        None => "the trail ends here without any checkpoint and no writ is writing it: records may have been removed, or writ stopped without closing (a crash)".into(),
                    },
                });
            }
        }
    };
    Ok(VerifyReport {
        records: walk.records,
        checkpoints: walk.checkpoints,
        files,
        last_checkpoint_seq: walk.last_checkpoint_seq,
        last_seq: walk.last.as_ref().map(|l| l.seq),
        end,
        unclean_starts: walk.unclean_starts,
        missing_trail_starts: walk.missing_trail_starts,
        modified_tail_starts: walk.modified_tail_starts,
        learned_roots: walk.learned_roots,
    })
}

struct LastRecord {
    file: PathBuf,
    line: u64,
    seq: u64,
    closed: bool,
}

/// Validity window of a trusted signing certificate (and its anchor).
type Validity = (SystemTime, SystemTime);

struct Walk {
    /// The roots given, plus those learned from the trail (trust flows
    /// forward: see `learn_announced`).
    roots: Vec<CertificateDer<'static>>,
    /// Roots listed by `ca_rotated` records that no checkpoint by a trusted
    /// root has covered yet, with the seq of the record that listed them.
    announced: Vec<(u64, CertificateDer<'static>)>,
    learned_roots: u64,
    /// Per checkpoint certificate; failures are dropped when roots are learned.
    trust_cache: HashMap<Vec<u8>, Result<Validity, String>>,
    next_seq: u64,
    prev: String,
    records: u64,
    checkpoints: u64,
    last_checkpoint_seq: Option<u64>,
    last: Option<LastRecord>,
    unclean_starts: Vec<u64>,
    missing_trail_starts: Vec<u64>,
    modified_tail_starts: Vec<ModifiedTailStart>,
}

impl Walk {
    fn record(&mut self, file: &Path, line_no: u64, line: &[u8]) -> Result<(), VerifyError> {
        let fail = |seq: Option<u64>, kind, reason: String| VerifyError {
            file: file.to_owned(),
            line: line_no,
            seq,
            kind,
            reason,
        };
        let parsed = parse_line(line).map_err(|e| {
            let kind = match e {
                LineError::Malformed(_) => VerifyErrorKind::Malformed,
                LineError::HashMismatch { .. } => VerifyErrorKind::Modified,
            };
            // The seq of a modified line is a hint only, since it may be
            // the modified part.
            let seq = serde_json::from_slice::<RecordView>(line)
                .ok()
                .map(|v| v.seq);
            fail(seq, kind, e.to_string())
        })?;
        let view = &parsed.view;
        let seq = view.seq;
        if seq != self.next_seq {
            let reason = if self.next_seq == 0 {
                format!(
                    "the trail starts at seq {seq}, not seq 0: the {seq} record(s) before it are missing (was the oldest file removed?)"
                )
            } else if seq > self.next_seq {
                format!(
                    "seq {seq} follows seq {}: {} record(s) are missing before it",
                    self.next_seq - 1,
                    seq - self.next_seq
                )
            } else {
                format!(
                    "seq {seq} where seq {} was expected: records are out of order or repeated",
                    self.next_seq
                )
            };
            return Err(fail(Some(seq), VerifyErrorKind::Chain, reason));
        }
        if view.prev != self.prev {
            return Err(fail(
                Some(seq),
                VerifyErrorKind::Chain,
                format!(
                    "its prev {} is not the hash of the record before it ({}): records were removed, inserted or reordered",
                    view.prev, self.prev
                ),
            ));
        }
        match (&view.checkpoint, view.event.as_str()) {
            (Some(cp), "checkpoint") => {
                self.checkpoint(view, cp)
                    .map_err(|(kind, reason)| fail(Some(seq), kind, reason))?;
                self.checkpoints += 1;
                self.last_checkpoint_seq = Some(seq);
            }
            (None, "checkpoint") => {
                return Err(fail(
                    Some(seq),
                    VerifyErrorKind::Malformed,
                    "a checkpoint record without its checkpoint member".into(),
                ));
            }
            (Some(_), _) => {
                return Err(fail(
                    Some(seq),
                    VerifyErrorKind::Malformed,
                    format!("a {} record carries a checkpoint member", view.event),
                ));
            }
            (None, "ca_rotated") => self.announce(seq, view.detail.as_ref()),
            (None, "audit_started") => {
                let detail = |key: &str| {
                    view.detail
                        .as_ref()
                        .and_then(|d| d.get(key))
                        .and_then(|v| v.as_str())
                };
                match detail("previous_end") {
                    Some("unclean") => self.unclean_starts.push(seq),
                    Some("missing") => self.missing_trail_starts.push(seq),
                    _ => {}
                }
                if let Some(moved_to) = detail(MODIFIED_TAIL_MOVED_TO) {
                    self.modified_tail_starts.push(ModifiedTailStart {
                        file: file.to_owned(),
                        line: line_no,
                        seq,
                        moved_to: moved_to.to_owned(),
                    });
                }
            }
            (None, _) => {}
        }
        self.records += 1;
        self.next_seq = seq + 1;
        self.last = Some(LastRecord {
            file: file.to_owned(),
            line: line_no,
            seq,
            closed: parsed.is_close_checkpoint(),
        });
        self.prev = parsed.hash;
        Ok(())
    }

    fn checkpoint(
        &mut self,
        view: &RecordView,
        cp: &CheckpointFacts,
    ) -> Result<(), (VerifyErrorKind, String)> {
        let bad = |reason: String| (VerifyErrorKind::Checkpoint, reason);
        if cp.records != view.seq
            || cp.head_seq != view.seq.checked_sub(1)
            || cp.head_hash != view.prev
        {
            return Err(bad(format!(
                "the checkpoint claims head seq {:?} with hash {} and {} records, but it follows seq {:?} with hash {}",
                cp.head_seq,
                cp.head_hash,
                cp.records,
                view.seq.checked_sub(1),
                view.prev
            )));
        }
        let signature = BASE64
            .decode(&cp.signature)
            .map_err(|e| bad(format!("the signature is not base64: {e}")))?;
        let certificate = BASE64
            .decode(&cp.certificate)
            .map_err(|e| bad(format!("the certificate is not base64: {e}")))?;
        let message = checkpoint_message(view.seq, &view.time, cp.kind, cp.records, &cp.head_hash);
        check_checkpoint_signature(&certificate, &message, &signature)
            .map_err(|e| bad(format!("the checkpoint signature {e}")))?;
        let at = parse_time(&view.time)
            .ok_or_else(|| bad(format!("its time {:?} is not RFC 3339", view.time)))?;
        let roots = &self.roots;
        let (not_before, not_after) = self
            .trust_cache
            .entry(certificate.clone())
            .or_insert_with(|| trusted_validity(&certificate, roots))
            .clone()
            .map_err(|reason| {
                (
                    VerifyErrorKind::Untrusted,
                    format!(
                        "the checkpoint's signer is not trusted: {reason}; {}",
                        self.untrusted_hint(&certificate)
                    ),
                )
            })?;
        if at < not_before || at > not_after {
            return Err((
                VerifyErrorKind::Untrusted,
                format!(
                    "the checkpoint is dated {}, outside the validity of its certificate (or of the root that issued it)",
                    view.time
                ),
            ));
        }
        self.learn_announced();
        Ok(())
    }

    /// Notes the roots a `ca_rotated` record lists. They are not trusted
    /// yet: the record is only as good as the checkpoint that covers it.
    /// Entries that are not certificates are skipped (they cannot sign).
    fn announce(&mut self, seq: u64, detail: Option<&serde_json::Map<String, serde_json::Value>>) {
        let Some(listed) = detail
            .and_then(|d| d.get(X509_AUTHORITIES_DETAIL))
            .and_then(|v| v.as_array())
        else {
            return;
        };
        for der in listed
            .iter()
            .filter_map(|v| v.as_str())
            .filter_map(|b64| BASE64.decode(b64).ok())
            .filter(|der| parse_cert(der).is_ok())
        {
            let cert = CertificateDer::from(der);
            if !self.roots.contains(&cert) && !self.announced.iter().any(|(_, c)| *c == cert) {
                self.announced.push((seq, cert));
            }
        }
    }

    /// Called once a checkpoint has verified against a trusted root: its
    /// signature covers the whole chain before it, so every root announced
    /// there is now vouched for by a root already trusted.
    fn learn_announced(&mut self) {
        if self.announced.is_empty() {
            return;
        }
        for (_, cert) in self.announced.drain(..) {
            if !self.roots.contains(&cert) {
                self.roots.push(cert);
                self.learned_roots += 1;
            }
        }
        // An earlier failure may succeed against the new roots.
        self.trust_cache.retain(|_, trusted| trusted.is_ok());
    }

    /// The end of an untrusted-signer message: why a root the trail itself
    /// announced does not count yet, or what the operator can do.
    fn untrusted_hint(&self, certificate: &[u8]) -> String {
        let announced_at = self
            .announced
            .iter()
            .find(|(_, root)| trusted_validity(certificate, std::slice::from_ref(root)).is_ok())
            .map(|(seq, _)| *seq);
        match announced_at {
            Some(seq) => format!(
                "the ca_rotated record at seq {seq} lists its root, but no checkpoint signed by an already-trusted root follows that record, so nothing vouches for it; pass that root with --bundle"
            ),
            None => {
                "if it is a root of this CA that is no longer in its state, pass it with --bundle"
                    .into()
            }
        }
    }
}

/// Verifies an ECDSA P-256 SHA-256 signature with the key of `cert_der`.
/// The error completes a sentence starting with "the signature".
pub(crate) fn check_checkpoint_signature(
    cert_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let cert = parse_cert(cert_der).map_err(|e| format!("comes with a certificate that {e}"))?;
    let spki = cert.public_key();
    let algorithm =
        checkpoint_algorithm(spki).ok_or("is by a key of a type checkpoints do not use")?;
    UnparsedPublicKey::new(algorithm, spki.subject_public_key.data.as_ref())
        .verify(message, signature)
        .map_err(|_| "does not verify with the key of its certificate".to_owned())
}

/// How a checkpoint by a key of this type is signed: the way writ's CA (its
/// own P-256 roots, or an upstream intermediate of any of these types)
/// signs with that key.
fn checkpoint_algorithm(
    spki: &SubjectPublicKeyInfo<'_>,
) -> Option<&'static dyn VerificationAlgorithm> {
    let key_alg = &spki.algorithm.algorithm;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if *key_alg == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256) {
        Some(&signature::ECDSA_P256_SHA256_ASN1)
    } else if *key_alg == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_NIST_EC_P384) {
        Some(&signature::ECDSA_P384_SHA384_ASN1)
    } else if *key_alg == OID_PKCS1_RSAENCRYPTION {
        Some(&signature::RSA_PKCS1_2048_8192_SHA256)
    } else if *key_alg == OID_SIG_ED25519 {
        Some(&signature::ED25519)
    } else {
        None
    }
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("has trailing bytes".into()),
        Err(e) => Err(format!("does not parse: {e}")),
    }
}

/// Whether `cert_der` is one of `roots` or is signed by one; on success the
/// window in which both it and its root are valid.
fn trusted_validity(cert_der: &[u8], roots: &[CertificateDer<'_>]) -> Result<Validity, String> {
    let cert = parse_cert(cert_der).map_err(|e| format!("its certificate {e}"))?;
    check_is_ca(&cert)?;
    let own = validity(&cert);
    if roots.iter().any(|r| r.as_ref() == cert_der) {
        return Ok(own);
    }
    for root_der in roots {
        let Ok(root) = parse_cert(root_der) else {
            continue;
        };
        if cert.issuer().as_raw() != root.subject().as_raw() {
            continue;
        }
        if verify_issued_by(&cert, root.public_key()).is_ok() {
            let anchor = validity(&root);
            return Ok((own.0.max(anchor.0), own.1.min(anchor.1)));
        }
    }
    Err(format!(
        "it is signed by a certificate ({}, SHA-256 fingerprint {}) that is neither a trusted root nor issued by one",
        cert.subject(),
        hex::encode(Sha256::digest(cert_der))
    ))
}

/// The validity window of a checkpoint's certificate (`cert_der`) alone, for
/// the writer to refuse dating a checkpoint outside it.
pub(crate) fn certificate_validity(cert_der: &[u8]) -> Result<Validity, String> {
    let cert = parse_cert(cert_der)?;
    Ok(validity(&cert))
}

/// Only a CA certificate may sign checkpoints: every X509-SVID writ issues
/// chains to the same roots, so otherwise any workload's own SVID key could
/// sign a rewritten trail.
fn check_is_ca(cert: &X509Certificate<'_>) -> Result<(), String> {
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let signs_certificates = matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
    if is_ca && signs_certificates {
        return Ok(());
    }
    Err(format!(
        "its certificate ({}) is not a CA certificate (basicConstraints cA=true and keyUsage keyCertSign), so it is not writ's CA; a workload's X509-SVID, for one, is not",
        cert.subject()
    ))
}

fn validity(cert: &X509Certificate<'_>) -> Validity {
    let at = |t: i64| match u64::try_from(t) {
        Ok(s) => SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    };
    let v = cert.validity();
    (at(v.not_before.timestamp()), at(v.not_after.timestamp()))
}

/// Checks the signature on `cert` with `issuer_key`, for the algorithms a
/// CA (ours or an upstream) plausibly uses.
fn verify_issued_by(
    cert: &X509Certificate<'_>,
    issuer_key: &SubjectPublicKeyInfo<'_>,
) -> Result<(), String> {
    let sig_alg = &cert.signature_algorithm.algorithm;
    let key_alg = &issuer_key.algorithm.algorithm;
    let curve = issuer_key
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let ec = *key_alg == OID_KEY_TYPE_EC_PUBLIC_KEY;
    let p256 = ec && curve == Some(OID_EC_P256);
    let p384 = ec && curve == Some(OID_NIST_EC_P384);
    let rsa = *key_alg == OID_PKCS1_RSAENCRYPTION;
    let algorithm: &'static dyn VerificationAlgorithm =
        if *sig_alg == OID_SIG_ECDSA_WITH_SHA256 && p256 {
            &signature::ECDSA_P256_SHA256_ASN1
        } else if *sig_alg == OID_SIG_ECDSA_WITH_SHA256 && p384 {
            &signature::ECDSA_P384_SHA256_ASN1
        } else if *sig_alg == OID_SIG_ECDSA_WITH_SHA384 && p256 {
            &signature::ECDSA_P256_SHA384_ASN1
        } else if *sig_alg == OID_SIG_ECDSA_WITH_SHA384 && p384 {
            &signature::ECDSA_P384_SHA384_ASN1
        } else if *sig_alg == OID_PKCS1_SHA256WITHRSA && rsa {
            &signature::RSA_PKCS1_2048_8192_SHA256
        } else if *sig_alg == OID_PKCS1_SHA384WITHRSA && rsa {
            &signature::RSA_PKCS1_2048_8192_SHA384
        } else if *sig_alg == OID_PKCS1_SHA512WITHRSA && rsa {
            &signature::RSA_PKCS1_2048_8192_SHA512
        } else if *sig_alg == OID_SIG_ED25519 && *key_alg == OID_SIG_ED25519 {
            &signature::ED25519
        } else {
            return Err(format!("unsupported signature algorithm {sig_alg}"));
        };
    UnparsedPublicKey::new(algorithm, issuer_key.subject_public_key.data.as_ref())
        .verify(
            cert.tbs_certificate.as_ref(),
            cert.signature_value.data.as_ref(),
        )
        .map_err(|_| "the certificate's signature does not verify".to_owned())
}

#[cfg(test)]
mod tests {
    //! Trust in checkpoint signers: roots handed on by the trail's own
    //! rotation records, unknown signers, and roots that have since expired.
    //! Real files, real P-256 keys, an injected clock.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::{Duration, UNIX_EPOCH};

    use rcgen::{CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

    use super::*;
    use crate::audit::{AuditEvent, AuditLog, CheckpointSigner, EventKind, KeyPairSigner};
    use crate::config::AuditConfig;

    /// 2020-06-01T00:00:00Z.
    const JUNE_2020: u64 = 1_590_969_600;
    const DAY: u64 = 86_400;

    fn at(secs: u64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
    }

    /// A CA certificate's parameters, valid from `from` for `days`.
    fn root_params(name: &str, from: u64, days: u64) -> CertificateParams {
        let mut params = crate::audit::test_signers::ca_params(name);
        params.not_before = at(from);
        params.not_after = at(from + days * DAY);
        params
    }

    /// A self-signed P-256 root valid from `from` for `days`, and a signer
    /// with its key.
    fn root(name: &str, from: u64, days: u64) -> (KeyPairSigner, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let der = root_params(name, from, days)
            .self_signed(&key)
            .unwrap()
            .der()
            .clone();
        (KeyPairSigner::new(key, der.to_vec()).unwrap(), der)
    }

    /// Signs with the root `active` points at, as a CA does across a rotation.
    struct Rotating {
        signers: Vec<KeyPairSigner>,
        active: Arc<AtomicUsize>,
    }

    impl CheckpointSigner for Rotating {
        fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
            self.signers[self.active.load(Ordering::SeqCst)].sign(message)
        }
    }

    struct Trail {
        _dir: tempfile::TempDir,
        path: PathBuf,
        log: Arc<AuditLog>,
        active: Arc<AtomicUsize>,
        now: Arc<AtomicU64>,
    }

    impl Trail {
        fn open(signers: Vec<KeyPairSigner>, start: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let config = AuditConfig {
                path: dir.path().join("audit.jsonl"),
                max_file_bytes: 64 << 20,
                preallocate_bytes: 1 << 20,
                checkpoint_every: 1000,
                checkpoint_interval: Duration::from_secs(1000 * DAY),
            };
            let active = Arc::new(AtomicUsize::new(0));
            let now = Arc::new(AtomicU64::new(start));
            let clock_now = now.clone();
            let clock: crate::audit::Clock = Arc::new(move || {
                UNIX_EPOCH + Duration::from_secs(clock_now.load(Ordering::SeqCst))
            });
            let signer = Rotating {
                signers,
                active: active.clone(),
            };
            let log = AuditLog::open_with_clock(&config, Arc::new(signer), clock).unwrap();
            Self {
                path: config.path,
                _dir: dir,
                log,
                active,
                now,
            }
        }

        fn issue(&self) {
            self.log
                .append_blocking(AuditEvent::new(EventKind::X509Issued, "c"))
                .unwrap();
        }

        fn announce(&self, roots: &[&CertificateDer<'static>]) -> u64 {
            self.log
                .append_blocking(AuditEvent::new(EventKind::CaRotated, "r").x509_authorities(roots))
                .unwrap()
                .seq
        }

        /// Returns the checkpoint's seq.
        fn checkpoint(&self) -> u64 {
            self.log.checkpoint().unwrap();
            self.last_seq()
        }

        fn last_seq(&self) -> u64 {
            let text = std::fs::read_to_string(&self.path).unwrap();
            // Past the last record: the writer's zeroed space.
            let records = text.trim_end_matches('\0');
            let last: serde_json::Value =
                serde_json::from_str(records.lines().last().unwrap()).unwrap();
            last["seq"].as_u64().unwrap()
        }

        fn switch_to(&self, signer: usize) {
            self.active.store(signer, Ordering::SeqCst);
        }

        fn advance(&self, secs: u64) {
            self.now.fetch_add(secs, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_root_listed_by_a_rotation_record_is_trusted_once_a_trusted_checkpoint_covers_it() {
        let (a, root_a) = root("root A", JUNE_2020 - DAY, 30);
        let (b, root_b) = root("root B", JUNE_2020, 30);
        let trail = Trail::open(vec![a, b], JUNE_2020);
        trail.issue();
        trail.checkpoint();
        // B is published (listed with A), A still signs the next checkpoint.
        trail.announce(&[&root_a, &root_b]);
        trail.issue();
        trail.checkpoint();
        trail.advance(DAY);
        trail.switch_to(1);
        trail.issue();
        trail.checkpoint();
        trail.log.close();

        let report = verify(&trail.path, std::slice::from_ref(&root_a)).unwrap();
        assert_eq!(report.learned_roots, 1);
        assert_eq!(report.checkpoints, 4, "three requested, one close");
        assert_eq!(report.end, TrailEnd::Closed);
        // Given both, nothing needs learning.
        let report = verify(&trail.path, &[root_a, root_b.clone()]).unwrap();
        assert_eq!(report.learned_roots, 0);
        // Trust flows forward only: B alone cannot vouch for A's checkpoints.
        let err = verify(&trail.path, &[root_b]).unwrap_err();
        assert_eq!((err.kind, err.seq), (VerifyErrorKind::Untrusted, Some(2)));
    }

    #[test]
    fn a_root_announced_but_not_yet_vouched_for_is_refused_and_the_record_is_named() {
        // Someone with the file (not the CA key) appends a rotation record
        // naming their own root and a checkpoint signed with it.
        let (a, root_a) = root("root A", JUNE_2020 - DAY, 30);
        let (intruder, intruder_root) = root("intruder", JUNE_2020 - DAY, 30);
        let trail = Trail::open(vec![a, intruder], JUNE_2020);
        trail.issue();
        trail.checkpoint();
        let announced_at = trail.announce(&[&root_a, &intruder_root]);
        trail.switch_to(1);
        let forged = trail.checkpoint();
        trail.log.close();

        let err = verify(&trail.path, std::slice::from_ref(&root_a)).unwrap_err();
        assert_eq!(err.kind, VerifyErrorKind::Untrusted, "{err}");
        assert_eq!(err.seq, Some(forged));
        assert_eq!(err.line, forged + 1);
        assert!(err.reason.contains("intruder"), "{err}");
        assert!(
            err.reason.contains(&format!(
                "the ca_rotated record at seq {announced_at} lists its root"
            )),
            "{err}"
        );
    }

    /// A leaf certificate the CA issued (an X509-SVID: cA=false,
    /// digitalSignature only) and a signer with its key.
    fn leaf_of(root_name: &str, from: u64, days: u64) -> (KeyPairSigner, CertificateDer<'static>) {
        let root_key = KeyPair::generate().unwrap();
        let params = root_params(root_name, from, days);
        let root_der = params.self_signed(&root_key).unwrap().der().clone();
        let issuer = rcgen::Issuer::new(params, root_key);

        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://writ.test/tool".try_into().unwrap(),
        )];
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.not_before = at(from);
        leaf.not_after = at(from + days * DAY);
        let leaf_der = leaf.signed_by(&leaf_key, &issuer).unwrap().der().clone();
        (
            KeyPairSigner::new(leaf_key, leaf_der.to_vec()).unwrap(),
            root_der,
        )
    }

    #[test]
    fn a_checkpoint_signed_by_a_workloads_svid_key_is_refused() {
        // A leaf chains to the trusted root, but only the CA signs
        // checkpoints: a workload holding its own SVID key must not be able
        // to re-sign a rewritten trail.
        let (svid, root_der) = leaf_of("root A", JUNE_2020 - DAY, 30);
        let trail = Trail::open(vec![svid], JUNE_2020);
        trail.issue();
        let forged = trail.checkpoint();
        trail.log.close();

        let err = verify(&trail.path, std::slice::from_ref(&root_der)).unwrap_err();
        assert_eq!(
            (err.kind, err.seq),
            (VerifyErrorKind::Untrusted, Some(forged)),
            "{err}"
        );
        assert!(err.reason.contains("not a CA certificate"), "{err}");
    }

    #[test]
    fn a_checkpoint_by_an_unknown_key_is_named_with_its_fingerprint() {
        let (a, root_a) = root("root A", JUNE_2020 - DAY, 30);
        let (stranger, stranger_root) = root("stranger", JUNE_2020 - DAY, 30);
        let trail = Trail::open(vec![a, stranger], JUNE_2020);
        trail.issue();
        trail.checkpoint();
        trail.issue();
        trail.switch_to(1);
        let unknown = trail.checkpoint();
        trail.switch_to(0);
        trail.log.close();

        let err = verify(&trail.path, std::slice::from_ref(&root_a)).unwrap_err();
        assert_eq!(err.kind, VerifyErrorKind::Untrusted, "{err}");
        assert_eq!((err.seq, err.line), (Some(unknown), unknown + 1));
        let fingerprint = hex::encode(Sha256::digest(stranger_root.as_ref()));
        assert!(err.reason.contains(&fingerprint), "{err}");
        assert!(err.reason.contains("neither a trusted root"), "{err}");
        assert!(err.reason.contains("--bundle"), "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains(&format!("audit.jsonl:{} (seq {unknown})", unknown + 1)),
            "{shown}"
        );
        verify(&trail.path, &[root_a, stranger_root]).unwrap();
    }

    #[test]
    fn a_checkpoint_counts_if_signed_while_its_root_was_valid_however_old() {
        // Both roots expired years before this test runs: what matters for a
        // past checkpoint is that its root was valid when it was signed.
        let (a, root_a) = root("root A", JUNE_2020 - DAY, 30);
        let trail = Trail::open(vec![a], JUNE_2020);
        trail.issue();
        trail.checkpoint();
        trail.advance(10 * DAY);
        trail.issue();
        trail.checkpoint();
        trail.log.close();
        let report = verify(&trail.path, std::slice::from_ref(&root_a)).unwrap();
        assert_eq!(report.checkpoints, 3);

        // A checkpoint dated after its root expired is refused. The writer
        // signs none outside its own certificate's validity, so the signer
        // here is an intermediate that outlives the root that issued it
        // (an upstream CA's, say).
        let root_key = KeyPair::generate().unwrap();
        let late_params = root_params("root L", JUNE_2020 - DAY, 30);
        let late_root = late_params.self_signed(&root_key).unwrap().der().clone();
        let issuer = rcgen::Issuer::new(late_params, root_key);
        let key = KeyPair::generate().unwrap();
        let intermediate = root_params("intermediate of L", JUNE_2020 - DAY, 60)
            .signed_by(&key, &issuer)
            .unwrap();
        let late = KeyPairSigner::new(key, intermediate.der().to_vec()).unwrap();
        let trail = Trail::open(vec![late], JUNE_2020);
        trail.issue();
        trail.checkpoint();
        trail.advance(40 * DAY);
        trail.issue();
        let after_expiry = trail.checkpoint();
        trail.log.close();
        let err = verify(&trail.path, std::slice::from_ref(&late_root)).unwrap_err();
        assert_eq!(
            (err.kind, err.seq),
            (VerifyErrorKind::Untrusted, Some(after_expiry))
        );
        assert!(err.reason.contains("outside the validity"), "{err}");
    }
}
