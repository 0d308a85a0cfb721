//! A log copied to JetStream against a real nats-server: a lost data
//! directory comes back whole from the copy (events, projections,
//! idempotency records, outbox), a store behind its copy catches up, a
//! second writer is refused, records bigger than a message travel in parts.

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::event;
use lineguard_bus::copy::{JetStreamCopy, copy_stream_name, ensure_copy_stream};
use lineguard_eventlog::copy::{CompactionPolicy, CopyTarget};
use lineguard_eventlog::{
    CommitOutcome, Error, EventEnvelope, EventLog, EventTypes, ExpectedVersion, Idempotency,
    LogConfig, ProjectionView, Projector, Transaction,
};
use lineguard_harness::NatsServer;

const REPORTED: &str = "lineguard.test.v1.Reported";

/// Counts each ticket's events: a projection whose digest must survive.
struct CountPerTicket;

impl Projector for CountPerTicket {
    fn name(&self) -> &'static str {
        "count-per-ticket"
    }
    fn version(&self) -> u32 {
        1
    }
    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
        let key = format!("count/{}", event.correlation_id);
        let count = view
            .get(key.as_bytes())
            .map_err(|e| e.to_string())?
            .map(|v| u64::from_be_bytes(v.try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        view.put(key, (count + 1).to_be_bytes().to_vec());
        Ok(())
    }
}

fn config(dir: &Path) -> LogConfig {
    LogConfig::new(dir.join("eventlog"), "test")
        .with_event_types(EventTypes::new().with_name(REPORTED, 1))
        .with_projector(Arc::new(CountPerTicket))
}

async fn copy_of(server: &NatsServer) -> Arc<dyn CopyTarget> {
    let js = server.jetstream().await.expect("connect");
    ensure_copy_stream(&js, "test", 1)
        .await
        .expect("copy stream");
    Arc::new(JetStreamCopy::new(
        js,
        "test",
        tokio::runtime::Handle::current(),
    ))
}

/// A nats-server, a data directory, a copy on the server and a log
/// copied to it.
async fn copied_log() -> (NatsServer, tempfile::TempDir, Arc<dyn CopyTarget>, EventLog) {
    let server = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("dir");
    let copy = copy_of(&server).await;
    let log = open(config(dir.path()).with_copy(copy.clone()))
        .await
        .expect("open");
    (server, dir, copy, log)
}

async fn open(config: LogConfig) -> Result<EventLog, Error> {
    tokio::task::spawn_blocking(move || EventLog::open(config))
        .await
        .expect("open task")
}

/// Commits `n` tickets from `offset`, each with an idempotency key.
async fn report(log: &EventLog, n: usize, offset: usize) {
    for i in offset..offset + n {
        let ticket = format!("ticket-{i}");
        let txn = Transaction::append(
            &ticket,
            ExpectedVersion::NoStream,
            vec![event(REPORTED, &ticket)],
        )
        .idempotent(Idempotency::new(
            format!("call-{i}"),
            ticket.as_bytes(),
            Bytes::from(ticket.clone()),
        ));
        let outcome = log.commit(txn).await.expect("commit");
        assert!(
            matches!(outcome, CommitOutcome::Committed(_)),
            "{outcome:?}"
        );
    }
}

