//! A bus that forgets: a consumer stopped while its source writes past the
//! stream's retention catches up from the source's own log, against a real
//! nats-server, and applies everything exactly once.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lineguard_bus::{
    ConsumerConfig, Handled, Handler, HandlerError, OutboxRelay, ParkingLot, ParkingProjector,
    RelayConfig, SourceLogHandle, StreamSettings, spawn_consumer, subjects, with_parking_events,
};
use lineguard_eventlog::{
    EventEnvelope, EventLog, EventTypes, ExpectedVersion, LogConfig, NewEvent, NoProjections,
    Transaction,
};
use lineguard_harness::NatsServer;

const REPORTED: &str = "lineguard.test.v1.Reported";
const IGNORED: &str = "lineguard.test.v1.Ignored";
const ROUTED: &str = "lineguard.test.v1.Routed";

fn event(event_type: &str, correlation: &str, publish: bool) -> NewEvent {
    NewEvent {
        publish,
        ..common::event(event_type, correlation)
    }
}

struct RouteEverything;

impl Handler for RouteEverything {
    async fn handle(&self, reported: &EventEnvelope) -> Result<Handled, HandlerError> {
        let mut routed = event(ROUTED, &reported.correlation_id, false);
        routed.causation_id = reported.event_id.clone();
        Ok(Handled::Commit(Transaction::append(
            format!("route-{}", reported.correlation_id),
            ExpectedVersion::NoStream,
            vec![routed],
        )))
    }
}

/// Waits until routing holds `n` routes, failing after `limit` with `what`.
async fn until_routed(routing: &EventLog, n: usize, limit: Duration, what: &str) {
    let deadline = tokio::time::Instant::now() + limit;
    while routes(routing).len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} routed: {what}",
            routes(routing).len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Routing holds `n` routes, each caused by a different report.
fn assert_each_routed_once(routing: &EventLog, n: usize) {
    let routed = routes(routing);
    let causes: HashSet<_> = routed.iter().map(|e| e.causation_id.clone()).collect();
    assert_eq!((routed.len(), causes.len()), (n, n), "each once");
}

fn routes(log: &EventLog) -> Vec<EventEnvelope> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = log.read_all(from, 1_000).expect("read");
        let Some(last) = page.last() else {
            return out;
        };
        from = last.global_position + 1;
        out.extend(page.into_iter().filter(|e| e.event_type == ROUTED));
    }
}

async fn report(log: &EventLog, range: std::ops::Range<usize>) {
    for i in range {
        let ticket = format!("t{i}");
        // Each report comes with an event of a type this consumer does not
        // take: a catch-up must skip those as the bus's filter does.
        log.commit(
            Transaction::append(
                &ticket,
                ExpectedVersion::NoStream,
                vec![event(REPORTED, &ticket, true)],
            )
            .and_append(
                format!("other-{i}"),
                ExpectedVersion::NoStream,
                vec![event(IGNORED, &ticket, true)],
            ),
        )
        .await
        .expect("report");
    }
}

/// Intake's log relayed to a stream that keeps only its last 6 messages,
/// routing's log, and routing's consumer of intake's reports (able to read
/// intake's log).
struct Fixture {
    _nats: NatsServer,
    _dir: tempfile::TempDir,
    js: async_nats::jetstream::Context,
    intake: EventLog,
    routing: EventLog,
    relay: OutboxRelay,
    config: ConsumerConfig,
}

impl Fixture {
    /// The fixture with a stream that keeps only 6 messages.
    async fn start() -> Fixture {
        Fixture::with_stream(StreamSettings {
            max_messages: 6,
            ..StreamSettings::default()
        })
        .await
    }

    async fn with_stream(stream: StreamSettings) -> Fixture {
        let nats = NatsServer::start().expect("nats");
        let dir = tempfile::tempdir().expect("tempdir");
        let js = nats.jetstream().await.expect("jetstream");
        let intake = EventLog::open(
            LogConfig::new(dir.path().join("intake"), "intake").with_event_types(
                EventTypes::new()
                    .with_name(REPORTED, 1)
                    .with_name(IGNORED, 1),
            ),
        )
        .expect("intake log");
        let routing = EventLog::open(
            LogConfig::new(dir.path().join("routing"), "routing")
                .with_event_types(with_parking_events(EventTypes::new().with_name(ROUTED, 1)))
                .with_projector(ParkingProjector::wrap(Arc::new(NoProjections))),
        )
        .expect("routing log");
        let relay = OutboxRelay::spawn(
            intake.clone(),
            js.clone(),
            RelayConfig {
                stream,
                ..RelayConfig::default()
            },
        );
        let mut config = ConsumerConfig::new("routing-from-intake", "intake")
            .filtered(vec![subjects::event_type_filter("intake", REPORTED)]);
        config.source_log = Some(SourceLogHandle(Arc::new(intake.clone())));
        Fixture {
            _nats: nats,
            _dir: dir,
            js,
            intake,
            routing,
            relay,
            config,
        }
    }
}

