//! SPIFFE bundle documents: a trust domain's X.509 and JWT authorities as a
//! JWK Set (`spiffe_sequence`, `spiffe_refresh_hint`) or as PEM, written out
//! and parsed back strictly, plus the byte forms the Workload API sends.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::spiffe_id::TrustDomain;

/// Largest bundle document or PEM text accepted (federation peers send these).
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

const USE_X509: &str = "x509-svid";
const USE_JWT: &str = "jwt-svid";

/// A JWT signing key of a trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    pub key_id: String,
    /// The JWK without `use` and `kid` (`kty`, `crv`, `x`, `y` or `n`, `e`).
    pub public_key_jwk: Map<String, Value>,
}

/// The trust anchors of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    /// CA certificates, DER.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    pub jwt_authorities: Vec<JwtAuthority>,
    pub sequence: u64,
    pub refresh_hint: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("bundle is not valid JSON: {0}")]
    Json(String),
    #[error("bundle must be a JSON object")]
    NotAnObject,
    #[error("bundle has no \"keys\" member")]
    MissingKeys,
    #[error("bundle member {member:?} {problem}")]
    BadMember {
        member: &'static str,
        problem: &'static str,
    },
    #[error("keys[{index}]: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("two jwt-svid keys share the key ID {0:?}")]
    DuplicateKeyId(String),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("PEM text holds no CERTIFICATE block")]
    NoCertificates,
    #[error("certificate {index}: {reason}")]
    BadCertificate { index: usize, reason: String },
}

/// Whether `a` and `b` hold the same items, each as often, in any order.
/// Bundles hold a handful of keys, so pairing them off is cheap.
fn same_items<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut paired = vec![false; b.len()];
    a.iter().all(|item| {
        let partner = (0..b.len()).find(|&i| !paired[i] && b[i] == *item);
        partner.map(|i| paired[i] = true).is_some()
    })
}

impl TrustBundle {
    /// The same X.509 and JWT authorities, whatever their order: a bundle
    /// endpoint may list its keys in another order on every fetch (SPIRE's
    /// does), and that changes nothing a relying party trusts.
    pub fn same_authorities(&self, other: &TrustBundle) -> bool {
        same_items(&self.x509_authorities, &other.x509_authorities)
            && same_items(&self.jwt_authorities, &other.jwt_authorities)
    }

