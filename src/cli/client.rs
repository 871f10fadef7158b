//! Connecting to a gRPC server on a Unix socket, the way every SPIFFE client
//! does: `SPIFFE_ENDPOINT_SOCKET=unix:///abs/path` or an explicit path.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::workload_api::SECURITY_HEADER;

/// Accepts `unix:///abs/path`, `unix:/abs/path` or a plain absolute path.
/// A `unix:` URI is the path alone: the SPIFFE Workload Endpoint standard
/// forbids any other URI part, and quietly dropping a host, query or
/// fragment (or keeping it as part of the file name) would connect
/// somewhere the caller did not mean.
pub fn parse_socket_address(address: &str) -> anyhow::Result<PathBuf> {
    let path = if let Some(uri) = address.strip_prefix("unix:") {
        let path = match uri.strip_prefix("//") {
            Some(after_slashes) => {
                let (authority, path) =
                    after_slashes.split_at(after_slashes.find('/').unwrap_or(after_slashes.len()));
                if !authority.is_empty() {
                    bail!(
                        "socket address {address:?} names a host ({authority:?}); a unix URI names a path only: unix:///path"
                    );
                }
                path
            }
            None => uri,
        };
        // Whichever comes first starts the part ("#x?y" is a fragment).
        if let Some(at) = path.find(['?', '#']) {
            let part = if path[at..].starts_with('?') {
                "query"
            } else {
                "fragment"
            };
            bail!(
                "socket address {address:?} has a {part} ({:?}); a unix URI names a path only, with no query or fragment",
                &path[at + 1..]
            );
        }
        path
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
        assert!(parse_socket_address("a.sock").is_err());
        // A plain path is a file name, whatever characters it holds.
        assert_eq!(
            parse_socket_address("/run/a?b#c.sock").unwrap(),
            PathBuf::from("/run/a?b#c.sock")
        );
    }

    #[test]
    fn a_unix_uri_holds_nothing_but_its_path() {
        for (address, says) in [
            ("unix:///run/a.sock?x=1", "has a query (\"x=1\")"),
            ("unix:/run/a.sock?", "has a query"),
            ("unix:///run/a.sock#top", "has a fragment (\"top\")"),
            ("unix:///run/a.sock#x?y", "has a fragment"),
            (
                "unix://localhost/run/a.sock",
                "names a host (\"localhost\")",
            ),
            ("unix://relative", "names a host (\"relative\")"),
        ] {
            let err = parse_socket_address(address).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("socket address {address:?} {says}")),
                "{address}: {err}"
            );
        }
        assert!(
            parse_socket_address("unix:relative")
                .unwrap_err()
                .to_string()
                .contains("must name an absolute path")
        );
    }
}
