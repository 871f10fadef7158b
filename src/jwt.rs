//! JWT-SVIDs on the wire: ES256 signing keys and compact JWS encoding, and
//! strict validation of a token against the JWT authorities of the trust
//! domain its `sub` names. Which claims a token carries is the agent's call;
//! which key signs, and when it rotates, the CA's.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaPublicKeyComponents};
use serde_json::{Map, Value};
use writ_attestors::excerpt;

use crate::bundle::{JwtAuthority, TrustBundle};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Largest token ValidateJWTSVID looks at. Real JWT-SVIDs are well under
/// 2 KiB; the bound keeps a hostile caller from making us parse megabytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Tolerance for clocks that disagree a little, applied to `exp` and `nbf`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Claims the issuer sets itself; extra claims may not replace them.
pub const REGISTERED_CLAIMS: &[&str] = &["sub", "aud", "exp", "iat", "nbf", "jti", "iss"];

const MAX_KEY_ID_BYTES: usize = 128;

/// Why a token was refused. The message is what ValidateJWTSVID returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token too large: {size} bytes, the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {:?} is not allowed for JWT-SVIDs", excerpt(.0))]
    AlgorithmNotAllowed(String),
    #[error(
        "unsupported algorithm {}: writ verifies ES256, ES384, RS256/384/512 and PS256/384/512",
        excerpt(.0)
    )]
    UnsupportedAlgorithm(String),
    #[error("header typ {:?} is not allowed; it must be JWT or JOSE", excerpt(.0))]
    BadType(String),
    #[error("critical header parameters (crit) are not supported")]
    CriticalHeader,
    #[error("header kid is missing")]
    MissingKeyId,
    #[error("claim {0} is missing")]
    MissingClaim(&'static str),
    #[error("claim {claim} {reason}")]
    BadClaim {
        claim: &'static str,
        reason: &'static str,
    },
    #[error("sub is not a valid SPIFFE ID: {0}")]
    InvalidSubject(String),
    #[error("no JWT bundle for trust domain {0}")]
    NoBundle(TrustDomain),
    #[error(
        "key ID {:?} is not in the JWT bundle of trust domain {trust_domain}",
        excerpt(key_id)
    )]
    UnknownKeyId {
        key_id: String,
        trust_domain: TrustDomain,
    },
    #[error("key {:?} cannot verify {alg} signatures", excerpt(key_id))]
    KeyMismatch { key_id: String, alg: &'static str },
    #[error("key {:?} is unusable: {}", excerpt(key_id), excerpt(reason))]
    KeyUnusable { key_id: String, reason: String },
    #[error("signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("audience {0:?} is not in the token's aud claim")]
    AudienceMismatch(String),
    #[error("task {0} revoked")]
    TaskRevoked(String),
}

/// Failures of key handling and signing; never carry key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtKeyError {
    #[error("the system random number generator failed")]
    Rng,
    #[error("key ID {0:?} is not 1-128 characters of A-Z a-z 0-9 - _")]
    BadKeyId(String),
    #[error("not a usable ECDSA P-256 PKCS#8 key")]
    BadKey,
    #[error("claims cannot be encoded: {0}")]
    Encoding(String),
}

/// A trust domain's JWT signing key (ECDSA P-256, ES256).
pub struct JwtSigningKey {
    key_id: String,
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl fmt::Debug for JwtSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl JwtSigningKey {
    /// A fresh key whose ID is 16 random bytes, base64url.
    pub fn generate() -> Result<Self, JwtKeyError> {
        let rng = SystemRandom::new();
        let mut id = [0u8; 16];
        rng.fill(&mut id).map_err(|_| JwtKeyError::Rng)?;
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| JwtKeyError::Rng)?;
        Self::from_pkcs8(&URL_SAFE_NO_PAD.encode(id), doc.as_ref())
    }