    /// `same_authorities`, for the same trust domain, with the same
    /// sequence number and refresh hint: nothing worth storing again.
    pub fn same_content(&self, other: &TrustBundle) -> bool {
        self.trust_domain == other.trust_domain
            && self.sequence == other.sequence
            && self.refresh_hint == other.refresh_hint
            && self.same_authorities(other)
    }

    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// The SPIFFE bundle document. X.509 authorities carry `use`,
    /// their key as JWK parameters, and `x5c` with exactly one standard
    /// base64 DER certificate; JWT authorities carry `use` and `kid`.
    pub fn to_spiffe_json(&self) -> Vec<u8> {
        let mut keys: Vec<Value> = self
            .x509_authorities
            .iter()
            .map(|cert| {
                // Parsers here only admit certificates with a JWK form; one
                // pushed in by hand without it keeps `use` and `x5c` only.
                let mut jwk = cert_jwk(cert).unwrap_or_default();
                jwk.insert("use".into(), USE_X509.into());
                jwk.insert(
                    "x5c".into(),
                    vec![Value::from(STANDARD.encode(cert))].into(),
                );
                Value::Object(jwk)
            })
            .collect();
        keys.extend(self.jwt_keys());
        let mut doc = Map::new();
        doc.insert("keys".into(), keys.into());
        doc.insert("spiffe_sequence".into(), self.sequence.into());
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), hint.as_secs().into());
        }
        let mut out = serde_json::to_vec_pretty(&Value::Object(doc)).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses a SPIFFE bundle document strictly: size-limited, one JSON
    /// object without duplicate member names, `keys` required. Keys with an
    /// unknown `use` or `kty` are skipped, as the spec requires; malformed
    /// keys of a known kind are errors.
    pub fn from_spiffe_json(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        check_size(bytes.len())?;
        let doc = parse_strict_json(bytes)?;
        let Value::Object(doc) = doc else {
            return Err(BundleError::NotAnObject);
        };
        let keys = match doc.get("keys") {
            None => return Err(BundleError::MissingKeys),
            Some(Value::Array(keys)) => keys,
            Some(_) => {
                return Err(BundleError::BadMember {
                    member: "keys",
                    problem: "is not an array",
                });
            }
        };
        let sequence = match doc.get("spiffe_sequence") {
            None => 0,
            Some(v) => v.as_u64().ok_or(BundleError::BadMember {
                member: "spiffe_sequence",
                problem: "is not a non-negative integer",
            })?,
        };
        let refresh_hint = match doc.get("spiffe_refresh_hint") {
            None => None,
            Some(v) => Some(Duration::from_secs(v.as_u64().ok_or(
                BundleError::BadMember {
                    member: "spiffe_refresh_hint",
                    problem: "is not a non-negative integer (seconds)",
                },
            )?)),
        };

        let mut bundle = Self {
            refresh_hint,
            sequence,
            ..Self::new(trust_domain)
        };
        for (index, key) in keys.iter().enumerate() {
            let bad = |reason: String| BundleError::BadKey { index, reason };
            let Value::Object(key) = key else {
                return Err(bad("not a JSON object".into()));
            };
            let key_use = match key.get("use") {
                // No `use` means the key is not a SPIFFE authority.
                None => continue,
                Some(Value::String(u)) => u.as_str(),
                Some(_) => return Err(bad("\"use\" is not a string".into())),
            };
            if key_use != USE_X509 && key_use != USE_JWT {
                continue;
            }
            let kty = match key.get("kty") {
                Some(Value::String(k)) => k.as_str(),
                Some(_) => return Err(bad("\"kty\" is not a string".into())),
                None => return Err(bad("\"kty\" is missing".into())),
            };
            if key_use == USE_X509 {
                if !matches!(kty, "EC" | "RSA" | "OKP") {
                    continue;
                }
                let cert = parse_x509_key(key, kty).map_err(bad)?;
                if !bundle.x509_authorities.contains(&cert) {
                    bundle.x509_authorities.push(cert);
                }
            } else {
                let Some(authority) = parse_jwt_key(key, kty).map_err(bad)? else {
                    continue;
                };
                if bundle
                    .jwt_authorities
                    .iter()
                    .any(|a| a.key_id == authority.key_id)
                {
                    return Err(BundleError::DuplicateKeyId(authority.key_id));
                }
                bundle.jwt_authorities.push(authority);
            }
        }
        Ok(bundle)
    }

    /// The X.509 authorities as concatenated PEM blocks.
    pub fn to_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|c| pem_lf("CERTIFICATE", c))
            .collect()
    }

    /// Reads X.509 authorities from PEM (as `spire-server bundle show`
    /// prints them). Only CERTIFICATE blocks are allowed, each a CA.
    pub fn from_pem(trust_domain: TrustDomain, text: &str) -> Result<Self, BundleError> {
        check_size(text.len())?;
        let blocks = pem::parse_many(text).map_err(|e| BundleError::Pem(e.to_string()))?;
        let mut bundle = Self::new(trust_domain);
        for (index, block) in blocks.into_iter().enumerate() {
            if block.tag() != "CERTIFICATE" {
                return Err(BundleError::Pem(format!(
                    "block {index} is {:?}, expected CERTIFICATE",
                    block.tag()
                )));
            }
            let cert = CertificateDer::from(block.into_contents());
            check_authority_cert(&cert)
                .map_err(|reason| BundleError::BadCertificate { index, reason })?;
            if !bundle.x509_authorities.contains(&cert) {
                bundle.x509_authorities.push(cert);
            }
        }
        if bundle.x509_authorities.is_empty() {
            return Err(BundleError::NoCertificates);
        }
        Ok(bundle)
    }

    /// Concatenated DER of the X.509 authorities: the Workload API's
    /// `bundle` and X.509 bundle map values.
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect()
    }

    /// A JWKS of the jwt-svid keys only, for FetchJWTBundles.
    pub fn jwt_jwks_json(&self) -> Vec<u8> {
        let mut doc = Map::new();
        doc.insert("keys".into(), self.jwt_keys().collect::<Vec<_>>().into());
        serde_json::to_vec(&Value::Object(doc)).unwrap_or_default()
    }

    fn jwt_keys(&self) -> impl Iterator<Item = Value> + '_ {
        self.jwt_authorities.iter().map(|a| {
            let mut jwk = a.public_key_jwk.clone();
            jwk.insert("use".into(), USE_JWT.into());
            jwk.insert("kid".into(), a.key_id.clone().into());
            Value::Object(jwk)
        })
    }
}

impl fmt::Display for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bundle of {} (sequence {}, {} X.509 and {} JWT authorities)",
            self.trust_domain,
            self.sequence,
            self.x509_authorities.len(),
            self.jwt_authorities.len()
        )
    }
}

/// PEM with LF line endings (the `pem` crate defaults to CRLF).
pub(crate) fn pem_lf(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn check_size(size: usize) -> Result<(), BundleError> {
    if size > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge {
            size,
            limit: MAX_BUNDLE_BYTES,
        });
    }
    Ok(())
}

