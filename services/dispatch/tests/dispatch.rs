//! Dispatch in-process over a real RocksDB log and a real gRPC connection:
//! crews resume their sequence exactly, offline batches apply in device-time
//! order and idempotently, escalation moves an order between crews,
//! incidents complete all their tickets, wrong actions get clear errors.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use lineguard_bus::{Applied, Handler, HandlerError, apply_event};
use lineguard_dispatch::api::DispatchService;
use lineguard_dispatch::clocks::fire_due;
use lineguard_dispatch::consumers::{FROM_INTAKE, FROM_ROUTING, IntakeEvents, RoutingEvents};
use lineguard_dispatch::orders::Dispatcher;
use lineguard_dispatch::projection::{DispatchProjector, crew_stream};
use lineguard_eventlog::clock::Clock;
use lineguard_eventlog::{EventEnvelope, EventLog, LogConfig, ReadDirection, decode_payload};
use lineguard_protos::dispatch::v1::{
    AcknowledgeRequest, ActionHeader, ArriveRequest, ClockAlerted, CompleteRequest, CrewAction,
    CrewEvent, CustomerNotificationRequested, DepartRequest, GetWorkOrderRequest, IncidentGrew,
    NotificationMedium, OrderAssigned, OrderStatus, OrderWithdrawn, RestoreRequest,
    SubmitActionsRequest, WatchDispatchesRequest, WorkCompleted, crew_action::Action, crew_event,
    dispatch_client::DispatchClient,
};
use lineguard_protos::intake::v1::{Channel, TicketKind, TicketReported, TicketUrged};
use lineguard_protos::routing::v1::{
    ClockLimit, Crew, CrewDefined, Deadline, TicketRouted, TicketRoutingClosed,
};
use prost::{Message, Name};
use prost_types::Timestamp;
use tonic::Code;
use tonic::transport::Channel as GrpcChannel;

/// Feeds dispatch the events of routing and intake, as the bus would.
struct Feed {
    dispatcher: Dispatcher,
}

struct Fixture {
    _dir: tempfile::TempDir,
    feed: Feed,
    client: DispatchClient<GrpcChannel>,
    watchers: Arc<lineguard_dispatch::watch::Watchers>,
    /// Dispatch's clock: it stands at `at(0)` until a test moves it.
    clock: Clock,
}

impl std::ops::Deref for Fixture {
    type Target = Feed;
    fn deref(&self) -> &Feed {
        &self.feed
    }
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(at(0));
    let dispatcher = Dispatcher::new(open_log(dir.path())).with_clock(clock.clone());
    let service = DispatchService::new(dispatcher.clone());
    let watchers = service.watchers();
    let routes = tonic::service::Routes::new(service.server());
    let channel = lineguard_harness::serve_in_process(routes)
        .await
        .expect("serve");
    let f = Fixture {
        _dir: dir,
        feed: Feed { dispatcher },
        client: DispatchClient::new(channel),
        watchers,
        clock,
    };
    for crew in ["crew-a", "crew-b"] {
        f.hear_routing(&CrewDefined {
            crew: Some(Crew {
                crew_id: crew.into(),
                station_id: "st-1".into(),
                members: vec!["Wang".into()],
                district_ids: vec!["d-1".into()],
            }),
        })
        .await;
    }
    f
}

