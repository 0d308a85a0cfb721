//! A failure between the parts of a commit leaves nothing half-written:
//! fail points inside the writer, and a real SIGKILL of a writing process.
//!
//! Fail points are process-wide, so this file holds one test per scenario
//! family and each scenario sets up and tears down its own fail point.

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use lineguard_eventlog::{CommitOutcome, ExpectedVersion, Idempotency, Transaction};

const CHILD_ENV: &str = "LINEGUARD_ATOMICITY_CHILD_DIR";

fn full_commit(i: usize) -> Transaction {
    let stream = format!("ticket-{i}");
    Transaction::append(
        &stream,
        ExpectedVersion::NoStream,
        vec![noted(&stream, "a"), noted(&stream, "b")],
    )
    .and_append(
        "incident-1",
        ExpectedVersion::Any,
        vec![noted("incident-1", "joined")],
    )
    .idempotent(Idempotency::new(
        format!("key-{i}"),
        format!("req-{i}").as_bytes(),
        Bytes::from_static(b"ok"),
    ))
    .consuming("routing-intake", format!("msg-{i}"))
}

#[tokio::test]
async fn each_fail_point_on_a_fresh_log_leaves_nothing_behind() {
    let scenario = fail::FailScenario::setup();
    for point in [
        "eventlog::after_events",
        "eventlog::after_projections",
        "eventlog::after_marks",
        "eventlog::before_write",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        log.commit(full_commit(0)).await.expect("baseline");
        let digest = log.projection_digest().expect("digest");
        fail::cfg(point, "return").expect("configure fail point");
        assert!(log.commit(full_commit(1)).await.is_err(), "{point}");
        fail::remove(point);
        assert_eq!(log.head(), 3, "{point}");
        assert_eq!(log.projection_digest().expect("digest"), digest, "{point}");
        assert!(
            !log.inbox_contains("routing-intake", "msg-1")
                .expect("inbox"),
            "{point}"
        );
        // The idempotency key was not taken by the failed commit.
        let outcome = log.commit(full_commit(1)).await.expect("retry");
        assert!(matches!(outcome, CommitOutcome::Committed(_)), "{point}");
        assert_eq!(log.head(), 6, "{point}");
        log.close().await.expect("close");
        drop(log);
        // And after a restart everything is as the successful commits left it.
        let log = open(dir.path());
        assert_eq!(log.verify().expect("verify"), 6, "{point}");
        assert_eq!(count(&log, "incident-1"), 2, "{point}");
    }
    scenario.teardown();
}

/// Twenty commits over streams ticket-0..2 in turn, each of one event per text.
async fn commit_round_robin(log: &lineguard_eventlog::EventLog, texts: &[&str]) {
    for i in 0..20 {
        let stream = format!("ticket-{}", i % 3);
        let events = texts.iter().map(|t| noted(&stream, t)).collect();
        log.commit(Transaction::append(&stream, ExpectedVersion::Any, events))
            .await
            .expect("commit");
    }
}

/// A rebuild of the projections cut short (between clearing them and
/// replaying, or after one replayed page) is completed when the log is
/// opened again: the same projections as before, no event applied twice.
#[tokio::test]
async fn a_rebuild_cut_short_is_completed_when_the_log_is_opened_again() {
    let scenario = fail::FailScenario::setup();
    // Pages of 10 events: the replay of 40 takes four writes.
    let limits = lineguard_eventlog::Limits {
        max_read_page: 10,
        ..lineguard_eventlog::Limits::default()
    };
    for point in [
        "eventlog::rebuild_after_clear",
        "eventlog::replay_after_page",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open_with_limits(dir.path(), limits.clone());
        commit_round_robin(&log, &["x", "y"]).await;
        let digest = log.projection_digest().expect("digest");
        assert_eq!(count(&log, "ticket-0"), 14, "{point}");

        fail::cfg(point, "return").expect("configure fail point");
        assert!(log.rebuild_projections().await.is_err(), "{point}");
        fail::remove(point);
        assert_ne!(
            log.projection_digest().expect("digest"),
            digest,
            "{point}: the rebuild stopped part way"
        );
        log.close().await.expect("close");
        drop(log);

        let log = open_with_limits(dir.path(), limits.clone());
        assert_eq!(log.projection_digest().expect("digest"), digest, "{point}");
        assert_eq!(count(&log, "ticket-0"), 14, "{point}");
        assert_eq!(count(&log, "ticket-2"), 12, "{point}");
    }
    scenario.teardown();
}

