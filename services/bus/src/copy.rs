//! A log's replicated copy on JetStream ([`lineguard_eventlog::copy`]).
//!
//! | what | name |
//! | --- | --- |
//! | stream of a service's copy | `LINEGUARD_COPY_<SERVICE>` |
//! | its one subject | `lineguard_copy.<service>` |
//!
//! The stream has no age, size or count limit (it is the record, not a
//! transport), keeps `--stream-replicas` copies, and refuses the deletion of
//! single messages. A record bigger than [`PART_BYTES`] is split into parts,
//! one message each, reassembled when read. Every message names the
//! sequence it must follow (`Nats-Expected-Last-Sequence`), so one writer
//! at a time: a second is refused instead of interleaving, and an append
//! retried after a lost ack is recognised by its `Nats-Msg-Id` (the
//! writer's id and the sequence) rather than appended twice.

use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use futures::{StreamExt, TryStreamExt};
use lineguard_eventlog::copy::{CopyBounds, CopyRecord, CopyTarget};
use lineguard_eventlog::{Error as LogError, Result as LogResult};

use crate::Error;

/// The key-value bucket a service (by its bus name, see
/// [`crate::partition`]) keeps its wrapped data keys in, off its disk
/// (`lineguard_intake::key_copy`): `LINEGUARD_KEYS_INTAKE` for intake.
pub fn key_bucket_name(service: &str) -> String {
    format!("LINEGUARD_KEYS_{}", service.to_ascii_uppercase())
}

/// A message of the copy carries at most this many bytes of its record:
/// under NATS's default 1 MiB `max_payload` with room for the headers.
pub const PART_BYTES: usize = 512 * 1024;

/// Messages read ahead when the copy is read back.
const READ_AHEAD: usize = 64;

const KIND_HEADER: &str = "Lineguard-Copy-Kind";
const PART_HEADER: &str = "Lineguard-Copy-Part";
const KIND_SNAPSHOT_STARTED: &str = "snapshot-started";
const KIND_WRITE: &str = "write";

/// Name of the stream holding `service`'s copy.
pub fn copy_stream_name(service: &str) -> String {
    format!("LINEGUARD_COPY_{}", service.to_ascii_uppercase())
}

/// The subject `service`'s copy is appended on.
pub fn copy_subject(service: &str) -> String {
    format!("lineguard_copy.{service}")
}

/// Creates `service`'s copy stream, or brings its replicas to `replicas`.
pub async fn ensure_copy_stream(
    jetstream: &jetstream::Context,
    service: &str,
    replicas: usize,
) -> Result<(), Error> {
    let name = copy_stream_name(service);
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![copy_subject(service)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        // No limits: the copy is the record a lost disk is rebuilt from.
        max_bytes: -1,
        max_messages: -1,
        max_age: Duration::ZERO,
        deny_delete: true,
        duplicate_window: Duration::from_secs(120),
        num_replicas: replicas,
        ..stream::Config::default()
    };
    jetstream
        .create_or_update_stream(config)
        .await
        .map_err(|e| Error::Stream {
            stream: name,
            reason: e.to_string(),
        })?;
    Ok(())
}

/// Runs `work` on `runtime` and waits for it, from a plain thread or from
/// a worker of a multi-threaded runtime (which is then given up for the
/// wait): how the log's and the key store's blocking calls reach NATS.
pub fn wait_on<F: Future>(runtime: &tokio::runtime::Handle, work: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(|| runtime.block_on(work)),
        Err(_) => runtime.block_on(work),
    }
}

/// `service`'s copy on JetStream, called from the log's threads.
pub struct JetStreamCopy {
    jetstream: jetstream::Context,
    service: String,
    stream: String,
    subject: String,
    /// Tells this process's appends from any other's (`Nats-Msg-Id`).
    writer_id: String,
    /// Parts appended by this process so far (part of each `Nats-Msg-Id`).
    records: std::sync::atomic::AtomicU64,
    runtime: tokio::runtime::Handle,
}

