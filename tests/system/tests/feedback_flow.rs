//! All four services as processes over a real nats-server: a completed
//! repair falls due for a follow-up; the dissatisfied customer reopens it;
//! routing sends it back to the district's manager as hop 2, dispatch gives
//! the crew a new order, intake shows it back at work; the second follow-up
//! goes overdue, then is made; the manager's scorecard counts the reopen.
//! A crew's return (退单) closes its ticket in routing.

mod common;

use common::*;
use lineguard_protos::dispatch::v1::dispatch_client::DispatchClient;
use lineguard_protos::dispatch::v1::{
    AcknowledgeRequest, ArriveRequest, CompleteRequest, GetWorkOrderRequest, OrderStatus,
    RestoreRequest, ReturnOrderRequest,
};
use lineguard_protos::feedback::v1::{
    FollowUpStatus, FollowUpView, GetScorecardRequest, Level, ListDueFollowUpsRequest, Period,
    RecordFollowUpRequest, Subject,
};
use lineguard_protos::intake::v1::{Channel, TicketKind, TicketStatus};
use lineguard_protos::routing::v1::{RouteReason, RouteStatus};
use prost_types::Timestamp;
use tonic::transport::Channel as GrpcChannel;

const MANAGER: &str = "m-chengguan-01";

/// The crew goes, restores and completes the order, with `round` in its action ids.
async fn crew_does_the_work(dispatch: &mut DispatchClient<GrpcChannel>, order: &str, round: u32) {
    dispatch
        .acknowledge(AcknowledgeRequest {
            header: header(order, &format!("ack-{round}")),
        })
        .await
        .expect("acknowledge");
    dispatch
        .arrive(ArriveRequest {
            header: header(order, &format!("arrive-{round}")),
            position: None,
        })
        .await
        .expect("arrive");
    dispatch
        .restore(RestoreRequest {
            header: header(order, &format!("restore-{round}")),
        })
        .await
        .expect("restore");
    dispatch
        .complete(CompleteRequest {
            header: header(order, &format!("complete-{round}")),
            cause: "blown fuse".into(),
            result: "replaced".into(),
            ..CompleteRequest::default()
        })
        .await
        .expect("complete");
}

async fn follow_up_of(backend: &Backend, ticket: &str, overdue_only: bool) -> Option<FollowUpView> {
    backend
        .feedback()
        .await
        .list_due_follow_ups(ListDueFollowUpsRequest {
            station_id: "st-chengguan".into(),
            overdue_only,
            page_size: 1_000,
            ..ListDueFollowUpsRequest::default()
        })
        .await
        .ok()?
        .into_inner()
        .follow_ups
        .into_iter()
        .find(|f| f.ticket_id == ticket)
}