/// What must come back: every event, the projections, the outbox backlog.
fn state(log: &EventLog) -> (Vec<EventEnvelope>, String, u64) {
    let mut events = Vec::new();
    let mut from = 1;
    loop {
        let page = log.read_all(from, 1_000).expect("read");
        let Some(last) = page.last() else { break };
        from = last.global_position + 1;
        events.extend(page);
    }
    (
        events,
        log.projection_digest().expect("digest"),
        log.outbox_backlog(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_data_directory_comes_back_whole_from_the_copy() {
    let server = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("dir");
    // A log that ran before copying was turned on: its copy starts with a
    // snapshot of what it holds.
    let log = open(config(dir.path())).await.expect("open");
    report(&log, 50, 0).await;
    drop(log);
    let copy = copy_of(&server).await;
    let log = open(config(dir.path()).with_copy(copy.clone()))
        .await
        .expect("open copied");
    report(&log, 250, 50).await;
    let before = state(&log);
    assert_eq!(before.0.len(), 300);
    drop(log);

    std::fs::remove_dir_all(dir.path().join("eventlog")).expect("lose the disk");
    let log = open(config(dir.path()).with_copy(copy.clone()))
        .await
        .expect("rebuilt from the copy");
    let after = state(&log);
    assert_eq!(after.0, before.0, "the same events at the same positions");
    assert_eq!(after.1, before.1, "the same projections");
    assert_eq!(after.2, before.2, "the same outbox");
    // A retried call is still recognised: its idempotency record came back.
    let retry = Transaction::append(
        "ticket-7",
        ExpectedVersion::NoStream,
        vec![event(REPORTED, "ticket-7")],
    )
    .idempotent(Idempotency::new(
        "call-7",
        b"ticket-7",
        Bytes::from_static(b"ticket-7"),
    ));
    let outcome = log.commit(retry).await.expect("retry");
    assert!(
        matches!(&outcome, CommitOutcome::Duplicate { response, .. } if response.as_ref() == b"ticket-7"),
        "{outcome:?}"
    );
    // And it serves: new commits land after the restored head.
    report(&log, 10, 300).await;
    assert_eq!(log.head(), 310);
    assert_eq!(
        log.rebuild_projections_checked()
            .await
            .map(|r| r.digest_before == r.digest_after)
            .ok(),
        Some(true),
        "the restored projections are what the log derives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_behind_its_copy_applies_what_it_lacks() {
    let (_server, dir, copy, log) = copied_log().await;
    report(&log, 20, 0).await;
    drop(log);
    // The disk as it was after 20 commits: what a crash between the copy's
    // append and the local write leaves, many times over.
    let earlier = tempfile::tempdir().expect("dir");
    copy_dir(
        &dir.path().join("eventlog"),
        &earlier.path().join("eventlog"),
    );
    let log = open(config(dir.path()).with_copy(copy.clone()))
        .await
        .expect("reopen");
    report(&log, 30, 20).await;
    let expected = state(&log);
    drop(log);

    let log = open(config(earlier.path()).with_copy(copy.clone()))
        .await
        .expect("open the earlier disk");
    assert_eq!(state(&log), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_of_one_copy_is_refused() {
    let server = NatsServer::start().expect("nats");
    let (first, second) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let copy = copy_of(&server).await;
    let log = open(config(first.path()).with_copy(copy.clone()))
        .await
        .expect("open");
    report(&log, 5, 0).await;
    // A second instance given the same copy (a misconfigured partition):
    // it rebuilds from the copy, then both write.
    let other = open(config(second.path()).with_copy(copy_of(&server).await))
        .await
        .expect("open the second");
    assert_eq!(other.head(), 5);
    report(&other, 1, 5).await;
    let refused = log
        .commit(Transaction::append(
            "ticket-late",
            ExpectedVersion::NoStream,
            vec![event(REPORTED, "ticket-late")],
        ))
        .await;
    assert!(
        matches!(&refused, Err(Error::Copy(reason)) if reason.contains("another writer")),
        "{refused:?}"
    );
    // Refused before the disk: the first log did not take it.
    assert_eq!(log.head(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_bigger_than_a_message_travels_in_parts() {
    let (server, dir, copy, log) = copied_log().await;
    // Eight events of 200 KiB in one commit: one write of 1.6 MB.
    let events = (0..8)
        .map(|i| {
            let mut e = event(REPORTED, "ticket-big");
            e.payload = Bytes::from(vec![i as u8; 200 * 1024]);
            e
        })
        .collect();
    log.commit(Transaction::append(
        "ticket-big",
        ExpectedVersion::NoStream,
        events,
    ))
    .await
    .expect("commit");
    let before = state(&log);
    drop(log);
    let js = server.jetstream().await.expect("connect");
    let stream_info = js
        .get_stream(copy_stream_name("test"))
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info");
    assert!(
        stream_info.state.messages >= 4,
        "the write went in parts: {} messages",
        stream_info.state.messages
    );
    std::fs::remove_dir_all(dir.path().join("eventlog")).expect("lose the disk");
    let log = open(config(dir.path()).with_copy(copy))
        .await
        .expect("rebuilt");
    assert_eq!(state(&log), before);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy file");
    }
}

/// Writes made from the async runtime's own workers (a mistake, but one a
/// caller can make) while commits and outbox clears run: the copy's
/// appends need those workers to drive their I/O, so waiting on one must
/// never take them all. Every write completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_the_runtime_workers_never_starve_the_copy() {
    let (_server, _dir, _copy, log) = copied_log().await;
    let marks: Vec<_> = (0..8)
        .map(|task| {
            let log = log.clone();
            tokio::spawn(async move {
                for position in 1..=20u64 {
                    // Called on a worker, not in spawn_blocking.
                    log.record_reconciled_through(&format!("consumer-{task}"), position)
                        .expect("mark");
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let commits = tokio::spawn({
        let log = log.clone();
        async move { report(&log, 100, 0).await }
    });
    let all = async {
        for mark in marks {
            mark.await.expect("marks");
        }
        commits.await.expect("commits");
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), all)
        .await
        .expect("every write completed: no worker starved the copy");
    assert_eq!(log.head(), 100);
    assert_eq!(log.reconciled_through("consumer-7").expect("mark"), 20);
}

/// A copy grows with every write; compacted, it starts at a new snapshot,
/// holds less, and still rebuilds a lost store whole, writes after the
/// compaction included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_copy_still_rebuilds_the_store() {
    let (_server, dir, copy, log) = copied_log().await;
    report(&log, 100, 0).await;
    let compact = |log: &EventLog, policy: CompactionPolicy| {
        let log = log.clone();
        tokio::task::spawn_blocking(move || log.compact_copy(policy))
    };
    let not_due = compact(&log, CompactionPolicy::default())
        .await
        .expect("task")
        .expect("compact");
    assert_eq!(not_due, None, "a small copy is left as it is");
    let before = copy.bounds().expect("bounds");
    let always = CompactionPolicy {
        min_copy_bytes: 0,
        copy_to_store_ratio: 0,
    };
    let compacted = compact(&log, always)
        .await
        .expect("task")
        .expect("compact")
        .expect("compacted");
    let after = copy.bounds().expect("bounds");
    assert_eq!(after.first, compacted.first_sequence);
    assert!(after.first > before.last, "{before:?} {after:?}");
    assert!(after.messages < before.messages, "{before:?} {after:?}");
    report(&log, 20, 100).await;
    let expected = state(&log);
    drop(log);

    std::fs::remove_dir_all(dir.path().join("eventlog")).expect("lose the disk");
    let log = open(config(dir.path()).with_copy(copy))
        .await
        .expect("rebuilt from the compacted copy");
    assert_eq!(state(&log), expected);
}
