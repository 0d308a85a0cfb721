//! The event log each Lineguard service owns: append-only, checksummed,
//! group-committed, on RocksDB.
//!
//! The log is the ground truth. Everything else a service keeps (the outbox
//! for the bus, the inbox of consumed messages, idempotency records,
//! projections) is written in the same RocksDB batch as the events that
//! caused it, so none of it can disagree with the log after a crash.
//!
//! # Layout
//!
//! - [`log`]: [`EventLog`], opening, committing, reading, outbox and inbox access.
//! - [`txn`]: [`Transaction`] (what a commit writes) and [`CommitOutcome`].
//! - `writer`: the single writer thread and its group commit (one fsync per group).
//! - [`projection`]: the [`Projector`] trait and the view it writes through.
//! - [`stored`]: [`StoredEvent`], an event checked but read in place (bulk readers, the relay).
//! - [`subscribe`]: [`Subscription`], catch-up then live, bounded.
//! - [`timers`]: durable timers kept as projections, fired at most once.
//! - [`grpc`]: the `lineguard.eventlog.v1.EventLog` service.
//! - [`command`]: idempotent commands as gRPC services answer them.
//! - [`copy`]: the replicated copy every write goes to first, so a lost disk loses nothing.
//! - [`codec`]: column families, keys, and the crc32c frame of every record.
//! - [`limits`]: [`Limits`], the bound on everything that grows.
//! - [`ids`]: what a valid id looks like.
//! - [`error`]: [`Error`] and its gRPC status.
//!
//! # What "done" means
//!
//! When [`EventLog::commit`] returns `Committed`, the commit's events, stream
//! index entries, outbox entries, projection updates, inbox mark and
//! idempotency record are in RocksDB's write-ahead log and fsynced: a process
//! crash or power loss after that loses none of them, and a crash before it
//! leaves none of them.

pub mod clock;
pub mod codec;
pub mod command;
pub mod copy;
pub mod error;
pub mod grpc;
pub mod ids;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod projection;
pub mod stored;
pub mod subscribe;
pub mod timers;
pub mod trace;
pub mod txn;
mod writer;

pub use writer::Rebuilt;

pub use error::{Error, Result};
pub use grpc::{EventLogService, blocking};
pub use limits::Limits;
pub use lineguard_protos::eventlog::v1::{
    Actor, CommitReceipt, EventEnvelope, actor::Kind as ActorKind,
};
pub use log::{
    AllFilter, AllPage, Checkpointed, Decided, EventLog, LogConfig, ProjectionPages, ReadDirection,
    StoreMemory, StreamSlice, open_raw_store, stored_state,
};
pub use projection::{NoProjections, ProjectionRead, ProjectionView, Projector};
pub use stored::StoredEvent;
pub use subscribe::Subscription;
pub use txn::{
    CommitOutcome, EventTypes, ExpectedVersion, Idempotency, InboxMark, NewEvent, StreamAppend,
    Transaction, actor,
};

/// Decodes an event's payload as `M`, checking that the event is of that type.
pub fn decode_payload<M: prost::Message + prost::Name + Default>(
    event: &EventEnvelope,
) -> std::result::Result<M, String> {
    let expected = M::full_name();
    if event.event_type != expected {
        return Err(format!("event is {}, not {expected}", event.event_type));
    }
    M::decode(event.payload.as_ref()).map_err(|e| format!("undecodable {expected}: {e}"))
}
