//! Routing's behaviour in-process, over a real RocksDB log: one hop to the
//! district's owner, leave and overload, escalation at the policy's times,
//! timers exactly once across a restart, accept, return, answer, incidents,
//! the directory file and bulk import, bad input, rebuild.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lineguard_bus::{Applied, apply_event};
use lineguard_eventlog::{EventEnvelope, EventLog, LogConfig, ReadDirection, decode_payload};
use lineguard_protos::intake::v1::{
    Channel, ServiceRequestType, TicketCancelled, TicketKind, TicketReported,
};
use lineguard_protos::routing::v1::{
    AcceptTicketRequest, AccountAssignment, AnswerTicketRequest, AssigneeRole, Availability,
    ClockBreached, ClockWarned, GetAvailabilityRequest, GetRouteRequest, ImportAccountsRequest,
    ReturnReason, ReturnTicketRequest, RouteReason, RouteStatus, RouteView, SetAvailabilityRequest,
    TicketRouted, routing_client::RoutingClient, routing_server::Routing,
};
use lineguard_routing::api::RoutingService;
use lineguard_routing::intake_events::{CONSUMER, IntakeEvents};
use lineguard_routing::projection::RoutingProjector;
use lineguard_routing::router::{Router, RoutingConfig, now};
use lineguard_routing::startup::{adopt_policy, adopt_policy_file, load_directory_file};
use lineguard_routing::timers::fire_due;
use prost::{Message, Name};
use prost_types::Timestamp;
use tonic::{Code, Request};

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(name)
}

fn open_log(dir: &Path) -> EventLog {
    EventLog::open(
        LogConfig::new(dir.join("log"), "routing")
            .with_event_types(lineguard_routing::event_types())
            .with_projector(Arc::new(RoutingProjector)),
    )
    .expect("open log")
}

/// A router over a fresh log holding the demo directory and the deployed policy.
async fn router(dir: &Path) -> Router {
    let router = Router::new(open_log(dir), RoutingConfig::default());
    adopt_policy_file(&router, &deploy("policy.toml"))
        .await
        .expect("policy");
    load_directory_file(&router, &deploy("directory.toml"))
        .await
        .expect("directory");
    router
}

fn reported(kind: TicketKind, channel: Channel, account: &str) -> TicketReported {
    TicketReported {
        ticket_id: format!("ticket-{}", uuid()),
        channel: channel as i32,
        kind: kind as i32,
        account_number: account.into(),
        reported_at: Some(now()),
        ..TicketReported::default()
    }
}

fn uuid() -> String {
    format!("{:x}", rand_u128())
}

fn rand_u128() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (u128::from(std::process::id()) << 64) | u128::from(n)
}

fn envelope<M: Message + Name>(message: &M, correlation: &str) -> EventEnvelope {
    EventEnvelope {
        event_id: format!("evt-{}", uuid()),
        stream_id: correlation.into(),
        stream_version: 1,
        global_position: 1,
        recorded_at: Some(now()),
        correlation_id: correlation.into(),
        event_type: M::full_name(),
        schema_version: 1,
        payload: Bytes::from(message.encode_to_vec()),
        source: "intake".into(),
        ..EventEnvelope::default()
    }
}

/// Delivers an intake event to routing's consumer, as the bus would.
async fn deliver<M: Message + Name>(router: &Router, message: &M, correlation: &str) -> Applied {
    apply_event(
        router.log(),
        CONSUMER,
        &IntakeEvents::new(router.clone()),
        &envelope(message, correlation),
        3,
    )
    .await
    .expect("handled")
}

async fn report(router: &Router, r: &TicketReported) -> RouteView {
    assert_eq!(deliver(router, r, &r.ticket_id).await, Applied::Committed);
    let case = if r.incident_lead {
        &r.incident_id
    } else {
        &r.ticket_id
    };
    router.route(case).expect("read").expect("routed")
}

fn at_plus(t: &Timestamp, seconds: i64) -> Timestamp {
    Timestamp {
        seconds: t.seconds + seconds,
        nanos: t.nanos,
    }
}

fn routed_events(router: &Router, case: &str) -> Vec<TicketRouted> {
    router
        .log()
        .read_stream(case, 1, ReadDirection::Forward, 1_000)
        .expect("read")
        .events
        .iter()
        .filter_map(|e| decode_payload::<TicketRouted>(e).ok())
        .collect()
}

fn service(router: &Router) -> RoutingService {
    RoutingService::new(router.clone())
}

