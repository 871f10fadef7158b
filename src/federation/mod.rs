//! SPIFFE federation: the HTTPS bundle endpoint serving writ's own trust
//! bundle, one fetcher per configured foreign trust domain, the stored set
//! of foreign bundles (fetched, bootstrapped or set by hand), and which of
//! them each workload receives (those its identities list in `federates_with`).

mod client;
mod endpoint;
mod fetcher;
mod manager;
mod persist;
pub(crate) mod set;
mod url;
mod usable;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use client::{FetchError, MAX_REDIRECTS, ServerAuth, fetch};
pub use endpoint::BundleEndpoint;
pub use fetcher::{DEFAULT_REFRESH, FetchFailure, MAX_POLL_INTERVAL, Schedule, poll_interval};
pub use manager::{
    BundleChange, BundleInfo, Federation, FederationChanges, FederationPlan, FetchStatus, diff,
    read_bundle_file,
};
pub use set::{BundleSource, FederatedBundle, FederatedBundles};
pub use url::{EndpointUrl, UrlError};
pub use usable::UnusableBundle;

use crate::agent::Agent;
use crate::bundle::{BundleError, MAX_BUNDLE_BYTES, TrustBundle};
use crate::identity::Entitlement;
use crate::spiffe_id::TrustDomain;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error(
        "{0} is writ's own trust domain; its bundle comes from writ's CA and cannot be set or deleted"
    )]
    OwnTrustDomain(TrustDomain),
    #[error(
        "{0} is configured in [[federation.trust_domain]] and its fetcher would restore the bundle; remove it from the configuration instead"
    )]
    Configured(TrustDomain),
    #[error("no bundle held for trust domain {0}")]
    NotFound(TrustDomain),
    #[error("bundle: {0}")]
    InvalidBundle(String),
    /// A bundle set by hand or read from a bootstrap file that would trust
    /// nothing, by the rule fetched documents obey.
    #[error("bundle for {trust_domain} refused: {problem}")]
    Unusable {
        trust_domain: TrustDomain,
        problem: UnusableBundle,
    },
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// A trust file others could change (the message names it).
    #[error("{0}")]
    UntrustedFile(String),
    #[error("no system CA file found (tried {0}); set ca_bundle for every https_web trust domain")]
    NoSystemRoots(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("bundle endpoint cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bundle endpoint TLS: {0}")]
    EndpointTls(String),
}

/// Why a trust domain named in `federates_with` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FederatesWithError {
    #[error("{:?}: {reason}", writ_attestors::excerpt(.text))]
    Invalid {
        text: String,
        reason: crate::spiffe_id::SpiffeIdError,
    },
    #[error("names writ's own trust domain {0}; federation is only with other trust domains")]
    OwnTrustDomain(TrustDomain),
}

/// One `federates_with` item, from the config, an entry created through
/// the admin API or a task. Writ's own bundle is every workload's already
/// and comes from its CA, so naming it there is a mistake, refused alike
/// everywhere. `own` is None where the trust domain is itself invalid.
pub fn federated_trust_domain(
    text: &str,
    own: Option<&TrustDomain>,
) -> Result<TrustDomain, FederatesWithError> {
    let td = TrustDomain::new(text).map_err(|reason| FederatesWithError::Invalid {
        text: text.to_owned(),
        reason,
    })?;
    if Some(&td) == own {
        return Err(FederatesWithError::OwnTrustDomain(td));
    }
    Ok(td)
}

/// The path of the bundle endpoint's SPIFFE ID when
/// `[federation.bundle_endpoint] spiffe_id` is not set.
pub const DEFAULT_ENDPOINT_PATH: &str = "/writ/bundle-endpoint";

/// The SPIFFE IDs of `trust_domain` that no entry or task may take: the
/// one the bundle endpoint presents with `endpoint` (https_spiffe), and
/// the default one whether or not an endpoint is configured. Peers accept
/// a bundle from whoever presents that identity, so a workload holding it
/// could serve them a forged bundle of writ's trust domain; and keeping
/// the default reserved while no endpoint runs means enabling one later
/// cannot find an entry already issuing its identity.
pub fn reserved_ids(
    trust_domain: &TrustDomain,
    endpoint: Option<&crate::config::BundleEndpointConfig>,
) -> Vec<crate::spiffe_id::SpiffeId> {
    let mut ids: Vec<_> = trust_domain
        .spiffe_id(DEFAULT_ENDPOINT_PATH)
        .into_iter()
        .collect();
    if let Some(crate::config::BundleEndpointConfig {
        profile: crate::config::EndpointServerProfile::HttpsSpiffe { spiffe_id },
        ..
    }) = endpoint
        && !ids.contains(spiffe_id)
    {
        ids.push(spiffe_id.clone());
    }
    ids
}

/// Why a reserved ID (see `reserved_ids`) was refused, for every place
/// that refuses one.
pub fn reserved_id_reason(id: &crate::spiffe_id::SpiffeId) -> String {
    format!(
        "{id} is reserved for writ's federation bundle endpoint (federation.bundle_endpoint.spiffe_id, by default spiffe://<trust domain>{DEFAULT_ENDPOINT_PATH}): federated peers accept writ's bundle from whoever presents it, so no workload may hold it"
    )
}

