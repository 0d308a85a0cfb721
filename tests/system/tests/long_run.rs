//! The run that proves it: the four services and NATS as processes, on a
//! generated county, living through days of accelerated clock across the
//! National Day holiday and its weekend, with phones whose clocks are
//! minutes off and that go offline, while one service is killed -9, one is
//! rebuilt and one is away longer than the bus keeps messages. At the end
//! every promise is checked against the logs.
//!
//! CI runs a small county and a few hundred calls. The full size is the
//! same test with sizes from the environment (see the README):
//!
//! ```sh
//! LINEGUARD_LONG_RUN_TICKETS=20000 LINEGUARD_LONG_RUN_DISTRICTS=200 \
//! LINEGUARD_LONG_RUN_MANAGERS=50 LINEGUARD_LONG_RUN_CREWS=20 \
//! LINEGUARD_LONG_RUN_ACCOUNTS=100000 LINEGUARD_LONG_RUN_RATE=40 \
//!   cargo nextest run -p lineguard-system-tests --test long_run --no-capture
//! ```

mod common;

use std::collections::{HashMap, HashSet};

use common::deploy;
use std::time::Duration;

use lineguard_harness::{FourServices, NatsServer, ServiceProcess};
use lineguard_protos::dispatch::v1::OrderAssigned;
use lineguard_protos::eventlog::v1::event_log_client::EventLogClient;
use lineguard_protos::eventlog::v1::{EventEnvelope, ReadAllRequest, RebuildProjectionsRequest};
use lineguard_protos::intake::v1::TicketKind;
use lineguard_protos::routing::v1::{
    Availability, RouteReason, SetAvailabilityRequest, TicketRouted, VerifyLoadsRequest,
};
use lineguard_ticketctl::county::{CountyConfig, generate};
use lineguard_ticketctl::endpoints::{Clients, Endpoints};
use lineguard_ticketctl::simulate::{StormConfig, storm};
use lineguard_ticketctl::verify;
use prost::{Message, Name};

