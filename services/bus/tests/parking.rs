//! Nothing a consumer is given is dropped, against a real nats-server: an
//! event that arrives before what it depends on is parked in the
//! consumer's log and applied the moment its prerequisite lands, however
//! long that takes; one that fails for good is dead-lettered, listed and
//! retried on request.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::wait_until;
use lineguard_bus::admin::ConsumersService;
use lineguard_bus::{
    ConsumerConfig, Handled, Handler, HandlerError, OutboxRelay, ParkingLot, ParkingProjector,
    RelayConfig, spawn_consumer, subjects, with_parking_events,
};
use lineguard_eventlog::{
    EventEnvelope, EventLog, EventTypes, ExpectedVersion, LogConfig, NewEvent, NoProjections,
    ReadDirection, Transaction,
};
use lineguard_harness::NatsServer;
use lineguard_protos::bus::v1::consumers_server::Consumers;
use lineguard_protos::bus::v1::{
    ListDeadLettersRequest, ListParkedRequest, RetryDeadLetterRequest,
};
use tonic::Request;

const REPORTED: &str = "lineguard.test.v1.Reported";
const ROUTED: &str = "lineguard.test.v1.Routed";
const NOTED: &str = "lineguard.test.v1.Noted";
const ORDERED: &str = "lineguard.test.v1.Ordered";

fn event(event_type: &str, correlation: &str, payload: &'static [u8]) -> NewEvent {
    NewEvent {
        payload: Bytes::from_static(payload),
        ..common::event(event_type, correlation)
    }
}

fn source_log(dir: &std::path::Path, service: &str) -> EventLog {
    EventLog::open(
        LogConfig::new(dir.join(service), service).with_event_types(
            EventTypes::new()
                .with_name(REPORTED, 1)
                .with_name(ROUTED, 1),
        ),
    )
    .expect("open log")
}

/// The consuming service's log, with the parking records as every service has them.
fn consumer_log(dir: &std::path::Path) -> EventLog {
    EventLog::open(
        LogConfig::new(dir.join("dispatch"), "dispatch")
            .with_event_types(with_parking_events(
                EventTypes::new().with_name(NOTED, 1).with_name(ORDERED, 1),
            ))
            .with_projector(ParkingProjector::wrap(Arc::new(NoProjections))),
    )
    .expect("open log")
}

fn has_stream(log: &EventLog, stream: &str) -> bool {
    log.read_stream(stream, 1, ReadDirection::Forward, 1)
        .is_ok()
}

/// Notes every reported ticket (stream `noted-<ticket>`).
struct Notes;

impl Handler for Notes {
    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        let stream = format!("noted-{}", event.correlation_id);
        Ok(Handled::Commit(Transaction::append(
            stream,
            ExpectedVersion::Any,
            vec![event_unpublished(NOTED, &event.correlation_id)],
        )))
    }

    fn satisfies(&self, event: &EventEnvelope) -> Vec<String> {
        vec![format!("ticket:{}", event.correlation_id)]
    }
}

/// Makes an order of every route, once its ticket is noted; rejects a
/// `poison` route until `cured`.
struct Orders {
    log: EventLog,
    cured: Arc<AtomicBool>,
}

impl Handler for Orders {
    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        if event.payload.as_ref() == b"poison" && !self.cured.load(Ordering::SeqCst) {
            return Err(HandlerError::Reject(
                "a route this handler cannot read".into(),
            ));
        }
        if !has_stream(&self.log, &format!("noted-{}", event.correlation_id)) {
            return Err(HandlerError::Waiting {
                key: format!("ticket:{}", event.correlation_id),
                reason: "ticket not yet noted".into(),
            });
        }
        Ok(Handled::Commit(Transaction::append(
            format!("order-{}", event.correlation_id),
            ExpectedVersion::NoStream,
            vec![event_unpublished(ORDERED, &event.correlation_id)],
        )))
    }
}

fn event_unpublished(event_type: &str, correlation: &str) -> NewEvent {
    let mut e = event(event_type, correlation, b"x");
    e.publish = false;
    e
}

fn orders(log: &EventLog) -> usize {
    common::count_of_type(log, ORDERED)
}

/// A short retry budget everywhere: what used to drop an event after its
/// deliveries ran out must now keep it.
fn impatient(name: &str, source: &str, event_type: &str) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(name, source)
        .filtered(vec![subjects::event_type_filter(source, event_type)]);
    config.ack_wait = Duration::from_secs(1);
    config.retry_delay = Duration::from_millis(20);
    config.dead_letter_after = 3;
    // Long: what is applied below is applied by a wake, not a sweep.
    config.parked_sweep = Duration::from_secs(3_600);
    config
}

