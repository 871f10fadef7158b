//! X.509-SVIDs: what an issued SVID is (chain, key, serial, validity), the
//! certificate template a leaf is minted from, and the checks that a leaf or a
//! signing certificate meets every rule of the SPIFFE X509-SVID standard.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::spiffe_id::{SpiffeId, SpiffeIdError};

/// What the caller wants in a leaf; the CA decides the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509SvidRequest {
    pub spiffe_id: SpiffeId,
    /// The least the SVID lives, unless `ends_by` or the signer ends first.
    pub ttl: Duration,
    /// The latest the SVID may end (its task's end, say).
    pub ends_by: Option<SystemTime>,
    /// Extra DNS SANs (the SPIFFE ID stays the only URI SAN).
    pub dns_names: Vec<String>,
}

/// What an X509-SVID about to be signed will carry, fixed before its key
/// exists: what its issuance record needs (serial, validity, issuer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509SvidPlan {
    /// Big-endian serial, exactly as it will be encoded.
    pub serial: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub issuer_key_id: Vec<u8>,
}

impl X509SvidPlan {
    pub fn serial_hex(&self) -> String {
        hex::encode(&self.serial)
    }
}

/// An issued X.509-SVID with its private key.
#[derive(Clone)]
pub struct X509Svid {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates up to (not including) the trust anchor.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// Big-endian serial of the leaf, exactly as encoded in the certificate.
    pub serial: Vec<u8>,
    /// Subject key identifier of the CA that signed the leaf: the CA whose key
    /// must sign a CRL revoking it.
    pub issuer_key_id: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    private_key_pkcs8: Vec<u8>,
}

impl X509Svid {
    pub(crate) fn new(
        spiffe_id: SpiffeId,
        cert_chain: Vec<CertificateDer<'static>>,
        serial: Vec<u8>,
        issuer_key_id: Vec<u8>,
        validity: (SystemTime, SystemTime),
        private_key_pkcs8: Vec<u8>,
    ) -> Self {
        Self {
            spiffe_id,
            cert_chain,
            serial,
            issuer_key_id,
            not_before: validity.0,
            not_after: validity.1,
            private_key_pkcs8,
        }
    }

    /// The leaf's private key, unencrypted PKCS#8 DER (the Workload API's
    /// `x509_svid_key`).
    pub fn private_key_pkcs8_der(&self) -> &[u8] {
        &self.private_key_pkcs8
    }

    /// The chain as concatenated DER, leaf first (the Workload API's `x509_svid`).
    pub fn chain_der_concat(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.cert_chain.iter().map(|c| c.len()).sum());
        for cert in &self.cert_chain {
            out.extend_from_slice(cert);
        }
        out
    }

    /// Lowercase hex of the serial, as stored and audited.
    pub fn serial_hex(&self) -> String {
        hex::encode(&self.serial)
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.cert_chain.first()
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial_hex())
            .field("issuer_key_id", &hex::encode(&self.issuer_key_id))
            .field("chain_len", &self.cert_chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("private_key", &"[redacted]")
            .finish()
    }
}

