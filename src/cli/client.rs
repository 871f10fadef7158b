//! Connecting to a gRPC server on a Unix socket, the way every SPIFFE client
//! does: `SPIFFE_ENDPOINT_SOCKET=unix:///abs/path` or an explicit path.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::workload_api::SECURITY_HEADER;

/// Accepts `unix:///abs/path`, `unix:/abs/path` or a plain absolute path.
pub fn parse_socket_address(address: &str) -> anyhow::Result<PathBuf> {
    let path = if let Some(rest) = address.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = address.strip_prefix("unix:") {
        rest
    } else if address.contains("://") {
        bail!("unsupported socket address {address:?}: only unix:// addresses are supported");
    } else {
        address
    };
    if !path.starts_with('/') {
        bail!("socket address {address:?} must name an absolute path");
    }
    Ok(PathBuf::from(path))
}

pub async fn connect(path: &Path) -> anyhow::Result<Channel> {
    connect_with(path, Endpoint::from_static("http://localhost")).await
}

/// `connect` with the caller's HTTP/2 settings (window sizes, timeouts).
/// The endpoint's URI is required by tonic but never used: the connector
/// ignores it.
pub async fn connect_with(path: &Path, endpoint: Endpoint) -> anyhow::Result<Channel> {
    let path = path.to_owned();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the socket: {}", root_cause(&e)))?;
    Ok(channel)
}

/// The innermost error: tonic's transport error shows its source and then
/// lists it again as its own, so printing the whole chain said
/// "No such file or directory (os error 2)" twice.
fn root_cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause
}

/// Adds the Workload API security header to every request.
#[derive(Clone, Copy)]
pub struct SecurityHeader;

impl tonic::service::Interceptor for SecurityHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(
            SECURITY_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        Ok(request)
    }
}

pub type WorkloadClient =
    crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
        tonic::service::interceptor::InterceptedService<Channel, SecurityHeader>,
    >;

pub async fn workload_client(path: &Path) -> anyhow::Result<WorkloadClient> {
    let channel = connect(path)
        .await
        .with_context(|| format!("Workload API at {}", path.display()))?;
    Ok(crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::with_interceptor(
        channel,
        SecurityHeader,
    ))
}

/// A gRPC call's refusal as the CLI prints it: the call, the status code's
/// name and writ's message (`BeginTask: InvalidArgument: ttl: ...`).
pub fn status_error(call: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{call}: {:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_is_reported_once_and_plainly() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect(&dir.path().join("absent.sock")).await.unwrap_err();
        let text = format!("{err:#}");
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
        assert!(text.starts_with("connecting to the socket: "), "{text}");
    }

    #[test]
    fn parses_socket_addresses() {
        assert_eq!(
            parse_socket_address("unix:///run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            parse_socket_address("unix:/run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            parse_socket_address("/run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert!(parse_socket_address("tcp://127.0.0.1:1").is_err());
        assert!(parse_socket_address("unix://relative").is_err());
        assert!(parse_socket_address("a.sock").is_err());
    }
}
