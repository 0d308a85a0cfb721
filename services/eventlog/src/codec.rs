//! On-disk layout: column families, key encodings, and the checksummed frame
//! every stored value is wrapped in.
//!
//! A value is `crc32c(key ‖ body)` (4 bytes, little endian) followed by the body.
//! Covering the key too means a record copied to the wrong key fails its check.

use crate::error::{Error, Result};

/// Event records, keyed by global position (8 bytes, big endian).
pub const CF_EVENTS: &str = "events";
/// Stream index, one entry per append: `stream_id ‖ 0x00 ‖ first version (8
/// bytes BE)` → an [`IndexRun`] (the append's events have consecutive
/// versions and consecutive positions, so one entry locates them all).
/// Gives a stream's head, and a correlation read the version to start its
/// stream's copies at.
pub const CF_STREAMS: &str = "streams";
/// Idempotency key → `IdempotencyRecord`.
pub const CF_IDEMPOTENCY: &str = "idempotency";
/// Processed marks of consumed messages: `consumer ‖ 0x00 ‖ message id`.
pub const CF_INBOX: &str = "inbox";
/// Events the bus has not yet acknowledged, as runs of consecutive
/// positions: first position (8 bytes BE) → an [`OutboxRun`]'s count. One
/// entry per run of published events in a commit, not one per event.
pub const CF_OUTBOX: &str = "outbox";
/// The projector's key/value state.
pub const CF_PROJECTIONS: &str = "projections";
/// Bookkeeping: the projection state.
pub const CF_META: &str = "meta";
/// Events whose correlation id is not their stream's id (those whose it is
/// are found through their stream): `correlation_id ‖ 0x00 ‖ position
/// (8 bytes BE)` → the event's envelope (a log written before the envelope
/// was kept here gets it at open). With the stream copies, it finds every event of a correlation (a
/// ticket, a case) in log order, side by side.
pub const CF_CORRELATIONS: &str = "correlations";
/// Every event again, keyed by its stream: `stream_id ‖ 0x00 ‖ version (8
/// bytes BE)` → the event's envelope, as in [`CF_EVENTS`]. One stream's
/// events lie side by side, so reading a stream (a case's replay, every
/// aggregate load) is one prefix scan rather than a lookup by position per
/// run of events. Costs each event's bytes a second time on disk; the
/// whole-log readers (relay, subscriptions, catch-up) keep reading
/// [`CF_EVENTS`] in log order.
pub const CF_STREAM_EVENTS: &str = "stream-events";

/// Every column family, in the order they are opened.
pub const ALL_COLUMN_FAMILIES: [&str; 9] = [
    CF_EVENTS,
    CF_STREAMS,
    CF_IDEMPOTENCY,
    CF_INBOX,
    CF_OUTBOX,
    CF_PROJECTIONS,
    CF_META,
    CF_CORRELATIONS,
    CF_STREAM_EVENTS,
];

/// Meta key of the `ProjectionState` record.
pub const META_PROJECTION_STATE: &[u8] = b"projection_state";
/// Meta key set once every stored event is in the correlation index (logs
/// written before the index existed are indexed at open).
pub const META_CORRELATION_INDEX: &[u8] = b"correlation_index";
/// Meta key set once every stored event has its copy in
/// [`CF_STREAM_EVENTS`] (logs written before the copies existed get them at
/// open).
pub const META_STREAM_EVENTS: &[u8] = b"stream_events";

/// The key of an event in [`CF_CORRELATIONS`].
pub fn correlation_key(correlation_id: &str, position: u64) -> Vec<u8> {
    stream_key(correlation_id, position)
}

/// The position in a correlation index key, if the key belongs to `correlation_id`.
pub fn correlation_key_position(correlation_id: &str, key: &[u8]) -> Option<u64> {
    stream_key_version(correlation_id, key)
}

/// Whether an event needs an entry in [`CF_CORRELATIONS`].
pub fn needs_correlation_entry(stream_id: &str, correlation_id: &str) -> bool {
    !correlation_id.is_empty() && correlation_id != stream_id
}

/// Bytes of a frame before its body: the crc32c.
pub const CRC_LEN: usize = 4;

/// The checksum of a frame: CRC-32C (Castagnoli, the iSCSI polynomial) of
/// `key ‖ body`. Every stored record's format depends on it: pinned by a
/// test to the values the log has always written.
pub fn frame_checksum(key: &[u8], body: &[u8]) -> u32 {
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    digest.update(key);
    digest.update(body);
    // A 32-bit CRC's state is 32 bits wide: nothing is cut off.
    digest.finalize() as u32
}

