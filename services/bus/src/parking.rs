//! Parked events and dead letters: nothing a consumer is given is dropped.
//!
//! A consumer that cannot apply an event now records it in its own log:
//!
//! - **parked** ([`EventParked`]) when the event arrived before what it
//!   depends on (a route before the report it routes): the handler names
//!   the key it waits for ([`HandlerError::Waiting`](crate::HandlerError)),
//!   and the event is applied the moment an event that satisfies that key
//!   is applied by any consumer of the same log ([`ParkingLot::wake`]), or
//!   at the latest at the consumer's next sweep;
//! - **dead-lettered** ([`EventDeadLettered`]) when it failed for any other
//!   reason (malformed for the handler, refused by the log, still failing
//!   after the retry budget): counted, listed (`ticketctl deadletters`) and
//!   sent back through its consumer on an operator's request
//!   ([`DeadLetterRetried`]).
//!
//! Both are events (unpublished, stream `consumer-<consumer>`) and the
//! records below are projections of them, kept by [`ParkingProjector`]
//! around the service's own projector, so they survive restarts and rebuild
//! from the log like every other view:
//!
//! | key | value |
//! | --- | --- |
//! | `bus/parked/<consumer>/<event id>` | [`EventParked`] |
//! | `bus/waiting/<consumer>/<key>\0<event id>` | empty: parked events by what they wait for |
//! | `bus/dead/<consumer>/<event id>` | [`EventDeadLettered`] |
//! | `bus/count/parked/<consumer>`, `bus/count/dead/<consumer>` | u64, big-endian |

use std::sync::Arc;

use lineguard_eventlog::{EventEnvelope, EventTypes, ProjectionView, Projector, decode_payload};
use lineguard_protos::bus::v1::{
    DeadLetterRetried, EventDeadLettered, EventParked, ParkedEventApplied,
};
use prost::{Message, Name};
use tokio::sync::broadcast;

/// Bumped when the parking projection changes meaning.
const PARKING_PROJECTION_VERSION: u32 = 1;

/// The log stream holding a consumer's parking and dead-letter events.
pub fn consumer_stream(consumer: &str) -> String {
    format!("consumer-{consumer}")
}

/// Adds the parking events to a service's event types.
pub fn with_parking_events(types: EventTypes) -> EventTypes {
    types
        .with::<EventParked>(1)
        .with::<ParkedEventApplied>(1)
        .with::<EventDeadLettered>(1)
        .with::<DeadLetterRetried>(1)
}

/// Whether `event_type` is one of the bus's own bookkeeping events (not a
/// fact about a ticket: replays leave them out).
pub fn is_parking_event(event_type: &str) -> bool {
    event_type.starts_with("lineguard.bus.")
}

/// Key of a consumer's parked event.
pub fn parked_key(consumer: &str, event_id: &str) -> Vec<u8> {
    format!("bus/parked/{consumer}/{event_id}").into_bytes()
}

/// Prefix of every parked event of `consumer` (empty: of every consumer).
pub fn parked_prefix(consumer: &str) -> Vec<u8> {
    if consumer.is_empty() {
        b"bus/parked/".to_vec()
    } else {
        format!("bus/parked/{consumer}/").into_bytes()
    }
}

/// Prefix of the parked events of `consumer` waiting for `key`.
pub fn waiting_prefix(consumer: &str, key: &str) -> Vec<u8> {
    let mut k = format!("bus/waiting/{consumer}/{key}").into_bytes();
    k.push(0);
    k
}