fn envelope<M: Message + Name>(message: &M, source: &str) -> EventEnvelope {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    EventEnvelope {
        event_id: format!("{source}-evt-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        stream_id: "s".into(),
        stream_version: 1,
        global_position: 1,
        recorded_at: Some(now()),
        correlation_id: "c".into(),
        event_type: M::full_name(),
        schema_version: 1,
        payload: Bytes::from(message.encode_to_vec()),
        source: source.into(),
        ..EventEnvelope::default()
    }
}

fn now() -> Timestamp {
    Timestamp::from(std::time::SystemTime::now())
}

fn at(seconds: i64) -> Timestamp {
    Timestamp {
        seconds: 1_800_000_000 + seconds,
        nanos: 0,
    }
}

impl Feed {
    async fn deliver<M: Message + Name, H: Handler>(
        &self,
        consumer: &str,
        handler: &H,
        m: &M,
        source: &str,
    ) {
        let applied = apply_event(
            self.dispatcher.log(),
            consumer,
            handler,
            &envelope(m, source),
            3,
        )
        .await
        .expect("handled");
        assert_eq!(applied, Applied::Committed);
    }

    async fn hear_routing<M: Message + Name>(&self, m: &M) {
        self.deliver(
            FROM_ROUTING,
            &RoutingEvents(self.dispatcher.clone()),
            m,
            "routing",
        )
        .await;
    }

    async fn hear_intake<M: Message + Name>(&self, m: &M) {
        self.deliver(
            FROM_INTAKE,
            &IntakeEvents(self.dispatcher.clone()),
            m,
            "intake",
        )
        .await;
    }

    /// A fault ticket reported through `channel` (optionally in an incident).
    async fn ticket(&self, id: &str, channel: Channel, incident: &str, lead: bool) {
        self.hear_intake(&TicketReported {
            ticket_id: id.into(),
            channel: channel as i32,
            kind: TicketKind::FaultRepair as i32,
            account_number: format!("acct-{id}"),
            incident_id: incident.into(),
            incident_lead: lead,
            ..TicketReported::default()
        })
        .await;
    }

    /// Routing sends `case` (led by `lead`) to `crew` at `hop`.
    async fn route(&self, case: &str, lead: &str, incident: &str, crew: &str, hop: u32) {
        self.hear_routing(&TicketRouted {
            case_id: case.into(),
            lead_ticket_id: lead.into(),
            incident_id: incident.into(),
            kind: TicketKind::FaultRepair as i32,
            district_id: "d-1".into(),
            station_id: "st-1".into(),
            line: hop,
            hop,
            assignee_id: format!("owner-{hop}"),
            crew_id: crew.into(),
            field_work: true,
            reported_at: Some(at(0)),
            deadlines: vec![Deadline {
                clock: "arrival".into(),
                due_at: Some(at(45 * 60)),
            }],
            warn_at_percent: vec![50, 80],
            limits: vec![ClockLimit {
                clock: "restoration".into(),
                seconds: 3 * 3600,
                working_days: 0,
                starts_at: "arrival".into(),
            }],
            ..TicketRouted::default()
        })
        .await;
    }

    /// Every event on a crew's stream, as (sequence, short type).
    fn crew_events(&self, crew: &str) -> Vec<EventEnvelope> {
        match self.dispatcher.log().read_stream(
            &crew_stream(crew),
            1,
            ReadDirection::Forward,
            1_000,
        ) {
            Ok(slice) => slice.events,
            Err(lineguard_eventlog::Error::StreamNotFound { .. }) => Vec::new(),
            Err(e) => panic!("read: {e}"),
        }
    }
}

impl Fixture {
    async fn order(&mut self, id: &str) -> lineguard_protos::dispatch::v1::WorkOrderView {
        self.client
            .get_work_order(GetWorkOrderRequest {
                order_id: id.into(),
            })
            .await
            .expect("order")
            .into_inner()
    }
}

fn header(crew: &str, order: &str, action: &str, device_seconds: i64) -> Option<ActionHeader> {
    Some(ActionHeader {
        crew_id: crew.into(),
        order_id: order.into(),
        action_id: action.into(),
        device_time: Some(at(device_seconds)),
    })
}

fn short(e: &EventEnvelope) -> &str {
    e.event_type.rsplit('.').next().unwrap_or("")
}

async fn take(stream: &mut tonic::Streaming<CrewEvent>, n: usize) -> Vec<CrewEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("event");
        out.push(next);
    }
    out
}