/// Wednesday evening before the National Day holiday (1-7 October), China time.
const CLOCK_START: &str = "2026-09-30T20:00:00+08:00";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every event of a service's log, over its `EventLog` API.
async fn read_all(process: &ServiceProcess) -> Vec<EventEnvelope> {
    let mut log = EventLogClient::new(process.channel().await.expect("channel"));
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = log
            .read_all(ReadAllRequest {
                from_position: from,
                max_count: 1_000,
                ..Default::default()
            })
            .await
            .expect("read all")
            .into_inner();
        out.extend(page.events);
        if page.next_position == 0 || page.next_position > page.head_position {
            return out;
        }
        from = page.next_position;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_run_keeps_every_promise() {
    let tickets: usize = env_or("LINEGUARD_LONG_RUN_TICKETS", 500);
    let rate: f64 = env_or("LINEGUARD_LONG_RUN_RATE", 25.0);
    let speed: u32 = env_or("LINEGUARD_LONG_RUN_SPEED", 120);
    let county = CountyConfig {
        companies: env_or("LINEGUARD_LONG_RUN_COMPANIES", 1),
        stations: env_or("LINEGUARD_LONG_RUN_STATIONS", 4),
        districts: env_or("LINEGUARD_LONG_RUN_DISTRICTS", 24),
        managers: env_or("LINEGUARD_LONG_RUN_MANAGERS", 8),
        crews: env_or("LINEGUARD_LONG_RUN_CREWS", 6),
        accounts: env_or("LINEGUARD_LONG_RUN_ACCOUNTS", 3_000),
        seed: 11,
    };
    // Small enough that the away consumer's sources move past it.
    let stream_max_messages: i64 = env_or("LINEGUARD_LONG_RUN_STREAM_MESSAGES", 150);

    let kept = KeepOnFailure(Some(tempfile::tempdir().expect("tempdir")));
    let dir = kept.0.as_ref().expect("the run's directory");
    let generated = generate(&county, dir.path()).expect("county");
    let directory: toml_edit_free::Directory = toml_edit_free::read(&generated.directory);

    let nats = NatsServer::start().expect("nats");
    let anchor = lineguard_ticketctl::timeline::rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as i128,
    );
    let common: Vec<String> = [
        "--clock-start",
        CLOCK_START,
        "--clock-anchor",
        &anchor,
        "--clock-speed",
        &speed.to_string(),
        "--calendar",
        &deploy("calendar.toml"),
        "--stream-max-messages",
        &stream_max_messages.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let directory_file = generated.directory.display().to_string();
    let (deploy_policy, deploy_rules) = (deploy("policy.toml"), deploy("feedback.toml"));
    let own = |name: &str| -> Vec<String> {
        let own: Vec<&str> = match name {
            "routing" => vec![
                "--policy",
                &deploy_policy,
                "--directory",
                &directory_file,
                "--timer-tick",
                "100ms",
            ],
            "dispatch" => vec!["--timer-tick", "100ms"],
            "feedback" => vec!["--rules", &deploy_rules, "--timer-tick", "100ms"],
            _ => vec![],
        };
        own.into_iter().map(str::to_string).collect()
    };
    let FourServices {
        intake,
        routing,
        mut dispatch,
        mut feedback,
    } = FourServices::start(dir.path(), &nats.url(), &common, own).expect("start services");
    for p in [&routing, &intake, &dispatch, &feedback] {
        p.wait_healthy(Duration::from_secs(60))
            .await
            .expect("healthy");
    }
    let endpoints = Endpoints {
        intake: intake.endpoint(),
        routing: routing.endpoint(),
        dispatch: dispatch.endpoint(),
        feedback: feedback.endpoint(),
        credentials: Some(lineguard_harness::test_credentials().path.clone()),
        principal: "admin:dev".into(),
    };
    let clients = Clients::new(&endpoints).expect("clients");

    // One manager is on leave for the whole run: their districts' tickets
    // go to the station desk in the first hop, with the reason.
    let on_leave = directory.managers[0].clone();
    clients
        .routing()
        .set_availability(SetAvailabilityRequest {
            assignee_id: on_leave.clone(),
            availability: Availability::OnLeave as i32,
            ..SetAvailabilityRequest::default()
        })
        .await
        .expect("leave");

    let config = StormConfig {
        tickets,
        rate,
        seed: 12,
        accounts: generated.accounts.display().to_string(),
        directory: generated.directory.display().to_string(),
        slow_share: 0.03,
        // Past the 5-minute acceptance window of the clock: escalations.
        slow_ack: Duration::from_secs(7 * 60) / speed,
        late_share: 0.1,
        return_share: 0.03,
        dissatisfied_share: 0.08,
        settle: Duration::from_secs(env_or("LINEGUARD_LONG_RUN_SETTLE_SECONDS", 300)),
        clock_start: Some(CLOCK_START.into()),
        clock_anchor: Some(anchor.clone()),
        clock_speed: speed,
        phone_skew_minutes: 10,
        offline_share: 0.3,
        max_in_flight: 2_000,
        queue_calls: false,
        waves_of: 0,
        until_done: true,
    };
    let call_seconds = tickets as f64 / rate;
    let driver = tokio::spawn({
        let clients = clients.clone();
        let config = config.clone();
        async move { storm(&clients, &config, &indicatif::ProgressBar::hidden()).await }
    });

    // Mid-run: dispatch killed -9 and restarted; routing's projections
    // rebuilt while it serves; feedback away for longer than the streams
    // keep messages, then back.
    tokio::time::sleep(Duration::from_secs_f64(call_seconds * 0.2)).await;
    dispatch.kill9().expect("kill dispatch");
    tokio::time::sleep(Duration::from_secs(2)).await;
    dispatch.restart().expect("restart dispatch");
    // Answering: its API is back (it is SERVING only once its consumers
    // have caught up with the backlog, which under this load takes a while).
    dispatch
        .wait_answering(Duration::from_secs(60))
        .await
        .expect("dispatch back");
    tokio::time::sleep(Duration::from_secs_f64(call_seconds * 0.1)).await;
    let rebuilt = EventLogClient::new(routing.channel().await.expect("channel"))
        .rebuild_projections(RebuildProjectionsRequest {})
        .await
        .expect("rebuild routing")
        .into_inner();
    assert_eq!(
        rebuilt.digest_before, rebuilt.digest_after,
        "a rebuild from the log gives the same projections"
    );
    // A graceful stop: in-flight calls get the shutdown timeout (10 s), then
    // the outbox is flushed (up to 10 s more).
    feedback
        .terminate(Duration::from_secs(60))
        .expect("stop feedback");
    tokio::time::sleep(Duration::from_secs_f64((call_seconds * 0.3).max(8.0))).await;
    feedback.restart().expect("feedback back");
    feedback
        .wait_answering(Duration::from_secs(60))
        .await
        .expect("feedback answering");

    let report = driver.await.expect("driver").expect("storm");
    eprintln!("{}", serde_json::to_string(&report).expect("json"));
    // Caught up: no log moves for longer than a consumer's sweep, so no
    // sweep is still reconciling with a source's log (a consumer far
    // behind, with the bus forgetting, catches up a sweep at a time).
    common::quiet(
        &[&intake, &routing, &dispatch, &feedback],
        Duration::from_secs(25),
        config.settle.max(Duration::from_secs(120)),
    )
    .await;

    // Every service has caught up with its sources: SERVING again.
    for p in [&intake, &routing, &dispatch, &feedback] {
        p.wait_healthy(Duration::from_secs(120))
            .await
            .expect("every service ready at the end");
    }
    // Feedback was away while the bus forgot: it caught up from the logs.
    assert!(
        feedback
            .log()
            .contains("caught up from the source's log after a gap in the bus"),
        "feedback's consumers found a gap and read the sources' logs"
    );
    assert_eq!(report.calls, tickets, "{:?}", report.errors);
    assert_eq!(
        report.orders_received_twice, 0,
        "no phone got an order twice"
    );
    assert!(report.offline_batches > 0, "offline phones sent batches");
    assert!(report.completed > 0 && report.desk_answered > 0);

    // Every load is 0, and equals routing's recount from its log.
    let loads = clients
        .routing()
        .verify_loads(VerifyLoadsRequest {})
        .await
        .expect("verify loads")
        .into_inner();
    assert!(loads.mismatches.is_empty(), "{:?}", loads.mismatches);
    if loads.open_tickets > 0 {
        eprintln!("still open: {:?}", open_cases(&read_all(&routing).await));
    }
    assert_eq!(loads.open_tickets, 0, "every ticket worked to its end");

    // Nothing parked or dead anywhere.
    common::assert_nothing_parked_or_dead(&[&intake, &routing, &dispatch, &feedback]).await;

    // Every field hop reached its crew exactly once.
    let routing_events = read_all(&routing).await;
    let dispatch_events = read_all(&dispatch).await;
    let mut assigned: HashMap<(String, u32), usize> = HashMap::new();
    for e in dispatch_events
        .iter()
        .filter(|e| e.event_type == OrderAssigned::full_name())
    {
        let order = OrderAssigned::decode(e.payload.as_ref()).expect("order");
        *assigned.entry((order.order_id, order.hop)).or_default() += 1;
    }
    assert!(
        assigned.values().all(|&n| n == 1),
        "an order assigned twice"
    );
    let routes: Vec<TicketRouted> = routing_events
        .iter()
        .filter(|e| e.event_type == TicketRouted::full_name())
        .map(|e| TicketRouted::decode(e.payload.as_ref()).expect("route"))
        .collect();
    let field_cases: HashSet<&str> = routes
        .iter()
        .filter(|r| r.field_work && !r.crew_id.is_empty())
        .map(|r| r.case_id.as_str())
        .collect();
    let ordered: HashSet<&str> = assigned.keys().map(|(o, _)| o.as_str()).collect();
    assert!(
        field_cases.iter().all(|c| ordered.contains(c)),
        "every field case reached a crew"
    );

    // Every first hop went to the district's own manager, but where the
    // manager was on leave: then to the station desk, with the reason.
    let mut passed_over = 0;
    for r in routes
        .iter()
        .filter(|r| r.hop == 1 && !r.district_id.is_empty())
    {
        let owner = &directory.manager_of[&r.district_id];
        if *owner == on_leave {
            assert_eq!(r.reason(), RouteReason::OwnerUnavailable, "{r:?}");
            assert!(r.reason_detail.contains("leave"), "{}", r.reason_detail);
            passed_over += 1;
        } else {
            assert_eq!(
                (r.reason(), r.assignee_id.as_str()),
                (RouteReason::DistrictOwner, owner.as_str()),
                "first hop of {}",
                r.case_id
            );
        }
    }
    assert!(passed_over > 0, "the manager on leave had tickets");

    // The holiday in the calendar: a complaint's 4 working days from the
    // evening of 30 September skip 1-7 October, count Saturday 10 October
    // (a make-up day) and end on Monday 12 October.
    let before_holiday_end = prost_types::Timestamp {
        seconds: 1_791_388_800, // 2026-10-08T00:00:00+08:00
        nanos: 0,
    };
    let answers: Vec<_> = routes
        .iter()
        .filter(|r| r.hop == 1 && r.kind() == TicketKind::Complaint)
        .filter(|r| {
            r.reported_at
                .is_some_and(|t| t.seconds < before_holiday_end.seconds)
        })
        .flat_map(|r| r.deadlines.iter().filter(|d| d.clock == "answer"))
        .filter_map(|d| d.due_at)
        .collect();
    assert!(!answers.is_empty(), "complaints with an answer limit");
    let monday_12th_cst = |t: &prost_types::Timestamp| {
        let local_day = (t.seconds + 8 * 3_600).div_euclid(86_400);
        local_day == 20_738 // 2026-10-12
    };
    assert!(answers.iter().all(monday_12th_cst), "{answers:?}");

    // Every ticket replays to its live view.
    let checked = verify::verify(&clients, &indicatif::ProgressBar::hidden())
        .await
        .expect("verify");
    assert!(checked.tickets > 0);
    assert!(
        checked.is_clean(),
        "{:?} {:?}",
        checked.mismatches,
        checked.load_mismatches
    );
}

/// The cases routing's log leaves open (routed or accepted): their kind,
/// hop, holder and crew, to say what a run left undone.
/// The run's directory (every service's data and log), kept when the run
/// fails so that what the services logged can be read afterwards.
struct KeepOnFailure(Option<tempfile::TempDir>);

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!(
                "the run's data and service logs are kept in {}",
                dir.keep().display()
            );
        }
    }
}