/// A way in which a certificate breaks the X509-SVID standard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidRuleViolation {
    #[error("not a valid X.509 certificate: {0}")]
    Unparseable(String),
    #[error("certificate has trailing bytes after its DER encoding")]
    TrailingData,
    #[error("extension {0} appears more than once or cannot be parsed")]
    BadExtension(&'static str),
    #[error("no subject alternative name extension")]
    NoSubjectAltName,
    #[error("no URI SAN: an X509-SVID carries its SPIFFE ID as exactly one URI SAN")]
    NoUriSan,
    #[error("{0} URI SANs: an X509-SVID must carry exactly one")]
    MultipleUriSans(usize),
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    NotSpiffeId { uri: String, reason: SpiffeIdError },
    #[error(
        "leaf SPIFFE ID {0} has no path; only signing certificates may carry a trust domain ID"
    )]
    LeafIdWithoutPath(SpiffeId),
    #[error("signing certificate SPIFFE ID {0} must not have a path")]
    SigningIdWithPath(SpiffeId),
    #[error("basicConstraints has cA=true on a leaf")]
    LeafIsCa,
    #[error("signing certificate lacks basicConstraints cA=true")]
    SigningCertNotCa,
    #[error("keyUsage extension is missing")]
    NoKeyUsage,
    #[error("keyUsage extension is not marked critical")]
    KeyUsageNotCritical,
    #[error("leaf keyUsage lacks digitalSignature")]
    LeafMissingDigitalSignature,
    #[error("leaf keyUsage sets {0}, which only signing certificates may set")]
    LeafHasSigningUsage(&'static str),
    #[error("signing certificate keyUsage lacks keyCertSign")]
    SigningCertMissingKeyCertSign,
    #[error("signing certificate keyUsage sets digitalSignature, which only leaves may set")]
    SigningCertHasDigitalSignature,
    #[error("extendedKeyUsage extension is missing (serverAuth and clientAuth are required)")]
    NoExtendedKeyUsage,
    #[error("extendedKeyUsage lacks {0}")]
    MissingExtendedKeyUsage(&'static str),
    #[error("subject is empty, so the subject alternative name extension must be critical")]
    SanNotCriticalWithEmptySubject,
    #[error("signing certificate has URI name constraints, which rustls-webpki rejects")]
    UriNameConstraints,
}

/// Checks a leaf against every X509-SVID rule and returns its SPIFFE ID.
pub fn check_leaf_conformance(der: &[u8]) -> Result<SpiffeId, SvidRuleViolation> {
    let cert = parse_whole(der)?;

    let basic = cert
        .basic_constraints()
        .map_err(|_| SvidRuleViolation::BadExtension("basicConstraints"))?;
    // An absent basicConstraints means cA=false (RFC 5280 default).
    if basic.is_some_and(|b| b.value.ca) {
        return Err(SvidRuleViolation::LeafIsCa);
    }

    let usage = key_usage(&cert)?;
    if !usage.digital_signature() {
        return Err(SvidRuleViolation::LeafMissingDigitalSignature);
    }
    if usage.key_cert_sign() {
        return Err(SvidRuleViolation::LeafHasSigningUsage("keyCertSign"));
    }
    if usage.crl_sign() {
        return Err(SvidRuleViolation::LeafHasSigningUsage("cRLSign"));
    }

    let eku = cert
        .extended_key_usage()
        .map_err(|_| SvidRuleViolation::BadExtension("extendedKeyUsage"))?
        .ok_or(SvidRuleViolation::NoExtendedKeyUsage)?;
    if !eku.value.server_auth {
        return Err(SvidRuleViolation::MissingExtendedKeyUsage("serverAuth"));
    }
    if !eku.value.client_auth {
        return Err(SvidRuleViolation::MissingExtendedKeyUsage("clientAuth"));
    }

    let id = spiffe_id_of(&cert)?;
    if id.is_trust_domain_id() {
        return Err(SvidRuleViolation::LeafIdWithoutPath(id));
    }
    Ok(id)
}

/// Checks a CA certificate against the X509-SVID rules for signing
/// certificates (plus "no URI name constraints", which rustls-webpki needs).
/// Returns the certificate's SPIFFE ID if it carries one.
pub fn check_signing_cert_conformance(der: &[u8]) -> Result<Option<SpiffeId>, SvidRuleViolation> {
    let cert = parse_whole(der)?;
    let is_ca = cert
        .basic_constraints()
        .map_err(|_| SvidRuleViolation::BadExtension("basicConstraints"))?
        .is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err(SvidRuleViolation::SigningCertNotCa);
    }
    let usage = key_usage(&cert)?;
    if !usage.key_cert_sign() {
        return Err(SvidRuleViolation::SigningCertMissingKeyCertSign);
    }
    if usage.digital_signature() {
        return Err(SvidRuleViolation::SigningCertHasDigitalSignature);
    }
    let constraints = cert
        .name_constraints()
        .map_err(|_| SvidRuleViolation::BadExtension("nameConstraints"))?;
    if let Some(nc) = constraints {
        let subtrees = nc
            .value
            .permitted_subtrees
            .iter()
            .chain(nc.value.excluded_subtrees.iter())
            .flatten();
        if subtrees
            .into_iter()
            .any(|s| matches!(s.base, GeneralName::URI(_)))
        {
            return Err(SvidRuleViolation::UriNameConstraints);
        }
    }
    let id = match cert
        .subject_alternative_name()
        .map_err(|_| SvidRuleViolation::BadExtension("subjectAltName"))?
    {
        // A signing certificate need not be an SVID at all.
        None => None,
        Some(_) => match spiffe_id_of(&cert) {
            Ok(id) => Some(id),
            Err(SvidRuleViolation::NoUriSan) => None,
            Err(other) => return Err(other),
        },
    };
    if let Some(id) = &id
        && !id.is_trust_domain_id()
    {
        return Err(SvidRuleViolation::SigningIdWithPath(id.clone()));
    }
    Ok(id)
}

