//! The bus against a real nats-server of the test's own: the outbox survives
//! NATS outages and relay crashes; consumers apply each event once.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage};
use common::{event, wait_until};
use futures::StreamExt;
use lineguard_bus::{
    Applied, ConsumerConfig, Handled, Handler, HandlerError, OutboxRelay, RelayConfig, apply_event,
    spawn_consumer, subjects,
};
use lineguard_eventlog::{
    EventEnvelope, EventLog, EventTypes, ExpectedVersion, LogConfig, NewEvent, Transaction,
};
use lineguard_harness::NatsServer;
use prost::Message;

const REPORTED: &str = "lineguard.test.v1.Reported";
const ROUTED: &str = "lineguard.test.v1.Routed";

fn open_log(dir: &std::path::Path, service: &str) -> EventLog {
    EventLog::open(
        LogConfig::new(dir.join(service), service).with_event_types(
            EventTypes::new()
                .with_name(REPORTED, 1)
                .with_name(ROUTED, 1),
        ),
    )
    .expect("open log")
}

async fn connect(server: &NatsServer) -> jetstream::Context {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    server.jetstream().await.expect("connect")
}

async fn report(log: &EventLog, n: usize, offset: usize) {
    for i in offset..offset + n {
        let ticket = format!("ticket-{i}");
        log.commit(Transaction::append(
            &ticket,
            ExpectedVersion::NoStream,
            vec![event(REPORTED, &ticket)],
        ))
        .await
        .expect("commit");
    }
}

/// Every message in the service's stream, decoded.
async fn stream_contents(js: &jetstream::Context, service: &str) -> Vec<EventEnvelope> {
    stream_messages(js, service)
        .await
        .into_iter()
        .map(|(envelope, _)| envelope)
        .collect()
}

/// Every message in the service's stream, decoded, with the id of the
/// atomic batch it was stored in (`None`: published alone).
async fn stream_messages(
    js: &jetstream::Context,
    service: &str,
) -> Vec<(EventEnvelope, Option<String>)> {
    let stream = js
        .get_stream(subjects::stream_name(service))
        .await
        .expect("stream");
    let consumer = stream
        .create_consumer(pull::OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let total = stream.get_info().await.expect("info").state.messages as usize;
    let mut messages = consumer.messages().await.expect("messages").take(total);
    let mut out = Vec::with_capacity(total);
    while let Some(message) = messages.next().await {
        let message = message.expect("message");
        let batch = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_BATCH_ID))
            .map(|id| id.to_string());
        out.push((
            EventEnvelope::decode(message.payload.as_ref()).expect("envelope"),
            batch,
        ));
    }
    out
}

#[tokio::test]
async fn the_outbox_delivers_everything_across_a_nats_restart_and_a_relay_crash() {
    let mut nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let js = connect(&nats).await;
    let log = open_log(dir.path(), "intake");
    let relay = OutboxRelay::spawn(log.clone(), js.clone(), RelayConfig::default());

    report(&log, 100, 0).await;
    wait_until("the first 100 published", Duration::from_secs(20), || {
        log.outbox_backlog() == 0
    })
    .await;

    // NATS goes away: commits keep landing, the outbox holds them.
    nats.stop().expect("stop nats");
    report(&log, 200, 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        log.outbox_backlog(),
        200,
        "nothing can be acknowledged while NATS is down"
    );

    // NATS comes back: the relay catches up by itself.
    nats.restart().expect("restart nats");
    wait_until(
        "the backlog drained after the restart",
        Duration::from_secs(30),
        || log.outbox_backlog() == 0,
    )
    .await;

    // The relay crashes with a backlog; the next one resumes from the outbox.
    nats.stop().expect("stop nats");
    report(&log, 50, 300).await;
    relay.stop().await;
    log.close().await.expect("close");
    drop(log);
    let log = open_log(dir.path(), "intake");
    assert_eq!(log.outbox_backlog(), 50, "the backlog survived the restart");
    nats.restart().expect("restart nats");
    let relay = OutboxRelay::spawn(log.clone(), js.clone(), RelayConfig::default());
    assert!(
        relay.flush(Duration::from_secs(30)).await,
        "resumed relay drained the outbox"
    );

    let published = stream_contents(&js, "intake").await;
    let logged = log.read_all(0, 1000).expect("read");
    assert_eq!(logged.len(), 350);
    assert_eq!(
        published.len(),
        350,
        "every event once: none lost, none duplicated"
    );
    let published_ids: HashSet<_> = published.iter().map(|e| e.event_id.clone()).collect();
    let logged_ids: HashSet<_> = logged.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(published_ids, logged_ids);
    relay.stop().await;
}