    /// Loads a stored key. The ID must be file-name safe, since the CA names
    /// the key's file after it.
    pub fn from_pkcs8(key_id: &str, pkcs8: &[u8]) -> Result<Self, JwtKeyError> {
        let plain = !key_id.is_empty()
            && key_id.len() <= MAX_KEY_ID_BYTES
            && key_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !plain {
            return Err(JwtKeyError::BadKeyId(key_id.to_owned()));
        }
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|_| JwtKeyError::BadKey)?;
        Ok(Self {
            key_id: key_id.to_owned(),
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The private key as PKCS#8 PEM, for the CA's key file.
    pub fn pkcs8_pem(&self) -> String {
        crate::bundle::pem_lf("PRIVATE KEY", &self.pkcs8)
    }

    /// The public half as a bundle entry (`kty`, `crv`, `x`, `y`; `kid`).
    pub fn authority(&self) -> JwtAuthority {
        // ring hands out the uncompressed SEC1 point: 0x04 || x || y.
        let point = self.pair.public_key().as_ref();
        let xy = point.get(1..).unwrap_or_default();
        let (x, y) = xy.split_at(xy.len() / 2);
        let mut jwk = Map::new();
        jwk.insert("kty".into(), "EC".into());
        jwk.insert("crv".into(), "P-256".into());
        jwk.insert("x".into(), URL_SAFE_NO_PAD.encode(x).into());
        jwk.insert("y".into(), URL_SAFE_NO_PAD.encode(y).into());
        JwtAuthority {
            key_id: self.key_id.clone(),
            public_key_jwk: jwk,
        }
    }

    /// Signs `claims` as a compact JWS with the header
    /// `{"alg":"ES256","kid":<id>,"typ":"JWT"}` and nothing else: the Rust
    /// `spiffe` crate rejects any other header member.
    pub fn sign(&self, claims: &Map<String, Value>) -> Result<String, JwtKeyError> {
        self.sign_input(self.signing_input(claims)?)
    }

    /// The part of the token that is signed: encoded header, `.`, encoded
    /// claims. The finished token is `SIGNED_TOKEN_EXTRA` bytes longer.
    pub fn signing_input(&self, claims: &Map<String, Value>) -> Result<String, JwtKeyError> {
        let mut header = Map::new();
        header.insert("alg".into(), "ES256".into());
        header.insert("kid".into(), self.key_id.clone().into());
        header.insert("typ".into(), "JWT".into());
        let header =
            serde_json::to_vec(&header).map_err(|e| JwtKeyError::Encoding(e.to_string()))?;
        let claims =
            serde_json::to_vec(claims).map_err(|e| JwtKeyError::Encoding(e.to_string()))?;
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(claims));
        Ok(token)
    }

    /// Completes a token from its signing input: `.` and the signature.
    pub fn sign_input(&self, mut token: String) -> Result<String, JwtKeyError> {
        let sig = self
            .pair
            .sign(&SystemRandom::new(), token.as_bytes())
            .map_err(|_| JwtKeyError::Rng)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(token)
    }
}

/// What signing adds to a signing input: `.` and an ES256 signature (64
/// bytes, 86 in unpadded base64url). Fixed, so a token's size is known
/// before it is signed.
pub const SIGNED_TOKEN_EXTRA: usize = 1 + 86;

/// What a JWT-SVID about to be signed will carry, fixed before it is
/// signed: what its issuance record needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidPlan {
    pub jti: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    pub key_id: String,
}

/// What to put in a JWT-SVID beyond the registered claims.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSvidRequest {
    pub spiffe_id: SpiffeId,
    pub audience: Vec<String>,
    /// The least the token lives, unless `ends_by` or the key ends first.
    pub ttl: Duration,
    /// The latest the token may end (its task's end, say).
    pub ends_by: Option<SystemTime>,
    /// Private claims (`task`, `act`); none may be a registered claim.
    pub extra_claims: Map<String, Value>,
}

/// A minted JWT-SVID.
#[derive(Clone)]
pub struct JwtSvid {
    pub spiffe_id: SpiffeId,
    /// The compact JWS. A bearer credential: never logged.
    pub token: String,
    pub key_id: String,
    pub jti: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("key_id", &self.key_id)
            .field("jti", &self.jti)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The claims of a JWT-SVID: `sub`, `aud`, `exp`, `iat`, `jti`, then the
/// extra ones. `aud` is a string when there is one audience and an array
/// otherwise — what SPIRE emits, which every SPIFFE library reads.
pub fn svid_claims(
    request: &JwtSvidRequest,
    jti: &str,
    issued_at_unix: i64,
    expires_at_unix: i64,
) -> Map<String, Value> {
    let mut claims = request.extra_claims.clone();
    claims.insert("sub".into(), request.spiffe_id.to_string().into());
    let aud: Value = match request.audience.as_slice() {
        [one] => one.clone().into(),
        many => many.to_vec().into(),
    };
    claims.insert("aud".into(), aud);
    claims.insert("exp".into(), expires_at_unix.into());
    claims.insert("iat".into(), issued_at_unix.into());
    claims.insert("jti".into(), jti.into());
    claims
}

/// A fresh token ID: 16 random bytes, base64url.
pub fn new_jti() -> Result<String, JwtKeyError> {
    let mut id = [0u8; 16];
    SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| JwtKeyError::Rng)?;
    Ok(URL_SAFE_NO_PAD.encode(id))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EcCurve {
    P256,
    P384,
    P521,
}

/// A JWT authority's public key, decoded once per bundle change.
#[derive(Debug, Clone)]
enum VerifyingKey {
    /// Uncompressed SEC1 point.
    Ec { curve: EcCurve, point: Vec<u8> },
    /// Big-endian modulus and exponent without leading zeros (as ring wants).
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// Listed in the bundle but not usable here; kept so the error says why
    /// instead of claiming the key is unknown.
    Unusable(String),
}

impl VerifyingKey {
    fn from_authority(authority: &JwtAuthority) -> Self {
        let jwk = &authority.public_key_jwk;
        let field = |name: &str| -> Result<Vec<u8>, String> {
            let text = jwk
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("JWK lacks \"{name}\""))?;
            URL_SAFE_NO_PAD
                .decode(text)
                .map_err(|_| format!("JWK \"{name}\" is not base64url"))
        };
        let decoded = match jwk.get("kty").and_then(Value::as_str) {
            Some("EC") => {
                let curve = match jwk.get("crv").and_then(Value::as_str) {
                    Some("P-256") => Ok((EcCurve::P256, 32)),
                    Some("P-384") => Ok((EcCurve::P384, 48)),
                    Some("P-521") => Ok((EcCurve::P521, 66)),
                    other => Err(format!("EC curve {other:?} is not supported")),
                };
                curve.and_then(|(curve, size)| {
                    let (x, y) = (field("x")?, field("y")?);
                    if x.len() != size || y.len() != size {
                        return Err("EC coordinates have the wrong length".to_owned());
                    }
                    let mut point = Vec::with_capacity(1 + 2 * size);
                    point.push(0x04);
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    Ok(VerifyingKey::Ec { curve, point })
                })
            }
            Some("RSA") => field("n").and_then(|n| {
                let e = field("e")?;
                let strip = |b: Vec<u8>| {
                    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
                    b[start..].to_vec()
                };
                let (n, e) = (strip(n), strip(e));
                if n.is_empty() || e.is_empty() {
                    return Err("RSA modulus or exponent is zero".to_owned());
                }
                Ok(VerifyingKey::Rsa { n, e })
            }),
            other => Err(format!("key type {other:?} is not supported")),
        };
        decoded.unwrap_or_else(VerifyingKey::Unusable)
    }
}

