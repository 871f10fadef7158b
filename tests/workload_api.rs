//! The Workload API end to end: the real `writ` binary on temp dirs, real
//! clients (the `spiffe` crate, tonic, rustls) and real processes.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{NOBODY, Writ, handoff, helper_command, is_root};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use spiffe::{X509Source, X509Svid};
use tonic::Code;
use tonic::transport::Endpoint;
use writ::proto::workload as pb;
use writ::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use writ::spiffe_id::TrustDomain;
use writ::tls::{SpiffeTls, TrustStore};

const ROOT_ID: &str = "spiffe://writ.test/workload/root";
const NOBODY_ID: &str = "spiffe://writ.test/workload/nobody";

fn two_entries(extra_root: &str) -> String {
    format!(
        r#"
[[entry]]
spiffe_id = "{ROOT_ID}"
selectors = ["unix:uid:0"]
{extra_root}

[[entry]]
spiffe_id = "{NOBODY_ID}"
selectors = ["unix:uid:{NOBODY}"]
"#
    )
}

async fn x509_source(writ: &Writ) -> X509Source {
    X509Source::builder()
        .endpoint(writ.endpoint())
        .build()
        .await
        .expect("X509Source against writ")
}

/// A raw client with no security header, to see what writ does without it.
async fn raw_client(writ: &Writ) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(writ::cli::client::connect(&writ.socket).await.unwrap())
}

fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// A gRPC client over one already-connected socket (whose peer, to the
/// kernel, is whoever connected it).
async fn client_over(fd: OwnedFd) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(common::handoff::channel_over(fd).await.unwrap())
}

fn trust_store_from(source: &X509Source) -> TrustStore {
    let bundles = source.bundle_set().unwrap();
    let mut store = TrustStore::default();
    for (td, bundle) in bundles.iter() {
        let certs = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_ref().to_vec()))
            .collect();
        store
            .bundles
            .insert(TrustDomain::new(td.as_ref()).unwrap(), certs);
    }
    store
}

