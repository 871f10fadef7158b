//! SPIFFE federation end to end: real `writ` processes in different trust
//! domains on temp dirs, each serving a bundle endpoint on 127.0.0.1 and
//! fetching the other's over https_spiffe; real Workload API clients; real
//! mutual TLS across the trust domains; a scripted peer serving bad bundle
//! documents; and the `writ bundle` commands.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::{WRIT, Writ, wait_for};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use writ::bundle::TrustBundle;
use writ::proto::workload as pb;
use writ::spiffe_id::{SpiffeId, TrustDomain};
use writ::tls::{SpiffeTls, TrustStore};

const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn admin_socket(w: &Writ) -> PathBuf {
    w.dir.path().join("run/admin.sock")
}

/// Runs `writ <args> --admin-socket <w's>` with `stdin`; (ok, stdout, stderr).
fn cli_with_input(w: &Writ, args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    let mut child = Command::new(WRIT)
        .args(args)
        .arg("--admin-socket")
        .arg(admin_socket(w))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli(w: &Writ, args: &[&str]) -> (bool, String, String) {
    cli_with_input(w, args, b"")
}

#[track_caller]
fn cli_ok(w: &Writ, args: &[&str]) -> String {
    let (ok, out, err) = cli(w, args);
    assert!(ok, "writ {args:?} failed: {err}\n{}", w.log());
    out
}

fn bundle_list(w: &Writ) -> Vec<Value> {
    serde_json::from_str(&cli_ok(w, &["bundle", "list", "--output", "json"])).unwrap()
}

fn listed(w: &Writ, td: &str) -> Option<Value> {
    bundle_list(w).into_iter().find(|b| b["trust_domain"] == td)
}

/// DER of every certificate in PEM text, in order.
fn pem_ders(text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(text)
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect()
}

fn split_der(concat: &[u8]) -> Vec<Vec<u8>> {
    writ::cli::api::split_der_certs(concat).unwrap()
}

/// Appends `body` to `w`'s config and restarts it on the same data.
fn reconfigure(w: &mut Writ, body: &str) {
    w.stop();
    let mut config = std::fs::read_to_string(&w.config_path).unwrap();
    config.push_str(body);
    std::fs::write(&w.config_path, config).unwrap();
    w.spawn();
}

fn test_exe() -> String {
    std::env::current_exe().unwrap().display().to_string()
}

async fn first_x509(w: &Writ) -> pb::X509svidResponse {
    let mut client = writ::cli::client::workload_client(&w.socket).await.unwrap();
    let mut stream = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap()
}

async fn first_bundles(w: &Writ) -> pb::X509BundlesResponse {
    let mut client = writ::cli::client::workload_client(&w.socket).await.unwrap();
    let mut stream = client
        .fetch_x509_bundles(pb::X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap()
}

fn keys<V>(map: &HashMap<String, V>) -> BTreeSet<String> {
    map.keys().cloned().collect()
}

fn set_of(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// The `[federation]` tables for a writ that serves its endpoint on
/// `port` and fetches `peer` (trust domain, port) over https_spiffe.
fn federation_config(port: u16, peer: (&str, u16), bootstrap: &Path) -> String {
    let (peer_td, peer_port) = peer;
    format!(
        r#"
[federation]
min_refresh_interval = "1s"

[federation.bundle_endpoint]
listen = "127.0.0.1:{port}"
refresh_hint = "1s"

[[federation.trust_domain]]
name = "{peer_td}"
url = "https://127.0.0.1:{peer_port}/"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://{peer_td}/writ/bundle-endpoint"
bundle = "{bootstrap}"
"#,
        bootstrap = bootstrap.display()
    )
}

/// Saves `from`'s own bundle, as `writ bundle show --format spiffe` prints
/// it, into `to`'s directory.
fn export_bundle(from: &Writ, to: &Writ, name: &str) -> PathBuf {
    let doc = cli_ok(from, &["bundle", "show", "--format", "spiffe"]);
    let path = to.dir.path().join(name);
    std::fs::write(&path, doc).unwrap();
    path
}

fn tls_for(svid: &pb::X509svid, bundles: &[(&str, &[u8])]) -> Arc<SpiffeTls> {
    let tls = SpiffeTls::new();
    let chain = split_der(&svid.x509_svid)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    tls.set_identity(chain, &svid.x509_svid_key).unwrap();
    let mut trust = TrustStore::default();
    for (td, der) in bundles {
        trust.bundles.insert(
            TrustDomain::new(td).unwrap(),
            split_der(der)
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
        );
    }
    tls.set_trust(trust);
    tls
}

async fn next(stream: &mut tonic::Streaming<pb::X509svidResponse>) -> pb::X509svidResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("stream update")
        .unwrap()
        .unwrap()
}

/// One mutual TLS exchange on loopback; Ok(what the server saw as its peer).
async fn mtls(
    server: Arc<SpiffeTls>,
    client: Arc<SpiffeTls>,
    client_id: &str,
    server_id: &str,
) -> Result<String, String> {
    let (cid, sid) = (client_id.to_owned(), server_id.to_owned());
    let server_config = server
        .server_config(Arc::new(move |id: &SpiffeId| id.to_string() == cid))
        .unwrap();
    let client_config = client
        .client_config(Arc::new(move |id: &SpiffeId| id.to_string() == sid))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_config))
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let peer_id = writ::tls::spiffe_id_of(&peer).unwrap().to_string();
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer_id)
    });
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let connected = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    let mut tls = match connected {
        Ok(tls) => tls,
        Err(e) => {
            served.abort();
            return Err(e.to_string());
        }
    };
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
    assert_eq!(got, b"pong");
    served.await.unwrap()
}