/// JWT authorities by trust domain, then key ID: what validation looks a
/// token's key up in. Keys are never shared across trust domains, so a kid
/// known only under one domain cannot vouch for a `sub` in another.
#[derive(Debug, Clone, Default)]
pub struct JwtKeySet {
    by_domain: HashMap<TrustDomain, HashMap<String, VerifyingKey>>,
}

impl JwtKeySet {
    /// Replaces the keys held for `bundle`'s trust domain with its JWT
    /// authorities.
    pub fn set_bundle(&mut self, bundle: &TrustBundle) {
        let keys = bundle
            .jwt_authorities
            .iter()
            .map(|a| (a.key_id.clone(), VerifyingKey::from_authority(a)))
            .collect();
        self.by_domain.insert(bundle.trust_domain.clone(), keys);
    }

    pub fn contains_domain(&self, trust_domain: &TrustDomain) -> bool {
        self.by_domain.contains_key(trust_domain)
    }

    fn key(&self, trust_domain: &TrustDomain, key_id: &str) -> Result<&VerifyingKey, JwtError> {
        self.by_domain
            .get(trust_domain)
            .ok_or_else(|| JwtError::NoBundle(trust_domain.clone()))?
            .get(key_id)
            .ok_or_else(|| JwtError::UnknownKeyId {
                key_id: key_id.to_owned(),
                trust_domain: trust_domain.clone(),
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Es256,
    Es384,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
}

impl Alg {
    fn parse(name: &str) -> Result<Self, JwtError> {
        Ok(match name {
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            // In the JWT-SVID allow-list, but ring has no P-521.
            "ES512" => return Err(JwtError::UnsupportedAlgorithm(name.to_owned())),
            // none, HS* and everything else: a token must be signed by a
            // key the bundle publishes, never by a shared secret.
            other => return Err(JwtError::AlgorithmNotAllowed(other.to_owned())),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
        }
    }

    fn verify(
        self,
        key_id: &str,
        key: &VerifyingKey,
        message: &[u8],
        sig: &[u8],
    ) -> Result<(), JwtError> {
        let mismatch = || JwtError::KeyMismatch {
            key_id: key_id.to_owned(),
            alg: self.name(),
        };
        let verified = match (self, key) {
            (_, VerifyingKey::Unusable(reason)) => {
                return Err(JwtError::KeyUnusable {
                    key_id: key_id.to_owned(),
                    reason: reason.clone(),
                });
            }
            (Alg::Es256, VerifyingKey::Ec { curve, point }) if *curve == EcCurve::P256 => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
            }
            (Alg::Es384, VerifyingKey::Ec { curve, point }) if *curve == EcCurve::P384 => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, sig)
            }
            (Alg::Es256 | Alg::Es384, _) => return Err(mismatch()),
            (_, VerifyingKey::Rsa { n, e }) => {
                let params = match self {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                    Alg::Es256 | Alg::Es384 => return Err(mismatch()),
                };
                RsaPublicKeyComponents { n, e }.verify(params, message, sig)
            }
            _ => return Err(mismatch()),
        };
        verified.map_err(|_| JwtError::BadSignature)
    }
}

/// A token that passed [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    pub spiffe_id: SpiffeId,
    pub key_id: String,
    pub claims: Map<String, Value>,
}

