//! The bus between Lineguard services: NATS JetStream.
//!
//! Services never publish directly. A commit puts its events in the log's
//! outbox in the same write as the events; the [`relay`] publishes them and
//! clears them on JetStream's ack. Services never consume directly either: a
//! [`consumer`] commits the handler's writes together with an inbox mark, and
//! acks after that. Together: nothing committed is lost, nothing consumed is
//! applied twice.
//!
//! # Layout
//!
//! - [`subjects`]: the subject and stream naming scheme.
//! - [`streams`]: stream creation and limits ([`StreamSettings`]).
//! - [`relay`]: [`OutboxRelay`], log → JetStream.
//! - [`publish`]: a run of messages published as one atomic batch.
//! - [`consumer`]: durable pull consumers, [`Handler`], effectively once.
//! - [`parking`]: parked events and dead letters, kept in the consumer's log.
//! - [`catchup`]: reconciling a consumer with its source's own log, so that
//!   nothing the bus dropped is missed.
//! - [`copy`]: a log's replicated copy on JetStream, which a lost disk is
//!   rebuilt from.
//! - [`partition`]: a service split into partitions, and the names each
//!   partition's instance goes by on the bus.
//! - [`admin`]: `lineguard.bus.v1.Consumers`, listing and retrying them.

pub mod admin;
pub mod catchup;
pub mod consumer;
pub mod copy;
pub mod metrics;
pub mod parking;
pub mod partition;
pub mod publish;
pub mod relay;
pub mod streams;
pub mod subjects;

pub use catchup::{SourceLog, SourceLogHandle};
pub use consumer::{
    Applied, ConsumerConfig, ConsumerHandle, Handled, Handler, HandlerError, apply_event,
    spawn_consumer,
};
pub use parking::{ParkingLot, ParkingProjector, with_parking_events};
pub use partition::Partition;
pub use relay::{Mirror, OutboxRelay, RelayConfig, RelayHealth, RelayMonitor};
pub use streams::{EnsuredStream, StreamSettings, ensure_stream};

/// A bus failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stream could not be created or updated (NATS unreachable, a
    /// timeout: trying again may succeed).
    #[error("stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    /// JetStream refused the stream for a reason that trying again will not
    /// heal: not enough storage for its limits, JetStream not enabled, a
    /// configuration it rejects. An operator must change NATS or the flags.
    #[error("NATS refused stream {stream}: {reason}")]
    StreamRefused { stream: String, reason: String },
}
