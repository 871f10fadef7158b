//! The trust domain's signing authority: its keys and their rotation (or an
//! upstream intermediate loaded from disk), X.509-SVID signing, and CRLs.
//! State lives in one directory and survives restarts; it is never silently
//! replaced, since that would orphan every SVID already issued.

mod authority;
mod clock;
mod store;
mod upstream;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::CertificateDer;

use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::{self, InvalidDnsName, X509Svid, X509SvidRequest};
use authority::{BACKDATE, SigningAuthority};
use store::{CaDir, Role, StateFile, StoredAuthority};
pub use upstream::UpstreamCaFiles;

/// Lifetime of a self-signed root unless configured otherwise.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// The X509-SVID TTL the rotation schedule plans for unless configured.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    pub trust_domain: TrustDomain,
    /// Where roots and keys are kept, e.g. `<data_dir>/ca`. Unused upstream.
    pub dir: PathBuf,
    /// Lifetime of each self-signed root.
    pub ca_ttl: Duration,
    /// The default X509-SVID TTL: the next root takes over early enough that
    /// the active one can always sign an SVID of this length in full.
    pub svid_ttl: Duration,
    /// Sign with an intermediate from disk instead of our own roots.
    pub upstream: Option<UpstreamCaFiles>,
}

impl CaSettings {
    pub fn new(trust_domain: TrustDomain, dir: PathBuf) -> Self {
        Self {
            trust_domain,
            dir,
            ca_ttl: DEFAULT_CA_TTL,
            svid_ttl: DEFAULT_SVID_TTL,
            upstream: None,
        }
    }
}

/// What a call to [`CertificateAuthority::rotate`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationOutcome {
    /// The published X.509 authorities differ: bundles must be re-sent.
    pub authorities_changed: bool,
    /// A different CA now signs: SVIDs should be re-minted.
    pub signer_changed: bool,
}

