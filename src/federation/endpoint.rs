//! writ's SPIFFE bundle endpoint: HTTPS `GET /` answering with the trust
//! domain's own bundle document. The server presents either an X509-SVID
//! minted from writ's CA and kept fresh across SVID and CA rotation
//! (`https_spiffe`), or a Web PKI certificate from files (`https_web`).
//! Connections are few, small and bounded: header size, handshake and
//! connection time, and how many are open at once.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::FederationError;
use crate::agent::Agent;
use crate::bundle::TrustBundle;
use crate::config::{BundleEndpointConfig, EndpointServerProfile};
use crate::identity::Entitlement;
use crate::spiffe_id::SpiffeId;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection, however slow, lives longer than this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Request line plus headers; a bundle GET needs a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;
const MAX_CONNECTIONS: usize = 128;
/// The SVID cache key for the endpoint's own identity; it shares the
/// agent's cache so CA rotation re-keys it like every workload SVID.
const IDENTITY_CACHE_KEY: &str = "federation:bundle-endpoint";

/// The certificate the server presents, swapped in place on rotation.
struct CurrentCert(RwLock<Option<Arc<CertifiedKey>>>);

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert([redacted])")
    }
}

impl CurrentCert {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, String> {
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        // rustls's message names the problem, never the key bytes.
        .map_err(|e| format!("private key is not usable: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing_key)))
}

/// A bound, ready-to-serve bundle endpoint.
pub struct BundleEndpoint {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    cert: Arc<CurrentCert>,
    agent: Arc<Agent>,
    refresh_hint: Duration,
    /// https_spiffe: the identity to keep minting, and its TTL.
    svid: Option<(SpiffeId, Duration)>,
}

impl BundleEndpoint {
    /// Binds the listener and loads (or mints) the server certificate, so a
    /// bad address or unusable certificate stops writ at start.
    pub async fn bind(
        agent: Arc<Agent>,
        config: &BundleEndpointConfig,
        svid_ttl: Duration,
    ) -> Result<Self, FederationError> {
        let cert = Arc::new(CurrentCert(RwLock::new(None)));
        let svid = match &config.profile {
            EndpointServerProfile::HttpsSpiffe { spiffe_id } => {
                let key = mint_identity(&agent, spiffe_id, svid_ttl).await?;
                cert.set(key.0);
                Some((spiffe_id.clone(), svid_ttl))
            }
            EndpointServerProfile::HttpsWeb { cert: chain, key } => {
                cert.set(load_web_identity(chain, key)?);
                None
            }
        };
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| FederationError::EndpointTls(e.to_string()))?
            // Clients of a bundle endpoint must never need a certificate.
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| FederationError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            cert,
            agent,
            refresh_hint: config.refresh_hint,
            svid,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let refresher = self.svid.clone().map(|(id, ttl)| {
            tokio::spawn(keep_identity_fresh(
                self.agent.clone(),
                self.cert.clone(),
                id,
                ttl,
                stop.clone(),
            ))
        });
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "bundle endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "bundle endpoint is at its connection limit; dropping a connection");
                continue;
            };
            let acceptor = self.acceptor.clone();
            let agent = self.agent.clone();
            let hint = self.refresh_hint;
            tokio::spawn(async move {
                let _slot = slot;
                let served = tokio::time::timeout(
                    CONNECTION_TIMEOUT,
                    serve_connection(acceptor, tcp, agent, hint),
                )
                .await;
                match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "bundle endpoint connection failed")
                    }
                    Err(_) => tracing::debug!(%peer, "bundle endpoint connection timed out"),
                }
            });
        }
        if let Some(refresher) = refresher {
            refresher.abort();
        }
    }
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    agent: Arc<Agent>,
    hint: Duration,
) -> Result<(), String> {
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = respond(&agent.own_bundle().bundle, hint, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD)
        .max_headers(MAX_HEADERS)
        // One request per connection keeps the connection time bound honest.
        .keep_alive(false)
        .serve_connection(TokioIo::new(tls), service)
        .await
        .map_err(|e| e.to_string())
}