/// Wraps `body` in a frame whose checksum also covers `key`.
pub fn seal(key: &[u8], body: &[u8]) -> Vec<u8> {
    let crc = frame_checksum(key, body);
    let mut out = Vec::with_capacity(CRC_LEN + body.len());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// [`seal`] of `message`'s encoding, encoded straight into the frame.
pub fn seal_message(key: &[u8], message: &impl prost::Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(CRC_LEN + message.encoded_len());
    out.extend_from_slice(&[0; CRC_LEN]);
    message.encode_raw(&mut out);
    let crc = frame_checksum(key, &out[CRC_LEN..]);
    out[..CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a frame read from `column` under `key` and returns its body.
pub fn unseal<'a>(
    column: &'static str,
    key: &[u8],
    value: &'a [u8],
    location: impl FnOnce() -> String,
) -> Result<&'a [u8]> {
    let Some((crc_bytes, body)) = value.split_first_chunk::<CRC_LEN>() else {
        return Err(Error::Corrupted {
            column,
            location: location(),
            reason: format!(
                "record of {} bytes is shorter than its checksum",
                value.len()
            ),
        });
    };
    let stored = u32::from_le_bytes(*crc_bytes);
    let actual = frame_checksum(key, body);
    if stored != actual {
        return Err(Error::Corrupted {
            column,
            location: location(),
            reason: format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"),
        });
    }
    Ok(body)
}

/// Key of the event at a global position.
pub fn position_key(position: u64) -> [u8; 8] {
    position.to_be_bytes()
}

/// Decodes a key of [`CF_EVENTS`] or [`CF_OUTBOX`].
pub fn decode_position_key(column: &'static str, key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| Error::Corrupted {
        column,
        location: format!("key {key:02x?}"),
        reason: "position key is not 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Key of a stream's event at `version` in the stream index.
pub fn stream_key(stream_id: &str, version: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream_id.len() + 9);
    key.extend_from_slice(stream_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// The version in a stream index key, if the key belongs to `stream_id`.
pub fn stream_key_version(stream_id: &str, key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(stream_id.as_bytes())?.strip_prefix(&[0])?;
    let bytes: [u8; 8] = rest.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// The versions one append gave a stream, and where they are in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexRun {
    pub first_version: u64,
    pub first_position: u64,
    pub count: u64,
}

impl IndexRun {
    /// The stored value: first position and count, 8 bytes BE each.
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.first_position.to_be_bytes());
        out[8..].copy_from_slice(&self.count.to_be_bytes());
        out
    }

    /// Reads an entry of `stream_id`'s index; `None` if the key belongs to
    /// another stream.
    pub fn decode(stream_id: &str, key: &[u8], value: &[u8]) -> Result<Option<IndexRun>> {
        let Some(first_version) = stream_key_version(stream_id, key) else {
            return Ok(None);
        };
        let location = || format!("{stream_id} v{first_version}");
        let body = unseal(CF_STREAMS, key, value, location)?;
        let bytes: [u8; 16] = body.try_into().map_err(|_| Error::Corrupted {
            column: CF_STREAMS,
            location: location(),
            reason: format!("index entry of {} bytes, not 16", body.len()),
        })?;
        let (position, count) = bytes.split_at(8);
        let run = IndexRun {
            first_version,
            first_position: u64::from_be_bytes(position.try_into().unwrap_or_default()),
            count: u64::from_be_bytes(count.try_into().unwrap_or_default()),
        };
        if run.count == 0 {
            return Err(Error::Corrupted {
                column: CF_STREAMS,
                location: location(),
                reason: "empty index entry".into(),
            });
        }
        Ok(Some(run))
    }

    /// The run's last version.
    pub fn last_version(&self) -> u64 {
        self.first_version + self.count - 1
    }

    /// Where `version` is in the log, if the run holds it.
    pub fn position_of(&self, version: u64) -> Option<u64> {
        (self.first_version..=self.last_version())
            .contains(&version)
            .then(|| self.first_position + (version - self.first_version))
    }
}

/// A run of consecutive positions waiting in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxRun {
    pub first: u64,
    pub count: u64,
}

impl OutboxRun {
    /// The stored entry: key and sealed value (the count, 8 bytes BE).
    pub fn entry(&self) -> ([u8; 8], Vec<u8>) {
        let key = position_key(self.first);
        let value = seal(&key, &self.count.to_be_bytes());
        (key, value)
    }

