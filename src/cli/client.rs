//! Connecting to a gRPC server on a Unix socket, the way every SPIFFE client
//! does: `SPIFFE_ENDPOINT_SOCKET=unix:///abs/path` or an explicit path
//! (relative ones from the current directory).

use std::path::{Path, PathBuf};

use anyhow::bail;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::workload_api::SECURITY_HEADER;

/// Accepts `unix:///abs/path`, `unix:/abs/path` or a plain path. A `unix:`
/// URI is the absolute path alone: the SPIFFE Workload Endpoint standard
/// forbids a relative path and any other URI part, and quietly dropping a
/// host, query or fragment (or keeping it as part of the file name) would
/// connect somewhere the caller did not mean. A plain path is a file name
/// as a shell user types it, so a relative one (`run/workload.sock`) is
/// resolved against the current directory, and made absolute here so that
/// messages name the socket wherever they are read (unless that cannot be
/// done: see `plain_socket_path`).
pub fn parse_socket_address(address: &str) -> anyhow::Result<PathBuf> {
    let Some(uri) = address.strip_prefix("unix:") else {
        return plain_socket_path(address);
    };
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
    if !path.starts_with('/') {
        bail!("socket address {address:?} must name an absolute path");
    }
    Ok(PathBuf::from(path))
}

/// A socket address that is not a `unix:` URI: a file name, absolute or
/// relative to the current directory.
fn plain_socket_path(address: &str) -> anyhow::Result<PathBuf> {
    if address.is_empty() {
        bail!("the socket address is empty");
    }
    if address.contains("://") {
        bail!("unsupported socket address {address:?}: only unix:// addresses are supported");
    }
    let path = Path::new(address);
    if path.is_absolute() {
        // Kept exactly as named (`std::path::absolute` would tidy `//`
        // and `/./` away, changing the path messages quote).
        return Ok(path.to_owned());
    }
    // The kernel resolves a relative path itself, so it is kept as given
    // where the absolute one would not do: a current directory that cannot
    // be read (removed, say: `../x.sock` still names a socket), or one so
    // deep that the absolute path is longer than a socket address may be.
    match std::path::absolute(path) {
        Ok(absolute)
            if absolute.as_os_str().len() > MAX_SOCKET_PATH_BYTES
                && address.len() <= MAX_SOCKET_PATH_BYTES =>
        {
            Ok(path.to_owned())
        }
        Ok(absolute) => Ok(absolute),
        Err(_) => Ok(path.to_owned()),
    }
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes,
/// the last a NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;

pub async fn connect(path: &Path) -> anyhow::Result<Channel> {
    connect_with(path, Endpoint::from_static("http://localhost")).await
}

/// `connect` with the caller's HTTP/2 settings (window sizes, timeouts).
/// The endpoint's URI is required by tonic but never used: the connector
/// ignores it.
pub async fn connect_with(path: &Path, endpoint: Endpoint) -> anyhow::Result<Channel> {
    connect_with_io_error(path, endpoint)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the socket: {}", root_cause(&e)))
}

/// `connect_with`, keeping tonic's error so that the I/O error under it
/// can be told apart.
async fn connect_with_io_error(
    path: &Path,
    endpoint: Endpoint,
) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// Which of writ's APIs a CLI command talks to: it decides what the CLI
/// suggests when the socket is missing, refused or the wrong one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Workload,
    Admin,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Workload => "Workload API",
            Api::Admin => "admin API",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Api::Workload => "--socket",
            Api::Admin => "--admin-socket",
        }
    }

    fn variable(self) -> &'static str {
        match self {
            Api::Workload => "SPIFFE_ENDPOINT_SOCKET",
            Api::Admin => "WRIT_ADMIN_SOCKET",
        }
    }
}

/// `connect` for a CLI command: a failure names the API and the socket
/// and, for the failures people meet first (no writ there, not allowed
/// in), says what to do about it.
pub async fn connect_to(api: Api, path: &Path) -> anyhow::Result<Channel> {
    let tonic_error =
        match connect_with_io_error(path, Endpoint::from_static("http://localhost")).await {
            Ok(channel) => return Ok(channel),
            Err(e) => e,
        };
    let kind = io_error_kind(&tonic_error);
    let mut message = format!(
        "{} at {}: connecting to the socket: {}",
        api.name(),
        path.display(),
        root_cause(&tonic_error)
    );
    match kind {
        Some(std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            message.push_str(&format!(
                "; writ may not be running, or not with this socket: give the one its config names with {} or {} (the default paths depend on the user and on XDG_RUNTIME_DIR, so a service and a login shell may differ)",
                api.flag(),
                api.variable()
            ));
        }
        Some(std::io::ErrorKind::PermissionDenied) => {
            message.push_str(&format!("; {}", permission_hint(path)));
        }
        _ => {}
    }
    Err(anyhow::anyhow!(message))
}