#[tokio::test]
async fn routes_held_past_every_retry_budget_reach_their_orders_when_the_reports_land() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let js = nats.jetstream().await.expect("jetstream");
    let intake = source_log(dir.path(), "intake");
    let routing = source_log(dir.path(), "routing");
    let dispatch = consumer_log(dir.path());
    let lot = ParkingLot::new();
    let cured = Arc::new(AtomicBool::new(false));

    // Routing's 30 routes are on the bus; intake's reports are held back
    // (its relay is not running).
    const TICKETS: usize = 30;
    for i in 0..TICKETS {
        let ticket = format!("t{i}");
        intake
            .commit(Transaction::append(
                &ticket,
                ExpectedVersion::NoStream,
                vec![event(REPORTED, &ticket, b"report")],
            ))
            .await
            .expect("report");
        routing
            .commit(Transaction::append(
                format!("route-{ticket}"),
                ExpectedVersion::NoStream,
                vec![event(ROUTED, &ticket, b"route")],
            ))
            .await
            .expect("route");
    }
    routing
        .commit(Transaction::append(
            "route-poisoned",
            ExpectedVersion::NoStream,
            vec![event(ROUTED, "poisoned", b"poison")],
        ))
        .await
        .expect("route");
    let routing_relay = OutboxRelay::spawn(routing.clone(), js.clone(), RelayConfig::default());
    assert!(routing_relay.flush(Duration::from_secs(20)).await);

    let from_routing = spawn_consumer(
        js.clone(),
        dispatch.clone(),
        impatient("dispatch-from-routing", "routing", ROUTED),
        Orders {
            log: dispatch.clone(),
            cured: cured.clone(),
        },
        lot.clone(),
    );
    let from_intake = spawn_consumer(
        js.clone(),
        dispatch.clone(),
        impatient("dispatch-from-intake", "intake", REPORTED),
        Notes,
        lot.clone(),
    );
    let admin = ConsumersService::new(dispatch.clone(), lot.clone());
    let parked = || async {
        admin
            .list_parked(Request::new(ListParkedRequest {
                consumer: "dispatch-from-routing".into(),
                page_size: 1_000,
            }))
            .await
            .expect("list parked")
            .into_inner()
    };
    let dead = || async {
        admin
            .list_dead_letters(Request::new(ListDeadLettersRequest {
                consumer: String::new(),
                page_size: 1_000,
            }))
            .await
            .expect("list dead letters")
            .into_inner()
    };

    // Every route is parked, none dropped, none dead-lettered for waiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while parked().await.total < TICKETS as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "routes never parked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Held back for longer than every budget: ack wait, three deliveries.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = parked().await;
    assert_eq!(held.total, TICKETS as u64);
    assert!(
        held.parked
            .iter()
            .all(|p| p.waiting_for.starts_with("ticket:"))
    );
    assert_eq!(orders(&dispatch), 0);
    let letters = dead().await;
    assert_eq!(letters.total, 1, "only the poisoned route: {letters:?}");
    assert_eq!(letters.dead_letters[0].correlation_id, "poisoned");
    assert!(letters.dead_letters[0].error.contains("cannot read"));

    // Intake's stream is released: every route becomes its order, once.
    let intake_relay = OutboxRelay::spawn(intake.clone(), js.clone(), RelayConfig::default());
    wait_until("every order", Duration::from_secs(30), || {
        orders(&dispatch) == TICKETS
    })
    .await;
    assert_eq!(parked().await.total, 0);

    // The operator retries the dead letter once its handler is fixed.
    cured.store(true, Ordering::SeqCst);
    let event_id = letters.dead_letters[0].event_id.clone();
    admin
        .retry_dead_letter(Request::new(RetryDeadLetterRequest {
            consumer: "dispatch-from-routing".into(),
            event_id: event_id.clone(),
        }))
        .await
        .expect("retry");
    // Its ticket was never reported: it waits, parked, for that report.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let p = parked().await;
        if p.total == 1 && p.parked[0].waiting_for == "ticket:poisoned" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not parked again: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead().await.total, 0);
    intake
        .commit(Transaction::append(
            "poisoned",
            ExpectedVersion::NoStream,
            vec![event(REPORTED, "poisoned", b"report")],
        ))
        .await
        .expect("report");
    wait_until("the retried order", Duration::from_secs(30), || {
        orders(&dispatch) == TICKETS + 1
    })
    .await;
    assert_eq!(parked().await.total, 0);
    let err = admin
        .retry_dead_letter(Request::new(RetryDeadLetterRequest {
            consumer: "dispatch-from-routing".into(),
            event_id,
        }))
        .await
        .expect_err("no longer dead");
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Each order exactly once, and the records rebuild from the log.
    let digest = dispatch.projection_digest().expect("digest");
    dispatch.rebuild_projections().await.expect("rebuild");
    assert_eq!(dispatch.projection_digest().expect("digest"), digest);
    from_routing.stop().await;
    from_intake.stop().await;
    intake_relay.stop().await;
    routing_relay.stop().await;
}