/// An x509-svid entry: exactly one CA certificate in `x5c`, whose key
/// agrees with every JWK parameter the entry states.
fn parse_x509_key(key: &Map<String, Value>, kty: &str) -> Result<CertificateDer<'static>, String> {
    let x5c = match key.get("x5c") {
        Some(Value::Array(x5c)) => x5c,
        Some(_) => return Err("\"x5c\" is not an array".into()),
        None => return Err("x509-svid key has no \"x5c\"".into()),
    };
    let [Value::String(b64)] = x5c.as_slice() else {
        return Err(format!(
            "\"x5c\" must hold exactly one base64 certificate, found {} entries",
            x5c.len()
        ));
    };
    let der = STANDARD
        .decode(b64)
        .map_err(|e| format!("\"x5c\" is not standard base64: {e}"))?;
    let cert = CertificateDer::from(der);
    check_authority_cert(&cert)?;
    let derived = cert_jwk(&cert)?;
    if derived.get("kty").and_then(Value::as_str) != Some(kty) {
        return Err(format!(
            "\"kty\" is {kty:?} but the certificate's key is {}",
            derived.get("kty").and_then(Value::as_str).unwrap_or("?")
        ));
    }
    for (name, want) in &derived {
        let Some(stated) = key.get(name) else {
            continue;
        };
        let same = match name.as_str() {
            // Integers: tolerate a redundant leading zero byte.
            "n" | "e" => decode_uint(stated) == decode_uint(want),
            _ => stated == want,
        };
        if !same {
            return Err(format!(
                "\"{name}\" does not match the public key of the certificate in \"x5c\""
            ));
        }
    }
    Ok(cert)
}

fn decode_uint(v: &Value) -> Option<Vec<u8>> {
    let bytes = URL_SAFE_NO_PAD.decode(v.as_str()?).ok()?;
    Some(without_leading_zeros(&bytes).to_vec())
}

fn without_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// A jwt-svid entry, or `Ok(None)` for a key type JWT-SVIDs cannot use
/// (the spec has clients ignore those entirely, so they are not checked).
fn parse_jwt_key(key: &Map<String, Value>, kty: &str) -> Result<Option<JwtAuthority>, String> {
    let needed: &[(&str, usize)] = match (kty, key.get("crv").and_then(Value::as_str)) {
        ("EC", Some("P-256")) => &[("x", 32), ("y", 32)],
        ("EC", Some("P-384")) => &[("x", 48), ("y", 48)],
        ("EC", Some("P-521")) => &[("x", 66), ("y", 66)],
        // Modulus and exponent: any non-empty length.
        ("RSA", _) => &[("n", 0), ("e", 0)],
        _ => return Ok(None),
    };
    let key_id = match key.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.clone(),
        Some(_) => return Err("\"kid\" must be a non-empty string".into()),
        None => return Err("jwt-svid key has no \"kid\"".into()),
    };
    let mut parts = Vec::with_capacity(needed.len());
    for &(name, size) in needed {
        let text = key
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("jwt-svid key {key_id:?} lacks \"{name}\""))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|e| format!("\"{name}\" of key {key_id:?} is not base64url: {e}"))?;
        let fits = if size == 0 {
            !bytes.is_empty()
        } else {
            bytes.len() == size
        };
        if !fits {
            return Err(format!(
                "\"{name}\" of key {key_id:?} has the wrong length for its key type"
            ));
        }
        parts.push(bytes);
    }
    // A key clients cannot load makes go-spiffe and py-spiffe refuse the
    // whole JWT bundle set they are sent, writ's own keys included.
    match (kty, parts.as_slice()) {
        ("EC", [x, y]) => {
            let crv = key.get("crv").and_then(Value::as_str).unwrap_or("");
            if !nist_curve_has_point(crv, x, y) {
                return Err(format!(
                    "jwt-svid key {key_id:?}: (x, y) is not a point of {crv}"
                ));
            }
        }
        ("RSA", [n, e]) => check_rsa_public_key(n, e)
            .map_err(|reason| format!("jwt-svid key {key_id:?}: {reason}"))?,
        _ => {}
    }
    let mut public_key_jwk = key.clone();
    public_key_jwk.remove("use");
    public_key_jwk.remove("kid");
    Ok(Some(JwtAuthority {
        key_id,
        public_key_jwk,
    }))
}