#[tokio::test]
async fn a_crew_reconnecting_with_its_last_sequence_gets_exactly_what_it_missed() {
    let f = start().await;
    let mut client = f.client.clone();
    for i in 0..10 {
        let id = format!("ticket-s{i}");
        f.ticket(&id, Channel::App, "", false).await;
        f.route(&id, &id, "", "crew-a", 1).await;
    }
    let mut watch = client
        .watch_dispatches(WatchDispatchesRequest {
            crew_id: "crew-a".into(),
            after_sequence: 0,
            ..WatchDispatchesRequest::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = take(&mut watch, 7).await;
    assert_eq!(
        first.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    drop(watch); // the phone loses its network mid-storm

    for i in 10..40 {
        let id = format!("ticket-s{i}");
        f.ticket(&id, Channel::Wechat, "", false).await;
        f.route(&id, &id, "", "crew-a", 1).await;
    }
    let mut watch = client
        .watch_dispatches(WatchDispatchesRequest {
            crew_id: "crew-a".into(),
            after_sequence: 7,
            ..WatchDispatchesRequest::default()
        })
        .await
        .expect("resume")
        .into_inner();
    let missed = take(&mut watch, 33).await;
    assert_eq!(
        missed.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (8..=40).collect::<Vec<_>>(),
        "exactly the missed ones, in order"
    );
    let orders: Vec<String> = missed
        .iter()
        .map(|e| {
            decode_payload::<OrderAssigned>(e.event.as_ref().expect("event"))
                .expect("an order")
                .order_id
        })
        .collect();
    assert_eq!(orders[0], "ticket-s7");
    assert_eq!(orders[32], "ticket-s39");

    // Then live: the next order arrives on the open stream.
    f.ticket("ticket-live", Channel::Web, "", false).await;
    f.route("ticket-live", "ticket-live", "", "crew-a", 1).await;
    let live = take(&mut watch, 1).await;
    assert_eq!(live[0].sequence, 41);

    let err = client
        .watch_dispatches(WatchDispatchesRequest {
            crew_id: "crew-a".into(),
            after_sequence: 99,
            ..WatchDispatchesRequest::default()
        })
        .await
        .expect_err("ahead of the crew's sequence");
    assert_eq!(err.code(), Code::OutOfRange);
    let err = client
        .watch_dispatches(WatchDispatchesRequest {
            crew_id: "crew-nobody".into(),
            after_sequence: 0,
            ..WatchDispatchesRequest::default()
        })
        .await
        .expect_err("unknown crew");
    assert_eq!(err.code(), Code::NotFound);
}

fn act(action: Action) -> CrewAction {
    CrewAction {
        action: Some(action),
    }
}

#[tokio::test]
async fn an_offline_batch_applies_in_device_time_order_and_once_when_resent() {
    let mut f = start().await;
    f.ticket("ticket-o1", Channel::Hotline95598, "", false)
        .await;
    f.route("ticket-o1", "ticket-o1", "", "crew-a", 1).await;
    // Queued offline, sent in the wrong order.
    let batch = SubmitActionsRequest {
        actions: vec![
            act(Action::Complete(CompleteRequest {
                header: header("crew-a", "ticket-o1", "a5", 5_000),
                cause: "blown fuse".into(),
                result: "fuse replaced".into(),
                parts_used: vec!["fuse 63A".into()],
                notes: String::new(),
            })),
            act(Action::Arrive(ArriveRequest {
                header: header("crew-a", "ticket-o1", "a3", 2_000),
                position: None,
            })),
            act(Action::Acknowledge(AcknowledgeRequest {
                header: header("crew-a", "ticket-o1", "a1", 60),
            })),
            act(Action::Restore(RestoreRequest {
                header: header("crew-a", "ticket-o1", "a4", 4_000),
            })),
            act(Action::Depart(DepartRequest {
                header: header("crew-a", "ticket-o1", "a2", 120),
            })),
        ],
    };
    // Sent when the phone came back, after all five.
    f.clock.set(at(5_000));
    let outcomes = f
        .client
        .submit_actions(batch.clone())
        .await
        .expect("batch")
        .into_inner()
        .outcomes;
    assert_eq!(
        outcomes
            .iter()
            .map(|o| (o.action_id.as_str(), o.code.as_str()))
            .collect::<Vec<_>>(),
        [
            ("a1", "OK"),
            ("a2", "OK"),
            ("a3", "OK"),
            ("a4", "OK"),
            ("a5", "OK")
        ]
    );
    let order = f.order("ticket-o1").await;
    assert_eq!(order.status(), OrderStatus::Completed);
    assert_eq!(order.arrived_at, Some(at(2_000)));
    assert_eq!(order.restoration_due_at, Some(at(2_000 + 3 * 3600)));
    let head = f.dispatcher.log().head();

    let again = f
        .client
        .submit_actions(batch)
        .await
        .expect("resent")
        .into_inner()
        .outcomes;
    assert_eq!(again, outcomes, "the same answers");
    assert_eq!(f.dispatcher.log().head(), head, "nothing applied twice");
}

#[tokio::test]
async fn escalation_withdraws_the_order_from_crew_a_and_gives_it_to_crew_b() {
    let mut f = start().await;
    f.ticket("ticket-e1", Channel::App, "", false).await;
    f.route("ticket-e1", "ticket-e1", "", "crew-a", 1).await;
    f.route("ticket-e1", "ticket-e1", "", "crew-b", 2).await;
    let a: Vec<String> = f
        .crew_events("crew-a")
        .iter()
        .map(|e| short(e).to_string())
        .collect();
    let b: Vec<String> = f
        .crew_events("crew-b")
        .iter()
        .map(|e| short(e).to_string())
        .collect();
    assert_eq!(a, ["OrderAssigned", "OrderWithdrawn"]);
    assert_eq!(b, ["OrderAssigned"]);
    let withdrawn: OrderWithdrawn = decode_payload(&f.crew_events("crew-a")[1]).expect("withdrawn");
    assert!(withdrawn.reason.contains("crew-b"), "{}", withdrawn.reason);
    let order = f.order("ticket-e1").await;
    assert_eq!((order.crew_id.as_str(), order.hop), ("crew-b", 2));

    let err = f
        .client
        .acknowledge(AcknowledgeRequest {
            header: header("crew-a", "ticket-e1", "late-ack", 10),
        })
        .await
        .expect_err("not crew a's any more");
    assert_eq!(err.code(), Code::PermissionDenied);
    f.client
        .acknowledge(AcknowledgeRequest {
            header: header("crew-b", "ticket-e1", "b-ack", 11),
        })
        .await
        .expect("crew b acknowledges");
}

#[tokio::test]
async fn completing_an_incident_completes_every_ticket_and_notifies_each_caller() {
    let mut f = start().await;
    f.ticket("ticket-lead", Channel::Hotline95598, "incident-1", true)
        .await;
    f.ticket("ticket-c1", Channel::App, "incident-1", false)
        .await;
    f.ticket("ticket-c2", Channel::Wechat, "incident-1", false)
        .await;
    f.route("incident-1", "ticket-lead", "incident-1", "crew-a", 1)
        .await;
    let assigned: OrderAssigned = decode_payload(&f.crew_events("crew-a")[0]).expect("assigned");
    assert_eq!(assigned.tickets.len(), 3, "the lead and both children");
    // A caller after the crew has it: the crew hears the incident grew.
    f.ticket("ticket-c3", Channel::StationPhone, "incident-1", false)
        .await;
    let grew: IncidentGrew = decode_payload(&f.crew_events("crew-a")[1]).expect("grew");
    assert_eq!(grew.ticket_count, 4);

    for (i, action) in [
        Action::Acknowledge(AcknowledgeRequest {
            header: header("crew-a", "incident-1", "i1", 10),
        }),
        Action::Arrive(ArriveRequest {
            header: header("crew-a", "incident-1", "i2", 20),
            position: None,
        }),
        Action::Complete(CompleteRequest {
            header: header("crew-a", "incident-1", "i3", 30),
            cause: "transformer fuse".into(),
            result: "replaced".into(),
            parts_used: vec![],
            notes: String::new(),
        }),
    ]
    .into_iter()
    .enumerate()
    {
        f.client
            .submit_actions(SubmitActionsRequest {
                actions: vec![act(action)],
            })
            .await
            .unwrap_or_else(|e| panic!("action {i}: {e}"));
    }
    let events = f
        .dispatcher
        .log()
        .read_stream("incident-1", 1, ReadDirection::Forward, 100)
        .expect("read")
        .events;
    let completed: WorkCompleted = events
        .iter()
        .find_map(|e| decode_payload(e).ok())
        .expect("completed");
    assert_eq!(
        completed.ticket_ids.len(),
        4,
        "every ticket of the incident"
    );
    let notices: Vec<CustomerNotificationRequested> = events
        .iter()
        .filter_map(|e| decode_payload(e).ok())
        .collect();
    assert_eq!(notices.len(), 4, "one per caller");
    let medium_of = |t: &str| {
        notices
            .iter()
            .find(|n| n.ticket_id == t)
            .map(|n| n.medium())
            .expect("notified")
    };
    assert_eq!(medium_of("ticket-c1"), NotificationMedium::AppPush);
    assert_eq!(medium_of("ticket-c2"), NotificationMedium::Wechat);
    assert_eq!(medium_of("ticket-lead"), NotificationMedium::Sms);
    assert_eq!(f.order("incident-1").await.status(), OrderStatus::Completed);
}

#[tokio::test]
async fn wrong_actions_get_clear_errors() {
    let mut f = start().await;
    f.ticket("ticket-w1", Channel::Web, "", false).await;
    f.route("ticket-w1", "ticket-w1", "", "crew-a", 1).await;
    let err = f
        .client
        .arrive(ArriveRequest {
            header: header("crew-a", "ticket-w1", "w1", 10),
            position: None,
        })
        .await
        .expect_err("arriving before acknowledging");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("arriving before acknowledging"),
        "{}",
        err.message()
    );
    f.client
        .acknowledge(AcknowledgeRequest {
            header: header("crew-a", "ticket-w1", "w2", 11),
        })
        .await
        .expect("ack");
    let err = f
        .client
        .complete(CompleteRequest {
            header: header("crew-a", "ticket-w1", "w3", 12),
            cause: "x".into(),
            result: "y".into(),
            parts_used: vec![],
            notes: String::new(),
        })
        .await
        .expect_err("completing before arriving");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = f
        .client
        .acknowledge(AcknowledgeRequest {
            header: header("crew-b", "ticket-w1", "w4", 12),
        })
        .await
        .expect_err("another crew's order");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = f
        .client
        .acknowledge(AcknowledgeRequest {
            header: header("crew-a", "ticket-nope", "w5", 12),
        })
        .await
        .expect_err("unknown order");
    assert_eq!(err.code(), Code::NotFound);
    let err = f
        .client
        .acknowledge(AcknowledgeRequest {
            header: header("crew-zz", "ticket-w1", "w6", 12),
        })
        .await
        .expect_err("unknown crew");
    assert_eq!(err.code(), Code::NotFound);
    let err = f
        .client
        .depart(DepartRequest {
            header: header("crew-a", "ticket-w1", "w2", 13),
        })
        .await
        .expect_err("action id reused for something else");
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = f
        .client
        .depart(DepartRequest { header: None })
        .await
        .expect_err("no header");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("header"), "{}", err.message());
}

#[tokio::test]
async fn two_acknowledgements_racing_one_wins_the_other_hears_why() {
    let f = start().await;
    f.ticket("ticket-r1", Channel::App, "", false).await;
    f.route("ticket-r1", "ticket-r1", "", "crew-a", 1).await;
    // Crew a's two phones and crew b, at once.
    let attempts = [
        ("crew-a", "phone-1"),
        ("crew-a", "phone-2"),
        ("crew-b", "phone-3"),
    ]
    .map(|(crew, device)| {
        let mut client = f.client.clone();
        tokio::spawn(async move {
            client
                .acknowledge(AcknowledgeRequest {
                    header: header(crew, "ticket-r1", device, 10),
                })
                .await
        })
    });
    let mut outcomes = Vec::new();
    for attempt in attempts {
        outcomes.push(attempt.await.expect("join"));
    }
    let wins = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(wins, 1, "one acknowledgement wins");
    let refused: Vec<(Code, String)> = outcomes
        .into_iter()
        .filter_map(Result::err)
        .map(|s| (s.code(), s.message().to_string()))
        .collect();
    assert!(
        refused.iter().any(
            |(code, m)| *code == Code::FailedPrecondition && m.contains("already acknowledged")
        ),
        "the other phone hears it was already acknowledged: {refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|(code, m)| *code == Code::PermissionDenied && m.contains("crew-a")),
        "the other crew hears whose order it is: {refused:?}"
    );
    let before = f.dispatcher.log().projection_digest().expect("digest");
    f.dispatcher
        .log()
        .rebuild_projections()
        .await
        .expect("rebuild");
    assert_eq!(
        f.dispatcher.log().projection_digest().expect("digest"),
        before
    );
}

fn open_log(dir: &std::path::Path) -> EventLog {
    EventLog::open(
        LogConfig::new(dir.join("log"), "dispatch")
            .with_event_types(lineguard_dispatch::event_types())
            .with_projector(Arc::new(DispatchProjector)),
    )
    .expect("open log")
}

fn alerts(d: &Dispatcher, crew: &str) -> Vec<(String, u32, bool)> {
    d.log()
        .read_stream(&crew_stream(crew), 1, ReadDirection::Forward, 1_000)
        .expect("read")
        .events
        .iter()
        .filter_map(|e| decode_payload::<ClockAlerted>(e).ok())
        .map(|a| (a.clock, a.percent, a.breached))
        .collect()
}

#[tokio::test]
async fn the_arrival_clock_warns_and_breaches_at_the_policys_times_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let d = Dispatcher::new(open_log(dir.path()));
        let f = Feed {
            dispatcher: d.clone(),
        };
        for crew in ["crew-a"] {
            f.hear_routing(&CrewDefined {
                crew: Some(Crew {
                    crew_id: crew.into(),
                    ..Crew::default()
                }),
            })
            .await;
        }
        f.ticket("ticket-k1", Channel::App, "", false).await;
        // Reported at 0; urban arrival limit 45 min; warnings at 50% and 80%.
        f.route("ticket-k1", "ticket-k1", "", "crew-a", 1).await;
        assert_eq!(fire_due(&d, &at(1_349)).await.expect("fire"), 0);
        assert_eq!(fire_due(&d, &at(1_350)).await.expect("fire"), 1);
        assert_eq!(fire_due(&d, &at(1_350)).await.expect("fire"), 0);
        d.log().close().await.expect("close");
    }
    // Dispatch restarts: the rest of the clock is still there, once.
    let d = Dispatcher::new(open_log(dir.path()));
    assert_eq!(fire_due(&d, &at(2_159)).await.expect("fire"), 0);
    assert_eq!(fire_due(&d, &at(2_160)).await.expect("fire"), 1);
    assert_eq!(fire_due(&d, &at(2_700)).await.expect("fire"), 1);
    assert_eq!(fire_due(&d, &at(100_000)).await.expect("fire"), 0);
    assert_eq!(
        alerts(&d, "crew-a"),
        [
            ("arrival".to_string(), 50, false),
            ("arrival".to_string(), 80, false),
            ("arrival".to_string(), 100, true)
        ]
    );
}