/// Records one `Routed` event per `Reported` event it is handed.
struct RouteEverything;

impl Handler for RouteEverything {
    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        if event.event_type != REPORTED {
            return Ok(Handled::Ignore);
        }
        let stream = format!("route-{}", event.correlation_id);
        Ok(Handled::Commit(Transaction::append(
            stream,
            ExpectedVersion::Any,
            vec![event_caused_by(event)],
        )))
    }
}

fn event_caused_by(cause: &EventEnvelope) -> NewEvent {
    let mut e = event(ROUTED, &cause.correlation_id);
    e.causation_id = cause.event_id.clone();
    e
}

#[tokio::test]
async fn a_redelivered_message_is_not_applied_twice() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let js = connect(&nats).await;
    let intake = open_log(dir.path(), "intake");
    let routing = open_log(dir.path(), "routing");
    let relay = OutboxRelay::spawn(intake.clone(), js.clone(), RelayConfig::default());
    report(&intake, 20, 0).await;
    assert!(relay.flush(Duration::from_secs(20)).await);

    // A previous incarnation of the consumer applied three events and died
    // before acknowledging them: JetStream will deliver them again.
    let reported = intake.read_all(0, 100).expect("read");
    for event in &reported[..3] {
        let applied = apply_event(&routing, "routing-intake", &RouteEverything, event, 3)
            .await
            .expect("apply");
        assert_eq!(applied, Applied::Committed);
    }
    assert_eq!(
        apply_event(
            &routing,
            "routing-intake",
            &RouteEverything,
            &reported[0],
            3
        )
        .await
        .expect("again"),
        Applied::AlreadyProcessed
    );

    // And three events are published a second time, past JetStream's
    // duplicate window (a new message id), as after a long outage.
    for event in &reported[5..8] {
        let publish = PublishMessage::build()
            .payload(event.encode_to_vec().into())
            .message_id(format!("{}-again", event.event_id));
        js.send_publish(
            subjects::event_subject(&event.source, &event.event_type, &event.correlation_id),
            publish,
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }

    let consumer = spawn_consumer(
        js.clone(),
        routing.clone(),
        ConsumerConfig::new("routing-intake", "intake")
            .filtered(vec![subjects::event_type_filter("intake", REPORTED)]),
        RouteEverything,
        lineguard_bus::ParkingLot::new(),
    );
    wait_until("20 routes", Duration::from_secs(30), || {
        routing.head() >= 20
    })
    .await;
    // Let every delivery, duplicates included, be acknowledged.
    let stream = js
        .get_stream(subjects::stream_name("intake"))
        .await
        .expect("stream");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut c: jetstream::consumer::PullConsumer = stream
            .get_consumer("routing-intake")
            .await
            .expect("consumer");
        let info = c.info().await.expect("info");
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            assert_eq!(
                info.delivered.stream_sequence, 23,
                "all 23 messages were delivered"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumer never caught up: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.stop().await;
    assert_eq!(
        routing.head(),
        20,
        "23 deliveries, 20 distinct events, 20 routes"
    );
    let routes = routing.read_all(0, 100).expect("read");
    let causes: HashSet<_> = routes.iter().map(|e| e.causation_id.clone()).collect();
    assert_eq!(causes.len(), 20);
    relay.stop().await;
}

/// nats-server keeps an index entry in memory for every distinct subject a
/// stream holds and every message id of its duplicate window: a stream of
/// a thousand tickets' events holds at most one subject per case bucket
/// and type, whatever the number of tickets, and remembers ids for two
/// minutes, not fifteen.
#[tokio::test]
async fn a_stream_holds_a_bounded_set_of_subjects_whatever_the_number_of_cases() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let js = connect(&nats).await;
    let log = open_log(dir.path(), "intake");
    let relay = OutboxRelay::spawn(log.clone(), js.clone(), RelayConfig::default());
    let tickets = 1_000;
    report(&log, tickets, 0).await;
    assert!(
        relay.flush(Duration::from_secs(30)).await,
        "every event published"
    );
    let mut stream = js
        .get_stream(subjects::stream_name("intake"))
        .await
        .expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.state.messages, tickets as u64);
    assert!(
        info.state.subjects_count <= subjects::CASE_BUCKETS,
        "one event type, so at most one subject a bucket: {} subjects for {tickets} tickets",
        info.state.subjects_count
    );
    assert!(
        info.state.subjects_count > subjects::CASE_BUCKETS / 2,
        "a thousand tickets spread over the buckets: {}",
        info.state.subjects_count
    );
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    // A consumer of the type still receives every ticket's event.
    let published = stream_contents(&js, "intake").await;
    let correlations: HashSet<_> = published.iter().map(|e| e.correlation_id.clone()).collect();
    assert_eq!(correlations.len(), tickets);
    relay.stop().await;
}

