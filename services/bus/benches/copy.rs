//! What the log's copy (`--log-copy`) costs and how fast a lost disk comes
//! back: commits per second from concurrent callers with and without the
//! copy (nats-server with `sync_interval: always`, as deployed), then the
//! time to rebuild an empty data directory from the copy.
//!
//! Run: `cargo bench -p lineguard-bus --bench copy`
//! Scale with `LINEGUARD_BENCH_SCALE` (default 1: 20,000 one-event commits
//! from 64 callers, 300-byte payloads).

use std::sync::Arc;
use std::time::Instant;

use lineguard_bus::copy::{JetStreamCopy, ensure_copy_stream};
use lineguard_eventlog::copy::CopyTarget;
use lineguard_eventlog::{EventLog, EventTypes, ExpectedVersion, LogConfig, Transaction};
use lineguard_harness::NatsServer;

mod common;
use common::{EVENT_TYPE, event};

const CALLERS: u64 = 64;

fn config(dir: &std::path::Path) -> LogConfig {
    LogConfig::new(dir.join("log"), "bench")
        .with_event_types(EventTypes::new().with_name(EVENT_TYPE, 1))
}

async fn open(config: LogConfig) -> EventLog {
    tokio::task::spawn_blocking(move || EventLog::open(config))
        .await
        .expect("open task")
        .expect("open")
}

/// `commits` one-event commits from [`CALLERS`] concurrent callers; commits/s.
async fn commit_all(log: &EventLog, commits: u64) -> f64 {
    let start = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in (caller..commits).step_by(CALLERS as usize) {
                    let stream = format!("ticket-{i}");
                    log.commit(Transaction::append(
                        &stream,
                        ExpectedVersion::NoStream,
                        vec![event(&stream)],
                    ))
                    .await
                    .expect("commit");
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller");
    }
    commits as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let scale: u64 = std::env::var("LINEGUARD_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let commits = 20_000 * scale;
    let nats = NatsServer::start_with_config("jetstream { sync_interval: always }").expect("nats");

    let plain_dir = tempfile::tempdir().expect("tempdir");
    let plain = open(config(plain_dir.path())).await;
    let plain_rate = commit_all(&plain, commits).await;
    drop(plain);
    println!("copy, disk only               {commits:>8} commits  {plain_rate:>9.0} commits/s");

    let js = nats.jetstream().await.expect("connect");
    ensure_copy_stream(&js, "bench", 1)
        .await
        .expect("copy stream");
    let copy: Arc<dyn CopyTarget> = Arc::new(JetStreamCopy::new(
        js.clone(),
        "bench",
        tokio::runtime::Handle::current(),
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let copied = open(config(dir.path()).with_copy(copy.clone())).await;
    let copied_rate = commit_all(&copied, commits).await;
    let head = copied.head();
    drop(copied);
    println!(
        "copy, disk after the copy     {commits:>8} commits  {copied_rate:>9.0} commits/s  ({:.2}x disk only)",
        copied_rate / plain_rate
    );

    let bounds = copy.bounds().expect("bounds");
    let bytes = js
        .get_stream(lineguard_bus::copy::copy_stream_name("bench"))
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info")
        .state
        .bytes;
    std::fs::remove_dir_all(dir.path().join("log")).expect("lose the disk");
    let start = Instant::now();
    let restored = open(config(dir.path()).with_copy(copy)).await;
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(restored.head(), head, "every event came back");
    println!(
        "copy, rebuild from the copy   {head:>8} events   {:>9.0} events/s  ({} records, {:.1} MB, {seconds:.2} s)",
        head as f64 / seconds,
        bounds.messages,
        bytes as f64 / 1e6
    );
}
