//! What the bus benchmarks share: the event they commit.

use bytes::Bytes;
use lineguard_eventlog::{ActorKind, NewEvent, actor};

/// The one event type the benchmarks write.
pub const EVENT_TYPE: &str = "lineguard.bench.v1.Happened";

/// A published 300-byte event on `stream`, correlated to it.
pub fn event(stream: &str) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: EVENT_TYPE.into(),
        schema_version: 1,
        payload: Bytes::from(vec![b'x'; 300]),
        correlation_id: stream.into(),
        causation_id: String::new(),
        actor: actor(ActorKind::System, "bench"),
        publish: true,
        trace_parent: String::new(),
    }
}
