//! Dispatch against a real nats-server with intake's stream held back for
//! longer than every retry budget: routes arrive first, are parked in
//! dispatch's log, and become their crews' orders the moment intake's
//! reports land. None is dropped, none dead-lettered, none assigned twice.

use std::sync::Arc;
use std::time::Duration;

use lineguard_bus::{
    ConsumerConfig, OutboxRelay, ParkingLot, ParkingProjector, RelayConfig, spawn_consumer,
    with_parking_events,
};
use lineguard_dispatch::consumers::{
    FROM_INTAKE, FROM_ROUTING, IntakeEvents, RoutingEvents, intake_subjects, routing_subjects,
};
use lineguard_dispatch::orders::Dispatcher;
use lineguard_dispatch::projection::{DispatchProjector, crew_stream};
use lineguard_eventlog::{
    ActorKind, EventLog, EventTypes, ExpectedVersion, LogConfig, NewEvent, ReadDirection,
    Transaction, actor,
};
use lineguard_harness::NatsServer;
use lineguard_protos::dispatch::v1::OrderAssigned;
use lineguard_protos::intake::v1::{Channel, TicketKind, TicketReported};
use lineguard_protos::routing::v1::{Crew, CrewDefined, TicketRouted};

const TICKETS: usize = 20;

fn source(dir: &std::path::Path, service: &str, types: EventTypes) -> EventLog {
    EventLog::open(LogConfig::new(dir.join(service), service).with_event_types(types))
        .expect("source log")
}

/// A short budget everywhere: ack wait, redeliveries, dead-lettering.
fn impatient(name: &str, source: &str, subjects: Vec<String>) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(name, source).filtered(subjects);
    config.ack_wait = Duration::from_secs(1);
    config.retry_delay = Duration::from_millis(20);
    config.dead_letter_after = 3;
    config.parked_sweep = Duration::from_secs(3_600);
    config
}

fn parked(log: &EventLog) -> u64 {
    let key = format!("bus/count/parked/{FROM_ROUTING}");
    log.projection_get(key.as_bytes())
        .expect("read")
        .map_or(0, |b| lineguard_bus::parking::decode_count(&b))
}

fn orders(log: &EventLog) -> Vec<OrderAssigned> {
    match log.read_stream(&crew_stream("crew-a"), 1, ReadDirection::Forward, 1_000) {
        Ok(slice) => slice
            .events
            .iter()
            .filter_map(|e| lineguard_eventlog::decode_payload::<OrderAssigned>(e).ok())
            .collect(),
        Err(lineguard_eventlog::Error::StreamNotFound { .. }) => Vec::new(),
        Err(e) => panic!("read: {e}"),
    }
}

#[tokio::test]
async fn routes_held_past_every_budget_become_orders_when_intake_catches_up() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let js = nats.jetstream().await.expect("jetstream");
    let routing = source(
        dir.path(),
        "routing",
        EventTypes::new()
            .with::<CrewDefined>(1)
            .with::<TicketRouted>(1),
    );
    let intake = source(
        dir.path(),
        "intake",
        EventTypes::new().with::<TicketReported>(1),
    );
    let dispatch_log = EventLog::open(
        LogConfig::new(dir.path().join("dispatch"), "dispatch")
            .with_event_types(with_parking_events(lineguard_dispatch::event_types()))
            .with_projector(ParkingProjector::wrap(Arc::new(DispatchProjector))),
    )
    .expect("dispatch log");
    let dispatcher = Dispatcher::new(dispatch_log.clone());
    let system = || actor(ActorKind::System, "test");

    // Routing's side is on the bus: the crew, then twenty routes.
    let crew = CrewDefined {
        crew: Some(Crew {
            crew_id: "crew-a".into(),
            station_id: "st-1".into(),
            members: vec!["Wang".into()],
            district_ids: vec!["d-1".into()],
        }),
    };
    routing
        .commit(Transaction::append(
            "directory",
            ExpectedVersion::Any,
            vec![NewEvent::new(&crew, "directory", system())],
        ))
        .await
        .expect("crew");
    for i in 0..TICKETS {
        let ticket = format!("ticket-{i}");
        let routed = TicketRouted {
            case_id: ticket.clone(),
            lead_ticket_id: ticket.clone(),
            kind: TicketKind::FaultRepair as i32,
            district_id: "d-1".into(),
            station_id: "st-1".into(),
            line: 1,
            hop: 1,
            assignee_id: "m-1".into(),
            crew_id: "crew-a".into(),
            field_work: true,
            ..TicketRouted::default()
        };
        routing
            .commit(Transaction::append(
                &ticket,
                ExpectedVersion::NoStream,
                vec![NewEvent::new(&routed, &ticket, system())],
            ))
            .await
            .expect("route");
    }
    let routing_relay = OutboxRelay::spawn(routing.clone(), js.clone(), RelayConfig::default());
    assert!(routing_relay.flush(Duration::from_secs(20)).await);

    let lot = ParkingLot::new();
    let from_routing = spawn_consumer(
        js.clone(),
        dispatch_log.clone(),
        impatient(FROM_ROUTING, "routing", routing_subjects()),
        RoutingEvents(dispatcher.clone()),
        lot.clone(),
    );
    let from_intake = spawn_consumer(
        js.clone(),
        dispatch_log.clone(),
        impatient(FROM_INTAKE, "intake", intake_subjects()),
        IntakeEvents(dispatcher.clone()),
        lot.clone(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while parked(&dispatch_log) < TICKETS as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "routes never parked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Held back past every budget: the ack wait, three deliveries.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(parked(&dispatch_log), TICKETS as u64);
    assert!(orders(&dispatch_log).is_empty());

    // Intake's reports land: every route becomes crew-a's order, once.
    for i in 0..TICKETS {
        let ticket = format!("ticket-{i}");
        let reported = TicketReported {
            ticket_id: ticket.clone(),
            channel: Channel::Hotline95598 as i32,
            kind: TicketKind::FaultRepair as i32,
            account_number: format!("acct-{i}"),
            ..TicketReported::default()
        };
        intake
            .commit(Transaction::append(
                &ticket,
                ExpectedVersion::NoStream,
                vec![NewEvent::new(&reported, &ticket, system())],
            ))
            .await
            .expect("report");
    }
    let intake_relay = OutboxRelay::spawn(intake.clone(), js.clone(), RelayConfig::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while orders(&dispatch_log).len() < TICKETS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {TICKETS} orders",
            orders(&dispatch_log).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let assigned = orders(&dispatch_log);
    let mut ids: Vec<&str> = assigned.iter().map(|o| o.order_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), TICKETS, "each order once");
    assert!(
        assigned.iter().all(|o| o.tickets.len() == 1),
        "each order knows who called"
    );
    assert_eq!(parked(&dispatch_log), 0);
    let dead = dispatch_log
        .projection_scan(b"bus/dead/", None, 10)
        .expect("scan");
    assert!(dead.is_empty(), "nothing dead-lettered");

    from_routing.stop().await;
    from_intake.stop().await;
    routing_relay.stop().await;
    intake_relay.stop().await;
}
