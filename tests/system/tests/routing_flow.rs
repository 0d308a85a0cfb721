//! Intake and routing as separate processes over a real nats-server: the
//! same outage through five doors is one incident routed once in one hop;
//! a manager on leave sends tickets to the station desk; no acceptance
//! climbs to the station and the company at the policy's times, and an
//! escalation fires exactly once though routing is killed inside the window.

mod common;

use std::time::Duration;

use common::*;
use lineguard_protos::intake::v1::{Channel, Disposition, TicketKind, TicketStatus};
use lineguard_protos::routing::v1::{
    AcceptTicketRequest, Availability, RouteReason, RouteView, SetAvailabilityRequest,
};
use prost_types::Timestamp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outage_through_five_doors_is_one_incident_routed_once_in_one_hop() {
    let backend = Backend::start().await;
    let mut intake = backend.intake().await;
    let accounts = accounts_in("d-chengguan-06", 6);
    let doors = [
        Channel::Hotline95598,
        Channel::StationPhone,
        Channel::ManagerPhone,
        Channel::App,
        Channel::Wechat,
    ];
    let mut tickets = Vec::new();
    let mut incident = String::new();
    for (i, door) in doors.iter().enumerate() {
        let answer = intake
            .report_ticket(report(
                &format!("door-{i}"),
                *door,
                TicketKind::FaultRepair,
                &accounts[i],
            ))
            .await
            .expect("report")
            .into_inner();
        if i == 0 {
            assert_eq!(answer.disposition(), Disposition::NewTicket);
            incident = answer.incident_id.clone();
        } else {
            assert_eq!(
                answer.disposition(),
                Disposition::JoinedIncident,
                "door {door:?}"
            );
            assert_eq!(answer.incident_id, incident);
        }
        tickets.push(answer.ticket_id);
    }
    assert!(incident.starts_with("incident-"));

    // One route, to the district's manager, hop 1.
    let route = eventually("the incident's route", || backend.route(&incident)).await;
    assert_eq!((route.line, route.hop), (1, 1));
    assert_eq!(route.assignee_id, "m-chengguan-03");
    assert_eq!(route.hops[0].reason(), RouteReason::DistrictOwner);
    backend
        .routing()
        .await
        .accept_ticket(AcceptTicketRequest {
            ticket_id: tickets[2].clone(),
            assignee_id: route.assignee_id.clone(),
            idempotency_key: "accept-1".into(),
        })
        .await
        .expect("accepted through a child's ticket id");
    let routed = backend
        .routing_events(&incident)
        .await
        .into_iter()
        .filter(|(t, _)| t == "TicketRouted")
        .count();
    assert_eq!(routed, 1, "routed once for all five callers");

    // Every ticket shows hops = 1 and the manager, whatever its door.
    for id in &tickets {
        let view = eventually("the ticket accepted on intake's view", || async {
            let view = backend.ticket(id).await;
            (view.status() == TicketStatus::Accepted).then_some(view)
        })
        .await;
        assert_eq!(view.hops, 1, "{id}");
        assert_eq!(view.current_line, 1);
        assert_eq!(view.assignee_id, "m-chengguan-03");
        assert_eq!(view.district_id, "d-chengguan-06");
        assert_eq!(view.station_id, "st-chengguan");
        assert_eq!(view.incident_id, incident);
        assert_eq!(view.policy_version, "test.1");
    }

    // The first caller rings again: an urge on the open ticket.
    let urged = intake
        .report_ticket(report(
            "door-0-again",
            Channel::Hotline95598,
            TicketKind::FaultRepair,
            &accounts[0],
        ))
        .await
        .expect("urge")
        .into_inner();
    assert_eq!(urged.disposition(), Disposition::UrgedOpenTicket);
    assert_eq!(urged.ticket_id, tickets[0]);
    assert_eq!(urged.urge_count, 1);
    assert_eq!(backend.ticket(&tickets[0]).await.urge_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_on_leave_sends_the_ticket_to_the_station_desk_in_one_hop() {
    let backend = Backend::start().await;
    let until = Timestamp {
        seconds: seconds(&Some(Timestamp::from(std::time::SystemTime::now()))) as i64 + 86_400,
        nanos: 0,
    };
    backend
        .routing()
        .await
        .set_availability(SetAvailabilityRequest {
            assignee_id: "m-dongpo-01".into(),
            availability: Availability::OnLeave as i32,
            leave_from: None,
            leave_until: Some(until),
            note: "leave".into(),
        })
        .await
        .expect("leave");
    let account = &accounts_in("d-dongpo-01", 1)[0];
    let ticket = backend
        .intake()
        .await
        .report_ticket(report(
            "leave-1",
            Channel::App,
            TicketKind::Complaint,
            account,
        ))
        .await
        .expect("report")
        .into_inner()
        .ticket_id;
    let route = eventually("the route", || backend.route(&ticket)).await;
    assert_eq!((route.line, route.hop), (2, 1));
    assert_eq!(route.assignee_id, "desk-st-dongpo");
    assert_eq!(route.hops[0].reason(), RouteReason::OwnerUnavailable);
    assert!(
        route.hops[0].reason_detail.contains("on leave"),
        "{}",
        route.hops[0].reason_detail
    );
    let view = eventually("intake's view routed", || async {
        let view = backend.ticket(&ticket).await;
        (view.status() == TicketStatus::Routed).then_some(view)
    })
    .await;
    assert_eq!((view.hops, view.current_line), (1, 2));
    assert_eq!(view.assignee_id, "desk-st-dongpo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaccepted_it_climbs_at_the_policys_times_and_a_kill_inside_the_window_fires_once() {
    let mut backend = Backend::start().await;
    let account = &accounts_in("d-xihe-06", 1)[0];
    let ticket = backend
        .intake()
        .await
        .report_ticket(report(
            "climb-1",
            Channel::Web,
            TicketKind::FaultRepair,
            account,
        ))
        .await
        .expect("report")
        .into_inner();
    let case = ticket.incident_id.clone();
    let first = eventually("the first route", || backend.route(&case)).await;
    assert_eq!((first.line, first.assignee_id.as_str()), (1, "m-xihe-03"));

    // Killed and restarted inside the acceptance window.
    backend.routing.kill9().expect("kill routing");
    backend.routing.restart().expect("restart routing");
    backend
        .routing
        .wait_healthy(Duration::from_secs(30))
        .await
        .expect("routing back");
    let routed_at = |r: &RouteView, hop: usize| seconds(&r.hops[hop].routed_at);
    let second = eventually("the escalation to the station", || async {
        backend.route(&case).await.filter(|r| r.hop >= 2)
    })
    .await;
    assert_eq!(
        (second.line, second.assignee_id.as_str()),
        (2, "desk-st-xihe")
    );
    assert_eq!(second.hops[1].reason(), RouteReason::Escalated);
    let window = WINDOW.as_secs_f64();
    let waited = routed_at(&second, 1) - routed_at(&second, 0);
    assert!(
        (window..window + 2.0).contains(&waited),
        "escalated {waited:.2}s after the route, the window is {window}s"
    );

    let third = eventually("the escalation to the company", || async {
        backend.route(&case).await.filter(|r| r.hop >= 3)
    })
    .await;
    assert_eq!(
        (third.line, third.assignee_id.as_str()),
        (3, "desk-co-lixian")
    );
    let waited = routed_at(&third, 2) - routed_at(&third, 1);
    assert!(
        (window..window + 2.0).contains(&waited),
        "escalated {waited:.2}s after the station got it"
    );

    // Exactly once each: hops 1, 2, 3 and nothing more after the company's window.
    tokio::time::sleep(WINDOW + Duration::from_secs(1)).await;
    let events = backend.routing_events(&case).await;
    let routed = events.iter().filter(|(t, _)| t == "TicketRouted").count();
    let breached = events.iter().filter(|(t, _)| t == "ClockBreached").count();
    assert_eq!(routed, 3, "{events:?}");
    assert_eq!(
        breached, 3,
        "one per line, the company's without a fourth hop"
    );
    let view = eventually("intake's view at the company", || async {
        let view = backend.ticket(&ticket.ticket_id).await;
        (view.hops == 3).then_some(view)
    })
    .await;
    assert_eq!(view.current_line, 3);
    assert_eq!(view.assignee_id, "desk-co-lixian");
    assert!(
        view.alerts
            .iter()
            .any(|a| a.breached && a.clock == "acceptance")
    );
}
