//! The gRPC health service as the health-checking protocol has it. It is
//! tonic-health's, except that Watch for a service writ does not serve
//! answers with SERVICE_UNKNOWN and stays open, as the protocol requires
//! (tonic-health ends it with NotFound, which clients that watch, such as
//! grpc-go's client-side health checking, take for a broken server).
//! Every watch ends when writ begins to stop, so that it does not hold the
//! shutdown to its drain deadline.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// The health service over `reporter`'s statuses, for both sockets; its
/// watches end once `stopping` turns true.
pub fn server(
    reporter: HealthReporter,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> HealthServer<ProtocolHealth> {
    HealthServer::new(ProtocolHealth {
        inner: HealthService::from_health_reporter(reporter),
        stopping,
    })
}

pub struct ProtocolHealth {
    inner: HealthService,
    stopping: tokio::sync::watch::Receiver<bool>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for ProtocolHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        match self.inner.watch(request).await {
            Ok(watching) => {
                Ok(watching.map(|stream| Box::pin(stream.take_until(stopped)) as WatchStream))
            }
            // Services are registered at start, so an unknown one stays
            // unknown: one message, then the call is held until the client
            // or writ's shutdown ends it.
            Err(status) if status.code() == Code::NotFound => {
                let unknown = HealthCheckResponse {
                    status: ServingStatus::ServiceUnknown as i32,
                };
                let stream = futures::stream::once(async move { Ok(unknown) })
                    .chain(futures::stream::pending())
                    .take_until(stopped);
                Ok(Response::new(Box::pin(stream) as WatchStream))
            }
            Err(status) => Err(status),
        }
    }
}
