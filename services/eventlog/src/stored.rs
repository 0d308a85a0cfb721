//! Events as stored: a record's checked body, its header fields read in
//! place.
//!
//! Bulk readers (the outbox relay, a full scan of the log) mostly need an
//! event's id, type, correlation and position, and then either its bytes as
//! they are (the relay publishes exactly the stored envelope) or nothing
//! more. A [`StoredEvent`] is checked like any read (crc32c over key and
//! body, a well-formed envelope at the position it claims, UTF-8 ids), but
//! every field is a slice of the one record buffer: no string is copied,
//! and decoding into an owned [`EventEnvelope`] is left to
//! [`StoredEvent::to_envelope`] for the readers that want it.

use std::ops::Range;

use bytes::{Buf, Bytes};
use lineguard_protos::eventlog::v1::EventEnvelope;
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};

use crate::codec::{CF_EVENTS, CF_STREAM_EVENTS, position_key, unseal};
use crate::error::{Error, Result};

// Where each of [`EventEnvelope`]'s length-delimited fields is in
// `Fields::spans`: the text fields first, then the payload.
const EVENT_ID: usize = 0;
const STREAM_ID: usize = 1;
const CAUSATION_ID: usize = 2;
const CORRELATION_ID: usize = 3;
const EVENT_TYPE: usize = 4;
const SOURCE: usize = 5;
const TRACE_PARENT: usize = 6;
/// The payload's place in `Fields::spans`.
const PAYLOAD: usize = 7;
/// Text fields, checked as UTF-8: the spans before the payload's.
const TEXTS: usize = PAYLOAD;
/// Where a field the walk does not keep (recorded_at, actor, a later
/// version's) is noted and forgotten.
const IGNORED: usize = 8;
/// `Fields::spans`' place for each field tag below 16: the envelope's
/// tags 1, 2, 6, 7, 9, 12, 13 (texts) and 11 (payload). A table rather
/// than a `match`: the walk runs for every record of every read.
const SPAN_OF_TAG: [u8; 16] = {
    let mut table = [IGNORED as u8; 16];
    table[1] = EVENT_ID as u8;
    table[2] = STREAM_ID as u8;
    table[6] = CAUSATION_ID as u8;
    table[7] = CORRELATION_ID as u8;
    table[9] = EVENT_TYPE as u8;
    table[11] = PAYLOAD as u8;
    table[12] = SOURCE as u8;
    table[13] = TRACE_PARENT as u8;
    table
};

/// Where an envelope's fields are in its encoded body, read by one walk
/// and checked (the ids UTF-8): what a reader needs to hand an event on,
/// or to decide whether to, without decoding it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fields {
    pub position: u64,
    pub stream_version: u64,
    pub schema_version: u32,
    /// The texts' and the payload's bytes in the body, then a scratch
    /// span for fields not kept.
    spans: [Range<u32>; 9],
}

impl Fields {
    /// Walks the envelope `body` once and checks its ids are UTF-8; the
    /// reason it is not an event otherwise.
    pub(crate) fn read(body: &[u8]) -> std::result::Result<Fields, String> {
        let mut fields = Fields::default();
        fields
            .walk(body)
            .map_err(|e| format!("undecodable envelope: {e}"))?;
        const TEXT_NAMES: [&str; TEXTS] = [
            "event_id",
            "stream_id",
            "causation_id",
            "correlation_id",
            "event_type",
            "source",
            "trace_parent",
        ];
        for (i, name) in TEXT_NAMES.into_iter().enumerate() {
            // Ids are ASCII (UUIDs, service and stream names): the
            // word-at-a-time check settles them; the full one only if not.
            let text = fields.bytes(body, i);
            if !text.is_ascii() && std::str::from_utf8(text).is_err() {
                return Err(format!("{name} is not UTF-8"));
            }
        }
        Ok(fields)
    }

