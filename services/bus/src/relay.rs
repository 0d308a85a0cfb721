//! The outbox relay: publishes committed events to JetStream in log order and
//! clears each outbox entry only after JetStream has acknowledged it.
//!
//! Every message carries `Nats-Msg-Id` = event id, so a re-publish after a
//! crash (the entry was published but not yet cleared) is dropped by
//! JetStream within its duplicate window, and recognised by the consumers'
//! inbox after it. While NATS is down, the relay retries with capped
//! exponential backoff; commits keep landing in the log's outbox meanwhile
//! (up to [`Limits::max_outbox_backlog`](lineguard_eventlog::Limits)).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use lineguard_eventlog::{EventLog, StoredEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::streams::{StreamSettings, ensure_stream};
use crate::subjects::event_subject;

/// A second subject some events are also published on, in another
/// JetStream stream (`LINEGUARD_<STREAM_NAME>`, capturing
/// `lineguard.<stream_name>.>`), as a message of the mirror's own making.
/// Dispatch uses it to put each crew's events on `lineguard.crew.<crew
/// id>.…` as typed `CrewEvent`s. An outbox entry is cleared only when every
/// subject it goes to has acknowledged it.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// The second stream's name, as a service name is used: `crew`.
    pub stream_name: &'static str,
    /// The event's second subject and the payload published there, or
    /// `None` to publish it once. An `Err` (an event that cannot be made
    /// into the mirror's message) stops the relay at that event, retrying,
    /// as a failed publish does: nothing is skipped.
    pub message: fn(&StoredEvent) -> Result<Option<MirrorMessage>, String>,
}

/// A mirrored event as published: its subject and its payload.
pub type MirrorMessage = (String, Bytes);

/// How the relay paces itself.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events published before their acks are awaited.
    pub batch: usize,
    /// First wait after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub stream: StreamSettings,
    pub mirror: Option<Mirror>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 256,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            stream: StreamSettings::default(),
            mirror: None,
        }
    }
}

/// A running relay. Dropping it does not stop it; call [`OutboxRelay::stop`].
pub struct OutboxRelay {
    log: EventLog,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    progress: Arc<Mutex<Progress>>,
}

/// When the relay last got somewhere, and the last reason it could not.
#[derive(Debug)]
struct Progress {
    /// The last time the outbox was empty or a batch was acknowledged.
    at: Instant,
    last_error: Option<String>,
}

/// The relay's state, for health: is the outbox draining?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayHealth {
    /// Events committed and not yet acknowledged by JetStream.
    pub backlog: u64,
    /// With a backlog: how long since the relay last got an event
    /// acknowledged (or last saw the outbox empty). Zero without one.
    pub stalled_for: Duration,
    /// Why the last attempt failed, if it did and nothing has gone since.
    pub last_error: Option<String>,
}

impl OutboxRelay {
    /// Starts relaying `log`'s outbox to `jetstream`.
    pub fn spawn(log: EventLog, jetstream: jetstream::Context, config: RelayConfig) -> Self {
        let (stop, stopped) = watch::channel(false);
        let progress = Arc::new(Mutex::new(Progress {
            at: Instant::now(),
            last_error: None,
        }));
        let task = tokio::spawn(relay(
            log.clone(),
            jetstream,
            config,
            stopped,
            progress.clone(),
        ));
        OutboxRelay {
            log,
            stop,
            task,
            progress,
        }
    }

    /// A handle that reads the relay's health (see [`RelayMonitor`]).
    pub fn monitor(&self) -> RelayMonitor {
        RelayMonitor {
            log: self.log.clone(),
            progress: self.progress.clone(),
        }
    }

