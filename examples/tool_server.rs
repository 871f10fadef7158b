//! A tool server that serves AI-agent *tasks* only: it accepts a caller over
//! mutual TLS when the caller's X.509-SVID names a task (its path ends in
//! `/task/<id>`, as writ names task identities) and has not been revoked,
//! and answers one request per connection. The certificate is checked
//! against the CRLs again when the request arrives, so a caller that
//! connected while its task ran is refused once the task has ended.
//!
//! Its own SVID, the trust bundle and writ's CRLs all come from one Workload
//! API stream, so a task ended at writ is refused here moments later.
//!
//! What it does not check: an X.509-SVID carries the task's identity, not
//! its intent, so any task may call any tool here (writ's policy judged the
//! intent before issuing; a JWT-SVID carries the task's tools, targets and
//! data class as claims for a server that wants them). Nor can a name tell
//! a task from a registration entry an operator named `.../task/x`; a
//! stricter server would also accept only the orchestrators it knows.
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/writ/workload.sock cargo run --example tool_server
//! ```
//!
//! Protocol, one line each way: `CALL <tool> <arguments>` gets `OK <answer>`
//! or `ERR <why>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use writ::cli::client::{parse_socket_address, workload_client};
use writ::proto::workload::{X509svidRequest, X509svidResponse};
use writ::spiffe_id::{SpiffeId, TrustDomain};
use writ::tls::{SpiffeTls, TrustStore, spiffe_id_of};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Longest request line we read; anything longer is cut off and refused.
const MAX_REQUEST_BYTES: u64 = 4096;
/// A caller that stalls during the handshake or its request is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(about = "Serves read-only tools to SPIFFE task identities over mTLS")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The Workload API to get our SVID, bundle and CRLs from.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    workload_socket: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // writ's TLS layer says whom it refused and why (the peer only gets a
    // TLS alert); its lines go with ours, on stdout.
    tracing_subscriber::fmt()
        .with_writer(std::io::stdout)
        .without_time()
        .with_target(false)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("writ::tls=info")),
        )
        .init();
    let socket = parse_socket_address(&args.workload_socket)?;

    // The spiffe crate's X509Source would hand us an SVID and bundles, but not
    // the CRLs writ sends, so we read the Workload API stream ourselves.
    let mut client = workload_client(&socket).await?;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .context("FetchX509SVID")?
        .into_inner();
    let first = stream
        .message()
        .await
        .context("FetchX509SVID")?
        .context("the Workload API closed the stream before sending an SVID")?;
    let tls = SpiffeTls::new();
    let own_id = apply_update(&tls, &first)?;
    tokio::spawn(follow_updates(tls.clone(), stream, args.workload_socket));

    // Authorization by SPIFFE ID alone: only task identities may call tools.
    // Revocation is checked before this, against the CRLs in `tls`.
    let config = tls.server_config(Arc::new(names_a_task))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(args.listen).await?;
    // The first line is what scripts (and the agent_runtime demo) wait for.
    println!("listening on {}", listener.local_addr()?);
    println!("serving as {own_id}");

    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                tokio::spawn(serve_connection(acceptor.clone(), tls.clone(), tcp, peer));
            }
            // Such as running out of file descriptors: back off, keep serving.
            Err(e) => {
                eprintln!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// writ names a task's identity `<orchestrator's ID>/task/<task id>`, and
/// a sub-task's below its parent's in the same way.
fn names_a_task(id: &SpiffeId) -> bool {
    let mut segments = id.path().rsplit('/');
    let task_id = segments.next().unwrap_or_default();
    segments.next() == Some("task") && !task_id.is_empty()
}

/// Replaces our identity and everything we trust with one Workload API
/// message. The message carries the full state, so nothing is merged: a CRL
/// or bundle that is no longer sent is no longer used.
fn apply_update(tls: &SpiffeTls, update: &X509svidResponse) -> anyhow::Result<SpiffeId> {
    // The first SVID is the default one, which is the one we present.
    let svid = update
        .svids
        .first()
        .context("the Workload API sent no SVID")?;
    let own_id: SpiffeId = svid
        .spiffe_id
        .parse()
        .context("the Workload API sent an invalid SPIFFE ID")?;
    tls.set_identity(split_certificates(&svid.x509_svid)?, &svid.x509_svid_key)?;

    let mut trust = TrustStore::default();
    trust.bundles.insert(
        own_id.trust_domain().clone(),
        split_certificates(&svid.bundle)?,
    );
    for (id, bundle) in &update.federated_bundles {
        let domain = TrustDomain::new(id.strip_prefix("spiffe://").unwrap_or(id))
            .with_context(|| format!("federated bundle for {id:?}"))?;
        trust.bundles.insert(domain, split_certificates(bundle)?);
    }
    trust.crls = update.crl.clone();
    tls.set_trust(trust);
    Ok(own_id)
}

/// Keeps `tls` current for as long as we run: rotations, bundle changes and,
/// above all, new CRLs when writ revokes a task's certificates.
async fn follow_updates(
    tls: Arc<SpiffeTls>,
    mut stream: tonic::Streaming<X509svidResponse>,
    workload_socket: String,
) {
    loop {
        match stream.message().await {
            Ok(Some(update)) => {
                match apply_update(&tls, &update) {
                    Ok(id) => println!(
                        "workload API update: serving as {id}, trusting {} CRL(s)",
                        update.crl.len()
                    ),
                    Err(e) => eprintln!("ignoring a bad Workload API update: {e:#}"),
                }
                continue;
            }
            Ok(None) => eprintln!("the Workload API closed the stream; reconnecting"),
            Err(e) => eprintln!("Workload API stream failed: {e}; reconnecting"),
        }
        // Until we reconnect, the last CRL we saw stays in force; a stricter
        // server would stop serving once its revocation data got old.
        stream = loop {
            match reconnect(&workload_socket).await {
                Ok(stream) => break stream,
                Err(e) => {
                    eprintln!("reconnecting to the Workload API: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
    }
}

async fn reconnect(workload_socket: &str) -> anyhow::Result<tonic::Streaming<X509svidResponse>> {
    let mut client = workload_client(&parse_socket_address(workload_socket)?).await?;
    Ok(client
        .fetch_x509svid(X509svidRequest {})
        .await?
        .into_inner())
}

/// One caller, one request. The handshake already verified the caller's
/// chain, checked the CRLs and authorized its SPIFFE ID; a failure there is
/// logged as a refusal and the connection dropped. The chain is checked
/// again once the request has arrived, against the CRLs of that moment.
async fn serve_connection(
    acceptor: TlsAcceptor,
    tls: Arc<SpiffeTls>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let mut tls_stream = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            println!("refused {peer}: {e}");
            return;
        }
        Err(_) => {
            println!("refused {peer}: handshake timed out");
            return;
        }
    };
    let chain: Vec<CertificateDer<'static>> = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let caller = match chain.first().map(|leaf| spiffe_id_of(leaf)) {
        Some(Ok(id)) => id,
        _ => {
            println!("refused {peer}: no client SVID after the handshake");
            return;
        }
    };

    let mut line = String::new();
    let mut request = BufReader::new(&mut tls_stream).take(MAX_REQUEST_BYTES);
    let reply = match tokio::time::timeout(IO_TIMEOUT, request.read_line(&mut line)).await {
        // A task may have ended since the handshake: its certificate is
        // then in the newest CRL.
        Ok(Ok(_)) => match still_valid(&tls, &chain) {
            Ok(()) => answer(line.trim_end()),
            Err(e) => format!("ERR refused: the certificate is no longer valid ({e})"),
        },
        Ok(Err(e)) => format!("ERR reading the request: {e}"),
        Err(_) => "ERR no request in time".to_string(),
    };
    println!("{caller} called {:?}: {reply}", line.trim_end());
    let _ = tls_stream.write_all(format!("{reply}\n").as_bytes()).await;
    let _ = tls_stream.shutdown().await;
}

/// The caller's chain against our trust and CRLs as they are now.
fn still_valid(tls: &SpiffeTls, chain: &[CertificateDer<'static>]) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| rustls::Error::General("no client certificate".into()))?;
    tls.verify_peer(
        leaf,
        intermediates,
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .map(|_| ())
}

/// The tools themselves: canned, read-only answers, since the point of the
/// example is who may ask, not what is answered.
fn answer(request: &str) -> String {
    let Some(call) = request.strip_prefix("CALL ") else {
        return "ERR expected `CALL <tool> <arguments>`".to_string();
    };
    let (tool, arguments) = call.split_once(' ').unwrap_or((call, ""));
    let result = match tool {
        "jira" => "3 open tickets: OPS-101 login fails, OPS-107 slow export, OPS-112 invoice typo",
        "wiki" => "2 incidents last week, both resolved within 30 minutes",
        "pager" => "on call: Alex Chen until Monday 09:00",
        _ => return format!("ERR unknown tool {tool:?}"),
    };
    format!("OK {tool}({arguments}): {result}")
}

/// The Workload API sends certificate chains and bundles as concatenated DER.
fn split_certificates(mut der: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut certificates = Vec::new();
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der)
            .map_err(|e| anyhow::anyhow!("malformed certificate from the Workload API: {e}"))?;
        certificates.push(CertificateDer::from(der[..der.len() - rest.len()].to_vec()));
        der = rest;
    }
    if certificates.is_empty() {
        bail!("the Workload API sent an empty certificate list");
    }
    Ok(certificates)
}
