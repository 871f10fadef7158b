//! One signing authority: a CA certificate with its private key, parsed once
//! into the form minting needs. Also reads private keys (PKCS#8 or SEC1 PEM)
//! and creates the self-signed roots of a trust domain.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::clock;
use crate::spiffe_id::TrustDomain;

/// How far notBefore is backdated, so relying parties with a slightly slow
/// clock accept a certificate the moment it is issued.
pub(crate) const BACKDATE: Duration = Duration::from_secs(10);

/// A CA certificate and its key, ready to sign.
pub(crate) struct SigningAuthority {
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    /// The key identifier leaves name in their AKI (the CA's SKI).
    pub(crate) key_id: Vec<u8>,
    /// The certificate's subject, DER-encoded: the issuer name of every
    /// CRL it signs, kept so a publication need not parse the certificate.
    pub(crate) subject_der: Vec<u8>,
    pub(crate) not_before: SystemTime,
    /// The last moment it may sign: its certificate's notAfter, or sooner
    /// if a certificate above it ends sooner (`cap_not_after`).
    pub(crate) not_after: SystemTime,
    /// Unix seconds of `not_after`, kept so minting does no conversion work.
    pub(crate) not_after_unix: i64,
    /// Certificates that follow a leaf in its chain: empty for a root, the
    /// intermediate (and any above it short of the trust anchor) upstream.
    pub(crate) chain_tail: Vec<CertificateDer<'static>>,
}

impl SigningAuthority {
    /// Binds a CA certificate to its key. Fails (with a reason fit for an
    /// operator) when the key is not the certificate's or the certificate
    /// cannot be represented as an rcgen issuer.
    pub(crate) fn new(
        cert: CertificateDer<'static>,
        key: KeyPair,
        chain_tail: Vec<CertificateDer<'static>>,
    ) -> Result<Self, String> {
        let (rest, parsed) = X509Certificate::from_der(&cert)
            .map_err(|e| format!("certificate does not parse: {e}"))?;
        if !rest.is_empty() {
            return Err("certificate has trailing bytes".into());
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err("private key does not belong to the certificate".into());
        }
        // rcgen rebuilds the issuer name from the parsed subject; it only
        // copes with one attribute per RDN (and would panic on an empty one).
        if parsed.subject().iter().any(|rdn| rdn.iter().count() != 1) {
            return Err("subject has a multi-valued or empty RDN, which writ cannot reproduce as an issuer name".into());
        }
        if let Some(repeated) = repeated_attribute_type(parsed.subject()) {
            return Err(format!(
                "subject names the attribute {repeated} more than once (as enterprise CAs often do with DC or OU), which writ cannot reproduce as its SVIDs' issuer name, so they would not chain to it: use an intermediate whose subject names each attribute type once"
            ));
        }
        let key_id = subject_key_id(&parsed).unwrap_or_else(|| {
            // Without an SKI, rcgen derives the AKI from the key the same way.
            CertificateParams::default().key_identifier(&key)
        });
        let validity = parsed.validity();
        let not_before_unix = validity.not_before.timestamp();
        let not_after_unix = validity.not_after.timestamp();
        let subject_der = parsed.subject().as_raw().to_vec();
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| format!("cannot use certificate as an issuer: {e}"))?;
        Ok(Self {
            issuer,
            key_id,
            subject_der,
            not_before: clock::from_unix(not_before_unix),
            not_after: clock::from_unix(not_after_unix),
            not_after_unix,
            chain_tail,
            cert,
        })
    }

    /// Ends the authority's signing life at `not_after_unix` if that is
    /// sooner than its certificate's: an upstream intermediate is only
    /// valid while every certificate above it is.
    pub(crate) fn cap_not_after(&mut self, not_after_unix: i64) {
        if not_after_unix < self.not_after_unix {
            self.not_after_unix = not_after_unix;
            self.not_after = clock::from_unix(not_after_unix);
        }
    }

    pub(crate) fn key_pkcs8_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

