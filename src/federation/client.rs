//! One bundle endpoint fetch: HTTPS GET over tokio-rustls and hyper's
//! HTTP/1.1 client, with the server authenticated per profile, temporary
//! redirects followed under the same authentication, and every step bounded
//! in time and size.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, HOST, LOCATION, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::url::{EndpointUrl, UrlError};
use crate::bundle::MAX_BUNDLE_BYTES;
use crate::spiffe_id::SpiffeId;
use crate::tls::{SpiffeTls, TrustStore};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole fetch, redirects included, TLS handshakes and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Redirect hops followed before giving up.
pub const MAX_REDIRECTS: usize = 3;
/// Room for a response head; hyper's minimum is 8 KiB.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Url(#[from] UrlError),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("TLS with {0}: {1}")]
    Tls(String, String),
    /// An https_spiffe endpoint whose certificate chains to no root of the
    /// bundle held: the one failure no later fetch can mend by itself.
    #[error(
        "TLS with {0}: invalid peer certificate: the endpoint's certificate chains to no root of the bundle held for this trust domain. If the peer rotated its CA while this writ could not fetch from it, no fetch can recover: give writ the peer's current bundle with `writ bundle set` (docs/federation.md, \"When the held bundle is too old\")"
    )]
    UnknownIssuer(String),
    #[error("HTTP exchange with {0}: {1}")]
    Http(String, String),
    #[error("no answer within {}s", FETCH_TIMEOUT.as_secs())]
    Timeout,
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error(
        "{url} answered a permanent redirect (HTTP {status}) to {location:?}; permanent moves are not followed: update the configured url"
    )]
    PermanentRedirect {
        url: String,
        status: u16,
        location: String,
    },
    #[error("{url} redirected (HTTP {status}) but redirects are disabled for this trust domain")]
    RedirectsDisabled { url: String, status: u16 },
    #[error("{url} redirected without a usable Location header")]
    BadLocation { url: String },
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("bundle document is larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
}

/// How the server proves who it is.
#[derive(Clone)]
pub enum ServerAuth {
    /// An X509-SVID for `endpoint_id`, chaining to `authorities`.
    Spiffe {
        endpoint_id: SpiffeId,
        authorities: Vec<CertificateDer<'static>>,
    },
    /// A Web PKI certificate for the URL's host, chaining to `roots`.
    Web { roots: Arc<RootCertStore> },
}