fn parse_whole(der: &[u8]) -> Result<X509Certificate<'_>, SvidRuleViolation> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| SvidRuleViolation::Unparseable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidRuleViolation::TrailingData);
    }
    Ok(cert)
}

fn key_usage(
    cert: &X509Certificate<'_>,
) -> Result<x509_parser::extensions::KeyUsage, SvidRuleViolation> {
    let usage = cert
        .key_usage()
        .map_err(|_| SvidRuleViolation::BadExtension("keyUsage"))?
        .ok_or(SvidRuleViolation::NoKeyUsage)?;
    if !usage.critical {
        return Err(SvidRuleViolation::KeyUsageNotCritical);
    }
    Ok(*usage.value)
}

/// The certificate's only URI SAN as a SPIFFE ID. Also enforces the
/// RFC 5280 rule that a SAN standing in for an empty subject is critical.
fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidRuleViolation> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| SvidRuleViolation::BadExtension("subjectAltName"))?
        .ok_or(SvidRuleViolation::NoSubjectAltName)?;
    if cert.subject().iter().next().is_none() && !san.critical {
        return Err(SvidRuleViolation::SanNotCriticalWithEmptySubject);
    }
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [] => return Err(SvidRuleViolation::NoUriSan),
        [one] => *one,
        many => return Err(SvidRuleViolation::MultipleUriSans(many.len())),
    };
    uri.parse::<SpiffeId>()
        .map_err(|reason| SvidRuleViolation::NotSpiffeId {
            uri: uri.to_owned(),
            reason,
        })
}

/// Why a requested DNS SAN was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid DNS name {:?}: {reason}", writ_attestors::excerpt(.name))]
pub struct InvalidDnsName {
    pub name: String,
    pub reason: String,
}

/// `validate_dns_name`, and no IPv4 address either: TLS clients match an
/// address only against IP SANs, so such a DNS SAN could never match. For
/// names asked for now (config, the admin API); minting takes what an older
/// writ stored.
pub fn validate_new_dns_name(name: &str) -> Result<(), InvalidDnsName> {
    validate_dns_name(name)?;
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(InvalidDnsName {
            name: name.to_owned(),
            reason: "it is an IP address: TLS clients match addresses only against IP SANs, never DNS ones"
                .to_owned(),
        });
    }
    Ok(())
}