#[tokio::test]
async fn a_consumer_away_longer_than_the_streams_retention_catches_up_from_the_source_log() {
    let Fixture {
        _nats,
        _dir,
        js,
        intake,
        routing,
        relay,
        config,
    } = Fixture::start().await;
    let lot = ParkingLot::new();

    report(&intake, 0..3).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    let consumer = spawn_consumer(
        js.clone(),
        routing.clone(),
        config.clone(),
        RouteEverything,
        lot.clone(),
    );
    until_routed(&routing, 3, Duration::from_secs(20), "first routes").await;
    consumer.stop().await;

    // Away while intake writes 40 more reports (80 messages): the stream
    // keeps the last 6, so 37 reports are gone from the bus.
    report(&intake, 3..43).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    let mut stream = js
        .get_stream(subjects::stream_name("intake"))
        .await
        .expect("stream");
    let state = stream.info().await.expect("info").state.clone();
    assert_eq!(state.messages, 6);
    assert!(state.first_sequence > 7, "the bus forgot: {state:?}");

    let consumer = spawn_consumer(js.clone(), routing.clone(), config, RouteEverything, lot);
    until_routed(
        &routing,
        43,
        Duration::from_secs(30),
        "caught up from the source log",
    )
    .await;
    // Let the bus's own copies of the last reports come and be recognised.
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumer.stop().await;
    relay.stop().await;

    let routed = routes(&routing);
    assert_eq!(routed.len(), 43, "everything applied, nothing twice");
    let causes: HashSet<_> = routed.iter().map(|e| e.causation_id.clone()).collect();
    assert_eq!(causes.len(), 43);
    let reported: HashSet<_> = intake
        .read_all(1, 1_000)
        .expect("read")
        .into_iter()
        .filter(|e| e.event_type == REPORTED)
        .map(|e| e.event_id)
        .collect();
    assert_eq!(causes, reported, "exactly the reports, none of the others");
    assert_eq!(
        routing
            .consumer_position("routing-from-intake")
            .expect("position"),
        intake.head() - 1,
        "the last report's position (the last event is an ignored one)"
    );
    assert_eq!(
        routing
            .reconciled_through("routing-from-intake")
            .expect("mark"),
        intake.head(),
        "a gap is reconciled through the source's head at once"
    );
}

/// A consumer that hands a message back for long enough (4 s) that the
/// six-message stream forgets it meanwhile, and never gives up on it.
fn handing_back(mut config: ConsumerConfig) -> ConsumerConfig {
    config.retry_delay = Duration::from_secs(4);
    config.dead_letter_after = 1_000;
    config.parked_sweep = Duration::from_millis(300);
    config
}

/// Routes every report but `t0`'s until healed (`Retry`: handed back).
struct FailsOnceHealed(Arc<std::sync::atomic::AtomicBool>);

impl Handler for FailsOnceHealed {
    async fn handle(&self, reported: &EventEnvelope) -> Result<Handled, HandlerError> {
        if reported.correlation_id == "t0" && !self.0.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(HandlerError::Retry("not yet".into()));
        }
        RouteEverything.handle(reported).await
    }
}

#[tokio::test]
async fn a_message_handed_back_that_expires_before_its_redelivery_is_read_from_the_source_log() {
    let Fixture {
        _nats,
        _dir,
        js,
        intake,
        routing,
        relay,
        config,
    } = Fixture::start().await;
    let config = handing_back(config);
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer = spawn_consumer(
        js.clone(),
        routing.clone(),
        config,
        FailsOnceHealed(healed.clone()),
        ParkingLot::new(),
    );
    report(&intake, 0..1).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Twenty more reports (40 messages) while t0 waits: the stream keeps 6.
    report(&intake, 1..21).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    until_routed(&routing, 20, Duration::from_secs(20), "the later reports").await;
    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    until_routed(
        &routing,
        21,
        Duration::from_secs(30),
        "t0, handed back and gone from the bus, never applied",
    )
    .await;
    consumer.stop().await;
    relay.stop().await;
    assert_each_routed_once(&routing, 21);
}