impl ServerAuth {
    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut config = match self {
            ServerAuth::Spiffe {
                endpoint_id,
                authorities,
            } => {
                let tls = SpiffeTls::new();
                let mut trust = TrustStore::default();
                trust
                    .bundles
                    .insert(endpoint_id.trust_domain().clone(), authorities.clone());
                tls.set_trust(trust);
                let wanted = endpoint_id.clone();
                tls.client_config(Arc::new(move |id: &SpiffeId| *id == wanted))
                    .map_err(|e| e.to_string())?
            }
            ServerAuth::Web { roots } => rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// GETs `url` and returns the body of the 200 response (at most
/// `MAX_BUNDLE_BYTES`). 302 and 307 are followed when `follow_redirects`,
/// up to `MAX_REDIRECTS` hops, each target held to the same URL rules and
/// the same server authentication; 301 and 308 are refused, since honouring
/// a permanent move would let the peer rewrite our configuration.
pub async fn fetch(
    url: &EndpointUrl,
    auth: &ServerAuth,
    follow_redirects: bool,
) -> Result<Fetched, FetchError> {
    let config = auth
        .client_config()
        .map_err(|e| FetchError::Tls(url.to_string(), e))?;
    let fetched =
        tokio::time::timeout(FETCH_TIMEOUT, follow(url.clone(), config, follow_redirects))
            .await
            .map_err(|_| FetchError::Timeout)?;
    match (fetched, auth) {
        // Web PKI roots are the system's or a CA file, not the held bundle.
        (Err(FetchError::UnknownIssuer(at)), ServerAuth::Web { .. }) => Err(FetchError::Tls(
            at,
            "invalid peer certificate: it chains to none of the roots trusted for this endpoint"
                .into(),
        )),
        (fetched, _) => fetched,
    }
}

async fn follow(
    mut url: EndpointUrl,
    config: Arc<rustls::ClientConfig>,
    follow_redirects: bool,
) -> Result<Fetched, FetchError> {
    for _ in 0..=MAX_REDIRECTS {
        match get(&url, config.clone()).await? {
            Answer::Body(fetched) => return Ok(fetched),
            Answer::Redirect { status, location } => {
                if !follow_redirects {
                    return Err(FetchError::RedirectsDisabled {
                        url: url.to_string(),
                        status,
                    });
                }
                let next = url.resolve(&location)?;
                tracing::debug!(from = %url, to = %next, status, "following a temporary redirect");
                url = next;
            }
        }
    }
    Err(FetchError::TooManyRedirects)
}

/// A 200 response's body, and the certificate chain the server that sent
/// it presented (leaf first).
#[derive(Debug)]
pub struct Fetched {
    pub body: Vec<u8>,
    pub presented: Vec<CertificateDer<'static>>,
}

enum Answer {
    Body(Fetched),
    Redirect { status: u16, location: String },
}

/// Aborts the connection task when the exchange is over (or abandoned).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn get(url: &EndpointUrl, config: Arc<rustls::ClientConfig>) -> Result<Answer, FetchError> {
    let at = url.to_string();
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((url.host(), url.port())),
    )
    .await
    .map_err(|_| FetchError::Connect(at.clone(), "timed out".into()))?
    .map_err(|e| FetchError::Connect(at.clone(), e.to_string()))?;
    let server_name = ServerName::try_from(url.host().to_owned())
        .map_err(|e| FetchError::Tls(at.clone(), format!("server name: {e}")))?;
    let tls = TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| {
            let unknown_issuer = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|e| {
                    // BadSignature: a root of the same name is held, but not
                    // the key that signed (a peer's roots may share a name).
                    matches!(
                        e,
                        rustls::Error::InvalidCertificate(
                            rustls::CertificateError::UnknownIssuer
                                | rustls::CertificateError::BadSignature
                        )
                    )
                });
            if unknown_issuer {
                FetchError::UnknownIssuer(at.clone())
            } else {
                FetchError::Tls(at.clone(), e.to_string())
            }
        })?;
    let presented: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let http = |e: hyper::Error| FetchError::Http(at.clone(), e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_RESPONSE_HEAD)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
        .await
        .map_err(http)?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "bundle endpoint connection ended");
        }
    }));
    let request = Request::get(url.target())
        .header(HOST, url.authority())
        .header(USER_AGENT, concat!("writ/", env!("CARGO_PKG_VERSION")))
        .header(ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(at.clone(), e.to_string()))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    match status {
        StatusCode::OK => {
            let body = Limited::new(response.into_body(), MAX_BUNDLE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        FetchError::TooLarge
                    } else {
                        FetchError::Http(at.clone(), e.to_string())
                    }
                })?;
            Ok(Answer::Body(Fetched {
                body: body.to_bytes().to_vec(),
                presented,
            }))
        }
        StatusCode::FOUND
        | StatusCode::TEMPORARY_REDIRECT
        | StatusCode::MOVED_PERMANENTLY
        | StatusCode::PERMANENT_REDIRECT => {
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| FetchError::BadLocation { url: at.clone() })?
                .to_owned();
            if matches!(status, StatusCode::FOUND | StatusCode::TEMPORARY_REDIRECT) {
                Ok(Answer::Redirect {
                    status: status.as_u16(),
                    location,
                })
            } else {
                Err(FetchError::PermanentRedirect {
                    url: at,
                    status: status.as_u16(),
                    location,
                })
            }
        }
        other => Err(FetchError::Status {
            url: at,
            status: other.as_u16(),
        }),
    }
}
