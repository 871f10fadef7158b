//! The task process. It fetches its SVID with the `spiffe` crate like any
//! SPIFFE workload, calls the tool server over mutual TLS with it, and, once
//! writ has ended the task, presents the very same certificate again to show
//! that it is refused. Each step goes to the orchestrator as a JSON line.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use spiffe::{X509Source, X509Svid};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use writ::spiffe_id::{SpiffeId, TrustDomain};
use writ::tls::{SpiffeTls, TrustStore};

/// What a child tells its orchestrator, in order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildEvent {
    /// The default SVID the Workload API gave us.
    Identity { spiffe_id: String },
    /// A tool call with that SVID, while the task runs.
    FirstCall(CallOutcome),
    /// The same certificate and key, after writ revoked them; with how many
    /// earlier tries were still served while the new CRL was on its way.
    AfterRevocation {
        outcome: CallOutcome,
        served_before: u32,
        /// A request sent after the revocation on a connection opened while
        /// the task ran: the server checks the certificate again.
        on_held_connection: CallOutcome,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// The tool server accepted us and answered.
    Served(String),
    /// The tool server rejected our certificate during the TLS handshake.
    Refused(String),
    /// Anything else: no connection, a timeout, an error reply.
    Failed(String),
}

impl CallOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            CallOutcome::Served(_) => "served",
            CallOutcome::Refused(_) => "refused",
            CallOutcome::Failed(_) => "failed",
        }
    }
}

impl fmt::Display for CallOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallOutcome::Served(reply) => write!(f, "served: {reply}"),
            CallOutcome::Refused(why) => write!(f, "refused: {why}"),
            CallOutcome::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// How long the child waits for its orchestrator to end the task.
const TASK_END_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the tool server may take to learn of a revocation.
const CRL_PROPAGATION_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(
    tool_server: Option<SocketAddr>,
    tool_server_id: Option<String>,
    request: Option<String>,
) -> anyhow::Result<()> {
    let (Some(tool_server), Some(tool_server_id), Some(request)) =
        (tool_server, tool_server_id, request)
    else {
        bail!("--child needs --tool-server, --tool-server-id and --request");
    };
    let tool_server_id: SpiffeId = tool_server_id.parse().context("--tool-server-id")?;
    let task_spiffe_id = wait_for_go().await?;

    // Nothing writ-specific from here on: SPIFFE_ENDPOINT_SOCKET and the
    // standard Workload API. The default (first) SVID is the task's.
    let source = X509Source::new()
        .await
        .context("fetching an SVID from SPIFFE_ENDPOINT_SOCKET")?;
    let svid = source.svid()?;
    report(&ChildEvent::Identity {
        spiffe_id: svid.spiffe_id().to_string(),
    })?;
    if svid.spiffe_id().to_string() != task_spiffe_id {
        bail!(
            "expected the task identity {task_spiffe_id}, got {}",
            svid.spiffe_id()
        );
    }

    // We hold on to this certificate and key on purpose: after the task
    // ends we present them again, as a leaked credential would be.
    let tls = client_tls(&source, &svid)?;
    let server = ToolServer {
        tls,
        address: tool_server,
        spiffe_id: tool_server_id,
    };
    // Opened while the task runs, used only after it has ended (the
    // handshake is done before the first call is reported, and so before
    // the orchestrator ends the task).
    let held = tokio::time::timeout(CALL_TIMEOUT, server.connect()).await;
    report(&ChildEvent::FirstCall(server.call(&request).await))?;

    wait_until_task_svid_is_gone(&source, &task_spiffe_id).await?;
    // Revocation reaches the tool server on its own Workload API stream, so
    // it may still accept us for a moment after our own stream moved on.
    let deadline = tokio::time::Instant::now() + CRL_PROPAGATION_TIMEOUT;
    let mut served_before = 0;
    let outcome = loop {
        let outcome = server.call(&request).await;
        if matches!(outcome, CallOutcome::Refused(_)) || tokio::time::Instant::now() >= deadline {
            break outcome;
        }
        if matches!(outcome, CallOutcome::Served(_)) {
            served_before += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let on_held_connection = match held {
        Ok(Ok(stream)) => ToolServer::outcome(
            tokio::time::timeout(CALL_TIMEOUT, ToolServer::send(stream, &request)).await,
        ),
        Ok(Err(CallError::Refused(why))) => {
            CallOutcome::Failed(format!("refused while the task still ran: {why}"))
        }
        Ok(Err(CallError::Other(e))) => CallOutcome::Failed(format!("{e:#}")),
        Err(_) => CallOutcome::Failed("no connection in time".into()),
    };
    report(&ChildEvent::AfterRevocation {
        outcome,
        served_before,
        on_held_connection,
    })?;
    source.shutdown().await;
    Ok(())
}

/// Blocks until the orchestrator says `go <task SPIFFE ID>`: by then it has
/// put us into the task's binding.
async fn wait_for_go() -> anyhow::Result<String> {
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await??;
    match line.trim_end().split_once(' ') {
        Some(("go", task_spiffe_id)) => Ok(task_spiffe_id.to_owned()),
        // The orchestrator gave up on this task before it began.
        _ if line.is_empty() => bail!("stopped before the task began"),
        _ => bail!("expected `go <task SPIFFE ID>` on stdin, got {line:?}"),
    }
}

fn report(event: &ChildEvent) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(event)?);
    Ok(())
}

