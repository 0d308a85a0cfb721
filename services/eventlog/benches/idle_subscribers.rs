//! What an idle `EventLog.Subscribe` stream costs the serving process.
//!
//! Run: `cargo bench --workspace --bench idle_subscribers`
//!
//! A log of 20,000 events of 600 bytes (about what intake's events weigh)
//! is served over gRPC on loopback; 1,024 clients subscribe from the start
//! and never read. What the process holds for them is measured from its
//! resident set (`/proc/self/statm`) before and after, with a subscriber
//! buffer of 256 events (the old default; the old reader also held a page
//! of 256 read ahead beside a full buffer, which it no longer does) and of
//! 64 (today's). Client and server share the process here, so the figures
//! include the client side's HTTP/2 receive windows (64 KiB a stream at
//! most); the difference between the two is the server's buffer alone.

use std::time::Duration;

use bytes::Bytes;
use lineguard_eventlog::{
    ActorKind, EventLog, EventLogService, EventTypes, ExpectedVersion, Limits, LogConfig, NewEvent,
    Transaction, actor,
};
use lineguard_protos::eventlog::v1::SubscribeRequest;
use lineguard_protos::eventlog::v1::event_log_client::EventLogClient;

const EVENT_TYPE: &str = "lineguard.bench.v1.Happened";
const EVENTS: usize = 20_000;
const SUBSCRIBERS: usize = 1_024;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn fill(log: &EventLog) {
    for batch in 0..EVENTS / 100 {
        let events = (0..100)
            .map(|i| NewEvent {
                event_id: uuid::Uuid::now_v7(),
                event_type: EVENT_TYPE.into(),
                schema_version: 1,
                payload: Bytes::from(vec![b'x'; 600]),
                correlation_id: format!("ticket-{batch}-{i}"),
                causation_id: String::new(),
                actor: actor(ActorKind::System, "bench"),
                publish: false,
                trace_parent: String::new(),
            })
            .collect();
        log.commit(Transaction::append(
            format!("ticket-{batch}"),
            ExpectedVersion::Any,
            events,
        ))
        .await
        .expect("commit");
    }
}

async fn measure(buffer: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        subscriber_buffer: buffer,
        max_subscribers: SUBSCRIBERS + 8,
        ..Limits::default()
    };
    let log = EventLog::open(
        LogConfig::new(dir.path().join("log"), "bench")
            .with_event_types(EventTypes::new().with_name(EVENT_TYPE, 1))
            .with_limits(limits),
    )
    .expect("open");
    fill(&log).await;
    let routes = tonic::service::Routes::new(EventLogService::server(log.clone()));
    let channel = lineguard_harness::serve_in_process(routes)
        .await
        .expect("serve");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = resident_bytes();
    let mut idle = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let stream = EventLogClient::new(channel.clone())
            .subscribe(SubscribeRequest { from_position: 1 })
            .await
            .expect("subscribe")
            .into_inner();
        idle.push(stream);
    }
    // Let every server task fill what it may and block.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = resident_bytes();
    let per = after.saturating_sub(before) as f64 / SUBSCRIBERS as f64 / 1024.0;
    drop(idle);
    log.close().await.expect("close");
    per
}

/// Each setting is measured in a process of its own (this program run
/// again with the buffer in `BUFFER_ENV`): memory freed by one run would
/// otherwise be reused by the next and hide its cost.
const BUFFER_ENV: &str = "LINEGUARD_BENCH_SUBSCRIBER_BUFFER";

fn main() {
    if let Some(buffer) = std::env::var(BUFFER_ENV).ok().and_then(|b| b.parse().ok()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let kib = runtime.block_on(measure(buffer));
        println!(
            "idle subscribers: buffer {buffer:>3} events: {kib:>7.1} KiB resident per idle stream ({SUBSCRIBERS} streams of a {EVENTS}-event log)"
        );
        return;
    }
    let me = std::env::current_exe().expect("own path");
    for buffer in [256, 64] {
        let status = std::process::Command::new(&me)
            .env(BUFFER_ENV, buffer.to_string())
            .status()
            .expect("run a measurement");
        assert!(status.success(), "measurement with buffer {buffer} failed");
    }
}
