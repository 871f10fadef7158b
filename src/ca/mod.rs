//! The trust domain's signing authority: its X.509 roots (or an upstream
//! intermediate loaded from disk) and its JWT signing keys, their rotation,
//! X.509-SVID and JWT-SVID signing, and CRLs. State lives in one directory
//! and survives restarts; it is never silently replaced, since that would
//! orphan every SVID already issued.

mod authority;
mod clock;
mod crl;
mod jwt_keys;
mod revocation_list;
mod schedule;
mod store;
mod upstream;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::CertificateDer;

use crate::bundle::JwtAuthority;
use crate::jwt::{self, JwtKeyError, JwtSvid, JwtSvidPlan, JwtSvidRequest};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::{self, InvalidDnsName, X509Svid, X509SvidPlan, X509SvidRequest};
use authority::{BACKDATE, SigningAuthority};
use jwt_keys::JwtEntry;
pub use revocation_list::RevocationList;
pub use schedule::{NOT_BEFORE_ALLOWANCE, not_yet_valid};
use schedule::{Schedule, Scheduled};
use store::{CaDir, ExpiredAuthority, Role, StateFile, StoredAuthority};
pub(crate) use store::{STATE_FILE, check_trusted, read_private_text_file, read_trusted_text_file};
pub use upstream::UpstreamCaFiles;

/// Lifetime of a self-signed root unless configured otherwise.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// The X509-SVID TTL the rotation schedule plans for unless configured.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// The JWT-SVID TTL unless configured (`ca.jwt_svid_ttl`).
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(300);
/// The shortest lifetime the CA signs an SVID for.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(1);
/// How many expired roots the state keeps for audit verification, newest
/// last. About 700 bytes each, so the state stays far below the size limit
/// it is read with; at the default TTL (a new root every 20 hours) that is
/// over four years of history. Older ones must be passed with `--bundle`.
const MAX_EXPIRED_ROOTS: usize = 2000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    pub trust_domain: TrustDomain,
    /// Where roots and keys are kept, e.g. `<data_dir>/ca`. Upstream, it
    /// holds the JWT signing keys only.
    pub dir: PathBuf,
    /// Lifetime of each self-signed root, and of each JWT signing key.
    pub ca_ttl: Duration,
    /// The default X509-SVID TTL: the next root takes over early enough that
    /// the active one can always sign an SVID of this length in full.
    pub svid_ttl: Duration,
    /// The JWT-SVID TTL; JWT keys rotate so that the active one can always
    /// sign a token of this length, and stay published this long after.
    pub jwt_svid_ttl: Duration,
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
            jwt_svid_ttl: DEFAULT_JWT_SVID_TTL,
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
    /// The published JWT authorities differ: bundles must be re-sent.
    pub jwt_authorities_changed: bool,
    /// A root that no bundle has carried yet signs from now on: the one
    /// before it expired while writ was down, or is dated in the future
    /// (made while the clock ran ahead), so nothing else could sign.
    /// Federated peers must fetch writ's bundle again (by hand for
    /// https_spiffe, whose endpoint certificate the new root now signs).
    pub x509_signer_unpublished: bool,
    /// The same for the JWT signing key: peers reject its tokens until
    /// they fetch writ's bundle again.
    pub jwt_signer_unpublished: bool,
}

/// One issuer's next CRL, made while the revocation list is held and signed
/// after it is released (`CertificateAuthority::prepare_crls`).
pub struct PreparedCrl {
    issuer_key_id: Vec<u8>,
    body: PreparedCrlBody,
}

enum PreparedCrlBody {
    /// ECDSA P-256 CAs: the TBS, encoded directly.
    Encoded(crl::UnsignedCrl),
    /// Any other CA key (an upstream RSA intermediate): the general builder.
    General(CertificateRevocationListParams),
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
        "{} has mode {mode:04o}, writable by group or others, who could change what writ trusts and publishes; remove their write permission (e.g. chmod 0644)",
        path.display()
    )]
    WritableTrustFile { path: PathBuf, mode: u32 },
    #[error(
        "{} is owned by uid {owner}, who could change it; it must be owned by the user writ runs as (uid {me}) or by root",
        path.display()
    )]
    ForeignOwner { path: PathBuf, owner: u32, me: u32 },
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
    #[error("the signing CA cannot sign at {at}: it is not valid until {not_before}")]
    SignerNotYetValid { at: String, not_before: String },
    #[error("time is outside the range certificates can express")]
    TimeOutOfRange,
    #[error("CRL validity must be at least one second")]
    CrlValidityTooShort,
    #[error("CRL: {0}")]
    Crl(String),
    #[error("certificate or CRL encoding failed: {0}")]
    Encode(#[from] rcgen::Error),
    #[error("the system random number generator failed")]
    Rng,
    #[error("invalid JWT-SVID request: {0}")]
    InvalidJwtRequest(String),
    #[error("JWT signing: {0}")]
    JwtKey(#[from] JwtKeyError),
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

/// The active signing key, kept apart from the CA for signing audit
/// checkpoints (see [`CertificateAuthority::checkpoint_key`]).
#[derive(Clone)]
pub struct CheckpointKey(Arc<SigningAuthority>);

impl CheckpointKey {
    /// Returns (DER ECDSA signature over `message`, the key's certificate).
    pub fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        use rcgen::SigningKey;
        let signature = self
            .0
            .issuer
            .key()
            .sign(message)
            .map_err(|e| format!("signing a checkpoint: {e}"))?;
        Ok((signature, self.0.cert.to_vec()))
    }
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CheckpointKey")
            .field("key_id", &hex::encode(&self.0.key_id))
            .finish_non_exhaustive()
    }
}