/// The relay publishes a long run of its outbox (a backlog) as one atomic
/// batch (one store sync for the run), a short one a message at a time. A
/// run holding a message the stream already has (a relay published it and
/// crashed before clearing its outbox) is refused whole by JetStream: the
/// relay publishes that run one message at a time, the duplicate is
/// dropped, and the next long run goes as a batch again.
#[tokio::test]
async fn a_run_holding_a_message_already_published_goes_one_by_one() {
    use lineguard_bus::relay::DEFAULT_BATCH_FROM_EVENTS as LONG;
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let js = connect(&nats).await;
    let log = open_log(dir.path(), "intake");
    report(&log, LONG + 10, 0).await;
    // What the crashed relay got as far as: the 8th event published, its
    // outbox entry not cleared.
    let ensured = lineguard_bus::ensure_stream(&js, "intake", &Default::default())
        .await
        .expect("stream");
    assert!(
        ensured.atomic_batches,
        "nats-server 2.12+ keeps allow_atomic"
    );
    let eighth = log.read_all_stored(8, 1).expect("read").remove(0);
    let subject = subjects::event_subject(
        eighth.source(),
        eighth.event_type(),
        eighth.correlation_id(),
    );
    js.send_publish(
        subject,
        PublishMessage::build()
            .payload(eighth.envelope_bytes().clone())
            .message_id(eighth.event_id()),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let refused_before = lineguard_bus::metrics::BUS_METRICS
        .relay_runs_one_by_one
        .get();
    // Each run is committed while no relay runs, so that it is one run.
    let relay_once = || async {
        let relay = OutboxRelay::spawn(log.clone(), js.clone(), RelayConfig::default());
        assert!(relay.flush(Duration::from_secs(30)).await, "outbox drained");
        relay.stop().await;
    };
    relay_once().await;
    assert_eq!(
        lineguard_bus::metrics::BUS_METRICS
            .relay_runs_one_by_one
            .get(),
        refused_before + 1,
        "the run holding the 8th was refused as a batch once"
    );
    // A later long run goes as one batch, a short one a message at a time.
    report(&log, LONG, LONG + 10).await;
    relay_once().await;
    report(&log, 5, 2 * LONG + 10).await;
    relay_once().await;

    let published = stream_messages(&js, "intake").await;
    let logged = log.read_all(0, 1000).expect("read");
    let total = 2 * LONG + 15;
    assert_eq!(logged.len(), total);
    assert_eq!(
        published.len(),
        total,
        "every event once: none lost, none twice"
    );
    let order = |events: &mut dyn Iterator<Item = &EventEnvelope>| {
        events.map(|e| e.event_id.clone()).collect::<Vec<_>>()
    };
    // The 8th first (the crashed relay's), then the rest in log order.
    let mut expected = vec![logged[7].event_id.clone()];
    expected.extend(
        order(&mut logged.iter())
            .into_iter()
            .filter(|id| *id != logged[7].event_id),
    );
    assert_eq!(order(&mut published.iter().map(|(e, _)| e)), expected);
    // The refused run went one message at a time, the later long one as a
    // batch, the short one a message at a time.
    let first_run = LONG + 10;
    assert!(
        published[..first_run]
            .iter()
            .all(|(_, batch)| batch.is_none()),
        "the refused run published one by one"
    );
    let long: HashSet<_> = published[first_run..first_run + LONG]
        .iter()
        .map(|(_, batch)| batch.clone())
        .collect();
    assert_eq!(long.len(), 1, "the later long run is one batch: {long:?}");
    assert!(long.iter().all(Option::is_some));
    assert!(
        published[first_run + LONG..]
            .iter()
            .all(|(_, batch)| batch.is_none()),
        "a short run goes one by one"
    );
}