#[tokio::test]
async fn a_message_handed_back_before_a_restart_and_dropped_while_away_is_read_from_the_source_log()
{
    let Fixture {
        _nats,
        _dir,
        js,
        intake,
        routing,
        relay,
        config,
    } = Fixture::start().await;
    let config = handing_back(config);
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer = spawn_consumer(
        js.clone(),
        routing.clone(),
        config.clone(),
        FailsOnceHealed(healed.clone()),
        ParkingLot::new(),
    );
    // t0 is handed back; t1 and t2 are applied after it, so the consumer's
    // highest applied position is past t0 when the process goes.
    report(&intake, 0..3).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    until_routed(&routing, 2, Duration::from_secs(20), "t1 and t2").await;
    consumer.stop().await;
    assert!(
        routing
            .consumer_position("routing-from-intake")
            .expect("position")
            > 1,
        "applied past t0"
    );

    // Away (a new process knows nothing of what the old one handed back)
    // while twenty more reports push t0 out of the six-message stream.
    report(&intake, 3..23).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    let consumer = spawn_consumer(
        js.clone(),
        routing.clone(),
        config,
        FailsOnceHealed(healed),
        ParkingLot::new(),
    );
    until_routed(
        &routing,
        23,
        Duration::from_secs(30),
        "t0 was lost with the process that handed it back",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    consumer.stop().await;
    relay.stop().await;
    assert_each_routed_once(&routing, 23);
    assert_eq!(
        routing
            .reconciled_through("routing-from-intake")
            .expect("mark"),
        intake.head(),
        "checked through the source's head"
    );
}

#[tokio::test]
async fn a_message_the_bus_never_delivers_without_a_visible_gap_is_applied_from_the_source_log() {
    let Fixture {
        _nats,
        _dir,
        js,
        intake,
        routing,
        relay,
        mut config,
    } = Fixture::start().await;
    config.parked_sweep = Duration::from_millis(300);
    report(&intake, 0..2).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    // t1's report is taken out of the middle of the stream before anyone
    // reads it: the stream's first message and the consumer's ack floor show
    // no gap, and JetStream will never deliver it.
    let mut stream = js
        .get_stream(subjects::stream_name("intake"))
        .await
        .expect("stream");
    let t1 = stream
        .get_last_raw_message_by_subject(&subjects::event_subject("intake", REPORTED, "t1"))
        .await
        .expect("t1 in the stream");
    assert!(
        stream.delete_message(t1.sequence).await.expect("delete"),
        "t1 deleted"
    );
    report(&intake, 2..3).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    assert_eq!(stream.info().await.expect("info").state.first_sequence, 1);

    let consumer = spawn_consumer(
        js.clone(),
        routing.clone(),
        config,
        RouteEverything,
        ParkingLot::new(),
    );
    until_routed(
        &routing,
        3,
        Duration::from_secs(20),
        "the report the bus lost was never applied",
    )
    .await;
    consumer.stop().await;
    relay.stop().await;
    assert_each_routed_once(&routing, 3);
}

/// A source whose log cannot be reached (its process is down).
struct Unreachable;

impl lineguard_bus::SourceLog for Unreachable {
    fn read_from(
        &self,
        _from: u64,
        _max: usize,
        _filter: &lineguard_eventlog::AllFilter,
    ) -> lineguard_bus::catchup::SourcePage<'_> {
        Box::pin(async { Err("intake's log: tcp connect error".to_string()) })
    }

    fn state(&self) -> lineguard_bus::catchup::SourceStateFuture<'_> {
        Box::pin(async { Err("intake's log: tcp connect error".to_string()) })
    }
}

#[tokio::test]
async fn a_source_log_that_cannot_be_reached_does_not_stop_what_the_bus_delivers() {
    let Fixture {
        _nats,
        _dir,
        js,
        intake,
        routing,
        relay,
        mut config,
    } = Fixture::start().await;
    config.parked_sweep = Duration::from_millis(200);
    config.source_log = Some(SourceLogHandle(Arc::new(Unreachable)));
    let consumer = spawn_consumer(
        js.clone(),
        routing.clone(),
        config,
        RouteEverything,
        ParkingLot::new(),
    );
    report(&intake, 0..3).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    until_routed(
        &routing,
        3,
        Duration::from_secs(20),
        "stopped while the source's log is unreachable",
    )
    .await;
    consumer.stop().await;
    relay.stop().await;
}