/// Accepts host names (`a.example.org`) and a leading wildcard label
/// (`*.example.org`); rejects anything a TLS client would refuse to match.
/// Minting checks this; config validation and the admin API check it
/// through `validate_new_dns_name`, so a name accepted there is never
/// refused at minting time.
pub fn validate_dns_name(name: &str) -> Result<(), InvalidDnsName> {
    let fail = |reason: String| {
        Err(InvalidDnsName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty".to_owned());
    }
    if name.len() > 253 {
        return fail("it is longer than 253 bytes".to_owned());
    }
    if name.ends_with('.') {
        return fail("it must not end with '.'".to_owned());
    }
    let hostname = name.strip_prefix("*.").unwrap_or(name);
    for label in hostname.split('.') {
        if label.is_empty() {
            return fail("it has an empty label".to_owned());
        }
        if label.len() > 63 {
            return fail(format!("label {label:?} is longer than 63 bytes"));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return fail(if bad == '*' {
                "'*' is only allowed as the whole leftmost label (\"*.example.org\")".to_owned()
            } else {
                format!("it contains {bad:?}; only letters, digits, '-' and '.' are allowed")
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// The X509-SVID leaf template: one URI SAN, cA=false, critical keyUsage
/// digitalSignature, EKU serverAuth+clientAuth, SKI and AKI. The subject is
/// `O=writ` so the SAN extension need not be critical (some TLS stacks still
/// trip over empty subjects).
pub(crate) fn leaf_params(
    spiffe_id: &SpiffeId,
    dns_names: &[String],
    serial: &[u8],
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(SerialNumber::from_slice(serial));
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "writ");
    params.distinguished_name = subject;
    let mut sans = Vec::with_capacity(1 + dns_names.len());
    sans.push(SanType::URI(spiffe_id.to_string().try_into()?));
    for name in dns_names {
        sans.push(SanType::DnsName(name.as_str().try_into()?));
    }
    params.subject_alt_names = sans;
    // ExplicitNoCa writes basicConstraints cA=false and makes rcgen emit an SKI.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Path validation with rustls-webpki for both TLS usages, the way peers
/// check SVIDs: `chain` is leaf first, `roots` the trust bundle.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<(), webpki::Error> {
    let (leaf, intermediates) = chain.split_first().ok_or(webpki::Error::BadDer)?;
    let anchors: Vec<_> = roots
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<_, _>>()?;
    let ee = webpki::EndEntityCert::try_from(leaf)?;
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| webpki::Error::BadDerTime)?;
    let time = rustls_pki_types::UnixTime::since_unix_epoch(secs);
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            time,
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CustomExtension, KeyPair};

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn good_params() -> CertificateParams {
        let now = time::OffsetDateTime::now_utc();
        leaf_params(
            &id("spiffe://example.org/agent/a"),
            &["svc.example.org".to_owned()],
            &[0x41; 16],
            now,
            now + time::Duration::hours(1),
        )
        .unwrap()
    }

    fn self_sign(params: &CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_leaf_template_conforms() {
        let der = self_sign(&good_params());
        assert_eq!(
            check_leaf_conformance(&der).unwrap(),
            id("spiffe://example.org/agent/a")
        );
    }

    #[test]
    fn every_leaf_rule_is_enforced() {
        type Mutation = fn(&mut CertificateParams);
        let cases: Vec<(&str, Mutation, SvidRuleViolation)> = vec![
            (
                "CA leaf",
                |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
                SvidRuleViolation::LeafIsCa,
            ),
            (
                "no keyUsage",
                |p| p.key_usages.clear(),
                SvidRuleViolation::NoKeyUsage,
            ),
            (
                "no digitalSignature",
                |p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
                SvidRuleViolation::LeafMissingDigitalSignature,
            ),
            (
                "keyCertSign",
                |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign),
                SvidRuleViolation::LeafHasSigningUsage("keyCertSign"),
            ),
            (
                "cRLSign",
                |p| p.key_usages.push(KeyUsagePurpose::CrlSign),
                SvidRuleViolation::LeafHasSigningUsage("cRLSign"),
            ),
            (
                "missing EKU",
                |p| p.extended_key_usages.clear(),
                SvidRuleViolation::NoExtendedKeyUsage,
            ),
            (
                "no clientAuth",
                |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth],
                SvidRuleViolation::MissingExtendedKeyUsage("clientAuth"),
            ),
            (
                "no serverAuth",
                |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
                SvidRuleViolation::MissingExtendedKeyUsage("serverAuth"),
            ),
            (
                "two URI SANs",
                |p| {
                    p.subject_alt_names.push(SanType::URI(
                        "spiffe://example.org/other".try_into().unwrap(),
                    ))
                },
                SvidRuleViolation::MultipleUriSans(2),
            ),
            (
                "no URI SAN",
                |p| {
                    p.subject_alt_names
                        .retain(|s| !matches!(s, SanType::URI(_)))
                },
                SvidRuleViolation::NoUriSan,
            ),
            (
                "no SAN at all",
                |p| p.subject_alt_names.clear(),
                SvidRuleViolation::NoSubjectAltName,
            ),
            (
                "trust domain ID on a leaf",
                |p| {
                    p.subject_alt_names =
                        vec![SanType::URI("spiffe://example.org".try_into().unwrap())]
                },
                SvidRuleViolation::LeafIdWithoutPath(id("spiffe://example.org")),
            ),
            (
                "https URI",
                |p| {
                    p.subject_alt_names =
                        vec![SanType::URI("https://example.org/a".try_into().unwrap())]
                },
                SvidRuleViolation::NotSpiffeId {
                    uri: "https://example.org/a".into(),
                    reason: SpiffeIdError::WrongScheme,
                },
            ),
        ];
        for (name, mutate, want) in cases {
            let mut params = good_params();
            mutate(&mut params);
            let der = self_sign(&params);
            assert_eq!(check_leaf_conformance(&der).unwrap_err(), want, "{name}");
        }
    }

    #[test]
    fn non_critical_key_usage_is_rejected() {
        // rcgen always marks keyUsage critical, so write the extension by hand:
        // OID 2.5.29.15, BIT STRING with digitalSignature only.
        let mut params = good_params();
        params.key_usages.clear();
        let mut ext =
            CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
        ext.set_criticality(false);
        params.custom_extensions.push(ext);
        let der = self_sign(&params);
        assert_eq!(
            check_leaf_conformance(&der).unwrap_err(),
            SvidRuleViolation::KeyUsageNotCritical
        );
    }

    #[test]
    fn empty_subject_needs_a_critical_san() {
        let mut params = good_params();
        params.distinguished_name = DistinguishedName::new();
        // rcgen marks the SAN critical on its own when the subject is empty.
        let der = self_sign(&params);
        check_leaf_conformance(&der).unwrap();

        // A hand-written, non-critical SAN with an empty subject must fail.
        params.subject_alt_names.clear();
        let uri = b"spiffe://example.org/agent/a";
        let mut san = vec![0x30, (uri.len() + 2) as u8, 0x86, uri.len() as u8];
        san.extend_from_slice(uri);
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(&[2, 5, 29, 17], san));
        let der = self_sign(&params);
        assert_eq!(
            check_leaf_conformance(&der).unwrap_err(),
            SvidRuleViolation::SanNotCriticalWithEmptySubject
        );
    }

    #[test]
    fn garbage_and_trailing_bytes_are_rejected() {
        assert!(matches!(
            check_leaf_conformance(b"not a cert"),
            Err(SvidRuleViolation::Unparseable(_))
        ));
        let mut der = self_sign(&good_params());
        der.push(0);
        assert_eq!(
            check_leaf_conformance(&der).unwrap_err(),
            SvidRuleViolation::TrailingData
        );
    }

    fn ca_params() -> CertificateParams {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        p
    }

    #[test]
    fn signing_cert_rules() {
        let der = self_sign(&ca_params());
        assert_eq!(
            check_signing_cert_conformance(&der).unwrap(),
            Some(id("spiffe://example.org"))
        );

        let mut p = ca_params();
        p.subject_alt_names.clear();
        assert_eq!(
            check_signing_cert_conformance(&self_sign(&p)).unwrap(),
            None
        );

        type Mutation = fn(&mut CertificateParams);
        let cases: Vec<(&str, Mutation, SvidRuleViolation)> = vec![
            (
                "not CA",
                |p| p.is_ca = IsCa::ExplicitNoCa,
                SvidRuleViolation::SigningCertNotCa,
            ),
            (
                "no keyCertSign",
                |p| p.key_usages = vec![KeyUsagePurpose::CrlSign],
                SvidRuleViolation::SigningCertMissingKeyCertSign,
            ),
            (
                "digitalSignature",
                |p| p.key_usages.push(KeyUsagePurpose::DigitalSignature),
                SvidRuleViolation::SigningCertHasDigitalSignature,
            ),
            (
                "path in ID",
                |p| {
                    p.subject_alt_names =
                        vec![SanType::URI("spiffe://example.org/ca".try_into().unwrap())]
                },
                SvidRuleViolation::SigningIdWithPath(id("spiffe://example.org/ca")),
            ),
            (
                "URI name constraints",
                |p| {
                    // rcgen cannot express URI subtrees, so encode the
                    // extension by hand: permittedSubtrees [ URI "example.org" ].
                    let uri = b"example.org";
                    let mut gs = vec![0x30, (uri.len() + 2) as u8, 0x86, uri.len() as u8];
                    gs.extend_from_slice(uri);
                    let mut permitted = vec![0xa0, gs.len() as u8];
                    permitted.extend_from_slice(&gs);
                    let mut nc = vec![0x30, permitted.len() as u8];
                    nc.extend_from_slice(&permitted);
                    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 30], nc);
                    ext.set_criticality(true);
                    p.custom_extensions.push(ext);
                },
                SvidRuleViolation::UriNameConstraints,
            ),
        ];
        for (name, mutate, want) in cases {
            let mut params = ca_params();
            mutate(&mut params);
            let der = self_sign(&params);
            assert_eq!(
                check_signing_cert_conformance(&der).unwrap_err(),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn dns_names() {
        for ok in ["a", "svc.example.org", "*.example.org", "a-b.c-d.org"] {
            validate_dns_name(ok).unwrap();
        }
        for bad in [
            "",
            "a..b",
            "a.",
            "-a.org",
            "a b.org",
            "*",
            "a.*.org",
            "é.org",
            "a_b.org",
            &"a".repeat(64),
        ] {
            assert!(validate_dns_name(bad).is_err(), "{bad:?}");
            assert!(validate_new_dns_name(bad).is_err(), "{bad:?}");
        }
        validate_dns_name("10.0.0.1").unwrap();
        assert!(
            validate_new_dns_name("10.0.0.1")
                .unwrap_err()
                .reason
                .contains("IP address")
        );
    }

    #[test]
    fn debug_hides_the_key() {
        let svid = X509Svid::new(
            id("spiffe://example.org/a"),
            vec![],
            vec![0x42, 0x01],
            vec![1, 2],
            (SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH),
            b"SECRET-KEY-BYTES".to_vec(),
        );
        let dbg = format!("{svid:?}");
        assert!(!dbg.contains("SECRET"), "{dbg}");
        assert!(dbg.contains("4201"));
        assert_eq!(svid.serial_hex(), "4201");
    }
}