    /// Notes where each field is; the last occurrence of a field wins, as
    /// protobuf decoding has it. Every read of the log walks every record
    /// once, so this is the hot loop of a replay: a tag finds its span in a
    /// table, and the usual wire types are tested first (branches, not a
    /// jump table, so the usual path is predicted); everything else is
    /// skipped as prost skips it.
    fn walk(&mut self, body: &[u8]) -> std::result::Result<(), String> {
        let mut buf = body;
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf).map_err(|e| e.to_string())?;
            if wire_type == WireType::LengthDelimited {
                let len = decode_varint(&mut buf).map_err(|e| e.to_string())?;
                if len > buf.remaining() as u64 {
                    return Err("a field runs past the record".into());
                }
                // The body is a stored record (bounded far below 4 GiB by
                // the log's limits): its offsets fit in u32.
                let start = (body.len() - buf.remaining()) as u32;
                let span = SPAN_OF_TAG.get(tag as usize).copied();
                self.spans[usize::from(span.unwrap_or(IGNORED as u8))] = start..start + len as u32;
                buf.advance(len as usize);
            } else if wire_type == WireType::Varint {
                let value = decode_varint(&mut buf).map_err(|e| e.to_string())?;
                match tag {
                    3 => self.stream_version = value,
                    4 => self.position = value,
                    10 => self.schema_version = value as u32,
                    _ => {}
                }
            } else {
                skip_field(wire_type, tag, &mut buf, DecodeContext::default())
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Reads and checks the envelope `body`, found in `column` as the
    /// event at `position` (already checked against its checksum).
    pub(crate) fn at_position(column: &'static str, position: u64, body: &[u8]) -> Result<Fields> {
        let corrupted = |reason: String| Error::Corrupted {
            column,
            location: format!("position {position}"),
            reason,
        };
        let fields = Fields::read(body).map_err(corrupted)?;
        if fields.position != position {
            return Err(corrupted(format!(
                "envelope says position {}",
                fields.position
            )));
        }
        Ok(fields)
    }

    /// Reads and checks the envelope `body` of `stream_id`'s copy at
    /// `version` (already checked against its checksum): it must say it
    /// is that stream's event at that version.
    pub(crate) fn of_copy(stream_id: &str, version: u64, body: &[u8]) -> Result<Fields> {
        let corrupted = |reason: String| Error::Corrupted {
            column: CF_STREAM_EVENTS,
            location: format!("{stream_id} v{version}"),
            reason,
        };
        let fields = Fields::read(body).map_err(corrupted)?;
        if fields.bytes(body, STREAM_ID) != stream_id.as_bytes() || fields.stream_version != version
        {
            return Err(corrupted(format!(
                "envelope says {} v{}",
                fields.stream_id(body),
                fields.stream_version
            )));
        }
        Ok(fields)
    }

    fn bytes<'b>(&self, body: &'b [u8], field: usize) -> &'b [u8] {
        let range = &self.spans[field];
        &body[range.start as usize..range.end as usize]
    }

    /// A text field of `body` (the body these fields were read from),
    /// checked as UTF-8 when read.
    pub(crate) fn text<'b>(&self, body: &'b [u8], field: usize) -> &'b str {
        std::str::from_utf8(self.bytes(body, field)).unwrap_or_default()
    }

    /// The stream id of `body`.
    pub(crate) fn stream_id<'b>(&self, body: &'b [u8]) -> &'b str {
        self.text(body, STREAM_ID)
    }

    /// The correlation id of `body`.
    pub(crate) fn correlation_id<'b>(&self, body: &'b [u8]) -> &'b str {
        self.text(body, CORRELATION_ID)
    }

    /// The event type of `body`.
    pub(crate) fn event_type<'b>(&self, body: &'b [u8]) -> &'b str {
        self.text(body, EVENT_TYPE)
    }
}

/// One event as the log stores it, checked, its fields read in place.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The encoded [`EventEnvelope`], exactly as committed.
    body: Bytes,
    fields: Fields,
}

impl StoredEvent {
    /// Checks a whole stored record (checksum first) at `position`.
    #[cfg(test)]
    fn from_record(position: u64, record: &[u8]) -> Result<StoredEvent> {
        let body = unseal(CF_EVENTS, &position_key(position), record, || {
            format!("position {position}")
        })?;
        let fields = Fields::at_position(CF_EVENTS, position, body)?;
        Ok(StoredEvent {
            body: Bytes::copy_from_slice(body),
            fields,
        })
    }

    fn text(&self, field: usize) -> &str {
        self.fields.text(&self.body, field)
    }

    /// The event's global position in its log.
    pub fn position(&self) -> u64 {
        self.fields.position
    }

    pub fn stream_version(&self) -> u64 {
        self.fields.stream_version
    }

    pub fn schema_version(&self) -> u32 {
        self.fields.schema_version
    }

    pub fn event_id(&self) -> &str {
        self.text(EVENT_ID)
    }

    pub fn stream_id(&self) -> &str {
        self.text(STREAM_ID)
    }

    pub fn causation_id(&self) -> &str {
        self.text(CAUSATION_ID)
    }

    pub fn correlation_id(&self) -> &str {
        self.text(CORRELATION_ID)
    }

    /// The payload's fully qualified protobuf name.
    pub fn event_type(&self) -> &str {
        self.text(EVENT_TYPE)
    }