/// A raw HTTPS request to a writ bundle endpoint, authenticated as the
/// SVID `endpoint_id` against `authorities`; returns (status, headers, body).
async fn raw_https(
    port: u16,
    endpoint_id: &str,
    authorities: &[Vec<u8>],
    request: &[u8],
) -> Result<(u16, HashMap<String, String>, Vec<u8>), String> {
    let tls = SpiffeTls::new();
    let id: SpiffeId = endpoint_id.parse().unwrap();
    let mut trust = TrustStore::default();
    trust.bundles.insert(
        id.trust_domain().clone(),
        authorities
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect(),
    );
    tls.set_trust(trust);
    let config = tls
        .client_config(Arc::new(move |peer: &SpiffeId| *peer == id))
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    // The server may close without close_notify after an error response.
    let _ = stream.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no response head in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("no status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, raw[split + 4..].to_vec()))
}

/// Runs this test binary under another path (a hard link, so `unix:path`
/// differs) as the helper role "fetch" against `socket`; returns its JSON.
fn fetch_as_other_binary(socket: &Path) -> Value {
    let link = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("federation-plain-workload-{}", std::process::id()));
    let _ = std::fs::remove_file(&link);
    if std::fs::hard_link(std::env::current_exe().unwrap(), &link).is_err() {
        common::copy_executable(&std::env::current_exe().unwrap(), &link);
    }
    let out = Command::new(&link)
        .args([
            "--ignored",
            "--exact",
            "helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WRIT_TEST_HELPER", "fetch")
        .env("WRIT_TEST_SOCKET", socket)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&link);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| {
            panic!(
                "helper printed no result: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

/// Helper process entry point (see `fetch_as_other_binary`).
#[test]
#[ignore = "helper process entry point, run by other tests"]
fn helper() {
    let Ok(role) = std::env::var("WRIT_TEST_HELPER") else {
        return;
    };
    assert_eq!(role, "fetch");
    let socket = PathBuf::from(std::env::var("WRIT_TEST_SOCKET").unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let mut client = writ::cli::client::workload_client(&socket).await.unwrap();
        let svid = client
            .fetch_x509svid(pb::X509svidRequest {})
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        let bundles = client
            .fetch_x509_bundles(pb::X509BundlesRequest {})
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        serde_json::json!({
            "svids": svid.svids.iter().map(|s| s.spiffe_id.clone()).collect::<Vec<_>>(),
            "federated": keys(&svid.federated_bundles),
            "bundles": keys(&bundles.bundles),
        })
    });
    println!("RESULT {result}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_writs_federate_and_their_workloads_complete_mutual_tls() {
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = Writ::start_in("a.test", "");
    let mut b = Writ::start_in("b.test", "");
    let b_bootstrap = export_bundle(&b, &a, "b.test.json");
    let a_bootstrap = export_bundle(&a, &b, "a.test.json");
    let me = test_exe();
    reconfigure(
        &mut a,
        &format!(
            r#"{}
[[entry]]
spiffe_id = "spiffe://a.test/fed"
selectors = ["unix:path:{me}"]
federates_with = ["b.test", "c.test"]

[[entry]]
spiffe_id = "spiffe://a.test/plain"
selectors = ["unix:path:{plain}"]
"#,
            federation_config(port_a, ("b.test", port_b), &b_bootstrap),
            plain = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("federation-plain-workload-{}", std::process::id()))
                .display(),
        ),
    );
    reconfigure(
        &mut b,
        &format!(
            r#"{}
[[entry]]
spiffe_id = "spiffe://b.test/server"
selectors = ["unix:path:{me}"]
federates_with = ["a.test"]
"#,
            federation_config(port_b, ("a.test", port_a), &a_bootstrap)
        ),
    );

    // Each fetches the other's endpoint (each was restarted after the
    // export, so the fetched document has a newer sequence).
    for (w, peer) in [(&a, "b.test"), (&b, "a.test")] {
        wait_for(WAIT, &format!("{peer} fetched"), || {
            listed(w, peer).filter(|l| l["source"] == "fetched")
        });
    }
    let a_own_pem = cli_ok(&a, &["bundle", "show"]);
    let b_own_pem = cli_ok(&b, &["bundle", "show"]);
    let b_held = cli_ok(&a, &["bundle", "show", "--trust-domain", "b.test"]);
    assert_eq!(pem_ders(&b_held), pem_ders(&b_own_pem));

    // A workload whose entry federates with b.test receives its bundle...
    let from_a = first_x509(&a).await;
    assert_eq!(from_a.svids[0].spiffe_id, "spiffe://a.test/fed");
    assert_eq!(
        keys(&from_a.federated_bundles),
        set_of(&["spiffe://b.test"])
    );
    assert_eq!(
        split_der(&from_a.federated_bundles["spiffe://b.test"]),
        pem_ders(&b_own_pem)
    );
    let bundles_a = first_bundles(&a).await;
    assert_eq!(
        keys(&bundles_a.bundles),
        set_of(&["spiffe://a.test", "spiffe://b.test"])
    );
    // ...and so does the `spiffe` crate's X509Source, from the same stream.
    let source = spiffe::X509Source::builder()
        .endpoint(a.endpoint())
        .build()
        .await
        .unwrap();
    let via_crate = spiffe::BundleSource::bundle_for_trust_domain(
        &source,
        &spiffe::TrustDomain::new("b.test").unwrap(),
    )
    .unwrap()
    .expect("b.test bundle in the X509Source");
    let crate_ders: Vec<Vec<u8>> = via_crate
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    assert_eq!(crate_ders, pem_ders(&b_own_pem));
    source.shutdown().await;

    // A workload whose entry lists no federation gets its own bundle only.
    let plain = fetch_as_other_binary(&a.socket);
    assert_eq!(plain["svids"], serde_json::json!(["spiffe://a.test/plain"]));
    assert_eq!(plain["federated"], serde_json::json!([]));
    assert_eq!(plain["bundles"], serde_json::json!(["spiffe://a.test"]));

    // Mutual TLS across the trust domains, each side trusting the other's
    // bundle only through what writ delivered.
    let from_b = first_x509(&b).await;
    assert_eq!(from_b.svids[0].spiffe_id, "spiffe://b.test/server");
    assert_eq!(
        keys(&from_b.federated_bundles),
        set_of(&["spiffe://a.test"])
    );
    let a_side = &from_a.svids[0];
    let b_side = &from_b.svids[0];
    let server = tls_for(
        b_side,
        &[
            ("b.test", &b_side.bundle),
            ("a.test", &from_b.federated_bundles["spiffe://a.test"]),
        ],
    );
    let client = tls_for(
        a_side,
        &[
            ("a.test", &a_side.bundle),
            ("b.test", &from_a.federated_bundles["spiffe://b.test"]),
        ],
    );
    let seen = mtls(
        server.clone(),
        client,
        "spiffe://a.test/fed",
        "spiffe://b.test/server",
    )
    .await
    .unwrap();
    assert_eq!(seen, "spiffe://a.test/fed");
    // Without the federated bundle the client cannot authenticate B.
    let lonely = tls_for(a_side, &[("a.test", &a_side.bundle)]);
    let err = mtls(
        server,
        lonely,
        "spiffe://a.test/fed",
        "spiffe://b.test/server",
    )
    .await
    .unwrap_err();
    assert!(err.contains("no bundle for trust domain b.test"), "{err}");

    // A bundle set by hand reaches an open stream at once, and so does
    // its deletion.
    let mut client = writ::cli::client::workload_client(&a.socket).await.unwrap();
    let mut stream = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(keys(&first.federated_bundles), set_of(&["spiffe://b.test"]));
    let c_ca = test_ca_cert();
    let c_pem = writ_pem(&c_ca);
    let c_file = a.dir.path().join("c.pem");
    std::fs::write(&c_file, &c_pem).unwrap();
    cli_ok(
        &a,
        &[
            "bundle",
            "set",
            "--trust-domain",
            "c.test",
            "--file",
            c_file.to_str().unwrap(),
        ],
    );
    let update = loop {
        let m = next(&mut stream).await;
        if m.federated_bundles.contains_key("spiffe://c.test") {
            break m;
        }
    };
    assert_eq!(update.federated_bundles["spiffe://c.test"], c_ca.to_vec());
    cli_ok(&a, &["bundle", "delete", "--trust-domain", "c.test"]);
    loop {
        let m = next(&mut stream).await;
        if !m.federated_bundles.contains_key("spiffe://c.test") {
            assert!(m.federated_bundles.contains_key("spiffe://b.test"));
            break;
        }
    }
    drop(stream);

    // The endpoint itself: GET / only, JSON, authenticated as A's endpoint SVID.
    let endpoint_id = "spiffe://a.test/writ/bundle-endpoint";
    let a_roots = pem_ders(&a_own_pem);
    let get = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let (status, headers, body) = raw_https(port_a, endpoint_id, &a_roots, get).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    let served = TrustBundle::from_spiffe_json(TrustDomain::new("a.test").unwrap(), &body).unwrap();
    let served_ders: Vec<Vec<u8>> = served.x509_authorities.iter().map(|c| c.to_vec()).collect();
    assert_eq!(served_ders, a_roots);
    assert_eq!(served.refresh_hint, Some(Duration::from_secs(1)));
    let post = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n";
    let (status, headers, _) = raw_https(port_a, endpoint_id, &a_roots, post)
        .await
        .unwrap();
    assert_eq!((status, headers["allow"].as_str()), (405, "GET"));
    let other = b"GET /bundle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let (status, _, _) = raw_https(port_a, endpoint_id, &a_roots, other)
        .await
        .unwrap();
    assert_eq!(status, 404);
    let mut huge = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    match raw_https(port_a, endpoint_id, &a_roots, &huge).await {
        Ok((status, _, _)) => assert_eq!(status, 431, "an oversized head must not be served"),
        // The server may close before it has read (and we have written)
        // the whole oversized head: a reset or broken pipe is a refusal too.
        Err(e) => assert!(
            ["no response head", "Broken pipe", "reset", "close_notify"]
                .iter()
                .any(|m| e.contains(m)),
            "{e}"
        ),
    }
    // Another SPIFFE ID than the endpoint's is refused by the client check.
    let wrong = raw_https(port_a, "spiffe://a.test/other", &a_roots, get).await;
    assert!(wrong.unwrap_err().contains("not authorized"));

    // spiffe_sequence only grows, across restarts too.
    a.stop();
    a.spawn();
    let (_, _, body) = raw_https(port_a, endpoint_id, &a_roots, get).await.unwrap();
    let after = TrustBundle::from_spiffe_json(TrustDomain::new("a.test").unwrap(), &body).unwrap();
    assert!(
        after.sequence > served.sequence,
        "{} then {}",
        served.sequence,
        after.sequence
    );
    // The fetched bundle of b.test survived the restart.
    assert!(
        listed(&a, "b.test")
            .is_some_and(|l| l["source"] != "bootstrap" && l["source"] != "pending")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_rotation_reaches_the_peer_through_the_endpoint() {
    let port_b = free_port();
    // B's CA lives 20 s: a next root is published after ~10 s and signs
    // from ~16 s on, over and over, with no one touching A.
    let b = Writ::start_in(
        "b.test",
        &format!(
            r#"
[ca]
ca_ttl = "20s"
x509_svid_ttl = "4s"
jwt_svid_ttl = "4s"

[tasks]
x509_svid_ttl = "4s"

[federation.bundle_endpoint]
listen = "127.0.0.1:{port_b}"
refresh_hint = "1s"
"#
        ),
    );
    let me = test_exe();
    let mut a = Writ::start_in("a.test", "");
    let bootstrap = export_bundle(&b, &a, "b.test.json");
    reconfigure(
        &mut a,
        &format!(
            r#"
[federation]
min_refresh_interval = "1s"

[[federation.trust_domain]]
name = "b.test"
url = "https://127.0.0.1:{port_b}/"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://b.test/writ/bundle-endpoint"
bundle = "{}"

[[entry]]
spiffe_id = "spiffe://a.test/fed"
selectors = ["unix:path:{me}"]
federates_with = ["b.test"]
"#,
            bootstrap.display()
        ),
    );

    let mut client = writ::cli::client::workload_client(&a.socket).await.unwrap();
    let mut stream = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let initial: BTreeSet<Vec<u8>> = split_der(&first.federated_bundles["spiffe://b.test"])
        .into_iter()
        .collect();
    assert!(!initial.is_empty());
    // Wait for a root A has never seen to arrive on the open stream.
    let fresh = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let m = stream.message().await.unwrap().unwrap();
            let Some(der) = m.federated_bundles.get("spiffe://b.test") else {
                continue;
            };
            if let Some(new) = split_der(der).into_iter().find(|c| !initial.contains(c)) {
                return new;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("B's new root never reached A:\n{}\n{}", a.log(), b.log()));
    // It is one of B's own roots: a CA for spiffe://b.test, in B's bundle.
    let (_, cert) = x509_parser::parse_x509_certificate(&fresh).unwrap();
    assert!(cert.is_ca());
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.value.general_names.iter().any(|n| matches!(
        n,
        x509_parser::extensions::GeneralName::URI("spiffe://b.test")
    )));
    assert!(pem_ders(&cli_ok(&b, &["bundle", "show"])).contains(&fresh));
    assert_eq!(listed(&a, "b.test").unwrap()["source"], "fetched");
}

/// writ is down across the half-life of its root and comes back after 5/6:
/// the root it prepares then must reach peers before it signs the bundle
/// endpoint's certificate, or a peer that holds only the old root can
/// never fetch again. Also across a kill -9 and restart within that lead.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_prepared_after_an_outage_is_served_before_it_signs_the_endpoint() {
    let port = free_port();
    let endpoint_id = "spiffe://b.test/writ/bundle-endpoint";
    let get = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut b = Writ::start_in(
        "b.test",
        &format!(
            r#"
[ca]
ca_ttl = "60s"
x509_svid_ttl = "1s"
jwt_svid_ttl = "1s"

[tasks]
x509_svid_ttl = "1s"

[federation.bundle_endpoint]
listen = "127.0.0.1:{port}"
refresh_hint = "1s"
"#
        ),
    );
    // A peer bootstrapped with root A alone.
    let root_a = pem_ders(&cli_ok(&b, &["bundle", "show"]));
    assert_eq!(root_a.len(), 1);
    let (status, _, _) = raw_https(port, endpoint_id, &root_a, get).await.unwrap();
    assert_eq!(status, 200);
    b.kill9();

    // A lives 70 s (backdated 10 s): half-life 35 s before its end, 5/6
    // about 11.7 s before. Come back 10 s before its end.
    let (_, cert) = x509_parser::parse_x509_certificate(&root_a[0]).unwrap();
    let a_end =
        std::time::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp() as u64);
    let until = |t: std::time::SystemTime| {
        t.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    };
    tokio::time::sleep(until(a_end - Duration::from_secs(10))).await;
    b.spawn();
    // Root B is published, and root A still signs the endpoint's
    // certificate: the peer holding A alone fetches and learns B. (A would
    // switch at once at 5/6 without the lead: 9 s here.)
    let (status, _, body) = raw_https(port, endpoint_id, &root_a, get)
        .await
        .unwrap_or_else(|e| panic!("the peer was locked out: {e}\n{}", b.log()));
    assert_eq!(status, 200);
    let fetched =
        TrustBundle::from_spiffe_json(TrustDomain::new("b.test").unwrap(), &body).unwrap();
    let learned: Vec<Vec<u8>> = fetched
        .x509_authorities
        .iter()
        .map(|c| c.to_vec())
        .collect();
    assert_eq!(learned.len(), 2, "A and its successor");
    assert_eq!(learned[0], root_a[0]);

    // A crash in the middle of the lead changes nothing.
    b.kill9();
    b.spawn();
    let (status, _, _) = raw_https(port, endpoint_id, &root_a, get)
        .await
        .unwrap_or_else(|e| panic!("the peer was locked out after a restart: {e}\n{}", b.log()));
    assert_eq!(status, 200);
    assert_eq!(pem_ders(&cli_ok(&b, &["bundle", "show"])), learned);

    // B takes over before A ends; the peer that fetched during the lead
    // keeps fetching through the switch and after A is gone.
    let deadline = a_end + Duration::from_secs(15);
    loop {
        let (status, _, _) = raw_https(port, endpoint_id, &learned, get)
            .await
            .unwrap_or_else(|e| panic!("the peer that learned B was refused: {e}\n{}", b.log()));
        assert_eq!(status, 200);
        if raw_https(port, endpoint_id, &root_a, get).await.is_err()
            && std::time::SystemTime::now() > a_end
        {
            break;
        }
        assert!(
            std::time::SystemTime::now() < deadline,
            "the endpoint never switched to B:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A leaves the bundle once it has expired.
    wait_for(Duration::from_secs(10), "root A to be dropped", || {
        (pem_ders(&cli_ok(&b, &["bundle", "show"])) == learned[1..]).then_some(())
    });
}

/// A test CA for a trust domain of our own making, and a scripted bundle
/// endpoint for it: the test decides which document it serves.
struct ScriptedPeer {
    port: u16,
    document: Arc<Mutex<Vec<u8>>>,
    served: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn test_ca() -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap().der().clone();
    (cert, Issuer::new(p, key))
}

fn test_ca_cert() -> CertificateDer<'static> {
    test_ca().0
}

fn writ_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

impl ScriptedPeer {
    async fn start(issuer: &Issuer<'static, KeyPair>, spiffe_id: &str) -> Self {
        Self::start_with(issuer, vec![SanType::URI(spiffe_id.try_into().unwrap())]).await
    }

    /// A Web PKI peer: its certificate names 127.0.0.1, for https_web.
    async fn start_web(issuer: &Issuer<'static, KeyPair>) -> Self {
        Self::start_with(
            issuer,
            vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
        )
        .await
    }

    async fn start_with(issuer: &Issuer<'static, KeyPair>, sans: Vec<SanType>) -> Self {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, issuer).unwrap().der().clone();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let document = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(0));
        let (doc, count) = (document.clone(), served.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let (doc, count) = (doc.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = doc.lock().unwrap().clone();
                    let mut answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    answer.extend_from_slice(&body);
                    let _ = tls.write_all(&answer).await;
                    let _ = tls.shutdown().await;
                    *count.lock().unwrap() += 1;
                });
            }
        });
        Self {
            port,
            document,
            served,
            task,
        }
    }

    fn serve(&self, document: Vec<u8>) {
        *self.document.lock().unwrap() = document;
    }

    fn served(&self) -> u64 {
        *self.served.lock().unwrap()
    }
}