    /// Reads an entry. An empty body is a run of one: the entries of logs
    /// written before runs existed.
    pub fn decode(key: &[u8], value: &[u8]) -> Result<OutboxRun> {
        let first = decode_position_key(CF_OUTBOX, key)?;
        let location = || format!("position {first}");
        let body = unseal(CF_OUTBOX, key, value, location)?;
        let count = match body.len() {
            0 => 1,
            8 => u64::from_be_bytes(body.try_into().unwrap_or_default()),
            n => {
                return Err(Error::Corrupted {
                    column: CF_OUTBOX,
                    location: location(),
                    reason: format!("outbox entry of {n} bytes, not 0 or 8"),
                });
            }
        };
        if count == 0 {
            return Err(Error::Corrupted {
                column: CF_OUTBOX,
                location: location(),
                reason: "empty outbox run".into(),
            });
        }
        Ok(OutboxRun { first, count })
    }

    /// One past the run's last position.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// Key (in the meta column) of the highest source position a consumer has
/// applied.
pub fn consumer_position_key(consumer: &str) -> Vec<u8> {
    format!("consumer_position/{consumer}").into_bytes()
}

/// Key (in the meta column) of the source position through which a
/// consumer has checked that every event it takes has its outcome here.
pub fn reconciled_through_key(consumer: &str) -> Vec<u8> {
    format!("consumer_reconciled/{consumer}").into_bytes()
}

/// Key of a consumer's processed mark for one message.
pub fn inbox_key(consumer: &str, message_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(consumer.len() + message_id.len() + 1);
    key.extend_from_slice(consumer.as_bytes());
    key.push(0);
    key.extend_from_slice(message_id.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Logs written by every earlier version must still check: the
    /// checksum is CRC-32C, whatever computes it. The values are the
    /// catalogue's check value and what the `crc32c` crate the log used
    /// until 2026-12 computed for a stream copy's key and a 450-byte body
    /// (long enough for the folding path, not only the short one).
    #[test]
    fn the_frame_checksum_is_crc32c_as_always_stored() {
        assert_eq!(frame_checksum(b"", b"123456789"), 0xe306_9283);
        assert_eq!(frame_checksum(b"1234", b"56789"), 0xe306_9283);
        let body: Vec<u8> = (0..450u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(
            frame_checksum(b"ticket-1\0\0\0\0\0\0\0\0\x03", &body),
            0x99da_29ff
        );
    }

    proptest! {
        #[test]
        fn sealed_frames_round_trip(key in proptest::collection::vec(any::<u8>(), 0..64),
                                    body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let frame = seal(&key, &body);
            prop_assert_eq!(unseal("t", &key, &frame, String::new).expect("valid"), &body[..]);
        }

        #[test]
        fn a_sealed_message_is_the_seal_of_its_encoding(key in proptest::collection::vec(any::<u8>(), 0..32),
                                                       text in ".{0,64}", n in any::<u64>()) {
            let message = lineguard_protos::eventlog::v1::Actor { kind: (n % 5) as i32, id: text };
            prop_assert_eq!(seal_message(&key, &message), seal(&key, &prost::Message::encode_to_vec(&message)));
        }

        #[test]
        fn any_flipped_bit_is_detected(body in proptest::collection::vec(any::<u8>(), 1..256),
                                       bit in 0usize..2048) {
            let key = b"k";
            let mut frame = seal(key, &body);
            let bit = bit % (frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(unseal("t", key, &frame, || "here".into()).is_err());
        }
    }

    #[test]
    fn a_frame_under_another_key_is_rejected() {
        let frame = seal(b"a", b"body");
        let err = unseal("events", b"b", &frame, || "position 7".into()).expect_err("moved");
        assert!(err.to_string().contains("position 7"), "{err}");
    }

    #[test]
    fn outbox_runs_round_trip_and_old_single_entries_read_as_runs_of_one() {
        let run = OutboxRun {
            first: 41,
            count: 100,
        };
        let (key, value) = run.entry();
        assert_eq!(OutboxRun::decode(&key, &value).expect("valid"), run);
        assert_eq!(run.end(), 141);
        let old = seal(&position_key(7), &[]);
        assert_eq!(
            OutboxRun::decode(&position_key(7), &old).expect("old entry"),
            OutboxRun { first: 7, count: 1 }
        );
        let empty = seal(&position_key(7), &0u64.to_be_bytes());
        assert!(OutboxRun::decode(&position_key(7), &empty).is_err());
    }

    #[test]
    fn stream_keys_sort_by_stream_then_version() {
        assert!(stream_key("a", u64::MAX) < stream_key("a-b", 0));
        assert!(stream_key("a", 1) < stream_key("a", 2));
        assert_eq!(stream_key_version("a", &stream_key("a", 9)), Some(9));
        assert_eq!(stream_key_version("a", &stream_key("a-b", 9)), None);
    }
}
