//! Intake over a real socket on its own event log: idempotent reports, urges,
//! outage correlation, cancel, listing, field-level validation, and views
//! that a rebuild from the log reproduces.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lineguard_eventlog::{EventLog, LogConfig, ReadDirection, decode_payload};
use lineguard_intake::api::{IntakeConfig, IntakeService};
use lineguard_intake::customer::CustomerDigest;
use lineguard_intake::projection::IntakeProjector;
use lineguard_protos::intake::v1::{
    Caller, CancelTicketRequest, Channel, Disposition, GetTicketRequest, ListTicketsRequest,
    ReportTicketRequest, ServiceRequestType, TicketKind, TicketReported, TicketStatus,
    intake_client::IntakeClient,
};
use sha2::Digest;
use tonic::transport::Channel as GrpcChannel;

struct Fixture {
    _dir: tempfile::TempDir,
    log: EventLog,
    client: IntakeClient<GrpcChannel>,
    channel: GrpcChannel,
}

fn open_log(path: &std::path::Path) -> EventLog {
    EventLog::open(
        LogConfig::new(path.join("intake"), "intake")
            .with_event_types(lineguard_intake::event_types())
            .with_projector(Arc::new(IntakeProjector)),
    )
    .expect("open log")
}

async fn start(config: IntakeConfig) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path());
    let customers =
        CustomerDigest::new(b"a test secret of 32 bytes, fixed".to_vec()).expect("secret");
    let master = lineguard_intake::sealing::MasterKey::load_or_create(
        &dir.path().join("secrets").join("master.key"),
    )
    .expect("master key");
    let keys = lineguard_intake::sealing::LocalKeyStore::open(&dir.path().join("keys"), master)
        .expect("key store");
    let routes = tonic::service::Routes::new(
        IntakeService::new(log.clone(), config, customers, Arc::new(keys)).server(),
    );
    let channel = lineguard_harness::serve_in_process(routes)
        .await
        .expect("serve");
    Fixture {
        _dir: dir,
        log,
        client: IntakeClient::new(channel.clone()),
        channel,
    }
}