enum Mode {
    /// Our own roots, rotated on schedule and persisted in `dir`.
    SelfSigned,
    /// An intermediate from disk; the upstream roots are the bundle. Roots a
    /// self-signed run left in the state file are kept there untouched, so
    /// switching back finds them.
    Upstream {
        roots: Vec<CertificateDer<'static>>,
        stored_x509: Vec<StoredAuthority>,
    },
}

/// The trust domain's signing authority.
///
/// Two key kinds, each a list of `Role`-tagged entries driven by the same
/// prepare/activate/retire [`Schedule`] in [`CertificateAuthority::rotate`]
/// and persisted together in `state.json`: X.509 roots (self-signed mode
/// only) and JWT signing keys (both modes; an upstream CA signs no JWTs).
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    ca_ttl: Duration,
    svid_ttl: Duration,
    jwt_svid_ttl: Duration,
    mode: Mode,
    dir: CaDir,
    /// Ordered oldest first (by notBefore), which is also the bundle order.
    x509: Vec<Entry>,
    /// Ordered oldest first, which is also the bundle order.
    jwt: Vec<JwtEntry>,
    /// Roots dropped after they expired, oldest first: public certificates
    /// only, for verifying audit checkpoints they signed. Never published.
    expired_x509: Vec<CertificateDer<'static>>,
    /// What the schedule changed while loading, so the caller can record it
    /// once the audit trail is open.
    rotated_at_load: RotationOutcome,
}

impl Scheduled for Entry {
    fn role(&self) -> Role {
        self.role
    }
    fn set_role(&mut self, role: Role) {
        self.role = role;
    }
    fn not_before(&self) -> SystemTime {
        self.authority.not_before
    }
    fn not_after(&self) -> SystemTime {
        self.authority.not_after
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<String> = self
            .x509
            .iter()
            .map(|e| format!("{:?}:{}", e.role, hex::encode(&e.authority.key_id)))
            .collect();
        let jwt_roles: Vec<String> = self
            .jwt
            .iter()
            .map(|e| format!("{:?}:{}", e.role, e.key.key_id()))
            .collect();
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain.name())
            .field(
                "mode",
                &match self.mode {
                    Mode::SelfSigned => "self-signed",
                    Mode::Upstream { .. } => "upstream",
                },
            )
            .field("x509_authorities", &roles)
            .field("jwt_authorities", &jwt_roles)
            .field("expired_x509_authorities", &self.expired_x509.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA state from `settings.dir`, or creates it on first start
    /// (directory 0700, key files 0600, atomic writes), then brings the
    /// rotation schedule up to `now`. Unreadable or inconsistent files are an
    /// error and are left exactly as found. In upstream mode the files named
    /// in `settings.upstream` are loaded and verified instead of roots; the
    /// directory then holds the JWT signing keys only.
    pub fn load_or_create(settings: CaSettings, now: SystemTime) -> Result<Self, CaError> {
        // Upstream files are read and checked before anything is written.
        let upstream = Self::checked_upstream(&settings, now)?;
        let dir = CaDir::open_or_create(&settings.dir)?;
        let state = match dir.read_state()? {
            Some(state) => state,
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
                StateFile {
                    version: store::STATE_VERSION,
                    trust_domain: settings.trust_domain.name().to_owned(),
                    x509_authorities: Vec::new(),
                    jwt_authorities: Vec::new(),
                    expired_x509_authorities: Vec::new(),
                }
            }
        };
        if state.trust_domain != settings.trust_domain.name() {
            return Err(CaError::CorruptState {
                path: dir.state_path(),
                reason: format!(
                    "it belongs to trust domain {:?}, but {} is configured",
                    state.trust_domain, settings.trust_domain
                ),
            });
        }
        let jwt = jwt_keys::load(&dir, state.jwt_authorities)?;
        let expired_x509 =
            load_expired(&dir, &settings.trust_domain, state.expired_x509_authorities)?;
        let (mode, x509) = match &upstream {
            Some(up) => (
                Mode::Upstream {
                    roots: up.roots.clone(),
                    stored_x509: state.x509_authorities,
                },
                Vec::new(),
            ),
            None => (
                Mode::SelfSigned,
                load_entries(&dir, &settings.trust_domain, state.x509_authorities)?,
            ),
        };
        let mut files: Vec<&str> = x509
            .iter()
            .map(|e| e.key_file.as_str())
            .chain(jwt.iter().map(|e| e.key_file.as_str()))
            .collect();
        let count = files.len();
        files.sort_unstable();
        files.dedup();
        if files.len() != count {
            return Err(CaError::CorruptState {
                path: dir.state_path(),
                reason: "two keys share a key file".into(),
            });
        }
        let mut ca = Self {
            trust_domain: settings.trust_domain,
            ca_ttl: settings.ca_ttl,
            svid_ttl: settings.svid_ttl,
            jwt_svid_ttl: settings.jwt_svid_ttl,
            mode,
            dir,
            x509,
            jwt,
            expired_x509,
            rotated_at_load: RotationOutcome::default(),
        };
        if let Some(up) = upstream {
            ca.x509 = vec![Entry {
                role: Role::Active,
                key_file: String::new(),
                authority: up.signer,
            }];
        }
        ca.rotated_at_load = ca.rotate(now)?;
        Ok(ca)
    }