/// Whether (x, y) lies on the NIST prime curve `crv`: both coordinates
/// below p and y² = x³ − 3x + b (mod p). These curves have cofactor 1, so
/// every such point is in the group signatures are checked in.
fn nist_curve_has_point(crv: &str, x: &[u8], y: &[u8]) -> bool {
    use num_bigint::BigUint;
    let (p_hex, b_hex) = match crv {
        "P-256" => (
            "ffffffff00000001000000000000000000000000ffffffffffffffffffffffff",
            "5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b",
        ),
        "P-384" => (
            "fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffeffffffff0000000000000000ffffffff",
            "b3312fa7e23ee7e4988e056be3f82d19181d9c6efe8141120314088f5013875ac656398d8a2ed19d2a85c8edd3ec2aef",
        ),
        "P-521" => (
            "01ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "0051953eb9618e1c9a1f929a21a0b68540eea2da725b99b315f3b8b489918ef109e156193951ec7e937b1652c0bd3bb1bf073573df883d2c34f1ef451fd46b503f00",
        ),
        _ => return false,
    };
    let (Some(p), Some(b)) = (
        BigUint::parse_bytes(p_hex.as_bytes(), 16),
        BigUint::parse_bytes(b_hex.as_bytes(), 16),
    ) else {
        return false;
    };
    let (x, y) = (BigUint::from_bytes_be(x), BigUint::from_bytes_be(y));
    if x >= p || y >= p {
        return false;
    }
    let three_x = (&x * 3u32) % &p;
    let rhs = ((&x * &x % &p * &x % &p) + &p - three_x + b) % &p;
    (&y * &y) % &p == rhs
}

/// What an RSA key needs for JWT-SVIDs: a modulus of 2048 to 8192 bits (the
/// sizes verifiers accept; writ's own verifier refuses others too) and an
/// odd public exponent of at least 3.
fn check_rsa_public_key(n: &[u8], e: &[u8]) -> Result<(), String> {
    let (n, e) = (without_leading_zeros(n), without_leading_zeros(e));
    let bits = match n.first() {
        Some(top) => n.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    };
    if !(2048..=8192).contains(&bits) {
        return Err(format!(
            "an RSA modulus of {bits} bits (2048 to 8192 are usable)"
        ));
    }
    if n.last().is_some_and(|b| b % 2 == 0) {
        return Err("an even RSA modulus".into());
    }
    let odd = e.last().is_some_and(|b| b % 2 == 1);
    if !odd || (e.len() == 1 && e[0] < 3) || e.len() > 8 {
        return Err("an RSA public exponent that is not an odd number from 3 to 2^64".into());
    }
    Ok(())
}

/// When an X.509 authority stops being valid, in seconds since the epoch;
/// None for DER that does not parse as a certificate.
pub fn not_after_unix(cert: &[u8]) -> Option<i64> {
    validity_unix(cert).map(|(_, not_after)| not_after)
}

/// A certificate's notBefore and notAfter, seconds since the epoch.
pub fn validity_unix(cert: &[u8]) -> Option<(i64, i64)> {
    X509Certificate::from_der(cert).ok().map(|(_, parsed)| {
        let validity = parsed.validity();
        (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        )
    })
}

/// A bundle may only hold CA certificates whose key has a JWK form.
fn check_authority_cert(cert: &[u8]) -> Result<(), String> {
    let (rest, parsed) =
        X509Certificate::from_der(cert).map_err(|e| format!("not a valid certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    let is_ca = parsed
        .basic_constraints()
        .map_err(|e| format!("bad basicConstraints: {e}"))?
        .is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err("not a CA certificate (basicConstraints cA is not true)".into());
    }
    cert_jwk(cert).map(|_| ())
}

/// The JWK parameters (`kty` and key material) of a certificate's key.
fn cert_jwk(cert: &[u8]) -> Result<Map<String, Value>, String> {
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| format!("not a valid certificate: {e}"))?;
    let spki = parsed.public_key();
    let alg = &spki.algorithm.algorithm;
    let mut jwk = Map::new();
    let b64 = |bytes: &[u8]| Value::from(URL_SAFE_NO_PAD.encode(bytes));
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or("EC key without a named curve")?;
        let (crv, size) = if curve == OID_EC_P256 {
            ("P-256", 32)
        } else if curve == OID_NIST_EC_P384 {
            ("P-384", 48)
        } else if curve == OID_NIST_EC_P521 {
            ("P-521", 66)
        } else {
            return Err(format!("EC curve {curve} has no JWK form"));
        };
        let point = spki.subject_public_key.data.as_ref();
        match point.split_first() {
            Some((0x04, xy)) if xy.len() == 2 * size => {
                jwk.insert("kty".into(), "EC".into());
                jwk.insert("crv".into(), crv.into());
                jwk.insert("x".into(), b64(&xy[..size]));
                jwk.insert("y".into(), b64(&xy[size..]));
            }
            _ => return Err("EC public key is not an uncompressed point".into()),
        }
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err("RSA public key does not parse".into());
        };
        let strip = |b: &[u8]| -> Vec<u8> {
            let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
            b[start..].to_vec()
        };
        jwk.insert("kty".into(), "RSA".into());
        jwk.insert("n".into(), b64(&strip(rsa.modulus)));
        jwk.insert("e".into(), b64(&strip(rsa.exponent)));
    } else if *alg == OID_SIG_ED25519 {
        jwk.insert("kty".into(), "OKP".into());
        jwk.insert("crv".into(), "Ed25519".into());
        jwk.insert("x".into(), b64(spki.subject_public_key.data.as_ref()));
    } else {
        return Err(format!("public key algorithm {alg} has no JWK form"));
    }
    Ok(jwk)
}

