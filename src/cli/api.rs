//! `writ api ...`: a Workload API client that works against writ or any other
//! SPIFFE Workload API server (SPIRE's agent included).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::client::{Api, StatusError, api_status_error, status_error, workload_client};
use crate::proto::workload as pb;

#[derive(Serialize)]
pub struct SvidSummary {
    pub spiffe_id: String,
    pub hint: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub chain_length: usize,
    pub bundle_authorities: usize,
}

/// Splits concatenated DER certificates.
pub fn split_der_certs(mut der: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) =
            X509Certificate::from_der(der).context("malformed certificate in response")?;
        let used = der.len() - rest.len();
        out.push(der[..used].to_vec());
        der = rest;
    }
    Ok(out)
}

fn rfc3339(t: x509_parser::time::ASN1Time) -> String {
    t.to_datetime()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

pub fn summarize(svid: &pb::X509svid) -> anyhow::Result<SvidSummary> {
    let chain = split_der_certs(&svid.x509_svid)?;
    let leaf = chain.first().context("SVID has no certificate")?;
    let (_, cert) = X509Certificate::from_der(leaf).context("malformed leaf certificate")?;
    Ok(SvidSummary {
        spiffe_id: svid.spiffe_id.clone(),
        hint: svid.hint.clone(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: rfc3339(cert.validity().not_before),
        not_after: rfc3339(cert.validity().not_after),
        chain_length: chain.len(),
        bundle_authorities: split_der_certs(&svid.bundle)?.len(),
    })
}

fn pem_certs(der_concat: &[u8]) -> anyhow::Result<String> {
    Ok(split_der_certs(der_concat)?
        .into_iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der)))
        .collect())
}

/// Puts `contents` at `path` as a new file of `mode`: written to a fresh
/// file beside it, then renamed over whatever `path` was. Opening `path`
/// itself would keep the mode of a file already there (a key left world-
/// readable), follow a symlink planted there to wherever it points, or hang
/// on a named pipe; and a reader of the files (a sidecar, a reloading
/// server) would see a half-written one.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let fresh = fresh_name_beside(path);
    let written = (|| -> std::io::Result<()> {
        // create_new: never a file (or symlink) already at that name.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&fresh)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&fresh, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&fresh);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// A name in `path`'s directory no other writer picks: `.<file>.<pid>.<n>.tmp`.
fn fresh_name_beside(path: &Path) -> std::path::PathBuf {
    static WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{file}.{}.{n}.tmp", std::process::id()))
}

/// Writes `svid.N.pem` (chain), `svid.N.key` (0600) and `bundle.N.pem`.
pub fn write_svids(dir: &Path, response: &pb::X509svidResponse) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, svid) in response.svids.iter().enumerate() {
        write_file(
            &dir.join(format!("svid.{i}.pem")),
            pem_certs(&svid.x509_svid)?.as_bytes(),
            0o644,
        )?;
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", svid.x509_svid_key.clone()));
        write_file(&dir.join(format!("svid.{i}.key")), key.as_bytes(), 0o600)?;
        write_file(
            &dir.join(format!("bundle.{i}.pem")),
            pem_certs(&svid.bundle)?.as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

pub async fn fetch_x509(socket: &Path, write: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut client = workload_client(socket).await?;
    let mut stream = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .map_err(|s| api_status_error(Api::Workload, socket, "FetchX509SVID", s))?
        .into_inner();
    let response = stream
        .message()
        .await
        .map_err(|s| api_status_error(Api::Workload, socket, "FetchX509SVID", s))?
        .context("stream ended before the first response")?;
    let elapsed = started.elapsed();
    if let Some(dir) = write {
        write_svids(dir, &response)?;
    }
    let summaries = response
        .svids
        .iter()
        .map(summarize)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&summaries)?);
    } else {
        outln!(
            "Received {} svid(s) after {:.3}ms",
            summaries.len(),
            elapsed.as_secs_f64() * 1e3
        );
        for s in &summaries {
            print_summary(s)?;
        }
        if let Some(dir) = write {
            outln!("\nWrote SVIDs, keys and bundles to {}", dir.display());
        }
    }
    Ok(())
}

fn print_summary(s: &SvidSummary) -> anyhow::Result<()> {
    outln!();
    outln!("SPIFFE ID:        {}", s.spiffe_id);
    if !s.hint.is_empty() {
        outln!("Hint:             {}", s.hint);
    }
    outln!("Serial:           {}", s.serial);
    outln!("SVID Valid After: {}", s.not_before);
    outln!("SVID Valid Until: {}", s.not_after);
    outln!("Chain length:     {}", s.chain_length);
    outln!("Bundle CAs:       {}", s.bundle_authorities);
    Ok(())
}