#[tokio::test]
async fn every_door_goes_in_one_hop_to_the_district_manager() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    // Account 3100000003 is in d-chengguan-01, owned by m-chengguan-01.
    for channel in [
        Channel::Hotline95598,
        Channel::StationPhone,
        Channel::StationCounter,
        Channel::ManagerPhone,
        Channel::App,
        Channel::Wechat,
        Channel::Web,
    ] {
        let r = reported(TicketKind::Complaint, channel, "3100000003");
        let route = report(&router, &r).await;
        assert_eq!(route.line, 1, "{channel:?}");
        assert_eq!(route.hop, 1, "{channel:?}");
        assert_eq!(route.assignee_id, "m-chengguan-01");
        assert_eq!(route.assignee_role(), AssigneeRole::DistrictManager);
        assert_eq!(route.hops[0].reason(), RouteReason::DistrictOwner);
        assert_eq!(route.district_id, "d-chengguan-01");
        assert_eq!(route.station_id, "st-chengguan");
        assert_eq!(route.company_id, "co-lixian");
        assert_eq!(route.policy_version, "2026.1");
        assert!(route.hops[0].waiting_seconds < 5);
        let clocks: Vec<&str> = route.deadlines.iter().map(|d| d.clock.as_str()).collect();
        assert_eq!(clocks, ["acceptance", "contact", "answer"]);
    }
    let manager = service(&router)
        .get_availability(Request::new(GetAvailabilityRequest {
            assignee_id: "m-chengguan-01".into(),
        }))
        .await
        .expect("availability")
        .into_inner();
    assert_eq!(manager.open_tickets, 7);
}

#[tokio::test]
async fn a_fault_gets_the_arrival_limit_of_its_area_and_the_districts_crew() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let remote_account = router_account_in(&router, "d-shanyang-01");
    let r = reported(TicketKind::FaultRepair, Channel::App, &remote_account);
    let route = report(&router, &r).await;
    assert!(route.field_work);
    assert_eq!(
        route.crew_id, "crew-shanyang-1",
        "the crew serving the district"
    );
    let arrival = route
        .deadlines
        .iter()
        .find(|d| d.clock == "arrival")
        .and_then(|d| d.due_at)
        .expect("arrival deadline");
    let reported_at = r.reported_at.expect("reported");
    assert_eq!(
        arrival.seconds - reported_at.seconds,
        120 * 60,
        "remote: 120 min"
    );
    let restoration = route
        .limits
        .iter()
        .find(|l| l.clock == "restoration")
        .expect("restoration limit");
    assert_eq!(
        (restoration.seconds, restoration.starts_at.as_str()),
        (4 * 3600, "arrival")
    );
}

fn router_account_in(router: &Router, district: &str) -> String {
    let accounts = std::fs::read_to_string(deploy("demo-accounts.csv")).expect("csv");
    let account = accounts
        .lines()
        .find_map(|l| l.strip_suffix(&format!(",{district}")))
        .expect("an account in the district")
        .to_string();
    assert_eq!(
        router
            .directory()
            .account_district(&account)
            .expect("read")
            .as_deref(),
        Some(district)
    );
    account
}

#[tokio::test]
async fn reports_are_decided_in_their_stations_lanes_and_a_cancellation_waits() {
    use lineguard_bus::Handler;
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let consumer = IntakeEvents::new(router.clone());
    let lane = |district: &str, account: &str| {
        let mut r = reported(TicketKind::FaultRepair, Channel::App, account);
        r.district_id = district.into();
        consumer.lane(&envelope(&r, &r.ticket_id))
    };
    let chengguan = lane("d-chengguan-01", "");
    assert_eq!(chengguan.as_deref(), Some("station st-chengguan"));
    assert_eq!(
        lane("d-chengguan-02", ""),
        chengguan,
        "one station, one lane"
    );
    // Located by the account when the report names no district.
    let account = router_account_in(&router, "d-chengguan-02");
    assert_eq!(lane("", &account), chengguan);
    assert_ne!(lane("d-dongpo-01", ""), chengguan, "stations side by side");
    assert_eq!(lane("d-nowhere", "").as_deref(), Some("no district"));
    let cancelled = TicketCancelled {
        ticket_id: "ticket-1".into(),
        reason: "fixed itself".into(),
        ..TicketCancelled::default()
    };
    assert_eq!(
        consumer.lane(&envelope(&cancelled, "ticket-1")),
        None,
        "a cancellation waits for the reports before it"
    );
}