    /// Waits until the outbox is empty, or `timeout` passes. Returns whether it emptied.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.log.outbox_backlog() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Stops the relay after its current batch.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Reads a relay's health from another task (a health reporter). Once the
/// relay is stopped, a waiting backlog reads as stuck.
#[derive(Debug, Clone)]
pub struct RelayMonitor {
    log: EventLog,
    progress: Arc<Mutex<Progress>>,
}

impl RelayMonitor {
    /// Whether the outbox is draining: its backlog and how long it has
    /// been stuck.
    pub fn health(&self) -> RelayHealth {
        let backlog = self.log.outbox_backlog();
        let progress = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        RelayHealth {
            backlog,
            stalled_for: if backlog == 0 {
                Duration::ZERO
            } else {
                progress.at.elapsed()
            },
            last_error: progress.last_error.clone(),
        }
    }
}

async fn relay(
    log: EventLog,
    jetstream: jetstream::Context,
    config: RelayConfig,
    mut stopped: watch::Receiver<bool>,
    progress: Arc<Mutex<Progress>>,
) {
    let went = |error: Option<String>| {
        let mut p = progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if error.is_none() {
            p.at = Instant::now();
        }
        p.last_error = error;
    };
    let mut head = log.watch_head();
    let mut backoff = config.initial_backoff;
    let mut stream_ready = false;
    loop {
        if *stopped.borrow() {
            return;
        }
        let step = async {
            if stream_ready {
                publish_batch(&log, &jetstream, config.batch, config.mirror.as_ref()).await
            } else {
                ensure_stream(&jetstream, log.service(), &config.stream)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Some(mirror) = &config.mirror {
                    ensure_stream(&jetstream, mirror.stream_name, &config.stream)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                stream_ready = true;
                Ok(Published::Some)
            }
        };
        // Stopping mid-step is safe: what was published but not yet cleared
        // is published again and de-duplicated by its message id.
        let outcome = tokio::select! {
            outcome = step => outcome,
            _ = stopped.changed() => return,
        };
        match outcome {
            Ok(Published::Some) => {
                went(None);
                backoff = config.initial_backoff;
            }
            Ok(Published::Nothing) => {
                went(None);
                backoff = config.initial_backoff;
                tokio::select! {
                    changed = head.changed() => if changed.is_err() { return },
                    _ = stopped.changed() => {},
                }
            }
            Err(reason) => {
                tracing::warn!(service = log.service(), backlog = log.outbox_backlog(),
                    retry_in_ms = backoff.as_millis() as u64, %reason, "outbox relay cannot publish");
                went(Some(reason));
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {},
                    _ = stopped.changed() => {},
                }
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
    }
}

/// The NATS header carrying an event's W3C trace context.
pub const TRACE_PARENT_HEADER: &str = "traceparent";

enum Published {
    Some,
    Nothing,
}

/// Publishes up to `batch` outbox events and clears those acknowledged.
async fn publish_batch(
    log: &EventLog,
    jetstream: &jetstream::Context,
    batch: usize,
    mirror: Option<&Mirror>,
) -> Result<Published, String> {
    let reader = log.clone();
    let events = tokio::task::spawn_blocking(move || reader.outbox_peek(batch))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if events.is_empty() {
        return Ok(Published::Nothing);
    }
    let mut pending = Vec::with_capacity(events.len());
    let mut failure = None;
    'events: for event in &events {
        // The envelope exactly as committed: nothing decoded, nothing copied.
        let payload = event.envelope_bytes();
        let second = match mirror.map(|m| (m.message)(event)).transpose() {
            Ok(second) => second.flatten(),
            Err(e) => {
                failure = Some(format!("event {}: {e}", event.event_id()));
                break 'events;
            }
        };
        let mut acks = Vec::with_capacity(2);
        let subject = event_subject(event.source(), event.event_type(), event.correlation_id());
        for (subject, payload) in std::iter::once((subject, payload.clone())).chain(second) {
            let mut publish = PublishMessage::build()
                .payload(payload)
                .message_id(event.event_id());
            // The trace travels in the header too (and in the envelope,
            // for a consumer that reads the event from a log).
            if !event.trace_parent().is_empty() {
                publish = publish.header(TRACE_PARENT_HEADER, event.trace_parent());
            }
            match jetstream.send_publish(subject, publish).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    failure = Some(e.to_string());
                    break 'events;
                }
            }
        }
        pending.push((event.position(), acks));
    }
    // Clear only the acknowledged prefix: what follows a failure is published
    // again (and de-duplicated by its message id) so nothing is skipped.
    let mut acked = Vec::with_capacity(pending.len());
    'acks: for (position, acks) in pending {
        for ack in acks {
            if let Err(e) = ack.await {
                failure = Some(e.to_string());
                break 'acks;
            }
        }
        acked.push(position);
    }
    if !acked.is_empty() {
        crate::metrics::BUS_METRICS
            .relay_published
            .inc_by(acked.len() as u64);
        let clearer = log.clone();
        tokio::task::spawn_blocking(move || clearer.outbox_clear(&acked))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    match failure {
        Some(reason) => Err(reason),
        None => Ok(Published::Some),
    }
}