/// A rebuild that fails part way leaves the live log refusing commits (a
/// commit would record half-built projections as complete through the
/// head) until a rebuild completes; then it commits again and its
/// projections are the ones a whole replay gives.
#[tokio::test]
async fn a_failed_rebuild_refuses_commits_until_a_rebuild_completes() {
    let scenario = fail::FailScenario::setup();
    let limits = lineguard_eventlog::Limits {
        max_read_page: 10,
        ..lineguard_eventlog::Limits::default()
    };
    for point in [
        "eventlog::rebuild_after_clear",
        "eventlog::replay_after_page",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open_with_limits(dir.path(), limits.clone());
        commit_round_robin(&log, &["x"]).await;
        let digest = log.projection_digest().expect("digest");

        fail::cfg(point, "return").expect("configure fail point");
        assert!(log.rebuild_projections().await.is_err(), "{point}");
        fail::remove(point);
        let refused = log
            .commit(Transaction::append(
                "ticket-0",
                ExpectedVersion::Any,
                vec![noted("ticket-0", "late")],
            ))
            .await;
        assert!(
            matches!(
                refused,
                Err(lineguard_eventlog::Error::ProjectionsIncomplete { .. })
            ),
            "{point}: {refused:?}"
        );
        assert_eq!(log.head(), 20, "{point}: nothing written while incomplete");
        assert!(
            matches!(
                log.projection_get(b"count/ticket-0"),
                Err(lineguard_eventlog::Error::ProjectionsIncomplete { .. })
            ),
            "{point}: half-built projections are not served"
        );

        let rebuilt = log.rebuild_projections_checked().await.expect("rebuild");
        assert_eq!(rebuilt.digest_after, digest, "{point}");
        log.commit(Transaction::append(
            "ticket-0",
            ExpectedVersion::Any,
            vec![noted("ticket-0", "after")],
        ))
        .await
        .expect("commits again after a whole rebuild");
        assert_eq!(count(&log, "ticket-0"), 8, "{point}");
    }
    scenario.teardown();
}

/// Runs only as the child of `a_killed_writer_leaves_only_whole_commits`:
/// commits forever until it is killed.
#[tokio::test]
async fn child_writer_commits_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return; // Not the child: nothing to do.
    };
    let log = open(std::path::Path::new(&dir));
    let start = log.head() as usize;
    let mut i = start;
    loop {
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let log = log.clone();
            let txn = full_commit(i);
            i += 1;
            tasks.push(tokio::spawn(async move { log.commit(txn).await }));
        }
        for task in tasks {
            let _ = task.await;
        }
        if i == start + 16 {
            std::fs::write(std::path::Path::new(&dir).join("started"), b"1").expect("marker");
        }
    }
}

#[test]
fn a_killed_writer_leaves_only_whole_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    for round in 0..3 {
        let _ = std::fs::remove_file(dir.path().join("started"));
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_writer_commits_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .spawn()
            .expect("spawn child writer");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !dir.path().join("started").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "child never started writing"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(150 + 100 * round));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");

        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let log = open(dir.path());
            let head = log.head();
            assert!(head > 0, "round {round}: the child wrote something");
            // Every commit is 3 events: a torn commit would leave a remainder.
            assert_eq!(
                head % 3,
                0,
                "round {round}: head {head} is not a whole number of commits"
            );
            assert_eq!(log.verify().expect("verify"), head);
            let commits = head / 3;
            assert_eq!(
                count(&log, "incident-1"),
                commits,
                "round {round}: projection matches the log"
            );
            let mut marks = 0;
            for i in 0..(head as usize + 64) {
                if log
                    .inbox_contains("routing-intake", &format!("msg-{i}"))
                    .expect("inbox")
                {
                    marks += 1;
                }
            }
            assert_eq!(
                marks, commits,
                "round {round}: one inbox mark per whole commit"
            );
            log.close().await.expect("close");
        });
    }
}

/// A group's events are in RocksDB a moment before the writer makes them
/// the head. A read of the whole log in that moment must not show them: a
/// reader would go on from past the head, and its next read be refused.
#[tokio::test]
async fn a_page_of_the_whole_log_never_shows_events_past_the_head() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.commit(Transaction::append(
        "ticket-0",
        ExpectedVersion::Any,
        vec![noted("ticket-0", "first")],
    ))
    .await
    .expect("first commit");
    assert_eq!(log.head(), 1);
    // The next group is held between its write and its head.
    fail::cfg("eventlog::before_head", "pause").expect("configure fail point");
    let writing = tokio::spawn({
        let log = log.clone();
        async move {
            log.commit(Transaction::append(
                "ticket-0",
                ExpectedVersion::Any,
                vec![noted("ticket-0", "second"), noted("ticket-0", "third")],
            ))
            .await
        }
    });
    // Written (RocksDB holds it), not yet the head.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.get_event(3).expect("get").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group was never written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(log.head(), 1);
    let page = log.read_all(1, 100).expect("read");
    assert_eq!(
        page.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        [1],
        "a page showed events past the head"
    );
    let stored = log.read_all_stored(1, 100).expect("read stored");
    assert_eq!(stored.iter().map(|e| e.position()).collect::<Vec<_>>(), [1]);
    let filtered = log
        .read_all_page(1, 100, &lineguard_eventlog::AllFilter::default())
        .expect("read page");
    assert_eq!(
        filtered.next_position, 2,
        "the next page starts at head + 1"
    );
    // Where the page says to go on from is a read the log accepts.
    assert!(
        log.read_all(filtered.next_position, 100)
            .expect("read on")
            .is_empty()
    );
    fail::remove("eventlog::before_head");
    writing.await.expect("join").expect("second commit");
    assert_eq!(log.head(), 3);
    let rest = log.read_all(2, 100).expect("read the rest");
    assert_eq!(
        rest.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        [2, 3]
    );
    scenario.teardown();
}