#[tokio::test]
async fn arriving_stops_the_arrival_clock_and_starts_restoration() {
    let mut f = start().await;
    f.ticket("ticket-k2", Channel::App, "", false).await;
    f.route("ticket-k2", "ticket-k2", "", "crew-a", 1).await;
    for (sent, action) in [
        (
            60,
            Action::Acknowledge(AcknowledgeRequest {
                header: header("crew-a", "ticket-k2", "k1", 60),
            }),
        ),
        (
            1_000,
            Action::Arrive(ArriveRequest {
                header: header("crew-a", "ticket-k2", "k2", 1_000),
                position: None,
            }),
        ),
    ] {
        f.clock.set(at(sent));
        f.client
            .submit_actions(SubmitActionsRequest {
                actions: vec![act(action)],
            })
            .await
            .expect("action");
    }
    let d = f.dispatcher.clone();
    // Restoration: 3 h from arrival at 1,000 s; warnings at 50% and 80%.
    assert_eq!(
        fire_due(&d, &at(1_000 + 5_399)).await.expect("fire"),
        0,
        "no arrival alerts any more"
    );
    assert_eq!(fire_due(&d, &at(1_000 + 5_400)).await.expect("fire"), 1);
    let order = f.order("ticket-k2").await;
    assert_eq!(order.status(), OrderStatus::OnSite);
    f.clock.set(at(7_000));
    f.client
        .restore(RestoreRequest {
            header: header("crew-a", "ticket-k2", "k3", 7_000),
        })
        .await
        .expect("restore");
    assert_eq!(
        fire_due(&d, &at(100_000)).await.expect("fire"),
        0,
        "restored: the clock stopped"
    );
    assert_eq!(
        alerts(&d, "crew-a"),
        [("restoration".to_string(), 50, false)]
    );
}