/// The first attribute type the name holds twice, by its short name (`DC`,
/// `OU`) or dotted OID. rcgen keeps one value per attribute type when it
/// rebuilds an issuer name, so such a name would come out changed.
fn repeated_attribute_type(name: &x509_parser::x509::X509Name<'_>) -> Option<String> {
    let mut seen = Vec::new();
    for attribute in name.iter_attributes() {
        let oid = attribute.attr_type();
        if seen.contains(&oid) {
            let registry = x509_parser::objects::oid_registry();
            return Some(
                x509_parser::objects::oid2abbrev(oid, registry)
                    .map(str::to_owned)
                    .unwrap_or_else(|_| oid.to_id_string()),
            );
        }
        seen.push(oid);
    }
    None
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(id.0.to_vec())
            }
            _ => None,
        })
}

/// Creates a fresh self-signed root for `trust_domain`: P-256 key, random
/// serial, cA=true, keyUsage keyCertSign+cRLSign (critical), SKI, URI SAN
/// `spiffe://<td>`, and deliberately no name constraints (rustls-webpki
/// rejects every chain under a CA with URI name constraints).
pub(crate) fn create_root(
    trust_domain: &TrustDomain,
    now: SystemTime,
    ttl: Duration,
) -> Result<SigningAuthority, super::CaError> {
    let key = KeyPair::generate()?;
    let serial = random_serial()?;
    let now_unix = clock::to_unix(now)?;
    let ttl_secs = i64::try_from(ttl.as_secs()).map_err(|_| super::CaError::TimeOutOfRange)?;
    let mut params = CertificateParams::default();
    params.not_before = clock::to_offset(now_unix - BACKDATE.as_secs() as i64)?;
    params.not_after = clock::to_offset(
        now_unix
            .checked_add(ttl_secs)
            .ok_or(super::CaError::TimeOutOfRange)?,
    )?;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "writ");
    subject.push(DnType::CommonName, root_common_name(trust_domain, &serial));
    params.distinguished_name = subject;
    params.subject_alt_names = vec![SanType::URI(trust_domain.id_string().try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    SigningAuthority::new(cert.der().clone(), key, Vec::new()).map_err(|reason| {
        super::CaError::Internal(format!("freshly created root is unusable: {reason}"))
    })
}

/// `writ CA <td> <serial prefix>`, within the 64-character bound X.520 puts
/// on common names; a long trust domain is left out (the URI SAN has it).
fn root_common_name(trust_domain: &TrustDomain, serial: &[u8]) -> String {
    let short = hex::encode(&serial[..serial.len().min(8)]);
    let full = format!("writ CA {trust_domain} {short}");
    if full.len() <= 64 {
        full
    } else {
        format!("writ CA {short}")
    }
}

/// A random, positive serial of exactly 16 content bytes: the top bit is
/// cleared (positive) and the next one set (so DER keeps all 16 bytes and the
/// serial we record equals the one encoded), leaving 126 random bits.
pub(crate) fn random_serial() -> Result<[u8; 16], super::CaError> {
    use ring::rand::SecureRandom;
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| super::CaError::Rng)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// A leaf's fresh P-256 key, generated straight with ring: one scalar
/// multiplication. (rcgen's `KeyPair::generate` re-parses the PKCS#8 it just
/// made, which costs a second one; minting never signs with the leaf key.)
pub(crate) struct FreshLeafKey {
    pkcs8: Vec<u8>,
    public: Vec<u8>,
}

impl FreshLeafKey {
    pub(crate) fn generate() -> Result<Self, super::CaError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .map_err(|_| super::CaError::Rng)?;
        let pkcs8 = doc.as_ref().to_vec();
        let public = pkcs8_ec_public_key(&pkcs8)
            .ok_or_else(|| {
                super::CaError::Internal("ring produced an unexpected PKCS#8 layout".into())
            })?
            .to_vec();
        Ok(Self { pkcs8, public })
    }

    pub(crate) fn into_pkcs8(self) -> Vec<u8> {
        self.pkcs8
    }
}