    /// The service whose log holds the event.
    pub fn source(&self) -> &str {
        self.text(SOURCE)
    }

    /// The W3C trace context of the work that wrote it (empty if none).
    pub fn trace_parent(&self) -> &str {
        self.text(TRACE_PARENT)
    }

    /// The payload message, protobuf-encoded (a slice of the record).
    pub fn payload(&self) -> Bytes {
        let payload = &self.fields.spans[PAYLOAD];
        self.body
            .slice(payload.start as usize..payload.end as usize)
    }

    /// The encoded [`EventEnvelope`] as committed: what the bus carries.
    pub fn envelope_bytes(&self) -> &Bytes {
        &self.body
    }

    /// The event as an owned [`EventEnvelope`] (the payload stays a slice).
    pub fn to_envelope(&self) -> Result<EventEnvelope> {
        EventEnvelope::decode(self.body.clone()).map_err(|e| Error::Corrupted {
            column: CF_EVENTS,
            location: format!("position {}", self.position()),
            reason: format!("undecodable envelope: {e}"),
        })
    }
}

/// Builds a page of [`StoredEvent`]s whose bodies share one buffer: one
/// allocation per page rather than one per event. Each event is checked
/// as it is added (its envelope walked once, where the reader found it)
/// and handed out without another look. An event kept after its page
/// keeps the page's buffer alive.
pub(crate) struct StoredPage {
    buffer: Vec<u8>,
    events: Vec<(Fields, Range<usize>)>,
}

