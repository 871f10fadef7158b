//! Mutual TLS authenticated by SPIFFE ID (rustls, ring): verifies the peer's
//! X.509-SVID chain against the bundle of the peer's own trust domain, checks
//! revocation against any CRLs we hold, and then asks an authorizer whether
//! that SPIFFE ID may talk to us. No hostname checks: the SPIFFE ID is the name.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::spiffe_id::{SpiffeId, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("peer certificate is malformed: {0}")]
    MalformedCertificate(String),
    #[error("peer certificate must carry exactly one URI SAN with a SPIFFE ID")]
    NoSpiffeId,
    #[error("peer SPIFFE ID is invalid: {0}")]
    BadSpiffeId(#[from] crate::spiffe_id::SpiffeIdError),
    #[error("no bundle for trust domain {0}")]
    UnknownTrustDomain(TrustDomain),
    #[error("our private key is not usable: {0}")]
    BadKey(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Reads the single SPIFFE ID URI SAN of a certificate.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, TlsError> {
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| TlsError::MalformedCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::MalformedCertificate(e.to_string()))?
        .ok_or(TlsError::NoSpiffeId)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => Ok(uri.parse()?),
        _ => Err(TlsError::NoSpiffeId),
    }
}

/// What we trust: X.509 authorities per trust domain, and CRLs.
#[derive(Default, Clone)]
pub struct TrustStore {
    pub bundles: HashMap<TrustDomain, Vec<CertificateDer<'static>>>,
    pub crls: Vec<bytes::Bytes>,
}

pub type Authorizer = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// Our own SVID and what we trust, both replaceable while connections run, so
/// a Workload API stream can feed rotations straight in.
pub struct SpiffeTls {
    identity: RwLock<Option<Arc<CertifiedKey>>>,
    trust: RwLock<Arc<TrustStore>>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for SpiffeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeTls").finish_non_exhaustive()
    }
}

impl SpiffeTls {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            identity: RwLock::new(None),
            trust: RwLock::new(Arc::new(TrustStore::default())),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// Installs our SVID: DER chain (leaf first) and PKCS#8 private key.
    pub fn set_identity(
        &self,
        chain: Vec<CertificateDer<'static>>,
        pkcs8_key: &[u8],
    ) -> Result<(), TlsError> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8_key.to_vec()));
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::BadKey(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(chain, signing_key));
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Some(certified);
        Ok(())
    }

    pub fn set_trust(&self, trust: TrustStore) {
        *self.trust.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(trust);
    }

    fn current_identity(&self) -> Option<Arc<CertifiedKey>> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn current_trust(&self) -> Arc<TrustStore> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A server that requires a client SVID accepted by `authorize`.
    pub fn server_config(
        self: &Arc<Self>,
        authorize: Authorizer,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = Arc::new(PeerVerifier {
            tls: self.clone(),
            authorize,
            algorithms: self.provider.signature_verification_algorithms,
        });
        Ok(
            rustls::ServerConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(IdentityResolver(self.clone()))),
        )
    }

    /// A client that presents our SVID and accepts a server `authorize` allows.
    pub fn client_config(
        self: &Arc<Self>,
        authorize: Authorizer,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let verifier = Arc::new(PeerVerifier {
            tls: self.clone(),
            authorize,
            algorithms: self.provider.signature_verification_algorithms,
        });
        Ok(
            rustls::ClientConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_cert_resolver(Arc::new(IdentityResolver(self.clone()))),
        )
    }

    /// Verifies a peer chain for the given usage and returns its SPIFFE ID.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        // writ's own reasons stay in words (no SPIFFE ID, no bundle for its
        // trust domain); a chain webpki refuses is refused with its kind.
        let id = spiffe_id_of(end_entity).map_err(|e| {
            tracing::info!(error = %e, "refused a peer certificate");
            rustls::Error::General(e.to_string())
        })?;
        let trust = self.current_trust();
        let roots = trust.bundles.get(id.trust_domain()).ok_or_else(|| {
            let e = TlsError::UnknownTrustDomain(id.trust_domain().clone());
            tracing::info!(peer = %id, error = %e, "refused a peer certificate");
            rustls::Error::General(e.to_string())
        })?;
        let anchors: Vec<_> = roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let crls: Vec<webpki::CertRevocationList<'_>> = trust
            .crls
            .iter()
            .filter_map(|der| webpki::BorrowedCertRevocationList::from_der(der).ok())
            .map(webpki::CertRevocationList::from)
            .collect();
        let crl_refs: Vec<&webpki::CertRevocationList<'_>> = crls.iter().collect();
        // A CRL only speaks for its own issuer; certificates from an issuer
        // we hold no CRL for are not revoked as far as we know.
        let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs)
            .ok()
            .map(|b| {
                b.with_depth(webpki::RevocationCheckDepth::EndEntity)
                    .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                    .build()
            });
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            tracing::info!(peer = %id, error = %e, "refused a peer certificate");
            chain_refused(&id, e)
        })?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map_err(|e| {
            tracing::info!(peer = %id, error = %e, "refused a peer certificate");
            chain_refused(&id, e)
        })?;
        Ok(id)
    }
}

/// Why webpki refused `peer`'s chain, as rustls names it where it has a
/// name: the TLS alert the peer receives is chosen from that
/// (certificate_revoked, certificate_expired, unknown_ca, ...), where an
/// untyped error sends a bare handshake_failure. Anything rarer stays in
/// words (rustls would print a kind it has no name for as a Debug dump).
fn chain_refused(peer: &SpiffeId, e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as Kind;
    let kind = match e {
        webpki::Error::CertRevoked => Kind::Revoked,
        webpki::Error::CertExpired { time, not_after } => Kind::ExpiredContext { time, not_after },
        webpki::Error::CertNotValidYet { time, not_before } => {
            Kind::NotValidYetContext { time, not_before }
        }
        webpki::Error::InvalidCertValidity => Kind::Expired,
        webpki::Error::UnknownIssuer => Kind::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => Kind::BadSignature,
        webpki::Error::BadDer | webpki::Error::BadDerTime => Kind::BadEncoding,
        other => return rustls::Error::General(format!("peer {peer}: {other}")),
    };
    rustls::Error::InvalidCertificate(kind)
}

#[derive(Debug)]
struct IdentityResolver(Arc<SpiffeTls>);

impl rustls::server::ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current_identity()
    }
}

impl rustls::client::ResolvesClientCert for IdentityResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current_identity()
    }
    fn has_certs(&self) -> bool {
        self.0.current_identity().is_some()
    }
}

struct PeerVerifier {
    tls: Arc<SpiffeTls>,
    authorize: Authorizer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerVerifier")
    }
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let id = self
            .tls
            .verify_peer(end_entity, intermediates, now, usage)?;
        if !(self.authorize)(&id) {
            tracing::info!(peer = %id, "refused a peer: its SPIFFE ID is not authorized");
            // writ's own reason, in words: whoever reads the error (a
            // federation fetch's status, say) learns which identity it was.
            return Err(rustls::Error::General(format!(
                "peer {id} is not authorized"
            )));
        }
        Ok(())
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
