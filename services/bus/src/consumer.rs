//! Durable pull consumers with effectively-once processing.
//!
//! For each message the consumer asks its [`Handler`] what to write, adds the
//! inbox mark `(consumer, event id)` to that transaction, commits it to the
//! service's own log in one batch, and only then acknowledges the message. A
//! redelivery (the ack was lost, the process died before acking, the event
//! was published twice) finds the mark and is acknowledged without being
//! applied again.
//!
//! Messages that have arrived together (up to a pull batch) are applied
//! together: in lanes the handler names ([`Handler::lane`]), one case's
//! events one after another in their order, different cases side by side,
//! so that their commits share one write of the log (its group commit)
//! instead of one fsync each. A handler that names no lanes has its events
//! applied one at a time, as they came. Before a group is applied, a gap
//! in the stream below it (messages the stream dropped unread) is caught up
//! from the source's log, so one source's events are applied in its order.
//!
//! Nothing delivered is ever dropped. JetStream is told never to give up on
//! a message (`max_deliver` -1); instead the consumer decides:
//!
//! - an event that arrived before what it depends on
//!   ([`HandlerError::Waiting`]) is **parked** in the consumer's own log
//!   and acknowledged; it is applied the moment an event satisfying what it
//!   waits for is applied by any consumer of the same log
//!   ([`Handler::satisfies`], [`ParkingLot`]), or at the next sweep;
//! - an event that fails for any other reason ([`HandlerError::Reject`], an
//!   envelope that does not decode, or [`HandlerError::Retry`] still
//!   failing after [`ConsumerConfig::dead_letter_after`] deliveries) is
//!   **dead-lettered** in the consumer's own log, with its error, and
//!   acknowledged; an operator lists and retries it (see [`crate::parking`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lineguard_eventlog::{
    ActorKind, AllFilter, CommitOutcome, Error as LogError, EventEnvelope, EventLog,
    ExpectedVersion, NewEvent, Transaction, actor,
};
use lineguard_protos::bus::v1::{EventDeadLettered, EventParked, ParkedEventApplied};
use prost::Message;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use tracing::Instrument;

use crate::catchup::{CATCH_UP_PAGE, SourceLogHandle, SourceState, type_names_of, wanted};
use crate::parking::{
    ParkingLot, consumer_stream, dead_key, parked_key, parked_prefix, waiting_prefix,
};
use crate::subjects::{event_subject, is_event_subject, stream_name};

/// What a handler decided to do with an event.
pub enum Handled {
    /// Commit these writes (the inbox mark is added).
    Commit(Transaction),
    /// Commit these writes while the second value is alive: typically the
    /// handler's lock, so that no other writer decides on the same thing
    /// between this decision and its commit.
    CommitHolding(Transaction, Box<dyn Send>),
    /// Nothing to write; only the inbox mark is recorded.
    Ignore,
}

impl std::fmt::Debug for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handled::Commit(txn) => f.debug_tuple("Commit").field(txn).finish(),
            Handled::CommitHolding(txn, _) => f.debug_tuple("CommitHolding").field(txn).finish(),
            Handled::Ignore => f.write_str("Ignore"),
        }
    }
}

/// Why a handler could not handle an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again later (storage busy, a conflict): the message is
    /// delivered again, and dead-lettered after
    /// [`ConsumerConfig::dead_letter_after`] deliveries.
    #[error("retry later: {0}")]
    Retry(String),
    /// Needs another event first (one another consumer, or this one, has not
    /// applied yet), named by `key` as the handler's [`Handler::satisfies`]
    /// names it when that event is applied: the event is parked, and
    /// applied then.
    #[error("waiting for {key}: {reason}")]
    Waiting {
        /// What it waits for, e.g. `ticket:<id>`.
        key: String,
        /// Why, for an operator.
        reason: String,
    },
    /// Will never succeed (the event is malformed for this handler).
    #[error("rejected: {0}")]
    Reject(String),
}

/// Turns an event of another service into writes to this service's log.
pub trait Handler: Send + Sync + 'static {
    /// Decides what to write for `event`. Called again for the same event
    /// only if the previous attempt's commit did not land.
    fn handle(
        &self,
        event: &EventEnvelope,
    ) -> impl Future<Output = Result<Handled, HandlerError>> + Send;

    /// The keys `event`, once applied, satisfies: parked events waiting for
    /// any of them (in any consumer of the same log) are applied next.
    fn satisfies(&self, _event: &EventEnvelope) -> Vec<String> {
        Vec::new()
    }

    /// The lane `event` is applied in when a consumer applies several
    /// delivered messages at once: one lane's events one after another, in
    /// the order they came; different lanes side by side, their commits
    /// sharing one write of the log. `None` (the default) for a handler
    /// whose decisions read what other events change (a person's load, a
    /// queue): then each event waits for the one before it. A handler
    /// whose every write concerns its event's case alone answers the case.
    fn lane(&self, _event: &EventEnvelope) -> Option<String> {
        None
    }
}

/// Where a consumer reads and how patient it is.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Durable consumer name; also the inbox's consumer id. `[A-Za-z0-9_-]`.
    pub name: String,
    /// The service whose stream is read.
    pub source_service: String,
    /// Subjects to receive (see [`crate::subjects`]); empty means all.
    pub filter_subjects: Vec<String>,
    /// Unacknowledged time before JetStream redelivers.
    pub ack_wait: Duration,
    /// Deliveries of one message before JetStream gives up on it: -1, never
    /// (the consumer parks or dead-letters instead; see the module doc).
    pub max_deliver: i64,
    /// Deliveries of a message whose handler keeps answering
    /// [`HandlerError::Retry`] before it is dead-lettered.
    pub dead_letter_after: u64,
    /// How often parked events are tried again even without a wake.
    pub parked_sweep: Duration,
    /// Messages delivered but not yet acknowledged, at most.
    pub max_ack_pending: i64,
    /// Conflicts retried in-process before the message is nak'ed.
    pub conflict_retries: usize,
    /// Delay asked for on a nak.
    pub retry_delay: Duration,
    /// The source service's own log, reconciled with this one at every
    /// sweep so that nothing the bus dropped is missed (see
    /// [`crate::catchup`]); without it a gap in the bus is only reported.
    pub source_log: Option<SourceLogHandle>,
    /// How long readiness waits for the source's log to say its outbox is
    /// empty (so that what it had committed before this start is in the
    /// stream) before it settles for the stream as it is. Only with a
    /// `source_log`.
    pub source_drain_wait: Duration,
}

impl ConsumerConfig {
    /// A consumer named `name` of everything `source_service` publishes.
    pub fn new(name: impl Into<String>, source_service: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            source_service: source_service.into(),
            filter_subjects: Vec::new(),
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            dead_letter_after: 20,
            parked_sweep: Duration::from_secs(10),
            max_ack_pending: 1_000,
            conflict_retries: 5,
            retry_delay: Duration::from_secs(1),
            source_log: None,
            source_drain_wait: Duration::from_secs(30),
        }
    }

    /// Restricts the consumer to these subjects.
    pub fn filtered(mut self, subjects: Vec<String>) -> Self {
        self.filter_subjects = subjects;
        self
    }

    /// The same consumer as `partition`'s instance runs it: it reads its
    /// own partition of the source (`intake-p1` for partition 1), through
    /// the same subjects of that partition, under the durable name
    /// `name`. Partition 0 reads the source by its own name, as one
    /// unsplit service does.
    pub fn in_partition(mut self, partition: crate::Partition, name: String) -> Self {
        let source = partition.bus_name(&self.source_service);
        let old_prefix = format!("{}.{}.", crate::subjects::ROOT, self.source_service);
        let new_prefix = format!("{}.{source}.", crate::subjects::ROOT);
        for filter in &mut self.filter_subjects {
            if let Some(rest) = filter.strip_prefix(&old_prefix) {
                *filter = format!("{new_prefix}{rest}");
            }
        }
        self.source_service = source;
        self.name = name;
        self
    }
}

