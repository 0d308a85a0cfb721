//! Durable pull consumers with effectively-once processing.
//!
//! For each message the consumer asks its [`Handler`] what to write, adds the
//! inbox mark `(consumer, event id)` to that transaction, commits it to the
//! service's own log in one batch, and only then acknowledges the message. A
//! redelivery (the ack was lost, the process died before acking, the event
//! was published twice) finds the mark and is acknowledged without being
//! applied again.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use lineguard_eventlog::{CommitOutcome, Error as LogError, EventEnvelope, EventLog, Transaction};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tracing::Instrument;

use crate::streams::{StreamSettings, ensure_stream};
use crate::subjects::stream_name;

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
    /// Worth trying again later (a dependency is not ready, an event it needs
    /// has not arrived yet).
    #[error("retry later: {0}")]
    Retry(String),
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
    /// Deliveries of one message before JetStream gives up on it.
    pub max_deliver: i64,
    /// Messages delivered but not yet acknowledged, at most.
    pub max_ack_pending: i64,
    /// Conflicts retried in-process before the message is nak'ed.
    pub conflict_retries: usize,
    /// Delay asked for on a nak.
    pub retry_delay: Duration,
    pub stream: StreamSettings,
}

impl ConsumerConfig {
    /// A consumer named `name` of everything `source_service` publishes.
    pub fn new(name: impl Into<String>, source_service: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            source_service: source_service.into(),
            filter_subjects: Vec::new(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            max_ack_pending: 1_000,
            conflict_retries: 5,
            retry_delay: Duration::from_secs(1),
            stream: StreamSettings::default(),
        }
    }

    /// Restricts the consumer to these subjects.
    pub fn filtered(mut self, subjects: Vec<String>) -> Self {
        self.filter_subjects = subjects;
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
}

impl ConsumerHandle {
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
    let mut attempt = 0;
    loop {
        let (txn, _held_until_committed) = match handler.handle(event).await? {
            Handled::Commit(txn) => (txn, None),
            Handled::CommitHolding(txn, hold) => (txn, Some(hold)),
            Handled::Ignore => (Transaction::default(), None),
        };
        let txn = txn.consuming(consumer, &event.event_id);
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

/// Applies one delivered event and answers JetStream (ack, nak or term).
async fn deliver<H: Handler>(
    log: &EventLog,
    config: &ConsumerConfig,
    handler: &H,
    event: &EventEnvelope,
    message: jetstream::Message,
) -> Result<(), String> {
    match apply_event(log, &config.name, handler, event, config.conflict_retries).await {
        Ok(applied) => {
            tracing::debug!(?applied, "event applied");
            message.ack().await.map_err(|e| e.to_string())?;
        }
        Err(HandlerError::Retry(reason)) => {
            tracing::warn!(%reason, "event not applied; will be redelivered");
            message
                .ack_with(AckKind::Nak(Some(config.retry_delay)))
                .await
                .map_err(|e| e.to_string())?;
        }
        Err(HandlerError::Reject(reason)) => {
            // Kept in the stream for an operator; never silently dropped.
            tracing::error!(%reason, "event rejected by handler; terminating its delivery");
            message
                .ack_with(AckKind::Term)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Messages asked for per pull request.
pub const PULL_BATCH: usize = 64;
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

/// Starts a durable consumer feeding `handler`, committing into `log`.
pub fn spawn_consumer<H: Handler>(
    jetstream: jetstream::Context,
    log: EventLog,
    config: ConsumerConfig,
    handler: H,
) -> ConsumerHandle {
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run(jetstream, log, config, Arc::new(handler), stopped));
    ConsumerHandle { stop, task }
}

async fn run<H: Handler>(
    jetstream: jetstream::Context,
    log: EventLog,
    config: ConsumerConfig,
    handler: Arc<H>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    while !*stopped.borrow() {
        // Each session is a task of its own: if it panics, the consumer
        // says so and starts again instead of stopping without a word.
        let session = tokio::spawn({
            let (jetstream, log, config, handler, mut stopped) = (
                jetstream.clone(),
                log.clone(),
                config.clone(),
                handler.clone(),
                stopped.clone(),
            );
            async move { consume(&jetstream, &log, &config, handler.as_ref(), &mut stopped).await }
        })
        .await
        .unwrap_or_else(|panic| {
            tracing::error!(consumer = %config.name, %panic, "consumer task panicked");
            Err(format!("panicked: {panic}"))
        });
        if let Err(reason) = session {
            tracing::warn!(consumer = %config.name, %reason, retry_in_ms = backoff.as_millis() as u64,
                "consumer interrupted");
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
    log: &EventLog,
    config: &ConsumerConfig,
    handler: &H,
    stopped: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    ensure_stream(jetstream, &config.source_service, &config.stream)
        .await
        .map_err(|e| e.to_string())?;
    let stream = jetstream
        .get_stream(stream_name(&config.source_service))
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
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
    // One pull request at a time, each for a bounded batch that expires:
    // the long-lived `messages()` stream was seen to stop asking for more
    // under load (server: no waiting request, messages delivered to the
    // client but never handed over), which stalled the consumer for good.
    let mut messages = next_batch(&consumer).await?;
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            _ = stopped.changed() => return Ok(()),
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(e.to_string()),
            None => {
                messages = next_batch(&consumer).await?;
                continue;
            }
        };
        let event = match EventEnvelope::decode(message.payload.as_ref()) {
            Ok(event) => event,
            Err(e) => {
                tracing::error!(consumer = %config.name, subject = %message.subject, error = %e,
                    "undecodable envelope; terminating its delivery");
                message
                    .ack_with(AckKind::Term)
                    .await
                    .map_err(|e| e.to_string())?;
                continue;
            }
        };
        let span = tracing::info_span!("consume", consumer = %config.name,
            event_id = %event.event_id, event_type = %event.event_type,
            correlation_id = %event.correlation_id);
        // The span goes with the future (`instrument`), never entered across
        // an await: a guard held over an await is dropped on another thread,
        // and tracing-subscriber's registry panicked on it, which killed the
        // consumer task silently under load.
        deliver(log, config, handler, &event, message)
            .instrument(span)
            .await?;
    }
}
