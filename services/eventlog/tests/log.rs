//! The event log's behaviour: concurrency, idempotency, inbox, reads, limits,
//! bad input, corruption, subscriptions, projections.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use lineguard_eventlog::codec::{
    CF_CORRELATIONS, CF_EVENTS, CF_META, CF_STREAM_EVENTS, META_STREAM_EVENTS, position_key, seal,
    stream_key,
};
use lineguard_eventlog::{
    AllFilter, CommitOutcome, Decided, Error, EventLog, EventTypes, ExpectedVersion, Idempotency,
    Limits, LogConfig, ProjectionRead, ReadDirection, Transaction, open_raw_store,
};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[tokio::test]
async fn appends_are_versioned_positioned_and_read_back_both_ways() {
    let dir = tmp();
    let log = open(dir.path());
    let receipt = log
        .commit(Transaction::append(
            "ticket-a",
            ExpectedVersion::NoStream,
            vec![noted("ticket-a", "one"), noted("ticket-a", "two")],
        ))
        .await
        .expect("commit");
    let receipt = receipt.receipt().expect("committed").clone();
    assert_eq!((receipt.first_position, receipt.last_position), (1, 2));
    log.commit(Transaction::append(
        "ticket-b",
        ExpectedVersion::Any,
        vec![noted("ticket-b", "x")],
    ))
    .await
    .expect("commit");
    log.commit(Transaction::append(
        "ticket-a",
        ExpectedVersion::Exact(2),
        vec![noted("ticket-a", "three")],
    ))
    .await
    .expect("commit");

    let forward = log
        .read_stream("ticket-a", 0, ReadDirection::Forward, 2)
        .expect("read");
    assert_eq!(forward.stream_version, 3);
    assert_eq!(
        forward
            .events
            .iter()
            .map(|e| e.stream_version)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(forward.next_version, Some(3));
    let rest = log
        .read_stream("ticket-a", 3, ReadDirection::Forward, 10)
        .expect("read");
    assert_eq!(rest.events.len(), 1);
    assert_eq!(rest.events[0].global_position, 4);
    assert_eq!(rest.events[0].payload, Bytes::from_static(b"three"));
    assert_eq!(rest.next_version, None);

    let backward = log
        .read_stream("ticket-a", 0, ReadDirection::Backward, 10)
        .expect("read");
    assert_eq!(
        backward
            .events
            .iter()
            .map(|e| e.stream_version)
            .collect::<Vec<_>>(),
        [3, 2, 1]
    );

    let all = log.read_all(0, 0).expect("read all");
    assert_eq!(
        all.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(
        all.iter()
            .all(|e| e.source == "test" && e.recorded_at.is_some())
    );
    assert_eq!(log.read_all(5, 10).expect("at the end").len(), 0);
    assert_eq!(count(&log, "ticket-a"), 3);
    assert_eq!(log.verify().expect("verify"), 4);
}

#[tokio::test]
async fn optimistic_concurrency_conflict_states_current_and_expected() {
    let dir = tmp();
    let log = open(dir.path());
    log.commit(Transaction::append(
        "ticket-c",
        ExpectedVersion::NoStream,
        vec![noted("ticket-c", "1"), noted("ticket-c", "2")],
    ))
    .await
    .expect("commit");

    let stale = log
        .commit(Transaction::append(
            "ticket-c",
            ExpectedVersion::Exact(1),
            vec![noted("ticket-c", "3")],
        ))
        .await
        .expect_err("stale writer must lose");
    match &stale {
        Error::WrongExpectedVersion {
            stream,
            expected,
            current,
        } => {
            assert_eq!(
                (stream.as_str(), *expected, *current),
                ("ticket-c", ExpectedVersion::Exact(1), 2)
            );
        }
        other => panic!("unexpected {other}"),
    }
    assert!(
        stale.to_string().contains("expected 1, current 2"),
        "{stale}"
    );
    let status = tonic::Status::from(stale);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    let ahead = log
        .commit(Transaction::append(
            "ticket-c",
            ExpectedVersion::Exact(7),
            vec![noted("ticket-c", "x")],
        ))
        .await
        .expect_err("expected version ahead of the stream");
    assert!(
        ahead.to_string().contains("expected 7, current 2"),
        "{ahead}"
    );

    let exists = log
        .commit(Transaction::append(
            "ticket-c",
            ExpectedVersion::NoStream,
            vec![noted("ticket-c", "x")],
        ))
        .await
        .expect_err("stream exists");
    assert!(matches!(
        exists,
        Error::WrongExpectedVersion { current: 2, .. }
    ));
    let missing = log
        .commit(Transaction::append(
            "ticket-new",
            ExpectedVersion::StreamExists,
            vec![noted("ticket-new", "x")],
        ))
        .await
        .expect_err("stream missing");
    assert!(matches!(
        missing,
        Error::WrongExpectedVersion { current: 0, .. }
    ));

    // A multi-stream commit with one stale stream writes nothing at all.
    let mixed = Transaction::append(
        "ticket-d",
        ExpectedVersion::NoStream,
        vec![noted("ticket-d", "x")],
    )
    .and_append(
        "ticket-c",
        ExpectedVersion::Exact(1),
        vec![noted("ticket-c", "y")],
    );
    assert!(log.commit(mixed).await.is_err());
    assert!(matches!(
        log.read_stream("ticket-d", 0, ReadDirection::Forward, 0),
        Err(Error::StreamNotFound { .. })
    ));
    assert_eq!(log.head(), 2);
    assert_eq!(count(&log, "ticket-d"), 0);
}

#[tokio::test]
async fn concurrent_writers_on_one_stream_exactly_one_wins_each_version() {
    let dir = tmp();
    let log = open(dir.path());
    let mut tasks = Vec::new();
    for i in 0..32 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.commit(Transaction::append(
                "ticket-race",
                ExpectedVersion::NoStream,
                vec![noted("ticket-race", &i.to_string())],
            ))
            .await
        }));
    }
    let mut wins = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => wins += 1,
            Err(Error::WrongExpectedVersion { current: 1, .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(log.head(), 1);
}

#[tokio::test]
async fn idempotent_retry_after_restart_returns_the_original_and_appends_nothing() {
    let dir = tmp();
    let request = b"ReportTicket{account:1234,kind:fault}";
    let original = {
        let log = open(dir.path());
        let outcome = log
            .commit(
                Transaction::append(
                    "ticket-i",
                    ExpectedVersion::NoStream,
                    vec![noted("ticket-i", "reported")],
                )
                .idempotent(Idempotency::new(
                    "callcentre:req-77",
                    request,
                    Bytes::from_static(b"answer-1"),
                )),
            )
            .await
            .expect("first commit");
        log.close().await.expect("close");
        outcome.receipt().expect("committed").clone()
    };

    let log = open(dir.path());
    let retry = log
        .commit(
            // A retry builds new events (new ids) and even another stream: it must not land.
            Transaction::append(
                "ticket-other",
                ExpectedVersion::NoStream,
                vec![noted("ticket-other", "reported")],
            )
            .idempotent(Idempotency::new(
                "callcentre:req-77",
                request,
                Bytes::from_static(b"answer-2"),
            )),
        )
        .await
        .expect("retry");
    assert_eq!(
        retry,
        CommitOutcome::Duplicate {
            receipt: original.clone(),
            response: Bytes::from_static(b"answer-1")
        }
    );
    assert_eq!(log.head(), 1);
    assert!(
        log.read_stream("ticket-other", 0, ReadDirection::Forward, 0)
            .is_err()
    );

    let conflict = log
        .commit(
            Transaction::append(
                "ticket-x",
                ExpectedVersion::NoStream,
                vec![noted("ticket-x", "other")],
            )
            .idempotent(Idempotency::new(
                "callcentre:req-77",
                b"a different request",
                Bytes::new(),
            )),
        )
        .await
        .expect_err("same key, different request");
    assert!(matches!(conflict, Error::IdempotencyConflict { .. }));
    assert_eq!(
        tonic::Status::from(conflict).code(),
        tonic::Code::AlreadyExists
    );
    assert_eq!(log.head(), 1);
}

#[tokio::test]
async fn a_hundred_concurrent_retries_commit_once() {
    let dir = tmp();
    let log = open(dir.path());
    let mut tasks = Vec::new();
    for i in 0..100 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            // Each retry races with its own fresh ticket id, as a service would make.
            let stream = format!("ticket-{i}");
            log.commit(
                Transaction::append(
                    &stream,
                    ExpectedVersion::NoStream,
                    vec![noted(&stream, "r")],
                )
                .idempotent(Idempotency::new(
                    "app:same-key",
                    b"same request",
                    Bytes::from(stream.clone()),
                )),
            )
            .await
        }));
    }
    let mut committed = 0;
    let mut responses = HashSet::new();
    for task in tasks {
        match task.await.expect("task").expect("commit") {
            CommitOutcome::Committed(_) => committed += 1,
            CommitOutcome::Duplicate { response, .. } => {
                responses.insert(response);
            }
            CommitOutcome::AlreadyProcessed => panic!("no inbox here"),
        }
    }
    assert_eq!(committed, 1);
    assert_eq!(
        responses.len(),
        1,
        "every retry sees the one original answer"
    );
    assert_eq!(log.head(), 1);
}

