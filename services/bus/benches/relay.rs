//! Outbox relay throughput: events committed to the log, then published to a
//! private nats-server and acknowledged by JetStream, per second. Run with
//! JetStream's default fsync interval and with `sync_interval: always`
//! (deploy/nats-server.conf), to show what durable acks cost; each with the
//! relay's runs published as atomic batches (as deployed, for a backlog
//! like this one) and one message at a time, to show what batches gain.
//!
//! Run: `cargo bench --workspace --bench relay`
//! Scale with `LINEGUARD_BENCH_SCALE` (default 1: 20,000 events per run).

use std::time::{Duration, Instant};

use lineguard_bus::relay::DEFAULT_BATCH_FROM_EVENTS;
use lineguard_bus::{OutboxRelay, RelayConfig};
use lineguard_eventlog::{EventLog, EventTypes, ExpectedVersion, LogConfig, Transaction};
use lineguard_harness::NatsServer;

mod common;
use common::{EVENT_TYPE, event};

async fn run(label: &str, config: &str, batch_from_events: usize, events: u64) {
    let nats = NatsServer::start_with_config(config).expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open(
        LogConfig::new(dir.path().join("log"), "bench")
            .with_event_types(EventTypes::new().with_name(EVENT_TYPE, 1)),
    )
    .expect("log");
    for i in 0..events / 100 {
        let stream = format!("incident-{i}");
        let batch = (0..100).map(|_| event(&stream)).collect();
        log.commit(Transaction::append(&stream, ExpectedVersion::Any, batch))
            .await
            .expect("commit");
    }
    let js = nats.jetstream().await.expect("connect");
    let start = Instant::now();
    let relay = OutboxRelay::spawn(
        log.clone(),
        js,
        RelayConfig {
            batch_from_events,
            ..RelayConfig::default()
        },
    );
    assert!(relay.flush(Duration::from_secs(600)).await, "relay drained");
    let secs = start.elapsed().as_secs_f64();
    relay.stop().await;
    println!(
        "relay, {label:<52} {events:>8} events  {:>9.0} ev/s published and acked",
        events as f64 / secs
    );
}

#[tokio::main]
async fn main() {
    let scale: u64 = std::env::var("LINEGUARD_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let events = 20_000 * scale;
    // A backlog is drained in full runs: what the default does with one.
    let never = usize::MAX;
    for (batch_from_events, how) in [
        (DEFAULT_BATCH_FROM_EVENTS, "atomic batches"),
        (never, "one by one"),
    ] {
        run(
            &format!("{how}, JetStream default sync (2 min)"),
            "",
            batch_from_events,
            events,
        )
        .await;
        run(
            &format!("{how}, JetStream sync_interval: always"),
            "jetstream { sync_interval: always }",
            batch_from_events,
            events,
        )
        .await;
    }
}