#[tokio::test]
async fn a_crew_watching_before_its_first_order_gets_it_live() {
    let f = start().await;
    let mut client = f.client.clone();
    let mut watch = client
        .watch_dispatches(WatchDispatchesRequest {
            crew_id: "crew-b".into(),
            after_sequence: 0,
            ..WatchDispatchesRequest::default()
        })
        .await
        .expect("a known crew with nothing yet")
        .into_inner();
    f.ticket("ticket-first", Channel::App, "", false).await;
    f.route("ticket-first", "ticket-first", "", "crew-b", 1)
        .await;
    let first = take(&mut watch, 1).await;
    assert_eq!(first[0].sequence, 1);
}

/// Routing's events can reach dispatch out of order (a redelivery, a
/// publish retried after a later one): a route of an older hop, or of a hop
/// routing has closed, never creates or moves an order, in either order of
/// delivery; a reopen (a newer hop) does.
#[tokio::test]
async fn routes_delivered_out_of_order_never_create_or_move_an_order() {
    // The escalation (hop 2, crew-b) arrives before the first route (hop 1, crew-a).
    let mut f = start().await;
    f.ticket("t-late", Channel::Hotline95598, "", false).await;
    f.route("t-late", "t-late", "", "crew-b", 2).await;
    f.route("t-late", "t-late", "", "crew-a", 1).await;
    let order = f.order("t-late").await;
    assert_eq!((order.crew_id.as_str(), order.hop), ("crew-b", 2));
    assert_eq!(order.status(), OrderStatus::Assigned);
    assert!(
        f.crew_events("crew-a").is_empty(),
        "crew-a never hears of hop 1"
    );
    assert_eq!(f.crew_events("crew-b").len(), 1);

    // In order: hop 1 then hop 2 moves the order, as before.
    f.ticket("t-order", Channel::Hotline95598, "", false).await;
    f.route("t-order", "t-order", "", "crew-a", 1).await;
    f.route("t-order", "t-order", "", "crew-b", 2).await;
    let order = f.order("t-order").await;
    assert_eq!((order.crew_id.as_str(), order.hop), ("crew-b", 2));

    // Closed before its route arrives: the late route makes no order.
    f.ticket("t-closed", Channel::App, "", false).await;
    f.hear_routing(&TicketRoutingClosed {
        case_id: "t-closed".into(),
        reason: "cancelled".into(),
        closed_at: Some(at(10)),
        hop: 1,
    })
    .await;
    let before = f.crew_events("crew-a").len();
    f.route("t-closed", "t-closed", "", "crew-a", 1).await;
    assert_eq!(
        f.crew_events("crew-a").len(),
        before,
        "no order for a closed hop"
    );
    let missing = f
        .client
        .clone()
        .get_work_order(GetWorkOrderRequest {
            order_id: "t-closed".into(),
        })
        .await;
    assert_eq!(missing.map(|_| ()).unwrap_err().code(), Code::NotFound);
    // A reopen is a newer hop: that one is an order.
    f.route("t-closed", "t-closed", "", "crew-a", 2).await;
    assert_eq!(f.order("t-closed").await.hop, 2);

    // Route then closing, in order: the order is withdrawn, and a late
    // redelivered route of that hop does not bring it back.
    f.ticket("t-withdrawn", Channel::App, "", false).await;
    f.route("t-withdrawn", "t-withdrawn", "", "crew-a", 1).await;
    f.hear_routing(&TicketRoutingClosed {
        case_id: "t-withdrawn".into(),
        reason: "returned: not ours".into(),
        closed_at: Some(at(20)),
        hop: 1,
    })
    .await;
    f.route("t-withdrawn", "t-withdrawn", "", "crew-b", 1).await;
    let order = f.order("t-withdrawn").await;
    assert_eq!(order.status(), OrderStatus::Withdrawn);
    assert_eq!(order.crew_id, "crew-a");
}

