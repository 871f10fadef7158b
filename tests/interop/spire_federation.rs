//! Federation both ways with a real SPIRE deployment on loopback: a
//! spire-server (sqlite datastore) and a join-token spire-agent. Bundles are
//! bootstrapped by hand with `spire-server bundle show/set -format spiffe` and
//! `writ bundle show`, then refreshed from each other's https_spiffe bundle
//! endpoints; a SPIRE workload and a writ task complete mutual TLS, each
//! authorizing the other's SPIFFE ID; and a writ CA rotation reaches SPIRE
//! through writ's endpoint with no manual step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use writ::proto::admin as apb;
use writ::proto::workload as pb;
use writ::spiffe_id::TrustDomain;
use writ::tls::{SpiffeTls, TrustStore};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::common::{self, Writ};
use crate::peers;

const SPIRE_WORKLOAD: &str = "spiffe://spire.test/workload";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spire_cli(bin: &Path, args: &[&str], stdin: Option<&[u8]>) -> (bool, String, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn split_der(mut der: &[u8]) -> Vec<CertificateDer<'static>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der).unwrap();
        out.push(CertificateDer::from(der[..der.len() - rest.len()].to_vec()));
        der = rest;
    }
    out
}

async fn try_first_x509(socket: &Path) -> Result<pb::X509svidResponse, String> {
    let channel = writ::cli::client::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut request = tonic::Request::new(pb::X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client
        .fetch_x509svid(request)
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    stream
        .message()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "stream ended".to_string())
}

async fn first_x509(socket: &Path) -> pb::X509svidResponse {
    try_first_x509(socket).await.unwrap()
}

/// TLS material from a Workload API response: our SVID (the first) and
/// every bundle it carries, own and federated.
fn tls_from(response: &pb::X509svidResponse, own_td: &str) -> Arc<SpiffeTls> {
    let svid = &response.svids[0];
    let tls = SpiffeTls::new();
    tls.set_identity(split_der(&svid.x509_svid), &svid.x509_svid_key)
        .unwrap();
    let mut trust = TrustStore::default();
    trust
        .bundles
        .insert(TrustDomain::new(own_td).unwrap(), split_der(&svid.bundle));
    for (td, der) in &response.federated_bundles {
        trust
            .bundles
            .insert(TrustDomain::new(td).unwrap(), split_der(der));
    }
    tls.set_trust(trust);
    tls
}

struct Spire {
    dir: PathBuf,
    server_socket: PathBuf,
    agent_socket: PathBuf,
    _server: Proc,
    _agent: Option<Proc>,
}