/// Validates a JWT-SVID per the JWT-SVID spec, strictly: size limit, three
/// base64url parts, JSON without duplicate members, an allowed `alg`, `typ`
/// JWT or JOSE if present, no `crit`, a `kid`, a signature by that key of
/// the trust domain `sub` names, `exp` (and `nbf` if present) within
/// [`CLOCK_SKEW`], and `audience` among `aud`. Whether a task behind the
/// token is still active is the caller's question (see `Agent`).
pub fn validate(
    token: &str,
    audience: &str,
    keys: &JwtKeySet,
    now: SystemTime,
) -> Result<ValidatedJwt, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::TooLarge {
            size: token.len(),
            limit: MAX_TOKEN_BYTES,
        });
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed(
            "expected three base64url parts separated by dots (JWS compact form)".into(),
        ));
    };
    let header = decode_object("header", header_b64)?;
    let claims = decode_object("payload", claims_b64)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| JwtError::Malformed("signature is not base64url".into()))?;

    let alg = match header.get("alg") {
        Some(Value::String(alg)) => Alg::parse(alg)?,
        Some(_) => return Err(JwtError::Malformed("header alg is not a string".into())),
        None => return Err(JwtError::Malformed("header alg is missing".into())),
    };
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(Value::String(other)) => return Err(JwtError::BadType(other.clone())),
        Some(_) => return Err(JwtError::Malformed("header typ is not a string".into())),
    }
    // We understand no extension, so any critical one must fail (RFC 7515
    // 4.1.11); `b64: false` and friends can only arrive this way.
    if header.contains_key("crit") {
        return Err(JwtError::CriticalHeader);
    }
    let key_id = match header.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.as_str(),
        Some(_) => return Err(JwtError::Malformed("header kid is not a string".into())),
        None => return Err(JwtError::MissingKeyId),
    };

    // The key is chosen by the trust domain `sub` claims, before the
    // signature proves anything; a key from the wrong domain then simply
    // is not found there.
    let spiffe_id = match claims.get("sub") {
        Some(Value::String(sub)) => {
            let id = sub
                .parse::<SpiffeId>()
                .map_err(|e| JwtError::InvalidSubject(e.to_string()))?;
            // The bare trust-domain ID names the trust domain, not a
            // workload (SPIFFE ID standard); no JWT-SVID is issued to it.
            if id.is_trust_domain_id() {
                return Err(JwtError::InvalidSubject(format!(
                    "{id} names a trust domain, not a workload: a JWT-SVID's sub has a path"
                )));
            }
            id
        }
        Some(_) => {
            return Err(JwtError::BadClaim {
                claim: "sub",
                reason: "is not a string",
            });
        }
        None => return Err(JwtError::MissingClaim("sub")),
    };
    let key = keys.key(spiffe_id.trust_domain(), key_id)?;
    let signed = &token[..header_b64.len() + 1 + claims_b64.len()];
    alg.verify(key_id, key, signed.as_bytes(), &sig)?;

    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let skew = CLOCK_SKEW.as_secs_f64();
    let exp = numeric_date(&claims, "exp")?.ok_or(JwtError::MissingClaim("exp"))?;
    if now_secs >= exp + skew {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric_date(&claims, "nbf")?
        && now_secs + skew < nbf
    {
        return Err(JwtError::NotYetValid);
    }
    numeric_date(&claims, "iat")?;
    check_audience(&claims, audience)?;

    Ok(ValidatedJwt {
        spiffe_id,
        key_id: key_id.to_owned(),
        claims,
    })
}

fn decode_object(part: &'static str, b64: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| JwtError::Malformed(format!("{part} is not base64url")))?;
    match crate::bundle::strict_json(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JwtError::Malformed(format!("{part} is not a JSON object"))),
        Err(e) => Err(JwtError::Malformed(format!(
            "{part} is not valid JSON: {e}"
        ))),
    }
}

/// A NumericDate claim: absent, or a finite number of seconds.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|n| n.is_finite())
            .map(Some)
            .ok_or(JwtError::BadClaim {
                claim: name,
                reason: "is not a number of seconds since the epoch",
            }),
    }
}

fn check_audience(claims: &Map<String, Value>, audience: &str) -> Result<(), JwtError> {
    let bad = |reason| JwtError::BadClaim {
        claim: "aud",
        reason,
    };
    let found = match claims.get("aud") {
        None => return Err(JwtError::MissingClaim("aud")),
        Some(Value::String(one)) => one == audience,
        Some(Value::Array(many)) => {
            if many.is_empty() {
                return Err(bad("is empty"));
            }
            let mut found = false;
            for value in many {
                let Value::String(s) = value else {
                    return Err(bad("holds a value that is not a string"));
                };
                found |= s == audience;
            }
            found
        }
        Some(_) => return Err(bad("is neither a string nor an array of strings")),
    };
    if !found {
        // Shortened: the audience is the caller's, and the message goes back
        // to it in a header clients bound.
        return Err(JwtError::AudienceMismatch(excerpt(audience).to_string()));
    }
    Ok(())
}

/// Claims as a `google.protobuf.Struct`, the form ValidateJWTSVID returns.
pub fn claims_to_struct(claims: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .iter()
            .map(|(k, v)| (k.clone(), to_proto_value(v)))
            .collect(),
    }
}