fn waiting_key(consumer: &str, key: &str, event_id: &str) -> Vec<u8> {
    let mut k = waiting_prefix(consumer, key);
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// Key of a consumer's dead letter.
pub fn dead_key(consumer: &str, event_id: &str) -> Vec<u8> {
    format!("bus/dead/{consumer}/{event_id}").into_bytes()
}

/// Prefix of every dead letter of `consumer` (empty: of every consumer).
pub fn dead_prefix(consumer: &str) -> Vec<u8> {
    if consumer.is_empty() {
        b"bus/dead/".to_vec()
    } else {
        format!("bus/dead/{consumer}/").into_bytes()
    }
}

/// Prefix of the counters of parked events (`parked`) or dead letters (`dead`).
pub fn count_prefix(what: &str) -> Vec<u8> {
    format!("bus/count/{what}/").into_bytes()
}

fn count_key(what: &str, consumer: &str) -> Vec<u8> {
    let mut k = count_prefix(what);
    k.extend_from_slice(consumer.as_bytes());
    k
}

/// A stored counter's value.
pub fn decode_count(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn add_count(
    view: &mut ProjectionView<'_>,
    what: &str,
    consumer: &str,
    delta: i64,
) -> Result<(), String> {
    let key = count_key(what, consumer);
    let now = view
        .get(&key)
        .map_err(|e| e.to_string())?
        .map_or(0, |b| decode_count(&b));
    let next = now
        .checked_add_signed(delta)
        .ok_or_else(|| format!("{what} count of {consumer} would fall below zero"))?;
    if next == 0 {
        view.delete(key);
    } else {
        view.put(key, next.to_be_bytes().to_vec());
    }
    Ok(())
}

/// Removes a parked record (and its waiting entry) if there is one.
fn unpark(view: &mut ProjectionView<'_>, consumer: &str, event_id: &str) -> Result<(), String> {
    let key = parked_key(consumer, event_id);
    if let Some(old) = view.get_message::<EventParked>(&key)? {
        view.delete(waiting_key(consumer, &old.waiting_for, event_id));
        view.delete(key);
        add_count(view, "parked", consumer, -1)?;
    }
    Ok(())
}

fn park(view: &mut ProjectionView<'_>, parked: &EventParked) -> Result<(), String> {
    unpark(view, &parked.consumer, &parked.event_id)?;
    view.put(
        waiting_key(&parked.consumer, &parked.waiting_for, &parked.event_id),
        Vec::new(),
    );
    view.put(
        parked_key(&parked.consumer, &parked.event_id),
        parked.encode_to_vec(),
    );
    add_count(view, "parked", &parked.consumer, 1)
}

/// The service's projector with the parking records kept beside its own
/// views: the bus's events here, every other event to `inner`.
pub struct ParkingProjector {
    inner: Arc<dyn Projector>,
}

impl ParkingProjector {
    /// Wraps a service's projector.
    pub fn wrap(inner: Arc<dyn Projector>) -> Arc<dyn Projector> {
        Arc::new(ParkingProjector { inner })
    }
}

impl Projector for ParkingProjector {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn version(&self) -> u32 {
        // Either side changing its meaning rebuilds the projections.
        self.inner.version() + (PARKING_PROJECTION_VERSION << 16)
    }

    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
        let t = event.event_type.as_str();
        if !is_parking_event(t) {
            return self.inner.apply(event, view);
        }
        if t == EventParked::full_name() {
            let e: EventParked = decode_payload(event)?;
            park(view, &e)?;
        } else if t == ParkedEventApplied::full_name() {
            let e: ParkedEventApplied = decode_payload(event)?;
            unpark(view, &e.consumer, &e.event_id)?;
        } else if t == EventDeadLettered::full_name() {
            let e: EventDeadLettered = decode_payload(event)?;
            unpark(view, &e.consumer, &e.event_id)?;
            let key = dead_key(&e.consumer, &e.event_id);
            if view.get(&key).map_err(|e| e.to_string())?.is_none() {
                add_count(view, "dead", &e.consumer, 1)?;
            }
            view.put(key, e.encode_to_vec());
        } else if t == DeadLetterRetried::full_name() {
            let e: DeadLetterRetried = decode_payload(event)?;
            let key = dead_key(&e.consumer, &e.event_id);
            let dead: EventDeadLettered = view
                .get_message(&key)?
                .ok_or_else(|| format!("no dead letter {} of {}", e.event_id, e.consumer))?;
            view.delete(key);
            add_count(view, "dead", &e.consumer, -1)?;
            park(
                view,
                &EventParked {
                    consumer: e.consumer.clone(),
                    event_id: e.event_id.clone(),
                    waiting_for: retry_key(&e.event_id),
                    reason: format!("retried by {}", e.requested_by),
                    envelope: dead.envelope,
                    subject: dead.subject,
                    parked_at: e.retried_at,
                },
            )?;
        } else {
            return Err(format!("the bus does not project {t}"));
        }
        Ok(())
    }
}

/// What a dead letter sent back by an operator waits for: its own retry.
pub fn retry_key(event_id: &str) -> String {
    format!("retry:{event_id}")
}

/// Wakes from one log's consumers to each other: "these keys just landed".
/// One per service log, shared by all its consumers and its `Consumers`
/// API. A wake that is missed (a consumer lagging behind the channel, or
/// not running) costs only time: every consumer also sweeps its parked
/// events at start and every `parked_sweep`.
#[derive(Clone, Debug)]
pub struct ParkingLot {
    wakes: broadcast::Sender<Arc<[String]>>,
}

/// Wakes held for a consumer that has not yet taken them; past this it
/// sweeps all its parked events instead.
pub const WAKE_BUFFER: usize = 1_024;

impl Default for ParkingLot {
    fn default() -> Self {
        ParkingLot {
            wakes: broadcast::channel(WAKE_BUFFER).0,
        }
    }
}

impl ParkingLot {
    /// A lot with no consumers yet.
    pub fn new() -> Self {
        ParkingLot::default()
    }

    /// Tells every consumer of the log that events satisfying `keys` were
    /// just committed.
    pub fn wake(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        // No receiver (no consumer running) is fine: the sweep finds them.
        let _ = self.wakes.send(keys.into());
    }

    /// A consumer's end of the wakes.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<[String]>> {
        self.wakes.subscribe()
    }
}