/// Has `peer` serve `document` until `writ` has fetched it at least twice
/// and refused it with an error containing `expected`; returns the
/// listing of `trust_domain` then.
fn serve_until_refused(
    peer: &ScriptedPeer,
    document: Vec<u8>,
    writ: &Writ,
    trust_domain: &str,
    what: &str,
    expected: &str,
) -> Value {
    let before = peer.served();
    peer.serve(document);
    wait_for(WAIT, what, || {
        listed(writ, trust_domain).filter(|l| {
            peer.served() >= before + 2
                && l["fetch"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(expected))
        })
    })
}

fn bundle_document(certs: &[&[u8]], sequence: u64) -> Vec<u8> {
    let keys: Vec<Value> = certs
        .iter()
        .map(|c| {
            serde_json::json!({
                "use": "x509-svid",
                "kty": "EC",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(c)],
            })
        })
        .collect();
    serde_json::json!({"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": 1})
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_documents_from_a_peer_are_rejected_and_the_last_good_bundle_kept() {
    let (ca, issuer) = test_ca();
    let spare = test_ca_cert();
    let peer = ScriptedPeer::start(&issuer, C_TEST_PEER_ID).await;
    peer.serve(bundle_document(&[&ca, &spare], 1));
    let mut a = Writ::start_in("a.test", "");
    let bootstrap = a.dir.path().join("c.pem");
    std::fs::write(&bootstrap, writ_pem(&ca)).unwrap();
    reconfigure(
        &mut a,
        &format!("\n{}", c_test_federation(peer.port, &bootstrap)),
    );
    let good = wait_for(WAIT, "the good document", || {
        listed(&a, "c.test").filter(|l| l["source"] == "fetched" && l["sequence"] == 1)
    });
    assert_eq!(good["x509_authorities"], 2);

    // A leaf certificate where a CA belongs.
    let leaf = {
        let mut p = CertificateParams::new(vec!["leaf.test".to_owned()]).unwrap();
        p.is_ca = IsCa::NoCa;
        p.signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap()
            .der()
            .to_vec()
    };
    let mut oversized = bundle_document(&[&ca], 9);
    oversized.truncate(oversized.len() - 1);
    oversized.extend_from_slice(b", \"pad\": \"");
    oversized.extend(std::iter::repeat_n(b'x', writ::bundle::MAX_BUNDLE_BYTES));
    oversized.extend_from_slice(b"\"}");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed JSON", b"{\"keys\": [".to_vec(), "not valid JSON"),
        (
            "duplicate member",
            br#"{"keys": [], "keys": []}"#.to_vec(),
            "duplicate member",
        ),
        (
            "non-CA certificate",
            bundle_document(&[&leaf], 3),
            "not a CA",
        ),
        ("oversized body", oversized, "larger than"),
        // A sound CA, but not the one the endpoint's SVID chains to: the
        // next fetch, authenticated with it, would fail for good.
        (
            "a bundle without the endpoint's root",
            bundle_document(&[&spare], 4),
            "does not authenticate the certificate the endpoint",
        ),
    ];
    for (what, document, expected) in cases {
        let rejected = serve_until_refused(&peer, document, &a, "c.test", what, expected);
        assert_eq!(rejected["sequence"], 1, "{what}: the good bundle must stay");
        assert_eq!(rejected["x509_authorities"], 2, "{what}");
        assert_eq!(rejected["source"], "fetched", "{what}");
    }
    let held = cli_ok(&a, &["bundle", "show", "--trust-domain", "c.test"]);
    assert_eq!(pem_ders(&held), vec![ca.to_vec(), spare.to_vec()]);

    // The peer recovers; the next good document replaces the bundle.
    peer.serve(bundle_document(&[&ca], 2));
    // The fetch status is recorded just after the bundle is replaced, so a
    // listing in between shows the new bundle beside the old error.
    let recovered = wait_for(WAIT, "the second good document", || {
        listed(&a, "c.test").filter(|l| l["sequence"] == 2 && l["fetch"]["last_error"] == "")
    });
    assert_eq!(recovered["x509_authorities"], 1);
}