/// Routes every report, taking a second over `t1`'s: long enough for the
/// six-message stream to drop the reports behind it unread.
struct SlowOverT1;

impl Handler for SlowOverT1 {
    async fn handle(&self, reported: &EventEnvelope) -> Result<Handled, HandlerError> {
        if reported.correlation_id == "t1" {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        RouteEverything.handle(reported).await
    }
}

/// Routing holds one route per report `t0`..`t{n-1}`, in intake's order.
fn assert_routed_in_source_order(routing: &EventLog, n: usize) {
    assert_each_routed_once(routing, n);
    let order: Vec<String> = routes(routing)
        .into_iter()
        .map(|e| e.correlation_id)
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    assert_eq!(order, expected, "applied in the source's order");
}

/// Starts routing's consumer ([`SlowOverT1`]) with one message in hand at a
/// time, so that the rest wait in the stream (and are dropped there), and
/// no sweep within the test, so that only the catching up before the next
/// message can bring the dropped ones; returns once `t0` is routed.
async fn one_in_hand(
    js: &async_nats::jetstream::Context,
    intake: &EventLog,
    routing: &EventLog,
    relay: &OutboxRelay,
    mut config: ConsumerConfig,
) -> lineguard_bus::ConsumerHandle {
    config.max_ack_pending = 1;
    config.parked_sweep = Duration::from_secs(600);
    report(intake, 0..1).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    let consumer = spawn_consumer(
        js.clone(),
        routing.clone(),
        config,
        SlowOverT1,
        ParkingLot::new(),
    );
    until_routed(routing, 1, Duration::from_secs(20), "t0").await;
    consumer
}

#[tokio::test]
async fn a_consumer_the_stream_overtakes_while_it_works_applies_its_source_in_order() {
    let Fixture {
        _nats,
        _dir,
        js,
        intake,
        routing,
        relay,
        config,
    } = Fixture::start().await;
    let consumer = one_in_hand(&js, &intake, &routing, &relay, config).await;
    // Forty reports (80 messages) while t1 takes its second: the stream
    // keeps 6, so t2 to about t37 leave the bus unread.
    report(&intake, 1..41).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    until_routed(
        &routing,
        41,
        Duration::from_secs(30),
        "what the stream dropped behind t1 was not caught up before the next message",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumer.stop().await;
    relay.stop().await;
    assert_routed_in_source_order(&routing, 41);
}

/// Intake's log, readable only while `up` ([`Unreachable`] meanwhile): its
/// process restarting.
struct Restarting {
    log: EventLog,
    up: Arc<std::sync::atomic::AtomicBool>,
}

impl lineguard_bus::SourceLog for Restarting {
    fn read_from(
        &self,
        from: u64,
        max: usize,
        filter: &lineguard_eventlog::AllFilter,
    ) -> lineguard_bus::catchup::SourcePage<'_> {
        if self.up.load(std::sync::atomic::Ordering::SeqCst) {
            lineguard_bus::SourceLog::read_from(&self.log, from, max, filter)
        } else {
            Unreachable.read_from(from, max, filter)
        }
    }

    fn state(&self) -> lineguard_bus::catchup::SourceStateFuture<'_> {
        if self.up.load(std::sync::atomic::Ordering::SeqCst) {
            lineguard_bus::SourceLog::state(&self.log)
        } else {
            Unreachable.state()
        }
    }
}

#[tokio::test]
async fn messages_after_a_gap_wait_while_the_source_log_cannot_be_read() {
    let Fixture {
        _nats,
        _dir,
        js,
        intake,
        routing,
        relay,
        mut config,
    } = Fixture::start().await;
    config.retry_delay = Duration::from_millis(200);
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    config.source_log = Some(SourceLogHandle(Arc::new(Restarting {
        log: intake.clone(),
        up: up.clone(),
    })));
    let consumer = one_in_hand(&js, &intake, &routing, &relay, config).await;
    // Intake's process goes down while the stream drops the reports behind
    // t1: the newer ones the bus still holds must not be applied before them.
    up.store(false, std::sync::atomic::Ordering::SeqCst);
    report(&intake, 1..41).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        routes(&routing).len(),
        2,
        "only t0 and t1 (delivered before the drop) may be applied while intake's log is away"
    );
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    until_routed(
        &routing,
        41,
        Duration::from_secs(30),
        "intake's log is back",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumer.stop().await;
    relay.stop().await;
    assert_routed_in_source_order(&routing, 41);
}