#[tokio::test]
async fn an_inbox_mark_makes_a_redelivery_a_no_op() {
    let dir = tmp();
    let log = open(dir.path());
    let txn = || {
        Transaction::append(
            "ticket-r",
            ExpectedVersion::Any,
            vec![noted("ticket-r", "routed")],
        )
        .consuming("routing-intake", "evt-1")
    };
    assert!(matches!(
        log.commit(txn()).await.expect("first"),
        CommitOutcome::Committed(_)
    ));
    assert_eq!(
        log.commit(txn()).await.expect("redelivery"),
        CommitOutcome::AlreadyProcessed
    );
    assert!(
        log.inbox_contains("routing-intake", "evt-1")
            .expect("inbox")
    );
    assert!(
        !log.inbox_contains("feedback-intake", "evt-1")
            .expect("inbox")
    );
    assert_eq!(log.head(), 1);
    assert_eq!(count(&log, "ticket-r"), 1);
    // A mark alone (the handler had nothing to write) is recorded too.
    let mark_only = Transaction::default().consuming("routing-intake", "evt-2");
    log.commit(mark_only.clone()).await.expect("mark only");
    assert_eq!(
        log.commit(mark_only).await.expect("again"),
        CommitOutcome::AlreadyProcessed
    );
}

#[tokio::test]
async fn a_consumers_reconciled_mark_only_moves_forward_and_survives_a_restart() {
    let dir = tmp();
    {
        let log = open(dir.path());
        assert_eq!(log.reconciled_through("c").expect("mark"), 0, "none yet");
        log.record_reconciled_through("c", 40).expect("record");
        log.record_reconciled_through("c", 12).expect("lower: kept");
        assert_eq!(log.reconciled_through("c").expect("mark"), 40);
        assert_eq!(
            log.reconciled_through("other").expect("mark"),
            0,
            "per consumer"
        );
        log.close().await.expect("close");
    }
    let log = open(dir.path());
    assert_eq!(log.reconciled_through("c").expect("mark"), 40, "kept");
}

