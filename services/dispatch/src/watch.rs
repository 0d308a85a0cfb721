//! `WatchDispatches`: a crew's events from a sequence number on, then live.
//!
//! The crew's sequence is its stream's version in dispatch's log. The
//! stream is read from the store page by page (on the blocking pool); when
//! it is caught up the watch waits until its crew's stream moves. One
//! notifier task per service follows the log and tells the watches of the
//! crew whose stream an event landed on, so an idle watch costs no read and
//! a commit wakes only the watches it concerns. Nothing is held in memory
//! but one page and a bounded channel: a slow phone slows its own reader,
//! never grows a queue.
//!
//! Watches are bounded: [`MAX_WATCHES_PER_CREW`] per crew and
//! [`MAX_WATCHES`] in all, past which a new one is refused with
//! `RESOURCE_EXHAUSTED`. A phone that reconnects with the same `device_id`
//! replaces its old watch (which ends with `ABORTED`), so a phone whose old
//! connection is still half-open does not hold two slots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lineguard_eventlog::{EventLog, ReadDirection};
use lineguard_protos::dispatch::v1::CrewEvent;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::projection::{CREW_STREAM_PREFIX, crew_stream};

/// Events read from the store at a time.
pub const PAGE: usize = 256;
/// Events waiting for a slow phone at most.
pub const BUFFER: usize = 64;
/// Watches one crew may hold at once (its members' phones, a gateway).
pub const MAX_WATCHES_PER_CREW: usize = 8;
/// Watches the service holds at once.
pub const MAX_WATCHES: usize = 4_096;
/// How often an idle watch reads its stream even without a signal: a
/// safety net should the notifier be restarting, never the normal path.
pub const IDLE_RECHECK: Duration = Duration::from_secs(30);

struct Slot {
    id: u64,
    device_id: String,
    /// Tells the watch it was replaced by a newer one from the same device.
    replaced: watch::Sender<bool>,
}

struct CrewWatches {
    slots: Vec<Slot>,
    /// The crew stream's last version seen by the notifier.
    moved: watch::Sender<u64>,
}

#[derive(Default)]
struct Registry {
    crews: HashMap<String, CrewWatches>,
    total: usize,
    next_id: u64,
}

/// Every live `WatchDispatches` of the service.
pub struct Watchers {
    log: EventLog,
    registry: Mutex<Registry>,
}

/// A watch's place in the [`Watchers`]; given back when dropped.
pub struct Registration {
    watchers: Arc<Watchers>,
    crew_id: String,
    id: u64,
    moved: watch::Receiver<u64>,
    replaced: watch::Receiver<bool>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.watchers.release(&self.crew_id, self.id);
    }
}