/// Routes each report after a while: a consumer that falls behind its bus.
struct SlowRoute;

impl Handler for SlowRoute {
    async fn handle(&self, reported: &EventEnvelope) -> Result<Handled, HandlerError> {
        tokio::time::sleep(Duration::from_millis(15)).await;
        RouteEverything.handle(reported).await
    }
}

/// Intake's log, noting what its pages hand a reconciling consumer.
struct Counting {
    log: EventLog,
    /// Events handed out with their payloads.
    whole_events: std::sync::atomic::AtomicUsize,
    /// Pages read without payloads.
    slim_pages: std::sync::atomic::AtomicUsize,
    filters: std::sync::Mutex<Vec<lineguard_eventlog::AllFilter>>,
    /// How long each page takes to serve: a busy source, and a consumer
    /// whose reconciling takes longer than a sweep.
    page_delay: Duration,
}

impl lineguard_bus::SourceLog for Counting {
    fn read_from(
        &self,
        from: u64,
        max: usize,
        filter: &lineguard_eventlog::AllFilter,
    ) -> lineguard_bus::catchup::SourcePage<'_> {
        let filter = filter.clone();
        Box::pin(async move {
            tokio::time::sleep(self.page_delay).await;
            let page = lineguard_bus::SourceLog::read_from(&self.log, from, max, &filter).await?;
            let counter = if filter.without_payloads {
                &self.slim_pages
            } else {
                &self.whole_events
            };
            let n = if filter.without_payloads {
                1
            } else {
                page.events.len()
            };
            counter.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            self.filters.lock().expect("filters").push(filter);
            Ok(page)
        })
    }

    fn state(&self) -> lineguard_bus::catchup::SourceStateFuture<'_> {
        lineguard_bus::SourceLog::state(&self.log)
    }
}

#[tokio::test]
async fn a_consumer_behind_its_bus_reads_from_the_source_only_enough_to_see_nothing_is_missing() {
    behind_its_bus(Duration::ZERO).await;
}

/// Each reconciling takes longer than a sweep (the source serves its pages
/// slowly), so the consumer spends more than a sweep at a time not
/// fetching: the bus is still delivering, and must not be taken for
/// stalled (which read the source's log to its head and applied a second
/// time what the bus was about to deliver).
#[tokio::test]
async fn a_consumer_busy_longer_than_a_sweep_still_waits_for_its_bus() {
    behind_its_bus(Duration::from_millis(300)).await;
}

/// 150 reports wait in the stream for a consumer that takes 15 ms each
/// and reconciles every 200 ms, from a source whose pages take
/// `page_delay` to serve: only slim pages are ever read from the source.
async fn behind_its_bus(page_delay: Duration) {
    let Fixture {
        _nats,
        _dir,
        js,
        intake,
        routing,
        relay,
        mut config,
    } = Fixture::with_stream(StreamSettings::default()).await;
    // 150 reports wait in the stream; the consumer takes 15 ms each (over
    // 2 s), reconciling every 200 ms meanwhile and after.
    report(&intake, 0..150).await;
    assert!(relay.flush(Duration::from_secs(20)).await);
    config.parked_sweep = Duration::from_millis(200);
    let source = Arc::new(Counting {
        log: intake.clone(),
        whole_events: Default::default(),
        slim_pages: Default::default(),
        filters: Default::default(),
        page_delay,
    });
    config.source_log = Some(SourceLogHandle(source.clone()));
    let name = config.name.clone();
    let consumer = spawn_consumer(
        js.clone(),
        routing.clone(),
        config,
        SlowRoute,
        ParkingLot::new(),
    );
    until_routed(
        &routing,
        150,
        Duration::from_secs(30),
        "the slow consumer did not get through the stream",
    )
    .await;
    // Reconciled to the source's head once the bus has nothing more.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while routing.reconciled_through(&name).expect("mark") < intake.head() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reconciled through the source's head"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.stop().await;
    relay.stop().await;
    assert_each_routed_once(&routing, 150);
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(
        source.whole_events.load(SeqCst),
        0,
        "nothing was missing, yet events were read whole from the source's log"
    );
    assert!(
        source.slim_pages.load(SeqCst) > 0,
        "the reconciling never read the source"
    );
    let short = REPORTED.rsplit('.').next().expect("short type");
    for filter in source.filters.lock().expect("filters").iter() {
        assert_eq!(
            filter.type_names,
            [short],
            "only the consumer's type is asked for"
        );
    }
}
