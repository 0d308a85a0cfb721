//! The `lineguard.eventlog.v1.EventLog` gRPC service over one [`EventLog`].

use std::pin::Pin;

use futures::{Stream, StreamExt};
use lineguard_protos::eventlog::v1::{
    self as pb, GetLogInfoRequest, GetLogInfoResponse, GetProjectionDigestRequest,
    ProjectionDigest, ReadAllRequest, ReadAllResponse, ReadCorrelationRequest,
    ReadCorrelationResponse, ReadStreamRequest, ReadStreamResponse, RebuildProjectionsRequest,
    RebuildProjectionsResponse, SubscribeRequest, SubscribeResponse,
    event_log_server::{EventLog as EventLogApi, EventLogServer},
};
use tonic::{Request, Response, Status};

use crate::log::{EventLog, ReadDirection};

/// Serves reads of one log.
#[derive(Debug, Clone)]
pub struct EventLogService {
    log: EventLog,
}

impl EventLogService {
    /// The tonic server for `log`.
    pub fn server(log: EventLog) -> EventLogServer<EventLogService> {
        EventLogServer::new(EventLogService { log })
    }
}

/// Runs `work` (RocksDB reads, a scan) on tokio's blocking pool, so a slow
/// read never holds one of the async runtime's few worker threads while
/// other calls wait for it. Every gRPC handler that reads more than a key
/// or two goes through here.
pub async fn blocking<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Status>
where
    T: Send + 'static,
    E: Into<Status> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(format!("read task failed: {e}")))?
        .map_err(Into::into)
}

#[tonic::async_trait]
impl EventLogApi for EventLogService {
    async fn read_stream(
        &self,
        request: Request<ReadStreamRequest>,
    ) -> Result<Response<ReadStreamResponse>, Status> {
        let req = request.into_inner();
        let direction = match pb::ReadDirection::try_from(req.direction) {
            Ok(pb::ReadDirection::Unspecified | pb::ReadDirection::Forward) => {
                ReadDirection::Forward
            }
            Ok(pb::ReadDirection::Backward) => ReadDirection::Backward,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "invalid direction: unknown value {}",
                    req.direction
                )));
            }
        };
        let log = self.log.clone();
        let slice = blocking(move || {
            log.read_stream(
                &req.stream_id,
                req.from_version,
                direction,
                req.max_count as usize,
            )
        })
        .await?;
        Ok(Response::new(ReadStreamResponse {
            events: slice.events,
            stream_version: slice.stream_version,
            next_version: slice.next_version.unwrap_or(0),
        }))
    }

    async fn read_all(
        &self,
        request: Request<ReadAllRequest>,
    ) -> Result<Response<ReadAllResponse>, Status> {
        let req = request.into_inner();
        let log = self.log.clone();
        let head = log.head();
        let events =
            blocking(move || log.read_all(req.from_position, req.max_count as usize)).await?;
        let next_position = events
            .last()
            .map_or(req.from_position.max(1), |e| e.global_position + 1);
        Ok(Response::new(ReadAllResponse {
            events,
            next_position,
            head_position: head,
        }))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let subscription = self.log.subscribe(request.into_inner().from_position)?;
        let stream = subscription.map(|item| {
            item.map(|event| SubscribeResponse { event: Some(event) })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_log_info(
        &self,
        _: Request<GetLogInfoRequest>,
    ) -> Result<Response<GetLogInfoResponse>, Status> {
        Ok(Response::new(GetLogInfoResponse {
            service: self.log.service().to_owned(),
            head_position: self.log.head(),
            outbox_backlog: self.log.outbox_backlog(),
        }))
    }

    async fn read_correlation(
        &self,
        request: Request<ReadCorrelationRequest>,
    ) -> Result<Response<ReadCorrelationResponse>, Status> {
        let req = request.into_inner();
        let log = self.log.clone();
        let (events, next) = blocking(move || {
            log.read_correlation(
                &req.correlation_id,
                req.from_position,
                req.max_count as usize,
            )
        })
        .await?;
        Ok(Response::new(ReadCorrelationResponse {
            events,
            next_position: next.unwrap_or(0),
        }))
    }

    async fn get_projection_digest(
        &self,
        _: Request<GetProjectionDigestRequest>,
    ) -> Result<Response<ProjectionDigest>, Status> {
        let log = self.log.clone();
        let head = log.head();
        let digest = blocking(move || log.projection_digest()).await?;
        Ok(Response::new(ProjectionDigest {
            service: self.log.service().to_owned(),
            digest,
            head_position: head,
        }))
    }

    async fn rebuild_projections(
        &self,
        _: Request<RebuildProjectionsRequest>,
    ) -> Result<Response<RebuildProjectionsResponse>, Status> {
        let rebuilt = self
            .log
            .rebuild_projections_checked()
            .await
            .map_err(Status::from)?;
        tracing::info!(service = %self.log.service(), replayed = rebuilt.events_replayed,
            same = rebuilt.digest_before == rebuilt.digest_after, "projections rebuilt from the log");
        Ok(Response::new(RebuildProjectionsResponse {
            service: self.log.service().to_owned(),
            digest_before: rebuilt.digest_before,
            digest_after: rebuilt.digest_after,
            events_replayed: rebuilt.events_replayed,
            head_position: self.log.head(),
        }))
    }
}
