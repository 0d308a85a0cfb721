//! Helpers shared by the event log's tests.
#![allow(dead_code)]

use std::sync::Arc;

use bytes::Bytes;
use lineguard_eventlog::{
    ActorKind, EventEnvelope, EventLog, EventTypes, Limits, LogConfig, NewEvent, ProjectionView,
    Projector, actor,
};
use uuid::Uuid;

pub const NOTED: &str = "lineguard.test.v1.Noted";
pub const REJECTED: &str = "lineguard.test.v1.Rejected";

pub fn types() -> EventTypes {
    EventTypes::new().with_name(NOTED, 2).with_name(REJECTED, 1)
}

/// An event of type `Noted` whose payload is `text`.
pub fn noted(correlation: &str, text: &str) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: NOTED.into(),
        schema_version: 1,
        payload: Bytes::from(text.as_bytes().to_vec()),
        correlation_id: correlation.into(),
        causation_id: String::new(),
        actor: actor(ActorKind::System, "test"),
        publish: true,
        trace_parent: String::new(),
    }
}

/// Counts events per correlation id, and refuses events of type `Rejected`.
pub struct CountingProjector;

impl Projector for CountingProjector {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn version(&self) -> u32 {
        1
    }
    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
        if event.event_type == REJECTED {
            return Err("rejected on purpose".into());
        }
        let key = format!("count/{}", event.correlation_id);
        let current = view
            .get(key.as_bytes())
            .map_err(|e| e.to_string())?
            .map(|v| u64::from_be_bytes(v.try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        view.put(key.into_bytes(), (current + 1).to_be_bytes().to_vec());
        Ok(())
    }
}

pub fn config(dir: &std::path::Path) -> LogConfig {
    LogConfig::new(dir.join("log"), "test")
        .with_event_types(types())
        .with_projector(Arc::new(CountingProjector))
}

pub fn open(dir: &std::path::Path) -> EventLog {
    EventLog::open(config(dir)).expect("open log")
}

pub fn open_with_limits(dir: &std::path::Path, limits: Limits) -> EventLog {
    EventLog::open(config(dir).with_limits(limits)).expect("open log")
}

pub fn count(log: &EventLog, correlation: &str) -> u64 {
    log.projection_get(format!("count/{correlation}").as_bytes())
        .expect("projection read")
        .map(|v| u64::from_be_bytes(v.try_into().expect("8 bytes")))
        .unwrap_or(0)
}