/// `GET /` gets the bundle document; any other path 404, any other method
/// on `/` 405. A query string is ignored, as a static file server would.
fn respond<B>(own: &TrustBundle, hint: Duration, request: &Request<B>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if request.uri().path() != "/" {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed\n");
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET"));
        return r;
    }
    let mut bundle = own.clone();
    bundle.refresh_hint = Some(hint);
    let mut r = Response::new(Full::new(Bytes::from(bundle.to_spiffe_json())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    // A cache in between would serve stale keys after a rotation.
    r.headers_mut().insert(
        CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

/// Mints (or reuses from the agent's cache) the endpoint's SVID; returns it
/// as a rustls key and the moment it is due for rotation.
async fn mint_identity(
    agent: &Agent,
    spiffe_id: &SpiffeId,
    ttl: Duration,
) -> Result<(Arc<CertifiedKey>, SystemTime), FederationError> {
    let entitlement = Entitlement {
        cache_key: IDENTITY_CACHE_KEY.to_owned(),
        spiffe_id: spiffe_id.clone(),
        x509_svid_ttl: ttl,
        dns_names: Vec::new(),
        hint: String::new(),
        federates_with: Vec::new(),
        not_after_cap: None,
        task_id: None,
        parent_task_id: None,
    };
    let cached = agent
        .svid_for(&entitlement, SystemTime::now(), || {
            crate::agent::Issuance::new(None)
        })
        .await
        .map_err(|e| FederationError::EndpointTls(format!("minting {spiffe_id}: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        cached.svid.private_key_pkcs8_der().to_vec(),
    ));
    let certified =
        certified_key(cached.svid.cert_chain.clone(), key).map_err(FederationError::EndpointTls)?;
    Ok((certified, cached.rotate_at))
}

/// Keeps the presented SVID current: re-mints at its rotation point, and
/// re-checks on each far-reaching change (a CA rotation empties the SVID
/// cache, so the next check mints under the new signer). Tasks and CRLs
/// cannot change it, and re-checking for each of them cost a key parse.
async fn keep_identity_fresh(
    agent: Arc<Agent>,
    cert: Arc<CurrentCert>,
    spiffe_id: SpiffeId,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = agent.changes().subscribe_far_reaching();
    loop {
        changes.borrow_and_update();
        let now = SystemTime::now();
        let renew_at = match mint_identity(&agent, &spiffe_id, ttl).await {
            Ok((key, rotate_at)) => {
                let current = cert.get();
                if current.is_none_or(|c| c.cert != key.cert) {
                    tracing::debug!(%spiffe_id, "bundle endpoint SVID renewed");
                }
                cert.set(key);
                rotate_at.max(now + Duration::from_secs(1))
            }
            Err(e) => {
                // The old SVID stays in place while it lasts.
                tracing::error!(error = %e, "renewing the bundle endpoint SVID failed; retrying in 5s");
                now + Duration::from_secs(5)
            }
        };
        tokio::select! {
            // By the wall clock the SVID's validity is in: after a jump or
            // a resume from suspend, one monotonic sleep would serve an
            // expired certificate until it ran out.
            _ = crate::wall_clock::sleep_until(renew_at) => {}
            changed = changes.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

pub(super) fn load_web_identity(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<Arc<CertifiedKey>, FederationError> {
    let bad = |path: &std::path::Path, reason: String| FederationError::File {
        path: path.to_owned(),
        reason,
    };
    // The certificate decides what peers see as writ's endpoint and the
    // key proves it: both get the checks writ's CA files get.
    let chain_text = crate::ca::read_trusted_text_file(cert_path)
        .map_err(|e| FederationError::EndpointTls(e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = pem::parse_many(&chain_text)
        .map_err(|e| bad(cert_path, format!("not PEM: {e}")))?
        .into_iter()
        .filter(|block| block.tag() == "CERTIFICATE")
        .map(|block| CertificateDer::from(block.into_contents()))
        .collect();
    if chain.is_empty() {
        return Err(bad(cert_path, "holds no CERTIFICATE block".into()));
    }
    let key_text = crate::ca::read_private_text_file(key_path)
        .map_err(|e| FederationError::EndpointTls(e.to_string()))?;
    // Never echo the key file's content in an error.
    let blocks =
        pem::parse_many(&key_text).map_err(|_| bad(key_path, "is not a PEM file".into()))?;
    let key = blocks
        .into_iter()
        .find_map(|block| match block.tag() {
            "PRIVATE KEY" => Some(PrivateKeyDer::Pkcs8(block.into_contents().into())),
            "EC PRIVATE KEY" => Some(PrivateKeyDer::Sec1(block.into_contents().into())),
            "RSA PRIVATE KEY" => Some(PrivateKeyDer::Pkcs1(block.into_contents().into())),
            _ => None,
        })
        .ok_or_else(|| {
            bad(
                key_path,
                "holds no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block".into(),
            )
        })?;
    certified_key(chain, key).map_err(|reason| bad(key_path, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::spiffe_id::TrustDomain;

    fn request(method: Method, target: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(target)
            .body(())
            .unwrap()
    }

    /// The https_web certificate and key get the CA files' checks: no
    /// certificate others may write, no key others may read, neither owned
    /// by another user; each refusal names the file and what is wrong.
    #[test]
    fn web_identity_files_others_could_change_or_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("endpoint.pem");
        let key_path = dir.path().join("endpoint.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let mode = |path: &std::path::Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        mode(&cert_path, 0o644);
        mode(&key_path, 0o600);
        load_web_identity(&cert_path, &key_path).unwrap();

        mode(&key_path, 0o644);
        let err = load_web_identity(&cert_path, &key_path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("endpoint.key") && err.contains("0644"),
            "{err}"
        );
        mode(&key_path, 0o600);

        mode(&cert_path, 0o666);
        let err = load_web_identity(&cert_path, &key_path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("endpoint.pem") && err.contains("0666") && err.contains("writable"),
            "{err}"
        );
        mode(&cert_path, 0o644);

        if nix::unistd::geteuid().is_root() {
            let nobody = Some(nix::unistd::Uid::from_raw(65534));
            for path in [&cert_path, &key_path] {
                nix::unistd::chown(path, nobody, None).unwrap();
                let err = load_web_identity(&cert_path, &key_path)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains("owned by uid 65534"), "{err}");
                nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
            }
        }
    }

    #[test]
    fn only_get_slash_gets_the_bundle() {
        let own = TrustBundle {
            x509_authorities: vec![crate::federation::tests::ca_cert()],
            sequence: 9,
            ..TrustBundle::new(TrustDomain::new("a.test").unwrap())
        };
        let hint = Duration::from_secs(42);

        for target in ["/", "/?x=1"] {
            let ok = respond(&own, hint, &request(Method::GET, target));
            assert_eq!(ok.status(), StatusCode::OK);
            assert_eq!(ok.headers()[CONTENT_TYPE], "application/json");
            let body =
                futures::executor::block_on(http_body_util::BodyExt::collect(ok.into_body()))
                    .unwrap()
                    .to_bytes();
            let served = TrustBundle::from_spiffe_json(own.trust_domain.clone(), &body).unwrap();
            assert_eq!(served.x509_authorities, own.x509_authorities);
            assert_eq!(served.sequence, 9);
            assert_eq!(served.refresh_hint, Some(hint));
        }

        for method in [Method::POST, Method::PUT, Method::DELETE, Method::HEAD] {
            let r = respond(&own, hint, &request(method, "/"));
            assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(r.headers()[ALLOW], "GET");
        }
        for target in ["/bundle", "/x/", "//"] {
            let r = respond(&own, hint, &request(Method::GET, target));
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{target}");
        }
    }

    #[test]
    fn private_keys_stay_out_of_debug_output() {
        let cert = CurrentCert(RwLock::new(None));
        assert_eq!(format!("{cert:?}"), "CurrentCert([redacted])");
    }
}