/// Prints every update of the X.509-SVID stream until it ends or Ctrl-C.
pub async fn watch(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut client = workload_client(socket).await?;
    let mut stream = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .map_err(|s| api_status_error(Api::Workload, socket, "FetchX509SVID", s))?
        .into_inner();
    let mut updates = 0u64;
    loop {
        let message = tokio::select! {
            m = stream.message() => m.map_err(|s| api_status_error(Api::Workload, socket, "FetchX509SVID stream", s))?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(response) = message else {
            if updates == 0 {
                bail!("stream ended before the first response");
            }
            // Not on stdout with --output json, where every line is an
            // update; on stderr as a warning object, so that stderr is all
            // JSON too. Not a failure (`failure_json`): the watch saw
            // every update writ sent and exits 0, as it does in text.
            if json {
                super::warn(super::Output::Json, "stream ended by the server");
            } else {
                outln!("stream ended by the server");
            }
            return Ok(());
        };
        updates += 1;
        let summaries = response
            .svids
            .iter()
            .map(summarize)
            .collect::<anyhow::Result<Vec<_>>>()?;
        if json {
            outln!("{}", serde_json::to_string(&summaries)?);
        } else {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            outln!(
                "[{now}] update {updates}: {} svid(s), {} crl(s)",
                summaries.len(),
                response.crl.len()
            );
            for s in &summaries {
                outln!(
                    "  {} serial {} valid until {}",
                    s.spiffe_id,
                    s.serial,
                    s.not_after
                );
            }
        }
    }
}

/// gRPC health check on the socket; Ok only when the server says SERVING
/// within `deadline`. With `json`, what it prints is one object naming the
/// socket and the status.
pub async fn healthcheck(
    socket: &Path,
    deadline: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    let check = async {
        let channel = super::client::connect_to(Api::Workload, socket).await?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        anyhow::Ok(
            client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|s| status_error("grpc.health.v1.Health/Check", s))?
                .into_inner(),
        )
    };
    let response = tokio::time::timeout(deadline, check)
        .await
        .with_context(|| {
            format!(
                "writ at {} did not answer within {}",
                socket.display(),
                crate::config::format_duration(deadline)
            )
        })??;
    use tonic_health::pb::health_check_response::ServingStatus;
    if response.status != ServingStatus::Serving as i32 {
        return Err(NotServing {
            socket: socket.display().to_string(),
            status: response.status,
        }
        .into());
    }
    if json {
        let status = serde_json::json!({
            // Display, not Serialize: a path that is not UTF-8 would fail
            // to serialize (and json! would panic on it).
            "socket": socket.display().to_string(),
            "serving": true,
            "status": ServingStatus::Serving.as_str_name(),
        });
        outln!("{status}");
    } else {
        outln!("writ at {} is serving", socket.display());
    }
    Ok(())
}

/// A health check that writ answered with a status other than SERVING.
/// A type of its own so that `failure_json` can give a script the status
/// as members (`"serving": false, "status": "NOT_SERVING"`) instead of
/// leaving it to parse the message.
#[derive(Debug, thiserror::Error)]
#[error("writ at {socket} is not serving ({})", self.status_text())]
pub struct NotServing {
    /// The socket, as messages show it.
    pub socket: String,
    /// The `grpc.health.v1` ServingStatus number writ answered.
    pub status: i32,
}

impl NotServing {
    /// The status as the health protocol names it (NOT_SERVING,
    /// SERVICE_UNKNOWN, UNKNOWN); a number the protocol has no name for
    /// (a newer server's) as its digits.
    pub fn status_name(&self) -> String {
        self.protocol_name()
            .map_or_else(|| self.status.to_string(), str::to_owned)
    }

    /// As `status_name`, a number without a name said to be a status.
    fn status_text(&self) -> String {
        self.protocol_name()
            .map_or_else(|| format!("status {}", self.status), str::to_owned)
    }

    fn protocol_name(&self) -> Option<&'static str> {
        tonic_health::pb::health_check_response::ServingStatus::try_from(self.status)
            .ok()
            .map(|status| status.as_str_name())
    }
}