    /// Checks `settings` as [`CertificateAuthority::load_or_create`] does
    /// before it touches the CA directory: the lifetimes and, in upstream
    /// mode, the files (see `checked_upstream`). Nothing in `settings.dir`
    /// is read or written, so it answers for a config alone (`writ
    /// validate`).
    pub fn check_settings(settings: &CaSettings, now: SystemTime) -> Result<(), CaError> {
        Self::checked_upstream(settings, now).map(|_| ())
    }

    /// The lifetimes checked, and in upstream mode the files loaded and
    /// verified: the chain, the key, and one SVID signed with them and
    /// verified against the bundle as a relying party would, so any
    /// mismatch between the files (or an issuer name rcgen cannot
    /// reproduce byte for byte) is found now.
    fn checked_upstream(
        settings: &CaSettings,
        now: SystemTime,
    ) -> Result<Option<upstream::Upstream>, CaError> {
        if settings.svid_ttl < MIN_SVID_TTL {
            return Err(CaError::InvalidSettings(
                "svid_ttl must be at least one second".into(),
            ));
        }
        if settings.jwt_svid_ttl < MIN_SVID_TTL {
            return Err(CaError::InvalidSettings(
                "jwt_svid_ttl must be at least one second".into(),
            ));
        }
        if settings.ca_ttl <= settings.jwt_svid_ttl {
            return Err(CaError::InvalidSettings(format!(
                "ca_ttl ({}s) must be longer than jwt_svid_ttl ({}s)",
                settings.ca_ttl.as_secs(),
                settings.jwt_svid_ttl.as_secs()
            )));
        }
        let Some(files) = &settings.upstream else {
            if settings.ca_ttl <= settings.svid_ttl {
                return Err(CaError::InvalidSettings(format!(
                    "ca_ttl ({}s) must be longer than svid_ttl ({}s); six times longer or more is recommended",
                    settings.ca_ttl.as_secs(),
                    settings.svid_ttl.as_secs()
                )));
            }
            return Ok(None);
        };
        let up = upstream::load(files, &settings.trust_domain, now)?;
        // Only minting is asked of it: no state, no JWT keys, no directory.
        let probe = Self {
            trust_domain: settings.trust_domain.clone(),
            ca_ttl: settings.ca_ttl,
            svid_ttl: settings.svid_ttl,
            jwt_svid_ttl: settings.jwt_svid_ttl,
            mode: Mode::Upstream {
                roots: up.roots.clone(),
                stored_x509: Vec::new(),
            },
            dir: CaDir::unopened(&settings.dir),
            x509: vec![Entry {
                role: Role::Active,
                key_file: String::new(),
                authority: up.signer.clone(),
            }],
            jwt: Vec::new(),
            expired_x509: Vec::new(),
            rotated_at_load: RotationOutcome::default(),
        };
        probe.check_upstream_issuance(files, now)?;
        Ok(Some(up))
    }

