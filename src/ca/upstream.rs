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
    let top = &parsed[parsed.len() - 1];
    let anchored = roots.iter().any(|root| {
        X509Certificate::from_der(root).is_ok_and(|(_, r)| {
            r.subject().as_raw() == top.issuer().as_raw()
                && top.verify_signature(Some(r.public_key())).is_ok()
        })
    });
    if !anchored {
        return Err(fail(
            &files.cert,
            format!(
                "{} does not chain to any root in {}",
                top.subject(),
                files.bundle.display()
            ),
        ));
    }

    let curve = curve_oid_tlv(leafward);
    let key_text = store::read_private_text_file(&files.key)?;
    let key = key_from_pem(&key_text, curve.as_deref()).map_err(|r| fail(&files.key, r))?;
    let tail = chain.clone();
    let signer =
        SigningAuthority::new(chain[0].clone(), key, tail).map_err(|r| fail(&files.key, r))?;
    Ok(Upstream {
        signer: Arc::new(signer),
        roots,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = store::read_text_file(path)?;
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