/// `writ healthcheck --http ADDR`: exit 0 when `GET /ready` answers 200
/// within `deadline`. Plain HTTP/1.1 over loopback, so a hand-written
/// request is enough. With `json`, what it prints is one object naming
/// the listener and the status.
pub async fn http_healthcheck(
    addr: &str,
    deadline: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = addr
        .strip_prefix("http://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    if authority.contains('/') {
        bail!("--http takes an address such as 127.0.0.1:9600, not a URL with a path");
    }
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("connecting to {authority}"))?;
        stream
            .write_all(
                format!("GET /ready HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .with_context(|| format!("sending the request to {authority}"))?;
        let mut response = Vec::new();
        stream
            .take(64 * 1024)
            .read_to_end(&mut response)
            .await
            .context("reading the response")?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(deadline, exchange)
        .await
        .with_context(|| {
            format!(
                "{authority} did not answer within {}",
                crate::config::format_duration(deadline)
            )
        })??;
    let status = response
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .with_context(|| format!("{authority} did not answer with HTTP"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim())
        .unwrap_or_default();
    if status != "200" {
        bail!("writ at http://{authority} is not ready (HTTP {status}): {body}");
    }
    if json {
        let ready = serde_json::json!({
            "http": format!("http://{authority}"),
            "ready": true,
            "status": 200,
        });
        outln!("{ready}");
    } else {
        outln!("writ at http://{authority} is ready");
    }
    Ok(())
}

/// What `writ api fetch jwt --output json` prints per token.
#[derive(Serialize)]
pub struct JwtSvidSummary {
    pub spiffe_id: String,
    pub hint: String,
    pub svid: String,
    /// The payload as sent (not verified here: it came from the agent).
    pub claims: serde_json::Value,
}

/// The payload of a compact JWS, decoded without verification.
fn unverified_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(serde_json::Value::Null)
}

pub async fn fetch_jwt(
    socket: &Path,
    audience: Vec<String>,
    spiffe_id: String,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = workload_client(socket).await?;
    let response = client
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience,
            spiffe_id,
        })
        .await
        .map_err(|s| api_status_error(Api::Workload, socket, "FetchJWTSVID", s))?
        .into_inner();
    if json {
        let summaries: Vec<JwtSvidSummary> = response
            .svids
            .iter()
            .map(|s| JwtSvidSummary {
                spiffe_id: s.spiffe_id.clone(),
                hint: s.hint.clone(),
                svid: s.svid.clone(),
                claims: unverified_claims(&s.svid),
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&summaries)?);
    } else {
        for s in &response.svids {
            outln!("token({}):\n\t{}", s.spiffe_id, s.svid);
        }
    }
    Ok(())
}

/// Prints the first message of the JWT bundle stream.
pub async fn fetch_jwt_bundles(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut client = workload_client(socket).await?;
    let mut stream = client
        .fetch_jwt_bundles(pb::JwtBundlesRequest {})
        .await
        .map_err(|s| api_status_error(Api::Workload, socket, "FetchJWTBundles", s))?
        .into_inner();
    let response = stream
        .message()
        .await
        .map_err(|s| api_status_error(Api::Workload, socket, "FetchJWTBundles", s))?
        .context("stream ended before the first response")?;
    let mut bundles: Vec<(String, serde_json::Value)> = response
        .bundles
        .into_iter()
        .map(|(td, jwks)| {
            let jwks = serde_json::from_slice(&jwks)
                .with_context(|| format!("the JWKS for {td} is not JSON"))?;
            Ok((td, jwks))
        })
        .collect::<anyhow::Result<_>>()?;
    bundles.sort_by(|a, b| a.0.cmp(&b.0));
    if json {
        let map: serde_json::Map<String, serde_json::Value> = bundles.into_iter().collect();
        outln!("{}", serde_json::to_string_pretty(&map)?);
    } else {
        for (td, jwks) in &bundles {
            outln!("bundle({td}):\n\t{}", serde_json::to_string(jwks)?);
        }
    }
    Ok(())
}

pub async fn validate_jwt(
    socket: &Path,
    audience: String,
    svid: String,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = workload_client(socket).await?;
    let response = client
        .validate_jwtsvid(pb::ValidateJwtsvidRequest { audience, svid })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unimplemented => {
                api_status_error(Api::Workload, socket, "ValidateJWTSVID", status)
            }
            // The message already says what was wrong ("invalid JWT-SVID: ...").
            _ if !status.message().is_empty() => {
                StatusError::new(status.code(), status.message()).into()
            }
            _ => status_error("ValidateJWTSVID", status),
        })?
        .into_inner();
    let claims = response
        .claims
        .as_ref()
        .map(struct_to_json)
        .unwrap_or_default();
    if json {
        let out = serde_json::json!({ "spiffe_id": response.spiffe_id, "claims": claims });
        outln!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        outln!("SVID is valid.");
        outln!("SPIFFE ID : {}", response.spiffe_id);
        outln!("Claims    : {}", serde_json::to_string(&claims)?);
    }
    Ok(())
}

fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), proto_value_to_json(v)))
            .collect(),
    )
}

fn proto_value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => (*b).into(),
        // Whole numbers (NumericDates) print as integers, as they were sent.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => (*n as i64).into(),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::ListValue(l)) => l.values.iter().map(proto_value_to_json).collect(),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}