/// Why a connection may be refused: a socket's mode and group decide who
/// may connect (writ makes its admin socket 0770), and every directory
/// above it must let the caller through.
fn permission_hint(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(meta) => {
            let owner = nix::unistd::User::from_uid(meta.uid().into())
                .ok()
                .flatten()
                .map_or_else(|| format!("uid {}", meta.uid()), |u| u.name);
            let group = nix::unistd::Group::from_gid(meta.gid().into())
                .ok()
                .flatten()
                .map_or_else(|| format!("gid {}", meta.gid()), |g| g.name);
            format!(
                "the socket is mode {:04o}, owned by {owner} and group {group}: run this as {owner} (writ's user) or as a member of group {group} (a group joined since logging in counts from the next login)",
                meta.mode() & 0o7777
            )
        }
        Err(_) => format!(
            "this user may not enter the directory holding the socket ({})",
            path.parent().unwrap_or(path).display()
        ),
    }
}

/// The kind of the I/O error under a transport error, if there is one.
fn io_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = c.source();
    }
    None
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
    let channel = connect_to(Api::Workload, path).await?;
    Ok(crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::with_interceptor(
        channel,
        SecurityHeader,
    ))
}

/// A gRPC call answered with an error status, as the CLI reports it: the
/// message people read, and the status code kept apart from it so that
/// `--output json` can give scripts the code without parsing the message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StatusError {
    pub code: tonic::Code,
    pub message: String,
}

impl StatusError {
    pub fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        StatusError {
            code,
            message: message.into(),
        }
    }
}

/// A gRPC call's refusal as the CLI prints it: the call, the status code's
/// name and writ's message (`BeginTask: InvalidArgument: ttl: ...`).
pub fn status_error(call: &str, status: tonic::Status) -> anyhow::Error {
    let code = status.code();
    if status.message().is_empty() {
        // "Unknown: " with nothing after it reads as if text were lost.
        return StatusError::new(
            code,
            format!("{call}: {code:?} (the server gave no reason)"),
        )
        .into();
    }
    StatusError::new(code, format!("{call}: {code:?}: {}", status.message())).into()
}

/// `status_error` for a call on `api` at `socket`. A server that does not
/// offer the call at all answers Unimplemented with no message, which
/// alone says nothing; the likely cause is the other writ socket, so the
/// message says that, naming the socket.
pub fn api_status_error(
    api: Api,
    socket: &Path,
    call: &str,
    status: tonic::Status,
) -> anyhow::Error {
    if status.code() != tonic::Code::Unimplemented {
        return status_error(call, status);
    }
    let likely = match api {
        Api::Workload => format!(
            "{} is not a Workload API socket (is it writ's admin socket?)",
            socket.display()
        ),
        Api::Admin => format!(
            "{} is not writ's admin API socket (is it the Workload API socket?)",
            socket.display()
        ),
    };
    let said = status.message();
    let message = if said.is_empty() {
        format!("{call}: Unimplemented: {likely}")
    } else {
        format!("{call}: Unimplemented: {said}; {likely}")
    };
    StatusError::new(status.code(), message).into()
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
        assert!(parse_socket_address("run/tcp://x").is_err());
        assert!(parse_socket_address("").is_err());
        // A plain path is a file name, whatever characters it holds.
        assert_eq!(
            parse_socket_address("/run/a?b#c.sock").unwrap(),
            PathBuf::from("/run/a?b#c.sock")
        );
    }

    #[test]
    fn a_relative_plain_path_is_resolved_against_the_current_directory() {
        let here = std::env::current_dir().unwrap();
        for (address, resolved) in [
            ("a.sock", "a.sock"),
            ("run/workload.sock", "run/workload.sock"),
            ("./run/workload.sock", "run/workload.sock"),
            ("../a.sock", "../a.sock"),
        ] {
            let path = parse_socket_address(address).unwrap();
            assert!(path.is_absolute(), "{address}: {}", path.display());
            assert_eq!(path, here.join(resolved), "{address}");
        }
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
        // Relative paths are for plain paths only: the standard requires a
        // unix URI's path to be absolute.
        for address in ["unix:relative", "unix:run/workload.sock", "unix:./a.sock"] {
            assert_eq!(
                parse_socket_address(address).unwrap_err().to_string(),
                format!("socket address {address:?} must name an absolute path")
            );
        }
    }
}
