//! Upstream mode: writ signs with an intermediate CA handed to it on disk
//! (certificate, key, and the upstream roots). Everything is checked at load
//! so a bad file fails the start-up with a precise message instead of
//! producing SVIDs nobody can verify.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::authority::{SigningAuthority, key_from_pem};
use super::{CaError, clock, store};
use crate::spiffe_id::TrustDomain;
use crate::svid::check_signing_cert_conformance;

/// Files making up an upstream CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCaFiles {
    /// PEM: the intermediate writ signs with, first; optionally followed by
    /// the intermediates above it (roots in the list are dropped).
    pub cert: PathBuf,
    /// PEM private key of the first certificate: PKCS#8 or SEC1.
    pub key: PathBuf,
    /// PEM root certificates: the trust anchors SVIDs chain to.
    pub bundle: PathBuf,
}

pub(crate) struct Upstream {
    pub signer: Arc<SigningAuthority>,
    pub roots: Vec<CertificateDer<'static>>,
}

pub(crate) fn load(
    files: &UpstreamCaFiles,
    trust_domain: &TrustDomain,
    now: SystemTime,
) -> Result<Upstream, CaError> {
    let certs = read_certs(&files.cert)?;
    let roots = read_certs(&files.bundle)?;
    let fail = |path: &Path, reason: String| CaError::Upstream {
        path: path.to_owned(),
        reason,
    };

    for root in &roots {
        let (_, parsed) = X509Certificate::from_der(root)
            .map_err(|e| fail(&files.bundle, format!("certificate does not parse: {e}")))?;
        if !parsed.is_ca() {
            return Err(fail(
                &files.bundle,
                format!("{} is not a CA certificate", parsed.subject()),
            ));
        }
    }

    // A root repeated in the certificate file adds nothing to the chain.
    let chain: Vec<CertificateDer<'static>> = certs
        .into_iter()
        .filter(|c| !roots.iter().any(|r| r.as_ref() == c.as_ref()))
        .collect();
    let Some(signing) = chain.first() else {
        return Err(fail(
            &files.cert,
            "holds only roots from the bundle; it must start with the intermediate writ signs with"
                .into(),
        ));
    };

    let id = check_signing_cert_conformance(signing).map_err(|v| {
        fail(
            &files.cert,
            format!("not a usable signing certificate: {v}"),
        )
    })?;
    if let Some(id) = id
        && id.trust_domain() != trust_domain
    {
        return Err(fail(
            &files.cert,
            format!("the intermediate is {id}, not in trust domain {trust_domain}"),
        ));
    }

    let parsed: Vec<X509Certificate<'_>> = chain
        .iter()
        .map(|c| {
            X509Certificate::from_der(c)
                .map(|(_, p)| p)
                .map_err(|e| fail(&files.cert, format!("certificate does not parse: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let leafward = &parsed[0];
    let usage_allows_crls = leafward
        .key_usage()
        .ok()
        .flatten()
        .is_some_and(|u| u.value.crl_sign());
    if !usage_allows_crls {
        return Err(fail(
            &files.cert,
            "the intermediate lacks keyUsage cRLSign, so the CRLs writ must sign on revocation would be rejected".into(),
        ));
    }
    let now_unix = clock::to_unix(now)?;
    for cert in &parsed {
        let v = cert.validity();
        if now_unix < v.not_before.timestamp() || now_unix >= v.not_after.timestamp() {
            return Err(fail(
                &files.cert,
                format!(
                    "{} is not valid now (valid {} to {})",
                    cert.subject(),
                    v.not_before,
                    v.not_after
                ),
            ));
        }
    }
    for pair in parsed.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .map_err(|_| {
                fail(
                    &files.cert,
                    format!(
                        "{} is not signed by the next certificate, {}",
                        pair[0].subject(),
                        pair[1].subject()
                    ),
                )
            })?;
    }
    for (below, cert) in parsed.iter().enumerate() {
        check_ca_constraints(cert, below).map_err(|reason| fail(&files.cert, reason))?;
    }
    let top = &parsed[parsed.len() - 1];
    // The roots that issued the top of the chain. webpki, which checks
    // the probe SVID below, trusts an anchor's key and name only, so its
    // validity, key usage and constraints are checked here: a relying
    // party with a stricter verifier (OpenSSL, Go) would refuse SVIDs
    // whose anchor fails them.
    let issuers: Vec<X509Certificate<'_>> = roots
        .iter()
        .filter_map(|root| X509Certificate::from_der(root).ok().map(|(_, r)| r))
        .filter(|r| {
            r.subject().as_raw() == top.issuer().as_raw()
                && top.verify_signature(Some(r.public_key())).is_ok()
        })
        .collect();
    if issuers.is_empty() {
        return Err(fail(
            &files.cert,
            format!(
                "{} does not chain to any root in {}",
                top.subject(),
                files.bundle.display()
            ),
        ));
    }
    let mut anchor_problems = Vec::new();
    let mut anchor_not_after = None;
    for root in &issuers {
        match check_anchor(root, parsed.len(), now_unix) {
            Ok(()) => {
                anchor_not_after = Some(root.validity().not_after.timestamp());
                break;
            }
            Err(reason) => anchor_problems.push(reason),
        }
    }
    let Some(anchor_not_after) = anchor_not_after else {
        return Err(fail(
            &files.bundle,
            format!(
                "no root that issued {} is usable as a trust anchor: {}",
                top.subject(),
                anchor_problems.join("; ")
            ),
        ));
    };
    // A certificate is valid only while every certificate above it is, so
    // SVIDs and CRLs must end by the earliest end in the whole chain, the
    // anchor included, not just by the intermediate's.
    let chain_not_after = parsed
        .iter()
        .map(|c| c.validity().not_after.timestamp())
        .fold(anchor_not_after, i64::min);

    let curve = curve_oid_tlv(leafward);
    let key_text = store::read_private_text_file(&files.key)?;
    let key = key_from_pem(&key_text, curve.as_deref()).map_err(|r| fail(&files.key, r))?;
    let tail = chain.clone();
    // Only a key that is not the certificate's is the key file's fault;
    // everything else SigningAuthority refuses is in the certificate.
    let mut signer = SigningAuthority::new(chain[0].clone(), key, tail).map_err(|r| {
        let culprit = if r.starts_with("private key") {
            &files.key
        } else {
            &files.cert
        };
        fail(culprit, r)
    })?;
    signer.cap_not_after(chain_not_after);
    Ok(Upstream {
        signer: Arc::new(signer),
        roots,
    })
}

/// What a CA certificate with `below` CA certificates under it (in
/// writ's chain; SVIDs are not counted) must satisfy beyond what webpki
/// checks: a pathLenConstraint that allows them, and no name constraints.
/// URI name constraints make rustls-webpki reject every chain beneath
/// them; DNS, IP, e-mail and directory-name constraints would have to be
/// checked against every DNS name writ puts in an SVID, including those
/// of entries created at run time, which writ does not do. So any name
/// constraints are refused rather than left to fail at relying parties.
fn check_ca_constraints(cert: &X509Certificate<'_>, below: usize) -> Result<(), String> {
    let constraints = cert
        .basic_constraints()
        .map_err(|e| format!("{}: basicConstraints: {e}", cert.subject()))?;
    if let Some(limit) = constraints.and_then(|bc| bc.value.path_len_constraint)
        && usize::try_from(limit).is_ok_and(|limit| limit < below)
    {
        return Err(format!(
            "{} has pathLenConstraint {limit}, but {below} CA certificate(s) sit below it in writ's chain, so no verifier accepts the SVIDs",
            cert.subject()
        ));
    }
    if cert
        .extensions()
        .iter()
        .any(|ext| ext.oid == x509_parser::oid_registry::OID_X509_EXT_NAME_CONSTRAINTS)
    {
        return Err(format!(
            "{} carries name constraints, which writ does not support in an upstream chain (URI constraints make rustls reject every SVID, and writ does not check the DNS names it issues against others)",
            cert.subject()
        ));
    }
    Ok(())
}

/// A root of the upstream bundle as the trust anchor of writ's chain,
/// with `below` CA certificates under it: valid now, a CA allowed to sign
/// certificates, with a path length and name constraints that allow them.
fn check_anchor(root: &X509Certificate<'_>, below: usize, now_unix: i64) -> Result<(), String> {
    let v = root.validity();
    if now_unix < v.not_before.timestamp() || now_unix >= v.not_after.timestamp() {
        return Err(format!(
            "{} is not valid now (valid {} to {})",
            root.subject(),
            v.not_before,
            v.not_after
        ));
    }
    let usage = root
        .key_usage()
        .map_err(|e| format!("{}: keyUsage does not parse: {e}", root.subject()))?;
    if usage.is_some_and(|u| !u.value.key_cert_sign()) {
        return Err(format!(
            "{}'s keyUsage lacks keyCertSign, so it may not sign certificates",
            root.subject()
        ));
    }
    check_ca_constraints(root, below)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = store::read_trusted_text_file(path)?;
    let blocks = pem::parse_many(&text).map_err(|e| CaError::Upstream {
        path: path.to_owned(),
        reason: format!("not valid PEM: {e}"),
    })?;
    let certs: Vec<CertificateDer<'static>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(CaError::Upstream {
            path: path.to_owned(),
            reason: "no CERTIFICATE blocks".into(),
        });
    }
    Ok(certs)
}

/// The certificate's EC curve OID as a DER TLV, for SEC1 keys that omit it.
fn curve_oid_tlv(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    let params = cert.public_key().algorithm.parameters.as_ref()?;
    let oid = params.as_oid().ok()?;
    Some(super::authority::der::tlv(0x06, oid.as_bytes()))
}