/// Watches are bounded per crew and in all; a phone reconnecting with the
/// same device id replaces its old watch (which ends ABORTED) instead of
/// holding a second slot; a closed watch gives its slot back.
#[tokio::test]
async fn watches_are_bounded_and_a_device_replaces_its_own() {
    use lineguard_dispatch::watch::MAX_WATCHES_PER_CREW;
    let f = start().await;
    let mut client = f.client.clone();
    f.ticket("t-w", Channel::App, "", false).await;
    f.route("t-w", "t-w", "", "crew-a", 1).await;
    let watch = |device: &str| {
        let mut client = client.clone();
        let device = device.to_string();
        async move {
            client
                .watch_dispatches(WatchDispatchesRequest {
                    crew_id: "crew-a".into(),
                    after_sequence: 0,
                    device_id: device,
                })
                .await
        }
    };
    let mut open = Vec::new();
    for i in 0..MAX_WATCHES_PER_CREW {
        let mut stream = watch(&format!("phone-{i}"))
            .await
            .expect("watch")
            .into_inner();
        assert_eq!(take(&mut stream, 1).await[0].sequence, 1);
        open.push(stream);
    }
    assert_eq!(f.watchers.count(), MAX_WATCHES_PER_CREW);
    let refused = watch("phone-extra").await.map(|_| ()).unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("crew-a"),
        "{}",
        refused.message()
    );

    // phone-0 reconnects: its old watch ends, the new one takes its slot.
    let mut again = watch("phone-0")
        .await
        .expect("replacing watch")
        .into_inner();
    assert_eq!(take(&mut again, 1).await[0].sequence, 1);
    let ended = tokio::time::timeout(Duration::from_secs(10), open[0].next())
        .await
        .expect("the old watch ends")
        .expect("an item")
        .expect_err("ended with a status");
    assert_eq!(ended.code(), Code::Aborted);
    assert_eq!(f.watchers.count(), MAX_WATCHES_PER_CREW);

    // A new event reaches every open watch.
    f.ticket("t-w2", Channel::App, "", false).await;
    f.route("t-w2", "t-w2", "", "crew-a", 1).await;
    assert_eq!(take(&mut again, 1).await[0].sequence, 2);
    assert_eq!(take(&mut open[1], 1).await[0].sequence, 2);

    // Closed watches give their slots back.
    drop(open);
    drop(again);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while f.watchers.count() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = &mut client;
}