#[tokio::test]
async fn a_manager_on_leave_or_overloaded_is_passed_over_in_the_same_hop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let svc = service(&router);
    let tomorrow = at_plus(&now(), 86_400);
    svc.set_availability(Request::new(SetAvailabilityRequest {
        assignee_id: "m-dongpo-01".into(),
        availability: Availability::OnLeave as i32,
        leave_from: None,
        leave_until: Some(tomorrow),
        note: "annual leave".into(),
    }))
    .await
    .expect("leave");
    let account = router_account_in(&router, "d-dongpo-01");
    let route = report(
        &router,
        &reported(TicketKind::Inquiry, Channel::Hotline95598, &account),
    )
    .await;
    assert_eq!((route.line, route.hop), (2, 1));
    assert_eq!(route.assignee_id, "desk-st-dongpo");
    assert_eq!(route.hops[0].reason(), RouteReason::OwnerUnavailable);
    assert!(
        route.hops[0]
            .reason_detail
            .contains("m-dongpo-01 is on leave until"),
        "{}",
        route.hops[0].reason_detail
    );

    // Overloaded: more open tickets than the threshold.
    let strict = Router::new(
        router.log().clone(),
        RoutingConfig {
            overload_threshold: 1,
            ..RoutingConfig::default()
        },
    );
    let account = router_account_in(&router, "d-xihe-01");
    for expected in ["m-xihe-01", "m-xihe-01", "desk-st-xihe"] {
        let route = report(
            &strict,
            &reported(TicketKind::Inquiry, Channel::Web, &account),
        )
        .await;
        assert_eq!(route.assignee_id, expected);
    }
    let view = svc
        .get_availability(Request::new(GetAvailabilityRequest {
            assignee_id: "m-xihe-01".into(),
        }))
        .await
        .expect("availability")
        .into_inner();
    assert_eq!(view.open_tickets, 2);
}

#[tokio::test]
async fn no_acceptance_climbs_to_the_station_then_the_company_at_the_policys_times() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let account = router_account_in(&router, "d-chengguan-02");
    let r = reported(TicketKind::FaultRepair, Channel::Hotline95598, &account);
    let route = report(&router, &r).await;
    let t0 = route.routed_at.expect("routed at");
    let case = route.case_id.clone();

    // Fault repair: 5 min to accept; warnings at 50% and 80%.
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 149)).await.expect("fire"),
        0
    );
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 150)).await.expect("fire"),
        1
    );
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 240)).await.expect("fire"),
        1
    );
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 299)).await.expect("fire"),
        0
    );
    assert_eq!(router.route(&case).expect("read").expect("route").hop, 1);

    assert_eq!(
        fire_due(&router, &at_plus(&t0, 300)).await.expect("fire"),
        1
    );
    let route = router.route(&case).expect("read").expect("route");
    assert_eq!((route.hop, route.line), (2, 2));
    assert_eq!(route.assignee_id, "desk-st-chengguan");
    assert_eq!(route.hops[1].reason(), RouteReason::Escalated);
    assert_eq!(route.hops[1].waiting_seconds, 300);
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 300)).await.expect("fire"),
        0,
        "once"
    );

    // The station's window runs from the escalation.
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 599)).await.expect("fire"),
        2,
        "its warnings"
    );
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 600)).await.expect("fire"),
        1
    );
    let route = router.route(&case).expect("read").expect("route");
    assert_eq!((route.hop, route.line), (3, 3));
    assert_eq!(route.assignee_id, "desk-co-lixian");
    assert_eq!(route.hops[2].waiting_seconds, 600);

    // The company is the last line: a breach, no fourth hop.
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 900)).await.expect("fire"),
        3
    );
    let route = router.route(&case).expect("read").expect("route");
    assert_eq!(route.hop, 3);
    let events = router
        .log()
        .read_stream(&case, 1, ReadDirection::Forward, 100)
        .expect("read")
        .events;
    let warnings = events
        .iter()
        .filter(|e| e.event_type == ClockWarned::full_name())
        .count();
    let breaches: Vec<ClockBreached> = events
        .iter()
        .filter_map(|e| decode_payload::<ClockBreached>(e).ok())
        .collect();
    assert_eq!(warnings, 6, "50% and 80% at each of three lines");
    assert_eq!(
        breaches.iter().map(|b| b.line).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        routed_events(&router, &case)
            .iter()
            .map(|r| r.hop)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 100_000))
            .await
            .expect("fire"),
        0
    );
}

#[tokio::test]
async fn a_due_timer_fires_exactly_once_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (case, t0) = {
        let router = router(dir.path()).await;
        let account = router_account_in(&router, "d-xihe-02");
        let route = report(
            &router,
            &reported(TicketKind::FaultRepair, Channel::Wechat, &account),
        )
        .await;
        let t0 = route.routed_at.expect("routed");
        assert_eq!(
            fire_due(&router, &at_plus(&t0, 240)).await.expect("fire"),
            2
        );
        router.log().close().await.expect("close");
        (route.case_id, t0)
    };
    // Restarted after the window closed: the escalation fires, once.
    let router = Router::new(open_log(dir.path()), RoutingConfig::default());
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 301)).await.expect("fire"),
        1
    );
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 301)).await.expect("fire"),
        0
    );
    router.log().close().await.expect("close");
    drop(router);
    let router = Router::new(open_log(dir.path()), RoutingConfig::default());
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 302)).await.expect("fire"),
        0
    );
    let hops: Vec<u32> = routed_events(&router, &case)
        .iter()
        .map(|r| r.hop)
        .collect();
    assert_eq!(hops, [1, 2]);
}

