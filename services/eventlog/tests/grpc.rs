//! The `EventLog` gRPC service over a real socket: paging, directions,
//! catch-up-then-live subscription, and statuses that name the field.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use lineguard_eventlog::{EventLogService, ExpectedVersion, Transaction};
use lineguard_protos::eventlog::v1::{
    ReadAllRequest, ReadDirection, ReadStreamRequest, SubscribeRequest,
    event_log_client::EventLogClient,
};
use tonic::transport::Channel;

async fn serve(log: lineguard_eventlog::EventLog) -> EventLogClient<Channel> {
    let routes = tonic::service::Routes::new(EventLogService::server(log));
    EventLogClient::new(
        lineguard_harness::serve_in_process(routes)
            .await
            .expect("serve"),
    )
}

#[tokio::test]
async fn reads_page_through_streams_and_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    for i in 0..25 {
        log.commit(Transaction::append(
            "ticket-g",
            ExpectedVersion::Exact(i),
            vec![noted("ticket-g", &i.to_string())],
        ))
        .await
        .expect("commit");
    }
    let mut client = serve(log.clone()).await;

    let mut versions = Vec::new();
    let mut from = 0;
    loop {
        let page = client
            .read_stream(ReadStreamRequest {
                stream_id: "ticket-g".into(),
                from_version: from,
                direction: 0,
                max_count: 10,
            })
            .await
            .expect("page")
            .into_inner();
        assert_eq!(page.stream_version, 25);
        versions.extend(page.events.iter().map(|e| e.stream_version));
        if page.next_version == 0 {
            break;
        }
        from = page.next_version;
    }
    assert_eq!(versions, (1..=25).collect::<Vec<_>>());

    let backward = client
        .read_stream(ReadStreamRequest {
            stream_id: "ticket-g".into(),
            from_version: 0,
            direction: ReadDirection::Backward as i32,
            max_count: 3,
        })
        .await
        .expect("backward")
        .into_inner();
    assert_eq!(
        backward
            .events
            .iter()
            .map(|e| e.stream_version)
            .collect::<Vec<_>>(),
        [25, 24, 23]
    );
    assert_eq!(backward.next_version, 22);

    let all = client
        .read_all(ReadAllRequest {
            from_position: 20,
            max_count: 100,
            ..Default::default()
        })
        .await
        .expect("read all")
        .into_inner();
    assert_eq!(all.events.len(), 6);
    assert_eq!((all.next_position, all.head_position), (26, 25));

    // A peer asks for its types only, without payloads.
    let slim = client
        .read_all(ReadAllRequest {
            from_position: 20,
            max_count: 100,
            type_names: vec!["Noted".into()],
            without_payloads: true,
        })
        .await
        .expect("slim")
        .into_inner();
    assert_eq!(slim.events.len(), 6);
    assert!(slim.events.iter().all(|e| e.payload.is_empty()));
    assert_eq!(
        slim.events.iter().map(|e| &e.event_id).collect::<Vec<_>>(),
        all.events.iter().map(|e| &e.event_id).collect::<Vec<_>>()
    );
    let none = client
        .read_all(ReadAllRequest {
            from_position: 20,
            max_count: 100,
            type_names: vec!["Rejected".into()],
            without_payloads: false,
        })
        .await
        .expect("other type")
        .into_inner();
    assert!(none.events.is_empty());
    assert_eq!(none.next_position, 26, "looked at to the head");
    for bad in [
        vec![String::new()],
        vec!["x".repeat(129)],
        vec!["T".into(); 65],
    ] {
        let err = client
            .read_all(ReadAllRequest {
                from_position: 1,
                type_names: bad,
                ..Default::default()
            })
            .await
            .expect_err("bad type names");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("type_names"), "{}", err.message());
    }

    let err = client
        .read_stream(ReadStreamRequest {
            stream_id: "ticket-g".into(),
            from_version: 0,
            direction: 9,
            max_count: 0,
        })
        .await
        .expect_err("unknown direction");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("direction"), "{}", err.message());
    let err = client
        .read_stream(ReadStreamRequest {
            stream_id: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("empty id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("stream_id"), "{}", err.message());
}

#[tokio::test]
async fn subscribe_catches_up_then_follows_live_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    for i in 0..10 {
        log.commit(Transaction::append(
            format!("ticket-{i}"),
            ExpectedVersion::NoStream,
            vec![noted("c", "old")],
        ))
        .await
        .expect("commit");
    }
    let mut client = serve(log.clone()).await;
    let mut stream = client
        .subscribe(SubscribeRequest { from_position: 4 })
        .await
        .expect("subscribe")
        .into_inner();
    let writer = {
        let log = log.clone();
        tokio::spawn(async move {
            for i in 10..40 {
                log.commit(Transaction::append(
                    format!("ticket-{i}"),
                    ExpectedVersion::NoStream,
                    vec![noted("c", "live")],
                ))
                .await
                .expect("commit");
            }
        })
    };
    for expected in 4..=40u64 {
        let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("no stall")
            .expect("open")
            .expect("ok");
        assert_eq!(item.event.expect("event").global_position, expected);
    }
    writer.await.expect("writer");
}