fn identity_into(tls: &SpiffeTls, svid: &X509Svid) {
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_ref().to_vec()))
        .collect();
    tls.set_identity(chain, svid.private_key().as_ref())
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn spiffe_crate_fetches_a_conformant_svid_whose_chain_verifies() {
    let writ = Writ::start(&two_entries(""));
    let source = x509_source(&writ).await;
    let svid = source.svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), ROOT_ID);

    // The independent parser accepts the raw DER as writ sent it.
    let mut client = raw_client(&writ).await;
    let first = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let raw = &first.svids[0];
    let parsed = X509Svid::parse_from_der(&raw.x509_svid, &raw.x509_svid_key).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), ROOT_ID);

    // Every certificate rule holds, and the chain verifies against the bundle
    // for both TLS client and server use.
    let leaf = svid.cert_chain()[0].as_ref();
    assert_eq!(
        writ::svid::check_leaf_conformance(leaf)
            .unwrap()
            .to_string(),
        ROOT_ID
    );
    let tls = SpiffeTls::new();
    tls.set_trust(trust_store_from(&source));
    let end_entity = CertificateDer::from(leaf.to_vec());
    let intermediates: Vec<CertificateDer> = svid.cert_chain()[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_ref().to_vec()))
        .collect();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        let id = tls
            .verify_peer(&end_entity, &intermediates, UnixTime::now(), usage)
            .unwrap();
        assert_eq!(id.to_string(), ROOT_ID);
    }
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_method_without_the_security_header_is_invalid_argument() {
    let writ = Writ::start(&two_entries(""));
    let mut c = raw_client(&writ).await;
    let codes = [
        c.fetch_x509svid(pb::X509svidRequest {})
            .await
            .err()
            .map(|s| s.code()),
        c.fetch_x509_bundles(pb::X509BundlesRequest {})
            .await
            .err()
            .map(|s| s.code()),
        c.fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .err()
        .map(|s| s.code()),
        c.fetch_jwt_bundles(pb::JwtBundlesRequest {})
            .await
            .err()
            .map(|s| s.code()),
        c.validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x".into(),
        })
        .await
        .err()
        .map(|s| s.code()),
        c.fetch_witsvid(pb::WitsvidRequest {})
            .await
            .err()
            .map(|s| s.code()),
        c.fetch_wit_bundles(pb::WitBundlesRequest {})
            .await
            .err()
            .map(|s| s.code()),
    ];
    for (i, code) in codes.iter().enumerate() {
        assert_eq!(*code, Some(Code::InvalidArgument), "method #{i}");
    }
    // A wrong value is as bad as none.
    let mut r = tonic::Request::new(pb::X509svidRequest {});
    r.metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().unwrap());
    let err = c.fetch_x509svid(r).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("workload.spiffe.io"),
        "{}",
        err.message()
    );
    // So is a second value beside `true`, in either order (SPIRE wants
    // exactly one).
    for values in [["true", "false"], ["false", "true"]] {
        let mut r = tonic::Request::new(pb::X509svidRequest {});
        for value in values {
            r.metadata_mut()
                .append("workload.spiffe.io", value.parse().unwrap());
        }
        let err = c.fetch_x509svid(r).await.err().unwrap();
        assert_eq!(err.code(), Code::InvalidArgument, "{values:?}");
        assert!(err.message().contains("once"), "{}", err.message());
    }
    // With the header, the WIT profile is Unimplemented, not InvalidArgument.
    let err = c
        .fetch_witsvid(with_header(pb::WitsvidRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_no_entry_matches_is_permission_denied() {
    // Only an entry for some other uid: the test process (whatever its uid)
    // matches nothing.
    let writ = Writ::start(
        r#"
[[entry]]
spiffe_id = "spiffe://writ.test/someone-else"
selectors = ["unix:uid:4242424"]
"#,
    );
    let mut c = raw_client(&writ).await;
    let err = c
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = c
        .fetch_x509_bundles(with_header(pb::X509BundlesRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The CLI client reports it too, and exits non-zero.
    let (ok, _, stderr) = common::writ_cli(
        &["api", "fetch", "x509", "--socket", &writ.endpoint()],
        None,
    );
    assert!(!ok);
    assert!(
        stderr.to_lowercase().contains("no identity issued"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_complete_mutual_tls_and_see_each_others_ids() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to run a peer under another uid");
        return;
    }
    let writ = Writ::start(&two_entries(""));
    // The server runs as nobody, with its own SVID from writ.
    let mut server = helper_command("mtls-server")
        .env("SPIFFE_ENDPOINT_SOCKET", writ.endpoint())
        .env("WRIT_EXPECT_PEER", ROOT_ID)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines.next().expect("server said nothing").unwrap();
        // libtest prints "test helper ... " without a newline first.
        if let Some((_, p)) = line.split_once("LISTEN ") {
            break p.parse().unwrap();
        }
    };

    let source = x509_source(&writ).await;
    let tls = SpiffeTls::new();
    identity_into(&tls, &source.svid().unwrap());
    tls.set_trust(trust_store_from(&source));
    let config = tls
        .client_config(Arc::new(|id| id.to_string() == NOBODY_ID))
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut stream = connector
        .connect(ServerName::try_from("ignored.invalid").unwrap(), tcp)
        .await
        .expect("mTLS handshake");
    let server_cert = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(
        writ::tls::spiffe_id_of(&server_cert).unwrap().to_string(),
        NOBODY_ID
    );
    let mut reply = String::new();
    use tokio::io::AsyncReadExt;
    stream.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, format!("hello {ROOT_ID}"));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l == &format!("PEER {ROOT_ID}")),
        "{rest:?}"
    );
    assert!(server.wait().unwrap().success());
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_when_its_caller_exits_even_if_the_connection_lives_on() {
    if !is_root() {
        eprintln!("SKIPPED: needs root for the uid-0 entry");
        return;
    }
    let writ = Writ::start(&two_entries(""));
    // The helper connects to writ, hands us the connection, and waits to be
    // killed. To writ, the peer of that connection is the helper.
    let (mut helper, fd) = start_handoff_helper(&writ, "connect-and-handoff", Stdio::null(), &[]);
    let mut client = client_over(fd).await;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .expect("the helper is root and matches an entry")
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, ROOT_ID);

    helper.kill().unwrap();
    helper.wait().unwrap();
    // We still hold the connection open; writ must end the stream anyway.
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("stream did not end after its caller exited");
    match end {
        Ok(None) => {}
        Ok(Some(m)) => panic!(
            "got another message after the caller exited: {:?}",
            m.svids.len()
        ),
        Err(status) => assert_ne!(status.code(), Code::Ok),
    }
    // And a new RPC on the same connection is refused: its caller is gone.
    let err = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .expect_err("RPC from an exited caller must fail");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

/// A connection must send the HTTP/2 preface within 10 s, and one uid holds
/// at most 1024 connections: otherwise connections that never send a
/// request each held a socket and a pidfd of writ's for good, and 10,000 of
/// them from one user exhausted writ's descriptors, so that it served no
/// one.
#[test]
fn silent_connections_are_closed_and_one_uid_holds_at_most_1024() {
    use std::io::Read as _;
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;
    let writ = Writ::start(&two_entries(""));
    // Room for 1025 connections in this process.
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, raised).unwrap();
    }
    let closed_within = |conn: &mut UnixStream, wait: Duration| {
        conn.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue, // the server's SETTINGS
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    };
    // Silent: closed once the preface is overdue.
    let mut silent = UnixStream::connect(&writ.socket).unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(20)),
        "a silent connection was kept"
    );

    // Speaking: 1024 are kept, the next is closed at once.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let open = || {
        let mut conn = UnixStream::connect(&writ.socket).unwrap();
        conn.write_all(preface).unwrap();
        conn
    };
    let mut held: Vec<UnixStream> = (0..1024).map(|_| open()).collect();
    let mut one_more = open();
    assert!(
        closed_within(&mut one_more, Duration::from_secs(10)),
        "a 1025th connection of one uid was kept"
    );
    assert!(
        !closed_within(&mut held[1023], Duration::from_millis(500)),
        "the 1024th connection was closed"
    );
    // Another uid is not held back by this one's.
    let (ok, out, stderr) = common::writ_cli(
        &[
            "api",
            "fetch",
            "x509",
            "--socket",
            writ.socket.to_str().unwrap(),
        ],
        Some(NOBODY),
    );
    assert!(ok && out.contains(NOBODY_ID), "{out}{stderr}");
    // Once one closes (and writ has seen it go), a new one is kept.
    held.pop();
    let _kept = common::wait_for(Duration::from_secs(20), "room after a close", || {
        let mut again = open();
        (!closed_within(&mut again, Duration::from_millis(500))).then_some(again)
    });
}