impl StoredPage {
    pub(crate) fn with_capacity(events: usize) -> StoredPage {
        StoredPage {
            buffer: Vec::new(),
            events: Vec::with_capacity(events),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }

    /// Adds the record stored at `position`, checking its checksum and
    /// envelope.
    pub(crate) fn push(&mut self, position: u64, record: &[u8]) -> Result<()> {
        let body = unseal(CF_EVENTS, &position_key(position), record, || {
            format!("position {position}")
        })?;
        let fields = Fields::at_position(CF_EVENTS, position, body)?;
        self.push_checked(body, fields);
        Ok(())
    }

    /// Adds `stream_id`'s copy at `version` (already checked against its
    /// checksum), checking its envelope.
    pub(crate) fn push_copy(&mut self, stream_id: &str, version: u64, body: &[u8]) -> Result<()> {
        let fields = Fields::of_copy(stream_id, version, body)?;
        self.push_checked(body, fields);
        Ok(())
    }

    /// Adds an event whose `body` the caller has read into `fields`.
    pub(crate) fn push_checked(&mut self, body: &[u8], fields: Fields) {
        let start = self.buffer.len();
        self.buffer.extend_from_slice(body);
        self.events.push((fields, start..self.buffer.len()));
    }

    /// Hands the page out.
    pub(crate) fn finish(self) -> Vec<StoredEvent> {
        let buffer = Bytes::from(self.buffer);
        self.events
            .into_iter()
            .map(|(fields, range)| StoredEvent {
                body: buffer.slice(range),
                fields,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::seal;
    use lineguard_protos::eventlog::v1::Actor;
    use proptest::prelude::*;

    fn envelope(position: u64) -> EventEnvelope {
        EventEnvelope {
            event_id: "0192e4a0-0000-7000-8000-000000000001".into(),
            stream_id: "ticket-1".into(),
            stream_version: 3,
            global_position: position,
            recorded_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            causation_id: "cause".into(),
            correlation_id: "incident-9".into(),
            actor: Some(Actor {
                kind: 2,
                id: "95598".into(),
            }),
            event_type: "lineguard.intake.v1.TicketReported".into(),
            schema_version: 1,
            payload: Bytes::from_static(b"\x0a\x03abc"),
            source: "intake".into(),
            trace_parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        }
    }

    fn record(position: u64, e: &EventEnvelope) -> Vec<u8> {
        seal(&position_key(position), &e.encode_to_vec())
    }

    #[test]
    fn fields_read_in_place_equal_the_decoded_envelope() {
        let e = envelope(7);
        let stored = StoredEvent::from_record(7, &record(7, &e)).expect("valid");
        assert_eq!(stored.position(), 7);
        assert_eq!(stored.stream_version(), 3);
        assert_eq!(stored.schema_version(), 1);
        assert_eq!(stored.event_id(), e.event_id);
        assert_eq!(stored.stream_id(), e.stream_id);
        assert_eq!(stored.causation_id(), e.causation_id);
        assert_eq!(stored.correlation_id(), e.correlation_id);
        assert_eq!(stored.event_type(), e.event_type);
        assert_eq!(stored.source(), e.source);
        assert_eq!(stored.trace_parent(), e.trace_parent);
        assert_eq!(stored.payload(), e.payload);
        assert_eq!(stored.envelope_bytes().as_ref(), e.encode_to_vec());
        assert_eq!(stored.to_envelope().expect("decodes"), e);
    }

    /// The fields read by the walk of `body`, beside what prost decodes.
    fn walked_equals_decoded(
        body: &[u8],
        e: &EventEnvelope,
    ) -> std::result::Result<(), TestCaseError> {
        let fields = Fields::read(body).map_err(TestCaseError::fail)?;
        prop_assert_eq!(fields.position, e.global_position);
        prop_assert_eq!(fields.stream_version, e.stream_version);
        prop_assert_eq!(fields.schema_version, e.schema_version);
        for (field, text) in [
            (EVENT_ID, &e.event_id),
            (STREAM_ID, &e.stream_id),
            (CAUSATION_ID, &e.causation_id),
            (CORRELATION_ID, &e.correlation_id),
            (EVENT_TYPE, &e.event_type),
            (SOURCE, &e.source),
            (TRACE_PARENT, &e.trace_parent),
        ] {
            prop_assert_eq!(fields.text(body, field), text.as_str());
        }
        let span = &fields.spans[PAYLOAD];
        let payload = &body[span.start as usize..span.end as usize];
        prop_assert_eq!(payload, e.payload.as_ref());
        Ok(())
    }

    proptest! {
        /// Any envelope, walked in place, has the fields prost decodes:
        /// ids of any length (lengths of one and two varint bytes), every
        /// number from 0 to u64::MAX (one to ten varint bytes).
        #[test]
        fn the_walk_reads_what_prost_decodes(
            ids in proptest::collection::vec("\\PC{0,200}", 7),
            numbers in proptest::collection::vec(any::<u64>(), 3),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            seconds in any::<i64>(),
        ) {
            let e = EventEnvelope {
                event_id: ids[0].clone(),
                stream_id: ids[1].clone(),
                causation_id: ids[2].clone(),
                correlation_id: ids[3].clone(),
                event_type: ids[4].clone(),
                source: ids[5].clone(),
                trace_parent: ids[6].clone(),
                stream_version: numbers[0],
                global_position: numbers[1],
                schema_version: numbers[2] as u32,
                payload: Bytes::from(payload),
                recorded_at: Some(prost_types::Timestamp { seconds, nanos: 1 }),
                actor: Some(Actor { kind: 1, id: ids[0].clone() }),
            };
            walked_equals_decoded(&e.encode_to_vec(), &e)?;
        }

        /// Bytes near an envelope (one with up to four bytes overwritten)
        /// and bytes of no envelope at all: the walk never panics, and
        /// whatever prost decodes as an envelope the walk reads the same (a
        /// damaged record that still decodes is caught by its checksum,
        /// not here).
        #[test]
        fn the_walk_of_damaged_bytes_agrees_with_prost(
            damage in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            noise in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut body = envelope(7).encode_to_vec();
            for (at, byte) in damage {
                let at = at.index(body.len());
                body[at] = byte;
            }
            for body in [body, noise] {
                let walked = Fields::read(&body);
                if let Ok(e) = EventEnvelope::decode(body.as_slice()) {
                    prop_assert!(walked.is_ok(), "prost decodes it, the walk says {:?}", walked);
                    walked_equals_decoded(&body, &e)?;
                }
            }
        }
    }

    #[test]
    fn a_record_at_the_wrong_position_or_damaged_is_an_error() {
        let e = envelope(7);
        let moved = StoredEvent::from_record(8, &record(7, &e)).expect_err("moved");
        assert!(moved.to_string().contains("position 8"), "{moved}");
        // Sealed under its key but claiming another position.
        let lying = StoredEvent::from_record(8, &record(8, &e)).expect_err("lies");
        assert!(lying.to_string().contains("says position 7"), "{lying}");
        let mut damaged = record(7, &e);
        let last = damaged.len() - 1;
        damaged[last] ^= 0x40;
        let err = StoredEvent::from_record(7, &damaged).expect_err("damaged");
        assert!(err.to_string().contains("checksum"), "{err}");
        let bad_utf8 = EventEnvelope {
            event_type: String::new(),
            ..e.clone()
        };
        let mut body = bad_utf8.encode_to_vec();
        body.extend_from_slice(&[0x4a, 0x02, 0xff, 0xfe]); // tag 9, two bytes, not UTF-8
        let err =
            StoredEvent::from_record(7, &seal(&position_key(7), &body)).expect_err("not UTF-8");
        assert!(err.to_string().contains("event_type is not UTF-8"), "{err}");
    }
}