fn fault(key: &str, account: &str, district: &str, channel: Channel) -> ReportTicketRequest {
    ReportTicketRequest {
        idempotency_key: key.into(),
        channel: channel as i32,
        kind: TicketKind::FaultRepair as i32,
        account_number: account.into(),
        district_id: district.into(),
        address: "3 Willow Lane".into(),
        caller: Some(Caller {
            name: "Li Wei".into(),
            phone: "13800138000".into(),
        }),
        description: "no power in the whole building".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_same_key_gives_the_same_answer_and_another_request_is_already_exists() {
    let mut f = start(IntakeConfig::default()).await;
    let request = fault("cc-1", "1001", "D-01", Channel::Hotline95598);
    let first = f
        .client
        .report_ticket(request.clone())
        .await
        .expect("report")
        .into_inner();
    assert_eq!(first.disposition(), Disposition::NewTicket);
    assert!(first.ticket_id.starts_with("ticket-"));
    let again = f
        .client
        .report_ticket(request.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        again, first,
        "a retry gets the original answer, not an urge"
    );
    let head = f.log.head();

    let mut other = request.clone();
    other.description = "something else".into();
    let err = f
        .client
        .report_ticket(other)
        .await
        .expect_err("different request");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(
        err.message().contains("idempotency_key"),
        "{}",
        err.message()
    );
    assert_eq!(f.log.head(), head, "nothing appended");

    let view = f
        .client
        .get_ticket(GetTicketRequest {
            ticket_id: first.ticket_id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .ticket
        .expect("view");
    assert_eq!(view.status(), TicketStatus::Received);
    assert_eq!(view.incident_id, first.incident_id);
    assert!(view.incident_lead);
}

#[tokio::test]
async fn a_hundred_concurrent_retries_make_one_ticket() {
    let f = start(IntakeConfig::default()).await;
    let request = fault("app-77", "2002", "D-02", Channel::App);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut client = f.client.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            client.report_ticket(request).await.map(|r| r.into_inner())
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task").expect("report"));
    }
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "every retry sees the one answer"
    );
    let mut client = f.client.clone();
    let listed = client
        .list_tickets(ListTicketsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.tickets.len(), 1);
    assert_eq!(answers[0].urge_count, 0);
}

#[tokio::test]
async fn a_repeat_call_urges_the_open_ticket() {
    let mut f = start(IntakeConfig::default()).await;
    let first = f
        .client
        .report_ticket(fault("k1", "3003", "D-03", Channel::App))
        .await
        .expect("first")
        .into_inner();
    for (n, channel) in [(1, Channel::Wechat), (2, Channel::Hotline95598)] {
        let urge = f
            .client
            .report_ticket(fault(&format!("k-urge-{n}"), "3003", "D-03", channel))
            .await
            .expect("repeat call")
            .into_inner();
        assert_eq!(urge.disposition(), Disposition::UrgedOpenTicket);
        assert_eq!(urge.ticket_id, first.ticket_id);
        assert_eq!(urge.urge_count, n);
    }
    let view = f
        .client
        .get_ticket(GetTicketRequest {
            ticket_id: first.ticket_id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .ticket
        .expect("view");
    assert_eq!(view.urge_count, 2);

    // A different kind from the same customer is a new ticket.
    let mut complaint = fault("k-complaint", "3003", "D-03", Channel::App);
    complaint.kind = TicketKind::Complaint as i32;
    let other = f
        .client
        .report_ticket(complaint)
        .await
        .expect("complaint")
        .into_inner();
    assert_eq!(other.disposition(), Disposition::NewTicket);
    assert_ne!(other.ticket_id, first.ticket_id);

    // A caller with no account is recognised by phone.
    let mut by_phone = fault("p1", "", "D-09", Channel::Web);
    by_phone.kind = TicketKind::Inquiry as i32;
    let a = f
        .client
        .report_ticket(by_phone.clone())
        .await
        .expect("p1")
        .into_inner();
    by_phone.idempotency_key = "p2".into();
    let b = f
        .client
        .report_ticket(by_phone)
        .await
        .expect("p2")
        .into_inner();
    assert_eq!(
        (b.disposition(), b.ticket_id),
        (Disposition::UrgedOpenTicket, a.ticket_id.clone())
    );
    // ... by a keyed digest: neither the phone nor its plain hash is a key,
    // in the event or anywhere in the views.
    let reported = f
        .log
        .read_stream(&a.ticket_id, 1, ReadDirection::Forward, 1)
        .expect("read")
        .events
        .remove(0);
    let reported: TicketReported = decode_payload(&reported).expect("reported");
    assert!(
        reported.customer_key.starts_with("caller-"),
        "{}",
        reported.customer_key
    );
    let plain: String = sha2::Sha256::digest(b"13800138000")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keys = f.log.projection_scan(b"", None, 10_000).expect("scan");
    for (key, _) in &keys {
        let key = String::from_utf8_lossy(key);
        assert!(!key.contains("13800138000"), "a phone in a key: {key}");
        assert!(!key.contains(&plain[..24]), "a plain hash in a key: {key}");
    }
    assert!(
        keys.iter()
            .any(|(k, _)| String::from_utf8_lossy(k).contains(&reported.customer_key)),
        "the keyed digest finds the open ticket"
    );
}

#[tokio::test]
async fn one_outage_through_five_doors_is_one_incident_led_by_the_first_call() {
    let mut f = start(IntakeConfig::default()).await;
    let doors = [
        Channel::Hotline95598,
        Channel::StationPhone,
        Channel::ManagerPhone,
        Channel::App,
        Channel::Wechat,
    ];
    let mut answers = Vec::new();
    for (i, door) in doors.into_iter().enumerate() {
        let answer = f
            .client
            .report_ticket(fault(&format!("door-{i}"), &format!("40{i}"), "D-04", door))
            .await
            .expect("report")
            .into_inner();
        answers.push(answer);
    }
    let incident = answers[0].incident_id.clone();
    assert!(incident.starts_with("incident-"));
    assert_eq!(answers[0].disposition(), Disposition::NewTicket);
    for answer in &answers[1..] {
        assert_eq!(answer.incident_id, incident);
        assert_eq!(answer.disposition(), Disposition::JoinedIncident);
        assert_eq!(answer.status(), TicketStatus::Attached);
    }
    let listed = f
        .client
        .list_tickets(ListTicketsRequest {
            incident_id: incident.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.tickets.len(), 5);
    assert_eq!(listed.tickets.iter().filter(|t| t.incident_lead).count(), 1);
    // The third call crossed the threshold: the incident is a probable outage.
    let incident_events = f
        .log
        .read_stream(&incident, 0, lineguard_eventlog::ReadDirection::Forward, 0)
        .expect("incident stream");
    let types: Vec<&str> = incident_events
        .events
        .iter()
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(
        types,
        [
            "lineguard.intake.v1.IncidentOpened",
            "lineguard.intake.v1.IncidentMarkedProbableOutage"
        ]
    );

    // Another district, or another kind, is not part of it.
    let elsewhere = f
        .client
        .report_ticket(fault("far", "999", "D-05", Channel::App))
        .await
        .expect("report")
        .into_inner();
    assert_ne!(elsewhere.incident_id, incident);
    let mut request = fault("svc", "998", "D-04", Channel::App);
    request.kind = TicketKind::ServiceRequest as i32;
    request.service_request_type = ServiceRequestType::MeterFault as i32;
    let service = f
        .client
        .report_ticket(request)
        .await
        .expect("report")
        .into_inner();
    assert!(service.incident_id.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_calls_of_one_outage_at_once_are_one_incident_counted_without_a_gap() {
    let f = start(IntakeConfig::default()).await;
    // 100 customers of one district call at once, each twice (the second
    // call a repeat: an urge of their own ticket). Decided where they
    // commit, without a lock, they must still make one incident, each
    // joining ticket counted once and in order, and each repeat an urge.
    let mut calls = Vec::new();
    for round in 0..2 {
        for customer in 0..100 {
            let mut client = f.client.clone();
            let mut request = fault(
                &format!("outage-{round}-{customer}"),
                &format!("7{customer:03}"),
                "D-09",
                Channel::App,
            );
            request.caller = Some(Caller {
                name: "Li Wei".into(),
                phone: format!("1390000{customer:04}"),
            });
            calls.push(tokio::spawn(async move {
                client.report_ticket(request).await.map(|a| a.into_inner())
            }));
        }
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("task").expect("report"));
    }
    let incidents: HashSet<&str> = answers.iter().map(|a| a.incident_id.as_str()).collect();
    assert_eq!(incidents.len(), 1, "one incident: {incidents:?}");
    let incident = answers[0].incident_id.clone();
    let tickets: HashSet<&str> = answers.iter().map(|a| a.ticket_id.as_str()).collect();
    assert_eq!(tickets.len(), 100, "one ticket a customer");
    let by = |d: Disposition| answers.iter().filter(|a| a.disposition() == d).count();
    assert_eq!(by(Disposition::NewTicket), 1, "the first call leads");
    assert_eq!(by(Disposition::JoinedIncident), 99);
    assert_eq!(by(Disposition::UrgedOpenTicket), 100, "each repeat urges");
    // Every join counted once, in order: 2..=100, no gap, no repeat.
    let mut counts = Vec::new();
    for ticket in tickets {
        let stream = f
            .log
            .read_stream(ticket, 0, lineguard_eventlog::ReadDirection::Forward, 0)
            .expect("ticket stream");
        for event in &stream.events {
            if event.event_type == "lineguard.intake.v1.TicketJoinedIncident" {
                let joined =
                    <lineguard_protos::intake::v1::TicketJoinedIncident as prost::Message>::decode(
                        event.payload.as_ref(),
                    )
                    .expect("decodes");
                assert_eq!(joined.incident_id, incident);
                counts.push(joined.ticket_count);
            }
        }
    }
    counts.sort_unstable();
    assert_eq!(counts, (2..=100).collect::<Vec<u32>>());
    let marks = f
        .log
        .read_stream(&incident, 0, lineguard_eventlog::ReadDirection::Forward, 0)
        .expect("incident stream")
        .events
        .iter()
        .filter(|e| e.event_type == "lineguard.intake.v1.IncidentMarkedProbableOutage")
        .count();
    assert_eq!(marks, 1, "marked a probable outage once");
    assert_eq!(f.log.verify().expect("verify"), f.log.head());
}

#[tokio::test]
async fn a_call_after_the_window_opens_a_new_incident() {
    let mut f = start(IntakeConfig {
        correlation_window: Duration::from_secs(1),
        outage_threshold: 3,
    })
    .await;
    let first = f
        .client
        .report_ticket(fault("w1", "501", "D-06", Channel::App))
        .await
        .expect("report")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let late = f
        .client
        .report_ticket(fault("w2", "502", "D-06", Channel::App))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(late.disposition(), Disposition::NewTicket);
    assert_ne!(late.incident_id, first.incident_id);
}

#[tokio::test]
async fn cancel_is_idempotent_and_final() {
    let mut f = start(IntakeConfig::default()).await;
    let ticket = f
        .client
        .report_ticket(fault("c1", "601", "D-07", Channel::App))
        .await
        .expect("report")
        .into_inner();
    let cancel = CancelTicketRequest {
        ticket_id: ticket.ticket_id.clone(),
        reason: "power came back".into(),
        idempotency_key: "cancel-1".into(),
    };
    let first = f
        .client
        .cancel_ticket(cancel.clone())
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(
        first.ticket.as_ref().expect("view").status(),
        TicketStatus::Cancelled
    );
    let retry = f
        .client
        .cancel_ticket(cancel.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retry, first);
    let err = f
        .client
        .cancel_ticket(CancelTicketRequest {
            idempotency_key: "cancel-2".into(),
            ..cancel
        })
        .await
        .expect_err("already cancelled");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = f
        .client
        .cancel_ticket(CancelTicketRequest {
            ticket_id: "ticket-none".into(),
            reason: "x".into(),
            idempotency_key: "c3".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // After a cancel, the same customer's next call is a new ticket.
    let next = f
        .client
        .report_ticket(fault("c4", "601", "D-08", Channel::App))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(next.disposition(), Disposition::NewTicket);
}

#[tokio::test]
async fn bad_reports_name_the_field_and_write_nothing() {
    let mut f = start(IntakeConfig::default()).await;
    let good = fault("v", "701", "D-10", Channel::App);
    let cases: Vec<(ReportTicketRequest, &str)> = vec![
        (
            ReportTicketRequest {
                idempotency_key: String::new(),
                ..good.clone()
            },
            "idempotency_key",
        ),
        (
            ReportTicketRequest {
                channel: 0,
                ..good.clone()
            },
            "channel",
        ),
        (
            ReportTicketRequest {
                channel: 42,
                ..good.clone()
            },
            "channel",
        ),
        (
            ReportTicketRequest {
                kind: 99,
                ..good.clone()
            },
            "kind",
        ),
        (
            ReportTicketRequest {
                account_number: String::new(),
                district_id: String::new(),
                ..good.clone()
            },
            "account_number",
        ),
        (
            ReportTicketRequest {
                account_number: "12 34".into(),
                ..good.clone()
            },
            "account_number",
        ),
        (
            ReportTicketRequest {
                district_id: "D.1".into(),
                ..good.clone()
            },
            "district_id",
        ),
        (
            ReportTicketRequest {
                caller: Some(Caller {
                    name: "x".into(),
                    phone: "12ab".into(),
                }),
                ..good.clone()
            },
            "caller.phone",
        ),
        (
            ReportTicketRequest {
                description: "x".repeat(2_001),
                ..good.clone()
            },
            "description",
        ),
        (
            ReportTicketRequest {
                address: "x".repeat(257),
                ..good.clone()
            },
            "address",
        ),
        (
            ReportTicketRequest {
                kind: TicketKind::ServiceRequest as i32,
                ..good.clone()
            },
            "service_request_type",
        ),
        (
            ReportTicketRequest {
                urgency: 17,
                ..good.clone()
            },
            "urgency",
        ),
    ];
    for (request, field) in cases {
        let err = f.client.report_ticket(request).await.expect_err(field);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            err.message().contains(field),
            "{} should name {field}",
            err.message()
        );
    }
    assert_eq!(f.log.head(), 0);
    let err = f
        .client
        .get_ticket(GetTicketRequest {
            ticket_id: "bad id".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = f
        .client
        .list_tickets(ListTicketsRequest {
            page_size: 5_000,
            ..Default::default()
        })
        .await
        .expect_err("page");
    assert!(err.message().contains("page_size"));
    let err = f
        .client
        .list_tickets(ListTicketsRequest {
            page_token: "forged".into(),
            ..Default::default()
        })
        .await
        .expect_err("token");
    assert!(err.message().contains("page_token"));
}

#[tokio::test]
async fn listing_pages_through_filters_and_views_survive_a_rebuild() {
    let mut f = start(IntakeConfig::default()).await;
    for i in 0..25 {
        let channel = if i % 2 == 0 {
            Channel::App
        } else {
            Channel::Hotline95598
        };
        let mut request = fault(
            &format!("l{i}"),
            &format!("80{i}"),
            &format!("D-L{}", i % 5),
            channel,
        );
        request.kind = TicketKind::Inquiry as i32;
        f.client.report_ticket(request).await.expect("report");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = f
            .client
            .list_tickets(ListTicketsRequest {
                channel: Channel::App as i32,
                page_size: 4,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        assert!(page.tickets.len() <= 4);
        seen.extend(page.tickets.into_iter().map(|t| {
            assert_eq!(t.channel(), Channel::App);
            t.ticket_id
        }));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 13);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(
        seen, sorted,
        "listed in reporting order (UUIDv7 ids sort the same way)"
    );

    let before = f.log.projection_digest().expect("digest");
    f.log.rebuild_projections().await.expect("rebuild");
    assert_eq!(f.log.projection_digest().expect("digest"), before);
}

/// Delivers a routing event to intake's observer, as the bus would.
async fn observe_routing<M: prost::Message + prost::Name>(
    log: &EventLog,
    message: &M,
    correlation: &str,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let event = lineguard_eventlog::EventEnvelope {
        event_id: format!("routing-evt-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        stream_id: correlation.into(),
        stream_version: 1,
        global_position: 1,
        recorded_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        correlation_id: correlation.into(),
        event_type: M::full_name(),
        schema_version: 1,
        payload: bytes::Bytes::from(message.encode_to_vec()),
        source: "routing".into(),
        ..Default::default()
    };
    let applied = lineguard_bus::apply_event(
        log,
        lineguard_intake::observe::CONSUMER,
        &lineguard_intake::observe::Observer,
        &event,
        3,
    )
    .await
    .expect("observed");
    assert_eq!(applied, lineguard_bus::Applied::Committed);
    // Delivered twice (a redelivery): applied once.
    let again = lineguard_bus::apply_event(
        log,
        lineguard_intake::observe::CONSUMER,
        &lineguard_intake::observe::Observer,
        &event,
        3,
    )
    .await
    .expect("redelivered");
    assert_eq!(again, lineguard_bus::Applied::AlreadyProcessed);
}

#[tokio::test]
async fn routings_events_keep_the_view_current_and_children_follow_their_incident() {
    use lineguard_protos::routing::v1::{
        AccountAssignment, AccountsAssigned, ClockWarned, Deadline, TicketAccepted, TicketRouted,
    };
    let mut f = start(IntakeConfig::default()).await;
    // Intake's copy of routing's directory places an account in its district.
    observe_routing(
        &f.log,
        &AccountsAssigned {
            accounts: (0..3)
                .map(|i| AccountAssignment {
                    account_number: format!("880{i}"),
                    district_id: "D-77".into(),
                })
                .collect(),
            source: "file".into(),
        },
        "directory",
    )
    .await;
    let mut tickets = Vec::new();
    for (i, channel) in [Channel::App, Channel::Wechat, Channel::Hotline95598]
        .iter()
        .enumerate()
    {
        let answer = f
            .client
            .report_ticket(fault(
                &format!("acct-{i}"),
                &format!("880{i}"),
                "",
                *channel,
            ))
            .await
            .expect("report")
            .into_inner();
        tickets.push(answer);
    }
    let incident = tickets[0].incident_id.clone();
    assert!(!incident.is_empty(), "the district came from the account");
    assert!(
        tickets.iter().all(|t| t.incident_id == incident),
        "one incident"
    );
    assert_eq!(tickets[2].disposition(), Disposition::JoinedIncident);
    assert!(f.log.outbox_backlog() > 0);
    let published_before = f.log.outbox_backlog();

    let now = prost_types::Timestamp::from(std::time::SystemTime::now());
    let due = prost_types::Timestamp {
        seconds: now.seconds + 300,
        nanos: 0,
    };
    observe_routing(
        &f.log,
        &TicketRouted {
            case_id: incident.clone(),
            lead_ticket_id: tickets[0].ticket_id.clone(),
            incident_id: incident.clone(),
            district_id: "D-77".into(),
            station_id: "ST-7".into(),
            company_id: "CO-1".into(),
            policy_version: "2026.1".into(),
            line: 1,
            assignee_id: "m-77".into(),
            crew_id: "crew-7".into(),
            hop: 1,
            routed_at: Some(now),
            waiting_seconds: 2,
            deadlines: vec![Deadline {
                clock: "acceptance".into(),
                due_at: Some(due),
            }],
            ..TicketRouted::default()
        },
        &incident,
    )
    .await;
    observe_routing(
        &f.log,
        &ClockWarned {
            case_id: incident.clone(),
            clock: "acceptance".into(),
            percent: 50,
            due_at: Some(due),
            warned_at: Some(now),
            assignee_id: "m-77".into(),
        },
        &incident,
    )
    .await;
    observe_routing(
        &f.log,
        &TicketAccepted {
            case_id: incident.clone(),
            assignee_id: "m-77".into(),
            line: 1,
            hop: 1,
            accepted_at: Some(now),
            on_time: true,
        },
        &incident,
    )
    .await;
    assert_eq!(
        f.log.outbox_backlog(),
        published_before,
        "copies of routing's events are never published again"
    );
    for t in &tickets {
        let view = f
            .client
            .get_ticket(GetTicketRequest {
                ticket_id: t.ticket_id.clone(),
            })
            .await
            .expect("get")
            .into_inner()
            .ticket
            .expect("view");
        assert_eq!(view.status(), TicketStatus::Accepted, "{}", t.ticket_id);
        assert_eq!((view.hops, view.current_line), (1, 1));
        assert_eq!(view.assignee_id, "m-77");
        assert_eq!(view.crew_id, "crew-7");
        assert_eq!(view.station_id, "ST-7");
        assert_eq!(view.policy_version, "2026.1");
        assert_eq!(view.alerts.len(), 1);
        assert!(
            view.deadlines[0].stopped_at.is_some(),
            "acceptance clock stopped"
        );
    }
    let listed = f
        .client
        .list_tickets(ListTicketsRequest {
            status: TicketStatus::Accepted as i32,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .tickets;
    assert_eq!(
        listed.len(),
        3,
        "children are listed as their incident stands"
    );

    let before = f.log.projection_digest().expect("digest");
    f.log.rebuild_projections().await.expect("rebuild");
    assert_eq!(f.log.projection_digest().expect("digest"), before);
}

#[tokio::test]
async fn a_call_after_the_fault_was_fixed_is_a_new_incident() {
    let mut f = start(IntakeConfig {
        correlation_window: Duration::from_secs(600),
        outage_threshold: 3,
    })
    .await;
    let first = f
        .client
        .report_ticket(fault("fixed-1", "601", "D-07", Channel::App))
        .await
        .expect("report")
        .into_inner();
    let joined = f
        .client
        .report_ticket(fault("fixed-2", "602", "D-07", Channel::Wechat))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(joined.disposition(), Disposition::JoinedIncident);
    // The crew restores power to the incident.
    observe_routing(
        &f.log,
        &lineguard_protos::dispatch::v1::PowerRestored {
            order_id: first.incident_id.clone(),
            crew_id: "crew-1".into(),
            on_time: true,
            ..Default::default()
        },
        &first.incident_id,
    )
    .await;
    let later = f
        .client
        .report_ticket(fault("fixed-3", "603", "D-07", Channel::App))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(later.disposition(), Disposition::NewTicket, "a new fault");
    assert!(!later.incident_id.is_empty());
    assert_ne!(later.incident_id, first.incident_id);
}

#[tokio::test]
async fn a_reopen_shows_right_whichever_of_routing_and_dispatch_is_seen_first() {
    use lineguard_protos::dispatch::v1::{OrderAcknowledged, OrderAssigned, WorkCompleted};
    use lineguard_protos::intake::v1::{GetTicketRequest, TicketStatus};
    use lineguard_protos::routing::v1::{RouteReason, TicketRouted};
    let mut f = start(IntakeConfig::default()).await;
    let first = f
        .client
        .report_ticket(fault("reopen-1", "701", "D-08", Channel::App))
        .await
        .expect("report")
        .into_inner();
    let case = first.incident_id.clone();
    let routed = |hop: u32, reason: RouteReason| TicketRouted {
        case_id: case.clone(),
        lead_ticket_id: first.ticket_id.clone(),
        incident_id: case.clone(),
        line: 1,
        hop,
        assignee_id: "m-1".into(),
        crew_id: "crew-1".into(),
        reason: reason as i32,
        field_work: true,
        ..Default::default()
    };
    let order = |hop: u32| OrderAssigned {
        order_id: case.clone(),
        crew_id: "crew-1".into(),
        hop,
        ..Default::default()
    };
    let ack = OrderAcknowledged {
        order_id: case.clone(),
        crew_id: "crew-1".into(),
        ..Default::default()
    };
    let done = WorkCompleted {
        order_id: case.clone(),
        crew_id: "crew-1".into(),
        ..Default::default()
    };
    let status = |client: &mut IntakeClient<GrpcChannel>| {
        let mut client = client.clone();
        let id = first.ticket_id.clone();
        async move {
            let view = client
                .get_ticket(GetTicketRequest { ticket_id: id })
                .await
                .expect("view")
                .into_inner()
                .ticket
                .expect("ticket");
            (view.status(), view.hops)
        }
    };
    // The first round.
    observe_routing(&f.log, &routed(1, RouteReason::DistrictOwner), &case).await;
    observe_routing(&f.log, &order(1), &case).await;
    observe_routing(&f.log, &ack, &case).await;
    observe_routing(&f.log, &done, &case).await;
    assert_eq!(status(&mut f.client).await, (TicketStatus::Completed, 1));
    // The reopen's new order is seen before routing's reopen.
    observe_routing(&f.log, &order(2), &case).await;
    assert_eq!(
        status(&mut f.client).await.0,
        TicketStatus::Routed,
        "back at work"
    );
    observe_routing(&f.log, &ack, &case).await;
    assert_eq!(status(&mut f.client).await.0, TicketStatus::Dispatched);
    observe_routing(&f.log, &routed(2, RouteReason::Reopened), &case).await;
    assert_eq!(
        status(&mut f.client).await,
        (TicketStatus::Dispatched, 2),
        "the late reopen does not set the work back"
    );
    observe_routing(&f.log, &done, &case).await;
    assert_eq!(status(&mut f.client).await, (TicketStatus::Completed, 2));
}

/// One source's events can still reach intake out of their order (a parked
/// or handed-back event applied after newer ones): an older hop's route never
/// moves the view back, and a crew's earlier step never undoes a later one.
#[tokio::test]
async fn an_older_event_seen_after_a_newer_one_does_not_move_the_view_back() {
    use lineguard_protos::dispatch::v1::{CrewArrived, OrderAcknowledged, WorkCompleted};
    use lineguard_protos::intake::v1::{GetTicketRequest, TicketStatus};
    use lineguard_protos::routing::v1::{RouteReason, TicketRouted};
    let mut f = start(IntakeConfig::default()).await;
    let first = f
        .client
        .report_ticket(fault("late-1", "801", "D-09", Channel::App))
        .await
        .expect("report")
        .into_inner();
    let case = first.incident_id.clone();
    let routed = |hop: u32, line: u32, holder: &str, reason: RouteReason| TicketRouted {
        case_id: case.clone(),
        lead_ticket_id: first.ticket_id.clone(),
        incident_id: case.clone(),
        line,
        hop,
        assignee_id: holder.into(),
        crew_id: "crew-1".into(),
        reason: reason as i32,
        field_work: true,
        ..Default::default()
    };
    let view = |client: &mut IntakeClient<GrpcChannel>| {
        let mut client = client.clone();
        let id = first.ticket_id.clone();
        async move {
            client
                .get_ticket(GetTicketRequest { ticket_id: id })
                .await
                .expect("view")
                .into_inner()
                .ticket
                .expect("ticket")
        }
    };
    // The escalation (hop 2) is seen before the first route (hop 1).
    observe_routing(
        &f.log,
        &routed(2, 2, "desk-ST-1", RouteReason::Escalated),
        &case,
    )
    .await;
    observe_routing(
        &f.log,
        &routed(1, 1, "m-1", RouteReason::DistrictOwner),
        &case,
    )
    .await;
    let shown = view(&mut f.client).await;
    assert_eq!(
        (shown.hops, shown.current_line, shown.assignee_id.as_str()),
        (2, 2, "desk-ST-1"),
        "the older hop does not move the view back"
    );
    assert_eq!(shown.status(), TicketStatus::Routed);
    // The crew's completion is seen before its arrival and acknowledgement.
    let done = WorkCompleted {
        order_id: case.clone(),
        crew_id: "crew-1".into(),
        ..Default::default()
    };
    let arrived = CrewArrived {
        order_id: case.clone(),
        crew_id: "crew-1".into(),
        ..Default::default()
    };
    let ack = OrderAcknowledged {
        order_id: case.clone(),
        crew_id: "crew-1".into(),
        ..Default::default()
    };
    observe_routing(&f.log, &done, &case).await;
    observe_routing(&f.log, &arrived, &case).await;
    observe_routing(&f.log, &ack, &case).await;
    assert_eq!(view(&mut f.client).await.status(), TicketStatus::Completed);
    // And a route of the hop already shown, seen again late, leaves the
    // completed work alone.
    observe_routing(
        &f.log,
        &routed(2, 2, "desk-ST-1", RouteReason::Escalated),
        &case,
    )
    .await;
    let shown = view(&mut f.client).await;
    assert_eq!((shown.status(), shown.hops), (TicketStatus::Completed, 2));
    // Rebuilt from the log in its order, the view is the same.
    let before = f.log.projection_digest().expect("digest");
    f.log.rebuild_projections().await.expect("rebuild");
    assert_eq!(f.log.projection_digest().expect("digest"), before);
}

/// A list that reads for a long time never holds the runtime: on a runtime
/// of a single thread, a `GetTicket` sent while a `ListTickets` scans
/// 20,000 tickets is answered before the list is (the scan runs on the
/// blocking pool, not on the thread that serves calls).
#[tokio::test(flavor = "current_thread")]
async fn a_long_list_does_not_stall_other_calls() {
    use lineguard_eventlog::{ActorKind, ExpectedVersion, NewEvent, Transaction, actor};
    use lineguard_protos::intake::v1::TicketReported;
    let f = start(IntakeConfig::default()).await;
    // 20,000 tickets written straight to the log, 16 a commit (a stream
    // each), many commits at once.
    let mut writers = Vec::new();
    for w in 0..25 {
        let log = f.log.clone();
        writers.push(tokio::spawn(async move {
            for c in 0..50 {
                let mut txn = Transaction::default();
                for k in 0..16 {
                    let id = format!("ticket-{w:02}-{c:02}-{k:02}");
                    let reported = TicketReported {
                        ticket_id: id.clone(),
                        channel: Channel::App as i32,
                        kind: TicketKind::Inquiry as i32,
                        district_id: "D-1".into(),
                        reported_at: Some(prost_types::Timestamp {
                            seconds: 1_800_000_000,
                            nanos: 0,
                        }),
                        ..TicketReported::default()
                    };
                    txn = txn.and_append(
                        &id,
                        ExpectedVersion::NoStream,
                        vec![NewEvent::new(&reported, &id, actor(ActorKind::System, "t"))],
                    );
                }
                log.commit(txn).await.expect("commit");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let started = std::time::Instant::now();
    let mut lister = f.client.clone();
    let list = tokio::spawn(async move {
        lister
            .list_tickets(ListTicketsRequest {
                district_id: "nowhere".into(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .expect("list");
        started.elapsed()
    });
    // Let the list reach the server first.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut getter = f.client.clone();
    getter
        .get_ticket(GetTicketRequest {
            ticket_id: "ticket-00-00-00".into(),
        })
        .await
        .expect("get");
    let got = started.elapsed();
    let listed = list.await.expect("list task");
    assert!(
        listed > Duration::from_millis(50),
        "the list must take a while for this test to mean anything: {listed:?}"
    );
    assert!(
        got < listed,
        "the get ({got:?}) waited for the list ({listed:?})"
    );
}

/// Sends raw bytes as the body of a unary call and reads nothing back.
#[derive(Clone, Default)]
struct RawBytes;

#[derive(Clone, Default)]
struct RawEncoder;

#[derive(Clone, Default)]
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// A body that is not a protobuf message of the RPC's type is the caller's
/// error, named as such, on every unary RPC; nothing is written and the
/// service keeps serving.
#[tokio::test]
async fn a_body_that_does_not_decode_is_invalid_argument() {
    let f = start(IntakeConfig::default()).await;
    let head = f.log.head();
    // Field 1 as a varint of 11 bytes, a truncated length-delimited field,
    // and a field number 0: none is a message.
    let garbage: [&[u8]; 3] = [
        &[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
        &[0x0a, 0x40, b'x'],
        &[0x00, 0x01],
    ];
    for path in [
        "/lineguard.intake.v1.Intake/ReportTicket",
        "/lineguard.intake.v1.Intake/GetTicket",
        "/lineguard.intake.v1.Intake/ListTickets",
        "/lineguard.intake.v1.Intake/CancelTicket",
    ] {
        for body in garbage {
            let mut grpc = tonic::client::Grpc::new(f.channel.clone());
            grpc.ready().await.expect("ready");
            let status = grpc
                .unary(
                    tonic::Request::new(body.to_vec()),
                    path.parse().expect("path"),
                    RawBytes,
                )
                .await
                .expect_err("garbage refused");
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{path}: {status:?}"
            );
            assert!(
                status.message().contains("not a valid"),
                "{path}: {}",
                status.message()
            );
        }
    }
    assert_eq!(f.log.head(), head, "nothing written");
    f.client
        .clone()
        .list_tickets(ListTicketsRequest::default())
        .await
        .expect("still serving");
}

/// The caller's name, phone, address and description are sealed with the
/// customer's key before they reach the log; the view opens them; erasing
/// the customer leaves them unreadable for good, the ticket intact.
#[tokio::test]
async fn a_report_is_sealed_in_the_log_opened_in_the_view_and_erasable() {
    use lineguard_protos::intake::v1::{EraseCustomerRequest, UnsealContactsRequest};
    let mut f = start(IntakeConfig::default()).await;
    let answer = f
        .client
        .report_ticket(fault("seal-1", "1001", "D-01", Channel::App))
        .await
        .expect("report")
        .into_inner();
    let events = f.log.read_all(1, 100).expect("read");
    for e in events.iter() {
        for plain in [
            &b"13800138000"[..],
            b"Li Wei",
            b"3 Willow Lane",
            b"whole building",
        ] {
            assert!(
                !e.payload.windows(plain.len()).any(|w| w == plain),
                "{} holds customer data in plain text",
                e.event_type
            );
        }
    }
    let reported: TicketReported = events
        .iter()
        .find_map(|e| {
            decode_payload(e)
                .ok()
                .filter(|_| e.event_type.ends_with("TicketReported"))
        })
        .expect("the report");
    assert!(reported.caller.is_none() && reported.address.is_empty());
    let sealed = reported.contact.clone().expect("a sealed contact");
    assert_eq!(sealed.customer_key, "acct-1001");

    let view = |f: &mut Fixture| {
        let mut client = f.client.clone();
        let id = answer.ticket_id.clone();
        async move {
            client
                .get_ticket(GetTicketRequest { ticket_id: id })
                .await
                .expect("get")
                .into_inner()
                .ticket
                .expect("view")
        }
    };
    let opened = view(&mut f).await;
    assert_eq!(
        opened.caller.as_ref().map(|c| c.phone.as_str()),
        Some("13800138000")
    );
    assert_eq!(opened.address, "3 Willow Lane");
    assert!(!opened.customer_data_erased && opened.sealed_contact.is_none());

    // An erasure needs a customer and a reason, and names what is missing.
    let refused = f
        .client
        .erase_customer(EraseCustomerRequest {
            reason: "asked".into(),
            ..EraseCustomerRequest::default()
        })
        .await
        .expect_err("no customer");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("account_number"), "{refused:?}");

    let erased = f
        .client
        .erase_customer(EraseCustomerRequest {
            account_number: "1001".into(),
            phone: String::new(),
            reason: "the customer asked".into(),
        })
        .await
        .expect("erase")
        .into_inner();
    assert_eq!(erased.erased_customer_keys, vec!["acct-1001".to_string()]);
    assert_eq!(erased.tickets, 1);
    let after = view(&mut f).await;
    assert!(after.customer_data_erased);
    assert!(after.caller.is_none() && after.address.is_empty() && after.description.is_empty());
    assert_eq!(after.status, opened.status, "the ticket itself stays");
    let unsealed = f
        .client
        .unseal_contacts(UnsealContactsRequest {
            contacts: vec![sealed],
        })
        .await
        .expect("unseal")
        .into_inner();
    assert!(unsealed.contacts[0].erased && unsealed.contacts[0].contact.is_none());
    // The views are the log's: a rebuild gives the same erased view.
    f.log.rebuild_projections().await.expect("rebuild");
    let rebuilt = view(&mut f).await;
    assert!(rebuilt.customer_data_erased && rebuilt.caller.is_none());
    assert_eq!(rebuilt.status, after.status);
}