/// Opens a FetchX509SVID stream on `client`'s connection and waits for its
/// first message.
async fn open_x509_stream(
    mut client: SpiffeWorkloadApiClient<tonic::transport::Channel>,
) -> Result<tonic::Streaming<pb::X509svidResponse>, tonic::Status> {
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await?
        .into_inner();
    stream.message().await?;
    Ok(stream)
}

/// One connection holds at most 64 calls at once: each open stream costs
/// writ its HTTP/2 send buffer and queued messages, and a client that
/// opened 5,000 streams and never read them grew writ to 2.5 GB. The 65th
/// waits for one of the 64 to end.
#[tokio::test(flavor = "multi_thread")]
async fn one_connection_holds_at_most_64_streams() {
    let writ = Writ::start(&format!(
        "[[entry]]\nspiffe_id = \"{ROOT_ID}\"\nselectors = [\"unix:uid:{}\"]\n",
        nix::unistd::geteuid().as_raw()
    ));
    let client = raw_client(&writ).await;
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(open_x509_stream(client.clone()).await.unwrap());
    }
    let waiting = tokio::spawn(open_x509_stream(client.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a 65th stream was served at once");
    held.pop();
    let served = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the 65th stream was not served once another ended");
    assert!(served.unwrap().is_ok());
}

/// One uid holds at most 1024 streams, across all its connections: with
/// 64 per connection alone, a user could still make writ hold gigabytes of
/// send buffers through many connections whose streams it never reads.
#[tokio::test(flavor = "multi_thread")]
async fn one_uid_holds_at_most_1024_streams() {
    let writ = Writ::start(&format!(
        "[[entry]]\nspiffe_id = \"{ROOT_ID}\"\nselectors = [\"unix:uid:{}\"]\n",
        nix::unistd::geteuid().as_raw()
    ));
    let mut held = Vec::new();
    for _ in 0..16 {
        let client = raw_client(&writ).await;
        for _ in 0..64 {
            held.push(open_x509_stream(client.clone()).await.unwrap());
        }
    }
    let extra = raw_client(&writ).await;
    let err = open_x509_stream(extra.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("holds 1024 open streams"), "{err:?}");
    // Once one ends (and writ has seen it go), there is room again.
    held.pop();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match open_x509_stream(extra.clone()).await {
            Ok(stream) => {
                held.push(stream);
                break;
            }
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "no room after a close: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The per-uid limits are the operator's to set: a runtime keeping
/// thousands of agent processes under one uid raises them, a shared host
/// may lower them.
#[tokio::test(flavor = "multi_thread")]
async fn per_uid_connection_and_stream_limits_follow_the_config() {
    use std::io::Read as _;
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;
    let writ = Writ::start(&format!(
        "[workload_api]\nmax_connections_per_uid = 3\nmax_streams_per_uid = 2\n\n\
         [[entry]]\nspiffe_id = \"{ROOT_ID}\"\nselectors = [\"unix:uid:{}\"]\n",
        nix::unistd::geteuid().as_raw()
    ));
    let client = raw_client(&writ).await;
    let mut held = vec![
        open_x509_stream(client.clone()).await.unwrap(),
        open_x509_stream(client.clone()).await.unwrap(),
    ];
    let err = open_x509_stream(client.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("holds 2 open streams")
            && err.message().contains("workload_api.max_streams_per_uid"),
        "{err:?}"
    );
    held.pop();

    // The client above holds one connection; two more are kept, a fourth
    // is closed as it arrives.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let open = || {
        let mut conn = UnixStream::connect(&writ.socket).unwrap();
        conn.write_all(preface).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        conn
    };
    // The server's SETTINGS come first on a kept connection; EOF on one
    // closed.
    let kept = |conn: &mut UnixStream| {
        let mut buf = [0u8; 64];
        matches!(conn.read(&mut buf), Ok(n) if n > 0)
    };
    let mut second = open();
    let mut third = open();
    assert!(kept(&mut second) && kept(&mut third));
    let mut fourth = open();
    assert!(
        !kept(&mut fourth),
        "a fourth connection of one uid was kept"
    );
    assert!(
        writ.log()
            .contains("uid holds as many connections as it may"),
        "{}",
        writ.log()
    );
    drop(held);
}

/// A caller in another mount namespace gets no `unix:path` selector: there
/// any binary can be mounted at any path (an unprivileged user can make one
/// with a user namespace), so the path says nothing of what runs. A tester
/// had a copy of Python served an orchestrator's path-bound identity.
#[test]
fn a_caller_in_another_mount_namespace_is_not_matched_by_path() {
    if !is_root() || Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("SKIPPED: needs root and unshare(1)");
        return;
    }
    let writ_binary = std::path::Path::new(common::WRIT).canonicalize().unwrap();
    let writ = Writ::start(&format!(
        r#"
[[entry]]
spiffe_id = "spiffe://writ.test/by-path"
selectors = ["unix:uid:0", "unix:path:{}"]

[[entry]]
spiffe_id = "{ROOT_ID}"
selectors = ["unix:uid:0"]
"#,
        writ_binary.display()
    ));
    let fetch = |prefix: &[&str]| {
        let mut args: Vec<&str> = prefix.to_vec();
        let socket = writ.socket.to_str().unwrap();
        args.extend([common::WRIT, "api", "fetch", "x509", "--socket", socket]);
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let here = fetch(&["env"]);
    assert!(here.contains("spiffe://writ.test/by-path"), "{here}");
    let elsewhere = fetch(&["unshare", "--mount"]);
    assert!(elsewhere.contains(ROOT_ID), "{elsewhere}");
    assert!(!elsewhere.contains("by-path"), "{elsewhere}");
}

/// A connection is served under the credentials its process connected
/// with (SO_PEERCRED), whatever the process runs as when it is attested.
/// Otherwise a process could connect, hand the connection to a child and
/// exec a setuid program: attested as that program's owner, the
/// connection served the child the owner's identities (a tester got
/// root's SVID and key that way, through `su` waiting at its prompt).
/// Here the helper connects as root and then becomes nobody: the
/// direction is harmless, the check the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_is_refused_once_its_process_runs_under_other_credentials() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to change a helper's uid");
        return;
    }
    let writ = Writ::start(&two_entries(""));
    let (mut helper, fd) =
        start_handoff_helper(&writ, "connect-handoff-then-setuid", Stdio::piped(), &[]);
    // The helper's own test harness prints first; keep its stdout open
    // (and read) until the helper is killed.
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.ends_with("READY")),
        "the helper did not change its uid"
    );
    let mut client = client_over(fd).await;
    let err = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .expect_err("served a connection whose process changed its uid");
    common::assert_refused_for_dropping_to_nobody(&err);
    // A connection of its own, opened as nobody, is served as nobody.
    let _ = helper.kill();
    let _ = helper.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_that_execs_another_binary_is_reattested() {
    if !is_root() {
        eprintln!("SKIPPED: needs root for the uid-0 entry");
        return;
    }
    // The identity requires the caller to be this test binary.
    let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    let writ = Writ::start(&format!(
        r#"
[[entry]]
spiffe_id = "{ROOT_ID}"
selectors = ["unix:uid:0", "unix:path:{}"]
"#,
        exe.display()
    ));
    let go_path = writ.dir.path().join("go");
    let (mut helper, fd) = start_handoff_helper(
        &writ,
        "connect-handoff-then-exec",
        Stdio::null(),
        &[("WRIT_GO_FILE", &go_path)],
    );
    let mut client = client_over(fd).await;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap().svids[0].spiffe_id,
        ROOT_ID
    );
    // Let the helper exec into `sleep`: same PID, same pidfd, other binary.
    std::fs::write(&go_path, b"go").unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("stream kept trusting a caller that exec'd another binary");
    match outcome {
        Err(status) => assert_eq!(status.code(), Code::PermissionDenied, "{status:?}"),
        Ok(other) => panic!("expected PermissionDenied after exec, got {other:?}"),
    }
    let _ = helper.kill();
    let _ = helper.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_delivers_a_new_svid_on_an_open_stream() {
    let writ = Writ::start(&format!(
        r#"
[[entry]]
spiffe_id = "{ROOT_ID}"
selectors = ["unix:uid:{uid}"]
x509_svid_ttl = "2s"
"#,
        uid = nix::unistd::geteuid().as_raw()
    ));
    let mut client = raw_client(&writ).await;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no rotation within 10s for a 2s SVID")
        .unwrap()
        .unwrap();
    assert_eq!(second.svids.len(), 1);
    assert_eq!(second.svids[0].spiffe_id, ROOT_ID);
    assert_ne!(
        first.svids[0].x509_svid, second.svids[0].x509_svid,
        "same certificate"
    );
    assert_ne!(
        first.svids[0].x509_svid_key, second.svids[0].x509_svid_key,
        "key reused"
    );
    // Full state: the bundle is in every message.
    assert!(!second.svids[0].bundle.is_empty());
}

