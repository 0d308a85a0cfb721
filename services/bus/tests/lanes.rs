//! Delivered messages applied in lanes, against a real nats-server: a
//! handler whose writes concern one case each has its cases applied side by
//! side (their commits share writes of the log), each case's events in the
//! order they came; a handler without lanes applies one event at a time.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{event, wait_until};
use lineguard_bus::{
    ConsumerConfig, Handled, Handler, HandlerError, OutboxRelay, ParkingLot, RelayConfig,
    spawn_consumer, subjects,
};
use lineguard_eventlog::{
    EventEnvelope, EventLog, EventTypes, ExpectedVersion, LogConfig, NewEvent, Transaction,
};
use lineguard_harness::NatsServer;

const STEPPED: &str = "lineguard.test.v1.Stepped";
const NOTED: &str = "lineguard.test.v1.Noted";

fn open_log(dir: &std::path::Path, service: &str) -> EventLog {
    EventLog::open(
        LogConfig::new(dir.join(service), service)
            .with_event_types(EventTypes::new().with_name(STEPPED, 1).with_name(NOTED, 1)),
    )
    .expect("open log")
}

/// Notes every event it is handed, the order it was handed them in per
/// case, and the most handled at one moment.
#[derive(Clone, Default)]
struct Noter {
    laned: bool,
    handled: Arc<Mutex<HashMap<String, Vec<String>>>>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
}

impl Handler for Noter {
    fn lane(&self, event: &EventEnvelope) -> Option<String> {
        self.laned.then(|| event.correlation_id.clone())
    }

    async fn handle(&self, stepped: &EventEnvelope) -> Result<Handled, HandlerError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        // Long enough for other lanes to come in meanwhile.
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.handled
            .lock()
            .expect("lock")
            .entry(stepped.correlation_id.clone())
            .or_default()
            .push(stepped.event_id.clone());
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut noted = event(NOTED, &stepped.correlation_id);
        noted.publish = false;
        noted.causation_id = stepped.event_id.clone();
        Ok(Handled::Commit(Transaction::append(
            format!("noted-{}", stepped.correlation_id),
            ExpectedVersion::Any,
            vec![noted],
        )))
    }
}

/// Eight cases of twenty steps each, interleaved, published before the
/// consumer starts (so that its pulls come full); the consumer's log, the
/// handler's notes, and each case's event ids in the source's order.
async fn run(laned: bool) -> (Noter, EventLog, HashMap<String, Vec<String>>) {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let js = nats.jetstream().await.expect("jetstream");
    let source = open_log(dir.path(), "intake");
    let sink = open_log(dir.path(), "routing");
    let relay = OutboxRelay::spawn(source.clone(), js.clone(), RelayConfig::default());
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for _ in 0..20 {
        let mut txn = Transaction::default();
        for case in 0..8 {
            let case = format!("case-{case}");
            let e: NewEvent = event(STEPPED, &case);
            expected
                .entry(case.clone())
                .or_default()
                .push(e.event_id.hyphenated().to_string());
            txn = txn.and_append(&case, ExpectedVersion::Any, vec![e]);
        }
        source.commit(txn).await.expect("commit");
    }
    assert!(relay.flush(Duration::from_secs(20)).await);
    let noter = Noter {
        laned,
        ..Noter::default()
    };
    let consumer = spawn_consumer(
        js.clone(),
        sink.clone(),
        ConsumerConfig::new("routing-from-intake", "intake")
            .filtered(vec![subjects::event_type_filter("intake", STEPPED)]),
        noter.clone(),
        ParkingLot::new(),
    );
    wait_until("160 notes", Duration::from_secs(60), || {
        common::count_of_type(&sink, NOTED) >= 160
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    consumer.stop().await;
    relay.stop().await;
    assert_eq!(common::count_of_type(&sink, NOTED), 160, "every event once");
    (noter, sink, expected)
}

#[tokio::test]
async fn cases_are_applied_side_by_side_each_in_its_order() {
    let (noter, _sink, expected) = run(true).await;
    let handled = noter.handled.lock().expect("lock").clone();
    assert_eq!(handled, expected, "each case in the source's order, once");
    let most = noter.most_in_flight.load(Ordering::SeqCst);
    assert!(
        most > 1,
        "cases were applied one at a time ({most} at most at once)"
    );
    assert!(most <= 8, "never more at once than there are cases: {most}");
}

#[tokio::test]
async fn a_handler_without_lanes_applies_one_event_at_a_time() {
    let (noter, _sink, expected) = run(false).await;
    let handled = noter.handled.lock().expect("lock").clone();
    assert_eq!(handled, expected);
    assert_eq!(noter.most_in_flight.load(Ordering::SeqCst), 1);
}