/// Reads and checks every file `config` names, as a start does, without
/// an agent or the store: the federated trust domains' CA files and
/// bootstrap bundles, and the bundle endpoint's certificate and key when
/// it serves a Web PKI one. Every problem found, for `writ validate`.
pub fn check_files(config: &crate::config::FederationConfig) -> Vec<FederationError> {
    let mut problems = manager::check_trust_domain_files(config);
    if let Some(crate::config::BundleEndpointConfig {
        profile: crate::config::EndpointServerProfile::HttpsWeb { cert, key },
        ..
    }) = &config.bundle_endpoint
        && let Err(e) = endpoint::load_web_identity(cert, key)
    {
        problems.push(e);
    }
    problems
}

/// The two bundle encodings accepted from operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleFormat {
    /// A SPIFFE bundle document (JWK Set).
    Spiffe,
    /// PEM `CERTIFICATE` blocks (X.509 authorities only).
    Pem,
}

/// Parses an operator-supplied bundle for `trust_domain`, strictly. With
/// no `format`, a document starting with `{` is SPIFFE JSON and anything
/// else PEM. A bundle without a single authority is refused: trusting it
/// would change nothing except hiding a mistake.
pub fn parse_bundle(
    trust_domain: TrustDomain,
    bytes: &[u8],
    format: Option<BundleFormat>,
) -> Result<TrustBundle, FederationError> {
    let looks_like_json = bytes.trim_ascii_start().starts_with(b"{");
    let format = format.unwrap_or(if looks_like_json {
        BundleFormat::Spiffe
    } else {
        BundleFormat::Pem
    });
    let invalid = |e: BundleError| FederationError::InvalidBundle(e.to_string());
    let bundle = match format {
        BundleFormat::Spiffe => {
            TrustBundle::from_spiffe_json(trust_domain, bytes).map_err(invalid)?
        }
        BundleFormat::Pem => {
            let text = std::str::from_utf8(bytes).map_err(|_| {
                FederationError::InvalidBundle("PEM text is not valid UTF-8".into())
            })?;
            TrustBundle::from_pem(trust_domain, text).map_err(|e| {
                // `writ bundle show --format spiffe` output handed to
                // `bundle set` without the same flag: the bare PEM error
                // does not say what to change.
                if looks_like_json {
                    FederationError::InvalidBundle(format!(
                        "{e}; the input looks like a SPIFFE bundle document (JSON), not PEM: pass --format spiffe (BUNDLE_FORMAT_SPIFFE)"
                    ))
                } else {
                    invalid(e)
                }
            })?
        }
    };
    if bundle.x509_authorities.is_empty() && bundle.jwt_authorities.is_empty() {
        return Err(FederationError::InvalidBundle(
            "the document holds no x509-svid or jwt-svid authority".into(),
        ));
    }
    Ok(bundle)
}

/// Reads a small file the config names (a bootstrap bundle) of at most
/// `MAX_BUNDLE_BYTES`; see `read_limited_to`.
pub(crate) fn read_limited(path: &Path) -> Result<String, FederationError> {
    read_limited_to(path, MAX_BUNDLE_BYTES as u64)
}

/// Reads a trust file the config names (a bootstrap bundle, an https_web
/// CA file) of at most `limit` bytes. Whoever can write it decides whom
/// writ trusts, so, as for the upstream CA's files, it is refused if group
/// or others may write it or a user other than writ's or root owns it;
/// checked on the file opened.
pub(crate) fn read_limited_to(path: &Path, limit: u64) -> Result<String, FederationError> {
    let bad = |reason: String| FederationError::File {
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    crate::ca::check_trusted(path, &meta)
        .map_err(|e| FederationError::UntrustedFile(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(bad(format!("is larger than {limit} bytes")));
    }
    String::from_utf8(bytes).map_err(|_| bad("is not valid UTF-8 text".into()))
}

/// The foreign bundles a caller holding `entitlements` receives: those of
/// every trust domain any of its identities lists in `federates_with`, in
/// trust domain order. Tasks list none yet; when a task's intent gains
/// `federates_with`, `Agent::task_entitlement` fills it and this follows.
pub fn bundles_for(agent: &Agent, entitlements: &[Entitlement]) -> Vec<Arc<FederatedBundle>> {
    let own = agent.trust_domain();
    agent.federated_bundles().select(
        entitlements
            .iter()
            .flat_map(|e| e.federates_with.iter())
            .filter(|td| *td != own),
    )
}

/// X.509 bundle map entries (`spiffe://<td>` → concatenated DER) for
/// `X509SVIDResponse.federated_bundles` and `X509BundlesResponse.bundles`.
/// A bundle holding only JWT keys has nothing to put here.
pub fn x509_bundle_map(bundles: &[Arc<FederatedBundle>]) -> HashMap<String, Vec<u8>> {
    bundles
        .iter()
        .filter(|b| !b.x509_der.is_empty())
        .map(|b| (b.bundle.trust_domain.id_string(), b.x509_der.clone()))
        .collect()
}

/// JWT bundle map entries (`spiffe://<td>` → JWKS JSON) for
/// `JWTBundlesResponse.bundles`: the hook for FetchJWTBundles, which adds
/// `x509_bundle_map`'s counterpart for the same `bundles_for` selection
/// beside writ's own JWKS (and ValidateJWTSVID, which looks a token's
/// trust domain up among them).
pub fn jwt_bundle_map(bundles: &[Arc<FederatedBundle>]) -> HashMap<String, Vec<u8>> {
    bundles
        .iter()
        .map(|b| (b.bundle.trust_domain.id_string(), b.bundle.jwt_jwks_json()))
        .collect()
}

/// What a stream compares to decide whether its federated bundles changed.
pub fn revisions(bundles: &[Arc<FederatedBundle>]) -> Vec<u64> {
    bundles.iter().map(|b| b.revision).collect()
}

#[cfg(test)]
mod tests;