/// At the service's limit a new watch is refused and leaves nothing behind
/// (no entry for its crew, so `crews_connected` stays the count of crews
/// with a watch); a phone replacing its own watch is still let in; every
/// slot comes back when the watches end.
#[tokio::test]
async fn a_watch_refused_at_the_limit_leaves_nothing() {
    use lineguard_dispatch::watch::{MAX_WATCHES, MAX_WATCHES_PER_CREW};
    let f = start().await;
    let crews = MAX_WATCHES / MAX_WATCHES_PER_CREW;
    let mut held = Vec::with_capacity(MAX_WATCHES);
    for crew in 0..crews {
        for phone in 0..MAX_WATCHES_PER_CREW {
            let registration = f
                .watchers
                .register(&format!("crew-{crew}"), &format!("phone-{phone}"))
                .expect("below the limit");
            held.push(registration);
        }
    }
    assert_eq!(f.watchers.count(), MAX_WATCHES);
    assert_eq!(f.watchers.crews_connected(), crews);

    for stranger in 0..100 {
        let refused = f
            .watchers
            .register(&format!("crew-new-{stranger}"), "phone-0")
            .map(|_| ())
            .expect_err("over the limit");
        assert_eq!(refused.code(), Code::ResourceExhausted);
    }
    assert_eq!(f.watchers.count(), MAX_WATCHES);
    assert_eq!(f.watchers.crews_connected(), crews, "refusals left entries");

    // The same phone reconnecting takes its own slot back, limit or not.
    let replacing = f
        .watchers
        .register("crew-0", "phone-3")
        .expect("a phone replaces its own watch at the limit");
    assert_eq!(f.watchers.count(), MAX_WATCHES);

    drop(replacing);
    drop(held);
    assert_eq!(f.watchers.count(), 0);
    assert_eq!(f.watchers.crews_connected(), 0);
}

/// A phone's clock is believed only within the rule of
/// `lineguard_dispatch::device_clock`: an arrival stamped far in the future
/// counts at receipt plus the skew, one stamped before the order existed
/// counts at the assignment, and both say the clock was adjusted; the
/// order's clocks and on-time flags follow the judged times.
#[tokio::test]
async fn device_times_are_judged_within_the_skew_of_receipt() {
    use lineguard_protos::dispatch::v1::CrewArrived;
    let mut f = start().await;
    f.ticket("ticket-c1", Channel::App, "", false).await;
    f.route("ticket-c1", "ticket-c1", "", "crew-a", 1).await;
    // A phone 24 minutes fast acknowledges at 60 s: counted at 60 + 120 s.
    f.clock.set(at(60));
    let acked = f
        .client
        .acknowledge(AcknowledgeRequest {
            header: header("crew-a", "ticket-c1", "c1", 60 + 24 * 60),
        })
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(acked.acknowledged_at, Some(at(180)));
    // The arrival limit is 45 min (2,700 s). A phone that arrives at 50
    // minutes but claims 40 is held to the skew: counted at 48 min, late.
    f.clock.set(at(3_000));
    let arrived = f
        .client
        .arrive(ArriveRequest {
            header: header("crew-a", "ticket-c1", "c2", 2_400),
            position: None,
        })
        .await
        .expect("arrive")
        .into_inner();
    assert_eq!(arrived.arrived_at, Some(at(2_880)));
    let event = f
        .dispatcher
        .log()
        .read_stream("ticket-c1", 1, ReadDirection::Forward, 100)
        .expect("read")
        .events
        .into_iter()
        .find_map(|e| decode_payload::<CrewArrived>(&e).ok())
        .expect("arrival recorded");
    assert_eq!(
        event.device_time,
        Some(at(2_400)),
        "the phone's time is kept"
    );
    assert_eq!(event.received_at, Some(at(3_000)));
    assert_eq!(event.judged_at, Some(at(2_880)));
    assert!(event.device_clock_adjusted);
    assert!(!event.on_time, "judged late: 48 min against 45");
    let order = f.order("ticket-c1").await;
    assert_eq!(order.arrived_at, Some(at(2_880)));
    assert_eq!(order.restoration_due_at, Some(at(2_880 + 3 * 3_600)));

    // Offline: a batch sent over an hour later keeps its older times, but
    // none before the order was assigned.
    f.ticket("ticket-c2", Channel::App, "", false).await;
    f.clock.set(at(4_000));
    f.route("ticket-c2", "ticket-c2", "", "crew-b", 1).await;
    f.clock.set(at(8_000));
    let outcomes = f
        .client
        .submit_actions(SubmitActionsRequest {
            actions: vec![
                act(Action::Acknowledge(AcknowledgeRequest {
                    header: header("crew-b", "ticket-c2", "d1", 3_900),
                })),
                act(Action::Depart(DepartRequest {
                    header: header("crew-b", "ticket-c2", "d2", 4_200),
                })),
                act(Action::Arrive(ArriveRequest {
                    header: header("crew-b", "ticket-c2", "d3", 4_300),
                    position: None,
                })),
            ],
        })
        .await
        .expect("batch")
        .into_inner()
        .outcomes;
    assert!(outcomes.iter().all(|o| o.code == "OK"), "{outcomes:?}");
    let order = f.order("ticket-c2").await;
    assert_eq!(
        order.acknowledged_at,
        Some(at(4_000)),
        "not before the assignment"
    );
    assert_eq!(order.departed_at, Some(at(4_200)));
    assert_eq!(order.arrived_at, Some(at(4_300)));
}