/// One revoked certificate, as the store remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedCert {
    pub serial: Vec<u8>,
    /// `X509Svid::issuer_key_id` of the revoked SVID.
    pub issuer_key_id: Vec<u8>,
    pub revoked_at: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid CA settings: {0}")]
    InvalidSettings(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has mode {mode:04o}, open to group or others; it must be {want:04o}", path.display())]
    InsecurePermissions { path: PathBuf, mode: u32, want: u32 },
    #[error(
        "CA state in {} is unusable: {reason}. Nothing was changed; restore the file, or move the directory away to start a new root (SVIDs from the old one will stop verifying)",
        path.display()
    )]
    CorruptState { path: PathBuf, reason: String },
    #[error("upstream CA file {}: {reason}", path.display())]
    Upstream { path: PathBuf, reason: String },
    #[error("{0} is not in trust domain {1}")]
    ForeignTrustDomain(SpiffeId, TrustDomain),
    #[error("{0} is a trust domain ID; an X509-SVID needs a path")]
    LeafWithoutPath(SpiffeId),
    #[error(transparent)]
    InvalidDnsName(#[from] InvalidDnsName),
    #[error("SVID TTL must be at least one second")]
    TtlTooShort,
    #[error("the signing CA cannot sign at {at}: it is valid until {not_after}")]
    SignerExpired { at: String, not_after: String },
    #[error("time is outside the range certificates can express")]
    TimeOutOfRange,
    #[error("CRL validity must be at least one second")]
    CrlValidityTooShort,
    #[error("certificate or CRL encoding failed: {0}")]
    Encode(#[from] rcgen::Error),
    #[error("the system random number generator failed")]
    Rng,
    #[error("internal CA error: {0}")]
    Internal(String),
}

/// One key of the CA and its place in the rotation schedule.
#[derive(Clone)]
struct Entry {
    role: Role,
    key_file: String,
    authority: Arc<SigningAuthority>,
}

enum Mode {
    /// Our own roots, rotated on schedule and persisted in `dir`.
    SelfSigned { dir: CaDir },
    /// An intermediate from disk; the upstream roots are the bundle.
    Upstream { roots: Vec<CertificateDer<'static>> },
}

/// The trust domain's signing authority.
///
/// X.509 roots are the only key kind today. JWT signing keys are meant to sit
/// beside `x509` as a second list of the same `Role`-tagged entries, persisted
/// in `state.json` next to `x509_authorities` and driven by the same
/// prepare/activate/retire schedule in [`CertificateAuthority::rotate`].
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    ca_ttl: Duration,
    svid_ttl: Duration,
    mode: Mode,
    /// Ordered oldest first (by notBefore), which is also the bundle order.
    x509: Vec<Entry>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<String> = self
            .x509
            .iter()
            .map(|e| format!("{:?}:{}", e.role, hex::encode(&e.authority.key_id)))
            .collect();
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain.name())
            .field(
                "mode",
                &match self.mode {
                    Mode::SelfSigned { .. } => "self-signed",
                    Mode::Upstream { .. } => "upstream",
                },
            )
            .field("x509_authorities", &roles)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA state from `settings.dir`, or creates it on first start
    /// (directory 0700, key files 0600, atomic writes), then brings the
    /// rotation schedule up to `now`. Unreadable or inconsistent files are an
    /// error and are left exactly as found. In upstream mode the files named
    /// in `settings.upstream` are loaded and verified instead.
    pub fn load_or_create(settings: CaSettings, now: SystemTime) -> Result<Self, CaError> {
        if settings.svid_ttl < Duration::from_secs(1) {
            return Err(CaError::InvalidSettings(
                "svid_ttl must be at least one second".into(),
            ));
        }
        if let Some(files) = &settings.upstream {
            let up = upstream::load(files, &settings.trust_domain, now)?;
            let ca = Self {
                trust_domain: settings.trust_domain,
                ca_ttl: settings.ca_ttl,
                svid_ttl: settings.svid_ttl,
                mode: Mode::Upstream { roots: up.roots },
                x509: vec![Entry {
                    role: Role::Active,
                    key_file: String::new(),
                    authority: Arc::new(up.signer),
                }],
            };
            ca.check_upstream_issuance(files, now)?;
            return Ok(ca);
        }
        if settings.ca_ttl <= settings.svid_ttl {
            return Err(CaError::InvalidSettings(format!(
                "ca_ttl ({}s) must be longer than svid_ttl ({}s); six times longer or more is recommended",
                settings.ca_ttl.as_secs(),
                settings.svid_ttl.as_secs()
            )));
        }
        let dir = CaDir::open_or_create(&settings.dir)?;
        let x509 = match dir.read_state()? {
            None => {
                // Keys without a state file mean the state was lost, not that
                // this is a first start; a new root would orphan every SVID.
                let stray = dir.key_files()?;
                if !stray.is_empty() {
                    return Err(CaError::CorruptState {
                        path: dir.state_path(),
                        reason: format!(
                            "the file is missing but key files are present ({})",
                            stray.join(", ")
                        ),
                    });
                }
                Vec::new()
            }
            Some(state) => load_entries(&dir, &settings.trust_domain, state)?,
        };
        let mut ca = Self {
            trust_domain: settings.trust_domain,
            ca_ttl: settings.ca_ttl,
            svid_ttl: settings.svid_ttl,
            mode: Mode::SelfSigned { dir },
            x509,
        };
        ca.rotate(now)?;
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn is_upstream(&self) -> bool {
        matches!(self.mode, Mode::Upstream { .. })
    }

    /// notAfter of the CA currently signing.
    pub fn active_not_after(&self) -> SystemTime {
        self.active()
            .map(|a| a.not_after)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Subject key identifier of the CA currently signing.
    pub fn active_key_id(&self) -> &[u8] {
        self.active().map(|a| a.key_id.as_slice()).unwrap_or(&[])
    }

    /// The X.509 authorities to publish: every root held (previous, active,
    /// prepared next; `rotate` drops expired ones), oldest first. Upstream:
    /// the upstream bundle's roots.
    pub fn x509_authorities(&self) -> Vec<CertificateDer<'static>> {
        match &self.mode {
            Mode::Upstream { roots } => roots.clone(),
            Mode::SelfSigned { .. } => self.x509.iter().map(|e| e.authority.cert.clone()).collect(),
        }
    }

    /// Mints an X509-SVID: fresh P-256 key, random serial, notBefore
    /// `now - 10s`, notAfter `min(now + ttl, signer notAfter)`.
    pub fn mint_x509_svid(
        &self,
        req: &X509SvidRequest,
        now: SystemTime,
    ) -> Result<X509Svid, CaError> {
        if req.spiffe_id.trust_domain() != &self.trust_domain {
            return Err(CaError::ForeignTrustDomain(
                req.spiffe_id.clone(),
                self.trust_domain.clone(),
            ));
        }
        if req.spiffe_id.is_trust_domain_id() {
            return Err(CaError::LeafWithoutPath(req.spiffe_id.clone()));
        }
        if req.ttl < Duration::from_secs(1) {
            return Err(CaError::TtlTooShort);
        }
        for name in &req.dns_names {
            svid::validate_dns_name(name)?;
        }
        let signer = self
            .active()
            .ok_or_else(|| CaError::Internal("no active signing CA".into()))?;

        let now_unix = clock::to_unix(now)?;
        let ttl = i64::try_from(req.ttl.as_secs()).unwrap_or(i64::MAX);
        let not_before = now_unix - BACKDATE.as_secs() as i64;
        let not_after = now_unix.saturating_add(ttl).min(signer.not_after_unix);
        if not_after <= now_unix {
            return Err(CaError::SignerExpired {
                at: clock::display(now),
                not_after: clock::display(signer.not_after),
            });
        }

        let key = authority::FreshLeafKey::generate()?;
        let serial = authority::random_serial()?;
        let params = svid::leaf_params(
            &req.spiffe_id,
            &req.dns_names,
            &serial,
            clock::to_offset(not_before)?,
            clock::to_offset(not_after)?,
        )?;
        let leaf = params.signed_by(&key, &signer.issuer)?;
        let mut chain = Vec::with_capacity(1 + signer.chain_tail.len());
        chain.push(CertificateDer::from(leaf));
        chain.extend(signer.chain_tail.iter().cloned());
        Ok(X509Svid::new(
            req.spiffe_id.clone(),
            chain,
            serial.to_vec(),
            signer.key_id.clone(),
            (clock::from_unix(not_before), clock::from_unix(not_after)),
            key.into_pkcs8(),
        ))
    }

    /// Advances the rotation schedule to `now` and persists the result
    /// before returning. Self-signed mode, measured on the active root's
    /// lifetime: at 1/2 a next root (new key) is created and published at
    /// once; at 5/6 (earlier if the active root could no longer sign a full
    /// `svid_ttl` SVID) the next root starts signing and the old one retires;
    /// expired roots are dropped with their keys. Upstream mode has nothing
    /// to rotate: a new intermediate is picked up by loading again.
    pub fn rotate(&mut self, now: SystemTime) -> Result<RotationOutcome, CaError> {
        let Mode::SelfSigned { dir } = &self.mode else {
            return Ok(RotationOutcome::default());
        };
        let before_ids: Vec<Vec<u8>> = self
            .x509
            .iter()
            .map(|e| e.authority.key_id.clone())
            .collect();
        let before_active = self.active().map(|a| a.key_id.clone());

        let mut next_state: Vec<Entry> = self
            .x509
            .iter()
            .filter(|e| !e.authority.is_expired_at(now))
            .cloned()
            .collect();
        let mut created: Vec<Entry> = Vec::new();
        // Each pass makes one transition; two suffice in practice (activate,
        // then prepare), the bound only guards against a degenerate schedule.
        for _ in 0..4 {
            let active = next_state.iter().position(|e| e.role == Role::Active);
            let next = next_state.iter().position(|e| e.role == Role::Next);
            match (active, next) {
                (None, Some(n)) => next_state[n].role = Role::Active,
                (None, None) => {
                    let entry = self.new_root(now)?;
                    created.push(entry.clone());
                    next_state.push(Entry {
                        role: Role::Active,
                        ..entry
                    });
                }
                (Some(a), Some(n)) => {
                    if now < self.activate_at(&next_state[a].authority) {
                        break;
                    }
                    next_state[a].role = Role::Retired;
                    next_state[n].role = Role::Active;
                }
                (Some(a), None) => {
                    if now < self.prepare_at(&next_state[a].authority) {
                        break;
                    }
                    let entry = self.new_root(now)?;
                    created.push(entry.clone());
                    next_state.push(entry);
                }
            }
        }
        next_state.sort_by_key(|e| e.authority.not_before);

        let after_ids: Vec<Vec<u8>> = next_state
            .iter()
            .map(|e| e.authority.key_id.clone())
            .collect();
        let after_active = next_state
            .iter()
            .find(|e| e.role == Role::Active)
            .map(|e| e.authority.key_id.clone());
        let roles_changed = next_state.len() != self.x509.len()
            || next_state
                .iter()
                .zip(&self.x509)
                .any(|(a, b)| a.role != b.role || a.authority.key_id != b.authority.key_id);
        let outcome = RotationOutcome {
            authorities_changed: after_ids != before_ids,
            signer_changed: after_active != before_active,
        };
        if !roles_changed {
            return Ok(outcome);
        }

        // New keys first, then the state file that refers to them (the
        // commit point), then the keys nothing refers to any more.
        for entry in &created {
            dir.write_key(&entry.key_file, &entry.authority.key_pkcs8_pem())?;
        }
        dir.write_state(&StateFile {
            version: store::STATE_VERSION,
            trust_domain: self.trust_domain.name().to_owned(),
            x509_authorities: next_state
                .iter()
                .map(|e| StoredAuthority {
                    role: e.role,
                    certificate: crate::bundle::pem_lf("CERTIFICATE", &e.authority.cert),
                    key_file: e.key_file.clone(),
                })
                .collect(),
        })?;
        for gone in self
            .x509
            .iter()
            .filter(|old| !next_state.iter().any(|e| e.key_file == old.key_file))
        {
            if let Err(e) = dir.remove_key(&gone.key_file) {
                tracing::warn!(error = %e, "could not delete the key of an expired CA");
            }
        }
        self.x509 = next_state;
        Ok(outcome)
    }

    /// When `rotate` next has work to do (may be in the past if overdue).
    pub fn next_rotation_at(&self) -> SystemTime {
        let Some(active) = self.active() else {
            return SystemTime::UNIX_EPOCH;
        };
        if let Mode::Upstream { .. } = self.mode {
            return active.not_after;
        }
        let has_next = self.x509.iter().any(|e| e.role == Role::Next);
        let schedule = if has_next {
            self.activate_at(active)
        } else {
            self.prepare_at(active)
        };
        self.x509
            .iter()
            .map(|e| e.authority.not_after)
            .fold(schedule, SystemTime::min)
    }

    /// Signs one CRL per CA that issued any of `revoked`, each by that CA's
    /// own key (a CRL's issuer must be the certificate's issuer). Entries
    /// whose CA is no longer held are skipped: a CA is only dropped once
    /// expired, and every certificate it issued expired no later.
    pub fn sign_crls(
        &self,
        revoked: &[RevokedCert],
        crl_number: u64,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Vec<Vec<u8>>, CaError> {
        if validity < Duration::from_secs(1) {
            return Err(CaError::CrlValidityTooShort);
        }
        let now_unix = clock::to_unix(now)?;
        let this_update = clock::to_offset(now_unix)?;
        let next_update = clock::to_offset(
            now_unix.saturating_add(i64::try_from(validity.as_secs()).unwrap_or(i64::MAX)),
        )?;
        let mut crls = Vec::new();
        for entry in &self.x509 {
            let ca = &entry.authority;
            let revoked_certs = revoked
                .iter()
                .filter(|r| r.issuer_key_id == ca.key_id)
                .map(|r| {
                    Ok(RevokedCertParams {
                        serial_number: SerialNumber::from_slice(&r.serial),
                        revocation_time: clock::to_offset(clock::to_unix(r.revoked_at)?)?,
                        reason_code: None,
                        invalidity_date: None,
                    })
                })
                .collect::<Result<Vec<_>, CaError>>()?;
            if revoked_certs.is_empty() {
                continue;
            }
            let params = CertificateRevocationListParams {
                this_update,
                next_update,
                crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
                issuing_distribution_point: None,
                revoked_certs,
                key_identifier_method: KeyIdMethod::PreSpecified(ca.key_id.clone()),
            };
            crls.push(params.signed_by(&ca.issuer)?.der().to_vec());
        }
        Ok(crls)
    }

    fn active(&self) -> Option<&SigningAuthority> {
        self.x509
            .iter()
            .find(|e| e.role == Role::Active)
            .map(|e| e.authority.as_ref())
    }

    fn new_root(&self, now: SystemTime) -> Result<Entry, CaError> {
        let authority = authority::create_root(&self.trust_domain, now, self.ca_ttl)?;
        Ok(Entry {
            role: Role::Next,
            key_file: format!(
                "x509-{}{}",
                hex::encode(&authority.key_id),
                store::KEY_SUFFIX
            ),
            authority: Arc::new(authority),
        })
    }

    fn prepare_at(&self, active: &SigningAuthority) -> SystemTime {
        fraction_of_life(active, 1, 2).min(self.activate_at(active))
    }

    fn activate_at(&self, active: &SigningAuthority) -> SystemTime {
        let last_full_svid = active
            .not_after
            .checked_sub(self.svid_ttl)
            .unwrap_or(active.not_before)
            .max(active.not_before);
        fraction_of_life(active, 5, 6).min(last_full_svid)
    }

    /// Mints one SVID with the upstream signer and verifies it the way a
    /// relying party would, so any mismatch between the files (or an issuer
    /// name rcgen cannot reproduce byte for byte) fails the start-up.
    fn check_upstream_issuance(
        &self,
        files: &UpstreamCaFiles,
        now: SystemTime,
    ) -> Result<(), CaError> {
        let probe_id = self
            .trust_domain
            .spiffe_id("/writ/upstream-check")
            .map_err(|e| CaError::Internal(format!("probe SPIFFE ID: {e}")))?;
        let probe = self.mint_x509_svid(
            &X509SvidRequest {
                spiffe_id: probe_id,
                ttl: Duration::from_secs(60),
                dns_names: Vec::new(),
            },
            now,
        )?;
        let fail = |reason: String| CaError::Upstream {
            path: files.cert.clone(),
            reason,
        };
        let leaf = probe
            .leaf()
            .ok_or_else(|| CaError::Internal("probe SVID has no leaf".into()))?;
        svid::check_leaf_conformance(leaf).map_err(|v| {
            fail(format!(
                "an SVID signed with it breaks X509-SVID rules: {v}"
            ))
        })?;
        let roots = self.x509_authorities();
        svid::verify_chain(&probe.cert_chain, &roots, now).map_err(|e| {
            fail(format!(
                "an SVID signed with it does not verify against {}: {e}",
                files.bundle.display()
            ))
        })
    }
}

fn fraction_of_life(a: &SigningAuthority, num: u32, den: u32) -> SystemTime {
    let life = a.not_after.duration_since(a.not_before).unwrap_or_default();
    a.not_before + life * num / den
}

/// Rebuilds the entries of a state file, checking that each certificate is
/// a root of this trust domain, that its key file is private and matches,
/// and that the roles make sense.
fn load_entries(
    dir: &CaDir,
    trust_domain: &TrustDomain,
    state: StateFile,
) -> Result<Vec<Entry>, CaError> {
    let corrupt = |reason: String| CaError::CorruptState {
        path: dir.state_path(),
        reason,
    };
    if state.trust_domain != trust_domain.name() {
        return Err(corrupt(format!(
            "it belongs to trust domain {:?}, but {trust_domain} is configured",
            state.trust_domain
        )));
    }
    let mut entries = Vec::with_capacity(state.x509_authorities.len());
    for stored in state.x509_authorities {
        let block = pem::parse(&stored.certificate)
            .map_err(|e| corrupt(format!("a certificate is not valid PEM: {e}")))?;
        let cert = CertificateDer::from(block.into_contents());
        let id = svid::check_signing_cert_conformance(&cert)
            .map_err(|v| corrupt(format!("a root is not a valid signing certificate: {v}")))?;
        if id.as_ref().map(SpiffeId::trust_domain) != Some(trust_domain) {
            return Err(corrupt(format!(
                "a root does not carry the SPIFFE ID spiffe://{trust_domain}"
            )));
        }
        let (key_path, key_text) = dir.read_key(&stored.key_file)?;
        let key =
            authority::key_from_pem(&key_text, None).map_err(|reason| CaError::CorruptState {
                path: key_path.clone(),
                reason,
            })?;
        let authority = SigningAuthority::new(cert, key, Vec::new()).map_err(|reason| {
            CaError::CorruptState {
                path: key_path,
                reason,
            }
        })?;
        entries.push(Entry {
            role: stored.role,
            key_file: stored.key_file,
            authority: Arc::new(authority),
        });
    }
    let count = |role| entries.iter().filter(|e| e.role == role).count();
    if count(Role::Active) != 1 || count(Role::Next) > 1 {
        return Err(corrupt(format!(
            "expected one active and at most one next root, found {} and {}",
            count(Role::Active),
            count(Role::Next)
        )));
    }
    let mut files: Vec<&str> = entries.iter().map(|e| e.key_file.as_str()).collect();
    files.sort_unstable();
    files.dedup();
    if files.len() != entries.len() {
        return Err(corrupt("two roots share a key file".into()));
    }
    entries.sort_by_key(|e| e.authority.not_before);
    Ok(entries)
}

#[cfg(test)]
mod tests;