impl rcgen::PublicKeyData for FreshLeafKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The uncompressed public point inside an EC PKCS#8 PrivateKeyInfo:
/// privateKey OCTET STRING -> ECPrivateKey -> [1] BIT STRING.
fn pkcs8_ec_public_key(pkcs8: &[u8]) -> Option<&[u8]> {
    let (_, info, _) = der::read_tlv(pkcs8)?;
    let (_, _version, rest) = der::read_tlv(info)?;
    let (_, _algorithm, rest) = der::read_tlv(rest)?;
    let (tag, ec_private_key, _) = der::read_tlv(rest)?;
    if tag != 0x04 {
        return None;
    }
    let (_, mut fields, _) = der::read_tlv(ec_private_key)?;
    while !fields.is_empty() {
        let (tag, value, rest) = der::read_tlv(fields)?;
        if tag == 0xa1 {
            let (bit_tag, bits, _) = der::read_tlv(value)?;
            // A BIT STRING's first byte counts unused bits; keys use none.
            return match (bit_tag, bits.split_first()) {
                (0x03, Some((0, point))) => Some(point),
                _ => None,
            };
        }
        fields = rest;
    }
    None
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// Reads one unencrypted private key from PEM: PKCS#8 (`PRIVATE KEY`) or
/// SEC1 (`EC PRIVATE KEY`). A SEC1 key without curve parameters takes the
/// curve of `cert_spki_curve` (the DER of the certificate's curve OID, TLV).
pub(crate) fn key_from_pem(text: &str, cert_spki_curve: Option<&[u8]>) -> Result<KeyPair, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("not valid PEM: {e}"))?;
    let mut keys = blocks.iter().filter(|b| b.tag().contains("PRIVATE KEY"));
    let block = keys.next().ok_or("no PRIVATE KEY block")?;
    if keys.next().is_some() {
        return Err("more than one private key".into());
    }
    let der = match block.tag() {
        "PRIVATE KEY" => block.contents().to_vec(),
        "EC PRIVATE KEY" => sec1_to_pkcs8(block.contents(), cert_spki_curve)?,
        "ENCRYPTED PRIVATE KEY" => return Err("encrypted keys are not supported".into()),
        other => {
            return Err(format!(
                "{other} is not supported; convert it with `openssl pkcs8 -topk8 -nocrypt`"
            ));
        }
    };
    KeyPair::try_from(der.as_slice()).map_err(|e| format!("unusable private key: {e}"))
}

/// Wraps an RFC 5915 ECPrivateKey in a PKCS#8 PrivateKeyInfo, which is the
/// only form ring loads.
fn sec1_to_pkcs8(sec1: &[u8], fallback_curve: Option<&[u8]>) -> Result<Vec<u8>, String> {
    const BAD: &str = "EC PRIVATE KEY is not a valid SEC1 ECPrivateKey";
    let (tag, body, rest) = der::read_tlv(sec1).ok_or(BAD)?;
    if tag != 0x30 || !rest.is_empty() {
        return Err(BAD.into());
    }
    let (tag, version, body) = der::read_tlv(body).ok_or(BAD)?;
    if tag != 0x02 || version != [1] {
        return Err(BAD.into());
    }
    let (tag, _private, mut body) = der::read_tlv(body).ok_or(BAD)?;
    if tag != 0x04 {
        return Err(BAD.into());
    }
    let mut curve: Option<Vec<u8>> = None;
    let mut has_public = false;
    while !body.is_empty() {
        let (tag, value, rest) = der::read_tlv(body).ok_or(BAD)?;
        match tag {
            0xa0 => curve = Some(value.to_vec()),
            0xa1 => has_public = true,
            _ => return Err(BAD.into()),
        }
        body = rest;
    }
    if !has_public {
        return Err("EC PRIVATE KEY lacks its public key; regenerate it or convert with `openssl pkcs8 -topk8 -nocrypt`".into());
    }
    let curve = curve
        .or_else(|| fallback_curve.map(<[u8]>::to_vec))
        .ok_or("EC PRIVATE KEY names no curve")?;
    let algorithm = der::tlv(0x30, &[der::tlv(0x06, OID_EC_PUBLIC_KEY), curve].concat());
    Ok(der::tlv(
        0x30,
        &[der::tlv(0x02, &[0]), algorithm, der::tlv(0x04, sec1)].concat(),
    ))
}

