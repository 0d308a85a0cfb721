//! A consumer trusts no envelope the bus hands it: one that came on a
//! subject it does not belong to (another service's envelope smuggled onto
//! this stream, or a type or case that is not the subject's) is
//! dead-lettered with the reason, never applied, and cannot make the real
//! event of the same id look handled.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::wait_until;
use lineguard_bus::{
    ConsumerConfig, Handled, Handler, HandlerError, ParkingLot, ParkingProjector, StreamSettings,
    ensure_stream, spawn_consumer,
    subjects::{case_bucket, event_subject, legacy_event_subject},
    with_parking_events,
};
use lineguard_eventlog::{
    EventEnvelope, EventLog, EventTypes, ExpectedVersion, LogConfig, NoProjections, ReadDirection,
    Transaction,
};
use lineguard_harness::NatsServer;
use lineguard_protos::bus::v1::EventDeadLettered;
use prost::Message;

const REPORTED: &str = "lineguard.test.v1.Reported";
const NOTED: &str = "lineguard.test.v1.Noted";

/// Notes every event it is given (stream `noted-<correlation>`).
struct Notes;

impl Handler for Notes {
    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        let mut noted = common::event(NOTED, &event.correlation_id);
        noted.publish = false;
        Ok(Handled::Commit(Transaction::append(
            format!("noted-{}", event.correlation_id),
            ExpectedVersion::Any,
            vec![noted],
        )))
    }
}

fn envelope(id: &str, source: &str, event_type: &str, correlation: &str) -> EventEnvelope {
    EventEnvelope {
        event_id: id.into(),
        stream_id: correlation.into(),
        stream_version: 1,
        global_position: 1,
        correlation_id: correlation.into(),
        event_type: event_type.into(),
        schema_version: 1,
        payload: Bytes::from_static(b"payload"),
        source: source.into(),
        ..EventEnvelope::default()
    }
}

fn noted(log: &EventLog, correlation: &str) -> bool {
    log.read_stream(
        &format!("noted-{correlation}"),
        1,
        ReadDirection::Forward,
        1,
    )
    .is_ok()
}

fn dead_letters(log: &EventLog) -> Vec<EventDeadLettered> {
    let page = log.read_all(1, 1_000).expect("read");
    page.iter()
        .filter(|e| e.event_type == "lineguard.bus.v1.EventDeadLettered")
        .map(|e| EventDeadLettered::decode(e.payload.as_ref()).expect("dead letter"))
        .collect()
}

#[tokio::test]
async fn an_envelope_on_a_subject_it_does_not_belong_to_is_dead_lettered() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let js = nats.jetstream().await.expect("jetstream");
    let log = EventLog::open(
        LogConfig::new(dir.path().join("dispatch"), "dispatch")
            .with_event_types(with_parking_events(EventTypes::new().with_name(NOTED, 1)))
            .with_projector(ParkingProjector::wrap(Arc::new(NoProjections))),
    )
    .expect("log");
    ensure_stream(&js, "intake", &StreamSettings::default())
        .await
        .expect("stream");

    let publish = |subject: String, envelope: EventEnvelope| {
        let js = js.clone();
        async move {
            js.publish(subject, Bytes::from(envelope.encode_to_vec()))
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    };
    // Smuggled first, borrowing the id of the genuine event that follows:
    // routing's envelope on intake's subject.
    let smuggled = envelope("evt-1", "routing", REPORTED, "c-1");
    publish(event_subject("intake", REPORTED, "c-1"), smuggled).await;
    // Intake's own envelope, but for another case than its subject names.
    let misfiled = envelope("evt-2", "intake", REPORTED, "c-2");
    assert_ne!(
        case_bucket("c-2"),
        case_bucket("c-9"),
        "the misfiled subject is another case's bucket"
    );
    publish(event_subject("intake", REPORTED, "c-9"), misfiled).await;
    // An event published before the case buckets, on its case's own
    // subject: still genuine (a stream written by the older relay drains).
    let before_buckets = envelope("evt-3", "intake", REPORTED, "c-3");
    publish(
        legacy_event_subject("intake", REPORTED, "c-3"),
        before_buckets,
    )
    .await;
    // The genuine event, on its own subject.
    let genuine = envelope("evt-1", "intake", REPORTED, "c-1");
    publish(event_subject("intake", REPORTED, "c-1"), genuine).await;

    let consumer = spawn_consumer(
        js.clone(),
        log.clone(),
        ConsumerConfig::new("dispatch-from-intake", "intake"),
        Notes,
        ParkingLot::new(),
    );
    wait_until("the genuine events noted", Duration::from_secs(20), || {
        noted(&log, "c-1") && noted(&log, "c-3")
    })
    .await;
    wait_until("two dead letters", Duration::from_secs(20), || {
        dead_letters(&log).len() == 2
    })
    .await;
    let dead = dead_letters(&log);
    for d in &dead {
        assert!(d.event_id.starts_with("forged-"), "{d:?}");
        assert!(
            d.error.contains("does not match its subject"),
            "the reason is given: {d:?}"
        );
    }
    assert!(dead[0].error.contains("source routing"), "{:?}", dead[0]);
    assert!(
        !noted(&log, "c-2") && !noted(&log, "c-9"),
        "nothing forged applied"
    );
    consumer.stop().await;
}
