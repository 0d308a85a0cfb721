//! The shared timer table: a scan of due timers passes over those a service
//! cannot fire now, so no number of them ever blocks the ones behind.

mod common;

use std::sync::Arc;

use common::*;
use lineguard_eventlog::timers::{DueTimers, OwnerTimers};
use lineguard_eventlog::{
    EventEnvelope, EventLog, ExpectedVersion, LogConfig, ProjectionView, Projector, Transaction,
};
use prost_types::Timestamp;

/// Sets one timer per `Noted` event: owner = the correlation id, due at
/// the number of seconds in the payload.
struct TimerProjector;

impl Projector for TimerProjector {
    fn name(&self) -> &'static str {
        "timer-test"
    }
    fn version(&self) -> u32 {
        1
    }
    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
        let seconds: i64 = std::str::from_utf8(&event.payload)
            .map_err(|e| e.to_string())?
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string())?;
        let due = Timestamp { seconds, nanos: 0 };
        let mut timers = OwnerTimers::of(view, &event.correlation_id).map_err(|e| e.to_string())?;
        timers.set("clock", &due, &due, &[], |_, _| {
            event.correlation_id.as_bytes().to_vec()
        });
        timers.save();
        Ok(())
    }
}

fn open_timer_log(dir: &std::path::Path) -> EventLog {
    EventLog::open(
        LogConfig::new(dir.join("log"), "test")
            .with_event_types(types())
            .with_projector(Arc::new(TimerProjector)),
    )
    .expect("open log")
}

#[tokio::test]
async fn stuck_timers_never_block_the_ones_behind_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_timer_log(dir.path());
    // 600 timers no service can fire (say, their cases are mid-conflict),
    // all due before the one that can.
    for i in 0..600 {
        let owner = format!("stuck-{i:04}");
        log.commit(Transaction::append(
            &owner,
            ExpectedVersion::Any,
            vec![noted(&owner, &format!("{}", 1_000 + i))],
        ))
        .await
        .expect("commit");
    }
    log.commit(Transaction::append(
        "live",
        ExpectedVersion::Any,
        vec![noted("live", "5000")],
    ))
    .await
    .expect("commit");
    // One later, not yet due.
    log.commit(Transaction::append(
        "later",
        ExpectedVersion::Any,
        vec![noted("later", "9000")],
    ))
    .await
    .expect("commit");

    let now = Timestamp {
        seconds: 6_000,
        nanos: 0,
    };
    // Pages of 256, as the services read them: the scan walks past the
    // 600 stuck ones and reaches the live one, in fire order.
    let mut due = DueTimers::new(&log, &now, 256, 64 * 256);
    let mut seen = Vec::new();
    while let Some((_, owner)) = due.next_timer().expect("scan") {
        seen.push(String::from_utf8(owner).expect("utf8"));
    }
    assert_eq!(seen.len(), 601, "every due timer, the not-yet-due one left");
    assert_eq!(seen.last().map(String::as_str), Some("live"));
    assert!(seen.windows(2).take(599).all(|w| w[0] < w[1]), "fire order");

    // The scan's work is bounded: at most what it may look at.
    let mut bounded = DueTimers::new(&log, &now, 256, 300);
    let mut looked = 0;
    while bounded.next_timer().expect("scan").is_some() {
        looked += 1;
    }
    assert_eq!(looked, 300);
}