async fn order_for_crew(dispatch: &DispatchClient<GrpcChannel>, order: &str, hop: u32) {
    eventually("dispatch to give the crew the order", || {
        let mut dispatch = dispatch.clone();
        async move {
            dispatch
                .get_work_order(GetWorkOrderRequest {
                    order_id: order.into(),
                })
                .await
                .ok()
                .map(|r| r.into_inner())
                .filter(|o| {
                    o.status() == OrderStatus::Assigned && o.hop == hop && o.crew_id == CREW
                })
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dissatisfied_customer_reopens_through_routing_and_the_scorecard_counts_it() {
    let backend = Backend::start_all(&[
        "--follow-up-within".into(),
        "3s".into(),
        "--timer-tick".into(),
        "100ms".into(),
    ])
    .await;
    let started = Timestamp::from(std::time::SystemTime::now());
    let mut intake = backend.intake().await;
    let mut dispatch = backend.dispatch().await;
    let account = accounts_in("d-chengguan-01", 1).remove(0);
    let reported = intake
        .report_ticket(report(
            "fb-1",
            Channel::App,
            TicketKind::FaultRepair,
            &account,
        ))
        .await
        .expect("report")
        .into_inner();
    // A fault report leads an incident of its own: the case routing routes
    // and dispatch's order.
    let ticket = reported.ticket_id;
    let case = reported.incident_id;
    assert!(!case.is_empty());
    let first = eventually("the first route", || async {
        backend.route(&case).await.filter(|r| r.hop == 1)
    })
    .await;
    assert_eq!(first.assignee_id, MANAGER);
    assert_eq!(first.crew_id, CREW);
    order_for_crew(&dispatch, &case, 1).await;
    crew_does_the_work(&mut dispatch, &case, 1).await;

    // The completion makes a follow-up due in feedback.
    let due = eventually("a follow-up due", || follow_up_of(&backend, &ticket, false)).await;
    assert_eq!(due.resolution, "completed");
    assert_eq!(due.case_id, case);
    let answer = backend
        .feedback()
        .await
        .record_follow_up(RecordFollowUpRequest {
            ticket_id: ticket.clone(),
            satisfied: false,
            score: 1,
            comment: "still flickering".into(),
            recorded_by: "agent-1".into(),
            reopen: true,
            idempotency_key: "fu-1".into(),
        })
        .await
        .expect("follow-up")
        .into_inner();
    assert!(answer.reopened);

    // Back through routing to the owner, as hop 2; the crew gets it again.
    let reopened = eventually("routing to reopen", || async {
        backend.route(&case).await.filter(|r| r.hop == 2)
    })
    .await;
    assert_eq!(reopened.status(), RouteStatus::Routed);
    assert_eq!(reopened.assignee_id, MANAGER);
    let last = reopened.hops.last().expect("hops");
    assert_eq!(last.reason(), RouteReason::Reopened);
    assert_eq!(reopened.hops.len(), 2);
    order_for_crew(&dispatch, &case, 2).await;
    eventually("intake to show the ticket back at work", || async {
        let view = backend.ticket(&ticket).await;
        (view.status() == TicketStatus::Dispatched || view.status() == TicketStatus::Routed)
            .then_some(())
            .filter(|_| view.hops == 2)
    })
    .await;

    // The second visit; its follow-up is not made within 3 s: overdue.
    crew_does_the_work(&mut dispatch, &case, 2).await;
    let overdue = eventually("the second follow-up overdue", || {
        follow_up_of(&backend, &ticket, true)
    })
    .await;
    assert_eq!(overdue.status(), FollowUpStatus::Overdue);
    backend
        .feedback()
        .await
        .record_follow_up(RecordFollowUpRequest {
            ticket_id: ticket.clone(),
            satisfied: true,
            score: 5,
            recorded_by: "agent-1".into(),
            idempotency_key: "fu-2".into(),
            ..RecordFollowUpRequest::default()
        })
        .await
        .expect("second follow-up");

    // A crew's return closes the other ticket in routing.
    let other_account = accounts_in("d-chengguan-02", 1).remove(0);
    let other = intake
        .report_ticket(report(
            "fb-2",
            Channel::Hotline95598,
            TicketKind::FaultRepair,
            &other_account,
        ))
        .await
        .expect("report")
        .into_inner()
        .incident_id;
    order_for_crew(&dispatch, &other, 1).await;
    dispatch
        .return_order(ReturnOrderRequest {
            header: header(&other, "return-1"),
            reason: "customer_side_fault".into(),
            note: "the fault is in the house wiring".into(),
            ..ReturnOrderRequest::default()
        })
        .await
        .expect("return");
    let closed = eventually("routing to close the returned ticket", || async {
        backend
            .route(&other)
            .await
            .filter(|r| r.status() == RouteStatus::Closed)
    })
    .await;
    assert!(
        closed.closed_reason.contains("customer-side"),
        "{}",
        closed.closed_reason
    );

    // The manager's scorecard: two tickets, one fixed only at the second
    // visit (reopened), one returned: no first-time fix among the resolved.
    let subject = Subject {
        level: Level::Manager as i32,
        id: MANAGER.into(),
    };
    let period = Period {
        from: Some(started),
        to: Some(Timestamp {
            seconds: started.seconds + 3_600,
            nanos: 0,
        }),
    };
    let card = eventually("the scorecard to count both tickets", || {
        let subject = subject.clone();
        async {
            let card = backend
                .feedback()
                .await
                .get_scorecard(GetScorecardRequest {
                    subject: Some(subject),
                    period: Some(period),
                })
                .await
                .ok()?
                .into_inner();
            let fu = card.follow_up_satisfaction.unwrap_or_default();
            (card.tickets_handled == 2 && fu.total == 2).then_some(card)
        }
    })
    .await;
    let rate = |r: &Option<lineguard_protos::feedback::v1::Rate>| {
        let r = r.unwrap_or_default();
        (r.met, r.total)
    };
    assert_eq!(card.cases, 2);
    assert_eq!(rate(&card.follow_up_satisfaction), (1, 2));
    assert_eq!(rate(&card.first_time_fix), (0, 1), "the reopened ticket");
    // The returned ticket was never accepted (nor breached): not judged.
    assert_eq!(rate(&card.on_time_acceptance), (1, 1));
    assert_eq!(rate(&card.on_time_arrival), (1, 1));
    assert!(
        (card.average_hops - 1.5).abs() < 1e-9,
        "{}",
        card.average_hops
    );
    assert_eq!(card.p90_hops, 2);
}
