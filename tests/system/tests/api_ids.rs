//! The ids a caller is given work everywhere: a fault report opens an
//! incident even with one caller, and its ticket id, the incident id and a
//! later caller's ticket id each name the same case in routing, dispatch and
//! intake; an id that names nothing says what it is.

mod common;

use common::*;
use lineguard_protos::dispatch::v1::{AddNoteRequest, GetWorkOrderRequest};
use lineguard_protos::feedback::v1::RecordFollowUpRequest;
use lineguard_protos::intake::v1::{
    CancelTicketRequest, Channel, Disposition, GetTicketRequest, ReportTicketRequest, TicketKind,
};
use lineguard_protos::routing::v1::{AcceptTicketRequest, GetRouteRequest, RouteStatus};
use tonic::Code;

/// A caller's name no log line would hold by chance.
const CALLER: &str = "Zhang Sanfeng";

fn named(mut request: ReportTicketRequest) -> ReportTicketRequest {
    if let Some(caller) = request.caller.as_mut() {
        caller.name = CALLER.into();
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_id_and_its_incident_id_name_one_case_in_every_service() {
    let backend = Backend::start_all(&[]).await;
    backend.wait_for_directory_copy().await;
    let mut intake = backend.intake().await;
    let accounts = accounts_in("d-chengguan-02", 2);

    // One caller: an incident of one, led by this ticket.
    let lead = intake
        .report_ticket(named(report(
            "ids-1",
            Channel::Hotline95598,
            TicketKind::FaultRepair,
            &accounts[0],
        )))
        .await
        .expect("report")
        .into_inner();
    assert!(
        !lead.incident_id.is_empty(),
        "a fault report opens an incident"
    );
    let incident = lead.incident_id.clone();
    let second = intake
        .report_ticket(named(report(
            "ids-2",
            Channel::App,
            TicketKind::FaultRepair,
            &accounts[1],
        )))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(second.disposition(), Disposition::JoinedIncident);
    assert_eq!(second.incident_id, incident);

    // Routing: the lead's ticket id, the incident id and the second caller's
    // ticket id give one route, which says which case it is.
    let by_incident =
        eventually("routing to route the incident", || backend.route(&incident)).await;
    assert_eq!(by_incident.case_id, incident);
    for id in [&lead.ticket_id, &second.ticket_id] {
        let route = eventually("the ticket's route", || backend.route(id)).await;
        assert_eq!(route.case_id, incident, "{id} resolves to its incident");
    }
    let mut routing = backend.routing().await;
    let accepted = routing
        .accept_ticket(AcceptTicketRequest {
            ticket_id: lead.ticket_id.clone(),
            assignee_id: by_incident.assignee_id.clone(),
            idempotency_key: "accept-by-ticket".into(),
        })
        .await
        .expect("accept with the lead's ticket id")
        .into_inner();
    assert_eq!(accepted.case_id, incident);
    assert_eq!(accepted.status(), RouteStatus::Accepted);

    // An id routing never heard of says so; it is not "no route".
    let unknown = routing
        .get_route(GetRouteRequest {
            ticket_id: "ticket-never-reported".into(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown
            .message()
            .contains("not a ticket or incident routing knows"),
        "{unknown:?}"
    );

    // Intake: the incident id answers with its lead ticket and the case.
    let by_incident = intake
        .get_ticket(GetTicketRequest {
            ticket_id: incident.clone(),
        })
        .await
        .expect("get by incident id")
        .into_inner();
    assert_eq!(by_incident.case_id, incident);
    assert_eq!(
        by_incident.ticket.as_ref().map(|t| t.ticket_id.as_str()),
        Some(lead.ticket_id.as_str())
    );
    assert_eq!(
        by_incident.incident.as_ref().map(|i| i.ticket_count),
        Some(2)
    );
    let by_child = intake
        .get_ticket(GetTicketRequest {
            ticket_id: second.ticket_id.clone(),
        })
        .await
        .expect("get by the second caller's ticket id")
        .into_inner();
    assert_eq!(by_child.case_id, incident);
    // Cancelling acts for one customer: an incident id is refused, naming
    // the ticket to use.
    let refused = intake
        .cancel_ticket(CancelTicketRequest {
            ticket_id: incident.clone(),
            reason: "power is back".into(),
            idempotency_key: "cancel-incident".into(),
        })
        .await
        .expect_err("an incident is not one customer's");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains(&lead.ticket_id), "{refused:?}");

    // Dispatch: the crew's order answers to every id of the case.
    let mut dispatch = backend.dispatch().await;
    backend.watch_crew(CREW).await;
    for id in [&incident, &lead.ticket_id, &second.ticket_id] {
        let order = eventually("the work order", || {
            let mut dispatch = dispatch.clone();
            async move {
                dispatch
                    .get_work_order(GetWorkOrderRequest {
                        order_id: id.clone(),
                    })
                    .await
                    .ok()
            }
        })
        .await
        .into_inner();
        assert_eq!(order.order_id, incident, "{id} resolves to the order");
    }
    let noted = dispatch
        .add_note(AddNoteRequest {
            header: header(&second.ticket_id, "note-by-ticket"),
            text: "ladder needed".into(),
        })
        .await
        .expect("a crew action with a caller's ticket id")
        .into_inner();
    assert_eq!(noted.order_id, incident);
    let missing = dispatch
        .get_work_order(GetWorkOrderRequest {
            order_id: "ticket-never-reported".into(),
        })
        .await
        .expect_err("unknown order");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(
        missing
            .message()
            .contains("not a ticket or incident dispatch knows"),
        "{missing:?}"
    );

    // A desk ticket has no order: dispatch knows the ticket and says so.
    let complaint = intake
        .report_ticket(report(
            "ids-3",
            Channel::Web,
            TicketKind::Complaint,
            &accounts[0],
        ))
        .await
        .expect("report")
        .into_inner();
    let no_order = eventually("dispatch to note the complaint", || {
        let mut dispatch = dispatch.clone();
        let id = complaint.ticket_id.clone();
        async move {
            let status = dispatch
                .get_work_order(GetWorkOrderRequest { order_id: id })
                .await
                .expect_err("no order for desk work");
            status
                .message()
                .contains("is a ticket with no work order")
                .then_some(status)
        }
    })
    .await;
    assert_eq!(no_order.code(), Code::NotFound);

    // Feedback: a follow-up is one customer's, so an incident id is refused
    // with its lead ticket named.
    let feedback = backend.feedback().await;
    let refused = eventually("feedback to know the incident", || {
        let mut feedback = feedback.clone();
        let incident = incident.clone();
        async move {
            let status = feedback
                .record_follow_up(RecordFollowUpRequest {
                    ticket_id: incident,
                    satisfied: true,
                    score: 5,
                    recorded_by: "staff-1".into(),
                    idempotency_key: "follow-up-incident".into(),
                    ..RecordFollowUpRequest::default()
                })
                .await
                .expect_err("not one customer's");
            (status.code() == Code::FailedPrecondition).then_some(status)
        }
    })
    .await;
    assert!(refused.message().contains(&lead.ticket_id), "{refused:?}");
    let unknown = feedback
        .clone()
        .record_follow_up(RecordFollowUpRequest {
            ticket_id: "ticket-never-reported".into(),
            satisfied: true,
            score: 5,
            recorded_by: "staff-1".into(),
            idempotency_key: "follow-up-unknown".into(),
            ..RecordFollowUpRequest::default()
        })
        .await
        .expect_err("unknown ticket");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("not a ticket or incident"));

    // No process logged the customers' data, the order's new fields included.
    let processes = [
        ("intake", &backend.intake),
        ("routing", &backend.routing),
        ("dispatch", backend.dispatch.as_ref().expect("dispatch")),
        ("feedback", backend.feedback.as_ref().expect("feedback")),
    ];
    for (name, process) in processes {
        let log = process.log();
        assert!(log.len() > 1_000, "{name} logged its work");
        assert!(
            !log.contains('\u{1b}'),
            "{name}'s log, written to a file, holds terminal colour codes"
        );
        for data in [
            CALLER,
            "13800138000",
            "No. 8 Riverside Road",
            "No power in the whole building",
        ] {
            assert!(!log.contains(data), "{name} logged customer data: {data}");
        }
    }
}
