//! The gRPC health service as the health-checking protocol has it. It is
//! tonic-health's, except that Watch for a service writ does not serve
//! answers with SERVICE_UNKNOWN and stays open, as the protocol requires
//! (tonic-health ends it with NotFound, which clients that watch, such as
//! grpc-go's client-side health checking, take for a broken server).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// The health service over `reporter`'s statuses, for both sockets.
pub fn server(reporter: HealthReporter) -> HealthServer<ProtocolHealth> {
    HealthServer::new(ProtocolHealth {
        inner: HealthService::from_health_reporter(reporter),
    })
}

pub struct ProtocolHealth {
    inner: HealthService,
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
        match self.inner.watch(request).await {
            Ok(watching) => Ok(watching.map(|stream| Box::pin(stream) as WatchStream)),
            // Services are registered at start, so an unknown one stays
            // unknown: one message, then the call is held until the client
            // or writ's shutdown ends it.
            Err(status) if status.code() == Code::NotFound => {
                let unknown = HealthCheckResponse {
                    status: ServingStatus::ServiceUnknown as i32,
                };
                let stream = futures::stream::once(async move { Ok(unknown) })
                    .chain(futures::stream::pending());
                Ok(Response::new(Box::pin(stream) as WatchStream))
            }
            Err(status) => Err(status),
        }
    }
}