/// What happened to one delivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The handler's writes were committed.
    Committed,
    /// The inbox already held the event: nothing was written again.
    AlreadyProcessed,
}

/// A running consumer.
pub struct ConsumerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    caught_up: watch::Receiver<bool>,
    watched: crate::admin::WatchedConsumer,
}

impl ConsumerHandle {
    /// Turns `true`, once and for good, when the consumer has applied what
    /// its source had published when it started: the source stream's last
    /// message then (taken after the source's log, if known, said its
    /// outbox was empty) is at or below the consumer's ack floor, or
    /// nothing is pending or unacknowledged at all. A service is not ready
    /// before every consumer of its is.
    pub fn caught_up(&self) -> watch::Receiver<bool> {
        self.caught_up.clone()
    }

    /// The consumer as `ListConsumers` reports on it.
    pub fn watched(&self) -> crate::admin::WatchedConsumer {
        self.watched.clone()
    }

    /// Stops after the message in hand.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Applies one event through `handler` into `log`, effectively once for
/// `consumer`. This is the whole of a delivery but the ack.
pub async fn apply_event<H: Handler>(
    log: &EventLog,
    consumer: &str,
    handler: &H,
    event: &EventEnvelope,
    conflict_retries: usize,
) -> Result<Applied, HandlerError> {
    if log
        .inbox_contains(consumer, &event.event_id)
        .map_err(|e| HandlerError::Retry(e.to_string()))?
    {
        return Ok(Applied::AlreadyProcessed);
    }
    commit_handled(log, consumer, handler, event, conflict_retries, None).await
}

/// Asks the handler and commits its writes with the inbox mark (and `also`,
/// an event of the consumer's own stream), trying again on a conflict.
async fn commit_handled<H: Handler>(
    log: &EventLog,
    consumer: &str,
    handler: &H,
    event: &EventEnvelope,
    conflict_retries: usize,
    also: Option<&NewEvent>,
) -> Result<Applied, HandlerError> {
    let mut attempt = 0;
    loop {
        let (txn, _held_until_committed) = match handler.handle(event).await? {
            Handled::Commit(txn) => (txn, None),
            Handled::CommitHolding(txn, hold) => (txn, Some(hold)),
            Handled::Ignore => (Transaction::default(), None),
        };
        let mut txn = txn.consuming_at(consumer, &event.event_id, event.global_position);
        if let Some(also) = also {
            txn = txn.and_append(
                consumer_stream(consumer),
                ExpectedVersion::Any,
                vec![also.clone()],
            );
        }
        match log.commit(txn).await {
            Ok(CommitOutcome::AlreadyProcessed) => return Ok(Applied::AlreadyProcessed),
            Ok(_) => return Ok(Applied::Committed),
            Err(LogError::WrongExpectedVersion { .. }) if attempt < conflict_retries => {
                attempt += 1;
            }
            Err(e) if e.is_transient() || matches!(e, LogError::WrongExpectedVersion { .. }) => {
                return Err(HandlerError::Retry(e.to_string()));
            }
            Err(e) => return Err(HandlerError::Reject(e.to_string())),
        }
    }
}

/// What became of one event.
enum Settled {
    /// Applied, parked or dead-lettered: the log holds its outcome.
    Recorded,
    /// Its outcome could not be written; deliver it again.
    NotRecorded(String),
    /// The handler asked to try again later.
    RetryLater(String),
}

/// What a consumer works with besides the message in hand.
struct Context<'a, H> {
    log: &'a EventLog,
    config: &'a ConsumerConfig,
    handler: &'a H,
    lot: &'a ParkingLot,
    /// Set when the consumer is asked to stop: long loops (a sweep, a
    /// wake, a reconciling) end at the next event instead of running on.
    stopping: watch::Receiver<bool>,
    /// Messages handed back to JetStream (nak'ed) and not applied since:
    /// source position → stream sequence. One that has left the stream
    /// before its redelivery is a gap: the next reconciling reads it from
    /// the source's log at once. Kept across sessions of one process; a
    /// restart loses it, and the reconciling finds such a message a sweep
    /// later.
    retrying: &'a std::sync::Mutex<std::collections::BTreeMap<u64, Retrying>>,
    /// Whether the consumer has caught up with its start-up backlog.
    readiness: &'a Readiness,
    /// How far the source and the bus had got at the last reconciling.
    marks: &'a ReconcileMarks,
}

/// What one reconciling leaves for the next, kept across sessions of one
/// process (a restart begins from nothing: its first reconciling reads
/// only what the bus shows it dropped).
#[derive(Debug)]
struct ReconcileMarks {
    /// The source's head at the last reconciling: the next reconciles up
    /// to it.
    seen_head: std::sync::atomic::AtomicU64,
    /// The highest source position the bus has delivered to this consumer.
    delivered_through: std::sync::atomic::AtomicU64,
    /// How long, in microseconds, the consumer has spent waiting on the
    /// bus since it last heard from it (a delivery, a redelivery, a
    /// message handed back: the bus is alive). Only waiting counts: time
    /// the consumer spends applying, sweeping or reconciling is its own,
    /// not the bus's, and counting it made a busy consumer take the bus
    /// for stalled and read from the source's log what the bus was about
    /// to deliver, which made it busier still.
    waited_since_heard_us: std::sync::atomic::AtomicU64,
}

impl ReconcileMarks {
    fn new() -> Self {
        ReconcileMarks {
            seen_head: Default::default(),
            delivered_through: Default::default(),
            waited_since_heard_us: Default::default(),
        }
    }

    /// Notes a delivery of the event at source `position`.
    fn delivered(&self, position: u64) {
        self.delivered_through
            .fetch_max(position, std::sync::atomic::Ordering::Relaxed);
        self.heard_from_bus();
    }

