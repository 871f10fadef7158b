//! Federation tests that need real TLS peers and a real agent: a throwaway
//! CA per test, an HTTPS server on 127.0.0.1 answering whatever a test
//! scripts (raw HTTP/1.1, so the client is not tested against itself), the
//! fetch client and fetcher against it, and the manager over a real store.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::client::{FetchError, MAX_REDIRECTS, ServerAuth, fetch};
use super::fetcher::{FetchFailure, fetch_once};
use super::*;
use crate::config::{
    Config, EndpointClientProfile, Environment, FederatedTrustDomainConfig, FederationConfig,
};
use crate::spiffe_id::SpiffeId;

/// A self-signed CA certificate (key discarded).
pub(super) fn ca_cert() -> CertificateDer<'static> {
    TestCa::new().cert
}

struct TestCa {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new() -> Self {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap().der().clone();
        Self {
            cert,
            issuer: Issuer::new(p, key),
        }
    }

    fn leaf(&self, sans: Vec<SanType>) -> Arc<CertifiedKey> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap().der().clone();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(der)
            .unwrap();
        Arc::new(CertifiedKey::new(vec![cert], signing))
    }

    fn svid(&self, id: &str) -> Arc<CertifiedKey> {
        self.leaf(vec![SanType::URI(id.try_into().unwrap())])
    }

    fn web(&self) -> Arc<CertifiedKey> {
        self.leaf(vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ])
    }
}

#[derive(Debug)]
struct SwappableCert(RwLock<Arc<CertifiedKey>>);

impl rustls::server::ResolvesServerCert for SwappableCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap().clone())
    }
}

type Script = Arc<dyn Fn(&str) -> Vec<u8> + Send + Sync>;

