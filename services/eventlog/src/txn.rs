//! What a caller asks the log to commit, and what it gets back.

use std::collections::{HashMap, HashSet};
use std::fmt;

use bytes::Bytes;
use lineguard_protos::eventlog::v1::{Actor, CommitReceipt, actor};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::ids::{validate_id, validate_id_at, validate_optional_id};
use crate::limits::Limits;

/// The version a stream must be at for an append to it to go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must exist, at any version.
    StreamExists,
    /// The stream's last version must be exactly this (0 is the same as `NoStream`).
    Exact(u64),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `current` (0: absent) satisfies this.
    pub fn admits(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::StreamExists => current > 0,
            ExpectedVersion::Exact(v) => v == current,
        }
    }
}

/// An event to append: everything in its envelope but what the log assigns
/// (stream, versions, position, time, source).
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// UUIDv7, made by [`NewEvent::new`]; callers may set their own to make a
    /// command's events deterministic.
    pub event_id: Uuid,
    /// Fully qualified protobuf message name of the payload.
    pub event_type: String,
    /// Schema version of the payload message.
    pub schema_version: u32,
    /// The encoded payload message.
    pub payload: Bytes,
    /// The ticket or incident the event is about.
    pub correlation_id: String,
    /// The event or command that caused this one; may be empty.
    pub causation_id: String,
    /// Who caused it.
    pub actor: Actor,
    /// Whether the outbox relay publishes it on the bus. `false` for what a
    /// service records only for itself, e.g. its copy of another service's
    /// event, which that service already published.
    pub publish: bool,
    /// The W3C trace context of the work making it ([`crate::trace`]),
    /// empty when tracing is off.
    pub trace_parent: String,
}

impl NewEvent {
    /// An event carrying `message`, typed by its protobuf full name, schema version 1.
    pub fn new<M: prost::Message + prost::Name>(
        message: &M,
        correlation_id: impl Into<String>,
        actor: Actor,
    ) -> Self {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: M::full_name(),
            schema_version: 1,
            payload: Bytes::from(message.encode_to_vec()),
            correlation_id: correlation_id.into(),
            causation_id: String::new(),
            actor,
            publish: true,
            trace_parent: crate::trace::current_traceparent(),
        }
    }

    /// Keeps the event out of the outbox: it is in the log, never on the bus.
    pub fn unpublished(mut self) -> Self {
        self.publish = false;
        self
    }

    /// Records what caused this event.
    pub fn caused_by(mut self, causation_id: impl Into<String>) -> Self {
        self.causation_id = causation_id.into();
        self
    }

    /// Sets the payload's schema version.
    pub fn with_schema_version(mut self, schema_version: u32) -> Self {
        self.schema_version = schema_version;
        self
    }
}

/// Builds an [`Actor`].
pub fn actor(kind: actor::Kind, id: impl Into<String>) -> Actor {
    Actor {
        kind: kind as i32,
        id: id.into(),
    }
}

/// Events for one stream, with the version the stream must be at.
#[derive(Debug, Clone)]
pub struct StreamAppend {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// Makes a command idempotent: the first commit under `key` is kept forever,
/// and a later commit with the same key returns it instead of appending.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: String,
    /// Digest of the command; a retry must carry the same one.
    pub fingerprint: [u8; 32],
    /// The caller's answer to the command, returned verbatim to retries.
    pub response: Bytes,
}

impl Idempotency {
    /// An idempotency record whose fingerprint is the SHA-256 of `request`
    /// (the command's canonical encoding).
    pub fn new(key: impl Into<String>, request: &[u8], response: Bytes) -> Self {
        Idempotency {
            key: key.into(),
            fingerprint: Sha256::digest(request).into(),
            response,
        }
    }
}

/// Marks a consumed message as processed by a consumer, in the same write as
/// the events it caused, so a redelivery is recognised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InboxMark {
    pub consumer: String,
    pub message_id: String,
    /// The message's position in its source's log (0: not known). The log
    /// keeps the highest one per consumer ([`EventLog::consumer_position`](crate::EventLog::consumer_position)).
    pub source_position: u64,
}

/// One atomic write: appends to one or more streams, each with its expected
/// version, plus optionally an idempotency record and an inbox mark. The
/// outbox entries and projection updates are derived by the log and go in
/// the same RocksDB write batch: all of it lands, or none of it.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    pub appends: Vec<StreamAppend>,
    pub idempotency: Option<Idempotency>,
    pub inbox: Option<InboxMark>,
}

impl Transaction {
    /// Gives `trace_parent` (the committing work's trace context) to every
    /// event that has none of its own.
    pub(crate) fn stamp_trace(&mut self, trace_parent: &str) {
        if trace_parent.is_empty() {
            return;
        }
        for event in self.appends.iter_mut().flat_map(|a| a.events.iter_mut()) {
            if event.trace_parent.is_empty() {
                event.trace_parent = trace_parent.to_string();
            }
        }
    }