fn to_proto_value(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        // Struct numbers are doubles; NumericDates fit exactly until 2^53.
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_proto_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(claims_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::RsaKeyPair;
    use serde_json::json;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn unix(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn keyset(trust_domain: TrustDomain, authorities: Vec<JwtAuthority>) -> JwtKeySet {
        let mut set = JwtKeySet::default();
        set.set_bundle(&TrustBundle {
            jwt_authorities: authorities,
            ..TrustBundle::new(trust_domain)
        });
        set
    }

    #[test]
    fn a_signed_token_is_its_signing_input_and_a_fixed_extra() {
        let key = JwtSigningKey::generate().unwrap();
        for audiences in [1, 7, 300] {
            let aud: Vec<String> = (0..audiences).map(|i| format!("aud-{i}")).collect();
            let claims = claims("spiffe://example.org/w", json!(aud), 1_800_000_000);
            let input = key.signing_input(&claims).unwrap();
            let token = key.sign(&claims).unwrap();
            assert_eq!(token.len(), input.len() + SIGNED_TOKEN_EXTRA);
            assert!(token.starts_with(&format!("{input}.")));
        }
    }

    fn claims(sub: &str, aud: Value, exp: i64) -> Map<String, Value> {
        let Value::Object(m) = json!({"sub": sub, "aud": aud, "exp": exp, "iat": exp - 300}) else {
            unreachable!()
        };
        m
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    /// A token with any header, signed over its exact bytes by `sign`.
    fn raw_token(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.{}", b64(header), b64(claims));
        let sig = sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn es256(key: &JwtSigningKey) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
        |m| {
            key.pair
                .sign(&SystemRandom::new(), m)
                .unwrap()
                .as_ref()
                .to_vec()
        }
    }

    #[test]
    fn signed_tokens_validate_and_carry_their_claims() {
        let key = JwtSigningKey::generate().unwrap();
        assert_eq!(key.key_id().len(), 22);
        let keys = keyset(td(), vec![key.authority()]);
        let request = JwtSvidRequest {
            spiffe_id: td().spiffe_id("/agent/a").unwrap(),
            audience: vec!["api".into()],
            ttl: Duration::from_secs(300),
            ends_by: None,
            extra_claims: {
                let mut m = Map::new();
                m.insert("task".into(), json!({"id": "t1"}));
                m
            },
        };
        let claims = svid_claims(&request, "j1", unix(t0()), unix(t0()) + 300);
        assert_eq!(claims["aud"], "api", "one audience is a string");
        let token = key.sign(&claims).unwrap();

        let ok = validate(&token, "api", &keys, t0()).unwrap();
        assert_eq!(ok.spiffe_id, request.spiffe_id);
        assert_eq!(ok.key_id, key.key_id());
        assert_eq!(ok.claims, claims);
        assert_eq!(ok.claims["task"]["id"], "t1");

        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            header,
            json!({"alg": "ES256", "kid": key.key_id(), "typ": "JWT"})
        );

        let two = JwtSvidRequest {
            audience: vec!["a".into(), "b".into()],
            ..request
        };
        let claims = svid_claims(&two, "j2", unix(t0()), unix(t0()) + 300);
        assert_eq!(claims["aud"], json!(["a", "b"]));
        let token = key.sign(&claims).unwrap();
        validate(&token, "b", &keys, t0()).unwrap();
        assert_eq!(
            validate(&token, "c", &keys, t0()).unwrap_err(),
            JwtError::AudienceMismatch("c".into())
        );
    }

    #[test]
    fn stored_keys_reload_and_debug_hides_them() {
        let key = JwtSigningKey::generate().unwrap();
        let pem = key.pkcs8_pem();
        let der = ::pem::parse(&pem).unwrap().into_contents();
        let again = JwtSigningKey::from_pkcs8(key.key_id(), &der).unwrap();
        assert_eq!(again.authority(), key.authority());
        let body = pem.lines().nth(1).unwrap();
        assert!(!format!("{key:?}").contains(body));
        for bad in ["", "a/b", "../x", &"k".repeat(129)] {
            assert!(matches!(
                JwtSigningKey::from_pkcs8(bad, &der),
                Err(JwtKeyError::BadKeyId(_))
            ));
        }
        assert_eq!(
            JwtSigningKey::from_pkcs8("k", b"junk").unwrap_err(),
            JwtKeyError::BadKey
        );
    }

    #[test]
    fn structure_and_header_rules() {
        let key = JwtSigningKey::generate().unwrap();
        let keys = keyset(td(), vec![key.authority()]);
        let good_claims =
            json!({"sub": "spiffe://example.org/a", "aud": "api", "exp": unix(t0()) + 60});
        let with_header = |header: Value| raw_token(&header, &good_claims, es256(&key));
        let check = |token: &str| validate(token, "api", &keys, t0()).unwrap_err();
        let kid = key.key_id().to_owned();

        assert!(matches!(check(""), JwtError::Malformed(_)));
        assert!(matches!(check("garbage"), JwtError::Malformed(_)));
        assert!(matches!(check("a.b.c.d"), JwtError::Malformed(_)));
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            check(&big),
            JwtError::TooLarge {
                size: MAX_TOKEN_BYTES + 1,
                limit: MAX_TOKEN_BYTES
            }
        );
        // Padding is not base64url as JWS uses it.
        let token = with_header(json!({"alg": "ES256", "kid": kid}));
        let padded = format!("{token}=");
        assert!(matches!(check(&padded), JwtError::Malformed(m) if m.contains("signature")));

        assert_eq!(
            check(&with_header(json!({"alg": "none", "kid": kid}))),
            JwtError::AlgorithmNotAllowed("none".into())
        );
        assert_eq!(
            check(&with_header(json!({"alg": "ES512", "kid": kid}))),
            JwtError::UnsupportedAlgorithm("ES512".into())
        );
        assert!(
            JwtError::UnsupportedAlgorithm("ES512".into())
                .to_string()
                .starts_with("unsupported algorithm")
        );
        assert!(matches!(
            check(&with_header(json!({"kid": kid}))),
            JwtError::Malformed(m) if m.contains("alg")
        ));
        assert_eq!(
            check(&with_header(
                json!({"alg": "ES256", "kid": kid, "typ": "at+jwt"})
            )),
            JwtError::BadType("at+jwt".into())
        );
        // The refusal quotes the value once, as it appeared in the token.
        assert_eq!(
            JwtError::BadType("at+jwt".into()).to_string(),
            r#"header typ "at+jwt" is not allowed; it must be JWT or JOSE"#
        );
        // A value the token's author chose goes back in a header clients
        // bound (grpc-python's soft limit is 8 KiB): shortened.
        let long = "x".repeat(11_000);
        for refusal in [
            JwtError::AlgorithmNotAllowed(long.clone()),
            JwtError::UnsupportedAlgorithm(long.clone()),
            JwtError::BadType(long.clone()),
            JwtError::UnknownKeyId {
                key_id: long.clone(),
                trust_domain: "writ.test".parse().unwrap(),
            },
            JwtError::KeyMismatch {
                key_id: long.clone(),
                alg: "ES256",
            },
            JwtError::KeyUnusable {
                key_id: long.clone(),
                reason: long.clone(),
            },
        ] {
            let message = refusal.to_string();
            assert!(
                message.len() < 1_000 && message.contains("(11000 bytes)"),
                "{message}"
            );
        }
        assert!(matches!(
            check(&with_header(json!({"alg": "ES256", "kid": kid, "typ": 5}))),
            JwtError::Malformed(m) if m == "header typ is not a string"
        ));
        for typ in ["JWT", "JOSE"] {
            validate(
                &with_header(json!({"alg": "ES256", "kid": kid, "typ": typ})),
                "api",
                &keys,
                t0(),
            )
            .unwrap();
        }
        assert_eq!(
            check(&with_header(
                json!({"alg": "ES256", "kid": kid, "crit": ["b64"], "b64": false})
            )),
            JwtError::CriticalHeader
        );
        assert_eq!(
            check(&with_header(json!({"alg": "ES256"}))),
            JwtError::MissingKeyId
        );
        // Duplicate members: two readers could see two different headers.
        let dup_header = URL_SAFE_NO_PAD.encode(format!(
            "{{\"alg\":\"ES256\",\"kid\":\"{kid}\",\"alg\":\"none\"}}"
        ));
        let input = format!("{dup_header}.{}", b64(&good_claims));
        let sig = es256(&key)(input.as_bytes());
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
        assert!(matches!(check(&token), JwtError::Malformed(m) if m.contains("duplicate")));
        // A payload that is not an object.
        let token = raw_token(
            &json!({"alg": "ES256", "kid": kid}),
            &json!([1]),
            es256(&key),
        );
        assert!(matches!(check(&token), JwtError::Malformed(m) if m.contains("payload")));
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let key = JwtSigningKey::generate().unwrap();
        let keys = keyset(td(), vec![key.authority()]);
        // The classic confusion attack: HMAC keyed with the public key bytes.
        let public = key.pair.public_key().as_ref().to_vec();
        let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public);
        let token = raw_token(
            &json!({"alg": "HS256", "kid": key.key_id()}),
            &json!({"sub": "spiffe://example.org/a", "aud": "api", "exp": unix(t0()) + 60}),
            |m| ring::hmac::sign(&hmac_key, m).as_ref().to_vec(),
        );
        assert_eq!(
            validate(&token, "api", &keys, t0()).unwrap_err(),
            JwtError::AlgorithmNotAllowed("HS256".into())
        );
    }

    #[test]
    fn claims_rules() {
        let key = JwtSigningKey::generate().unwrap();
        let keys = keyset(td(), vec![key.authority()]);
        let now = unix(t0());
        let sign = |c: Map<String, Value>| key.sign(&c).unwrap();
        let check = |c: Map<String, Value>| validate(&sign(c), "api", &keys, t0());

        // exp: required, with skew on either side of it.
        let mut c = claims("spiffe://example.org/a", "api".into(), now);
        c.remove("exp");
        assert_eq!(check(c).unwrap_err(), JwtError::MissingClaim("exp"));
        let skew = CLOCK_SKEW.as_secs() as i64;
        assert_eq!(
            check(claims("spiffe://example.org/a", "api".into(), now - skew)).unwrap_err(),
            JwtError::Expired
        );
        check(claims(
            "spiffe://example.org/a",
            "api".into(),
            now - skew + 1,
        ))
        .unwrap();
        let mut c = claims("spiffe://example.org/a", "api".into(), now + 60);
        c.insert("exp".into(), "soon".into());
        assert!(matches!(
            check(c).unwrap_err(),
            JwtError::BadClaim { claim: "exp", .. }
        ));

        // nbf: optional, with skew.
        let mut c = claims("spiffe://example.org/a", "api".into(), now + 600);
        c.insert("nbf".into(), (now + skew + 1).into());
        assert_eq!(check(c.clone()).unwrap_err(), JwtError::NotYetValid);
        c.insert("nbf".into(), (now + skew).into());
        check(c).unwrap();

        // aud: a string or a non-empty array of strings containing ours.
        for (aud, want) in [
            (
                json!("other"),
                Some(JwtError::AudienceMismatch("api".into())),
            ),
            (json!(["x", "api"]), None),
            (
                json!([]),
                Some(JwtError::BadClaim {
                    claim: "aud",
                    reason: "is empty",
                }),
            ),
            (
                json!(["api", 1]),
                Some(JwtError::BadClaim {
                    claim: "aud",
                    reason: "holds a value that is not a string",
                }),
            ),
            (
                json!(7),
                Some(JwtError::BadClaim {
                    claim: "aud",
                    reason: "is neither a string nor an array of strings",
                }),
            ),
        ] {
            let result = check(claims("spiffe://example.org/a", aud.clone(), now + 60));
            assert_eq!(result.err(), want, "{aud}");
        }
        let mut c = claims("spiffe://example.org/a", "api".into(), now + 60);
        c.remove("aud");
        assert_eq!(check(c).unwrap_err(), JwtError::MissingClaim("aud"));

        // sub: a valid SPIFFE ID of a workload, so with a path.
        assert!(matches!(
            check(claims("https://example.org/a", "api".into(), now + 60)).unwrap_err(),
            JwtError::InvalidSubject(_)
        ));
        assert!(matches!(
            check(claims("spiffe://example.org", "api".into(), now + 60)).unwrap_err(),
            JwtError::InvalidSubject(m) if m.contains("names a trust domain")
        ));
        let mut c = claims("spiffe://example.org/a", "api".into(), now + 60);
        c.remove("sub");
        assert_eq!(check(c).unwrap_err(), JwtError::MissingClaim("sub"));
    }

    #[test]
    fn keys_are_looked_up_per_trust_domain() {
        let ours = JwtSigningKey::generate().unwrap();
        let theirs = JwtSigningKey::generate().unwrap();
        let other = TrustDomain::new("other.org").unwrap();
        let mut keys = keyset(td(), vec![ours.authority()]);
        keys.set_bundle(&TrustBundle {
            jwt_authorities: vec![theirs.authority()],
            ..TrustBundle::new(other.clone())
        });
        let exp = unix(t0()) + 60;

        // Their key vouching for a subject in our domain: not found there.
        let token = theirs
            .sign(&claims("spiffe://example.org/a", "api".into(), exp))
            .unwrap();
        assert_eq!(
            validate(&token, "api", &keys, t0()).unwrap_err(),
            JwtError::UnknownKeyId {
                key_id: theirs.key_id().into(),
                trust_domain: td()
            }
        );
        // ...and in their own domain it is fine.
        let token = theirs
            .sign(&claims("spiffe://other.org/a", "api".into(), exp))
            .unwrap();
        validate(&token, "api", &keys, t0()).unwrap();
        // A domain we hold no bundle for.
        let token = ours
            .sign(&claims("spiffe://third.org/a", "api".into(), exp))
            .unwrap();
        assert_eq!(
            validate(&token, "api", &keys, t0()).unwrap_err(),
            JwtError::NoBundle(TrustDomain::new("third.org").unwrap())
        );
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let key = JwtSigningKey::generate().unwrap();
        let keys = keyset(td(), vec![key.authority()]);
        let token = key
            .sign(&claims(
                "spiffe://example.org/a",
                "api".into(),
                unix(t0()) + 60,
            ))
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged_claims = b64(&json!({
            "sub": "spiffe://example.org/admin", "aud": "api", "exp": unix(t0()) + 60
        }));
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert_eq!(
            validate(&forged, "api", &keys, t0()).unwrap_err(),
            JwtError::BadSignature
        );
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[10] ^= 1;
        let forged = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig));
        assert_eq!(
            validate(&forged, "api", &keys, t0()).unwrap_err(),
            JwtError::BadSignature
        );
    }

    fn rsa_test_key() -> (RsaKeyPair, JwtAuthority) {
        let text = include_str!("bundle/testdata/rsa2048-jwt-test-key.pem");
        let der = ::pem::parse(text).unwrap().into_contents();
        let pair = RsaKeyPair::from_pkcs8(&der).unwrap();
        let components: RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
        let mut jwk = Map::new();
        jwk.insert("kty".into(), "RSA".into());
        // A redundant leading zero, as some encoders write it, must not matter.
        let mut n = vec![0u8];
        n.extend_from_slice(&components.n);
        jwk.insert("n".into(), URL_SAFE_NO_PAD.encode(n).into());
        jwk.insert("e".into(), URL_SAFE_NO_PAD.encode(&components.e).into());
        (
            pair,
            JwtAuthority {
                key_id: "rsa".into(),
                public_key_jwk: jwk,
            },
        )
    }

    #[test]
    fn rsa_and_p384_authorities_verify_their_algorithms_only() {
        let (rsa, rsa_authority) = rsa_test_key();
        let p384 = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .unwrap()
            .as_ref(),
            &SystemRandom::new(),
        )
        .unwrap();
        let point = &p384.public_key().as_ref()[1..];
        let mut jwk = Map::new();
        jwk.insert("kty".into(), "EC".into());
        jwk.insert("crv".into(), "P-384".into());
        jwk.insert("x".into(), URL_SAFE_NO_PAD.encode(&point[..48]).into());
        jwk.insert("y".into(), URL_SAFE_NO_PAD.encode(&point[48..]).into());
        let p384_authority = JwtAuthority {
            key_id: "p384".into(),
            public_key_jwk: jwk,
        };
        let keys = keyset(td(), vec![rsa_authority, p384_authority]);
        let body = json!({"sub": "spiffe://example.org/a", "aud": "api", "exp": unix(t0()) + 60});

        for (alg, padding) in [
            (
                "RS256",
                &signature::RSA_PKCS1_SHA256 as &dyn signature::RsaEncoding,
            ),
            ("RS384", &signature::RSA_PKCS1_SHA384),
            ("RS512", &signature::RSA_PKCS1_SHA512),
            ("PS256", &signature::RSA_PSS_SHA256),
            ("PS384", &signature::RSA_PSS_SHA384),
            ("PS512", &signature::RSA_PSS_SHA512),
        ] {
            let token = raw_token(&json!({"alg": alg, "kid": "rsa"}), &body, |m| {
                let mut sig = vec![0; rsa.public().modulus_len()];
                rsa.sign(padding, &SystemRandom::new(), m, &mut sig)
                    .unwrap();
                sig
            });
            validate(&token, "api", &keys, t0()).unwrap_or_else(|e| panic!("{alg}: {e}"));
            // The same signature claimed under an EC algorithm is refused.
            let relabelled = token.replacen(
                &b64(&json!({"alg": alg, "kid": "rsa"})),
                &b64(&json!({"alg": "ES256", "kid": "rsa"})),
                1,
            );
            assert_eq!(
                validate(&relabelled, "api", &keys, t0()).unwrap_err(),
                JwtError::KeyMismatch {
                    key_id: "rsa".into(),
                    alg: "ES256"
                }
            );
        }
        let token = raw_token(&json!({"alg": "ES384", "kid": "p384"}), &body, |m| {
            p384.sign(&SystemRandom::new(), m)
                .unwrap()
                .as_ref()
                .to_vec()
        });
        validate(&token, "api", &keys, t0()).unwrap();
        let wrong_curve = raw_token(&json!({"alg": "ES256", "kid": "p384"}), &body, |m| {
            p384.sign(&SystemRandom::new(), m)
                .unwrap()
                .as_ref()
                .to_vec()
        });
        assert_eq!(
            validate(&wrong_curve, "api", &keys, t0()).unwrap_err(),
            JwtError::KeyMismatch {
                key_id: "p384".into(),
                alg: "ES256"
            }
        );
    }

    #[test]
    fn unusable_bundle_keys_say_why() {
        let mut jwk = Map::new();
        jwk.insert("kty".into(), "EC".into());
        jwk.insert("crv".into(), "P-521".into());
        jwk.insert("x".into(), URL_SAFE_NO_PAD.encode([1u8; 10]).into());
        jwk.insert("y".into(), URL_SAFE_NO_PAD.encode([1u8; 10]).into());
        let keys = keyset(
            td(),
            vec![JwtAuthority {
                key_id: "odd".into(),
                public_key_jwk: jwk,
            }],
        );
        let key = JwtSigningKey::generate().unwrap();
        let token = raw_token(
            &json!({"alg": "ES256", "kid": "odd"}),
            &json!({"sub": "spiffe://example.org/a", "aud": "api", "exp": unix(t0()) + 60}),
            es256(&key),
        );
        assert!(matches!(
            validate(&token, "api", &keys, t0()).unwrap_err(),
            JwtError::KeyUnusable { key_id, reason } if key_id == "odd" && reason.contains("length")
        ));
    }

    #[test]
    fn claims_become_a_protobuf_struct() {
        let Value::Object(claims) = json!({
            "sub": "spiffe://example.org/a", "exp": 1_800_000_000, "ok": true,
            "aud": ["a", "b"], "task": {"id": "t", "parent_id": null}
        }) else {
            unreachable!()
        };
        use prost_types::value::Kind;
        let s = claims_to_struct(&claims);
        assert_eq!(
            s.fields["exp"].kind,
            Some(Kind::NumberValue(1_800_000_000.0))
        );
        assert_eq!(s.fields["ok"].kind, Some(Kind::BoolValue(true)));
        let Some(Kind::ListValue(aud)) = &s.fields["aud"].kind else {
            panic!("aud is not a list");
        };
        assert_eq!(aud.values.len(), 2);
        let Some(Kind::StructValue(task)) = &s.fields["task"].kind else {
            panic!("task is not a struct");
        };
        assert_eq!(task.fields["parent_id"].kind, Some(Kind::NullValue(0)));
        assert_eq!(task.fields["id"].kind, Some(Kind::StringValue("t".into())));
    }
}