impl Watchers {
    /// The watches of `log`'s crews, with their notifier running.
    pub fn start(log: EventLog) -> Arc<Watchers> {
        let watchers = Arc::new(Watchers {
            log: log.clone(),
            registry: Mutex::new(Registry::default()),
        });
        tokio::spawn(notify(Arc::downgrade(&watchers), log));
        watchers
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding it cannot leave the counts half-changed:
        // every change below is complete before anything can panic.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Watches currently held, in all.
    pub fn count(&self) -> usize {
        self.registry().total
    }

    /// Crews with at least one watch held.
    ///
    /// Every entry of the registry holds a watch: an entry is made only for
    /// a watch that is granted and removed with its crew's last watch, so
    /// this is the registry's size (asserted in debug builds).
    pub fn crews_connected(&self) -> usize {
        let registry = self.registry();
        debug_assert!(registry.crews.values().all(|c| !c.slots.is_empty()));
        registry.crews.len()
    }

    /// Takes a slot for a watch of `crew_id` from `device_id` (empty: a
    /// watch that replaces nothing).
    pub fn register(
        self: &Arc<Self>,
        crew_id: &str,
        device_id: &str,
    ) -> Result<Registration, Status> {
        let mut registry = self.registry();
        let Registry {
            crews,
            total,
            next_id,
        } = &mut *registry;
        // Refuse before an entry is made for the crew: a refused watch must
        // leave nothing behind. A phone replacing its own watch frees a slot
        // first, so it is never refused by the service's limit.
        let replaces_own = !device_id.is_empty()
            && crews
                .get(crew_id)
                .is_some_and(|c| c.slots.iter().any(|s| s.device_id == device_id));
        if *total >= MAX_WATCHES && !replaces_own {
            return Err(Status::resource_exhausted(format!(
                "dispatch holds {MAX_WATCHES} watches, its limit; try again later"
            )));
        }
        let crew = crews
            .entry(crew_id.to_string())
            .or_insert_with(|| CrewWatches {
                slots: Vec::new(),
                moved: watch::channel(0).0,
            });
        if !device_id.is_empty()
            && let Some(at) = crew.slots.iter().position(|s| s.device_id == device_id)
        {
            let old = crew.slots.swap_remove(at);
            old.replaced.send_replace(true);
            *total -= 1;
        }
        if crew.slots.len() >= MAX_WATCHES_PER_CREW {
            // Only an existing crew can be full, so no empty entry is left.
            return Err(Status::resource_exhausted(format!(
                "crew {crew_id} already has {MAX_WATCHES_PER_CREW} watches open; \
                 close one, or reconnect with the same device_id to replace it"
            )));
        }
        debug_assert!(*total < MAX_WATCHES);
        *next_id += 1;
        let (replaced, replaced_rx) = watch::channel(false);
        crew.slots.push(Slot {
            id: *next_id,
            device_id: device_id.to_string(),
            replaced,
        });
        *total += 1;
        Ok(Registration {
            watchers: self.clone(),
            crew_id: crew_id.to_string(),
            id: *next_id,
            moved: crew.moved.subscribe(),
            replaced: replaced_rx,
        })
    }

    fn release(&self, crew_id: &str, id: u64) {
        let mut registry = self.registry();
        let Registry { crews, total, .. } = &mut *registry;
        if let Some(crew) = crews.get_mut(crew_id) {
            if let Some(at) = crew.slots.iter().position(|s| s.id == id) {
                crew.slots.swap_remove(at);
                *total -= 1;
            }
            if crew.slots.is_empty() {
                crews.remove(crew_id);
            }
        }
    }

    /// Tells the watches of `crew_id` that its stream reached `version`.
    fn crew_moved(&self, crew_id: &str, version: u64) {
        if let Some(crew) = self.registry().crews.get(crew_id) {
            crew.moved.send_replace(version);
        }
    }

    /// Starts following `crew_id`'s stream after `after_sequence`, in the
    /// slot `registration` holds.
    pub fn follow(
        &self,
        registration: Registration,
        after_sequence: u64,
    ) -> mpsc::Receiver<Result<CrewEvent, Status>> {
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(follow(self.log.clone(), registration, after_sequence, tx));
        rx
    }
}

/// Follows the log from its head and signals the crews whose streams move.
async fn notify(watchers: Weak<Watchers>, log: EventLog) {
    let mut from = log.head() + 1;
    loop {
        let mut subscription = match log.subscribe(from) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "crew notifier cannot subscribe; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if watchers.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        while let Some(next) = subscription.next_event().await {
            let Some(watchers) = watchers.upgrade() else {
                return;
            };
            match next {
                Ok(event) => {
                    from = event.global_position + 1;
                    if let Some(crew) = event.stream_id.strip_prefix(CREW_STREAM_PREFIX) {
                        watchers.crew_moved(crew, event.stream_version);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "crew notifier read failed; resubscribing");
                    break;
                }
            }
        }
        if watchers.strong_count() == 0 {
            return; // the service is gone, or the log closed
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn follow(
    log: EventLog,
    mut registration: Registration,
    after_sequence: u64,
    tx: mpsc::Sender<Result<CrewEvent, Status>>,
) {
    let crew_id = registration.crew_id.clone();
    let stream = crew_stream(&crew_id);
    let mut next = after_sequence + 1;
    loop {
        registration.moved.borrow_and_update();
        let reader = log.clone();
        let id = stream.clone();
        let page = tokio::task::spawn_blocking(move || {
            reader.read_stream(&id, next, ReadDirection::Forward, PAGE)
        })
        .await;
        let events = match page {
            Ok(Ok(slice)) => slice.events,
            // Nothing for this crew yet: wait for its first event.
            Ok(Err(lineguard_eventlog::Error::StreamNotFound { .. })) => Vec::new(),
            Ok(Err(e)) => {
                let _ = tx.send(Err(Status::from(e))).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                return;
            }
        };
        if events.is_empty() {
            tokio::select! {
                changed = registration.moved.changed() => if changed.is_err() { return },
                _ = registration.replaced.changed() => {
                    let _ = tx.send(Err(Status::aborted(
                        "replaced by a newer watch from the same device"))).await;
                    return;
                }
                () = tx.closed() => return,
                () = tokio::time::sleep(IDLE_RECHECK) => {},
            }
            continue;
        }
        for event in events {
            next = event.stream_version + 1;
            let sequence = event.stream_version;
            let crew_event = match CrewEvent::typed(&crew_id, sequence, event) {
                Ok(crew_event) => crew_event,
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::data_loss(format!(
                            "crew event {sequence} does not decode: {e}"
                        ))))
                        .await;
                    return;
                }
            };
            tokio::select! {
                sent = tx.send(Ok(crew_event)) => if sent.is_err() { return },
                _ = registration.replaced.changed() => {
                    let _ = tx.try_send(Err(Status::aborted(
                        "replaced by a newer watch from the same device")));
                    return;
                }
            }
        }
    }
}