/// Not a test: the body of helper processes that the tests above start by
/// re-running this binary with `WRIT_TEST_HELPER` set.
#[test]
#[ignore = "helper process entry point, run by other tests"]
fn helper() {
    let role = std::env::var("WRIT_TEST_HELPER").expect("run only as a helper");
    match role.as_str() {
        "mtls-server" => mtls_server(),
        "connect-and-handoff" => {
            let _conn = connect_and_hand_off();
            std::thread::sleep(Duration::from_secs(120));
        }
        "connect-handoff-then-setuid" => {
            let _conn = connect_and_hand_off();
            let nobody_gid = nix::unistd::Gid::from_raw(NOBODY);
            let nobody_uid = nix::unistd::Uid::from_raw(NOBODY);
            nix::unistd::setgroups(&[]).unwrap();
            nix::unistd::setresgid(nobody_gid, nobody_gid, nobody_gid).unwrap();
            nix::unistd::setresuid(nobody_uid, nobody_uid, nobody_uid).unwrap();
            println!("READY");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(120));
        }
        "connect-handoff-then-exec" => {
            let _conn = connect_and_hand_off();
            let go = std::env::var("WRIT_GO_FILE").unwrap();
            common::wait_for(Duration::from_secs(60), "go file", || {
                std::fs::metadata(&go).ok()
            });
            let err = std::process::Command::new("sleep").arg("120").exec();
            panic!("exec failed: {err}");
        }
        other => panic!("unknown helper role {other}"),
    }
}