    /// Notes that the bus handed the consumer a message.
    fn heard_from_bus(&self) {
        self.waited_since_heard_us
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Notes `waited` spent waiting on the bus (on a pull, or idle for
    /// its next message).
    fn waited(&self, waited: Duration) {
        let waited_us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        // fetch_add would wrap after 584,000 years of waiting; saturate
        // anyway, the mark must never read as "just heard".
        let _ = self.waited_since_heard_us.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |total| Some(total.saturating_add(waited_us)),
        );
    }

    /// How long the consumer has waited on the bus and heard nothing.
    fn quiet_for(&self) -> Duration {
        Duration::from_micros(
            self.waited_since_heard_us
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

/// What JetStream shows of a consumer when it reconciles.
#[derive(Debug, Clone, Copy)]
struct BusView {
    /// It dropped messages the consumer never acknowledged.
    gap: bool,
    /// It still holds messages for the consumer: not yet delivered, or
    /// delivered and not yet acknowledged.
    pending: bool,
}

/// Where one consumer session is in its source's stream.
#[derive(Debug, Default)]
struct BusCursor {
    /// The highest stream sequence delivered in this session, or the
    /// consumer's ack floor when the session began.
    through: u64,
}

/// A message handed back and not applied since.
#[derive(Debug, Clone, Copy, Default)]
struct Retrying {
    /// Its sequence in the stream; 0 once it is to be read from the source's
    /// log (it left the stream, or a reconciling could not apply it yet).
    stream_sequence: u64,
    /// Times a reconciling tried it from the source's log.
    attempts_from_log: u64,
}

/// A consumer's progress towards what its source held when it started.
struct Readiness {
    caught_up: watch::Sender<bool>,
    /// The source stream's last sequence to reach, once chosen.
    target: std::sync::Mutex<Option<u64>>,
    started: tokio::time::Instant,
}

fn now() -> prost_types::Timestamp {
    lineguard_eventlog::clock::now()
}

/// Why `event` cannot have come on `subject`, if it cannot: the relay
/// publishes an event only on the subject its envelope names (its source
/// service, type and correlation's bucket; before the buckets, the
/// correlation itself), and a stream holds only its own service's
/// subjects, so anything else was forged or smuggled onto the bus.
fn forged(subject: &str, event: &EventEnvelope) -> Option<String> {
    if is_event_subject(
        subject,
        &event.source,
        &event.event_type,
        &event.correlation_id,
    ) {
        return None;
    }
    let expected = event_subject(&event.source, &event.event_type, &event.correlation_id);
    Some(format!(
        "the envelope does not match its subject: it came on {subject}, but its source \
         {} and type {} belong on {expected}",
        event.source, event.event_type
    ))
}

/// A correlation id for the consumer's own record of `event`.
fn correlation_of(event: &EventEnvelope) -> &str {
    if event.correlation_id.is_empty() {
        &event.event_id
    } else {
        &event.correlation_id
    }
}

/// One event of the consumer's own stream, about a delivered event.
fn consumer_event(
    consumer: &str,
    message: &impl prost::Name,
    correlation: &str,
    cause: Option<&str>,
) -> NewEvent {
    let event = NewEvent::new(message, correlation, actor(ActorKind::System, consumer));
    match cause {
        Some(cause) => event.caused_by(cause),
        None => event,
    }
    .unpublished()
}

impl<H: Handler> Context<'_, H> {
    fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether the consumer has been asked to stop.
    fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Records that the message at `position` went back to JetStream
    /// (`retrying`, at `stream_sequence` in its stream) or has its outcome
    /// in the log.
    fn note_retrying(&self, position: u64, stream_sequence: u64, retrying: bool) {
        let mut map = self
            .retrying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if retrying {
            map.entry(position).or_default().stream_sequence = stream_sequence;
        } else {
            map.remove(&position);
        }
    }

    /// Times a reconciling has tried the message at `position` from the log.
    fn attempts_from_log(&self, position: u64) -> u64 {
        self.retrying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&position)
            .map_or(0, |r| r.attempts_from_log)
    }

    /// A reconciling could not apply the message at `position` yet: the next
    /// sweep's reconciling tries it again from the log (and, past
    /// `dead_letter_after` tries, dead-letters it), while the consumer goes
    /// on with everything else.
    fn retry_from_log(&self, position: u64) {
        let mut map = self
            .retrying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map.entry(position).or_default();
        entry.stream_sequence = 0;
        entry.attempts_from_log += 1;
    }

    /// Whether a message handed back to JetStream has left the stream
    /// (its limits dropped it) before its redelivery: JetStream will never
    /// deliver it again, so it must be read from the source's log.
    fn handed_back_and_gone(&self, first_in_stream: u64) -> bool {
        self.retrying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .any(|r| r.stream_sequence < first_in_stream)
    }

    /// Whether the consumer's log already holds the event, parked or
    /// dead-lettered (a redelivery after the ack was lost).
    fn held_in_log(&self, event_id: &str) -> Result<bool, LogError> {
        Ok(self
            .log
            .projection_get(&parked_key(self.name(), event_id))?
            .is_some()
            || self
                .log
                .projection_get(&dead_key(self.name(), event_id))?
                .is_some())
    }

    async fn park(
        &self,
        event: &EventEnvelope,
        envelope: Bytes,
        subject: &str,
        key: &str,
        reason: &str,
    ) -> Result<(), LogError> {
        let parked = EventParked {
            consumer: self.name().to_string(),
            event_id: event.event_id.clone(),
            waiting_for: key.to_string(),
            reason: reason.to_string(),
            envelope,
            subject: subject.to_string(),
            parked_at: Some(now()),
        };
        let record = consumer_event(
            self.name(),
            &parked,
            correlation_of(event),
            Some(&event.event_id),
        );
        self.log
            .commit(Transaction::append(
                consumer_stream(self.name()),
                ExpectedVersion::Any,
                vec![record],
            ))
            .await?;
        tracing::info!(consumer = %self.name(), event_id = %event.event_id,
            correlation_id = %event.correlation_id, waiting_for = %key, "event parked");
        crate::metrics::BUS_METRICS.message(self.name(), crate::metrics::Outcome::parked);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        event_id: &str,
        correlation: &str,
        cause: Option<&str>,
        envelope: Bytes,
        subject: &str,
        deliveries: u64,
        error: &str,
    ) -> Result<(), LogError> {
        let dead = EventDeadLettered {
            consumer: self.name().to_string(),
            event_id: event_id.to_string(),
            error: error.to_string(),
            envelope,
            subject: subject.to_string(),
            deliveries,
            dead_lettered_at: Some(now()),
        };
        let record = consumer_event(self.name(), &dead, correlation, cause);
        self.log
            .commit(Transaction::append(
                consumer_stream(self.name()),
                ExpectedVersion::Any,
                vec![record],
            ))
            .await?;
        tracing::error!(consumer = %self.name(), event_id, correlation_id = correlation,
            %error, deliveries, "event dead-lettered");
        crate::metrics::BUS_METRICS.message(self.name(), crate::metrics::Outcome::dead_lettered);
        Ok(())
    }

    /// Applies one delivered message and answers JetStream (ack or nak).
    async fn deliver(
        &self,
        message: jetstream::Message,
        decoded: Result<EventEnvelope, prost::DecodeError>,
    ) -> Result<(), String> {
        let deliveries = message.info().map_or(1, |i| i.delivered.max(1) as u64);
        let subject = message.subject.to_string();
        let event = match decoded {
            Ok(event) => event,
            Err(e) => {
                let reason = format!("undecodable envelope: {e}");
                return self
                    .refuse(message, "undecodable", deliveries, &reason)
                    .await;
            }
        };
        if let Some(reason) = forged(&subject, &event) {
            tracing::error!(%subject, source = %event.source, event_type = %event.event_type,
                "an envelope on a subject it does not belong to: dead-lettered");
            return self.refuse(message, "forged", deliveries, &reason).await;
        }
        let position = event.global_position;
        self.marks.delivered(position);
        let settled = self
            .settle(&event, message.payload.clone(), &subject, deliveries)
            .await;
        let sequence = message.info().map_or(0, |i| i.stream_sequence);
        self.note_retrying(position, sequence, !matches!(settled, Settled::Recorded));
        match settled {
            Settled::Recorded => self.answer(message, Ok(())).await,
            Settled::NotRecorded(reason) => self.answer(message, Err(reason)).await,
            Settled::RetryLater(reason) => {
                tracing::warn!(%reason, deliveries, "event not applied; will be redelivered");
                message
                    .ack_with(AckKind::Nak(Some(self.config.retry_delay)))
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Dead-letters a message that is no event of its source (it does not
    /// decode, or it was forged onto the subject) under its own id,
    /// `<kind>-<stream sequence>`, never the envelope's: one that borrowed a
    /// real event's id must not make the real one look already handled.
    async fn refuse(
        &self,
        message: jetstream::Message,
        kind: &str,
        deliveries: u64,
        reason: &str,
    ) -> Result<(), String> {
        let sequence = message.info().map_or(0, |i| i.stream_sequence);
        let id = format!("{kind}-{sequence}");
        let subject = message.subject.to_string();
        let recorded = self
            .dead_letter(
                &id,
                &id,
                None,
                message.payload.clone(),
                &subject,
                deliveries,
                reason,
            )
            .await;
        self.answer(message, recorded.map_err(|e| e.to_string()))
            .await
    }

    /// What becomes of one event (from the bus, or read from its source's
    /// log by a reconciling): applied, parked or dead-lettered in the log, or
    /// to be tried again.
    async fn settle(
        &self,
        event: &EventEnvelope,
        envelope: Bytes,
        subject: &str,
        deliveries: u64,
    ) -> Settled {
        match self.held_in_log(&event.event_id) {
            Ok(true) => return Settled::Recorded,
            Ok(false) => {}
            Err(e) => return Settled::NotRecorded(e.to_string()),
        }
        let applied = apply_event(
            self.log,
            self.name(),
            self.handler,
            event,
            self.config.conflict_retries,
        )
        .await;
        match applied {
            Ok(applied) => {
                tracing::debug!(?applied, "event applied");
                crate::metrics::BUS_METRICS.message(self.name(), crate::metrics::Outcome::applied);
                self.lot.wake(self.handler.satisfies(event));
                Settled::Recorded
            }
            Err(HandlerError::Waiting { key, reason }) => {
                match self.park(event, envelope, subject, &key, &reason).await {
                    Ok(()) => {
                        // What it waits for may have landed between the
                        // handler's look and the parking: look once more,
                        // now that a wake would find it parked.
                        self.apply_parked_one(&event.event_id).await;
                        Settled::Recorded
                    }
                    Err(e) => Settled::NotRecorded(e.to_string()),
                }
            }
            Err(HandlerError::Retry(reason)) if deliveries < self.config.dead_letter_after => {
                crate::metrics::BUS_METRICS
                    .message(self.name(), crate::metrics::Outcome::redelivered);
                Settled::RetryLater(reason)
            }
            Err(HandlerError::Retry(reason) | HandlerError::Reject(reason)) => {
                match self
                    .dead_letter(
                        &event.event_id,
                        correlation_of(event),
                        Some(&event.event_id),
                        envelope,
                        subject,
                        deliveries,
                        &reason,
                    )
                    .await
                {
                    Ok(()) => Settled::Recorded,
                    Err(e) => Settled::NotRecorded(e.to_string()),
                }
            }
        }
    }

    fn caught_up(&self) -> bool {
        *self.readiness.caught_up.borrow()
    }

    /// Sees whether the consumer has caught up with its start-up backlog
    /// (see [`ConsumerHandle::caught_up`]) and says so once it has.
    /// Whether the source, whose stream does not exist, has published
    /// nothing this consumer must wait for: its log is empty (asked, when
    /// there is a source log, for as long as readiness waits for a source),
    /// or there is no source log to ask.
    async fn nothing_published(&self) -> bool {
        let Some(source) = &self.config.source_log else {
            return true;
        };
        if self.readiness.started.elapsed() >= self.config.source_drain_wait {
            return true;
        }
        matches!(source.0.state().await, Ok(state) if state.head_position == 0)
    }

    async fn check_caught_up(
        &self,
        stream: &mut jetstream::stream::Stream,
        consumer: &mut jetstream::consumer::PullConsumer,
    ) {
        if self.caught_up() {
            return;
        }
        let chosen = *self
            .readiness
            .target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let target = match chosen {
            Some(target) => target,
            None => {
                if let Some(source) = &self.config.source_log
                    && self.readiness.started.elapsed() < self.config.source_drain_wait
                {
                    match source.0.state().await {
                        Ok(state) if state.outbox_backlog == 0 => {}
                        Ok(_) => return,
                        Err(reason) => {
                            tracing::debug!(consumer = %self.name(), %reason,
                                "source log not answering yet; readiness waits");
                            return;
                        }
                    }
                }
                let last = match stream.info().await {
                    Ok(info) => info.state.last_sequence,
                    Err(e) => {
                        tracing::debug!(consumer = %self.name(), error = %e,
                            "stream info unavailable; readiness looks again");
                        return;
                    }
                };
                *self
                    .readiness
                    .target
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(last);
                last
            }
        };
        // A failed look is not the consumer's failure: it looks again.
        let info = match consumer.info().await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(consumer = %self.name(), error = %e,
                    "consumer info unavailable; readiness looks again");
                return;
            }
        };
        let idle = info.num_pending == 0 && info.num_ack_pending == 0;
        if idle || info.ack_floor.stream_sequence >= target {
            self.readiness.caught_up.send_replace(true);
            tracing::info!(consumer = %self.name(), target, ack_floor = info.ack_floor.stream_sequence,
                waited_ms = self.readiness.started.elapsed().as_millis() as u64,
                "caught up with what the source held at start-up");
        }
    }

    /// What the bus shows of this consumer. A gap: JetStream's first
    /// message is past the consumer's ack floor plus one, or a message
    /// handed back has left the stream (JetStream may also move the ack
    /// floor past a dropped message it had handed back: those are tracked
    /// here, not trusted to it).
    async fn look_at_bus(
        &self,
        stream: &mut jetstream::stream::Stream,
        consumer: &mut jetstream::consumer::PullConsumer,
    ) -> Result<BusView, String> {
        let first = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .first_sequence;
        let info = consumer.info().await.map_err(|e| e.to_string())?;
        Ok(BusView {
            gap: first > info.ack_floor.stream_sequence + 1 || self.handed_back_and_gone(first),
            pending: info.num_pending > 0 || info.num_ack_pending > 0,
        })
    }

    /// The source position a reconciling without a gap reads through
    /// (see [`reconcile_through`]): the bus is waited for while it has
    /// handed the consumer something within a sweep's worth of waiting on
    /// it. (A bus that stalls is therefore read past after two or three
    /// sweeps, depending on how long the consumer's own sweeps took.)
    fn reconcile_through(&self, one_sweep_ago: u64, bus: BusView, source: SourceState) -> u64 {
        reconcile_through(
            one_sweep_ago,
            BusProgress {
                delivering: self.marks.quiet_for() < self.config.parked_sweep,
                pending: bus.pending,
                delivered: self
                    .marks
                    .delivered_through
                    .load(std::sync::atomic::Ordering::Relaxed),
                published_through: source.head_position.saturating_sub(source.outbox_backlog),
            },
        )
    }

    /// Reconciles (see [`Context::reconcile`]); a failure (the source's
    /// log unreachable, this log refusing commits for a while) is logged
    /// and tried again at the next sweep, while the consumer goes on with
    /// the bus: a peer that is down must not stop what the bus delivers.
    async fn reconcile_or_warn(
        &self,
        stream: &mut jetstream::stream::Stream,
        consumer: &mut jetstream::consumer::PullConsumer,
    ) {
        if let Err(reason) = self.reconcile(stream, consumer, false).await {
            tracing::warn!(consumer = %self.name(), %reason,
                "reconciling with the source's log failed; tried again at the next sweep");
        }
    }

    /// Whether `event` has its outcome in this log: applied (the inbox
    /// holds it), parked or dead-lettered.
    fn recorded(&self, event: &EventEnvelope) -> Result<bool, String> {
        let applied = self
            .log
            .inbox_contains(self.name(), &event.event_id)
            .map_err(|e| e.to_string())?;
        Ok(applied
            || self
                .held_in_log(&event.event_id)
                .map_err(|e| e.to_string())?)
    }

    /// Before a group of messages is applied (`false`: it must not be yet,
    /// and goes back to the bus): if the stream dropped messages between
    /// the last one this session saw and any of the group, what it dropped
    /// is applied from the source's log first, through the source's head,
    /// so that one source's events are applied in the source's order (a
    /// newer event applied before an older one the bus dropped would let
    /// the older one overwrite it at the next sweep). While the source's
    /// log cannot be read (its process restarting), the group waits.
    ///
    /// Exact, and asked of JetStream once per group, only when a message is
    /// not the one right after the one before (for a filtered consumer,
    /// most are not): a stream drops from its front only, and its first
    /// sequence only grows, so a message dropped unread below one of the
    /// group (dropped before that one was delivered) shows as a first
    /// sequence past the last seen plus one when asked after the delivery.
    async fn catch_up_before(
        &self,
        stream: &mut jetstream::stream::Stream,
        consumer: &mut jetstream::consumer::PullConsumer,
        cursor: &mut BusCursor,
        sequences: &[u64],
    ) -> bool {
        // Whether any message of the group is not the one right after the
        // one before it (or the last seen).
        let mut previous = cursor.through;
        let mut skipped = false;
        for &sequence in sequences {
            skipped |= sequence > previous + 1;
            previous = previous.max(sequence);
        }
        if skipped && self.config.source_log.is_some() {
            let first = match stream.info().await {
                Ok(info) => info.state.first_sequence,
                Err(e) => {
                    tracing::warn!(consumer = %self.name(), error = %e,
                        "stream info unavailable: the group goes back to the bus until a gap can be ruled out");
                    return false;
                }
            };
            if first > cursor.through + 1 {
                tracing::info!(consumer = %self.name(), first_in_stream = first,
                    last_seen = cursor.through,
                    "the stream dropped messages before these: catching up from the source's log first");
                if let Err(reason) = self.reconcile(stream, consumer, true).await {
                    // Applying the newer messages now would put them before
                    // the older ones the bus dropped: they wait instead.
                    tracing::warn!(consumer = %self.name(), %reason,
                        "cannot catch up from the source's log: the group goes back to the bus until it can");
                    return false;
                }
            }
        }
        cursor.through = previous;
        true
    }

    /// Hands a group back to JetStream unapplied, to come again after the
    /// retry delay.
    async fn hand_back(&self, group: Vec<jetstream::Message>) -> Result<(), String> {
        for message in group {
            message
                .ack_with(AckKind::Nak(Some(self.config.retry_delay)))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Checks the source's own log against this one (see
    /// [`crate::catchup`]): every event this consumer takes, from its
    /// reconciled mark ([`EventLog::reconciled_through`]) up to the head
    /// the source had one sweep ago or what the bus has delivered
    /// ([`Context::reconcile_through`]; the source's head now if the bus
    /// shows a gap, or `bus_skipped` says the next message follows a
    /// drop), that has no outcome here is applied from the source's log
    /// exactly as a delivery would be. The mark then moves to the last
    /// position below which everything has its outcome.
    async fn reconcile(
        &self,
        stream: &mut jetstream::stream::Stream,
        consumer: &mut jetstream::consumer::PullConsumer,
        bus_skipped: bool,
    ) -> Result<(), String> {
        let bus = self.look_at_bus(stream, consumer).await?;
        let gap = bus_skipped || bus.gap;
        let Some(source) = &self.config.source_log else {
            if gap {
                tracing::error!(consumer = %self.name(),
                    "the bus dropped messages this consumer never acknowledged, and no source log \
                     is configured to catch up from (--peer): they are missing");
            }
            return Ok(());
        };
        let source_state = source.0.state().await?;
        let head = source_state.head_position;
        let one_sweep_ago = self
            .marks
            .seen_head
            .swap(head, std::sync::atomic::Ordering::Relaxed);
        // An event younger than a sweep, or not yet delivered by a bus that
        // is delivering, may still be on its way through the bus; with a
        // gap, what the bus dropped is read at once.
        let through = if gap {
            head
        } else {
            self.reconcile_through(one_sweep_ago, bus, source_state)
        };
        let mark = self
            .log
            .reconciled_through(self.name())
            .map_err(|e| e.to_string())?;
        if through <= mark {
            return Ok(());
        }
        let mut reconciled = mark;
        let mut all_recorded = true;
        let mut applied = 0u64;
        let mut read = 0usize;
        let mut from = mark + 1;
        let mut stopped_by: Option<String> = None;
        // Without a gap nearly everything read is already here: pages of
        // the consumer's types without their payloads tell which; a page
        // with payloads is read only from an event that is missing.
        let type_names = type_names_of(&self.config.filter_subjects);
        let mut slim = !gap;
        'pages: while from <= through && read < RECONCILE_MAX {
            let filter = AllFilter {
                type_names: type_names.clone(),
                without_payloads: slim,
            };
            let page = source.0.read_from(from, CATCH_UP_PAGE, &filter).await?;
            if page.next_position <= from {
                break;
            }
            let mut next = page.next_position.min(through + 1);
            let mut missing_payload = false;
            for event in &page.events {
                let position = event.global_position;
                if position > through {
                    next = through + 1;
                    break;
                }
                if self.stopping() {
                    break 'pages;
                }
                if event.source != self.config.source_service {
                    stopped_by = Some(format!(
                        "the source log configured for {} holds {}'s events",
                        self.config.source_service, event.source
                    ));
                    break 'pages;
                }
                if wanted(&self.config.filter_subjects, event) && !self.recorded(event)? {
                    if slim {
                        // Missing here: read again from it, whole.
                        next = position;
                        missing_payload = true;
                        break;
                    }
                    let subject =
                        event_subject(&event.source, &event.event_type, &event.correlation_id);
                    let tries = self.attempts_from_log(position) + 1;
                    match self
                        .settle(event, Bytes::from(event.encode_to_vec()), &subject, tries)
                        .await
                    {
                        Settled::Recorded => {
                            self.note_retrying(position, 0, false);
                            applied += 1;
                            tracing::debug!(consumer = %self.name(), event_id = %event.event_id,
                                correlation_id = %event.correlation_id, position,
                                "applied from the source's log");
                        }
                        // Not yet: the rest goes on; the mark stays below it
                        // and the next sweep tries it again.
                        Settled::RetryLater(reason) => {
                            tracing::warn!(consumer = %self.name(), event_id = %event.event_id,
                                position, tries, %reason,
                                "event from the source's log not applied yet; tried again at the next sweep");
                            self.retry_from_log(position);
                            all_recorded = false;
                        }
                        Settled::NotRecorded(reason) => {
                            stopped_by =
                                Some(format!("reconciling stopped at {position}: {reason}"));
                            break 'pages;
                        }
                    }
                }
                if all_recorded {
                    reconciled = position;
                }
            }
            // Every record before `next` was looked at (those of other
            // types are not the consumer's): the mark may pass them.
            debug_assert!(next > reconciled || !all_recorded);
            if all_recorded {
                reconciled = reconciled.max(next - 1);
            }
            read += usize::try_from(next.saturating_sub(from)).unwrap_or(usize::MAX);
            from = next;
            slim = !gap && !missing_payload;
        }
        // A write of the log (fsynced, and copied first with --log-copy):
        // off the runtime's workers, which the copy's append needs free.
        let (log, name) = (self.log.clone(), self.name().to_string());
        tokio::task::spawn_blocking(move || log.record_reconciled_through(&name, reconciled))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if applied > 0 && gap {
            tracing::warn!(consumer = %self.name(), applied, reconciled,
                "caught up from the source's log after a gap in the bus");
        } else if applied > 0 {
            tracing::warn!(consumer = %self.name(), applied, reconciled,
                "events the bus had not delivered were applied from the source's log");
        }
        match stopped_by {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    /// Acks a message whose outcome is recorded in the log; naks it (to be
    /// delivered again) when recording failed.
    async fn answer(
        &self,
        message: jetstream::Message,
        recorded: Result<(), String>,
    ) -> Result<(), String> {
        match recorded {
            Ok(()) => message.ack().await.map_err(|e| e.to_string()),
            Err(reason) => {
                tracing::warn!(consumer = %self.name(), %reason,
                    "outcome not recorded; the message will be delivered again");
                message
                    .ack_with(AckKind::Nak(Some(self.config.retry_delay)))
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Tries the parked event `event_id` again, if it is still parked.
    async fn apply_parked_one(&self, event_id: &str) {
        let parked = match self.log.projection_get(&parked_key(self.name(), event_id)) {
            Ok(Some(bytes)) => EventParked::decode(bytes.as_slice()),
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(consumer = %self.name(), event_id, error = %e, "parked event unreadable now");
                return;
            }
        };
        match parked {
            Ok(parked) => self.apply_parked(parked).await,
            Err(e) => {
                tracing::error!(consumer = %self.name(), event_id, error = %e, "undecodable parked record")
            }
        }
    }

    /// Tries a parked event again: applied (with the record that it was, in
    /// the same commit), parked again for something else, left for later,
    /// or dead-lettered.
    async fn apply_parked(&self, parked: EventParked) {
        // An envelope that does not decode, or a forged dead letter sent back
        // by an operator, is dead-lettered again with the reason.
        let checked = EventEnvelope::decode(parked.envelope.as_ref())
            .map_err(|e| format!("undecodable parked envelope: {e}"))
            .and_then(|event| match forged(&parked.subject, &event) {
                Some(reason) => Err(reason),
                None => Ok(event),
            });
        let event = match checked {
            Ok(event) => event,
            Err(reason) => {
                let _ = self
                    .dead_letter(
                        &parked.event_id,
                        &parked.event_id,
                        None,
                        parked.envelope.clone(),
                        &parked.subject,
                        0,
                        &reason,
                    )
                    .await;
                return;
            }
        };
        let applied_record = consumer_event(
            self.name(),
            &ParkedEventApplied {
                consumer: self.name().to_string(),
                event_id: event.event_id.clone(),
                applied_at: Some(now()),
            },
            correlation_of(&event),
            Some(&event.event_id),
        );
        let outcome = commit_handled(
            self.log,
            self.name(),
            self.handler,
            &event,
            self.config.conflict_retries,
            Some(&applied_record),
        )
        .await;
        let span_fields = (
            self.name(),
            event.event_id.as_str(),
            event.correlation_id.as_str(),
        );
        match outcome {
            Ok(Applied::Committed) => {
                tracing::info!(consumer = %span_fields.0, event_id = %span_fields.1,
                    correlation_id = %span_fields.2, "parked event applied");
                self.lot.wake(self.handler.satisfies(&event));
            }
            Ok(Applied::AlreadyProcessed) => {
                // Applied before (the inbox says so): only the record is left to clear.
                let cleared = self
                    .log
                    .commit(Transaction::append(
                        consumer_stream(self.name()),
                        ExpectedVersion::Any,
                        vec![applied_record],
                    ))
                    .await;
                if let Err(e) = cleared {
                    tracing::warn!(consumer = %span_fields.0, event_id = %span_fields.1, error = %e,
                        "parked record of an applied event not cleared yet");
                }
            }
            Err(HandlerError::Waiting { key, reason }) => {
                if key != parked.waiting_for
                    && let Err(e) = self
                        .park(
                            &event,
                            parked.envelope.clone(),
                            &parked.subject,
                            &key,
                            &reason,
                        )
                        .await
                {
                    tracing::warn!(consumer = %span_fields.0, event_id = %span_fields.1, error = %e,
                        "could not park again");
                }
            }
            Err(HandlerError::Retry(reason)) => {
                tracing::debug!(consumer = %span_fields.0, event_id = %span_fields.1, %reason,
                    "parked event not applied yet");
            }
            Err(HandlerError::Reject(reason)) => {
                let _ = self
                    .dead_letter(
                        &event.event_id,
                        correlation_of(&event),
                        Some(&event.event_id),
                        parked.envelope.clone(),
                        &parked.subject,
                        0,
                        &reason,
                    )
                    .await;
            }
        }
    }

    /// Applies the parked events waiting for any of `keys`.
    async fn wake(&self, keys: &[String]) -> Result<(), String> {
        for key in keys {
            let prefix = waiting_prefix(self.name(), key);
            let mut pages = self.log.projection_pages(&prefix, SWEEP_PAGE);
            loop {
                let page = pages.next_page().map_err(|e| e.to_string())?;
                if page.is_empty() {
                    break;
                }
                for (waiting, _) in &page {
                    if self.stopping() {
                        return Ok(());
                    }
                    let event_id = String::from_utf8_lossy(&waiting[prefix.len()..]).into_owned();
                    self.apply_parked_one(&event_id).await;
                }
            }
        }
        Ok(())
    }

    /// Tries every parked event of the consumer again (at most
    /// [`SWEEP_MAX`] a sweep).
    async fn sweep(&self) -> Result<usize, String> {
        let mut pages = self
            .log
            .projection_pages(&parked_prefix(self.name()), SWEEP_PAGE);
        let mut tried = 0;
        while tried < SWEEP_MAX {
            let page = pages.next_page().map_err(|e| e.to_string())?;
            if page.is_empty() {
                break;
            }
            for (_, value) in page {
                if self.stopping() {
                    return Ok(tried);
                }
                match EventParked::decode(value.as_slice()) {
                    Ok(parked) => self.apply_parked(parked).await,
                    Err(e) => tracing::error!(consumer = %self.name(), error = %e,
                        "undecodable parked record"),
                }
                tried += 1;
            }
        }
        Ok(tried)
    }
}

/// How far the bus has carried a source's events towards one consumer,
/// as a reconciling sees it.
#[derive(Debug, Clone, Copy)]
struct BusProgress {
    /// It handed the consumer something (a redelivery too) within a
    /// sweep's worth of the consumer waiting on it (see
    /// [`ReconcileMarks::quiet_for`]).
    delivering: bool,
    /// It still holds messages for the consumer (see [`BusView`]).
    pending: bool,
    /// The highest source position it has handed the consumer.
    delivered: u64,
    /// The source's head less its outbox backlog, both now: no position
    /// past it can have been published yet. (The outbox holds the
    /// newest unacknowledged events, and events that are never published
    /// only make this larger than the first unpublished position, never
    /// smaller: what it leaves out is surely still in the outbox.)
    published_through: u64,
}

/// The source position a reconciling without a gap reads through: the
/// head the source had one sweep ago, but, while the bus keeps delivering
/// to the consumer, no further than it has carried the source's events:
/// what it has delivered while it still holds messages for the consumer,
/// and what the source has published at all when it holds none (the
/// source's relay is behind: its outbox holds events the bus has never
/// seen, let alone dropped). A consumer behind by more than a sweep, or a
/// source whose relay is, would otherwise read from the source's log, and
/// apply a second time, what the bus is about to hand it, costing the
/// source that serves the pages exactly when the whole pipeline is
/// behind. A bus that has handed the consumer nothing while it waited a
/// sweep is not waited for: the source's log is read as if the bus had
/// stopped.
fn reconcile_through(one_sweep_ago: u64, bus: BusProgress) -> u64 {
    match (bus.delivering, bus.pending) {
        (false, _) => one_sweep_ago,
        (true, true) => one_sweep_ago.min(bus.delivered),
        (true, false) => one_sweep_ago.min(bus.published_through),
    }
}

/// Source events read per reconciling, at most: the rest waits for the
/// next sweep, so that the bus is not kept waiting.
pub const RECONCILE_MAX: usize = 50_000;

/// Parked records read per page of a wake or a sweep.
pub const SWEEP_PAGE: usize = 256;
/// Parked events tried per sweep; the rest wait for the next.
pub const SWEEP_MAX: usize = 10_000;

/// Messages asked for per pull request.
pub const PULL_BATCH: usize = 64;
/// How often a consumer not yet caught up with its start-up backlog looks.
const READINESS_CHECK: Duration = Duration::from_millis(250);

/// How long one pull request waits for messages before the next is made.
pub const PULL_EXPIRES: Duration = Duration::from_secs(2);

async fn next_batch(
    consumer: &jetstream::consumer::PullConsumer,
) -> Result<jetstream::consumer::pull::Batch, String> {
    consumer
        .batch()
        .max_messages(PULL_BATCH)
        .expires(PULL_EXPIRES)
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// How often a consumer looks for a source stream that does not exist yet.
const STREAM_LOOK_AGAIN: Duration = Duration::from_millis(500);

/// Starts a durable consumer feeding `handler`, committing into `log`.
/// `lot` is the log's [`ParkingLot`], shared by all its consumers.
pub fn spawn_consumer<H: Handler>(
    jetstream: jetstream::Context,
    log: EventLog,
    config: ConsumerConfig,
    handler: H,
    lot: ParkingLot,
) -> ConsumerHandle {
    let (stop, stopped) = watch::channel(false);
    let (caught_up_tx, caught_up) = watch::channel(false);
    let readiness = Arc::new(Readiness {
        caught_up: caught_up_tx,
        target: std::sync::Mutex::new(None),
        started: tokio::time::Instant::now(),
    });
    let watched = crate::admin::WatchedConsumer {
        name: config.name.clone(),
        stream: crate::subjects::stream_name(&config.source_service),
        caught_up: caught_up.clone(),
    };
    let task = tokio::spawn(run(
        jetstream,
        log,
        config,
        Arc::new(handler),
        lot,
        stopped,
        readiness,
    ));
    ConsumerHandle {
        stop,
        task,
        caught_up,
        watched,
    }
}

async fn run<H: Handler>(
    jetstream: jetstream::Context,
    log: EventLog,
    config: ConsumerConfig,
    handler: Arc<H>,
    lot: ParkingLot,
    stopped: watch::Receiver<bool>,
    readiness: Arc<Readiness>,
) {
    let mut backoff = Duration::from_millis(100);
    let retrying = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let marks = Arc::new(ReconcileMarks::new());
    while !*stopped.borrow() {
        // Each session is a task of its own: if it panics, the consumer
        // says so and starts again instead of stopping without a word.
        let session = tokio::spawn({
            let (jetstream, log, config, handler, lot, mut stopped) = (
                jetstream.clone(),
                log.clone(),
                config.clone(),
                handler.clone(),
                lot.clone(),
                stopped.clone(),
            );
            let (retrying, readiness, marks) = (retrying.clone(), readiness.clone(), marks.clone());
            async move {
                let context = Context {
                    log: &log,
                    config: &config,
                    handler: handler.as_ref(),
                    lot: &lot,
                    stopping: stopped.clone(),
                    retrying: &retrying,
                    readiness: &readiness,
                    marks: &marks,
                };
                consume(&jetstream, &context, &mut stopped).await
            }
        })
        .await
        .unwrap_or_else(|panic| {
            tracing::error!(consumer = %config.name, %panic, "consumer task panicked");
            Err(format!("panicked: {panic}"))
        });
        if let Err(reason) = session {
            tracing::warn!(consumer = %config.name, %reason, retry_in_ms = backoff.as_millis() as u64,
                "consumer interrupted");
            let mut stopped = stopped.clone();
            tokio::select! {
                () = tokio::time::sleep(backoff) => {},
                _ = stopped.changed() => {},
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        } else {
            backoff = Duration::from_millis(100);
        }
    }
}

async fn consume<H: Handler>(
    jetstream: &jetstream::Context,
    context: &Context<'_, H>,
    stopped: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let config = context.config;
    // Subscribed before anything is applied: no wake is missed after this.
    let mut wakes = context.lot.subscribe();
    // The source's stream is the source's to create and configure (NATS
    // lets only the source manage it): until it exists, the source has
    // published nothing, so there is nothing to catch up with; look again
    // every half second.
    let mut told = false;
    let mut stream = loop {
        match jetstream
            .get_stream(stream_name(&config.source_service))
            .await
        {
            Ok(stream) => break stream,
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    if !told && context.nothing_published().await {
                        tracing::info!(consumer = %config.name, stream = %stream_name(&config.source_service),
                            "the source's stream does not exist yet (its service creates it): nothing to catch up with");
                        context.readiness.caught_up.send_replace(true);
                        told = true;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(STREAM_LOOK_AGAIN) => {}
                        _ = stopped.changed() => return Ok(()),
                    }
                }
                _ => return Err(e.to_string()),
            },
        }
    };
    let mut consumer = stream
        .get_or_create_consumer(
            &config.name,
            pull::Config {
                durable_name: Some(config.name.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_deliver: config.max_deliver,
                max_ack_pending: config.max_ack_pending,
                filter_subjects: config.filter_subjects.clone(),
                ..pull::Config::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    // What the bus dropped while this consumer was away comes from the
    // source's log; then whatever was parked before a restart.
    context.reconcile_or_warn(&mut stream, &mut consumer).await;
    context.sweep().await?;
    context.check_caught_up(&mut stream, &mut consumer).await;
    let mut sweep = tokio::time::interval(config.parked_sweep);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep.tick().await;
    let mut readiness_check = tokio::time::interval(READINESS_CHECK);
    readiness_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One pull request at a time, each for a bounded batch that expires:
    // the long-lived `messages()` stream was seen to stop asking for more
    // under load (server: no waiting request, messages delivered to the
    // client but never handed over), which stalled the consumer for good.
    let mut messages = next_batch(&consumer).await?;
    // Everything up to the ack floor has its outcome: the first group is
    // looked at against it.
    let mut cursor = BusCursor {
        through: consumer
            .info()
            .await
            .map_or(0, |info| info.ack_floor.stream_sequence),
    };
    loop {
        // Time in this select is time waiting on the bus (the other arms
        // are this consumer's own work): it is what a reconciling counts
        // as the bus being quiet.
        let waiting = tokio::time::Instant::now();
        let next = tokio::select! {
            next = messages.next() => {
                context.marks.waited(waiting.elapsed());
                next
            }
            woken = wakes.recv() => {
                context.marks.waited(waiting.elapsed());
                match woken {
                    Ok(keys) => context.wake(&keys[..]).await?,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::info!(consumer = %config.name, missed, "wakes missed; sweeping parked events");
                        context.sweep().await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => {}
                }
                continue;
            }
            _ = sweep.tick() => {
                context.marks.waited(waiting.elapsed());
                context.reconcile_or_warn(&mut stream, &mut consumer).await;
                context.sweep().await?;
                continue;
            }
            _ = readiness_check.tick(), if !context.caught_up() => {
                context.marks.waited(waiting.elapsed());
                context.check_caught_up(&mut stream, &mut consumer).await;
                continue;
            }
            _ = stopped.changed() => return Ok(()),
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(e.to_string()),
            None => {
                // Asking for the next batch is waiting on the bus too.
                let asking = tokio::time::Instant::now();
                messages = next_batch(&consumer).await?;
                context.marks.waited(asking.elapsed());
                continue;
            }
        };
        context.marks.heard_from_bus();
        // Whatever else has already arrived joins it, up to a pull batch:
        // applied together, their commits share one write of the log.
        let mut group = vec![message];
        let mut interrupted = None;
        while group.len() < PULL_BATCH {
            match messages.next().now_or_never() {
                Some(Some(Ok(message))) => group.push(message),
                Some(Some(Err(e))) => {
                    interrupted = Some(e.to_string());
                    break;
                }
                Some(None) => {
                    messages = next_batch(&consumer).await?;
                    break;
                }
                None => break,
            }
        }
        let sequences: Vec<u64> = group
            .iter()
            .map(|m| m.info().map_or(0, |i| i.stream_sequence))
            .collect();
        if context
            .catch_up_before(&mut stream, &mut consumer, &mut cursor, &sequences)
            .await
        {
            context.deliver_group(group).await?;
        } else {
            context.hand_back(group).await?;
        }
        if let Some(reason) = interrupted {
            return Err(reason);
        }
    }
}

/// A delivered message and its envelope, if it decodes.
type Delivered = (
    jetstream::Message,
    Result<EventEnvelope, prost::DecodeError>,
);

impl<H: Handler> Context<'_, H> {
    /// Applies a group of delivered messages in lanes (see
    /// [`Handler::lane`]): each lane's messages one after another in the
    /// order they came, the lanes side by side, so that their commits meet
    /// in one group commit of the log (one write, one fsync) instead of one
    /// each. A message without a lane (or one that does not decode) is a
    /// barrier: the lanes before it finish first, then it alone.
    async fn deliver_group(&self, group: Vec<jetstream::Message>) -> Result<(), String> {
        let mut lanes: Vec<Vec<Delivered>> = Vec::new();
        let mut lane_of: std::collections::HashMap<String, usize> =
            std::collections::HashMap::new();
        for message in group {
            let decoded = EventEnvelope::decode(message.payload.as_ref());
            let lane = decoded.as_ref().ok().and_then(|e| self.handler.lane(e));
            match lane {
                Some(lane) => {
                    let index = *lane_of.entry(lane).or_insert_with(|| {
                        lanes.push(Vec::new());
                        lanes.len() - 1
                    });
                    lanes[index].push((message, decoded));
                }
                None => {
                    self.run_lanes(std::mem::take(&mut lanes)).await?;
                    lane_of.clear();
                    self.deliver_traced((message, decoded)).await?;
                }
            }
        }
        self.run_lanes(lanes).await
    }

    /// Runs lanes side by side; the first failure is the answer, once every
    /// lane has stopped (what a failed lane left is delivered again).
    async fn run_lanes(&self, lanes: Vec<Vec<Delivered>>) -> Result<(), String> {
        if lanes.is_empty() {
            return Ok(());
        }
        let outcomes = futures::future::join_all(lanes.into_iter().map(|lane| async move {
            for delivered in lane {
                self.deliver_traced(delivered).await?;
            }
            Ok::<(), String>(())
        }))
        .await;
        outcomes.into_iter().collect()
    }

    /// [`Context::deliver`] within a span naming the event.
    async fn deliver_traced(&self, (message, decoded): Delivered) -> Result<(), String> {
        let span = match &decoded {
            Ok(event) => tracing::info_span!("consume", consumer = %self.name(),
                event_id = %event.event_id, event_type = %event.event_type,
                correlation_id = %event.correlation_id),
            Err(_) => tracing::info_span!("consume", consumer = %self.name(),
                subject = %message.subject),
        };
        // The work continues the trace of the work that wrote the event:
        // its header, else its envelope.
        let header = message
            .headers
            .as_ref()
            .and_then(|h| h.get(crate::publish::TRACE_PARENT_HEADER))
            .map(|v| v.as_str().to_string());
        let traceparent = header.unwrap_or_else(|| {
            decoded
                .as_ref()
                .map(|e| e.trace_parent.clone())
                .unwrap_or_default()
        });
        lineguard_eventlog::trace::adopt(&span, &traceparent);
        // The span goes with the future (`instrument`), never entered across
        // an await: a guard held over an await is dropped on another thread,
        // and tracing-subscriber's registry panicked on it, which killed the
        // consumer task silently under load.
        self.deliver(message, decoded).instrument(span).await
    }
}

#[cfg(test)]
mod tests {
    use super::{BusProgress, ReconcileMarks, reconcile_through};
    use std::time::Duration;

    #[test]
    fn a_reconciling_leaves_to_the_bus_what_it_is_still_delivering() {
        let bus = |delivering, pending, delivered, published_through| BusProgress {
            delivering,
            pending,
            delivered,
            published_through,
        };
        // The bus holds messages and delivers: the source is read only to
        // what it delivered, or to the head of one sweep ago if less.
        assert_eq!(reconcile_through(100, bus(true, true, 40, 90)), 40);
        assert_eq!(reconcile_through(100, bus(true, true, 140, 150)), 100);
        // It holds nothing for the consumer but delivers: the source's
        // relay is behind, and what is still in its outbox is left to it.
        assert_eq!(reconcile_through(100, bus(true, false, 40, 70)), 70);
        assert_eq!(reconcile_through(100, bus(true, false, 40, 170)), 100);
        // Nothing delivered for a sweep (a stalled bus, or a stalled
        // relay): up to the head of one sweep ago.
        assert_eq!(reconcile_through(100, bus(false, true, 40, 70)), 100);
        assert_eq!(reconcile_through(100, bus(false, false, 0, 0)), 100);
    }

    #[test]
    fn the_bus_is_quiet_for_the_time_waited_on_it_since_it_was_last_heard() {
        let marks = ReconcileMarks::new();
        marks.delivered(40);
        assert_eq!(marks.quiet_for(), Duration::ZERO);
        // Waits add up; the time between them (the consumer applying,
        // sweeping, reconciling) is not the bus's and is never noted.
        marks.waited(Duration::from_secs(4));
        marks.waited(Duration::from_secs(7));
        assert_eq!(marks.quiet_for(), Duration::from_secs(11));
        // A redelivery of an older event: the bus is alive, the delivered
        // mark stays.
        marks.delivered(12);
        assert_eq!(
            marks
                .delivered_through
                .load(std::sync::atomic::Ordering::Relaxed),
            40
        );
        assert_eq!(marks.quiet_for(), Duration::ZERO);
        // A message handed back unapplied is the bus alive too.
        marks.waited(Duration::from_secs(30));
        marks.heard_from_bus();
        assert_eq!(marks.quiet_for(), Duration::ZERO);
        // Waiting never wraps round to "just heard".
        marks.waited(Duration::MAX);
        marks.waited(Duration::from_secs(1));
        assert_eq!(marks.quiet_for(), Duration::from_micros(u64::MAX));
    }
}