fn open_cases(events: &[EventEnvelope]) -> Vec<String> {
    use lineguard_protos::routing::v1::{TicketAnswered, TicketRoutingClosed, TicketWorkCompleted};
    let mut cases: HashMap<String, (String, bool)> = HashMap::new();
    for e in events {
        let t = e.event_type.as_str();
        let payload = e.payload.as_ref();
        if t == TicketRouted::full_name() {
            let r = TicketRouted::decode(payload).expect("route");
            let what = format!(
                "{} {:?} hop {} held by {} crew {} field {}",
                r.case_id,
                r.kind(),
                r.hop,
                r.assignee_id,
                r.crew_id,
                r.field_work
            );
            cases.insert(r.case_id, (what, true));
        } else {
            let closed = if t == TicketAnswered::full_name() {
                TicketAnswered::decode(payload).ok().map(|e| e.case_id)
            } else if t == TicketRoutingClosed::full_name() {
                TicketRoutingClosed::decode(payload).ok().map(|e| e.case_id)
            } else if t == TicketWorkCompleted::full_name() {
                TicketWorkCompleted::decode(payload).ok().map(|e| e.case_id)
            } else {
                None
            };
            if let Some(case) = closed
                && let Some(entry) = cases.get_mut(&case)
            {
                entry.1 = false;
            }
        }
    }
    cases
        .into_values()
        .filter(|(_, open)| *open)
        .map(|(what, _)| what)
        .collect()
}

/// Just what this test needs of the generated directory file.
mod toml_edit_free {
    use std::collections::HashMap;
    use std::path::Path;

    pub struct Directory {
        /// Manager ids in file order.
        pub managers: Vec<String>,
        /// District id → its manager.
        pub manager_of: HashMap<String, String>,
    }

    /// Reads `manager_id` and `district_id` lines of the generated file.
    pub fn read(path: &Path) -> Directory {
        let text = std::fs::read_to_string(path).expect("directory");
        let mut managers = Vec::new();
        let mut manager_of = HashMap::new();
        let mut district: Option<String> = None;
        let value = |line: &str| {
            line.split_once('=')
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        for line in text.lines() {
            if line.starts_with("[[managers]]") || line.starts_with("[[crews]]") {
                district = None;
            }
            if line.starts_with("district_id =") {
                district = Some(value(line));
            } else if line.starts_with("manager_id =") {
                match district.take() {
                    Some(d) => {
                        manager_of.insert(d, value(line));
                    }
                    None => managers.push(value(line)),
                }
            }
        }
        Directory {
            managers,
            manager_of,
        }
    }
}