    /// A transaction appending `events` to one stream.
    pub fn append(
        stream_id: impl Into<String>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Self {
        Transaction {
            appends: vec![StreamAppend {
                stream_id: stream_id.into(),
                expected,
                events,
            }],
            ..Transaction::default()
        }
    }

    /// Adds appends to another stream.
    pub fn and_append(
        mut self,
        stream_id: impl Into<String>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Self {
        self.appends.push(StreamAppend {
            stream_id: stream_id.into(),
            expected,
            events,
        });
        self
    }

    /// Events of the transaction the relay will publish.
    pub fn published_count(&self) -> usize {
        self.appends
            .iter()
            .flat_map(|a| &a.events)
            .filter(|e| e.publish)
            .count()
    }

    /// Makes the transaction idempotent under `idempotency.key`.
    pub fn idempotent(mut self, idempotency: Idempotency) -> Self {
        self.idempotency = Some(idempotency);
        self
    }

    /// Records that `consumer` processed `message_id`.
    pub fn consuming(mut self, consumer: impl Into<String>, message_id: impl Into<String>) -> Self {
        self.inbox = Some(InboxMark {
            consumer: consumer.into(),
            message_id: message_id.into(),
            source_position: 0,
        });
        self
    }

    /// Records that `consumer` processed `message_id`, which stands at
    /// `source_position` in its source's log.
    pub fn consuming_at(
        mut self,
        consumer: impl Into<String>,
        message_id: impl Into<String>,
        source_position: u64,
    ) -> Self {
        self.inbox = Some(InboxMark {
            consumer: consumer.into(),
            message_id: message_id.into(),
            source_position,
        });
        self
    }

    /// Number of events the transaction appends.
    pub fn event_count(&self) -> usize {
        self.appends.iter().map(|a| a.events.len()).sum()
    }

    /// About how many bytes the commit adds to a RocksDB write batch: each
    /// event's payload and ids plus its keys, checksum and envelope fields.
    pub(crate) fn stored_bytes_estimate(&self) -> usize {
        const PER_EVENT: usize = 128;
        self.appends
            .iter()
            .flat_map(|append| append.events.iter().map(move |event| (append, event)))
            // Each event is stored twice: by position and by stream.
            .map(|(append, event)| {
                2 * (PER_EVENT
                    + append.stream_id.len()
                    + event.payload.len()
                    + event.event_type.len()
                    + event.correlation_id.len()
                    + event.causation_id.len()
                    + event.actor.id.len())
            })
            .sum::<usize>()
            + PER_EVENT
    }

    /// Checks everything that can be checked without the store: ids, sizes,
    /// event types. A transaction that passes can fail only on state
    /// (versions, keys) or storage.
    pub fn validate(&self, limits: &Limits, types: &EventTypes) -> Result<()> {
        if self.appends.is_empty() && self.idempotency.is_none() && self.inbox.is_none() {
            return Err(Error::invalid(
                "appends",
                "a transaction must write something",
            ));
        }
        if self.appends.len() > limits.max_streams_per_commit {
            return Err(Error::limit(
                "appends (streams per commit)",
                self.appends.len(),
                limits.max_streams_per_commit,
            ));
        }
        let count = self.event_count();
        if count > limits.max_events_per_commit {
            return Err(Error::limit(
                "events per commit",
                count,
                limits.max_events_per_commit,
            ));
        }
        let mut streams = HashSet::with_capacity(self.appends.len());
        let mut event_ids = EventIdSet::with_capacity(count);
        // Commits are mostly of one event type: check each run of it once.
        let mut checked_type: Option<(&str, u32)> = None;
        let mut bytes = 0usize;
        for (i, append) in self.appends.iter().enumerate() {
            validate_id(
                &format!("appends[{i}].stream_id"),
                &append.stream_id,
                limits.max_id_len,
            )?;
            if !streams.insert(append.stream_id.as_str()) {
                return Err(Error::invalid(
                    format!("appends[{i}].stream_id"),
                    format!(
                        "stream {} appears twice in one transaction",
                        append.stream_id
                    ),
                ));
            }
            if append.events.is_empty() {
                return Err(Error::invalid(
                    format!("appends[{i}].events"),
                    "must not be empty",
                ));
            }
            for (j, event) in append.events.iter().enumerate() {
                let field = |name: &str| format!("appends[{i}].events[{j}].{name}");
                if event.event_id.get_version_num() != 7 {
                    return Err(Error::invalid(field("event_id"), "must be a UUIDv7"));
                }
                if !event_ids.insert(event.event_id) {
                    return Err(Error::invalid(field("event_id"), "appears twice"));
                }
                if event.payload.len() > limits.max_payload_bytes {
                    return Err(Error::limit(
                        field("payload bytes"),
                        event.payload.len(),
                        limits.max_payload_bytes,
                    ));
                }
                bytes += event.payload.len();
                if event.event_type.len() > limits.max_event_type_len {
                    return Err(Error::limit(
                        field("event_type length"),
                        event.event_type.len(),
                        limits.max_event_type_len,
                    ));
                }
                if checked_type != Some((event.event_type.as_str(), event.schema_version)) {
                    types.check(&event.event_type, event.schema_version)?;
                    checked_type = Some((event.event_type.as_str(), event.schema_version));
                }
                validate_id_at(
                    || field("correlation_id"),
                    &event.correlation_id,
                    limits.max_id_len,
                )?;
                validate_optional_id(
                    || field("causation_id"),
                    &event.causation_id,
                    limits.max_id_len,
                )?;
                if event.actor.kind == actor::Kind::Unspecified as i32
                    || actor::Kind::try_from(event.actor.kind).is_err()
                {
                    return Err(Error::invalid(
                        field("actor.kind"),
                        "must be a known actor kind",
                    ));
                }
                validate_id_at(|| field("actor.id"), &event.actor.id, limits.max_id_len)?;
            }
        }
        if bytes > limits.max_commit_bytes {
            return Err(Error::limit(
                "payload bytes per commit",
                bytes,
                limits.max_commit_bytes,
            ));
        }
        if let Some(idem) = &self.idempotency {
            if idem.key.is_empty() {
                return Err(Error::invalid("idempotency_key", "must not be empty"));
            }
            if idem.key.len() > limits.max_idempotency_key_len {
                return Err(Error::limit(
                    "idempotency_key length",
                    idem.key.len(),
                    limits.max_idempotency_key_len,
                ));
            }
            if idem.response.len() > limits.max_idempotent_response_bytes {
                return Err(Error::limit(
                    "idempotent response bytes",
                    idem.response.len(),
                    limits.max_idempotent_response_bytes,
                ));
            }
        }
        if let Some(mark) = &self.inbox {
            validate_id("inbox.consumer", &mark.consumer, limits.max_id_len)?;
            validate_id("inbox.message_id", &mark.message_id, limits.max_id_len)?;
        }
        Ok(())
    }
}

/// The event types a log accepts, each with the newest schema version it knows.
#[derive(Debug, Clone, Default)]
pub struct EventTypes {
    newest: HashMap<String, u32>,
}

impl EventTypes {
    /// No types yet.
    pub fn new() -> Self {
        EventTypes::default()
    }

    /// Accepts `M` up to schema version `newest`.
    pub fn with<M: prost::Name>(self, newest: u32) -> Self {
        self.with_name(M::full_name(), newest)
    }

    /// Accepts the type named `name` up to schema version `newest`.
    pub fn with_name(mut self, name: impl Into<String>, newest: u32) -> Self {
        self.newest.insert(name.into(), newest);
        self
    }

    /// Whether `event_type` at `schema_version` is accepted.
    pub fn check(&self, event_type: &str, schema_version: u32) -> Result<()> {
        match self.newest.get(event_type) {
            Some(&newest) if (1..=newest).contains(&schema_version) => Ok(()),
            _ => Err(Error::UnknownEventType {
                event_type: event_type.to_owned(),
                schema_version,
            }),
        }
    }
}

/// The event ids of one transaction so far, to find one given twice.
///
/// UUIDv7s made by one process come in increasing order, so while they do
/// the last one alone proves the next is new; a set is built only for a
/// transaction whose ids are out of order.
struct EventIdSet {
    in_order: Vec<Uuid>,
    set: Option<HashSet<Uuid>>,
}

impl EventIdSet {
    fn with_capacity(count: usize) -> Self {
        EventIdSet {
            in_order: Vec::with_capacity(count),
            set: None,
        }
    }

    /// Adds `id`; false if it was there already.
    fn insert(&mut self, id: Uuid) -> bool {
        if let Some(set) = &mut self.set {
            return set.insert(id);
        }
        match self.in_order.last() {
            Some(&last) if id <= last => {
                let mut set: HashSet<Uuid> = self.in_order.drain(..).collect();
                let new = set.insert(id);
                self.set = Some(set);
                new
            }
            _ => {
                self.in_order.push(id);
                true
            }
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    /// The events were appended (durably, fsynced) as the receipt says.
    Committed(CommitReceipt),
    /// The idempotency key was seen before with the same request: nothing was
    /// appended, and this is the original commit's receipt and response.
    Duplicate {
        receipt: CommitReceipt,
        response: Bytes,
    },
    /// The inbox mark was seen before: the message was already processed.
    AlreadyProcessed,
}

impl CommitOutcome {
    /// The receipt of the commit that holds the events, new or original.
    pub fn receipt(&self) -> Option<&CommitReceipt> {
        match self {
            CommitOutcome::Committed(r) | CommitOutcome::Duplicate { receipt: r, .. } => Some(r),
            CommitOutcome::AlreadyProcessed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_set_finds_a_repeat_in_order_or_out_of_order() {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let mut set = EventIdSet::with_capacity(5);
        assert!(
            ids.iter().all(|id| set.insert(*id)),
            "increasing ids are new"
        );
        assert!(set.set.is_none(), "no set while ids come in order");
        assert!(!set.insert(ids[4]), "the last id again");

        let mut set = EventIdSet::with_capacity(5);
        for id in [ids[3], ids[1], ids[4], ids[0]] {
            assert!(set.insert(id), "{id} is new");
        }
        assert!(!set.insert(ids[1]), "an earlier id, out of order");
        assert!(set.insert(ids[2]), "an id between the others is new");
    }
}