#[tokio::test]
async fn acceptance_stops_the_clock_and_only_the_holder_may_accept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let svc = service(&router);
    let account = router_account_in(&router, "d-chengguan-03");
    let route = report(
        &router,
        &reported(TicketKind::FaultRepair, Channel::App, &account),
    )
    .await;
    let accept = |who: &str, key: &str| AcceptTicketRequest {
        ticket_id: route.case_id.clone(),
        assignee_id: who.into(),
        idempotency_key: key.into(),
    };
    let err = svc
        .accept_ticket(Request::new(accept("m-xihe-01", "k0")))
        .await
        .expect_err("not the holder");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("held by m-chengguan-02"),
        "{}",
        err.message()
    );

    let holder = route.assignee_id.clone();
    let first = svc
        .accept_ticket(Request::new(accept(&holder, "k1")))
        .await
        .expect("accept")
        .into_inner();
    assert_eq!(first.status(), RouteStatus::Accepted);
    let again = svc
        .accept_ticket(Request::new(accept(&holder, "k1")))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(again, first, "a retry gets the same answer");
    let err = svc
        .accept_ticket(Request::new(accept(&holder, "k2")))
        .await
        .expect_err("already accepted");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let t0 = route.routed_at.expect("routed");
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 10_000))
            .await
            .expect("fire"),
        0,
        "no warning, no escalation after acceptance"
    );
    let err = svc
        .accept_ticket(Request::new(AcceptTicketRequest {
            ticket_id: "ticket-nope".into(),
            assignee_id: holder,
            idempotency_key: "k3".into(),
        }))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn a_return_reroutes_to_the_right_district_or_closes_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let svc = service(&router);
    let account = router_account_in(&router, "d-chengguan-04");
    let route = report(
        &router,
        &reported(TicketKind::FaultRepair, Channel::ManagerPhone, &account),
    )
    .await;
    let returned = svc
        .return_ticket(Request::new(ReturnTicketRequest {
            ticket_id: route.case_id.clone(),
            assignee_id: route.assignee_id.clone(),
            reason: ReturnReason::WrongDistrict as i32,
            correct_district_id: "d-xihe-03".into(),
            note: "the meter is across the river".into(),
            idempotency_key: "r1".into(),
        }))
        .await
        .expect("return")
        .into_inner();
    assert_eq!(returned.hop, 2);
    assert_eq!(
        returned.assignee_id, "m-xihe-02",
        "the right district's manager"
    );
    assert_eq!(
        returned.hops[1].reason(),
        RouteReason::ReturnedWrongDistrict
    );
    let stored = router.route(&route.case_id).expect("read").expect("route");
    assert_eq!(stored.district_id, "d-xihe-03");
    assert_eq!(stored.station_id, "st-xihe");

    let closed = svc
        .return_ticket(Request::new(ReturnTicketRequest {
            ticket_id: route.case_id.clone(),
            assignee_id: "m-xihe-02".into(),
            reason: ReturnReason::CustomerSideFault as i32,
            correct_district_id: String::new(),
            note: "the customer's own breaker".into(),
            idempotency_key: "r2".into(),
        }))
        .await
        .expect("close")
        .into_inner();
    assert_eq!(closed.status(), RouteStatus::Closed);
    assert_eq!(closed.closed_reason, "returned: customer-side fault");

    let err = svc
        .return_ticket(Request::new(ReturnTicketRequest {
            ticket_id: route.case_id.clone(),
            assignee_id: "m-xihe-02".into(),
            reason: ReturnReason::WrongDistrict as i32,
            correct_district_id: "d-nowhere".into(),
            note: String::new(),
            idempotency_key: "r3".into(),
        }))
        .await
        .expect_err("unknown district");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("correct_district_id"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn desk_work_is_answered_and_field_work_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let svc = service(&router);
    let account = router_account_in(&router, "d-dongpo-02");
    let complaint = report(
        &router,
        &reported(TicketKind::Complaint, Channel::Hotline95598, &account),
    )
    .await;
    let answered = svc
        .answer_ticket(Request::new(AnswerTicketRequest {
            ticket_id: complaint.case_id.clone(),
            assignee_id: complaint.assignee_id.clone(),
            answer: "Called the customer; the bill was recalculated.".into(),
            outcome: "resolved".into(),
            idempotency_key: "a1".into(),
        }))
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(answered.status(), RouteStatus::Answered);
    let t0 = complaint.routed_at.expect("routed");
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 30 * 86_400))
            .await
            .expect("fire"),
        0,
        "answered: no clock runs on"
    );
    let mut sub = reported(TicketKind::ServiceRequest, Channel::App, &account);
    sub.service_request_type = ServiceRequestType::Reconnection as i32;
    let field = report(&router, &sub).await;
    let err = svc
        .answer_ticket(Request::new(AnswerTicketRequest {
            ticket_id: field.case_id.clone(),
            assignee_id: field.assignee_id.clone(),
            answer: "done".into(),
            outcome: "resolved".into(),
            idempotency_key: "a2".into(),
        }))
        .await
        .expect_err("field work");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = svc
        .answer_ticket(Request::new(AnswerTicketRequest {
            ticket_id: complaint.case_id,
            assignee_id: complaint.assignee_id,
            answer: String::new(),
            outcome: "resolved".into(),
            idempotency_key: "a3".into(),
        }))
        .await
        .expect_err("empty answer");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("answer"), "{}", err.message());
}

