//! `lineguard.bus.v1.Consumers`: what a service's consumers hold back, for
//! operators. Lists parked events and dead letters (with counts), and sends
//! a dead letter back through its consumer. Served by every service beside
//! its `EventLog`.

use lineguard_eventlog::{
    ActorKind, EventEnvelope, EventLog, ExpectedVersion, NewEvent, Transaction, actor, blocking,
};
use lineguard_protos::bus::v1::consumers_server::{Consumers, ConsumersServer};
use lineguard_protos::bus::v1::{
    ConsumerStatus, DeadLetterEntry, DeadLetterRetried, EventDeadLettered, EventParked,
    ListConsumersRequest, ListConsumersResponse, ListDeadLettersRequest, ListDeadLettersResponse,
    ListParkedRequest, ListParkedResponse, ParkedEntry, RetryDeadLetterRequest,
    RetryDeadLetterResponse,
};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::parking::{
    ParkingLot, consumer_stream, count_prefix, dead_key, dead_prefix, decode_count, parked_prefix,
    retry_key,
};

/// Most entries one list returns.
pub const MAX_PAGE: u32 = 1_000;
/// Entries listed when the request does not say.
pub const DEFAULT_PAGE: u32 = 100;

/// Serves the consumers' parked events and dead letters of one log.
#[derive(Clone)]
pub struct ConsumersService {
    log: EventLog,
    lot: ParkingLot,
    /// Where `ListConsumers` asks JetStream for each consumer's lag.
    jetstream: Option<async_nats::jetstream::Context>,
    consumers: Vec<WatchedConsumer>,
}

/// One running consumer, as `ListConsumers` reports on it.
#[derive(Debug, Clone)]
pub struct WatchedConsumer {
    /// Its durable name.
    pub name: String,
    /// The stream it reads.
    pub stream: String,
    /// Turns `true` once it has caught up since the start
    /// ([`crate::ConsumerHandle::caught_up`]).
    pub caught_up: tokio::sync::watch::Receiver<bool>,
}

/// Longest wait for JetStream's answer about one consumer: `ticketctl
/// status` must answer while NATS is away, saying so.
const CONSUMER_INFO_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl ConsumersService {
    /// The service over `log`, waking its consumers through `lot`.
    pub fn new(log: EventLog, lot: ParkingLot) -> Self {
        ConsumersService {
            log,
            lot,
            jetstream: None,
            consumers: Vec::new(),
        }
    }

    /// Reports on `consumers` in `ListConsumers`, asking `jetstream` for
    /// their lag.
    pub fn with_consumers(
        mut self,
        jetstream: async_nats::jetstream::Context,
        consumers: Vec<WatchedConsumer>,
    ) -> Self {
        self.jetstream = Some(jetstream);
        self.consumers = consumers;
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> ConsumersServer<ConsumersService> {
        ConsumersServer::new(self)
    }

    /// The tonic server over `log`, waking its consumers through `lot`.
    pub fn server(log: EventLog, lot: ParkingLot) -> ConsumersServer<ConsumersService> {
        ConsumersServer::new(ConsumersService::new(log, lot))
    }

    /// Each consumer as `ListConsumers` reports it (and the metrics
    /// endpoint at each scrape): its lag on JetStream, whether it has
    /// caught up, and its parked and dead-lettered events recounted from
    /// the log.
    pub async fn statuses(&self) -> Result<Vec<ConsumerStatus>, Status> {
        let log = self.log.clone();
        let names: Vec<String> = self.consumers.iter().map(|c| c.name.clone()).collect();
        let counts = blocking(move || {
            names
                .iter()
                .map(|name| Ok((total(&log, "parked", name)?, total(&log, "dead", name)?)))
                .collect::<Result<Vec<(u64, u64)>, lineguard_eventlog::Error>>()
        })
        .await?;
        let lags = futures::future::join_all(self.consumers.iter().map(|c| self.lag(c))).await;
        let consumers = self
            .consumers
            .iter()
            .zip(counts)
            .zip(lags)
            .map(|((consumer, (parked, dead_letters)), lag)| {
                let (pending, ack_pending, bus_error) = match lag {
                    Ok((pending, ack_pending)) => (pending, ack_pending, String::new()),
                    Err(why) => (0, 0, why),
                };
                ConsumerStatus {
                    consumer: consumer.name.clone(),
                    stream: consumer.stream.clone(),
                    pending,
                    ack_pending,
                    caught_up: *consumer.caught_up.borrow(),
                    parked,
                    dead_letters,
                    bus_error,
                }
            })
            .collect();
        Ok(consumers)
    }

    /// JetStream's pending and unacknowledged counts of `consumer`, or why
    /// it could not say.
    async fn lag(&self, consumer: &WatchedConsumer) -> Result<(u64, u64), String> {
        let jetstream = self
            .jetstream
            .as_ref()
            .ok_or_else(|| "no bus connection".to_string())?;
        let asked = async {
            let stream = jetstream
                .get_stream_no_info(&consumer.stream)
                .await
                .map_err(|e| e.to_string())?;
            stream
                .consumer_info(&consumer.name)
                .await
                .map_err(|e| e.to_string())
        };
        let info = tokio::time::timeout(CONSUMER_INFO_WAIT, asked)
            .await
            .map_err(|_| format!("JetStream did not answer within {CONSUMER_INFO_WAIT:?}"))??;
        Ok((info.num_pending, info.num_ack_pending as u64))
    }
}

fn check_consumer(consumer: &str, required: bool) -> Result<(), Status> {
    if consumer.is_empty() {
        return if required {
            Err(Status::invalid_argument("invalid consumer: required"))
        } else {
            Ok(())
        };
    }
    if consumer.len() > 128
        || !consumer
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Status::invalid_argument(
            "invalid consumer: at most 128 characters of [A-Za-z0-9_-]",
        ));
    }
    Ok(())
}