/// An HTTPS server on 127.0.0.1 that records each request line and writes
/// back whatever `script` returns for it, then closes the connection.
struct ScriptedServer {
    addr: SocketAddr,
    cert: Arc<SwappableCert>,
    requests: Arc<Mutex<Vec<String>>>,
    script: Arc<RwLock<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedServer {
    async fn start(cert: Arc<CertifiedKey>, script: Script) -> Self {
        let cert = Arc::new(SwappableCert(RwLock::new(cert)));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(RwLock::new(script));
        let (reqs, scr) = (requests.clone(), script.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let (reqs, scr) = (reqs.clone(), scr.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let line = text.lines().next().unwrap_or_default().to_owned();
                    reqs.lock().unwrap().push(line.clone());
                    let answer = (scr.read().unwrap().clone())(&line);
                    let _ = tls.write_all(&answer).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self {
            addr,
            cert,
            requests,
            script,
            task,
        }
    }

    fn url(&self, path: &str) -> EndpointUrl {
        EndpointUrl::parse(&format!("https://127.0.0.1:{}{path}", self.addr.port())).unwrap()
    }

    fn set_script(&self, script: Script) {
        *self.script.write().unwrap() = script;
    }

    fn set_cert(&self, cert: Arc<CertifiedKey>) {
        *self.cert.0.write().unwrap() = cert;
    }

    fn request_lines(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn json_ok(body: &[u8]) -> Vec<u8> {
    response("200 OK", &[("Content-Type", "application/json")], body)
}

fn fixed(answer: Vec<u8>) -> Script {
    Arc::new(move |_| answer.clone())
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn spiffe_auth(id: &str, authorities: Vec<CertificateDer<'static>>) -> ServerAuth {
    ServerAuth::Spiffe {
        endpoint_id: id.parse().unwrap(),
        authorities,
    }
}

fn web_auth(root: &CertificateDer<'static>) -> ServerAuth {
    let mut store = rustls::RootCertStore::empty();
    store.add(root.clone()).unwrap();
    ServerAuth::Web {
        roots: Arc::new(store),
    }
}

const SERVER_ID: &str = "spiffe://b.test/bundle-server";

#[tokio::test]
async fn https_spiffe_checks_the_chain_and_the_endpoint_id() {
    let ca = TestCa::new();
    let server = ScriptedServer::start(ca.svid(SERVER_ID), fixed(json_ok(b"{\"keys\":[]}"))).await;
    let url = server.url("/");

    let fetched = fetch(&url, &spiffe_auth(SERVER_ID, vec![ca.cert.clone()]), true)
        .await
        .unwrap();
    assert_eq!(fetched.body, b"{\"keys\":[]}");
    // With the chain the server presented, leaf first.
    assert_eq!(
        crate::tls::spiffe_id_of(&fetched.presented[0])
            .unwrap()
            .to_string(),
        SERVER_ID
    );

    // Right chain, wrong SPIFFE ID.
    let err = fetch(
        &url,
        &spiffe_auth("spiffe://b.test/other", vec![ca.cert.clone()]),
        true,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, FetchError::Tls(_, m) if m.contains("not authorized")),
        "{err}"
    );
    // Right ID, a bundle the server's CA is not in: what a peer that
    // rotated past the bundle held looks like, which says how to recover.
    let err = fetch(&url, &spiffe_auth(SERVER_ID, vec![ca_cert()]), true)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::UnknownIssuer(..)), "{err}");
    assert!(err.to_string().contains("writ bundle set"), "{err}");
    // A Web PKI certificate is no SVID, whatever CA signed it.
    server.set_cert(ca.web());
    let err = fetch(&url, &spiffe_auth(SERVER_ID, vec![ca.cert.clone()]), true)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Tls(..)), "{err}");
    assert_eq!(server.request_lines(), ["GET / HTTP/1.1"]);
}

#[tokio::test]
async fn https_web_checks_the_host_name_and_the_roots() {
    let ca = TestCa::new();
    let server = ScriptedServer::start(ca.web(), fixed(json_ok(b"{\"keys\":[]}"))).await;
    let port = server.addr.port();
    for host in ["127.0.0.1", "localhost"] {
        let url = EndpointUrl::parse(&format!("https://{host}:{port}/b")).unwrap();
        assert_eq!(
            fetch(&url, &web_auth(&ca.cert), true).await.unwrap().body,
            b"{\"keys\":[]}"
        );
    }
    let url = server.url("/b");
    let err = fetch(&url, &web_auth(&ca_cert()), true).await.unwrap_err();
    assert!(
        matches!(&err, FetchError::Tls(_, m) if m.contains("chains to none of the roots")),
        "{err}"
    );
    // A certificate for another name.
    server.set_cert(ca.leaf(vec![SanType::DnsName("other.test".try_into().unwrap())]));
    let err = fetch(&url, &web_auth(&ca.cert), true).await.unwrap_err();
    assert!(
        matches!(&err, FetchError::Tls(_, m) if m.contains("not valid for name")),
        "{err}"
    );
}

#[tokio::test]
async fn temporary_redirects_are_followed_and_permanent_ones_refused() {
    let ca = TestCa::new();
    let server = ScriptedServer::start(ca.web(), fixed(Vec::new())).await;
    let port = server.addr.port();
    let abs_c = format!("https://localhost:{port}/c");
    server.set_script(Arc::new(move |line: &str| {
        let path = line.split(' ').nth(1).unwrap_or_default();
        match path {
            "/a" => response("302 Found", &[("Location", "/b")], b""),
            "/b" => response("307 Temporary Redirect", &[("Location", &abs_c)], b""),
            "/c" => json_ok(b"{\"keys\":[]}"),
            "/301" => response("301 Moved Permanently", &[("Location", "/c")], b""),
            "/308" => response("308 Permanent Redirect", &[("Location", "/c")], b""),
            "/303" => response("303 See Other", &[("Location", "/c")], b""),
            "/loop" => response("302 Found", &[("Location", "/loop")], b""),
            "/plain" => response("302 Found", &[("Location", "http://127.0.0.1/c")], b""),
            "/noloc" => response("302 Found", &[], b""),
            _ => response("404 Not Found", &[], b"no"),
        }
    }));
    let auth = web_auth(&ca.cert);

    assert_eq!(
        fetch(&server.url("/a"), &auth, true).await.unwrap().body,
        b"{\"keys\":[]}"
    );
    assert_eq!(
        server.request_lines(),
        ["GET /a HTTP/1.1", "GET /b HTTP/1.1", "GET /c HTTP/1.1"]
    );

    for (path, status) in [("/301", 301), ("/308", 308)] {
        let err = fetch(&server.url(path), &auth, true).await.unwrap_err();
        assert!(
            matches!(&err, FetchError::PermanentRedirect { status: s, location, .. } if *s == status && location == "/c"),
            "{err}"
        );
    }
    let err = fetch(&server.url("/303"), &auth, true).await.unwrap_err();
    assert!(
        matches!(err, FetchError::Status { status: 303, .. }),
        "{err}"
    );
    let err = fetch(&server.url("/a"), &auth, false).await.unwrap_err();
    assert!(
        matches!(err, FetchError::RedirectsDisabled { status: 302, .. }),
        "{err}"
    );
    let before = server.request_lines().len();
    let err = fetch(&server.url("/loop"), &auth, true).await.unwrap_err();
    assert!(matches!(err, FetchError::TooManyRedirects), "{err}");
    assert_eq!(server.request_lines().len() - before, MAX_REDIRECTS + 1);
    let err = fetch(&server.url("/plain"), &auth, true).await.unwrap_err();
    assert!(
        matches!(err, FetchError::Url(UrlError::NotHttps(_))),
        "{err}"
    );
    let err = fetch(&server.url("/noloc"), &auth, true).await.unwrap_err();
    assert!(matches!(err, FetchError::BadLocation { .. }), "{err}");
    let err = fetch(&server.url("/missing"), &auth, true)
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Status { status: 404, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused() {
    let ca = TestCa::new();
    let at_limit = vec![b' '; MAX_BUNDLE_BYTES];
    let server = ScriptedServer::start(ca.web(), fixed(json_ok(&at_limit))).await;
    let auth = web_auth(&ca.cert);
    assert_eq!(
        fetch(&server.url("/"), &auth, true)
            .await
            .unwrap()
            .body
            .len(),
        MAX_BUNDLE_BYTES
    );

    let over = vec![b' '; MAX_BUNDLE_BYTES + 1];
    server.set_script(fixed(json_ok(&over)));
    let err = fetch(&server.url("/"), &auth, true).await.unwrap_err();
    assert!(matches!(err, FetchError::TooLarge), "{err}");

    // Without a Content-Length the body runs to the connection's end.
    let mut unframed = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
    unframed.extend_from_slice(&over);
    server.set_script(fixed(unframed));
    let err = fetch(&server.url("/"), &auth, true).await.unwrap_err();
    assert!(matches!(err, FetchError::TooLarge), "{err}");
}

/// What a process exit would do: release the store and the audit trail.
fn stop(svc: &crate::service::Services) {
    if let Some(audit) = svc.agent.audit_log() {
        audit.close();
    }
    svc.store.close();
}

/// `services` with its federation fetchers running until the returned
/// sender says stop.
async fn services_fetching(
    dir: &std::path::Path,
    federation: FederationConfig,
) -> (crate::service::Services, tokio::sync::watch::Sender<bool>) {
    let svc = services(dir, federation).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    svc.federation.spawn_fetchers(stop_rx);
    (svc, stop_tx)
}

/// A real agent on a temp dir, as `writ run` builds it.
async fn services(dir: &std::path::Path, federation: FederationConfig) -> crate::service::Services {
    try_services(dir, federation).await.unwrap()
}

/// `services`, or why writ would refuse to start.
async fn try_services(
    dir: &std::path::Path,
    federation: FederationConfig,
) -> Result<crate::service::Services, crate::service::ServiceError> {
    let mut config = Config::builtin_defaults(&Environment::current());
    config.trust_domain = td("a.test");
    config.entries.clear();
    config.data_dir = dir.to_owned();
    config.audit = crate::config::AuditConfig::defaults_for(dir);
    config.federation = federation;
    crate::service::build(&config).await
}

fn x509_entry(cert: &CertificateDer<'_>) -> serde_json::Value {
    serde_json::json!({
        "use": "x509-svid",
        "kty": "EC",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(cert)],
    })
}

fn document(certs: &[&CertificateDer<'_>], sequence: u64) -> Vec<u8> {
    serde_json::json!({
        "keys": certs.iter().map(|c| x509_entry(c)).collect::<Vec<_>>(),
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": 1,
    })
    .to_string()
    .into_bytes()
}

/// A CA certificate whose validity ended on 2001-01-01.
fn expired_ca_cert() -> CertificateDer<'static> {
    ca_valid_between(
        rcgen::date_time_ymd(2000, 1, 1),
        rcgen::date_time_ymd(2001, 1, 1),
    )
}

/// A self-signed CA certificate valid from `from` to `until`.
pub(super) fn ca_valid_between(
    from: time::OffsetDateTime,
    until: time::OffsetDateTime,
) -> CertificateDer<'static> {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = from;
    p.not_after = until;
    let key = KeyPair::generate().unwrap();
    p.self_signed(&key).unwrap().der().clone()
}

/// `document`, with a fresh P-256 jwt-svid key as well.
fn document_with_jwt_key(certs: &[&CertificateDer<'_>], sequence: u64) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let point = &key.public_key_raw()[1..];
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let mut keys: Vec<_> = certs.iter().map(|c| x509_entry(c)).collect();
    keys.push(serde_json::json!({
        "use": "jwt-svid",
        "kty": "EC",
        "crv": "P-256",
        "kid": "jwt-key",
        "x": b64(&point[..32]),
        "y": b64(&point[32..]),
    }));
    serde_json::json!({"keys": keys, "spiffe_sequence": sequence})
        .to_string()
        .into_bytes()
}

fn b_test_config(url: String, bundle: &std::path::Path) -> FederatedTrustDomainConfig {
    FederatedTrustDomainConfig {
        name: td("b.test"),
        url,
        profile: EndpointClientProfile::HttpsSpiffe {
            endpoint_spiffe_id: SERVER_ID.parse::<SpiffeId>().unwrap(),
        },
        bundle: Some(bundle.to_owned()),
        follow_redirects: true,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fetches_keep_the_last_good_bundle_and_authenticate_with_the_latest() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (TestCa::new(), TestCa::new());
    let server = ScriptedServer::start(ca1.svid(SERVER_ID), fixed(Vec::new())).await;
    let bootstrap = dir.path().join("b.pem");
    std::fs::write(&bootstrap, crate::bundle::pem_lf("CERTIFICATE", &ca1.cert)).unwrap();
    let peer = b_test_config(server.url("/").to_string(), &bootstrap);
    let svc = services(
        &dir.path().join("state"),
        FederationConfig {
            trust_domains: vec![peer.clone()],
            ..FederationConfig::default()
        },
    )
    .await;
    let federation = svc.federation.clone();
    let held = || svc.agent.federated_bundles().get(&td("b.test")).unwrap();
    assert_eq!(held().source, BundleSource::Bootstrap);
    assert_eq!(held().bundle.x509_authorities, vec![ca1.cert.clone()]);
    let url = server.url("/");
    let fetch_now = || fetch_once(&federation, &peer, &url, None);

    // A good document (announcing the next CA) is installed.
    server.set_script(fixed(json_ok(&document(&[&ca1.cert, &ca2.cert], 5))));
    assert_eq!(fetch_now().await.unwrap(), Some(Duration::from_secs(1)));
    let good = held();
    assert_eq!(
        (good.source, good.bundle.sequence),
        (BundleSource::Fetched, 5)
    );
    // The same keys in another order (SPIRE lists its keys in a new order
    // on every fetch) change nothing: not stored again, no new revision, so
    // no stream is sent the bundle again and no change is audited.
    server.set_script(fixed(json_ok(&document(&[&ca2.cert, &ca1.cert], 5))));
    assert_eq!(fetch_now().await.unwrap(), Some(Duration::from_secs(1)));
    let reordered = held();
    assert_eq!(
        (reordered.revision, reordered.updated_at),
        (good.revision, good.updated_at)
    );
    assert_eq!(
        good.bundle.x509_authorities,
        vec![ca1.cert.clone(), ca2.cert.clone()]
    );

    // Every bad document is refused and the good bundle stays.
    let leaf_der = ca1.web().cert[0].clone();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", json_ok(b"{\"keys\": [")),
        ("duplicate", json_ok(b"{\"keys\": [], \"keys\": []}")),
        ("non-CA", json_ok(&document(&[&leaf_der], 6))),
        ("oversized", json_ok(&vec![b' '; MAX_BUNDLE_BYTES + 1])),
        ("empty", json_ok(&document(&[], 7))),
        (
            "server error",
            response("500 Internal Server Error", &[], b""),
        ),
    ];
    for (what, answer) in bad {
        server.set_script(fixed(answer));
        let err = fetch_now().await.unwrap_err();
        match what {
            "malformed" => assert!(
                matches!(err, FetchFailure::Rejected(BundleError::Json(_))),
                "{err}"
            ),
            "duplicate" => assert!(err.to_string().contains("duplicate member"), "{err}"),
            "non-CA" => assert!(err.to_string().contains("not a CA"), "{err}"),
            "oversized" => assert!(
                matches!(err, FetchFailure::Fetch(FetchError::TooLarge)),
                "{err}"
            ),
            "empty" => assert!(
                matches!(err, FetchFailure::Unusable(UnusableBundle::NoX509Authority)),
                "{err}"
            ),
            _ => assert!(
                matches!(
                    err,
                    FetchFailure::Fetch(FetchError::Status { status: 500, .. })
                ),
                "{err}"
            ),
        }
        let still = held();
        assert_eq!(still.bundle.sequence, 5, "{what}");
        assert_eq!(still.revision, good.revision, "{what}");
    }

    // The peer rotates: its endpoint now presents an SVID from ca2, which
    // only the fetched bundle (not the bootstrap one) trusts.
    server.set_cert(ca2.svid(SERVER_ID));
    server.set_script(fixed(json_ok(&document(&[&ca2.cert], 8))));
    fetch_now().await.unwrap();
    assert_eq!(held().bundle.x509_authorities, vec![ca2.cert.clone()]);
    // ...and ca1 no longer authenticates it.
    server.set_cert(ca1.svid(SERVER_ID));
    assert!(matches!(
        fetch_now().await.unwrap_err(),
        FetchFailure::Fetch(FetchError::UnknownIssuer(..))
    ));
    assert_eq!(held().bundle.sequence, 8);

    // After a restart the stored bundle is used, not the bootstrap file.
    stop(&svc);
    drop(svc);
    let svc = services(
        &dir.path().join("state"),
        FederationConfig {
            trust_domains: vec![peer],
            ..FederationConfig::default()
        },
    )
    .await;
    let after = svc.agent.federated_bundles().get(&td("b.test")).unwrap();
    assert_eq!(
        (after.source, after.bundle.sequence),
        (BundleSource::Fetched, 8)
    );
    assert_eq!(after.bundle.x509_authorities, vec![ca2.cert.clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn set_and_delete_go_through_the_store_and_refuse_what_they_must() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bootstrap = dir.path().join("b.json");
    let ca_b = ca_cert();
    std::fs::write(&bootstrap, document(&[&ca_b], 3)).unwrap();
    let config = FederationConfig {
        trust_domains: vec![b_test_config("https://127.0.0.1:1/".into(), &bootstrap)],
        ..FederationConfig::default()
    };
    let svc = services(&state, config.clone()).await;
    let federation = &svc.federation;
    let mut changes = svc.agent.subscribe();
    changes.borrow_and_update();

    let c = ca_cert();
    let set = federation
        .set_bundle(
            parse_bundle(
                td("c.test"),
                crate::bundle::pem_lf("CERTIFICATE", &c).as_bytes(),
                None,
            )
            .unwrap(),
            BundleSource::Static,
        )
        .await
        .unwrap();
    assert_eq!(set.source, BundleSource::Static);
    assert!(changes.has_changed().unwrap(), "a change wakes streams");

    // A bundle that would be stored (as a SPIFFE document) past the limit
    // every reader applies is refused, not stored to be unreadable at the
    // next start; what was held stays.
    let mut large = crate::bundle::TrustBundle::new(td("c.test"));
    let mut certs = 0;
    while large.to_spiffe_json().len() <= crate::bundle::MAX_BUNDLE_BYTES {
        large.x509_authorities.extend((0..100).map(|_| ca_cert()));
        certs += 100;
    }
    let refused = federation
        .set_bundle(large, BundleSource::Static)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, FederationError::InvalidBundle(m) if m.contains("the limit is")),
        "{certs} certificates: {refused}"
    );
    let held = svc.agent.federated_bundles().get(&td("c.test")).unwrap();
    assert_eq!(held.bundle.x509_authorities, vec![c.clone()]);

    let own = parse_bundle(td("a.test"), &document(&[&c], 1), None).unwrap();
    assert!(matches!(
        federation.set_bundle(own, BundleSource::Static).await,
        Err(FederationError::OwnTrustDomain(_))
    ));
    assert!(matches!(
        federation.delete_bundle(&td("a.test")).await,
        Err(FederationError::OwnTrustDomain(_))
    ));
    assert!(matches!(
        federation.delete_bundle(&td("b.test")).await,
        Err(FederationError::Configured(_))
    ));
    assert!(matches!(
        federation.delete_bundle(&td("d.test")).await,
        Err(FederationError::NotFound(_))
    ));

    let listed: Vec<(String, Option<BundleSource>, bool)> = federation
        .list()
        .iter()
        .map(|i| {
            (
                i.trust_domain.to_string(),
                i.held.as_ref().map(|h| h.source),
                i.fetch.is_some(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("b.test".into(), Some(BundleSource::Bootstrap), true),
            ("c.test".into(), Some(BundleSource::Static), false),
        ]
    );

    // Both survive a restart; then c.test is deleted, durably.
    stop(&svc);
    drop(svc);
    let svc = services(&state, config.clone()).await;
    let c_held = svc.agent.federated_bundles().get(&td("c.test")).unwrap();
    assert_eq!(
        (c_held.source, &c_held.bundle.x509_authorities),
        (BundleSource::Static, &vec![c.clone()])
    );
    assert_eq!(
        svc.agent
            .federated_bundles()
            .get(&td("b.test"))
            .unwrap()
            .bundle
            .sequence,
        3
    );
    svc.federation.delete_bundle(&td("c.test")).await.unwrap();
    assert!(svc.agent.federated_bundles().get(&td("c.test")).is_none());
    stop(&svc);
    drop(svc);
    let svc = services(&state, config).await;
    assert!(svc.agent.federated_bundles().get(&td("c.test")).is_none());
    stop(&svc);
}

/// A bundle set by hand used to replace a good one even when it trusted
/// nothing, ending the federation with that peer: it obeys the rule a
/// fetched document obeys now, and what was held stays.
#[tokio::test(flavor = "multi_thread")]
async fn bundles_set_by_hand_that_trust_nothing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("b.pem");
    std::fs::write(&bootstrap, crate::bundle::pem_lf("CERTIFICATE", &ca_cert())).unwrap();
    // b.test is fetched from a self-serving https_spiffe endpoint; c.test
    // is not configured.
    let svc = services(
        &dir.path().join("state"),
        FederationConfig {
            trust_domains: vec![b_test_config("https://127.0.0.1:1/".into(), &bootstrap)],
            ..FederationConfig::default()
        },
    )
    .await;
    let federation = &svc.federation;
    let held = |name: &str| svc.agent.federated_bundles().get(&td(name)).unwrap();
    let set = |name: &str, document: Vec<u8>| {
        federation.set_bundle(
            parse_bundle(td(name), &document, None).unwrap(),
            BundleSource::Static,
        )
    };
    set("c.test", document(&[&ca_cert()], 1)).await.unwrap();
    let (b_before, c_before) = (held("b.test"), held("c.test"));

    let expired = expired_ca_cert();
    for name in ["b.test", "c.test"] {
        let err = set(name, document(&[&expired], 2)).await.unwrap_err();
        assert!(
            matches!(
                &err,
                FederationError::Unusable {
                    trust_domain,
                    problem: UnusableBundle::AllExpired { count: 1, .. },
                } if trust_domain == &td(name)
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with(&format!(
                "bundle for {name} refused: its only X.509 authority expired at 2001-01-01T00:00:00Z"
            )),
            "{err}"
        );
    }
    // A JWT key beside the expired root still verifies c.test's JWT-SVIDs,
    // but b.test's endpoint is authenticated with X.509 authorities only.
    let err = set("b.test", document_with_jwt_key(&[&expired], 3))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FederationError::Unusable {
                problem: UnusableBundle::AllExpired {
                    self_serving: true,
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    let err = set("b.test", document_with_jwt_key(&[], 3))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FederationError::Unusable {
                problem: UnusableBundle::NoX509Authority,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(held("b.test").revision, b_before.revision);
    assert_eq!(held("c.test").revision, c_before.revision);
    set("c.test", document_with_jwt_key(&[&expired], 3))
        .await
        .unwrap();
    assert_eq!(held("c.test").bundle.sequence, 3);
    stop(&svc);
}

/// A bootstrap bundle that trusts nothing keeps writ from starting, and a
/// reload from adding its trust domain, naming the file; once a bundle is
/// held the file is not used, so its roots expiring in the normal course
/// stops nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_bootstrap_file_that_trusts_nothing_is_refused_while_it_would_be_used() {
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("b.pem");
    let expired_pem = crate::bundle::pem_lf("CERTIFICATE", &expired_ca_cert());
    std::fs::write(&bootstrap, &expired_pem).unwrap();
    let with_b = FederationConfig {
        trust_domains: vec![b_test_config("https://127.0.0.1:1/".into(), &bootstrap)],
        ..FederationConfig::default()
    };
    let expected = format!(
        "{}: bundle for b.test refused: its only X.509 authority expired at 2001-01-01T00:00:00Z, so the next fetch could not be authenticated",
        bootstrap.display()
    );

    let refused = try_services(&dir.path().join("refused"), with_b.clone())
        .await
        .err()
        .unwrap();
    assert!(refused.to_string().contains(&expected), "{refused}");

    let state = dir.path().join("state");
    let svc = services(&state, FederationConfig::default()).await;
    let err = svc.federation.plan(&with_b).err().unwrap();
    assert_eq!(err.to_string(), expected);
    assert!(!svc.federation.is_configured(&td("b.test")));

    let root = ca_cert();
    std::fs::write(&bootstrap, crate::bundle::pem_lf("CERTIFICATE", &root)).unwrap();
    let plan = svc.federation.plan(&with_b).unwrap();
    svc.federation.apply(plan).await.unwrap();
    stop(&svc);
    drop(svc);

    std::fs::write(&bootstrap, &expired_pem).unwrap();
    let svc = services(&state, with_b).await;
    let held = svc.agent.federated_bundles().get(&td("b.test")).unwrap();
    assert_eq!(
        (held.source, &held.bundle.x509_authorities),
        (BundleSource::Bootstrap, &vec![root])
    );
    stop(&svc);
}

#[test]
fn federates_with_names_a_valid_trust_domain_other_than_writs_own() {
    let own = td("a.test");
    for text in ["b.test", "spiffe://b.test"] {
        assert_eq!(federated_trust_domain(text, Some(&own)), Ok(td("b.test")));
    }
    for text in ["a.test", "spiffe://a.test"] {
        let err = federated_trust_domain(text, Some(&own)).unwrap_err();
        assert_eq!(err, FederatesWithError::OwnTrustDomain(own.clone()));
        assert_eq!(
            err.to_string(),
            "names writ's own trust domain a.test; federation is only with other trust domains"
        );
    }
    // Without a valid trust domain of its own, writ can only check the form.
    assert_eq!(federated_trust_domain("a.test", None), Ok(own));
    let err = federated_trust_domain("A.test", None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("\"A.test\": trust domain contains 'A'"),
        "{err}"
    );
}

#[test]
fn operator_bundles_are_parsed_strictly() {
    let c = ca_cert();
    let pem = crate::bundle::pem_lf("CERTIFICATE", &c);
    // Format detection: '{' means SPIFFE JSON.
    assert_eq!(
        parse_bundle(td("c.test"), pem.as_bytes(), None)
            .unwrap()
            .x509_authorities,
        vec![c.clone()]
    );
    assert_eq!(
        parse_bundle(td("c.test"), &document(&[&c], 4), None)
            .unwrap()
            .sequence,
        4
    );
    // An explicit format is not second-guessed.
    assert!(parse_bundle(td("c.test"), pem.as_bytes(), Some(BundleFormat::Spiffe)).is_err());
    assert!(parse_bundle(td("c.test"), &document(&[&c], 4), Some(BundleFormat::Pem)).is_err());
    let empty = parse_bundle(td("c.test"), b"{\"keys\": []}", None).unwrap_err();
    assert!(
        empty
            .to_string()
            .contains("no x509-svid or jwt-svid authority"),
        "{empty}"
    );
    let binary = parse_bundle(td("c.test"), &[0xff, 0xfe], Some(BundleFormat::Pem)).unwrap_err();
    assert!(binary.to_string().contains("UTF-8"), "{binary}");
}

/// Polls `f` every 20 ms until it is true, for at most 30 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reconfiguring_starts_restarts_and_stops_fetchers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let server = ScriptedServer::start(
        ca.svid(SERVER_ID),
        fixed(json_ok(&document(&[&ca.cert], 4))),
    )
    .await;
    let bootstrap = dir.path().join("b.pem");
    std::fs::write(&bootstrap, crate::bundle::pem_lf("CERTIFICATE", &ca.cert)).unwrap();
    let floor = Duration::from_secs(1);
    let empty = FederationConfig {
        min_refresh_interval: floor,
        ..FederationConfig::default()
    };
    let (svc, stop_tx) = services_fetching(&dir.path().join("state"), empty.clone()).await;
    let federation = svc.federation.clone();

    // A plan with a broken file is refused and changes nothing.
    let broken = FederationConfig {
        trust_domains: vec![b_test_config(
            server.url("/").to_string(),
            &dir.path().join("missing.pem"),
        )],
        ..empty.clone()
    };
    let err = federation.plan(&broken).err().unwrap();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    assert!(!federation.is_configured(&td("b.test")));

    // Added: bootstrapped at once, then fetched.
    let peer = b_test_config(server.url("/").to_string(), &bootstrap);
    let with_b = FederationConfig {
        trust_domains: vec![peer.clone()],
        ..empty.clone()
    };
    let plan = federation.plan(&with_b).unwrap();
    assert_eq!(
        plan.changes,
        FederationChanges {
            added: vec![td("b.test")],
            ..FederationChanges::default()
        }
    );
    assert!(
        svc.agent.federated_bundles().get(&td("b.test")).is_none(),
        "planning applies nothing"
    );
    federation.apply(plan).await.unwrap();
    assert!(federation.is_configured(&td("b.test")));
    assert!(svc.agent.federated_bundles().get(&td("b.test")).is_some());
    eventually("the added trust domain fetched", || {
        svc.agent
            .federated_bundles()
            .get(&td("b.test"))
            .is_some_and(|b| b.source == BundleSource::Fetched && b.bundle.sequence == 4)
    })
    .await;

    // Updated: the fetcher restarts on the new URL.
    let mut moved = with_b.clone();
    moved.trust_domains[0].url = server.url("/moved").to_string();
    let plan = federation.plan(&moved).unwrap();
    assert_eq!(plan.changes.updated, vec![td("b.test")]);
    federation.apply(plan).await.unwrap();
    assert_eq!(
        federation.fetch_status(&td("b.test")).unwrap().url,
        server.url("/moved").to_string()
    );
    eventually("a fetch from the new URL", || {
        server
            .request_lines()
            .iter()
            .any(|l| l.starts_with("GET /moved "))
    })
    .await;
    // The same config again changes nothing.
    assert!(federation.plan(&moved).unwrap().changes.is_empty());

    // Removed: no longer fetched; the bundle stays, and can now be deleted.
    let plan = federation.plan(&empty).unwrap();
    assert_eq!(plan.changes.removed, vec![td("b.test")]);
    federation.apply(plan).await.unwrap();
    // Served only from now on: the fetcher has ended, so no fetch can
    // install it.
    server.set_script(fixed(json_ok(&document(&[&ca.cert], 9))));
    assert!(!federation.is_configured(&td("b.test")));
    assert!(federation.fetch_status(&td("b.test")).is_none());
    let kept = svc.agent.federated_bundles().get(&td("b.test")).unwrap();
    assert_eq!(kept.source, BundleSource::Fetched);
    let requests = server.request_lines().len();
    // At a 1 s refresh a live fetcher would ask three more times; a request
    // sent just before the fetcher stopped may still be counted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        server.request_lines().len() <= requests + 1,
        "the removed trust domain is still fetched: {:?}",
        server.request_lines()
    );
    assert_ne!(
        svc.agent
            .federated_bundles()
            .get(&td("b.test"))
            .unwrap()
            .bundle
            .sequence,
        9,
        "a document served after removal was installed"
    );
    federation.delete_bundle(&td("b.test")).await.unwrap();

    let _ = stop_tx.send(true);
    for task in federation.take_fetcher_tasks() {
        task.await.unwrap();
    }
    stop(&svc);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_ca_bundle_reaches_the_fetcher_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (web_ca, other_ca, bundle_ca) = (TestCa::new(), TestCa::new(), TestCa::new());
    let server = ScriptedServer::start(
        web_ca.web(),
        fixed(json_ok(&document(&[&bundle_ca.cert], 3))),
    )
    .await;
    // The CA file first names a CA that did not issue the server's certificate.
    let ca_file = dir.path().join("web-ca.pem");
    std::fs::write(
        &ca_file,
        crate::bundle::pem_lf("CERTIFICATE", &other_ca.cert),
    )
    .unwrap();
    let config = FederationConfig {
        min_refresh_interval: Duration::from_secs(1),
        trust_domains: vec![FederatedTrustDomainConfig {
            name: td("b.test"),
            url: server.url("/").to_string(),
            profile: EndpointClientProfile::HttpsWeb {
                ca_bundle: Some(ca_file.clone()),
            },
            bundle: None,
            follow_redirects: true,
        }],
        ..FederationConfig::default()
    };
    let (svc, stop_tx) = services_fetching(&dir.path().join("state"), config.clone()).await;
    let federation = svc.federation.clone();
    eventually("a fetch refused by the configured roots", || {
        federation
            .fetch_status(&td("b.test"))
            .is_some_and(|s| s.last_error.is_some())
    })
    .await;
    assert!(svc.agent.federated_bundles().get(&td("b.test")).is_none());

    // The same file, unchanged: nothing to do.
    assert!(federation.plan(&config).unwrap().changes.is_empty());

    // The file replaced under the same path: the trust domain counts as
    // updated, and its restarted fetcher trusts the new roots.
    std::fs::write(&ca_file, crate::bundle::pem_lf("CERTIFICATE", &web_ca.cert)).unwrap();
    let plan = federation.plan(&config).unwrap();
    assert_eq!(plan.changes.updated, vec![td("b.test")]);
    assert!(plan.changes.added.is_empty() && plan.changes.removed.is_empty());
    federation.apply(plan).await.unwrap();
    eventually("the bundle fetched with the new roots", || {
        svc.agent
            .federated_bundles()
            .get(&td("b.test"))
            .is_some_and(|b| b.bundle.sequence == 3)
    })
    .await;
    assert!(federation.plan(&config).unwrap().changes.is_empty());
    stop_tx.send_replace(true);
}

/// A bootstrap bundle or an https_web CA file decides whom writ trusts, so
/// one that others could have written is refused, naming the file and what
/// to change; and writ's own or root's, not group/other-writable, is read.
#[test]
fn trust_files_others_could_write_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.json");
    std::fs::write(&file, document(&[&ca_cert()], 3)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    read_bundle_file(&file, &td("b.test")).unwrap();

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
    let err = read_bundle_file(&file, &td("b.test"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&file.display().to_string()) && err.contains("mode 0664"),
        "{err}"
    );

    if nix::unistd::geteuid().is_root() {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
        let err = read_bundle_file(&file, &td("b.test"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
    }
}
