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

use async_nats::jetstream;
use bytes::Bytes;
use lineguard_eventlog::{EventLog, StoredEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::publish::{BatchError, MAX_ATOMIC_BATCH_MESSAGES, Outgoing, publish_atomically};
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
    /// Events peeked from the outbox and published together (a long run as
    /// one atomic batch per stream): 1 to [`MAX_ATOMIC_BATCH_MESSAGES`].
    pub batch: usize,
    /// First wait after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub stream: StreamSettings,
    pub mirror: Option<Mirror>,
    /// A run of at least this many events goes as one atomic batch per
    /// stream, where the streams take them: a backlog (after a NATS outage,
    /// under overload) drains at one store sync a run. A shorter run, the
    /// usual one when the relay keeps up, goes a message at a time,
    /// pipelined, as it always has: batching every run, the e2e benchmark
    /// saw call → crew at 100 calls/s 2.5x slower than the last build that
    /// did not (on another machine: not yet compared on one), so short runs
    /// keep the measured path. `usize::MAX`: never batch.
    pub batch_from_events: usize,
}

/// The default [`RelayConfig::batch_from_events`]: a quarter of a full run.
/// A relay that finds a quarter of its run waiting is behind, and one sync
/// for the run is then worth more than the first message's wait for the
/// commit.
pub const DEFAULT_BATCH_FROM_EVENTS: usize = 64;

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 256,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            stream: StreamSettings::default(),
            mirror: None,
            batch_from_events: DEFAULT_BATCH_FROM_EVENTS,
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
        assert!(
            (1..=MAX_ATOMIC_BATCH_MESSAGES).contains(&config.batch),
            "a relay's batch is 1 to {MAX_ATOMIC_BATCH_MESSAGES} events (one atomic batch), not {}",
            config.batch
        );
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
    // `None` until the streams are made sure of (and whether every one
    // takes atomic batches known).
    let mut mode = None;
    loop {
        if *stopped.borrow() {
            return;
        }
        let step = async {
            if let Some(mode) = mode.as_mut() {
                publish_batch(&log, &jetstream, config.batch, config.mirror.as_ref(), mode).await
            } else {
                let mut atomic = ensure_stream(&jetstream, log.service(), &config.stream)
                    .await
                    .map_err(|e| e.to_string())?
                    .atomic_batches;
                if let Some(mirror) = &config.mirror {
                    atomic &= ensure_stream(&jetstream, mirror.stream_name, &config.stream)
                        .await
                        .map_err(|e| e.to_string())?
                        .atomic_batches;
                }
                if !atomic {
                    tracing::warn!(
                        service = log.service(),
                        "the server takes no atomic batches (nats-server 2.12 or later does): \
                         the relay publishes one message at a time"
                    );
                }
                mode = Some(if atomic {
                    Mode::Atomic {
                        from_events: config.batch_from_events,
                    }
                } else {
                    Mode::OneByOne
                });
                Ok(Published::Some)
            }
        };
        // Stopping mid-step is safe: what was published but not yet cleared
        // is published again and de-duplicated by its message id (a batch
        // cut short never commits; the server discards it).
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

enum Published {
    Some,
    Nothing,
}

/// How the relay publishes a peeked run of its outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One atomic batch per stream (one store sync for the run) for a run
    /// of at least `from_events` events; a shorter one message at a time.
    Atomic { from_events: usize },
    /// One publish per message (the stream takes no batches).
    OneByOne,
}

/// One event's messages: its own, and its mirror's if it has one.
struct EventMessages {
    position: u64,
    own: Outgoing,
    mirrored: Option<Outgoing>,
}