/// In a helper: connects to writ (`WRIT_SOCKET`) and hands the connection
/// to the test (`WRIT_HANDOFF`). To writ, the helper is its peer; keep the
/// returned connection open as long as the helper should hold it too.
fn connect_and_hand_off() -> std::os::unix::net::UnixStream {
    let conn =
        std::os::unix::net::UnixStream::connect(std::env::var("WRIT_SOCKET").unwrap()).unwrap();
    handoff::send_fd(std::env::var("WRIT_HANDOFF").unwrap().as_ref(), &conn);
    conn
}

/// Starts helper `role` (its stdout as `stdout`, more environment from
/// `env`) and returns it with the connection to writ it hands over.
fn start_handoff_helper(
    writ: &Writ,
    role: &str,
    stdout: Stdio,
    env: &[(&str, &std::path::Path)],
) -> (std::process::Child, OwnedFd) {
    let handoff_path = writ.dir.path().join("handoff.sock");
    let listener = std::os::unix::net::UnixListener::bind(&handoff_path).unwrap();
    let mut command = helper_command(role);
    command
        .env("WRIT_SOCKET", &writ.socket)
        .env("WRIT_HANDOFF", &handoff_path)
        .stdout(stdout);
    for (key, value) in env {
        command.env(key, value);
    }
    let helper = command.spawn().unwrap();
    let fd = handoff::recv_fd(&listener);
    (helper, fd)
}