#[tokio::test]
async fn an_incident_is_routed_once_and_its_children_follow_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let account = router_account_in(&router, "d-xihe-04");
    let mut lead = reported(TicketKind::FaultRepair, Channel::Hotline95598, &account);
    lead.incident_id = "incident-x1".into();
    lead.incident_lead = true;
    let route = report(&router, &lead).await;
    assert_eq!(route.case_id, "incident-x1");
    assert_eq!(route.lead_ticket_id, lead.ticket_id);
    for channel in [Channel::App, Channel::Wechat, Channel::StationPhone] {
        let mut child = reported(TicketKind::FaultRepair, channel, &account);
        child.incident_id = "incident-x1".into();
        assert_eq!(
            deliver(&router, &child, &child.ticket_id).await,
            Applied::Committed
        );
        let followed = service(&router)
            .get_route(Request::new(GetRouteRequest {
                ticket_id: child.ticket_id.clone(),
            }))
            .await
            .expect("route of a child")
            .into_inner();
        assert_eq!(followed.case_id, "incident-x1");
        assert!(
            router.route(&child.ticket_id).expect("read").is_none(),
            "not routed alone"
        );
    }
    let route = router.route("incident-x1").expect("read").expect("route");
    assert_eq!((route.children, route.hop), (3, 1));
    assert_eq!(routed_events(&router, "incident-x1").len(), 1);
    // Redelivery of the lead's report routes nothing again.
    assert_eq!(
        deliver(&router, &lead, &lead.ticket_id).await,
        Applied::Committed,
        "a new delivery id, so not in the inbox: the handler itself must see the route"
    );
    assert_eq!(routed_events(&router, "incident-x1").len(), 1);
}

#[tokio::test]
async fn a_cancelled_ticket_stops_its_clocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let account = router_account_in(&router, "d-dongpo-03");
    let r = reported(TicketKind::Inquiry, Channel::Web, &account);
    let route = report(&router, &r).await;
    let cancelled = TicketCancelled {
        ticket_id: r.ticket_id.clone(),
        reason: "sorted it out myself".into(),
        cancelled_at: Some(now()),
    };
    deliver(&router, &cancelled, &r.ticket_id).await;
    let route_after = router.route(&route.case_id).expect("read").expect("route");
    assert_eq!(route_after.status(), RouteStatus::Closed);
    assert!(route_after.closed_reason.contains("sorted it out myself"));
    let t0 = route.routed_at.expect("routed");
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 86_400 * 30))
            .await
            .expect("fire"),
        0
    );
}

#[tokio::test]
async fn an_unknown_district_goes_to_the_company_desk_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let route = report(
        &router,
        &reported(TicketKind::Report, Channel::Web, "9999999999"),
    )
    .await;
    assert_eq!((route.line, route.hop), (3, 1));
    assert_eq!(route.assignee_id, "desk-co-lixian");
    assert_eq!(route.hops[0].reason(), RouteReason::DistrictUnknown);
}