#[test]
fn bundle_cli_sets_lists_and_deletes_and_refuses_bad_input() {
    let port = free_port();
    // Its own roots file, so the test does not depend on the system's.
    let roots = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(roots.path(), writ_pem(&test_ca_cert())).unwrap();
    let a = Writ::start_in(
        "a.test",
        &format!(
            r#"
[[federation.trust_domain]]
name = "b.test"
url = "https://127.0.0.1:{port}/"
profile = "https_web"
ca_bundle = "{}"
"#,
            roots.path().display()
        ),
    );
    let dir = a.dir.path();
    let (ca, _) = test_ca();
    let pem_file = dir.join("c.pem");
    std::fs::write(&pem_file, writ_pem(&ca)).unwrap();
    let pem_path = pem_file.to_str().unwrap();

    // Nothing held for b.test yet: it is listed as pending, with its URL.
    let pending = listed(&a, "b.test").unwrap();
    assert_eq!(pending["source"], "pending");
    assert_eq!(
        pending["fetch"]["url"],
        format!("https://127.0.0.1:{port}/")
    );
    assert_eq!(bundle_list(&a)[0]["source"], "own");

    // PEM from a file, then SPIFFE JSON from stdin.
    let out = cli_ok(
        &a,
        &[
            "bundle",
            "set",
            "--trust-domain",
            "c.test",
            "--file",
            pem_path,
        ],
    );
    assert!(out.contains("set bundle of c.test (1 X.509"), "{out}");
    let shown = cli_ok(
        &a,
        &[
            "bundle",
            "show",
            "--trust-domain",
            "c.test",
            "--format",
            "spiffe",
        ],
    );
    let (ok, out, err) = cli_with_input(
        &a,
        &[
            "bundle",
            "set",
            "--trust-domain",
            "d.test",
            "--format",
            "spiffe",
        ],
        shown.as_bytes(),
    );
    assert!(ok, "{err}");
    assert!(out.contains("d.test"), "{out}");
    let d_pem = cli_ok(&a, &["bundle", "show", "--trust-domain", "d.test"]);
    assert_eq!(pem_ders(&d_pem), vec![ca.to_vec()]);
    let list = bundle_list(&a);
    let names: Vec<(&str, &str)> = list
        .iter()
        .map(|b| {
            (
                b["trust_domain"].as_str().unwrap(),
                b["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("a.test", "own"),
            ("b.test", "pending"),
            ("c.test", "static"),
            ("d.test", "static")
        ]
    );
    let text = cli_ok(&a, &["bundle", "list"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("c.test") && l.contains("static")),
        "{text}"
    );

    // Bad input: refused with the problem named, nothing stored changes.
    let leaf_file = dir.join("leaf.pem");
    let (_, issuer) = test_ca();
    let leaf = CertificateParams::new(vec!["leaf.test".to_owned()])
        .unwrap()
        .signed_by(&KeyPair::generate().unwrap(), &issuer)
        .unwrap();
    std::fs::write(&leaf_file, leaf.pem()).unwrap();
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "{\"keys\": [").unwrap();
    let empty = dir.join("empty.json");
    std::fs::write(&empty, "{\"keys\": []}").unwrap();
    let expired = dir.join("expired.pem");
    std::fs::write(&expired, writ_pem(&expired_ca_cert())).unwrap();
    let refused: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec![
                "bundle",
                "set",
                "--trust-domain",
                "c.test",
                "--file",
                leaf_file.to_str().unwrap(),
            ],
            "InvalidArgument",
            "not a CA",
        ),
        (
            vec![
                "bundle",
                "set",
                "--trust-domain",
                "c.test",
                "--format",
                "spiffe",
                "--file",
                garbage.to_str().unwrap(),
            ],
            "InvalidArgument",
            "not valid JSON",
        ),
        (
            vec![
                "bundle",
                "set",
                "--trust-domain",
                "c.test",
                "--format",
                "spiffe",
                "--file",
                empty.to_str().unwrap(),
            ],
            "InvalidArgument",
            "no x509-svid or jwt-svid authority",
        ),
        // It would have replaced the good bundle held for c.test.
        (
            vec![
                "bundle",
                "set",
                "--trust-domain",
                "c.test",
                "--file",
                expired.to_str().unwrap(),
            ],
            "InvalidArgument",
            "bundle for c.test refused: its only X.509 authority expired at 2001-01-01T00:00:00Z, and it holds no JWT authority",
        ),
        (
            vec![
                "bundle",
                "set",
                "--trust-domain",
                "c.test",
                "--format",
                "spiffe",
                "--file",
                pem_path,
            ],
            "InvalidArgument",
            "not valid JSON",
        ),
        (
            vec![
                "bundle",
                "set",
                "--trust-domain",
                "C.test",
                "--file",
                pem_path,
            ],
            "InvalidArgument",
            "trust_domain",
        ),
        (
            vec![
                "bundle",
                "set",
                "--trust-domain",
                "a.test",
                "--file",
                pem_path,
            ],
            "FailedPrecondition",
            "writ's own trust domain",
        ),
        (
            vec!["bundle", "delete", "--trust-domain", "a.test"],
            "FailedPrecondition",
            "writ's own trust domain",
        ),
        (
            vec!["bundle", "delete", "--trust-domain", "b.test"],
            "FailedPrecondition",
            "configured",
        ),
        (
            vec!["bundle", "delete", "--trust-domain", "e.test"],
            "NotFound",
            "no bundle held",
        ),
        (
            vec!["bundle", "show", "--trust-domain", "e.test"],
            "NotFound",
            "no bundle held",
        ),
    ];
    for (args, code, message) in refused {
        let (ok, _, err) = cli(&a, &args);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            err.contains(code) && err.contains(message),
            "{args:?}: {err}"
        );
    }
    let (ok, _, err) = cli_with_input(&a, &["bundle", "set", "--trust-domain", "c.test"], b"");
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("empty"),
        "{err}"
    );
    assert_eq!(bundle_list(&a), list, "refused input changed nothing");

    cli_ok(&a, &["bundle", "delete", "--trust-domain", "c.test"]);
    let names: Vec<String> = bundle_list(&a)
        .iter()
        .map(|b| b["trust_domain"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a.test", "b.test", "d.test"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_domains_added_and_removed_by_reload_start_and_stop_fetching() {
    let (ca, issuer) = test_ca();
    let peer = ScriptedPeer::start(&issuer, C_TEST_PEER_ID).await;
    peer.serve(bundle_document(&[&ca], 1));
    let a = Writ::start_in("a.test", "");
    let original = std::fs::read_to_string(&a.config_path).unwrap();
    let bootstrap = a.dir.path().join("c.pem");
    std::fs::write(&bootstrap, writ_pem(&ca)).unwrap();
    let reload = |w: &Writ| -> Value {
        serde_json::from_str(&cli_ok(w, &["reload", "--output", "json"])).unwrap()
    };

    // Added to the file and reloaded, without a restart: fetched.
    std::fs::write(
        &a.config_path,
        format!("{original}\n{}", c_test_federation(peer.port, &bootstrap)),
    )
    .unwrap();
    let summary = reload(&a);
    assert_eq!(
        summary["federation"]["added"],
        serde_json::json!(["c.test"])
    );
    assert_eq!(summary["restart_required"], serde_json::json!([]));
    wait_for(WAIT, "c.test fetched", || {
        listed(&a, "c.test").filter(|l| l["source"] == "fetched" && l["sequence"] == 1)
    });

    // Removed again: the fetcher stops, the last bundle stays (unrefreshed)
    // until deleted by hand, which is now allowed.
    std::fs::write(&a.config_path, &original).unwrap();
    let summary = reload(&a);
    assert_eq!(
        summary["federation"]["removed"],
        serde_json::json!(["c.test"])
    );
    assert!(
        summary["notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("writ bundle delete")),
        "{summary}"
    );
    // Served only from now on, when no fetcher may be running.
    peer.serve(bundle_document(&[&ca], 2));
    let fetches = peer.served();
    let held = listed(&a, "c.test").unwrap();
    assert_eq!(held["fetch"], Value::Null, "{held}");
    assert_eq!(held["source"], "fetched");
    // At a 1 s refresh hint a live fetcher would fetch three more times; a
    // fetch answered just before the fetcher stopped may still be counted.
    std::thread::sleep(Duration::from_secs(3));
    assert!(peer.served() <= fetches + 1, "c.test is still fetched");
    assert_eq!(listed(&a, "c.test").unwrap()["sequence"], 1);
    cli_ok(&a, &["bundle", "delete", "--trust-domain", "c.test"]);
    assert!(listed(&a, "c.test").is_none());
}

#[test]
fn a_bundle_endpoint_change_is_reported_as_needing_a_restart() {
    let a = Writ::start_in("a.test", "");
    let mut config = std::fs::read_to_string(&a.config_path).unwrap();
    config.push_str(&format!(
        "\n[federation.bundle_endpoint]\nlisten = \"127.0.0.1:{}\"\n",
        free_port()
    ));
    std::fs::write(&a.config_path, config).unwrap();
    let summary: Value =
        serde_json::from_str(&cli_ok(&a, &["reload", "--output", "json"])).unwrap();
    assert_eq!(
        summary["restart_required"],
        serde_json::json!(["federation.bundle_endpoint"])
    );
    assert!(
        a.log().contains("take effect on restart"),
        "the log says so too:\n{}",
        a.log()
    );
    assert!(!a.log().contains("bundle endpoint started"));
}

/// The bundle endpoint's SPIFFE ID of the scripted `c.test` peer.
const C_TEST_PEER_ID: &str = "spiffe://c.test/bundle-server";

/// `[federation]` with one https_spiffe trust domain `c.test` served by the
/// peer on `port`, bootstrapped from `bootstrap`, refreshed every second.
fn c_test_federation(port: u16, bootstrap: &std::path::Path) -> String {
    format!(
        r#"[federation]
min_refresh_interval = "1s"

[[federation.trust_domain]]
name = "c.test"
url = "https://127.0.0.1:{port}/"
profile = "https_spiffe"
endpoint_spiffe_id = "{C_TEST_PEER_ID}"
bundle = "{}"
"#,
        bootstrap.display()
    )
}

/// The bundle's age is kept across restarts: a writ that restarts into
/// failing fetches (its peer unreachable, or rotated past the bundle it
/// holds) shows an age that grows, where the series used to vanish until
/// the first fetch this run succeeded, so an age alert never fired.
#[test]
fn the_bundle_age_metric_survives_a_restart_into_failing_fetches() {
    let telemetry = free_port();
    let unreachable = free_port();
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("peer.pem");
    std::fs::write(&bootstrap, writ_pem(&test_ca_cert())).unwrap();
    let mut writ = Writ::start(&format!(
        r#"
[telemetry]
listen = "127.0.0.1:{telemetry}"

[[federation.trust_domain]]
name = "peer.test"
url = "https://127.0.0.1:{unreachable}/"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://peer.test/writ/bundle-endpoint"
bundle = "{bootstrap}"
"#,
        bootstrap = bootstrap.display()
    ));
    let addr = format!("127.0.0.1:{telemetry}");
    let age = || {
        let (_, page) = common::http_get(&addr, "/metrics");
        page.lines()
            .find(|l| {
                l.starts_with("writ_federation_bundle_age_seconds{trust_domain=\"peer.test\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let first = common::wait_for(Duration::from_secs(10), "an age series", age);
    writ.kill9();
    std::thread::sleep(Duration::from_millis(1100));
    writ.spawn();
    let after = common::wait_for(Duration::from_secs(10), "an age series after restart", age);
    assert!(
        after >= first + 1.0,
        "age {first} then {after} after a restart"
    );
}

/// The recovery recipe in docs/federation.md ("When the held bundle is too
/// old"), run as written: the `writ bundle show` line against the peer,
/// the `writ bundle set` line against this writ, in a shell-less way that
/// honours the `> file` redirect. It once left out `--format spiffe` on
/// the `set` line, which then read the JSON as PEM and failed.
#[test]
fn the_documented_bundle_recovery_commands_work_as_written() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/federation.md"))
        .unwrap();
    let recipe = doc
        .split_once("To recover, give writ the peer's current bundle")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("the recovery recipe's code block in docs/federation.md");
    let commands: Vec<&str> = recipe
        .lines()
        .map(|l| l.split_once('#').map_or(l, |(cmd, _)| cmd).trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(commands.len(), 2, "{recipe}");

    let peer = Writ::start_in("b.test", "");
    let a = Writ::start_in("a.test", "");
    let work = tempfile::tempdir().unwrap();
    for (line, on) in commands.iter().zip([&peer, &a]) {
        let line = line.replace("partner.example", "b.test");
        let (command, redirect) = match line.split_once('>') {
            Some((command, file)) => (command.to_owned(), Some(file.trim().to_owned())),
            None => (line.clone(), None),
        };
        let mut words = command.split_whitespace();
        assert_eq!(words.next(), Some("writ"), "{line}");
        let out = Command::new(WRIT)
            .args(words)
            .arg("--admin-socket")
            .arg(admin_socket(on))
            .current_dir(work.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "documented command `{line}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(file) = redirect {
            std::fs::write(work.path().join(file), &out.stdout).unwrap();
        }
    }
    let own = cli_ok(&peer, &["bundle", "show"]);
    let held = cli_ok(&a, &["bundle", "show", "--trust-domain", "b.test"]);
    assert_eq!(pem_ders(&held), pem_ders(&own));
    assert_eq!(listed(&a, "b.test").unwrap()["source"], "static");
    // The trail names the operator who set it.
    let trail = common::read_to_string(&a.dir.path().join("state/audit/audit.jsonl"));
    let set: Vec<serde_json::Value> = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "federation_bundle_changed" && r["reason"] == "set")
        .collect();
    assert_eq!(set.len(), 1, "{set:?}");
    assert_eq!(set[0]["caller"]["uid"], nix::unistd::geteuid().as_raw());
    assert_eq!(set[0]["detail"]["trust_domain"], "b.test");

    // Without the flag the JSON is read as PEM; the error says what to add.
    let document = cli_ok(&peer, &["bundle", "show", "--format", "spiffe"]);
    let (ok, _, err) = cli_with_input(
        &a,
        &["bundle", "set", "--trust-domain", "b.test"],
        format!("\n  {document}").as_bytes(),
    );
    assert!(!ok);
    assert!(err.contains("InvalidArgument"), "{err}");
    assert!(
        err.contains("looks like a SPIFFE bundle document (JSON), not PEM: pass --format spiffe"),
        "{err}"
    );
}

/// A CA certificate of `w.test` whose validity ended in 2001.
fn expired_ca_cert() -> CertificateDer<'static> {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = KeyPair::generate().unwrap();
    p.self_signed(&key).unwrap().der().clone()
}

/// A peer serving a document that trusts nothing (no keys at all, or only
/// expired X.509 authorities) used to replace the good bundle, and the
/// trust domain vanished from its workloads' bundles: such a document is a
/// failed fetch now, logged and counted, and the last good bundle stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_cannot_empty_the_bundle_held_for_it() {
    let (web_ca, web_issuer) = test_ca();
    let peer = ScriptedPeer::start_web(&web_issuer).await;
    let w_ca = test_ca_cert();
    peer.serve(bundle_document(&[&w_ca], 1));
    let telemetry = free_port();
    let mut a = Writ::start_in("a.test", "");
    let roots = a.dir.path().join("web-roots.pem");
    std::fs::write(&roots, writ_pem(&web_ca)).unwrap();
    reconfigure(
        &mut a,
        &format!(
            r#"
[telemetry]
listen = "127.0.0.1:{telemetry}"

[federation]
min_refresh_interval = "1s"

[[federation.trust_domain]]
name = "w.test"
url = "https://127.0.0.1:{port}/"
profile = "https_web"
ca_bundle = "{roots}"

[[entry]]
spiffe_id = "spiffe://a.test/fed"
selectors = ["unix:path:{me}"]
federates_with = ["w.test"]
"#,
            port = peer.port,
            roots = roots.display(),
            me = test_exe(),
        ),
    );
    wait_for(WAIT, "the good document", || {
        listed(&a, "w.test").filter(|l| l["source"] == "fetched" && l["sequence"] == 1)
    });
    let w_test_bundle = |bundles: &pb::X509BundlesResponse| {
        bundles
            .bundles
            .get("spiffe://w.test")
            .map(|der| split_der(der))
    };
    assert_eq!(
        w_test_bundle(&first_bundles(&a).await),
        Some(vec![w_ca.to_vec()])
    );
    let failures = || {
        let (_, page) = common::http_get(&format!("127.0.0.1:{telemetry}"), "/metrics");
        page.lines()
            .find(|l| {
                l.starts_with("writ_federation_fetches_total{")
                    && l.contains("trust_domain=\"w.test\"")
                    && l.contains("outcome=\"failure\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };

    let expired = expired_ca_cert();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "no keys",
            br#"{"keys": [], "spiffe_sequence": 2}"#.to_vec(),
            "holds no authority at all",
        ),
        (
            "only expired authorities",
            bundle_document(&[&expired], 3),
            "its only X.509 authority expired at 2001-01-01T00:00:00Z",
        ),
    ];
    for (what, document, expected) in cases {
        let failed_before = failures();
        let rejected = serve_until_refused(&peer, document, &a, "w.test", what, expected);
        assert_eq!(rejected["sequence"], 1, "{what}: the good bundle must stay");
        assert_eq!(rejected["x509_authorities"], 1, "{what}");
        assert_eq!(
            w_test_bundle(&first_bundles(&a).await),
            Some(vec![w_ca.to_vec()]),
            "{what}: workloads keep receiving the trust domain"
        );
        assert!(failures() > failed_before, "{what}: counted as a failure");
        assert!(
            a.log().contains(expected),
            "{what}: the reason is logged\n{}",
            a.log()
        );
    }
    let held = cli_ok(&a, &["bundle", "show", "--trust-domain", "w.test"]);
    assert_eq!(pem_ders(&held), vec![w_ca.to_vec()]);
}

/// A bootstrap bundle whose roots have all expired could never
/// authenticate the peer's endpoint: a reload adding it is refused with
/// the running configuration kept, and writ refuses to start on it, both
/// naming the file.
#[test]
fn an_expired_bootstrap_bundle_is_refused_on_reload_and_at_start() {
    let mut a = Writ::start_in("a.test", "");
    let original = std::fs::read_to_string(&a.config_path).unwrap();
    let bootstrap = a.dir.path().join("c.pem");
    std::fs::write(&bootstrap, writ_pem(&expired_ca_cert())).unwrap();
    std::fs::write(
        &a.config_path,
        format!("{original}\n{}", c_test_federation(free_port(), &bootstrap)),
    )
    .unwrap();
    let expected = format!(
        "{}: bundle for c.test refused: its only X.509 authority expired at 2001-01-01T00:00:00Z, so the next fetch could not be authenticated",
        bootstrap.display()
    );

    let (ok, _, err) = cli(&a, &["reload"]);
    assert!(!ok, "the reload was applied");
    assert!(
        err.contains("FailedPrecondition")
            && err.contains("reload refused")
            && err.contains(&expected),
        "{err}"
    );
    assert!(
        listed(&a, "c.test").is_none(),
        "the running configuration is kept"
    );

    a.stop();
    let (code, output) = common::run_expecting_failure(&a.config_path);
    assert_ne!(code, Some(0), "{output}");
    assert!(output.contains(&expected), "{output}");
}

/// The SPIFFE IDs `workload_ids` gets from the Workload API, or none.
async fn workload_ids(w: &Writ) -> Vec<String> {
    let Ok(mut client) = writ::cli::client::workload_client(&w.socket).await else {
        return Vec::new();
    };
    let Ok(stream) = client.fetch_x509svid(pb::X509svidRequest {}).await else {
        return Vec::new();
    };
    match stream.into_inner().message().await {
        Ok(Some(response)) => response.svids.into_iter().map(|s| s.spiffe_id).collect(),
        _ => Vec::new(),
    }
}

/// The bundle endpoint's SPIFFE ID is what federated peers accept writ's
/// bundle from: a workload holding it could serve them a forged one. So
/// no entry (admin API or config) and no task may take it: the default
/// one always, and a configured one while it is configured; an entry
/// stored before its ID became the endpoint's is kept but not served.
#[tokio::test(flavor = "multi_thread")]
async fn the_bundle_endpoint_identity_is_given_to_no_workload() {
    let port = free_port();
    let endpoint = format!(
        "[admin_api]\nbind_any_pid = [[\"unix:uid:0\"]]\n\n[federation.bundle_endpoint]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let b = Writ::start_in("b.test", &endpoint);
    let socket = admin_socket(&b);
    let socket = socket.to_str().unwrap();
    let reserved = "spiffe://b.test/writ/bundle-endpoint";
    let reason = "is reserved for writ's federation bundle endpoint";

    let (ok, _, err) = common::writ_cli(
        &[
            "entry",
            "create",
            "--admin-socket",
            socket,
            "--spiffe-id",
            reserved,
            "--selector",
            "unix:uid:0",
        ],
        None,
    );
    assert!(!ok, "an entry took {reserved}");
    assert!(err.contains("InvalidArgument"), "{err}");
    assert!(
        err.contains(&format!("spiffe_id: {reserved} {reason}")),
        "{err}"
    );

    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let begin = |spiffe_id: &str| {
        common::writ_cli(
            &[
                "task",
                "begin",
                "--admin-socket",
                socket,
                "--pid",
                &pid,
                "--spiffe-id",
                spiffe_id,
            ],
            None,
        )
    };
    // This caller may name any identity...
    let (ok, _, err) = begin("spiffe://b.test/any/other");
    assert!(ok, "{err}\n{}", b.log());
    // ...but not that one.
    let (ok, _, err) = begin(reserved);
    assert!(!ok, "a task took {reserved}");
    assert!(err.contains("InvalidArgument"), "{err}");
    assert!(
        err.contains(&format!("spiffe_id: {reserved} {reason}")),
        "{err}"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    drop(b);

    // An entry created while its ID was free, then the endpoint given that
    // ID: the entry is no longer served, the log says which and why, and
    // it can still be deleted.
    let custom = "spiffe://c.test/custom/endpoint";
    let mut c = Writ::start_in("c.test", "");
    let socket = admin_socket(&c);
    let socket = socket.to_str().unwrap().to_owned();
    let me = test_exe();
    let (ok, out, err) = common::writ_cli(
        &[
            "entry",
            "create",
            "--admin-socket",
            &socket,
            "--spiffe-id",
            custom,
            "--selector",
            &format!("unix:path:{me}"),
        ],
        None,
    );
    assert!(ok, "{err}");
    let id = out.trim().to_owned();
    assert_eq!(workload_ids(&c).await, vec![custom.to_owned()]);
    reconfigure(
        &mut c,
        &format!(
            "\n[federation.bundle_endpoint]\nlisten = \"127.0.0.1:{}\"\nspiffe_id = \"{custom}\"\n",
            free_port()
        ),
    );
    assert_eq!(workload_ids(&c).await, Vec::<String>::new());
    let warning = c
        .log()
        .lines()
        .find(|l| l.contains("holds a reserved SPIFFE ID"))
        .map(str::to_owned);
    assert!(
        warning.is_some_and(|l| l.contains(&id) && l.contains(custom)),
        "{}",
        c.log()
    );
    let (ok, _, err) = common::writ_cli(
        &[
            "entry",
            "create",
            "--admin-socket",
            &socket,
            "--spiffe-id",
            custom,
            "--selector",
            "unix:uid:0",
        ],
        None,
    );
    assert!(!ok && err.contains(reason), "{err}");
    let (ok, _, err) = common::writ_cli(&["entry", "delete", "--admin-socket", &socket, &id], None);
    assert!(ok, "{err}");
}
