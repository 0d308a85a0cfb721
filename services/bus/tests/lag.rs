//! `ListConsumers` against a real nats-server: a consumer's lag is what
//! JetStream holds for it and has not delivered, and a consumer JetStream
//! does not know is reported as such rather than as no lag.

use async_nats::jetstream::consumer::pull;
use lineguard_bus::admin::{ConsumersService, WatchedConsumer};
use lineguard_bus::{ParkingLot, StreamSettings, ensure_stream, subjects};
use lineguard_eventlog::{EventLog, LogConfig};
use lineguard_harness::NatsServer;
use lineguard_protos::bus::v1::ListConsumersRequest;
use lineguard_protos::bus::v1::consumers_server::Consumers;
use tonic::Request;

#[tokio::test]
async fn a_consumers_lag_is_what_jetstream_has_not_delivered_to_it() {
    let nats = NatsServer::start().expect("nats");
    let js = nats.jetstream().await.expect("connect");
    let dir = tempfile::tempdir().expect("tempdir");
    let log =
        EventLog::open(LogConfig::new(dir.path().join("dispatch"), "dispatch")).expect("open log");
    ensure_stream(&js, "intake", &StreamSettings::default())
        .await
        .expect("stream");
    let stream_name = subjects::stream_name("intake");
    js.get_stream(&stream_name)
        .await
        .expect("stream")
        .create_consumer(pull::Config {
            durable_name: Some("dispatch-from-intake".into()),
            ..pull::Config::default()
        })
        .await
        .expect("durable consumer");
    for i in 0..5 {
        js.publish(
            subjects::event_subject("intake", "lineguard.test.v1.Reported", &format!("t-{i}")),
            "x".into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }
    let (_caught_up_tx, caught_up) = tokio::sync::watch::channel(false);
    let watched = |name: &str| WatchedConsumer {
        name: name.into(),
        stream: stream_name.clone(),
        caught_up: caught_up.clone(),
    };
    let admin = ConsumersService::new(log, ParkingLot::new()).with_consumers(
        js.clone(),
        vec![
            watched("dispatch-from-intake"),
            watched("nobody-from-intake"),
        ],
    );
    let listed = admin
        .list_consumers(Request::new(ListConsumersRequest {}))
        .await
        .expect("list consumers")
        .into_inner()
        .consumers;
    assert_eq!(listed.len(), 2);
    let behind = &listed[0];
    assert_eq!(behind.consumer, "dispatch-from-intake");
    assert_eq!(behind.stream, "LINEGUARD_INTAKE");
    assert_eq!(behind.pending, 5, "{behind:?}");
    assert_eq!(behind.ack_pending, 0);
    assert!(!behind.caught_up);
    assert_eq!((behind.parked, behind.dead_letters), (0, 0));
    assert!(behind.bus_error.is_empty(), "{behind:?}");
    let unknown = &listed[1];
    assert_eq!(unknown.pending, 0);
    assert!(
        unknown.bus_error.contains("not found"),
        "a consumer JetStream does not hold says so: {unknown:?}"
    );
}