#[tokio::test]
async fn the_directory_file_writes_only_differences_and_accounts_import_over_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let head = router.log().head();
    assert_eq!(
        load_directory_file(&router, &deploy("directory.toml"))
            .await
            .expect("reload"),
        0,
        "the same file again writes nothing"
    );
    assert_eq!(router.log().head(), head);

    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(service(&router).server());
    let channel = lineguard_harness::serve_in_process(routes.routes())
        .await
        .expect("serve");
    let mut client = RoutingClient::new(channel);
    let messages: Vec<ImportAccountsRequest> = (0..3)
        .map(|m| ImportAccountsRequest {
            accounts: (0..5_000)
                .map(|i| AccountAssignment {
                    account_number: format!("77{m}{i:06}"),
                    district_id: "d-shanyang-02".into(),
                })
                .collect(),
        })
        .collect();
    let response = client
        .import_accounts(tokio_stream::iter(messages.clone()))
        .await
        .expect("import")
        .into_inner();
    assert_eq!(
        (response.received, response.changed, response.unchanged),
        (15_000, 15_000, 0)
    );
    assert_eq!(
        router
            .directory()
            .account_district("772004999")
            .expect("read")
            .as_deref(),
        Some("d-shanyang-02")
    );
    let again = client
        .import_accounts(tokio_stream::iter(messages))
        .await
        .expect("import again")
        .into_inner();
    assert_eq!((again.changed, again.unchanged), (0, 15_000));

    let bad = vec![ImportAccountsRequest {
        accounts: vec![AccountAssignment {
            account_number: "123".into(),
            district_id: "d-nowhere".into(),
        }],
    }];
    let err = client
        .import_accounts(tokio_stream::iter(bad))
        .await
        .expect_err("unknown district");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("accounts[0].district_id"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn bad_requests_name_their_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let svc = service(&router);
    let cases = [
        (
            SetAvailabilityRequest {
                assignee_id: "m-dongpo-01".into(),
                availability: 0,
                ..SetAvailabilityRequest::default()
            },
            Code::InvalidArgument,
            "availability",
        ),
        (
            SetAvailabilityRequest {
                assignee_id: "m-dongpo-01".into(),
                availability: Availability::OnLeave as i32,
                leave_from: Some(at_plus(&now(), 100)),
                leave_until: Some(now()),
                ..SetAvailabilityRequest::default()
            },
            Code::InvalidArgument,
            "leave_until",
        ),
        (
            SetAvailabilityRequest {
                assignee_id: "nobody".into(),
                availability: Availability::OffDuty as i32,
                ..SetAvailabilityRequest::default()
            },
            Code::NotFound,
            "nobody",
        ),
        (
            SetAvailabilityRequest {
                assignee_id: "bad id!".into(),
                availability: Availability::OffDuty as i32,
                ..SetAvailabilityRequest::default()
            },
            Code::InvalidArgument,
            "assignee_id",
        ),
    ];
    for (request, code, names) in cases {
        let err = svc
            .set_availability(Request::new(request))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(names), "{}", err.message());
    }
    let err = svc
        .accept_ticket(Request::new(AcceptTicketRequest {
            ticket_id: "ticket-1".into(),
            assignee_id: "m-dongpo-01".into(),
            idempotency_key: String::new(),
        }))
        .await
        .expect_err("no key");
    assert!(
        err.message().contains("idempotency_key"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_policy_version_is_never_edited_and_tickets_keep_theirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let account = router_account_in(&router, "d-chengguan-05");
    let before = report(
        &router,
        &reported(TicketKind::FaultRepair, Channel::App, &account),
    )
    .await;
    let text = std::fs::read_to_string(deploy("policy.toml")).expect("policy");
    let edited = text.replacen("acceptance = \"5m\"", "acceptance = \"2m\"", 1);
    let err = adopt_policy(&router, &edited)
        .await
        .expect_err("same version, new text");
    assert!(err.to_string().contains("raise `version`"), "{err}");
    let next = edited.replace("version = \"2026.1\"", "version = \"2026.2\"");
    assert_eq!(adopt_policy(&router, &next).await.expect("adopt"), "2026.2");

    let after = report(
        &router,
        &reported(TicketKind::FaultRepair, Channel::App, &account),
    )
    .await;
    assert_eq!(after.policy_version, "2026.2");
    let window = |r: &RouteView| {
        r.acceptance_due_at.expect("due").seconds - r.routed_at.expect("routed").seconds
    };
    assert_eq!(window(&after), 120);
    assert_eq!(before.policy_version, "2026.1");
    assert_eq!(window(&before), 300);
    // The old ticket escalates under its own version: 5 minutes a line.
    let t0 = before.routed_at.expect("routed");
    fire_due(&router, &at_plus(&t0, 300)).await.expect("fire");
    let escalated = router.route(&before.case_id).expect("read").expect("route");
    assert_eq!(escalated.hop, 2);
    assert_eq!(window(&escalated), 300);
}

#[tokio::test]
async fn rebuilding_the_projections_from_the_log_gives_the_same_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let account = router_account_in(&router, "d-xihe-05");
    for kind in [
        TicketKind::FaultRepair,
        TicketKind::Complaint,
        TicketKind::Praise,
    ] {
        let route = report(&router, &reported(kind, Channel::App, &account)).await;
        let t0 = route.routed_at.expect("routed");
        fire_due(&router, &at_plus(&t0, 300)).await.expect("fire");
    }
    let before = router.log().projection_digest().expect("digest");
    router.log().rebuild_projections().await.expect("rebuild");
    assert_eq!(router.log().projection_digest().expect("digest"), before);
}