/// Just enough DER to wrap and unwrap keys.
pub(crate) mod der {
    /// Splits one TLV off `input`: (tag, value, rest). Single-byte tags and
    /// definite lengths only, which is all DER key formats use.
    pub(crate) fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }

    pub(crate) fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = value.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(value);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_round_trip_long_lengths() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let value = vec![7u8; len];
            let enc = der::tlv(0x04, &value);
            let (tag, got, rest) = der::read_tlv(&enc).unwrap();
            assert_eq!((tag, got, rest.len()), (0x04, value.as_slice(), 0));
        }
        assert!(der::read_tlv(&[0x30, 0x05, 1]).is_none());
        assert!(der::read_tlv(&[0x30, 0x80]).is_none());
    }

    /// An enterprise CA's subject such as DC=example, DC=corp is refused by
    /// name: rcgen would write it as DC=corp alone in every SVID's issuer.
    #[test]
    fn a_subject_repeating_an_attribute_type_is_refused_naming_it() {
        // rcgen writes one value per type; two custom types whose OIDs
        // differ in the last byte are made the same type afterwards.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let dc = [0, 9, 2342, 19200300, 100, 1, 25];
        let other = [0, 9, 2342, 19200300, 100, 1, 26];
        params
            .distinguished_name
            .push(DnType::CustomDnType(dc.to_vec()), "example");
        params
            .distinguished_name
            .push(DnType::CustomDnType(other.to_vec()), "corp");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let encoded_dc = [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19];
        let mut patched = der.clone();
        let mut at = 0;
        while let Some(found) = patched[at..]
            .windows(encoded_dc.len())
            .position(|w| w[..9] == encoded_dc[..9] && w[9] == 0x1a)
        {
            patched[at + found + 9] = 0x19;
            at += found + 10;
        }
        assert_ne!(patched, der, "the second attribute type was found");
        let refused = SigningAuthority::new(CertificateDer::from(patched), key, Vec::new())
            .err()
            .unwrap_or_default();
        assert!(
            refused.contains("the attribute DC more than once"),
            "{refused}"
        );
        // Without the repeat it is accepted.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CustomDnType(dc.to_vec()), "example");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        assert!(SigningAuthority::new(cert.der().clone(), key, Vec::new()).is_ok());
    }

    #[test]
    fn serials_are_positive_sixteen_bytes_and_random() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_ne!(a, b);
        for s in [a, b] {
            assert_eq!(s[0] & 0xc0, 0x40);
        }
    }

    #[test]
    fn long_trust_domains_keep_the_common_name_short() {
        let long = TrustDomain::new(&"a".repeat(200)).unwrap();
        assert!(root_common_name(&long, &[1; 16]).len() <= 64);
        let short = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            root_common_name(&short, &[0xab; 16]),
            "writ CA example.org abababababababab"
        );
    }

    #[test]
    fn fresh_leaf_keys_expose_their_public_point() {
        let fresh = FreshLeafKey::generate().unwrap();
        let public = rcgen::PublicKeyData::der_bytes(&fresh).to_vec();
        assert_eq!(public.len(), 65);
        let reparsed = KeyPair::try_from(fresh.into_pkcs8().as_slice()).unwrap();
        assert_eq!(reparsed.public_key_raw(), public.as_slice());
    }

    #[test]
    fn key_pem_forms() {
        let key = KeyPair::generate().unwrap();
        let pkcs8 = key.serialize_der();
        let from_pkcs8 = key_from_pem(&key.serialize_pem(), None).unwrap();
        assert_eq!(from_pkcs8.public_key_raw(), key.public_key_raw());

        // ring's PKCS#8 holds an ECPrivateKey without curve parameters: the
        // SEC1 form of the same key, which then needs the certificate's curve.
        let (_, info, _) = der::read_tlv(&pkcs8).unwrap();
        let (_, _, after_version) = der::read_tlv(info).unwrap();
        let (_, alg, after_alg) = der::read_tlv(after_version).unwrap();
        let (_, sec1, _) = der::read_tlv(after_alg).unwrap();
        let (_, _, curve) = der::read_tlv(alg).unwrap();
        let sec1_pem = pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1.to_vec()));
        assert!(
            key_from_pem(&sec1_pem, None)
                .unwrap_err()
                .contains("no curve")
        );
        let from_sec1 = key_from_pem(&sec1_pem, Some(curve)).unwrap();
        assert_eq!(from_sec1.public_key_raw(), key.public_key_raw());

        for (text, want) in [
            ("garbage", "no PRIVATE KEY"),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
                "not supported",
            ),
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                "encrypted",
            ),
            (
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "unusable",
            ),
        ] {
            let err = key_from_pem(text, None).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        let two = format!("{}{}", key.serialize_pem(), key.serialize_pem());
        assert!(
            key_from_pem(&two, None)
                .unwrap_err()
                .contains("more than one")
        );
    }
}