fn mtls_server() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let source = X509Source::builder()
            .endpoint(std::env::var("SPIFFE_ENDPOINT_SOCKET").unwrap())
            .build()
            .await
            .unwrap();
        let tls = SpiffeTls::new();
        identity_into(&tls, &source.svid().unwrap());
        tls.set_trust(trust_store_from(&source));
        let expected = std::env::var("WRIT_EXPECT_PEER").unwrap();
        let config = tls
            .server_config(Arc::new(move |id| id.to_string() == expected))
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTEN {}", listener.local_addr().unwrap().port());
        std::io::stdout().flush().unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = acceptor.accept(tcp).await.unwrap();
        let peer = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        let peer_id = writ::tls::spiffe_id_of(&peer).unwrap();
        println!("PEER {peer_id}");
        use tokio::io::AsyncWriteExt;
        stream
            .write_all(format!("hello {peer_id}").as_bytes())
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        source.shutdown().await;
    });
    let _ = std::io::stdin().read(&mut [0u8; 0]);
}

/// A message larger than the client's flow-control window. writ sends what
/// the window allows and must then put those bytes on the socket with
/// nothing else happening on the connection: the client only opens the
/// window once it has read them. With a 16 KiB stream window and a message
/// of about 40 KiB (three SVIDs of 64 long DNS names each, the most an
/// entry may have), writ stops on a whole 16 KiB frame, the case its write
/// coalescing holds back.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_larger_than_the_clients_window_arrives_whole() {
    const NAMES: usize = 64;
    let label = "a-rather-long-subdomain-label-that-fills-much-of-its-63-bytes";
    let names: Vec<String> = (0..NAMES)
        .map(|i| format!("\"host-{i:04}.{label}.{label}.{label}.writ.test\""))
        .collect();
    let dns_names = format!("dns_names = [{}]", names.join(", "));
    let more: String = (1..3)
        .map(|n| {
            format!(
                "\n[[entry]]\nspiffe_id = \"{ROOT_ID}/more-{n}\"\nselectors = [\"unix:uid:0\"]\n{dns_names}\n"
            )
        })
        .collect();
    let writ = Writ::start(&format!("{}{more}", two_entries(&dns_names)));
    let small_window =
        Endpoint::from_static("http://localhost").initial_stream_window_size(16 * 1024);
    let channel = writ::cli::client::connect_with(&writ.socket, small_window)
        .await
        .unwrap();
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = client
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap()
    })
    .await
    .expect("the message stalled at the client's flow-control window");
    let size = prost::Message::encoded_len(&first);
    assert!(size > 32 * 1024, "only {size} bytes");
    let der = &first.svids[0].x509_svid;
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let dns = san
        .value
        .general_names
        .iter()
        .filter(|n| matches!(n, x509_parser::extensions::GeneralName::DNSName(_)))
        .count();
    assert_eq!(dns, NAMES);
}