#[tokio::test]
async fn the_crews_acknowledgement_accepts_field_work() {
    use lineguard_protos::dispatch::v1::OrderAcknowledged;
    use lineguard_routing::dispatch_events::{CONSUMER as FROM_DISPATCH, DispatchEvents};
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let account = router_account_in(&router, "d-dongpo-04");
    let route = report(
        &router,
        &reported(TicketKind::FaultRepair, Channel::App, &account),
    )
    .await;
    let ack = |crew: &str| OrderAcknowledged {
        order_id: route.case_id.clone(),
        crew_id: crew.into(),
        action_id: "a1".into(),
        device_time: Some(now()),
        recorded_at: Some(now()),
        ..OrderAcknowledged::default()
    };
    let handler = DispatchEvents::new(router.clone());
    let mut from_dispatch = envelope(&ack("crew-somebody-else"), &route.case_id);
    from_dispatch.source = "dispatch".into();
    apply_event(router.log(), FROM_DISPATCH, &handler, &from_dispatch, 3)
        .await
        .expect("handled");
    assert_eq!(
        router
            .route(&route.case_id)
            .expect("read")
            .expect("route")
            .status(),
        RouteStatus::Routed,
        "a crew the route did not send accepts nothing"
    );
    let mut from_dispatch = envelope(&ack(&route.crew_id), &route.case_id);
    from_dispatch.source = "dispatch".into();
    apply_event(router.log(), FROM_DISPATCH, &handler, &from_dispatch, 3)
        .await
        .expect("handled");
    let accepted = router.route(&route.case_id).expect("read").expect("route");
    assert_eq!(accepted.status(), RouteStatus::Accepted);
    let t0 = route.routed_at.expect("routed");
    assert_eq!(
        fire_due(&router, &at_plus(&t0, 3_600)).await.expect("fire"),
        0,
        "no escalation once the crew has it"
    );
}

/// An assignee's or crew's open tickets, as `GetAvailability` shows them.
async fn open_tickets(router: &Router, who: &str) -> u32 {
    service(router)
        .get_availability(Request::new(GetAvailabilityRequest {
            assignee_id: who.into(),
        }))
        .await
        .expect("availability")
        .into_inner()
        .open_tickets
}