#[tokio::test]
async fn reads_past_the_end_and_of_missing_streams_are_clear_errors() {
    let dir = tmp();
    let log = open(dir.path());
    log.commit(Transaction::append(
        "ticket-e",
        ExpectedVersion::Any,
        vec![noted("ticket-e", "1")],
    ))
    .await
    .expect("commit");
    let err = log.read_all(3, 10).expect_err("past the end");
    assert!(
        matches!(
            err,
            Error::OutOfRange {
                requested: 3,
                last: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::OutOfRange);
    let err = log
        .read_stream("ticket-e", 3, ReadDirection::Forward, 0)
        .expect_err("past the end");
    assert!(
        err.to_string().contains("from_version 3 is past the end"),
        "{err}"
    );
    assert!(
        log.read_stream("ticket-e", 2, ReadDirection::Backward, 0)
            .is_err()
    );
    let err = log
        .read_stream("ticket-none", 0, ReadDirection::Forward, 0)
        .expect_err("missing");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::NotFound);
    assert!(log.subscribe(5).is_err());
}

#[tokio::test]
async fn bad_input_is_rejected_with_the_field_named_and_nothing_written() {
    let dir = tmp();
    let log = open(dir.path());
    let cases: Vec<(Transaction, &str)> = vec![
        (Transaction::default(), "appends"),
        (
            Transaction::append("", ExpectedVersion::Any, vec![noted("c", "x")]),
            "appends[0].stream_id",
        ),
        (
            Transaction::append("ticket.1", ExpectedVersion::Any, vec![noted("c", "x")]),
            "appends[0].stream_id",
        ),
        (
            Transaction::append("ticket-1", ExpectedVersion::Any, vec![]),
            "appends[0].events",
        ),
        (
            Transaction::append("ticket-1", ExpectedVersion::Any, vec![noted("", "x")]),
            "correlation_id",
        ),
        (
            Transaction::append("ticket-1", ExpectedVersion::Any, vec![noted("a b", "x")]),
            "correlation_id",
        ),
        (
            Transaction::append("ticket-1", ExpectedVersion::Any, vec![noted("c", "x")])
                .and_append("ticket-1", ExpectedVersion::Any, vec![noted("c", "y")]),
            "appears twice",
        ),
        (
            Transaction::append(
                "ticket-1",
                ExpectedVersion::Any,
                vec![{
                    let mut e = noted("c", "x");
                    e.event_type = "lineguard.test.v1.Unheard".into();
                    e
                }],
            ),
            "unknown event type",
        ),
        (
            Transaction::append(
                "ticket-1",
                ExpectedVersion::Any,
                vec![noted("c", "x").with_schema_version(3)],
            ),
            "unknown event type",
        ),
        (
            Transaction::append(
                "ticket-1",
                ExpectedVersion::Any,
                vec![{
                    let mut e = noted("c", "x");
                    e.actor.kind = 0;
                    e
                }],
            ),
            "actor.kind",
        ),
        (
            Transaction::append(
                "ticket-1",
                ExpectedVersion::Any,
                vec![{
                    let mut e = noted("c", "x");
                    e.event_id = uuid::Uuid::from_u128(0x67e5_5044_10b1_426f_9247_bb68_0e5f_e0c8); // a v4
                    e
                }],
            ),
            "UUIDv7",
        ),
        (
            Transaction::append("ticket-1", ExpectedVersion::Any, vec![noted("c", "x")])
                .idempotent(Idempotency::new("", b"r", Bytes::new())),
            "idempotency_key",
        ),
        (
            Transaction::default().consuming("routing", "bad id!"),
            "inbox.message_id",
        ),
    ];
    for (txn, expected) in cases {
        let err = log.commit(txn).await.expect_err(expected);
        assert!(
            err.to_string().contains(expected),
            "{err} should mention {expected}"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
    }
    assert_eq!(log.head(), 0);
    assert_eq!(log.read_all(0, 0).expect("read").len(), 0);
}

#[tokio::test]
async fn every_limit_is_enforced_with_its_error() {
    let dir = tmp();
    let limits = Limits {
        max_payload_bytes: 16,
        max_events_per_commit: 3,
        max_commit_bytes: 40,
        max_streams_per_commit: 2,
        max_id_len: 20,
        max_event_type_len: 30,
        max_idempotency_key_len: 8,
        max_idempotent_response_bytes: 4,
        max_read_page: 5,
        subscriber_buffer: 2,
        max_subscribers: 1,
        max_outbox_backlog: 6,
        ..Limits::default()
    };
    let log = open_with_limits(dir.path(), limits);
    let limited = |txn: Transaction, field: &'static str| {
        let log = log.clone();
        async move {
            let err = log.commit(txn).await.expect_err(field);
            assert!(matches!(err, Error::LimitExceeded { .. }), "{err}");
            assert!(
                err.to_string().contains(field),
                "{err} should mention {field}"
            );
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::InvalidArgument
            );
        }
    };
    limited(
        Transaction::append(
            "t-1",
            ExpectedVersion::Any,
            vec![noted("c", &"x".repeat(17))],
        ),
        "payload bytes",
    )
    .await;
    limited(
        Transaction::append(
            "t-1",
            ExpectedVersion::Any,
            (0..4).map(|_| noted("c", "x")).collect(),
        ),
        "events per commit",
    )
    .await;
    limited(
        Transaction::append(
            "t-1",
            ExpectedVersion::Any,
            vec![noted("c", &"x".repeat(16)), noted("c", &"y".repeat(16))],
        )
        .and_append(
            "t-2",
            ExpectedVersion::Any,
            vec![noted("c", &"z".repeat(16))],
        ),
        "payload bytes per commit",
    )
    .await;
    limited(
        Transaction::append("t-1", ExpectedVersion::Any, vec![noted("c", "x")])
            .and_append("t-2", ExpectedVersion::Any, vec![noted("c", "x")])
            .and_append("t-3", ExpectedVersion::Any, vec![noted("c", "x")]),
        "streams per commit",
    )
    .await;
    limited(
        Transaction::append("t".repeat(21), ExpectedVersion::Any, vec![noted("c", "x")]),
        "stream_id length",
    )
    .await;
    limited(
        Transaction::append("t-1", ExpectedVersion::Any, vec![noted("c", "x")])
            .idempotent(Idempotency::new("123456789", b"r", Bytes::new())),
        "idempotency_key length",
    )
    .await;
    limited(
        Transaction::append("t-1", ExpectedVersion::Any, vec![noted("c", "x")])
            .idempotent(Idempotency::new("k", b"r", Bytes::from_static(b"12345"))),
        "idempotent response bytes",
    )
    .await;
    // NOTED's name is 23 bytes, under 30; a longer registered name is refused by length first.
    let mut long_type = noted("c", "x");
    long_type.event_type = "lineguard.test.v1.".to_string() + &"N".repeat(20);
    limited(
        Transaction::append("t-1", ExpectedVersion::Any, vec![long_type]),
        "event_type length",
    )
    .await;

    let err = log.read_all(0, 6).expect_err("page over the limit");
    assert!(err.to_string().contains("max_count"), "{err}");

    // Outbox backlog: nothing drains it here, so the 7th event is refused.
    for i in 0..2 {
        log.commit(Transaction::append(
            "t-1",
            ExpectedVersion::Any,
            (0..3).map(|_| noted("c", &i.to_string())).collect(),
        ))
        .await
        .expect("within the backlog");
    }
    let err = log
        .commit(Transaction::append(
            "t-1",
            ExpectedVersion::Any,
            vec![noted("c", "x")],
        ))
        .await
        .expect_err("backlog full");
    assert!(
        matches!(
            err,
            Error::OutboxFull {
                backlog: 6,
                limit: 6
            }
        ),
        "{err}"
    );
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::ResourceExhausted
    );
    let drained = log.outbox_peek(10).expect("peek");
    assert_eq!(drained.len(), 6);
    log.outbox_clear(&drained.iter().map(|e| e.position()).collect::<Vec<_>>())
        .expect("clear");
    log.commit(Transaction::append(
        "t-1",
        ExpectedVersion::Any,
        vec![noted("c", "x")],
    ))
    .await
    .expect("room again");

    // Subscribers: one allowed; a second is refused until the first is gone.
    let first = log.subscribe(0).expect("first subscriber");
    let err = log.subscribe(0).err().expect("second subscriber");
    assert!(
        matches!(err, Error::TooManySubscribers { limit: 1 }),
        "{err}"
    );
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match log.subscribe(0) {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

#[tokio::test]
async fn a_corrupted_record_is_an_error_naming_its_position() {
    let dir = tmp();
    {
        let log = open(dir.path());
        for i in 0..5 {
            log.commit(Transaction::append(
                "ticket-z",
                ExpectedVersion::Any,
                vec![noted("ticket-z", &format!("event {i}"))],
            ))
            .await
            .expect("commit");
        }
        log.close().await.expect("close");
    }
    {
        let db = open_raw_store(&dir.path().join("log")).expect("raw");
        let cf = db.cf_handle(CF_EVENTS).expect("cf");
        let key = position_key(3);
        let mut value = db.get_cf(cf, key).expect("get").expect("present");
        let last = value.len() - 1;
        value[last] ^= 0x40;
        db.put_cf(cf, key, value).expect("damage");
        // And its copy by stream.
        let cf = db.cf_handle(CF_STREAM_EVENTS).expect("cf");
        let key = stream_key("ticket-z", 3);
        let mut value = db.get_cf(cf, &key).expect("get").expect("present");
        let last = value.len() - 1;
        value[last] ^= 0x40;
        db.put_cf(cf, &key, value).expect("damage");
    }
    let log = open(dir.path());
    let err = log.read_all(0, 0).expect_err("corrupted");
    assert!(matches!(err, Error::Corrupted { .. }), "{err}");
    assert!(err.to_string().contains("position 3"), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::DataLoss);
    let err = log
        .read_stream("ticket-z", 0, ReadDirection::Forward, 0)
        .expect_err("corrupted copy");
    assert!(err.to_string().contains("ticket-z v3"), "{err}");
    // A correlation read meets the damaged copy as the next event of the
    // stream named like it: an error naming it, never a page ending early.
    let err = log
        .read_correlation("ticket-z", 0, 0)
        .expect_err("corrupted copy, by correlation");
    assert!(err.to_string().contains("ticket-z v3"), "{err}");
    let err = log
        .read_correlation_stored("ticket-z", 0, 0)
        .expect_err("corrupted copy, by correlation in place");
    assert!(err.to_string().contains("ticket-z v3"), "{err}");
    assert_eq!(
        log.read_correlation_stored("ticket-z", 0, 2)
            .expect("before the damage")
            .0
            .len(),
        2
    );
    assert!(log.verify().is_err());
    let err = log
        .read_all_stored(0, 0)
        .expect_err("corrupted, read in place");
    assert!(err.to_string().contains("position 3"), "{err}");
    let err = log.outbox_peek(10).expect_err("corrupted, in the outbox");
    assert!(err.to_string().contains("position 3"), "{err}");
    // What is intact is still served.
    assert_eq!(log.read_all(1, 2).expect("before the damage").len(), 2);
    assert_eq!(log.read_all(4, 2).expect("after the damage").len(), 2);
    assert_eq!(
        log.read_all_stored(4, 2).expect("after the damage").len(),
        2
    );
}

#[tokio::test]
async fn events_read_in_place_are_the_events_read_whole() {
    let dir = tmp();
    let log = open(dir.path());
    for i in 0..30 {
        let stream = format!("ticket-{}", i % 4);
        log.commit(Transaction::append(
            &stream,
            ExpectedVersion::Any,
            vec![noted("incident-1", &format!("event {i}"))],
        ))
        .await
        .expect("commit");
    }
    let whole = log.read_all(0, 0).expect("read");
    let stored = log.read_all_stored(0, 0).expect("read in place");
    assert_eq!(whole.len(), 30);
    assert_eq!(stored.len(), 30);
    for (w, s) in whole.iter().zip(&stored) {
        assert_eq!(s.to_envelope().expect("decodes"), *w);
        assert_eq!(
            (
                s.position(),
                s.event_id(),
                s.stream_id(),
                s.correlation_id()
            ),
            (
                w.global_position,
                w.event_id.as_str(),
                w.stream_id.as_str(),
                w.correlation_id.as_str()
            )
        );
        assert_eq!(
            (s.event_type(), s.source()),
            (w.event_type.as_str(), "test")
        );
        assert_eq!(s.payload(), w.payload);
    }
    // Paged like read_all, with the same limits.
    assert_eq!(log.read_all_stored(29, 5).expect("tail").len(), 2);
    assert_eq!(log.read_all_stored(31, 5).expect("at the end").len(), 0);
    assert!(log.read_all_stored(32, 5).is_err(), "past the end");
}

#[tokio::test]
async fn a_stream_and_a_correlation_read_in_place_are_what_they_read_whole() {
    let dir = tmp();
    let log = open(dir.path());
    // Case "case-7" gets runs of events among others' (gaps of 1 to 40
    // records: some stepped over, some sought past), and its correlation
    // is also carried by events on crews' streams.
    for round in 0..40u64 {
        let mut txn = Transaction::append(
            "case-7",
            ExpectedVersion::Any,
            (0..1 + round % 3)
                .map(|i| noted("case-7", &format!("case {round}/{i}")))
                .collect(),
        );
        for other in 0..round % 7 {
            let stream = format!("other-{other}");
            txn = txn.and_append(
                &stream,
                ExpectedVersion::Any,
                (0..1 + round % 6)
                    .map(|_| noted(&stream, "other"))
                    .collect(),
            );
        }
        if round % 4 == 0 {
            txn = txn.and_append(
                "crew-3",
                ExpectedVersion::Any,
                vec![
                    noted("case-7", "crew"),
                    noted("case-8", "crew, another case"),
                ],
            );
        }
        log.commit(txn).await.expect("commit");
    }
    let case_events: usize = (0..40).map(|round| 1 + round % 3).sum();
    let ids = |events: &[lineguard_protos::eventlog::v1::EventEnvelope]| {
        events
            .iter()
            .map(|e| e.event_id.clone())
            .collect::<Vec<_>>()
    };
    let stored_ids = |events: &[lineguard_eventlog::StoredEvent]| {
        events
            .iter()
            .map(|e| e.event_id().to_string())
            .collect::<Vec<_>>()
    };
    for direction in [ReadDirection::Forward, ReadDirection::Backward] {
        for page in [0, 1, 7] {
            let (mut whole, mut in_place) = (Vec::new(), Vec::new());
            let mut from = if direction == ReadDirection::Forward {
                1
            } else {
                0
            };
            loop {
                let slice = log
                    .read_stream("case-7", from, direction, page)
                    .expect("read");
                let (stored, last, next) = log
                    .read_stream_stored("case-7", from, direction, page)
                    .expect("read in place");
                assert_eq!((last, next), (slice.stream_version, slice.next_version));
                for (s, w) in stored.iter().zip(&slice.events) {
                    assert_eq!(s.to_envelope().expect("decodes"), *w);
                }
                whole.extend(ids(&slice.events));
                in_place.extend(stored_ids(&stored));
                match next {
                    Some(n) => from = n,
                    None => break,
                }
            }
            assert_eq!(whole, in_place, "{direction:?}, pages of {page}");
            assert_eq!(whole.len(), case_events, "every event of the stream, once");
        }
    }
    for page in [0, 1, 5] {
        let (mut whole, mut in_place) = (Vec::new(), Vec::new());
        let mut from = 0;
        loop {
            let (events, next) = log.read_correlation("case-7", from, page).expect("read");
            let (stored, next_in_place) = log
                .read_correlation_stored("case-7", from, page)
                .expect("read in place");
            assert_eq!(next, next_in_place);
            whole.extend(ids(&events));
            in_place.extend(stored_ids(&stored));
            assert!(stored.iter().all(|e| e.correlation_id() == "case-7"));
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        assert_eq!(whole, in_place, "pages of {page}");
        assert_eq!(
            whole.len(),
            case_events + 10,
            "the case's and the crew's events"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_racing_appends_sees_every_event_once_in_order() {
    let dir = tmp();
    let log = open_with_limits(
        dir.path(),
        Limits {
            subscriber_buffer: 8,
            ..Limits::default()
        },
    );
    const WRITERS: usize = 8;
    const COMMITS: usize = 150;
    // Some history first, so the subscriber starts in catch-up mode.
    for i in 0..200 {
        log.commit(Transaction::append(
            format!("ticket-h{i}"),
            ExpectedVersion::Any,
            vec![noted("h", "x")],
        ))
        .await
        .expect("history");
    }
    let mut subscription = log.subscribe(0).expect("subscribe");
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            for c in 0..COMMITS {
                let stream = format!("ticket-w{w}");
                let events = (0..(1 + c % 3)).map(|_| noted(&stream, "live")).collect();
                log.commit(Transaction::append(&stream, ExpectedVersion::Any, events))
                    .await
                    .expect("live commit");
            }
        }));
    }
    let total = 200 + WRITERS * (0..COMMITS).map(|c| 1 + c % 3).sum::<usize>();
    let mut expected = 1u64;
    while expected <= total as u64 {
        let event = tokio::time::timeout(Duration::from_secs(20), subscription.next())
            .await
            .expect("no stall")
            .expect("open")
            .expect("event");
        assert_eq!(event.global_position, expected, "gap or duplicate");
        expected += 1;
    }
    for w in writers {
        w.await.expect("writer");
    }
    assert_eq!(log.head(), total as u64);
    // Nothing more than what was committed.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), subscription.next())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_share_fsyncs_and_stay_contiguous() {
    let dir = tmp();
    let log = open(dir.path());
    let mut tasks = Vec::new();
    for w in 0..64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let stream = format!("crew-{w}");
                log.commit(Transaction::append(
                    &stream,
                    ExpectedVersion::Any,
                    vec![noted(&stream, "x")],
                ))
                .await
                .expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(log.head(), 64 * 20);
    assert_eq!(log.verify().expect("verify"), 64 * 20);
    for w in 0..64 {
        let slice = log
            .read_stream(&format!("crew-{w}"), 0, ReadDirection::Forward, 0)
            .expect("read");
        assert_eq!(slice.stream_version, 20);
        assert_eq!(count(&log, &format!("crew-{w}")), 20);
    }
}

#[tokio::test]
async fn a_failing_projection_rolls_back_the_whole_commit_and_rebuild_reproduces_state() {
    let dir = tmp();
    let log = open(dir.path());
    for i in 0..50 {
        let stream = format!("ticket-{}", i % 7);
        log.commit(Transaction::append(
            &stream,
            ExpectedVersion::Any,
            vec![noted(&stream, "x"), noted(&stream, "y")],
        ))
        .await
        .expect("commit");
    }
    let head = log.head();
    let mut rejected = noted("ticket-1", "bad");
    rejected.event_type = REJECTED.into();
    let err = log
        .commit(
            Transaction::append(
                "ticket-1",
                ExpectedVersion::Any,
                vec![noted("ticket-1", "ok"), rejected],
            )
            .consuming("c", "m1"),
        )
        .await
        .expect_err("projector refuses");
    assert!(matches!(err, Error::Projection { .. }), "{err}");
    assert_eq!(log.head(), head, "no event of the failed commit landed");
    assert!(
        !log.inbox_contains("c", "m1").expect("inbox"),
        "nor its inbox mark"
    );
    assert_eq!(log.outbox_backlog(), head, "nor its outbox entries");

    let before = log.projection_digest().expect("digest");
    let replayed = log.rebuild_projections().await.expect("rebuild");
    assert_eq!(replayed, head);
    assert_eq!(log.projection_digest().expect("digest"), before);
    assert_eq!(count(&log, "ticket-0"), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_outbox_backlog_counts_exactly_while_a_relay_clears_concurrently() {
    let dir = tmp();
    let log = open(dir.path());
    let clearer = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut cleared = 0usize;
            while cleared < 2_000 {
                let log2 = log.clone();
                let page = tokio::task::spawn_blocking(move || log2.outbox_peek(64))
                    .await
                    .expect("join")
                    .expect("peek");
                let positions: Vec<u64> = page.iter().map(|e| e.position()).collect();
                log.outbox_clear(&positions).expect("clear");
                cleared += positions.len();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..8 {
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..250 {
                let stream = format!("ticket-{w}");
                log.commit(Transaction::append(
                    &stream,
                    ExpectedVersion::Any,
                    vec![noted(&stream, "x")],
                ))
                .await
                .expect("commit");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    tokio::time::timeout(Duration::from_secs(20), clearer)
        .await
        .expect("clearer finished")
        .expect("clearer");
    assert_eq!(log.outbox_peek(10).expect("peek").len(), 0);
    assert_eq!(
        log.outbox_backlog(),
        0,
        "counter agrees with the stored entries"
    );
}

#[tokio::test]
async fn unpublished_events_are_logged_and_projected_but_never_reach_the_outbox() {
    let dir = tmp();
    let log = open(dir.path());
    log.commit(
        Transaction::append(
            "ticket-a",
            ExpectedVersion::NoStream,
            vec![noted("ticket-a", "mine")],
        )
        .and_append(
            "observed-routing",
            ExpectedVersion::Any,
            vec![
                noted("ticket-a", "a copy").unpublished(),
                noted("ticket-a", "another copy").unpublished(),
            ],
        ),
    )
    .await
    .expect("commit");
    assert_eq!(log.head(), 3, "all three are in the log");
    let outbox = log.outbox_peek(10).expect("peek");
    assert_eq!(
        outbox.iter().map(|e| e.position()).collect::<Vec<_>>(),
        [1],
        "only the published event is waiting for the bus"
    );
    assert_eq!(log.outbox_backlog(), 1);
    assert_eq!(count(&log, "ticket-a"), 3, "and all three are projected");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// A stream written in appends of any sizes (interleaved with another
    /// stream) reads back, from any version, either way, in any page size,
    /// as the plain list of its versions would.
    #[test]
    fn stream_reads_agree_with_a_plain_model(
        sizes in proptest::collection::vec(1usize..6, 1..8),
        page in 1usize..7,
    ) {
        let dir = tmp();
        let log = open(dir.path());
        let mut positions = Vec::new(); // positions[v - 1] is version v's position
        for (i, size) in sizes.iter().enumerate() {
            let txn = Transaction::append("ticket-p", ExpectedVersion::Any, (0..*size).map(|_| noted("ticket-p", "x")).collect())
                .and_append(format!("other-{i}"), ExpectedVersion::NoStream, vec![noted("o", "y")]);
            let receipt = log.commit_blocking(txn).expect("commit").receipt().expect("committed").clone();
            positions.extend(receipt.first_position..receipt.first_position + *size as u64);
        }
        let last = positions.len() as u64;
        for from in 1..=last {
            for direction in [ReadDirection::Forward, ReadDirection::Backward] {
                let slice = log.read_stream("ticket-p", from, direction, page).expect("read");
                let expected: Vec<u64> = match direction {
                    ReadDirection::Forward => (from..=last).take(page).collect(),
                    ReadDirection::Backward => (1..=from).rev().take(page).collect(),
                };
                let versions: Vec<u64> = slice.events.iter().map(|e| e.stream_version).collect();
                proptest::prop_assert_eq!(&versions, &expected);
                for e in &slice.events {
                    proptest::prop_assert_eq!(e.global_position, positions[(e.stream_version - 1) as usize]);
                    proptest::prop_assert_eq!(e.stream_id.as_str(), "ticket-p");
                }
                proptest::prop_assert_eq!(slice.stream_version, last);
            }
        }
        proptest::prop_assert_eq!(log.verify().expect("verify"), log.head());
    }
}

#[tokio::test]
async fn a_correlation_reads_back_across_streams_in_log_order_and_older_logs_are_indexed() {
    let dir = tmp();
    let log = open(dir.path());
    // Case c-1's events: on its own stream, on a crew's stream, on another
    // ticket's stream; the crew's stream also holds another case's event.
    let plan: [(&str, &str); 7] = [
        ("c-1", "c-1"),
        ("crew-9", "c-1"),
        ("crew-9", "c-2"),
        ("c-1", "c-1"),
        ("t-5", "c-1"),
        ("c-1", "c-other"),
        ("crew-9", "c-1"),
    ];
    for (stream, correlation) in plan {
        log.commit(Transaction::append(
            stream,
            ExpectedVersion::Any,
            vec![noted(correlation, &format!("{stream}/{correlation}"))],
        ))
        .await
        .expect("commit");
    }
    let want: Vec<u64> = plan
        .iter()
        .enumerate()
        .filter(|(_, (_, c))| *c == "c-1")
        .map(|(i, _)| i as u64 + 1)
        .collect();
    let (all, next) = log.read_correlation("c-1", 0, 0).expect("read");
    assert_eq!(next, None);
    let positions: Vec<u64> = all.iter().map(|e| e.global_position).collect();
    assert_eq!(positions, want);
    assert!(all.iter().all(|e| e.correlation_id == "c-1"));

    // Pages of two, resuming where each ends.
    let mut paged = Vec::new();
    let mut from = 0;
    loop {
        let (page, next) = log.read_correlation("c-1", from, 2).expect("page");
        assert!(page.len() <= 2);
        paged.extend(page.iter().map(|e| e.global_position));
        match next {
            Some(n) => from = n,
            None => break,
        }
    }
    assert_eq!(paged, want);
    assert!(
        log.read_correlation("nobody", 0, 0)
            .expect("read")
            .0
            .is_empty()
    );
    let err = log.read_correlation("bad id!", 0, 0).expect_err("bad id");
    assert!(err.to_string().contains("correlation_id"), "{err}");
    log.close().await.expect("close");
    drop(log);

    // A log written before the index existed: no entries, no marker. It is
    // indexed when opened.
    {
        let raw = lineguard_eventlog::open_raw_store(&dir.path().join("log")).expect("raw");
        let cf = raw.cf_handle("correlations").expect("cf");
        let keys: Vec<Box<[u8]>> = raw
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .map(|item| item.expect("item").0)
            .collect();
        assert_eq!(
            keys.len(),
            5,
            "entries only for events off their correlation's stream"
        );
        for key in keys {
            raw.delete_cf(cf, key).expect("delete");
        }
        let meta = raw.cf_handle("meta").expect("meta");
        raw.delete_cf(meta, b"correlation_index")
            .expect("delete marker");
    }
    let log = open(dir.path());
    let (again, _) = log.read_correlation("c-1", 0, 0).expect("read");
    assert_eq!(
        again.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        want
    );
}

#[tokio::test]
async fn the_outbox_keeps_runs_and_clearing_part_of_one_leaves_exactly_the_rest() {
    let dir = tmp();
    {
        let log = open(dir.path());
        // Ten published events in one commit, one unpublished copy among
        // them: two runs, 1..=5 and 7..=11.
        let mut events: Vec<_> = (0..5).map(|i| noted("ticket-r", &format!("{i}"))).collect();
        events.push(noted("ticket-r", "a copy").unpublished());
        events.extend((5..10).map(|i| noted("ticket-r", &format!("{i}"))));
        log.commit(Transaction::append(
            "ticket-r",
            ExpectedVersion::NoStream,
            events,
        ))
        .await
        .expect("commit");
        let positions = |log: &lineguard_eventlog::EventLog| {
            log.outbox_peek(100)
                .expect("peek")
                .iter()
                .map(|e| e.position())
                .collect::<Vec<_>>()
        };
        assert_eq!(positions(&log), [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]);
        assert_eq!(log.outbox_backlog(), 10);
        // A page stops inside a run.
        assert_eq!(log.outbox_peek(3).expect("peek").len(), 3);
        // The middle, the start and the end of runs, and a position
        // that is not waiting (6, the copy): only waiting ones count.
        log.outbox_clear(&[1, 3, 6, 7, 11]).expect("clear");
        assert_eq!(positions(&log), [2, 4, 5, 8, 9, 10]);
        assert_eq!(log.outbox_backlog(), 6);
        log.outbox_clear(&[2, 4]).expect("clear");
        assert_eq!(positions(&log), [5, 8, 9, 10]);
        assert_eq!(log.outbox_backlog(), 4);
        log.close().await.expect("close");
    }
    // Counted again from the runs at open.
    let log = open(dir.path());
    assert_eq!(log.outbox_backlog(), 4);
    log.outbox_clear(&[5, 8, 9, 10]).expect("clear");
    assert_eq!(log.outbox_peek(100).expect("peek").len(), 0);
    assert_eq!(log.outbox_backlog(), 0);
}

/// With room for only two stream heads, commits to ten streams in turn still
/// check their expected versions against the stored heads, before and after
/// a restart: the writer's cache of heads is never the reason a version is
/// wrong.
#[tokio::test]
async fn expected_versions_hold_across_many_streams_with_a_tiny_head_cache() {
    let dir = tmp();
    let limits = Limits {
        max_cached_stream_heads: 2,
        ..Limits::default()
    };
    for session in 0..2u64 {
        let log = open_with_limits(dir.path(), limits.clone());
        for round in 0..3u64 {
            for s in 0..10 {
                let stream = format!("ticket-{s}");
                let version = session * 3 + round;
                let err = log
                    .commit(Transaction::append(
                        &stream,
                        ExpectedVersion::Exact(version + 1),
                        vec![noted(&stream, "ahead")],
                    ))
                    .await
                    .expect_err("an expected version ahead of the stream");
                assert!(
                    matches!(err, Error::WrongExpectedVersion { current, .. } if current == version),
                    "{err}"
                );
                log.commit(Transaction::append(
                    &stream,
                    ExpectedVersion::Exact(version),
                    vec![noted(&stream, "x")],
                ))
                .await
                .expect("commit at the stream's version");
            }
        }
        log.close().await.expect("close");
    }
}

/// The number of `Noted` events on the stream `counter`, as a decision
/// reads it from the projections (the counting projector's figure).
fn counted(read: &impl ProjectionRead) -> u64 {
    read.projection(b"count/counter")
        .expect("projection read")
        .map(|v| u64::from_be_bytes(v.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_on_the_writer_see_every_commit_before_them_even_in_their_own_group() {
    let dir = tmp();
    let log = open(dir.path());
    // Each decision appends at exactly the version it read: had any of
    // them decided on state older than a commit before it (one of its own
    // group, not yet written), its expected version would be refused.
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.decide(|read| {
                let seen = counted(read);
                let expected = if seen == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(seen)
                };
                let txn = Transaction::append(
                    "counter",
                    expected,
                    vec![noted("counter", &seen.to_string())],
                );
                Ok::<_, String>((txn, seen))
            })
            .await
        }));
    }
    let mut seen = Vec::new();
    for task in tasks {
        let (outcome, read) = task.await.expect("task").expect("decided and committed");
        assert!(matches!(outcome, CommitOutcome::Committed(_)));
        seen.push(read);
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..200).collect::<Vec<u64>>(),
        "each saw all before it"
    );
    assert_eq!(count(&log, "counter"), 200);
    let slice = log
        .read_stream("counter", 0, ReadDirection::Forward, 0)
        .expect("read");
    assert_eq!(slice.stream_version, 200);

    // Declined: nothing written, the decision's own error back.
    let head = log.head();
    let declined = log
        .decide(|read| Err::<(Transaction, ()), _>(format!("declined at {}", counted(read))))
        .await
        .expect_err("declined");
    assert!(matches!(&declined, Decided::Declined(why) if why == "declined at 200"));
    // A transaction the log does not take: the log's error, nothing written.
    let mut unknown = noted("counter", "x");
    unknown.event_type = "lineguard.test.v1.Unknown".into();
    let refused = log
        .decide(move |_| {
            Ok::<_, String>((
                Transaction::append("counter", ExpectedVersion::Any, vec![unknown]),
                (),
            ))
        })
        .await
        .expect_err("unknown type");
    assert!(
        matches!(refused, Decided::Log(Error::UnknownEventType { .. })),
        "{refused:?}"
    );
    // A decision that panics is refused; the writer goes on.
    let panicked = log
        .decide(|_| -> Result<(Transaction, ()), String> { panic!("a decision's bug") })
        .await
        .expect_err("panicked");
    assert!(matches!(panicked, Decided::Log(_)));
    assert_eq!(log.head(), head, "nothing declined or refused was written");
    log.commit(Transaction::append(
        "counter",
        ExpectedVersion::Exact(200),
        vec![noted("counter", "after")],
    ))
    .await
    .expect("the writer still commits");
    assert_eq!(log.verify().expect("verify"), head + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotent_decision_retried_at_once_is_decided_and_committed_once() {
    use lineguard_eventlog::command::decide_idempotent;
    let dir = tmp();
    let log = open(dir.path());
    // The answer: the count the decision saw, as a protobuf message.
    let decide = |log: EventLog, request: &'static [u8]| async move {
        decide_idempotent(&log, "key-1".into(), request.to_vec(), |read| {
            let seen = counted(read);
            let txn = Transaction::append(
                "counter",
                ExpectedVersion::Any,
                vec![noted("counter", "once")],
            );
            Ok((
                txn,
                prost_types::Duration {
                    seconds: seen as i64,
                    nanos: 0,
                },
            ))
        })
        .await
    };
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(tokio::spawn(decide(log.clone(), b"request")));
    }
    for task in tasks {
        let answer = task.await.expect("task").expect("answered");
        assert_eq!(answer.seconds, 0, "every retry gets the first answer");
    }
    assert_eq!(count(&log, "counter"), 1, "decided and committed once");
    let status = decide(log.clone(), b"another request")
        .await
        .expect_err("the key with another request");
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
    assert_eq!(count(&log, "counter"), 1);
}

#[tokio::test]
async fn a_log_from_before_the_stream_copies_gets_them_at_open_and_reads_the_same() {
    let dir = tmp();
    let (stream, correlation) = {
        let log = open(dir.path());
        for i in 0..40 {
            let child = format!("child-{}", i % 4);
            log.commit(
                Transaction::append(
                    "incident-x",
                    ExpectedVersion::Any,
                    vec![noted("incident-x", &format!("lead {i}"))],
                )
                .and_append(
                    &child,
                    ExpectedVersion::Any,
                    vec![noted("incident-x", &format!("child {i}"))],
                )
                .and_append(
                    "other",
                    ExpectedVersion::Any,
                    vec![noted("other", "x")],
                ),
            )
            .await
            .expect("commit");
        }
        let stream = log
            .read_stream("incident-x", 0, ReadDirection::Forward, 0)
            .expect("read")
            .events;
        let (correlation, _) = log.read_correlation("incident-x", 0, 0).expect("read");
        log.close().await.expect("close");
        (stream, correlation)
    };
    assert_eq!((stream.len(), correlation.len()), (40, 80));
    {
        // Make it a log as written before: no copies, no marker, the
        // correlation entries without envelopes.
        let db = open_raw_store(&dir.path().join("log")).expect("raw");
        let copies = db.cf_handle(CF_STREAM_EVENTS).expect("cf");
        let keys: Vec<Box<[u8]>> = db
            .iterator_cf(copies, rocksdb::IteratorMode::Start)
            .map(|item| item.expect("read").0)
            .collect();
        assert_eq!(keys.len(), 120, "every event has its copy");
        for key in keys {
            db.delete_cf(copies, key).expect("delete");
        }
        let correlations = db.cf_handle(CF_CORRELATIONS).expect("cf");
        let entries: Vec<Box<[u8]>> = db
            .iterator_cf(correlations, rocksdb::IteratorMode::Start)
            .map(|item| item.expect("read").0)
            .collect();
        assert_eq!(entries.len(), 40);
        for key in entries {
            db.put_cf(correlations, &key, seal(&key, &[])).expect("put");
        }
        db.delete_cf(db.cf_handle(CF_META).expect("cf"), META_STREAM_EVENTS)
            .expect("delete");
    }
    let log = open(dir.path());
    assert_eq!(log.verify().expect("verify"), 120);
    let again = log
        .read_stream("incident-x", 0, ReadDirection::Forward, 0)
        .expect("read")
        .events;
    assert_eq!(again, stream);
    let (again, _) = log.read_correlation("incident-x", 0, 0).expect("read");
    assert_eq!(again, correlation);
    // Paged from the middle, both ways of reading agree.
    let (page, next) = log
        .read_correlation_stored("incident-x", correlation[31].global_position, 10)
        .expect("read");
    assert_eq!(page.len(), 10);
    assert_eq!(page[0].position(), correlation[31].global_position);
    assert_eq!(next, Some(correlation[40].global_position + 1));
}

#[tokio::test]
async fn a_page_of_the_whole_log_keeps_the_types_asked_for_within_its_bounds() {
    const OTHER: &str = "lineguard.test.v1.Other";
    let dir = tmp();
    let limits = Limits {
        max_read_page_bytes: 4 * 1024,
        max_read_scan: 50,
        ..Limits::default()
    };
    let log = EventLog::open(
        LogConfig::new(dir.path().join("log"), "test")
            .with_event_types(EventTypes::new().with_name(NOTED, 2).with_name(OTHER, 1))
            .with_limits(limits),
    )
    .expect("open");
    // 1..=40: Noted and Other in turn, 100-byte payloads; 41..=140: Other;
    // 141: a Noted of 10 KiB, larger than a page's bytes.
    for i in 0..40 {
        let mut event = noted("c", &"n".repeat(100));
        if i % 2 == 1 {
            event.event_type = OTHER.into();
        }
        log.commit(Transaction::append("s", ExpectedVersion::Any, vec![event]))
            .await
            .expect("commit");
    }
    for _ in 0..100 {
        let mut event = noted("c", "o");
        event.event_type = OTHER.into();
        log.commit(Transaction::append("s", ExpectedVersion::Any, vec![event]))
            .await
            .expect("commit");
    }
    log.commit(Transaction::append(
        "s",
        ExpectedVersion::Any,
        vec![noted("c", &"b".repeat(10 * 1024))],
    ))
    .await
    .expect("commit");
    let mut whole = Vec::new();
    while let Ok(page) = log.read_all(whole.len() as u64 + 1, 1_000)
        && !page.is_empty()
    {
        whole.extend(page);
    }
    assert_eq!(whole.len(), 141);

    let noted_only = AllFilter {
        type_names: vec!["Noted".into()],
        without_payloads: false,
    };
    let page = log.read_all_page(1, 10, &noted_only).expect("noted");
    assert_eq!(
        page.events
            .iter()
            .map(|e| e.global_position)
            .collect::<Vec<_>>(),
        (0..10).map(|i| 1 + 2 * i).collect::<Vec<u64>>(),
        "only Noted, in log order"
    );
    assert_eq!(page.next_position, 20, "after the last record looked at");
    for event in &page.events {
        assert_eq!(event, &whole[event.global_position as usize - 1]);
    }

    // Without payloads: the same events, their payloads left out.
    let slim = AllFilter {
        without_payloads: true,
        ..noted_only.clone()
    };
    let page = log.read_all_page(1, 10, &slim).expect("slim");
    for event in &page.events {
        assert!(event.payload.is_empty());
        let mut stored = whole[event.global_position as usize - 1].clone();
        stored.payload = Bytes::new();
        assert_eq!(event, &stored);
    }

    // A page stops at its bytes (each event's envelope as stored; without
    // its payload when left out), and at the records it looks at.
    let fitting = |sizes: &mut dyn Iterator<Item = usize>| {
        let mut total = 0;
        sizes
            .take_while(|size| {
                total += size;
                total <= 4 * 1024
            })
            .count()
    };
    let expected = fitting(&mut whole.iter().map(prost::Message::encoded_len));
    let page = log.read_all(1, 1_000).expect("bytes");
    assert_eq!(page.len(), expected);
    assert!((10..30).contains(&expected), "{expected} events in 4 KiB");
    let every_type_slim = AllFilter {
        type_names: Vec::new(),
        without_payloads: true,
    };
    let expected_slim = fitting(
        &mut whole
            .iter()
            .map(|e| prost::Message::encoded_len(e) - e.payload.len()),
    )
    .min(50);
    let page = log
        .read_all_page(1, 1_000, &every_type_slim)
        .expect("slim bytes");
    assert_eq!(page.events.len(), expected_slim);
    assert!(expected_slim > expected, "more fit without payloads");
    // An event larger than a page's bytes still comes, alone.
    let page = log.read_all_page(141, 10, &noted_only).expect("big");
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].payload.len(), 10 * 1024);

    // A filter that matches little looks at `max_read_scan` records, then
    // says where to go on, before the head.
    let page = log.read_all_page(41, 10, &noted_only).expect("scan");
    assert!(page.events.is_empty());
    assert_eq!(page.next_position, 91);
    let page = log.read_all_page(91, 10, &noted_only).expect("scan on");
    assert!(page.events.is_empty());
    assert_eq!(page.next_position, 141);
    let page = log.read_all_page(141, 10, &noted_only).expect("scan on");
    assert_eq!(
        page.events
            .iter()
            .map(|e| e.global_position)
            .collect::<Vec<_>>(),
        [141]
    );
    assert_eq!(page.next_position, 142);
    // At the end: nothing, and the same position.
    let page = log.read_all_page(142, 10, &noted_only).expect("end");
    assert!(page.events.is_empty());
    assert_eq!(page.next_position, 142);
    assert!(log.read_all_page(143, 10, &noted_only).is_err());
}

#[tokio::test]
async fn pages_of_a_stream_and_of_a_correlation_stay_within_their_bytes() {
    const PAGE_BYTES: usize = 4 * 1024;
    let dir = tmp();
    let log = open_with_limits(
        dir.path(),
        Limits {
            max_read_page_bytes: PAGE_BYTES,
            ..Limits::default()
        },
    );
    // Case "c": 60 events on its own stream (read from the stream's
    // copies) and, between them, 20 on another stream that carry it (read
    // from the correlation column); then one of 10 KiB, larger than a page.
    for i in 0..60 {
        log.commit(Transaction::append(
            "c",
            ExpectedVersion::Any,
            vec![noted("c", &"n".repeat(100 + i))],
        ))
        .await
        .expect("commit");
        if i % 3 == 0 {
            log.commit(Transaction::append(
                "elsewhere",
                ExpectedVersion::Any,
                vec![noted("c", &"e".repeat(200))],
            ))
            .await
            .expect("commit");
        }
    }
    log.commit(Transaction::append(
        "c",
        ExpectedVersion::Any,
        vec![noted("c", &"b".repeat(10 * 1024))],
    ))
    .await
    .expect("commit");
    let stored_len = |e: &lineguard_eventlog::EventEnvelope| prost::Message::encoded_len(e);

    // The stream, forward and backward: pages in bytes, at least one event,
    // and all of them read once, in order.
    for direction in [ReadDirection::Forward, ReadDirection::Backward] {
        let mut from = 0;
        let mut read = Vec::new();
        loop {
            let slice = log.read_stream("c", from, direction, 0).expect("read");
            let bytes: usize = slice.events.iter().map(stored_len).sum();
            assert!(!slice.events.is_empty());
            assert!(
                slice.events.len() == 1 || bytes <= PAGE_BYTES,
                "{direction:?}: {} events, {bytes} bytes",
                slice.events.len()
            );
            assert!(slice.events.len() < 61, "{direction:?}: paged");
            read.extend(slice.events.iter().map(|e| e.stream_version));
            match slice.next_version {
                Some(next) => from = next,
                None => break,
            }
        }
        let mut expected: Vec<u64> = (1..=61).collect();
        if direction == ReadDirection::Backward {
            expected.reverse();
        }
        assert_eq!(read, expected, "{direction:?}");
    }
    let (stored, _, _) = log
        .read_stream_stored("c", 1, ReadDirection::Forward, 0)
        .expect("stored");
    let first = log
        .read_stream("c", 1, ReadDirection::Forward, 0)
        .expect("read");
    assert_eq!(stored.len(), first.events.len(), "stored pages alike");

    // The correlation, across both of its sources.
    let mut from = 0;
    let mut read = Vec::new();
    let mut pages = 0;
    loop {
        let (events, next) = log.read_correlation("c", from, 0).expect("read");
        let bytes: usize = events.iter().map(stored_len).sum();
        assert!(!events.is_empty());
        assert!(events.len() == 1 || bytes <= PAGE_BYTES, "{bytes} bytes");
        let (stored, stored_next) = log.read_correlation_stored("c", from, 0).expect("stored");
        assert_eq!(
            (stored.len(), stored_next),
            (events.len(), next),
            "stored pages alike"
        );
        read.extend(events.iter().map(|e| e.global_position));
        pages += 1;
        match next {
            Some(next) => from = next,
            None => break,
        }
    }
    assert!(pages > 3, "{pages} pages");
    let whole: Vec<u64> = (1..=log.head()).collect();
    assert_eq!(read, whole, "every event of the case once, in log order");
    // The last event, larger than a page, comes alone.
    let (events, next) = log.read_correlation("c", log.head(), 0).expect("big");
    assert_eq!((events.len(), next), (1, None));
    assert_eq!(events[0].payload.len(), 10 * 1024);
}
