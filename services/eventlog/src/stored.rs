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

/// Where each of [`EventEnvelope`]'s text fields is in the body (tags 1, 2,
/// 6, 7, 9, 12, 13), in this order.
const TEXT_TAGS: [u32; 7] = [1, 2, 6, 7, 9, 12, 13];
const EVENT_ID: usize = 0;
const STREAM_ID: usize = 1;
const CAUSATION_ID: usize = 2;
const CORRELATION_ID: usize = 3;
const EVENT_TYPE: usize = 4;
const SOURCE: usize = 5;
const TRACE_PARENT: usize = 6;
/// The payload's tag.
const PAYLOAD_TAG: u32 = 11;

/// Where an envelope's fields are in its encoded body, read by one walk
/// and checked (the ids UTF-8): what a reader needs to hand an event on,
/// or to decide whether to, without decoding it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fields {
    pub position: u64,
    pub stream_version: u64,
    pub schema_version: u32,
    texts: [Range<u32>; 7],
    payload: Range<u32>,
}

impl Fields {
    /// Walks the envelope `body` once and checks its ids are UTF-8; the
    /// reason it is not an event otherwise.
    pub(crate) fn read(body: &[u8]) -> std::result::Result<Fields, String> {
        let mut fields = Fields::default();
        fields
            .walk(body)
            .map_err(|e| format!("undecodable envelope: {e}"))?;
        for (i, name) in [
            "event_id",
            "stream_id",
            "causation_id",
            "correlation_id",
            "event_type",
            "source",
            "trace_parent",
        ]
        .into_iter()
        .enumerate()
        {
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
    /// protobuf decoding has it.
    fn walk(&mut self, body: &[u8]) -> std::result::Result<(), String> {
        let total = body.len();
        let mut buf = body;
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf).map_err(|e| e.to_string())?;
            match (tag, wire_type) {
                (3 | 4 | 10, WireType::Varint) => {
                    let value = decode_varint(&mut buf).map_err(|e| e.to_string())?;
                    match tag {
                        3 => self.stream_version = value,
                        4 => self.position = value,
                        _ => self.schema_version = value as u32,
                    }
                }
                (_, WireType::LengthDelimited)
                    if tag == PAYLOAD_TAG || TEXT_TAGS.contains(&tag) =>
                {
                    let len = decode_varint(&mut buf).map_err(|e| e.to_string())?;
                    if len > buf.remaining() as u64 {
                        return Err("a field runs past the record".into());
                    }
                    let start = (total - buf.remaining()) as u32;
                    let range = start..start + len as u32;
                    buf.advance(len as usize);
                    match TEXT_TAGS.iter().position(|t| *t == tag) {
                        Some(i) => self.texts[i] = range,
                        None => self.payload = range,
                    }
                }
                // recorded_at, actor, and whatever a later version adds.
                _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default())
                    .map_err(|e| e.to_string())?,
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
        let range = &self.texts[field];
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
        let payload = &self.fields.payload;
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
