//! `writ api ...`: a Workload API client that works against writ or any other
//! SPIFFE Workload API server (SPIRE's agent included).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::client::workload_client;
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

fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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
        .context("FetchX509SVID")?
        .into_inner();
    let response = stream
        .message()
        .await
        .context("FetchX509SVID")?
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
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    } else {
        println!(
            "Received {} svid(s) after {:.3}ms",
            summaries.len(),
            elapsed.as_secs_f64() * 1e3
        );
        for s in &summaries {
            print_summary(s);
        }
        if let Some(dir) = write {
            println!("\nWrote SVIDs, keys and bundles to {}", dir.display());
        }
    }
    Ok(())
}

fn print_summary(s: &SvidSummary) {
    println!();
    println!("SPIFFE ID:        {}", s.spiffe_id);
    if !s.hint.is_empty() {
        println!("Hint:             {}", s.hint);
    }
    println!("Serial:           {}", s.serial);
    println!("SVID Valid After: {}", s.not_before);
    println!("SVID Valid Until: {}", s.not_after);
    println!("Chain length:     {}", s.chain_length);
    println!("Bundle CAs:       {}", s.bundle_authorities);
}

/// Prints every update of the X.509-SVID stream until it ends or Ctrl-C.
pub async fn watch(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut client = workload_client(socket).await?;
    let mut stream = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .context("FetchX509SVID")?
        .into_inner();
    let mut updates = 0u64;
    loop {
        let message = tokio::select! {
            m = stream.message() => m.context("FetchX509SVID stream")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(response) = message else {
            if updates == 0 {
                bail!("stream ended before the first response");
            }
            println!("stream ended by the server");
            return Ok(());
        };
        updates += 1;
        let summaries = response
            .svids
            .iter()
            .map(summarize)
            .collect::<anyhow::Result<Vec<_>>>()?;
        if json {
            println!("{}", serde_json::to_string(&summaries)?);
        } else {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            println!(
                "[{now}] update {updates}: {} svid(s), {} crl(s)",
                summaries.len(),
                response.crl.len()
            );
            for s in &summaries {
                println!(
                    "  {} serial {} valid until {}",
                    s.spiffe_id, s.serial, s.not_after
                );
            }
        }
    }
}

/// gRPC health check on the socket; Ok only when the server says SERVING.
pub async fn healthcheck(socket: &Path) -> anyhow::Result<()> {
    let channel = super::client::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .context("grpc.health.v1.Health/Check")?
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    if response.status != serving {
        bail!(
            "writ at {} is not serving (status {})",
            socket.display(),
            response.status
        );
    }
    println!("writ at {} is serving", socket.display());
    Ok(())
}