/// A person's load is exactly the open cases they hold: field work
/// completed by the crew, a cancellation, an answer and an escalation away
/// all release it; a reopen takes it again. The recount from the log equals
/// the stored loads at every step, and is zero once everything is done.
#[tokio::test]
async fn loads_fall_with_completion_cancellation_answer_and_escalation() {
    use lineguard_protos::dispatch::v1::{OrderAcknowledged, WorkCompleted};
    use lineguard_protos::feedback::v1::TicketReopened;
    use lineguard_protos::routing::v1::VerifyLoadsRequest;
    use lineguard_routing::dispatch_events::{CONSUMER as FROM_DISPATCH, DispatchEvents};
    use lineguard_routing::feedback_events::{CONSUMER as FROM_FEEDBACK, FeedbackEvents};

    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path()).await;
    let svc = service(&router);
    let check = || async {
        let checked = svc
            .verify_loads(Request::new(VerifyLoadsRequest {}))
            .await
            .expect("verify loads")
            .into_inner();
        assert!(checked.mismatches.is_empty(), "{:?}", checked.mismatches);
        checked.open_tickets
    };
    let from = |source: &str, mut e: EventEnvelope| {
        e.source = source.into();
        e
    };
    let account = router_account_in(&router, "d-dongpo-04");

    // Field work: the manager and the crew each hold it until the crew completes.
    let fault = report(
        &router,
        &reported(TicketKind::FaultRepair, Channel::App, &account),
    )
    .await;
    let (manager, crew) = (fault.assignee_id.clone(), fault.crew_id.clone());
    assert!(!crew.is_empty());
    assert_eq!(open_tickets(&router, &manager).await, 1);
    assert_eq!(open_tickets(&router, &crew).await, 1);
    assert_eq!(check().await, 2);
    let dispatch = DispatchEvents::new(router.clone());
    let ack = OrderAcknowledged {
        order_id: fault.case_id.clone(),
        crew_id: crew.clone(),
        action_id: "a1".into(),
        device_time: Some(now()),
        recorded_at: Some(now()),
        ..OrderAcknowledged::default()
    };
    let event = from("dispatch", envelope(&ack, &fault.case_id));
    apply_event(router.log(), FROM_DISPATCH, &dispatch, &event, 3)
        .await
        .expect("ack");
    assert_eq!(
        open_tickets(&router, &manager).await,
        1,
        "accepted: still held"
    );
    let done = WorkCompleted {
        order_id: fault.case_id.clone(),
        crew_id: crew.clone(),
        action_id: "a2".into(),
        device_time: Some(now()),
        cause: "fuse".into(),
        result: "replaced".into(),
        ..WorkCompleted::default()
    };
    let event = from("dispatch", envelope(&done, &fault.case_id));
    apply_event(router.log(), FROM_DISPATCH, &dispatch, &event, 3)
        .await
        .expect("completed");
    let route = router.route(&fault.case_id).expect("read").expect("route");
    assert_eq!(route.status(), RouteStatus::WorkCompleted);
    assert_eq!(open_tickets(&router, &manager).await, 0);
    assert_eq!(open_tickets(&router, &crew).await, 0);
    assert_eq!(check().await, 0);
    assert_eq!(
        fire_due(
            &router,
            &at_plus(&route.routed_at.expect("routed"), 30 * 86_400)
        )
        .await
        .expect("fire"),
        0,
        "completed work leaves no clock behind"
    );

    // A dissatisfied customer reopens it: held again, by a new hop.
    let reopened = TicketReopened {
        ticket_id: fault.lead_ticket_id.clone(),
        case_id: fault.case_id.clone(),
        reason: "still flickering".into(),
        reopened_at: Some(now()),
    };
    let event = from("feedback", envelope(&reopened, &fault.case_id));
    apply_event(
        router.log(),
        FROM_FEEDBACK,
        &FeedbackEvents::new(router.clone()),
        &event,
        3,
    )
    .await
    .expect("reopen");
    let route = router.route(&fault.case_id).expect("read").expect("route");
    assert_eq!((route.status(), route.hop), (RouteStatus::Routed, 2));
    assert_eq!(open_tickets(&router, &route.assignee_id).await, 1);
    assert_eq!(open_tickets(&router, &route.crew_id).await, 1);
    assert_eq!(check().await, 2);
    // ... and the customer cancels it.
    let cancelled = TicketCancelled {
        ticket_id: fault.lead_ticket_id.clone(),
        reason: "fixed itself".into(),
        cancelled_at: Some(now()),
    };
    deliver(&router, &cancelled, &fault.lead_ticket_id).await;
    assert_eq!(open_tickets(&router, &route.assignee_id).await, 0);
    assert_eq!(open_tickets(&router, &route.crew_id).await, 0);

    // Desk work nobody accepts climbs to the station desk: the load moves
    // with it; the answer releases it.
    let complaint = report(
        &router,
        &reported(TicketKind::Complaint, Channel::Hotline95598, &account),
    )
    .await;
    assert_eq!(open_tickets(&router, &complaint.assignee_id).await, 1);
    let t0 = complaint.routed_at.expect("routed");
    let acceptance_due = complaint.acceptance_due_at.expect("acceptance window");
    fire_due(&router, &at_plus(&acceptance_due, 1))
        .await
        .expect("fire");
    let escalated = router
        .route(&complaint.case_id)
        .expect("read")
        .expect("route");
    assert_eq!(escalated.hop, 2, "escalated from {t0:?}");
    assert_ne!(escalated.assignee_id, complaint.assignee_id);
    assert_eq!(open_tickets(&router, &complaint.assignee_id).await, 0);
    assert_eq!(open_tickets(&router, &escalated.assignee_id).await, 1);
    assert_eq!(check().await, 1);
    svc.answer_ticket(Request::new(AnswerTicketRequest {
        ticket_id: complaint.case_id.clone(),
        assignee_id: escalated.assignee_id.clone(),
        answer: "Apologised; the worker was spoken to.".into(),
        outcome: "resolved".into(),
        idempotency_key: "answer-1".into(),
    }))
    .await
    .expect("answer");
    assert_eq!(open_tickets(&router, &escalated.assignee_id).await, 0);
    assert_eq!(check().await, 0, "every ticket done: every load is 0");

    // The loads are projections: a rebuild gives the same.
    let digest = router.log().projection_digest().expect("digest");
    router.log().rebuild_projections().await.expect("rebuild");
    assert_eq!(router.log().projection_digest().expect("digest"), digest);
}
