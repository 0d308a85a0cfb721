//! Creating (or updating) the JetStream streams at start-up.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::Error;
use crate::subjects::{service_subjects, stream_name};

/// Bounds on a service's stream. The bus is a transport, not the record:
/// the log keeps every event forever, the stream only as long as consumers
/// may need to catch up.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Oldest messages are dropped past this size.
    pub max_bytes: i64,
    /// Messages older than this are dropped.
    pub max_age: Duration,
    /// Oldest messages are dropped past this many (-1: no limit).
    pub max_messages: i64,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop a re-publish.
    /// Every id of the window is held in the server's memory (about 180
    /// bytes each on nats-server 2.15, measured), so it is a memory bound
    /// as much as a time: a re-publish past it reaches the consumers, whose
    /// inbox recognises the event id and applies nothing twice.
    pub duplicate_window: Duration,
    /// Copies JetStream keeps of each message, on that many nodes of its
    /// cluster (1 on a single server; 3 in production: one node lost
    /// loses nothing and stops nothing). Durable consumers inherit it.
    pub replicas: usize,
}

/// The default [`StreamSettings::duplicate_window`]: two minutes.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            // JetStream reserves this up front against the server's max_file_store
            // (20 GB in deploy/nats-server.conf): four services at 2 GiB fit.
            max_bytes: 2 * 1024 * 1024 * 1024,
            max_age: Duration::from_secs(14 * 24 * 3600),
            max_messages: -1,
            // JetStream's own default. A relay re-publishes within seconds
            // of a lost ack or a restart; 15 minutes held ~650 MB of ids in
            // nats-server at the province benchmark's 4,000 publishes/s.
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            replicas: 1,
        }
    }
}

/// What the server made of a stream it was asked to ensure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnsuredStream {
    /// The stream takes atomic batch publishes (`allow_atomic`; asked of
    /// every stream, kept by nats-server 2.12 and later).
    pub atomic_batches: bool,
}

/// Creates `service`'s stream, or brings its configuration up to `settings`.
/// Safe to call from every process at every start.
pub async fn ensure_stream(
    jetstream: &jetstream::Context,
    service: &str,
    settings: &StreamSettings,
) -> Result<EnsuredStream, Error> {
    let config = stream::Config {
        name: stream_name(service),
        subjects: vec![service_subjects(service)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_bytes: settings.max_bytes,
        max_age: settings.max_age,
        max_messages: settings.max_messages,
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas,
        // The relay publishes a run of its outbox as one batch: one store
        // sync for the run (see `crate::publish`).
        allow_atomic_publish: true,
        ..stream::Config::default()
    };
    let info = jetstream
        .create_or_update_stream(config)
        .await
        .map_err(|e| stream_error(service, settings, &e))?;
    Ok(EnsuredStream {
        atomic_batches: info.config.allow_atomic_publish,
    })
}

/// JetStream's error codes that trying again does not heal.
const PERMANENT: [jetstream::ErrorCode; 8] = [
    jetstream::ErrorCode::INSUFFICIENT_RESOURCES,
    jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED,
    jetstream::ErrorCode::MAXIMUM_STREAMS_LIMIT,
    jetstream::ErrorCode::STREAM_INVALID_CONFIG,
    jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP,
    jetstream::ErrorCode::JETSTREAM_NOT_ENABLED,
    jetstream::ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
    jetstream::ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED,
];

fn stream_error(
    service: &str,
    settings: &StreamSettings,
    e: &jetstream::context::CreateStreamError,
) -> Error {
    let stream = stream_name(service);
    if let jetstream::context::CreateStreamErrorKind::JetStream(js) = e.kind()
        && PERMANENT.contains(&js.error_code())
    {
        let hint = match js.error_code() {
            jetstream::ErrorCode::INSUFFICIENT_RESOURCES
            | jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED => format!(
                " (the stream reserves max_bytes = {} bytes: raise the server's \
                 jetstream max_file_store, or lower --stream-max-bytes)",
                settings.max_bytes
            ),
            jetstream::ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED => format!(
                " ({} replicas need a JetStream cluster of at least that many nodes: \
                 lower --stream-replicas, or connect to the cluster)",
                settings.replicas
            ),
            _ => String::new(),
        };
        return Error::StreamRefused {
            stream,
            reason: format!("{js}{hint}"),
        };
    }
    Error::Stream {
        stream,
        reason: e.to_string(),
    }
}
