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
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            // JetStream reserves this up front against the server's max_file_store
            // (20 GB in deploy/nats-server.conf): four services at 2 GiB fit.
            max_bytes: 2 * 1024 * 1024 * 1024,
            max_age: Duration::from_secs(14 * 24 * 3600),
            max_messages: -1,
            duplicate_window: Duration::from_secs(15 * 60),
        }
    }
}

/// Creates `service`'s stream, or brings its configuration up to `settings`.
/// Safe to call from every process at every start.
pub async fn ensure_stream(
    jetstream: &jetstream::Context,
    service: &str,
    settings: &StreamSettings,
) -> Result<(), Error> {
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
        num_replicas: 1,
        ..stream::Config::default()
    };
    jetstream
        .create_or_update_stream(config)
        .await
        .map_err(|e| Error::Stream {
            stream: stream_name(service),
            reason: e.to_string(),
        })?;
    Ok(())
}
