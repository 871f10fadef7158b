//! Operational visibility: the metrics registry (`metrics`), readiness
//! (`Health`: a probe the service installs once it serves, asked afresh on
//! every `/ready`), and the plain-HTTP listener serving `/live`, `/ready`
//! and `/metrics`.

pub mod metrics;

pub use metrics::{Metrics, StreamGuard};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// A scraper or probe needs one or two connections; more is a misbehaving
/// client, and it must not take file descriptors from the Workload API.
const MAX_CONNECTIONS: usize = 16;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("binding the telemetry listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Checks the parts of a running agent that readiness depends on; each
/// problem found is one line of the 503 body.
pub trait ReadinessProbe: Send + Sync {
    fn problems(&self, now: SystemTime) -> BoxFuture<'_, Vec<String>>;
}

/// What `/ready` reports. Until the service installs its probe (once the
/// sockets are served) writ is starting; `stopping` turns readiness off
/// first thing on shutdown so load balancers stop sending work before the
/// sockets close.
#[derive(Default)]
pub struct Health {
    pub stopping: AtomicBool,
    probe: std::sync::OnceLock<Arc<dyn ReadinessProbe>>,
    /// The last reload's refusal, if it was refused (shown on `/ready`
    /// without affecting readiness: the old configuration keeps running).
    last_reload_error: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("serving", &self.probe.get().is_some())
            .field("stopping", &self.stopping.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Health {
    /// Marks the sockets as served; from now on `/ready` asks `probe`.
    pub fn serving(&self, probe: Arc<dyn ReadinessProbe>) {
        let _ = self.probe.set(probe);
    }

    /// The reasons writ is not ready, checked now; empty when it is.
    pub async fn not_ready(&self, now: SystemTime) -> Vec<String> {
        let mut reasons = match self.probe.get() {
            Some(probe) => probe.problems(now).await,
            None => vec!["starting: sockets not served yet".to_owned()],
        };
        if self.stopping.load(Ordering::SeqCst) {
            reasons.push("stopping".to_owned());
        }
        reasons
    }

    pub fn set_reload_outcome(&self, error: Option<String>) {
        *self
            .last_reload_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = error;
    }

    pub fn last_reload_error(&self) -> Option<String> {
        self.last_reload_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Brings the gauges that describe current state (tasks active, expiries,
/// bundle ages) up to date just before a scrape, so nothing has to poll.
pub type Refresh = Box<dyn Fn(&Metrics, SystemTime) + Send + Sync>;

struct State {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    refresh: Refresh,
}

/// The HTTP listener for health and metrics, bound but not yet serving.
pub struct TelemetryServer {
    listener: TcpListener,
    state: Arc<State>,
}

impl TelemetryServer {
    pub async fn bind(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        refresh: Refresh,
    ) -> Result<TelemetryServer, TelemetryError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        Ok(TelemetryServer {
            listener,
            state: Arc::new(State {
                metrics,
                health,
                refresh,
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "telemetry accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "telemetry listener at its connection limit");
                continue;
            };
            let state = self.state.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, &request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "telemetry connection failed"),
                    Err(_) => tracing::debug!(%peer, "telemetry connection timed out"),
                }
            });
        }
    }
}

async fn respond(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match request.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => {
            let reasons = state.health.not_ready(SystemTime::now()).await;
            let mut body = if reasons.is_empty() {
                "ready\n".to_owned()
            } else {
                // One reason a line: several can hold at once, and each
                // names what to look at.
                let mut body = "not ready:\n".to_owned();
                for reason in &reasons {
                    body.push_str(&format!("- {reason}\n"));
                }
                body
            };
            if let Some(error) = state.health.last_reload_error() {
                body.push_str(&format!("last reload refused: {error}\n"));
            }
            let status = if reasons.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, body)
        }
        "/metrics" => {
            (state.refresh)(&state.metrics, SystemTime::now());
            let mut response = Response::new(Full::new(Bytes::from(state.metrics.encode())));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<String>);

    impl ReadinessProbe for Fixed {
        fn problems(&self, _now: SystemTime) -> BoxFuture<'_, Vec<String>> {
            Box::pin(async move { self.0.clone() })
        }
    }

    #[tokio::test]
    async fn readiness_asks_the_probe_once_serving() {
        let health = Health::default();
        let now = SystemTime::now();
        assert_eq!(
            health.not_ready(now).await,
            ["starting: sockets not served yet"]
        );
        health.serving(Arc::new(Fixed(vec!["store not answering".into()])));
        assert_eq!(health.not_ready(now).await, ["store not answering"]);
        health.stopping.store(true, Ordering::SeqCst);
        assert_eq!(
            health.not_ready(now).await,
            ["store not answering", "stopping"]
        );

        let healthy = Health::default();
        healthy.serving(Arc::new(Fixed(Vec::new())));
        assert!(healthy.not_ready(now).await.is_empty());
    }
}