#[tokio::test]
async fn urges_made_before_the_order_reach_the_crew_in_it() {
    let mut f = start().await;
    f.ticket("t-1", Channel::Hotline95598, "inc-1", true).await;
    f.ticket("t-2", Channel::App, "inc-1", false).await;
    // The customers chase before any crew has the order: t-2 twice, t-1 once.
    for (ticket, count) in [("t-2", 1), ("t-2", 2), ("t-1", 1)] {
        f.hear_intake(&TicketUrged {
            ticket_id: ticket.into(),
            channel: Channel::App as i32,
            urge_count: count,
            urged_at: Some(at(60)),
        })
        .await;
    }
    assert!(f.crew_events("crew-a").is_empty(), "no crew holds it yet");
    // An urge for a ticket dispatch has not heard of waits for the report.
    let early = apply_event(
        f.dispatcher.log(),
        FROM_INTAKE,
        &IntakeEvents(f.dispatcher.clone()),
        &envelope(
            &TicketUrged {
                ticket_id: "t-unheard".into(),
                urge_count: 1,
                ..TicketUrged::default()
            },
            "intake",
        ),
        3,
    )
    .await;
    assert!(
        matches!(early, Err(HandlerError::Waiting { .. })),
        "{early:?}"
    );

    f.route("inc-1", "t-1", "inc-1", "crew-a", 1).await;
    let events = f.crew_events("crew-a");
    assert_eq!(events.len(), 1);
    let assigned: OrderAssigned = decode_payload(&events[0]).expect("order");
    let urges: Vec<(&str, u32)> = assigned
        .tickets
        .iter()
        .map(|t| (t.ticket_id.as_str(), t.urge_count))
        .collect();
    assert_eq!(
        urges,
        [("t-1", 1), ("t-2", 2)],
        "each ticket's urges so far"
    );
    assert_eq!(f.order("inc-1").await.urge_count, 3);

    // Once the crew holds it, an urge is news for the crew as well.
    f.hear_intake(&TicketUrged {
        ticket_id: "t-2".into(),
        channel: Channel::App as i32,
        urge_count: 3,
        urged_at: Some(at(120)),
    })
    .await;
    let events = f.crew_events("crew-a");
    assert_eq!(short(&events[1]), "CustomerUrged");
    let order = f.order("t-2").await;
    assert_eq!(
        order.order_id, "inc-1",
        "a caller's ticket id names the order"
    );
    assert_eq!(order.urge_count, 4);
    assert_eq!(
        order
            .tickets
            .iter()
            .find(|t| t.ticket_id == "t-2")
            .map(|t| t.urge_count),
        Some(3)
    );
}

#[tokio::test]
async fn a_crew_s_events_arrive_typed() {
    let mut f = start().await;
    f.ticket("t-1", Channel::Hotline95598, "", false).await;
    f.route("t-1", "t-1", "", "crew-a", 1).await;
    let mut stream = f
        .client
        .watch_dispatches(WatchDispatchesRequest {
            crew_id: "crew-a".into(),
            ..WatchDispatchesRequest::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = take(&mut stream, 1).await.remove(0);
    let Some(crew_event::Body::OrderAssigned(order)) = first.body else {
        panic!("typed: {:?}", first.body);
    };
    assert_eq!(order.order_id, "t-1");
    assert_eq!(order.tickets[0].account_number, "acct-t-1");
    let envelope = first.event.expect("the envelope with its ids");
    assert!(!envelope.event_id.is_empty());
    assert_eq!(envelope.correlation_id, "t-1");
}