impl JetStreamCopy {
    /// The copy of `service`'s log (the stream must exist:
    /// [`ensure_copy_stream`]); its blocking calls run their NATS work on
    /// `runtime`, which must be a multi-threaded Tokio runtime.
    pub fn new(
        jetstream: jetstream::Context,
        service: &str,
        runtime: tokio::runtime::Handle,
    ) -> JetStreamCopy {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        JetStreamCopy {
            jetstream,
            service: service.to_string(),
            stream: copy_stream_name(service),
            subject: copy_subject(service),
            writer_id: format!("{}-{}-{nanos:x}", service, std::process::id()),
            records: std::sync::atomic::AtomicU64::new(0),
            runtime,
        }
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> LogError {
        LogError::Copy(format!("{what} {}: {e}", self.stream))
    }

    async fn bounds_async(&self) -> LogResult<CopyBounds> {
        let mut stream = self
            .jetstream
            .get_stream(&self.stream)
            .await
            .map_err(|e| self.failed("reading", e))?;
        let info = stream.info().await.map_err(|e| self.failed("reading", e))?;
        Ok(CopyBounds {
            first: info.state.first_sequence,
            last: info.state.last_sequence,
            messages: info.state.messages,
            bytes: info.state.bytes,
        })
    }

    /// Appends one part after `expected_last`, retrying what NATS may heal,
    /// and answers its sequence.
    async fn append_part(
        &self,
        expected_last: u64,
        kind: &str,
        part: (usize, usize),
        body: bytes::Bytes,
    ) -> LogResult<u64> {
        // Names this record, not only its place: a record that failed
        // and a later one meant for the same place are never mistaken for
        // each other.
        let record_number = self
            .records
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let message_id = format!("{}-{record_number}-{}", self.writer_id, expected_last + 1);
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
            expected_last.to_string().as_str(),
        );
        headers.insert(KIND_HEADER, kind);
        headers.insert(PART_HEADER, format!("{}/{}", part.0, part.1).as_str());
        let mut pause = Duration::from_millis(50);
        let mut last_warning: Option<std::time::Instant> = None;
        loop {
            let published = match self
                .jetstream
                .publish_with_headers(self.subject.clone(), headers.clone(), body.clone())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let error = match published {
                Ok(ack) => return Ok(ack.sequence),
                Err(e) => e,
            };
            match error.kind() {
                PublishErrorKind::WrongLastSequence => {
                    // Ours if an earlier try landed and its ack was lost.
                    return match self.message_id_at(expected_last + 1).await? {
                        Some(id) if id == message_id => Ok(expected_last + 1),
                        _ => Err(LogError::Copy(format!(
                            "another record is at {} in {} (another writer, or an append of \
                             this process whose answer was lost): two processes are writing one \
                             log's copy, or this one must reopen the log to follow the copy",
                            expected_last + 1,
                            self.stream
                        ))),
                    };
                }
                PublishErrorKind::MaxPayloadExceeded => {
                    return Err(self.failed("appending to", error));
                }
                _ => {
                    if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(service = %self.service, stream = %self.stream, error = %error,
                            "the log's copy cannot be reached; writes wait for it");
                        last_warning = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// The `Nats-Msg-Id` of message `sequence`, asked until the copy
    /// answers: an append's outcome must be known before the log goes on.
    async fn message_id_at(&self, sequence: u64) -> LogResult<Option<String>> {
        let mut pause = Duration::from_millis(50);
        loop {
            let got = match self.jetstream.get_stream_no_info(&self.stream).await {
                Ok(stream) => stream
                    .get_raw_message(sequence)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match got {
                Ok(message) => {
                    return Ok(message
                        .headers
                        .get(async_nats::header::NATS_MESSAGE_ID)
                        .map(|v| v.to_string()));
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, stream = %self.stream, sequence, error = %e,
                        "cannot read back a message of the log's copy yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn append_async(&self, expected_last: u64, record: &CopyRecord) -> LogResult<(u64, u64)> {
        let (kind, body) = match record {
            CopyRecord::SnapshotStarted { column_families } => (
                KIND_SNAPSHOT_STARTED,
                bytes::Bytes::from(column_families.join("\n")),
            ),
            CopyRecord::Write(data) => (KIND_WRITE, bytes::Bytes::copy_from_slice(data)),
        };
        let parts = body.len().div_ceil(PART_BYTES).max(1);
        let mut last = expected_last;
        let mut first = 0;
        for index in 0..parts {
            let start = index * PART_BYTES;
            let end = (start + PART_BYTES).min(body.len());
            last = self
                .append_part(last, kind, (index + 1, parts), body.slice(start..end))
                .await?;
            if index == 0 {
                first = last;
            }
        }
        Ok((first, last))
    }

    async fn read_async(
        &self,
        from: u64,
        apply: &mut dyn FnMut(u64, CopyRecord) -> LogResult<ControlFlow<()>>,
    ) -> LogResult<()> {
        let bounds = self.bounds_async().await?;
        if bounds.messages == 0 || from > bounds.last {
            return Ok(());
        }
        let stream = self
            .jetstream
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| self.failed("reading", e))?;
        let from = from.max(bounds.first);
        let mut messages = futures::stream::iter(from..=bounds.last)
            .map(|sequence| {
                let stream = &stream;
                async move {
                    stream
                        .get_raw_message(sequence)
                        .await
                        .map_err(|e| self.failed(&format!("reading message {sequence} of"), e))
                }
            })
            .buffered(READ_AHEAD);
        // Parts of the record being read: its first sequence, kind, bytes.
        let mut record: Option<(u64, String, Vec<u8>)> = None;
        while let Some(message) = messages.try_next().await? {
            let header = |name: &str| {
                message
                    .headers
                    .get(name)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            };
            let kind = header(KIND_HEADER);
            let (index, count) = parse_part(&header(PART_HEADER)).ok_or_else(|| {
                LogError::Copy(format!(
                    "message {} of {} has no valid {PART_HEADER} header",
                    message.sequence, self.stream
                ))
            })?;
            if index == 1 {
                record = Some((message.sequence, kind.clone(), Vec::new()));
            }
            let Some((first, record_kind, bytes)) = record.as_mut() else {
                // A record begun before `from`: not asked for.
                continue;
            };
            if *record_kind != kind {
                return Err(LogError::Copy(format!(
                    "message {} of {} is part {index} of a {kind} record inside a {record_kind} one",
                    message.sequence, self.stream
                )));
            }
            bytes.extend_from_slice(&message.payload);
            if index < count {
                continue;
            }
            let first = *first;
            let Some((_, kind, bytes)) = record.take() else {
                continue;
            };
            let decoded = match kind.as_str() {
                KIND_WRITE => CopyRecord::Write(bytes),
                KIND_SNAPSHOT_STARTED => CopyRecord::SnapshotStarted {
                    column_families: String::from_utf8_lossy(&bytes)
                        .split('\n')
                        .map(str::to_string)
                        .collect(),
                },
                other => {
                    return Err(LogError::Copy(format!(
                        "record {first} of {} is of unknown kind {other:?}",
                        self.stream
                    )));
                }
            };
            if apply(first, decoded)?.is_break() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// `"i/n"` with 1 <= i <= n.
fn parse_part(value: &str) -> Option<(usize, usize)> {
    let (index, count) = value.split_once('/')?;
    let (index, count) = (index.parse().ok()?, count.parse().ok()?);
    (1..=count).contains(&index).then_some((index, count))
}

impl CopyTarget for JetStreamCopy {
    fn bounds(&self) -> LogResult<CopyBounds> {
        wait_on(&self.runtime, self.bounds_async())
    }

    fn append(&self, expected_last: u64, record: &CopyRecord) -> LogResult<(u64, u64)> {
        wait_on(&self.runtime, self.append_async(expected_last, record))
    }

    fn purge_before(&self, sequence: u64) -> LogResult<()> {
        wait_on(&self.runtime, async {
            let stream = self
                .jetstream
                .get_stream_no_info(&self.stream)
                .await
                .map_err(|e| self.failed("purging", e))?;
            let purged = stream
                .purge()
                .sequence(sequence)
                .await
                .map_err(|e| self.failed("purging", e))?;
            tracing::info!(service = %self.service, stream = %self.stream, before = sequence,
                purged = purged.purged, "the log's copy was compacted to its latest snapshot");
            Ok(())
        })
    }

    fn read_from(
        &self,
        from: u64,
        apply: &mut dyn FnMut(u64, CopyRecord) -> LogResult<ControlFlow<()>>,
    ) -> LogResult<()> {
        wait_on(&self.runtime, self.read_async(from, apply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_numbered_from_one_to_their_count() {
        assert_eq!(parse_part("1/1"), Some((1, 1)));
        assert_eq!(parse_part("2/3"), Some((2, 3)));
        for bad in ["0/1", "2/1", "", "1", "a/b", "1/"] {
            assert_eq!(parse_part(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn each_service_has_its_own_copy_stream_outside_the_event_subjects() {
        assert_eq!(copy_stream_name("intake"), "LINEGUARD_COPY_INTAKE");
        assert_eq!(key_bucket_name("intake"), "LINEGUARD_KEYS_INTAKE");
        assert_eq!(copy_stream_name("intake-p1"), "LINEGUARD_COPY_INTAKE-P1");
        assert_eq!(copy_subject("intake"), "lineguard_copy.intake");
        assert!(!copy_subject("intake").starts_with("lineguard."));
    }
}