/// Parses JSON, rejecting duplicate member names at any depth (serde_json
/// would silently keep the last one, letting two readers disagree).
fn parse_strict_json(bytes: &[u8]) -> Result<Value, BundleError> {
    strict_json(bytes).map_err(BundleError::Json)
}

/// One JSON value with no duplicate member names at any depth and nothing
/// after it; the error is serde_json's description. JWT headers and claims
/// are read the same way, for the same reason.
pub(crate) fn strict_json(bytes: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let StrictValue(value) = StrictValue::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if members.contains_key(&name) {
                return Err(de::Error::custom(format!("duplicate member {name:?}")));
            }
            let StrictValue(v) = map.next_value()?;
            members.insert(name, v);
        }
        Ok(Value::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

    fn td() -> TrustDomain {
        TrustDomain::new("domain1.test").unwrap()
    }

    fn fixture(name: &str) -> Vec<u8> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/bundle/testdata");
        std::fs::read(format!("{dir}/{name}")).unwrap()
    }

    fn ca_cert() -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()
    }

    fn leaf_cert() -> CertificateDer<'static> {
        CertificateParams::new(vec!["x.test".to_owned()])
            .unwrap()
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()
    }

    fn jwt_authority(kid: &str) -> JwtAuthority {
        let key = KeyPair::generate().unwrap();
        let point = &key.public_key_raw()[1..];
        let mut jwk = Map::new();
        jwk.insert("kty".into(), "EC".into());
        jwk.insert("crv".into(), "P-256".into());
        jwk.insert("x".into(), URL_SAFE_NO_PAD.encode(&point[..32]).into());
        jwk.insert("y".into(), URL_SAFE_NO_PAD.encode(&point[32..]).into());
        JwtAuthority {
            key_id: kid.into(),
            public_key_jwk: jwk,
        }
    }

    #[test]
    fn authorities_compare_whatever_their_order() {
        let (c1, c2) = (ca_cert(), ca_cert());
        let (j1, j2) = (jwt_authority("k1"), jwt_authority("k2"));
        let bundle = |x509: Vec<CertificateDer<'static>>, jwt: Vec<JwtAuthority>| {
            let mut b = TrustBundle::new(td());
            b.x509_authorities = x509;
            b.jwt_authorities = jwt;
            b
        };
        let a = bundle(vec![c1.clone(), c2.clone()], vec![j1.clone(), j2.clone()]);
        let reordered = bundle(vec![c2.clone(), c1.clone()], vec![j2.clone(), j1.clone()]);
        assert!(a.same_authorities(&reordered) && a.same_content(&reordered));
        // Each item as often: a repeat is not a stand-in for another key.
        let repeated = bundle(vec![c1.clone(), c1.clone()], vec![j1.clone(), j2.clone()]);
        assert!(!a.same_authorities(&repeated));
        let fewer = bundle(vec![c1.clone(), c2.clone()], vec![j1.clone()]);
        assert!(!a.same_authorities(&fewer));
        let mut next = reordered.clone();
        next.sequence += 1;
        assert!(a.same_authorities(&next) && !a.same_content(&next));
    }

    fn sample() -> TrustBundle {
        TrustBundle {
            trust_domain: td(),
            x509_authorities: vec![ca_cert(), ca_cert()],
            jwt_authorities: vec![jwt_authority("k1"), jwt_authority("k2")],
            sequence: 7,
            refresh_hint: Some(Duration::from_secs(300)),
        }
    }

    fn parse(json: &str) -> Result<TrustBundle, BundleError> {
        TrustBundle::from_spiffe_json(td(), json.as_bytes())
    }

    fn x509_entry(cert: &[u8]) -> Value {
        let mut jwk = cert_jwk(cert).unwrap();
        jwk.insert("use".into(), USE_X509.into());
        jwk.insert(
            "x5c".into(),
            vec![Value::from(STANDARD.encode(cert))].into(),
        );
        Value::Object(jwk)
    }

    fn doc_with(keys: Vec<Value>) -> String {
        serde_json::json!({ "keys": keys }).to_string()
    }

    #[test]
    fn spiffe_json_round_trips() {
        let bundle = sample();
        let json = bundle.to_spiffe_json();
        let back = TrustBundle::from_spiffe_json(td(), &json).unwrap();
        assert_eq!(back, bundle);

        let doc: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(doc["spiffe_sequence"], 7);
        assert_eq!(doc["spiffe_refresh_hint"], 300);
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 4);
        let x509 = &keys[0];
        assert_eq!(x509["use"], "x509-svid");
        assert_eq!(x509["kty"], "EC");
        assert_eq!(x509["crv"], "P-256");
        assert!(x509.get("kid").is_none());
        let x5c = x509["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        assert_eq!(
            STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(),
            bundle.x509_authorities[0].to_vec()
        );
        assert_eq!(keys[2]["use"], "jwt-svid");
        assert_eq!(keys[2]["kid"], "k1");

        // No refresh hint: the member is omitted and reads back as None.
        let mut plain = sample();
        plain.refresh_hint = None;
        let json = plain.to_spiffe_json();
        let doc: Value = serde_json::from_slice(&json).unwrap();
        assert!(doc.get("spiffe_refresh_hint").is_none());
        assert_eq!(TrustBundle::from_spiffe_json(td(), &json).unwrap(), plain);
    }

    #[test]
    fn pem_round_trips_and_rejects_non_cas() {
        let bundle = sample();
        let text = bundle.to_pem();
        assert!(!text.contains('\r'));
        let back = TrustBundle::from_pem(td(), &text).unwrap();
        assert_eq!(back.x509_authorities, bundle.x509_authorities);
        assert!(back.jwt_authorities.is_empty());

        let leaf = pem_lf("CERTIFICATE", &leaf_cert());
        assert!(matches!(
            TrustBundle::from_pem(td(), &leaf),
            Err(BundleError::BadCertificate { index: 0, .. })
        ));
        assert_eq!(
            TrustBundle::from_pem(td(), "").unwrap_err(),
            BundleError::NoCertificates
        );
        let key = KeyPair::generate().unwrap().serialize_pem();
        assert!(matches!(
            TrustBundle::from_pem(td(), &format!("{text}{key}")),
            Err(BundleError::Pem(_))
        ));
    }

    #[test]
    fn workload_api_forms() {
        let bundle = sample();
        let concat = bundle.x509_der_concat();
        let mut want = bundle.x509_authorities[0].to_vec();
        want.extend_from_slice(&bundle.x509_authorities[1]);
        assert_eq!(concat, want);

        let jwks: Value = serde_json::from_slice(&bundle.jwt_jwks_json()).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        assert!(
            keys.iter()
                .all(|k| k["use"] == "jwt-svid" && k.get("x5c").is_none())
        );
        assert_eq!(keys[1]["kid"], "k2");
        assert_eq!(keys[1]["x"], bundle.jwt_authorities[1].public_key_jwk["x"]);
    }

    #[test]
    fn parses_spire_fixtures() {
        let cli =
            TrustBundle::from_spiffe_json(td(), &fixture("spire-cli-test-bundle.json")).unwrap();
        assert_eq!(cli.sequence, 42);
        assert_eq!(cli.refresh_hint, Some(Duration::from_secs(60)));
        assert_eq!(cli.x509_authorities.len(), 1);
        assert!(cli.jwt_authorities.is_empty());

        let ca =
            TrustBundle::from_spiffe_json(td(), &fixture("spire-integration-fixture-ca.spiffe"))
                .unwrap();
        assert_eq!(ca.sequence, 0);
        assert_eq!(ca.refresh_hint, None);
        assert_eq!(ca.x509_authorities, cli.x509_authorities);
        assert_eq!(ca.jwt_authorities.len(), 1);
        let jwt = &ca.jwt_authorities[0];
        assert_eq!(jwt.key_id, "KID");
        assert_eq!(jwt.public_key_jwk["kty"], "EC");
        assert_eq!(
            jwt.public_key_jwk["x"],
            "fK-wKTnKL7KFLM27lqq5DC-bxrVaH6rDV-IcCSEOeL4"
        );
        assert!(jwt.public_key_jwk.get("use").is_none());
        assert!(jwt.public_key_jwk.get("kid").is_none());

        // Writing it out and reading it back preserves everything.
        let again = TrustBundle::from_spiffe_json(td(), &ca.to_spiffe_json()).unwrap();
        assert_eq!(again, ca);
    }

    #[test]
    fn rejects_malformed_documents() {
        let ca = ca_cert();
        let good = x509_entry(&ca);
        let cases: Vec<(&str, String)> = vec![
            ("truncated", "{\"keys\": [".into()),
            ("trailing garbage", "{\"keys\": []} x".into()),
            ("array", "[]".into()),
            ("missing keys", "{\"spiffe_sequence\": 1}".into()),
            ("keys not array", "{\"keys\": {}}".into()),
            (
                "duplicate top-level member",
                "{\"keys\": [], \"keys\": []}".into(),
            ),
            (
                "duplicate nested member",
                format!(
                    "{{\"keys\": [{}]}}",
                    good.to_string()
                        .replacen("\"use\"", "\"use\":\"x509-svid\",\"use\"", 1)
                ),
            ),
            (
                "negative sequence",
                "{\"keys\": [], \"spiffe_sequence\": -1}".into(),
            ),
            (
                "string hint",
                "{\"keys\": [], \"spiffe_refresh_hint\": \"60\"}".into(),
            ),
            ("key not object", "{\"keys\": [1]}".into()),
        ];
        for (name, json) in cases {
            let err = parse(&json).unwrap_err();
            if name.starts_with("duplicate") {
                assert!(
                    err.to_string().contains("duplicate member"),
                    "{name}: {err}"
                );
            }
        }
        let dup = parse("{\"keys\": [], \"keys\": []}").unwrap_err();
        assert!(
            matches!(&dup, BundleError::Json(m) if m.starts_with("duplicate member \"keys\"")),
            "{dup}"
        );
        assert_eq!(parse("{}").unwrap_err(), BundleError::MissingKeys);
        assert_eq!(parse("[]").unwrap_err(), BundleError::NotAnObject);
    }

    #[test]
    fn rejects_bad_x509_entries() {
        let ca = ca_cert();
        let bad_key = |entry: Value| {
            let err = parse(&doc_with(vec![entry])).unwrap_err();
            match err {
                BundleError::BadKey { index: 0, reason } => reason,
                other => panic!("unexpected {other:?}"),
            }
        };

        let mut leaf = x509_entry(&leaf_cert());
        assert!(bad_key(leaf.clone()).contains("not a CA"));
        leaf["x5c"] = Value::Array(vec![]);
        assert!(bad_key(leaf).contains("exactly one"));

        let mut two = x509_entry(&ca);
        two["x5c"] = vec![
            Value::from(STANDARD.encode(&ca)),
            Value::from(STANDARD.encode(ca_cert())),
        ]
        .into();
        assert!(bad_key(two).contains("exactly one"));

        let mut no_x5c = x509_entry(&ca);
        no_x5c.as_object_mut().unwrap().remove("x5c");
        assert!(bad_key(no_x5c).contains("no \"x5c\""));

        let mut url_b64 = x509_entry(&ca);
        url_b64["x5c"] = vec![Value::from(URL_SAFE_NO_PAD.encode(&ca))].into();
        assert!(bad_key(url_b64).contains("base64"));

        let mut wrong_x = x509_entry(&ca);
        wrong_x["x"] = x509_entry(&ca_cert())["x"].clone();
        assert!(bad_key(wrong_x).contains("\"x\" does not match"));

        let mut wrong_kty = x509_entry(&ca);
        wrong_kty["kty"] = "RSA".into();
        assert!(bad_key(wrong_kty).contains("kty"));

        let mut no_kty = x509_entry(&ca);
        no_kty.as_object_mut().unwrap().remove("kty");
        assert!(bad_key(no_kty).contains("kty"));

        // JWK parameters are optional; x5c alone is enough.
        let mut bare = serde_json::Map::new();
        bare.insert("use".into(), "x509-svid".into());
        bare.insert("kty".into(), "EC".into());
        bare.insert("x5c".into(), vec![Value::from(STANDARD.encode(&ca))].into());
        let ok = parse(&doc_with(vec![Value::Object(bare)])).unwrap();
        assert_eq!(ok.x509_authorities, vec![ca.clone()]);
    }

    #[test]
    fn rejects_bad_jwt_entries() {
        let entry = |kid: Option<&str>| {
            let a = jwt_authority("x");
            let mut jwk = a.public_key_jwk;
            jwk.insert("use".into(), "jwt-svid".into());
            if let Some(kid) = kid {
                jwk.insert("kid".into(), kid.into());
            }
            Value::Object(jwk)
        };
        assert!(matches!(
            parse(&doc_with(vec![entry(None)])),
            Err(BundleError::BadKey { .. })
        ));
        assert!(matches!(
            parse(&doc_with(vec![entry(Some(""))])),
            Err(BundleError::BadKey { .. })
        ));
        assert_eq!(
            parse(&doc_with(vec![entry(Some("a")), entry(Some("a"))])).unwrap_err(),
            BundleError::DuplicateKeyId("a".into())
        );
        let mut short = entry(Some("a"));
        short["x"] = "AAAA".into();
        assert!(
            parse(&doc_with(vec![short]))
                .unwrap_err()
                .to_string()
                .contains("length")
        );
        let mut no_y = entry(Some("a"));
        no_y.as_object_mut().unwrap().remove("y");
        assert!(
            parse(&doc_with(vec![no_y]))
                .unwrap_err()
                .to_string()
                .contains("\"y\"")
        );
    }

    #[test]
    fn jwt_keys_clients_cannot_load_are_refused() {
        let ec = |crv: &str, point: &[u8]| {
            let half = point.len() / 2;
            serde_json::json!({
                "use": "jwt-svid", "kty": "EC", "crv": crv, "kid": "k",
                "x": URL_SAFE_NO_PAD.encode(&point[..half]),
                "y": URL_SAFE_NO_PAD.encode(&point[half..]),
            })
        };
        let outcome = |entry: Value| parse(&doc_with(vec![entry])).map_err(|e| e.to_string());
        let p256 = KeyPair::generate().unwrap().public_key_raw()[1..].to_vec();
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .unwrap()
            .public_key_raw()[1..]
            .to_vec();
        // P-521's base point (FIPS 186-4, D.1.2.5); ring makes no P-521 keys.
        let p521 = hex::decode(concat!(
            "00c6858e06b70404e9cd9e3ecb662395b4429c648139053fb521f828af606b4d3dbaa14b5e77efe75928fe1dc127a2ffa8de3348b3c1856a429bf97e7e31c2e5bd66",
            "011839296a789a3bc0045c8a5fb42c7d1bd998f54449579b446817afbd17273e662c97ee72995ef42640c550b9013fad0761353c7086a272c24088be94769fd16650",
        ))
        .unwrap();
        for (crv, point) in [("P-256", &p256), ("P-384", &p384), ("P-521", &p521)] {
            assert!(outcome(ec(crv, point)).is_ok(), "{crv}");
            let mut off_curve = point.clone();
            *off_curve.last_mut().unwrap() ^= 1;
            let err = outcome(ec(crv, &off_curve)).unwrap_err();
            assert!(err.contains(&format!("is not a point of {crv}")), "{err}");
        }
        // A coordinate at or past the field prime is no point either.
        let mut past_prime = vec![0xffu8; 64];
        past_prime[32..].copy_from_slice(&p256[32..]);
        assert!(outcome(ec("P-256", &past_prime)).is_err());

        let rsa = |n: &[u8], e: &[u8]| {
            serde_json::json!({
                "use": "jwt-svid", "kty": "RSA", "kid": "r",
                "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e),
            })
        };
        let n2048 = [0xc5u8; 256];
        assert!(outcome(rsa(&n2048, &[1, 0, 1])).is_ok());
        for (n, e, want) in [
            (&[1u8, 0, 1][..], &[1u8, 0, 1][..], "17 bits"),
            (&[0xc5u8; 128][..], &[1, 0, 1][..], "1024 bits"),
            (&[0xc4u8; 256][..], &[1, 0, 1][..], "even RSA modulus"),
            (&n2048[..], &[1][..], "public exponent"),
            (&n2048[..], &[1, 0, 0][..], "public exponent"),
        ] {
            let err = outcome(rsa(n, e)).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn ignores_unknown_uses_and_key_types() {
        let ca = ca_cert();
        let keys = vec![
            serde_json::json!({"use": "wit-svid", "kty": "EC", "kid": "w"}),
            serde_json::json!({"kty": "EC", "kid": "no-use"}),
            serde_json::json!({"use": "jwt-svid", "kty": "oct", "k": "AAAA"}),
            serde_json::json!({"use": "jwt-svid", "kty": "EC", "crv": "secp256k1", "kid": "k1"}),
            serde_json::json!({"use": "x509-svid", "kty": "FUTURE", "x5c": ["not even base64!"]}),
            x509_entry(&ca),
        ];
        let bundle = parse(&doc_with(keys)).unwrap();
        assert_eq!(bundle.x509_authorities, vec![ca]);
        assert!(bundle.jwt_authorities.is_empty());
        assert_eq!(bundle.sequence, 0);
        assert_eq!(bundle.refresh_hint, None);

        let empty = parse("{\"keys\": []}").unwrap();
        assert!(empty.x509_authorities.is_empty() && empty.jwt_authorities.is_empty());
    }

    #[test]
    fn rejects_oversize_input() {
        let mut big = String::from("{\"keys\": [], \"pad\": \"");
        big.push_str(&"a".repeat(MAX_BUNDLE_BYTES));
        big.push_str("\"}");
        assert!(matches!(parse(&big), Err(BundleError::TooLarge { .. })));
        assert!(matches!(
            TrustBundle::from_pem(td(), &big),
            Err(BundleError::TooLarge { .. })
        ));
    }

    #[test]
    fn rsa_authorities_get_n_and_e() {
        // ring cannot generate RSA keys, so use a fixed certificate.
        let text = include_str!("testdata/rsa2048-ca.pem");
        let bundle = TrustBundle::from_pem(td(), text).unwrap();
        let jwk = cert_jwk(&bundle.x509_authorities[0]).unwrap();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["e"], "AQAB");
        let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), 256);
        assert_ne!(n[0], 0);
        let back = TrustBundle::from_spiffe_json(td(), &bundle.to_spiffe_json()).unwrap();
        assert_eq!(back, bundle);
    }
}