/// An mTLS client presenting `svid` and trusting our trust domain's bundle.
/// It needs no CRL: revocation is the server's check in this example.
fn client_tls(source: &X509Source, svid: &X509Svid) -> anyhow::Result<Arc<SpiffeTls>> {
    let tls = SpiffeTls::new();
    let chain = svid
        .cert_chain()
        .iter()
        .map(|cert| CertificateDer::from(cert.as_bytes().to_vec()))
        .collect();
    tls.set_identity(chain, svid.private_key().as_bytes())?;

    let domain = svid.spiffe_id().trust_domain();
    let bundle = source
        .bundle_set()?
        .get(domain)
        .with_context(|| format!("no bundle for {domain}"))?;
    let mut trust = TrustStore::default();
    trust.bundles.insert(
        TrustDomain::new(domain.as_str())?,
        bundle
            .authorities()
            .iter()
            .map(|cert| CertificateDer::from(cert.as_bytes().to_vec()))
            .collect(),
    );
    tls.set_trust(trust);
    Ok(tls)
}

/// Waits until the Workload API no longer gives us the task identity: writ
/// has ended the task and revoked its certificates.
async fn wait_until_task_svid_is_gone(
    source: &X509Source,
    task_spiffe_id: &str,
) -> anyhow::Result<()> {
    let mut updates = source.updated();
    let still_ours = || {
        source
            .svid()
            .is_ok_and(|svid| svid.spiffe_id().to_string() == task_spiffe_id)
    };
    tokio::time::timeout(TASK_END_TIMEOUT, async {
        while still_ours() {
            updates.changed().await?;
        }
        anyhow::Ok(())
    })
    .await
    .context("the task identity was still issued long after we were done")?
}

struct ToolServer {
    tls: Arc<SpiffeTls>,
    address: SocketAddr,
    spiffe_id: SpiffeId,
}

impl ToolServer {
    async fn call(&self, request: &str) -> CallOutcome {
        Self::outcome(tokio::time::timeout(CALL_TIMEOUT, self.exchange(request)).await)
    }

    fn outcome(
        exchanged: Result<Result<String, CallError>, tokio::time::error::Elapsed>,
    ) -> CallOutcome {
        match exchanged {
            Ok(Ok(reply)) if reply.starts_with("OK ") => CallOutcome::Served(reply),
            // The server took the request, then found the certificate revoked.
            Ok(Ok(reply)) if reply.starts_with("ERR refused") => CallOutcome::Refused(reply),
            Ok(Ok(reply)) => CallOutcome::Failed(reply),
            Ok(Err(CallError::Refused(why))) => CallOutcome::Refused(why),
            Ok(Err(CallError::Other(e))) => CallOutcome::Failed(format!("{e:#}")),
            Err(_) => CallOutcome::Failed("no answer in time".into()),
        }
    }

    async fn exchange(&self, request: &str) -> Result<String, CallError> {
        Self::send(self.connect().await?, request).await
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>, CallError> {
        let expected = self.spiffe_id.clone();
        let config = self
            .tls
            .client_config(Arc::new(move |id: &SpiffeId| *id == expected))
            .map_err(|e| CallError::Other(e.into()))?;
        let tcp = TcpStream::connect(self.address)
            .await
            .map_err(|e| CallError::Other(e.into()))?;
        // SPIFFE peers are named by the SPIFFE ID in their certificate, which
        // the verifier checks; the TLS server name is required but unused.
        let name =
            ServerName::try_from("tool-server.invalid").map_err(|e| CallError::Other(e.into()))?;
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(CallError::from_io)
    }

    async fn send(mut stream: TlsStream<TcpStream>, request: &str) -> Result<String, CallError> {
        stream
            .write_all(format!("CALL {request}\n").as_bytes())
            .await
            .map_err(CallError::from_io)?;
        // With TLS 1.3 the server judges our certificate after we think the
        // handshake is done, so a refusal arrives here, as an alert.
        let mut reply = String::new();
        BufReader::new(stream)
            .take(4096)
            .read_line(&mut reply)
            .await
            .map_err(CallError::from_io)?;
        if reply.is_empty() {
            return Err(CallError::Other(anyhow::anyhow!(
                "the tool server closed the connection without a reply"
            )));
        }
        Ok(reply.trim_end().to_owned())
    }
}

enum CallError {
    /// The tool server rejected us during the handshake and said so.
    Refused(String),
    Other(anyhow::Error),
}

impl CallError {
    fn from_io(e: std::io::Error) -> CallError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::AlertReceived(alert)) => {
                CallError::Refused(format!("the tool server sent TLS alert {alert:?}"))
            }
            _ => CallError::Other(e.into()),
        }
    }
}