fn start_spire_server(
    spire: &peers::Spire,
    dir: &Path,
    fed_port: u16,
    writ_endpoint_port: u16,
) -> Spire {
    let server_port = free_port();
    let server_socket = dir.join("server.sock");
    let config = format!(
        r#"
server {{
    bind_address = "127.0.0.1"
    bind_port = "{server_port}"
    socket_path = "{socket}"
    trust_domain = "spire.test"
    data_dir = "{dir}/server-data"
    log_level = "INFO"
    federation {{
        bundle_endpoint {{
            address = "127.0.0.1"
            port = {fed_port}
        }}
        federates_with "writ.test" {{
            bundle_endpoint_url = "https://127.0.0.1:{writ_endpoint_port}"
            bundle_endpoint_profile "https_spiffe" {{
                endpoint_spiffe_id = "spiffe://writ.test/writ/bundle-endpoint"
            }}
        }}
    }}
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{dir}/datastore.sqlite3"
        }}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
}}
"#,
        socket = server_socket.display(),
        dir = dir.display(),
    );
    std::fs::write(dir.join("server.conf"), config).unwrap();
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let server = Proc(
        Command::new(&spire.server)
            .args(["run", "-config"])
            .arg(dir.join("server.conf"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let socket = server_socket.to_str().unwrap().to_owned();
    common::wait_for(Duration::from_secs(60), "spire-server healthy", || {
        spire_cli(
            &spire.server,
            &["healthcheck", "-socketPath", &socket],
            None,
        )
        .0
        .then_some(())
    });
    Spire {
        dir: dir.to_owned(),
        agent_socket: dir.join("agent.sock"),
        server_socket,
        _server: server,
        _agent: None,
    }
    .with_server_port(server_port)
}

impl Spire {
    fn with_server_port(self, port: u16) -> Self {
        std::fs::write(self.dir.join("server.port"), port.to_string()).unwrap();
        self
    }

    fn server_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = args.to_vec();
        v.push("-socketPath");
        v.push(self.server_socket.to_str().unwrap());
        v
    }

    fn start_agent(&mut self, spire: &peers::Spire) {
        let (ok, out, err) = spire_cli(
            &spire.server,
            &self.server_args(&["token", "generate", "-ttl", "600"]),
            None,
        );
        assert!(ok, "token generate: {out}{err}");
        let token = out
            .lines()
            .find_map(|l| l.strip_prefix("Token: "))
            .unwrap_or_else(|| panic!("no token in {out:?}"))
            .trim()
            .to_owned();
        let port = std::fs::read_to_string(self.dir.join("server.port")).unwrap();
        let config = format!(
            r#"
agent {{
    data_dir = "{dir}/agent-data"
    log_level = "INFO"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{socket}"
    trust_domain = "spire.test"
    join_token = "{token}"
    insecure_bootstrap = true
}}
plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"#,
            dir = self.dir.display(),
            socket = self.agent_socket.display(),
        );
        std::fs::write(self.dir.join("agent.conf"), config).unwrap();
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        self._agent = Some(Proc(
            Command::new(&spire.agent)
                .args(["run", "-config"])
                .arg(self.dir.join("agent.conf"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        ));
        // The workload entry, parented to this agent, federating with writ.
        let parent = format!("spiffe://spire.test/spire/agent/join_token/{token}");
        let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
        let (ok, out, err) = spire_cli(
            &spire.server,
            &self.server_args(&[
                "entry",
                "create",
                "-parentID",
                &parent,
                "-spiffeID",
                SPIRE_WORKLOAD,
                "-selector",
                &uid,
                "-federatesWith",
                "spiffe://writ.test",
            ]),
            None,
        );
        assert!(ok, "entry create: {out}{err}");
    }
}

#[test]
fn federates_both_ways_with_a_real_spire_server_and_agent() {
    let Some(spire_bins) = peers::spire() else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("writ-spire-")
        .tempdir()
        .unwrap();
    let spire_fed_port = free_port();
    let writ_endpoint_port = free_port();
    let mut spire = start_spire_server(spire_bins, dir.path(), spire_fed_port, writ_endpoint_port);

    // Bootstrap writ with SPIRE's bundle, by hand, as an operator would.
    let (ok, spire_bundle, err) = spire_cli(
        &spire_bins.server,
        &spire.server_args(&["bundle", "show", "-format", "spiffe"]),
        None,
    );
    assert!(ok, "bundle show: {err}");
    let bootstrap = dir.path().join("spire.test.json");
    std::fs::write(&bootstrap, &spire_bundle).unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    let writ = Writ::start(&format!(
        r#"
[ca]
ca_ttl = "180s"
x509_svid_ttl = "5s"
jwt_svid_ttl = "5s"

[tasks]
x509_svid_ttl = "60s"

[federation]
min_refresh_interval = "1s"

[federation.bundle_endpoint]
listen = "127.0.0.1:{writ_endpoint_port}"
refresh_hint = "5s"

[[federation.trust_domain]]
name = "spire.test"
url = "https://127.0.0.1:{spire_fed_port}"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://spire.test/spire/server"
bundle = "{bootstrap}"

[[entry]]
spiffe_id = "spiffe://writ.test/orchestrator"
selectors = ["unix:uid:{uid}"]
federates_with = ["spire.test"]
"#,
        bootstrap = bootstrap.display()
    ));
    // And SPIRE with writ's bundle.
    let admin = writ.dir.path().join("run/admin.sock");
    let (ok, writ_bundle, err) = common::writ_cli(
        &[
            "bundle",
            "show",
            "--format",
            "spiffe",
            "--admin-socket",
            admin.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let (ok, out, err) = spire_cli(
        &spire_bins.server,
        &spire.server_args(&[
            "bundle",
            "set",
            "-format",
            "spiffe",
            "-id",
            "spiffe://writ.test",
        ]),
        Some(writ_bundle.as_bytes()),
    );
    assert!(ok, "bundle set: {out}{err}");
    spire.start_agent(spire_bins);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // writ refreshed SPIRE's bundle from SPIRE's endpoint (https_spiffe).
        common::wait_for(
            Duration::from_secs(30),
            "writ fetched SPIRE's bundle",
            || {
                let (ok, out, _) = common::writ_cli(
                    &[
                        "bundle",
                        "list",
                        "--output",
                        "json",
                        "--admin-socket",
                        admin.to_str().unwrap(),
                    ],
                    None,
                );
                (ok && out.contains("\"fetched\"")).then_some(())
            },
        );

        // A writ task bound to this very process: its first SVID is the task's.
        let channel = writ::cli::client::connect(&admin).await.unwrap();
        let task = apb::tasks_client::TasksClient::new(channel)
            .begin_task(apb::BeginTaskRequest {
                task_id: "federated".into(),
                binding: Some(apb::Binding {
                    target: Some(apb::binding::Target::Pid(std::process::id() as i32)),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();

        // The SPIRE workload, through the real spire-agent.
        let agent_socket = spire.agent_socket.clone();
        let spire_side = {
            let started = Instant::now();
            loop {
                if agent_socket.exists() {
                    let r =
                        tokio::time::timeout(Duration::from_secs(5), try_first_x509(&agent_socket))
                            .await;
                    if let Ok(Ok(r)) = r
                        && r.federated_bundles.contains_key("spiffe://writ.test")
                    {
                        break r;
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "SPIRE agent never served the federated workload:\nagent:\n{}\nserver:\n{}",
                    common::read_to_string(&spire.dir.join("agent.log")),
                    common::read_to_string(&spire.dir.join("server.log"))
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        assert_eq!(spire_side.svids[0].spiffe_id, SPIRE_WORKLOAD);
        // Fetched now, right before the handshake, so it is fresh.
        let writ_side = first_x509(&writ.socket).await;
        assert_eq!(writ_side.svids[0].spiffe_id, task.spiffe_id);
        assert!(
            writ_side
                .federated_bundles
                .contains_key("spiffe://spire.test"),
            "writ did not deliver SPIRE's bundle"
        );

        // Mutual TLS: the SPIRE workload serves, the writ task calls; each
        // trusts the other only through the bundle its own agent federated.
        let task_id = task.spiffe_id.clone();
        let server_tls = tls_from(&spire_side, "spire.test");
        let server_config = server_tls
            .server_config(Arc::new(move |id| id.to_string() == task_id))
            .unwrap();
        let client_tls = tls_from(&writ_side, "writ.test");
        let client_config = client_tls
            .client_config(Arc::new(|id| id.to_string() == SPIRE_WORKLOAD))
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let stream = acceptor.accept(tcp).await.unwrap();
            let peer = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
            writ::tls::spiffe_id_of(&peer).unwrap().to_string()
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(client_config))
            .connect(ServerName::try_from("spire.invalid").unwrap(), tcp)
            .await
            .expect("mTLS between a writ task and a SPIRE workload");
        let seen_by_client =
            writ::tls::spiffe_id_of(&stream.get_ref().1.peer_certificates().unwrap()[0]).unwrap();
        assert_eq!(seen_by_client.to_string(), SPIRE_WORKLOAD);
        assert_eq!(server.await.unwrap(), task.spiffe_id);

        // writ's CA rotates: with ca_ttl 180s the next root is published at
        // 90 s and signs from 150 s. SPIRE polls every 15 s at best (it
        // clamps refresh hints to a minute and tries four times per hint),
        // so it learns the new root from writ's endpoint inside that window,
        // with no manual step.
        let initial: Vec<Vec<u8>> = split_der(&writ_side.svids[0].bundle)
            .iter()
            .map(|c| c.to_vec())
            .collect();
        let started = Instant::now();
        loop {
            let (ok, out, _) = spire_cli(
                &spire_bins.server,
                &spire.server_args(&[
                    "bundle",
                    "list",
                    "-format",
                    "spiffe",
                    "-id",
                    "spiffe://writ.test",
                ]),
                None,
            );
            if ok {
                let td = TrustDomain::new("writ.test").unwrap();
                if let Ok(doc) =
                    writ::bundle::TrustBundle::from_spiffe_json(td, out.trim().as_bytes())
                    && doc
                        .x509_authorities
                        .iter()
                        .any(|c| !initial.contains(&c.to_vec()))
                {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(200),
                "writ's new root never reached SPIRE: {}",
                common::read_to_string(&dir.path().join("server.log"))
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