    /// What bringing the schedule up to date changed while loading (a
    /// first root, or steps due while writ was down).
    pub fn rotated_at_load(&self) -> RotationOutcome {
        self.rotated_at_load
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

    /// notBefore of the CA currently signing.
    pub fn active_not_before(&self) -> SystemTime {
        self.active()
            .map(|a| a.not_before)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Signs an audit checkpoint with the key that signs SVIDs right now,
    /// returning (DER ECDSA signature, that key's certificate). Verifiers
    /// check the certificate against the trust bundle, so only this CA can
    /// produce checkpoints that verify.
    pub fn sign_checkpoint(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        self.checkpoint_key()
            .ok_or("no active signing authority")?
            .sign(message)
    }

    /// The key that signs SVIDs right now, for signing audit checkpoints
    /// without holding the CA: the audit trail signs while appenders wait
    /// for it, and an issuance appends while it holds the CA.
    pub fn checkpoint_key(&self) -> Option<CheckpointKey> {
        self.x509
            .iter()
            .find(|e| e.role == Role::Active)
            .map(|e| CheckpointKey(e.authority.clone()))
    }

    /// Subject key identifier of the CA currently signing.
    pub fn active_key_id(&self) -> &[u8] {
        self.active().map(|a| a.key_id.as_slice()).unwrap_or(&[])
    }

    /// The X.509 authorities to publish: every root held (previous, active,
    /// prepared next; `rotate` drops expired ones), oldest first. Upstream:
    /// the upstream bundle's roots. Never the expired roots kept for audit.
    pub fn x509_authorities(&self) -> Vec<CertificateDer<'static>> {
        match &self.mode {
            Mode::Upstream { roots, .. } => roots.clone(),
            Mode::SelfSigned => self.x509.iter().map(|e| e.authority.cert.clone()).collect(),
        }
    }

    /// Every root an audit checkpoint signed by this CA can chain to: the
    /// expired roots kept in the state (oldest first), then the published
    /// ones; upstream, also the roots a self-signed run left in the state.
    /// For verifying the trail only: expired roots must never be published.
    pub fn checkpoint_roots(&self) -> Vec<CertificateDer<'static>> {
        let mut roots = self.expired_x509.clone();
        if let Mode::Upstream { stored_x509, .. } = &self.mode {
            roots.extend(stored_x509.iter().filter_map(|s| {
                pem::parse(&s.certificate)
                    .ok()
                    .map(|b| CertificateDer::from(b.into_contents()))
            }));
        }
        for root in self.x509_authorities() {
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        roots
    }

    /// The JWT authorities to publish: every JWT key held (retired, active,
    /// prepared next), oldest first.
    pub fn jwt_authorities(&self) -> Vec<JwtAuthority> {
        self.jwt.iter().map(|e| e.key.authority()).collect()
    }

    /// Key ID of the JWT key currently signing.
    pub fn active_jwt_key_id(&self) -> Option<&str> {
        self.active_jwt().map(|e| e.key.key_id())
    }

    /// An SVID's SPIFFE ID must be in our trust domain and name a workload.
    fn check_leaf_id(&self, id: &SpiffeId) -> Result<(), CaError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(CaError::ForeignTrustDomain(
                id.clone(),
                self.trust_domain.clone(),
            ));
        }
        if id.is_trust_domain_id() {
            return Err(CaError::LeafWithoutPath(id.clone()));
        }
        Ok(())
    }

    /// The configured JWT-SVID TTL.
    pub fn jwt_svid_ttl(&self) -> Duration {
        self.jwt_svid_ttl
    }

    /// Mints a JWT-SVID signed by the active JWT key: `iat` now, `exp`
    /// `now + ttl` rounded down to the second, or `ends_by` or the key's
    /// end if sooner (`token_end`), a random `jti`, plus the request's extra
    /// claims. Refuses requests whose token would be too large to validate.
    pub fn mint_jwt_svid(&self, req: &JwtSvidRequest, now: SystemTime) -> Result<JwtSvid, CaError> {
        self.mint_jwt_svid_with(req, now, |_| ())
            .map(|(svid, ())| svid)
    }

    /// `mint_jwt_svid`, calling `before_signing` once the token's claims
    /// (and so its size) are fixed but before it is signed, and returning
    /// what it returned: the issuance record can be on its way to the disk
    /// meanwhile. When validation fails the hook is not called; an error
    /// after it was called means the planned token was never signed.
    pub fn mint_jwt_svid_with<T>(
        &self,
        req: &JwtSvidRequest,
        now: SystemTime,
        before_signing: impl FnOnce(&JwtSvidPlan) -> T,
    ) -> Result<(JwtSvid, T), CaError> {
        self.check_leaf_id(&req.spiffe_id)?;
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(CaError::InvalidJwtRequest(
                "an audience of non-empty strings is required".into(),
            ));
        }
        if let Some(claim) = jwt::REGISTERED_CLAIMS
            .iter()
            .find(|c| req.extra_claims.contains_key(**c))
        {
            return Err(CaError::InvalidJwtRequest(format!(
                "claim {claim} is set by the issuer"
            )));
        }
        check_lifetime(req.ttl, req.ends_by, now)?;
        let signer = self
            .active_jwt()
            .ok_or_else(|| CaError::Internal("no active JWT signing key".into()))?;
        let now_unix = clock::to_unix(now)?;
        let exp = token_end(now, req.ttl, req.ends_by)?.min(signer.not_after_unix);
        if exp <= now_unix {
            return Err(CaError::SignerExpired {
                at: clock::display(now),
                not_after: clock::display(signer.not_after),
            });
        }
        let jti = jwt::new_jti()?;
        let claims = jwt::svid_claims(req, &jti, now_unix, exp);
        let signing_input = signer.key.signing_input(&claims)?;
        // A token we would refuse ourselves must not be handed out.
        let size = signing_input.len() + jwt::SIGNED_TOKEN_EXTRA;
        if size > jwt::MAX_TOKEN_BYTES {
            return Err(CaError::InvalidJwtRequest(format!(
                "the token would be {size} bytes, over the {}-byte limit; use fewer or shorter audiences",
                jwt::MAX_TOKEN_BYTES
            )));
        }
        let plan = JwtSvidPlan {
            jti,
            issued_at: clock::from_unix(now_unix),
            expires_at: clock::from_unix(exp),
            key_id: signer.key.key_id().to_owned(),
        };
        let hooked = before_signing(&plan);
        let token = signer.key.sign_input(signing_input)?;
        Ok((
            JwtSvid {
                spiffe_id: req.spiffe_id.clone(),
                token,
                key_id: plan.key_id,
                jti: plan.jti,
                issued_at: plan.issued_at,
                expires_at: plan.expires_at,
            },
            hooked,
        ))
    }

    /// Mints an X509-SVID: fresh P-256 key, random serial, notBefore
    /// `now - 10s`, notAfter `now + ttl` rounded up to the second, or
    /// `ends_by` or the signer's notAfter if sooner (`certificate_end`).
    pub fn mint_x509_svid(
        &self,
        req: &X509SvidRequest,
        now: SystemTime,
    ) -> Result<X509Svid, CaError> {
        self.mint_x509_svid_with(req, now, |_| ())
            .map(|(svid, ())| svid)
    }

    /// `mint_x509_svid`, calling `before_signing` once the serial and
    /// validity are chosen but before the key is generated and the
    /// certificate signed, and returning what it returned. The issuance
    /// record, which needs only those facts, can then be on its way to the
    /// disk while the signing runs. When validation fails the hook is not
    /// called; an error after it was called means the planned certificate
    /// was never signed.
    pub fn mint_x509_svid_with<T>(
        &self,
        req: &X509SvidRequest,
        now: SystemTime,
        before_signing: impl FnOnce(&X509SvidPlan) -> T,
    ) -> Result<(X509Svid, T), CaError> {
        self.check_leaf_id(&req.spiffe_id)?;
        check_lifetime(req.ttl, req.ends_by, now)?;
        for name in &req.dns_names {
            svid::validate_dns_name(name)?;
        }
        let signer = self
            .active()
            .ok_or_else(|| CaError::Internal("no active signing CA".into()))?;

        let now_unix = clock::to_unix(now)?;
        let not_before = now_unix - BACKDATE.as_secs() as i64;
        let not_after = certificate_end(now, req.ttl, req.ends_by)?.min(signer.not_after_unix);
        if not_after <= now_unix {
            return Err(CaError::SignerExpired {
                at: clock::display(now),
                not_after: clock::display(signer.not_after),
            });
        }
        // Relying parties refuse a chain to a CA not valid yet: better no
        // SVID than one that fails everywhere (rotation replaces such a
        // signer; this covers the seconds until it runs).
        if not_yet_valid(signer.not_before, now) {
            return Err(CaError::SignerNotYetValid {
                at: clock::display(now),
                not_before: clock::display(signer.not_before),
            });
        }
        let serial = authority::random_serial()?;
        let plan = X509SvidPlan {
            serial: serial.to_vec(),
            not_before: clock::from_unix(not_before),
            not_after: clock::from_unix(not_after),
            issuer_key_id: signer.key_id.clone(),
        };
        let hooked = before_signing(&plan);

        let key = authority::FreshLeafKey::generate()?;
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
        let svid = X509Svid::new(
            req.spiffe_id.clone(),
            chain,
            plan.serial,
            plan.issuer_key_id,
            (plan.not_before, plan.not_after),
            key.into_pkcs8(),
        );
        Ok((svid, hooked))
    }

    /// Advances the rotation schedule to `now` and persists the result
    /// before returning. Each key kind is measured on its active key's
    /// lifetime: at 1/2 a successor (new key) is created and published at
    /// once; at 5/6 (earlier if the active key could no longer sign a full
    /// `svid_ttl` SVID or `jwt_svid_ttl` token) the successor starts signing
    /// and the old key retires. A successor created late (writ was down at
    /// half-life) first gets a publication lead of its own
    /// (`Schedule::activate_at`); one signs unpublished only when the key
    /// before it has expired or is not valid yet (its notBefore more than
    /// `NOT_BEFORE_ALLOWANCE` ahead of `now`; it stays published, retired,
    /// until it ends), which is logged and reported in the outcome.
    /// A key is dropped (with its file) once it has expired — a JWT key
    /// `jwt_svid_ttl` later, as a margin for validators with slow clocks.
    /// Upstream mode rotates its JWT keys only: a new intermediate is
    /// picked up by loading again.
    pub fn rotate(&mut self, now: SystemTime) -> Result<RotationOutcome, CaError> {
        let x509_step = match self.mode {
            Mode::SelfSigned => self
                .x509_schedule()
                .advance(&self.x509, now, || self.new_root(now))?,
            Mode::Upstream { .. } => schedule::Advanced {
                held: self.x509.clone(),
                created: Vec::new(),
                unpublished_signer: false,
            },
        };
        let jwt_step = self
            .jwt_schedule()
            .advance(&self.jwt, now, || jwt_keys::create(now, self.ca_ttl))?;
        let (next_x509, created_x509) = (x509_step.held, x509_step.created);
        let (next_jwt, created_jwt) = (jwt_step.held, jwt_step.created);

        let x509_ids = |entries: &[Entry]| -> Vec<Vec<u8>> {
            entries.iter().map(|e| e.authority.key_id.clone()).collect()
        };
        let jwt_ids = |entries: &[JwtEntry]| -> Vec<String> {
            entries.iter().map(|e| e.key.key_id().to_owned()).collect()
        };
        let active_x509 = |entries: &[Entry]| {
            entries
                .iter()
                .find(|e| e.role == Role::Active)
                .map(|e| e.authority.key_id.clone())
        };
        let outcome = RotationOutcome {
            authorities_changed: x509_ids(&next_x509) != x509_ids(&self.x509),
            signer_changed: active_x509(&next_x509) != active_x509(&self.x509),
            jwt_authorities_changed: jwt_ids(&next_jwt) != jwt_ids(&self.jwt),
            x509_signer_unpublished: x509_step.unpublished_signer,
            jwt_signer_unpublished: jwt_step.unpublished_signer,
        };
        let roles = |roles: &mut dyn Iterator<Item = Role>| roles.collect::<Vec<_>>();
        let roles_changed = outcome.authorities_changed
            || outcome.jwt_authorities_changed
            || roles(&mut next_x509.iter().map(|e| e.role))
                != roles(&mut self.x509.iter().map(|e| e.role))
            || roles(&mut next_jwt.iter().map(|e| e.role))
                != roles(&mut self.jwt.iter().map(|e| e.role));
        if !roles_changed {
            return Ok(outcome);
        }
        let next_expired = self.next_expired(&next_x509);

        // New keys first, then the state file that refers to them (the
        // commit point), then the keys nothing refers to any more.
        for entry in &created_x509 {
            self.dir
                .write_key(&entry.key_file, &entry.authority.key_pkcs8_pem())?;
        }
        for entry in &created_jwt {
            self.dir
                .write_key(&entry.key_file, &entry.key.pkcs8_pem())?;
        }
        let x509_authorities = match &self.mode {
            Mode::SelfSigned => next_x509
                .iter()
                .map(|e| StoredAuthority {
                    role: e.role,
                    certificate: crate::bundle::pem_lf("CERTIFICATE", &e.authority.cert),
                    key_file: e.key_file.clone(),
                })
                .collect(),
            Mode::Upstream { stored_x509, .. } => stored_x509.clone(),
        };
        self.dir.write_state(&StateFile {
            version: store::STATE_VERSION,
            trust_domain: self.trust_domain.name().to_owned(),
            x509_authorities,
            jwt_authorities: next_jwt
                .iter()
                .map(jwt_keys::to_stored)
                .collect::<Result<_, _>>()?,
            expired_x509_authorities: next_expired
                .iter()
                .map(|cert| ExpiredAuthority {
                    certificate: crate::bundle::pem_lf("CERTIFICATE", cert),
                })
                .collect(),
        })?;
        let gone_x509 = self
            .x509
            .iter()
            .filter(|old| !next_x509.iter().any(|e| e.key_file == old.key_file))
            .map(|old| &old.key_file);
        let gone_jwt = self
            .jwt
            .iter()
            .filter(|old| !next_jwt.iter().any(|e| e.key_file == old.key_file))
            .map(|old| &old.key_file);
        for gone in gone_x509.chain(gone_jwt) {
            if gone.is_empty() {
                continue; // the upstream signer's key is not ours to delete
            }
            if let Err(e) = self.dir.remove_key(gone) {
                tracing::warn!(error = %e, "could not delete the key of an expired CA key");
            }
        }
        self.x509 = next_x509;
        self.jwt = next_jwt;
        self.expired_x509 = next_expired;
        if outcome.x509_signer_unpublished {
            tracing::warn!(
                key_id = hex::encode(self.active_key_id()),
                "the CA root expired before rotation could replace it (writ was down, or the clock jumped ahead), or is dated in the future (made while the clock was ahead), so a new root signs at once without ever having been published: federated peers cannot verify writ's SVIDs or reach its https_spiffe bundle endpoint until they are given writ's bundle again (`writ bundle show --format spiffe`, then e.g. `spire-server bundle set -format spiffe`)"
            );
        }
        if outcome.jwt_signer_unpublished {
            tracing::warn!(
                key_id = self.active_jwt_key_id().unwrap_or_default(),
                "the JWT signing key expired before rotation could replace it (writ was down, or the clock jumped ahead), or is dated in the future (made while the clock was ahead), so a new key signs at once without ever having been published: federated peers reject writ's JWT-SVIDs until they fetch writ's bundle again"
            );
        }
        Ok(outcome)
    }

    /// The expired roots to keep once `next_x509` replaces the held roots:
    /// every root it drops joins them (the key goes, the certificate stays),
    /// bounded by [`MAX_EXPIRED_ROOTS`], the oldest forgotten first.
    fn next_expired(&self, next_x509: &[Entry]) -> Vec<CertificateDer<'static>> {
        let mut expired = self.expired_x509.clone();
        for dropped in self
            .x509
            .iter()
            .filter(|old| !next_x509.iter().any(|e| e.key_file == old.key_file))
        {
            if !dropped.key_file.is_empty() && !expired.contains(&dropped.authority.cert) {
                expired.push(dropped.authority.cert.clone());
            }
        }
        let excess = expired.len().saturating_sub(MAX_EXPIRED_ROOTS);
        if excess > 0 {
            tracing::warn!(
                forgotten = excess,
                kept = MAX_EXPIRED_ROOTS,
                "the CA state forgets its oldest expired roots; audit checkpoints they signed need `writ audit verify --bundle`"
            );
            expired.drain(..excess);
        }
        expired
    }

    /// When `rotate` next has work to do (may be in the past if overdue).
    pub fn next_rotation_at(&self) -> SystemTime {
        let x509 = match self.mode {
            Mode::SelfSigned => self.x509_schedule().next_event(&self.x509),
            Mode::Upstream { .. } => self.active_not_after(),
        };
        x509.min(self.jwt_schedule().next_event(&self.jwt))
    }

    /// Signed CRLs for `revoked`, as the agent makes them.
    #[cfg(test)]
    pub fn sign_crls(
        &self,
        revoked: &[&RevokedCert],
        crl_number: u64,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Vec<Vec<u8>>, CaError> {
        let mut list = RevocationList::default();
        for cert in revoked {
            list.add(cert, i64::MAX)?;
        }
        let prepared = self.prepare_crls(&list, crl_number, validity, now)?;
        Ok(self
            .finish_crls(prepared)?
            .into_iter()
            .map(|der| der.to_vec())
            .collect())
    }

    /// One CRL per CA that issued anything in `list`, to be signed by that
    /// CA's own key (a CRL's issuer must be the certificate's issuer) with
    /// `finish_crls`. This copies the list; the signing, which costs more,
    /// needs no hold on it. Entries whose CA is no longer held are skipped:
    /// a CA is only dropped once expired, and every certificate it issued
    /// expired no later. nextUpdate is `now + validity`, but never past the
    /// issuing CA's end.
    pub fn prepare_crls(
        &self,
        list: &RevocationList,
        crl_number: u64,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Vec<PreparedCrl>, CaError> {
        if validity < Duration::from_secs(1) {
            return Err(CaError::CrlValidityTooShort);
        }
        let now_unix = clock::to_unix(now)?;
        let next_unix =
            now_unix.saturating_add(i64::try_from(validity.as_secs()).unwrap_or(i64::MAX));
        let mut crls = Vec::new();
        for entry in &self.x509 {
            let ca = &entry.authority;
            let Some(encoded) = list.encoded_for(&ca.key_id) else {
                continue;
            };
            // A CRL is no use past its issuer's end (an upstream issuer's:
            // the earliest end in its chain), and claiming it valid longer
            // would outlive the certificate that verifies it. At least a
            // second, so the CRL stays well-formed.
            let next_unix = next_unix.min(ca.not_after_unix).max(now_unix + 1);
            let body = if crl::supports(ca.issuer.key()) {
                let header = crl::CrlHeader {
                    issuer_name: &ca.subject_der,
                    issuer_key_id: &ca.key_id,
                    crl_number,
                    this_update_unix: now_unix,
                    next_update_unix: next_unix,
                };
                PreparedCrlBody::Encoded(crl::prepare(&header, encoded)?)
            } else {
                let revoked_certs = list
                    .entries_for(&ca.key_id)
                    .map(|(serial, revoked_at)| {
                        Ok(RevokedCertParams {
                            serial_number: SerialNumber::from_slice(serial),
                            revocation_time: clock::to_offset(clock::to_unix(revoked_at)?)?,
                            reason_code: None,
                            invalidity_date: None,
                        })
                    })
                    .collect::<Result<Vec<_>, CaError>>()?;
                PreparedCrlBody::General(CertificateRevocationListParams {
                    this_update: clock::to_offset(now_unix)?,
                    next_update: clock::to_offset(next_unix)?,
                    crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
                    issuing_distribution_point: None,
                    revoked_certs,
                    key_identifier_method: KeyIdMethod::PreSpecified(ca.key_id.clone()),
                })
            };
            crls.push(PreparedCrl {
                issuer_key_id: ca.key_id.clone(),
                body,
            });
        }
        Ok(crls)
    }

    /// Signs CRLs from `prepare_crls`, each by its issuer's key, in order.
    /// A CRL whose CA has been dropped since is skipped (see `prepare_crls`).
    pub fn finish_crls(&self, prepared: Vec<PreparedCrl>) -> Result<Vec<bytes::Bytes>, CaError> {
        let mut crls = Vec::with_capacity(prepared.len());
        for crl in prepared {
            let Some(entry) = self
                .x509
                .iter()
                .find(|e| e.authority.key_id == crl.issuer_key_id)
            else {
                continue;
            };
            let ca = &entry.authority;
            crls.push(match crl.body {
                PreparedCrlBody::Encoded(unsigned) => crl::finish(unsigned, ca.issuer.key())?,
                PreparedCrlBody::General(params) => {
                    bytes::Bytes::copy_from_slice(params.signed_by(&ca.issuer)?.der())
                }
            });
        }
        Ok(crls)
    }

    fn active(&self) -> Option<&SigningAuthority> {
        self.x509
            .iter()
            .find(|e| e.role == Role::Active)
            .map(|e| e.authority.as_ref())
    }

    fn active_jwt(&self) -> Option<&JwtEntry> {
        self.jwt.iter().find(|e| e.role == Role::Active)
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

    fn x509_schedule(&self) -> Schedule {
        Schedule {
            credential_ttl: self.svid_ttl,
            linger: Duration::ZERO,
        }
    }

    fn jwt_schedule(&self) -> Schedule {
        Schedule {
            credential_ttl: self.jwt_svid_ttl,
            linger: self.jwt_svid_ttl,
        }
    }

    /// Mints one SVID with the upstream signer and verifies it the way a
    /// relying party would.
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
                ends_by: None,
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

/// Rebuilds the roots of a state file, checking that each certificate is
/// a root of this trust domain, that its key file is private and matches,
/// and that the roles make sense. No roots at all (a state file written in
/// upstream mode) is fine: the schedule creates the first one.
fn load_entries(
    dir: &CaDir,
    trust_domain: &TrustDomain,
    stored_roots: Vec<StoredAuthority>,
) -> Result<Vec<Entry>, CaError> {
    let corrupt = |reason: String| CaError::CorruptState {
        path: dir.state_path(),
        reason,
    };
    if stored_roots.is_empty() {
        return Ok(Vec::new());
    }
    let mut entries = Vec::with_capacity(stored_roots.len());
    for stored in stored_roots {
        let cert = parse_root(&stored.certificate, trust_domain).map_err(corrupt)?;
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

/// Reads the certificates of the expired roots a state file keeps, checked
/// like held roots (a root of this trust domain), since a verifier will
/// trust them.
fn load_expired(
    dir: &CaDir,
    trust_domain: &TrustDomain,
    stored: Vec<ExpiredAuthority>,
) -> Result<Vec<CertificateDer<'static>>, CaError> {
    stored
        .iter()
        .map(|e| {
            parse_root(&e.certificate, trust_domain).map_err(|reason| CaError::CorruptState {
                path: dir.state_path(),
                reason: format!("in expired_x509_authorities: {reason}"),
            })
        })
        .collect()
}

/// One PEM root certificate of `trust_domain`, as the state stores it.
fn parse_root(
    pem_text: &str,
    trust_domain: &TrustDomain,
) -> Result<CertificateDer<'static>, String> {
    let block = pem::parse(pem_text).map_err(|e| format!("a certificate is not valid PEM: {e}"))?;
    let cert = CertificateDer::from(block.into_contents());
    let id = svid::check_signing_cert_conformance(&cert)
        .map_err(|v| format!("a root is not a valid signing certificate: {v}"))?;
    if id.as_ref().map(SpiffeId::trust_domain) != Some(trust_domain) {
        return Err(format!(
            "a root does not carry the SPIFFE ID spiffe://{trust_domain}"
        ));
    }
    Ok(cert)
}

/// The roots audit checkpoints of the CA in `ca_dir` can chain to, read
/// from its `state.json` alone (no key is read, nothing is written): the
/// expired roots it keeps, then the roots it holds. What
/// [`CertificateAuthority::checkpoint_roots`] returns, minus an upstream
/// bundle, which lives outside the directory.
pub fn read_checkpoint_roots(ca_dir: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let path = ca_dir.join(store::STATE_FILE);
    let state = store::read_state_file(&path)?.ok_or_else(|| CaError::Io {
        path: path.clone(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let texts = state
        .expired_x509_authorities
        .iter()
        .map(|e| &e.certificate)
        .chain(state.x509_authorities.iter().map(|a| &a.certificate));
    let mut roots = Vec::new();
    for text in texts {
        let block = pem::parse(text).map_err(|e| CaError::CorruptState {
            path: path.clone(),
            reason: format!("a certificate is not valid PEM: {e}"),
        })?;
        let cert = CertificateDer::from(block.into_contents());
        if !roots.contains(&cert) {
            roots.push(cert);
        }
    }
    Ok(roots)
}

/// When a credential minted at `now` for `ttl` ends, in the whole seconds
/// certificates and tokens carry: the second of the exact end, so a TTL
/// capped 1.4 s after x.9 s ends 1 s later, not 0.1 s later (flooring now
/// and the TTL apart), and never after the cap.
/// How long a credential minted at `now` can live if it must end by
/// `ends_by`: to that instant's whole second, since certificate and token
/// times have no fractions.
pub fn room_before(ends_by: SystemTime, now: SystemTime) -> Duration {
    let whole = ends_by
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()))
        .unwrap_or(ends_by);
    whole.duration_since(now).unwrap_or(Duration::ZERO)
}

/// A credential must be able to live `MIN_SVID_TTL`, by its TTL and by
/// whatever it must end by.
fn check_lifetime(
    ttl: Duration,
    ends_by: Option<SystemTime>,
    now: SystemTime,
) -> Result<(), CaError> {
    if ttl < MIN_SVID_TTL || ends_by.is_some_and(|by| room_before(by, now) < MIN_SVID_TTL) {
        return Err(CaError::TtlTooShort);
    }
    Ok(())
}

/// When a certificate signed at `now` ends, in unix seconds: at least `ttl`
/// later, so `now + ttl` is rounded up to its whole second (rounded down, a
/// one-second TTL could leave a certificate a few milliseconds, and a
/// two-second one barely a second, to be rotated in; its notBefore is
/// backdated anyway); but never after `ends_by`, rounded down.
fn certificate_end(
    now: SystemTime,
    ttl: Duration,
    ends_by: Option<SystemTime>,
) -> Result<i64, CaError> {
    let by_ttl = match now.checked_add(ttl) {
        Some(end) => {
            let partial = end
                .duration_since(SystemTime::UNIX_EPOCH)
                .is_ok_and(|d| d.subsec_nanos() > 0);
            clock::to_unix(end)?.saturating_add(i64::from(partial))
        }
        None => i64::MAX,
    };
    capped_end(by_ttl, ends_by)
}

/// When a token signed at `now` ends, in unix seconds: `now + ttl` rounded
/// down, so `exp` is `iat` plus the TTL, as relying parties expect; but
/// never after `ends_by`, rounded down.
fn token_end(now: SystemTime, ttl: Duration, ends_by: Option<SystemTime>) -> Result<i64, CaError> {
    let by_ttl = match now.checked_add(ttl) {
        Some(end) => clock::to_unix(end)?,
        None => i64::MAX,
    };
    capped_end(by_ttl, ends_by)
}

fn capped_end(end: i64, ends_by: Option<SystemTime>) -> Result<i64, CaError> {
    match ends_by {
        Some(by) => Ok(end.min(clock::to_unix(by)?)),
        None => Ok(end),
    }
}

#[cfg(test)]
mod tests;
