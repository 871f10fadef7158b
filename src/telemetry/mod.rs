//! Operational visibility: the metrics registry (`metrics`), the readiness
//! facts the service records as it starts and stops (`Health`), and the
//! plain-HTTP listener serving `/live`, `/ready` and `/metrics`.

pub mod metrics;

pub use metrics::{Metrics, StreamGuard};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

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

/// What `/ready` checks. Each flag is set by the part of the service that
/// makes it true; `stopping` turns readiness off first thing on shutdown so
/// load balancers stop sending work before the sockets close.
#[derive(Debug, Default)]
pub struct Health {
    pub ca_loaded: AtomicBool,
    pub store_open: AtomicBool,
    pub audit_open: AtomicBool,
    pub sockets_served: AtomicBool,
    pub stopping: AtomicBool,
    /// The last reload's refusal, if it was refused (shown on `/ready`
    /// without affecting readiness: the old configuration keeps running).
    last_reload_error: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn set(flag: &AtomicBool) {
        flag.store(true, Ordering::SeqCst);
    }

    /// The reasons writ is not ready; empty when it is.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let checks = [
            (&self.ca_loaded, "CA not loaded"),
            (&self.store_open, "store not open"),
            (&self.audit_open, "audit trail not open"),
            (&self.sockets_served, "sockets not served yet"),
        ];
        let mut reasons: Vec<&'static str> = checks
            .iter()
            .filter(|(flag, _)| !flag.load(Ordering::SeqCst))
            .map(|(_, why)| *why)
            .collect();
        if self.stopping.load(Ordering::SeqCst) {
            reasons.push("stopping");
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
                    let response = respond(&state, &request);
                    async move { Ok::<_, Infallible>(response) }
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

fn respond(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match request.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => {
            let reasons = state.health.not_ready();
            let mut body = if reasons.is_empty() {
                "ready\n".to_owned()
            } else {
                format!("not ready: {}\n", reasons.join(", "))
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

    #[test]
    fn readiness_lists_what_is_missing() {
        let health = Health::default();
        assert_eq!(health.not_ready().len(), 4);
        Health::set(&health.ca_loaded);
        Health::set(&health.store_open);
        Health::set(&health.audit_open);
        assert_eq!(health.not_ready(), ["sockets not served yet"]);
        Health::set(&health.sockets_served);
        assert!(health.not_ready().is_empty());
        Health::set(&health.stopping);
        assert_eq!(health.not_ready(), ["stopping"]);
    }
}