fn page_size(requested: u32) -> Result<usize, Status> {
    match requested {
        0 => Ok(DEFAULT_PAGE as usize),
        n if n <= MAX_PAGE => Ok(n as usize),
        n => Err(Status::invalid_argument(format!(
            "invalid page_size: {n} is over the limit of {MAX_PAGE}"
        ))),
    }
}

/// The total of the counters of `what` (`parked`, `dead`) for `consumer`,
/// or for every consumer.
fn total(log: &EventLog, what: &str, consumer: &str) -> Result<u64, lineguard_eventlog::Error> {
    let prefix = count_prefix(what);
    if !consumer.is_empty() {
        let mut key = prefix;
        key.extend_from_slice(consumer.as_bytes());
        return Ok(log.projection_get(&key)?.map_or(0, |b| decode_count(&b)));
    }
    // One counter per consumer: a handful per service.
    Ok(log
        .projection_scan(&prefix, None, 10_000)?
        .iter()
        .map(|(_, v)| decode_count(v))
        .sum())
}

/// The event type and correlation id inside a kept envelope, if it decodes.
fn described(envelope: &[u8]) -> (String, String) {
    EventEnvelope::decode(envelope).map_or_else(
        |_| ("(undecodable)".to_string(), String::new()),
        |e| (e.event_type, e.correlation_id),
    )
}

#[tonic::async_trait]
impl Consumers for ConsumersService {
    async fn list_parked(
        &self,
        request: Request<ListParkedRequest>,
    ) -> Result<Response<ListParkedResponse>, Status> {
        let req = request.into_inner();
        check_consumer(&req.consumer, false)?;
        let page = page_size(req.page_size)?;
        let log = self.log.clone();
        let listed = blocking(move || {
            let total = total(&log, "parked", &req.consumer)?;
            let parked = log
                .projection_scan(&parked_prefix(&req.consumer), None, page)?
                .into_iter()
                .filter_map(|(_, v)| EventParked::decode(v.as_slice()).ok())
                .map(|p| {
                    let (event_type, correlation_id) = described(&p.envelope);
                    ParkedEntry {
                        consumer: p.consumer,
                        event_id: p.event_id,
                        event_type,
                        correlation_id,
                        waiting_for: p.waiting_for,
                        reason: p.reason,
                        parked_at: p.parked_at,
                    }
                })
                .collect();
            Ok::<_, lineguard_eventlog::Error>(ListParkedResponse { total, parked })
        })
        .await?;
        Ok(Response::new(listed))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let req = request.into_inner();
        check_consumer(&req.consumer, false)?;
        let page = page_size(req.page_size)?;
        let log = self.log.clone();
        let listed = blocking(move || {
            let total = total(&log, "dead", &req.consumer)?;
            let dead_letters = log
                .projection_scan(&dead_prefix(&req.consumer), None, page)?
                .into_iter()
                .filter_map(|(_, v)| EventDeadLettered::decode(v.as_slice()).ok())
                .map(|d| {
                    let (event_type, correlation_id) = described(&d.envelope);
                    DeadLetterEntry {
                        consumer: d.consumer,
                        event_id: d.event_id,
                        event_type,
                        correlation_id,
                        error: d.error,
                        subject: d.subject,
                        deliveries: d.deliveries,
                        dead_lettered_at: d.dead_lettered_at,
                    }
                })
                .collect();
            Ok::<_, lineguard_eventlog::Error>(ListDeadLettersResponse {
                total,
                dead_letters,
            })
        })
        .await?;
        Ok(Response::new(listed))
    }

    async fn retry_dead_letter(
        &self,
        request: Request<RetryDeadLetterRequest>,
    ) -> Result<Response<RetryDeadLetterResponse>, Status> {
        let req = request.into_inner();
        check_consumer(&req.consumer, true)?;
        if req.event_id.is_empty() || req.event_id.len() > 128 {
            return Err(Status::invalid_argument(
                "invalid event_id: required, at most 128 characters",
            ));
        }
        let dead = self
            .log
            .projection_get(&dead_key(&req.consumer, &req.event_id))
            .map_err(Status::from)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no dead letter {} of consumer {}",
                    req.event_id, req.consumer
                ))
            })?;
        let correlation = EventDeadLettered::decode(dead.as_slice())
            .ok()
            .map(|d| described(&d.envelope).1)
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| req.event_id.clone());
        let retried = DeadLetterRetried {
            consumer: req.consumer.clone(),
            event_id: req.event_id.clone(),
            requested_by: "operator".to_string(),
            retried_at: Some(lineguard_eventlog::clock::now()),
        };
        let record = NewEvent::new(&retried, correlation, actor(ActorKind::Person, "operator"))
            .unpublished();
        // A concurrent retry of the same letter: the second finds no dead
        // letter in the projector and the whole commit is refused.
        self.log
            .commit(Transaction::append(
                consumer_stream(&req.consumer),
                ExpectedVersion::Any,
                vec![record],
            ))
            .await
            .map_err(Status::from)?;
        tracing::info!(consumer = %req.consumer, event_id = %req.event_id, "dead letter sent back to its consumer");
        self.lot.wake(vec![retry_key(&req.event_id)]);
        Ok(Response::new(RetryDeadLetterResponse { requeued: true }))
    }

    async fn list_consumers(
        &self,
        _request: Request<ListConsumersRequest>,
    ) -> Result<Response<ListConsumersResponse>, Status> {
        let consumers = self.statuses().await?;
        Ok(Response::new(ListConsumersResponse { consumers }))
    }
}
