//! Helpers shared by the bus's tests.
#![allow(dead_code)] // each test file uses its own part of this

use std::time::Duration;

use bytes::Bytes;
use lineguard_eventlog::{ActorKind, EventLog, NewEvent, actor};

/// A published event of `event_type` about `correlation`, payload `payload`.
pub fn event(event_type: &str, correlation: &str) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: event_type.into(),
        schema_version: 1,
        payload: Bytes::from_static(b"payload"),
        correlation_id: correlation.into(),
        causation_id: String::new(),
        actor: actor(ActorKind::System, "test"),
        publish: true,
        trace_parent: String::new(),
    }
}

/// Polls `done` every 20 ms until it holds; fails the test after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many events of `event_type` the whole log holds.
pub fn count_of_type(log: &EventLog, event_type: &str) -> usize {
    let mut count = 0;
    let mut from = 1;
    loop {
        let page = log.read_all(from, 1_000).expect("read");
        let Some(last) = page.last() else {
            return count;
        };
        from = last.global_position + 1;
        count += page.iter().filter(|e| e.event_type == event_type).count();
    }
}