/// Publishes up to `batch` outbox events and clears those acknowledged.
/// In [`Mode::Atomic`] a long run goes out as one batch per stream, cleared
/// whole once every batch committed; a batch JetStream refuses for a
/// message it already has (a publish whose clearing a crash lost) is
/// published again one by one, where each duplicate is dropped on its own.
async fn publish_batch(
    log: &EventLog,
    jetstream: &jetstream::Context,
    batch: usize,
    mirror: Option<&Mirror>,
    mode: &mut Mode,
) -> Result<Published, String> {
    let reader = log.clone();
    let events = tokio::task::spawn_blocking(move || reader.outbox_peek(batch))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if events.is_empty() {
        return Ok(Published::Nothing);
    }
    let mut run = Vec::with_capacity(events.len());
    let mut failure = None;
    for event in &events {
        let mirrored = match mirror.map(|m| (m.message)(event)).transpose() {
            Ok(mirrored) => mirrored.flatten(),
            Err(e) => {
                // Stop at it: nothing after it is published before it.
                failure = Some(format!("event {}: {e}", event.event_id()));
                break;
            }
        };
        // The envelope exactly as committed: nothing decoded, nothing copied.
        let message = |subject: String, payload: Bytes| Outgoing {
            subject,
            payload,
            message_id: event.event_id().to_owned(),
            // The trace travels in the header too (and in the envelope,
            // for a consumer that reads the event from a log).
            trace_parent: event.trace_parent().to_owned(),
        };
        run.push(EventMessages {
            position: event.position(),
            own: message(
                event_subject(event.source(), event.event_type(), event.correlation_id()),
                event.envelope_bytes().clone(),
            ),
            mirrored: mirrored.map(|(subject, payload)| message(subject, payload)),
        });
    }
    let acked = match *mode {
        _ if run.is_empty() => Vec::new(),
        Mode::Atomic { from_events } if run.len() >= from_events => {
            match publish_atomic_run(jetstream, &run).await {
                Ok(()) => run.iter().map(|e| e.position).collect(),
                Err(BatchError::Failed(reason)) => {
                    // Nothing is known stored: the run is published again.
                    failure.get_or_insert(reason);
                    Vec::new()
                }
                Err(refused) => {
                    if let BatchError::Unsupported(reason) = &refused {
                        tracing::warn!(service = log.service(), %reason,
                        "the stream takes no atomic batches: the relay publishes one message at a time");
                        *mode = Mode::OneByOne;
                    }
                    crate::metrics::BUS_METRICS.relay_runs_one_by_one.inc();
                    publish_one_by_one(jetstream, &run, &mut failure).await
                }
            }
        }
        Mode::Atomic { .. } | Mode::OneByOne => {
            publish_one_by_one(jetstream, &run, &mut failure).await
        }
    };
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

/// Publishes `run` as one atomic batch to the service's stream and one to
/// the mirror's (if any of it is mirrored), side by side. Of two outcomes
/// the one that asks most of the caller wins: a failure (publish it all
/// again later) over a refusal (publish it one by one now).
async fn publish_atomic_run(
    jetstream: &jetstream::Context,
    run: &[EventMessages],
) -> Result<(), BatchError> {
    let own: Vec<Outgoing> = run.iter().map(|e| e.own.clone()).collect();
    let mirrored: Vec<Outgoing> = run.iter().filter_map(|e| e.mirrored.clone()).collect();
    let (own, mirrored) = tokio::join!(publish_atomically(jetstream, &own), async {
        if mirrored.is_empty() {
            Ok(())
        } else {
            publish_atomically(jetstream, &mirrored).await
        }
    });
    let weight = |outcome: &Result<(), BatchError>| match outcome {
        Ok(()) => 0,
        Err(BatchError::Duplicate) => 1,
        Err(BatchError::Unsupported(_)) => 2,
        Err(BatchError::Failed(_)) => 3,
    };
    if weight(&own) >= weight(&mirrored) {
        own
    } else {
        mirrored
    }
}

/// Publishes `run` a message at a time, pipelined, and returns the
/// positions of the acknowledged prefix: what follows a failure (noted in
/// `failure`) is published again, and de-duplicated by its message id, so
/// nothing is skipped.
async fn publish_one_by_one(
    jetstream: &jetstream::Context,
    run: &[EventMessages],
    failure: &mut Option<String>,
) -> Vec<u64> {
    let mut pending = Vec::with_capacity(run.len());
    'events: for event in run {
        let mut acks = Vec::with_capacity(2);
        for message in std::iter::once(&event.own).chain(&event.mirrored) {
            match jetstream
                .send_publish(message.subject.clone(), message.single())
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                    break 'events;
                }
            }
        }
        pending.push((event.position, acks));
    }
    let mut acked = Vec::with_capacity(pending.len());
    'acks: for (position, acks) in pending {
        for ack in acks {
            if let Err(e) = ack.await {
                failure.get_or_insert(e.to_string());
                break 'acks;
            }
        }
        acked.push(position);
    }
    acked
}
