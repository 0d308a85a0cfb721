//! Intake, routing and dispatch as separate processes over a real
//! nats-server: a crew's phone gets its order, acknowledging it accepts the
//! ticket, a crew offline while dispatch is killed gets exactly what it
//! missed, completing an incident completes every caller's ticket, and the
//! crew's events are also on `lineguard.crew.<crew id>.…` for gateways.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use common::*;
use futures::StreamExt;
use lineguard_protos::dispatch::v1::{
    AcknowledgeRequest, ArriveRequest, CompleteRequest, CrewEvent, OrderAssigned, RestoreRequest,
    WatchDispatchesRequest, crew_event,
};
use lineguard_protos::intake::v1::{Channel, TicketKind, TicketStatus};
use lineguard_protos::routing::v1::RouteStatus;
use prost::Message;

async fn next_event(stream: &mut tonic::Streaming<CrewEvent>) -> CrewEvent {
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("a crew event in time")
        .expect("stream open")
        .expect("event")
}

fn short(e: &CrewEvent) -> String {
    let t = &e.event.as_ref().expect("event").event_type;
    t.rsplit('.').next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crew_gets_every_order_across_a_dispatch_crash_and_completes_an_incident() {
    let mut backend = Backend::start_with(false, true).await;
    let mut dispatch = backend.dispatch().await;
    // The crew is known once dispatch has heard routing's directory.
    let mut watch = backend.watch_crew(CREW).await;

    // One outage, three doors: one incident, one order for the district's crew.
    let mut intake = backend.intake().await;
    let accounts = accounts_in("d-chengguan-02", 3);
    let mut tickets = Vec::new();
    for (i, door) in [Channel::Hotline95598, Channel::App, Channel::Wechat]
        .iter()
        .enumerate()
    {
        let answer = intake
            .report_ticket(report(
                &format!("storm-{i}"),
                *door,
                TicketKind::FaultRepair,
                &accounts[i],
            ))
            .await
            .expect("report")
            .into_inner();
        tickets.push(answer);
    }
    let incident = tickets[0].incident_id.clone();
    let first = next_event(&mut watch).await;
    assert_eq!(first.sequence, 1);
    let assigned = OrderAssigned::decode(first.event.as_ref().expect("event").payload.as_ref())
        .expect("an order first");
    assert_eq!(assigned.order_id, incident);
    // The same event, typed: a phone reads `body`, no descriptors needed;
    // the order says where the fault is and how to call the customer back,
    // opened by intake for the crew. As recorded, the contact is sealed.
    let Some(crew_event::Body::OrderAssigned(typed)) = &first.body else {
        panic!("a typed OrderAssigned, got {:?}", first.body);
    };
    assert_eq!(typed.order_id, assigned.order_id);
    assert_eq!(typed.tickets.len(), assigned.tickets.len());
    let recorded = &assigned.tickets[0];
    assert!(
        recorded.address.is_empty() && recorded.callback_phone.is_empty(),
        "dispatch records no contact in plain text: {recorded:?}"
    );
    assert!(recorded.contact.is_some(), "it records the sealed contact");
    let caller = &typed.tickets[0];
    assert!(
        caller.contact.is_none(),
        "the crew gets it opened, not sealed"
    );
    assert_eq!(caller.ticket_id, tickets[0].ticket_id);
    assert_eq!(caller.address, "No. 8 Riverside Road");
    assert_eq!(caller.description, "No power in the whole building");
    assert_eq!(caller.callback_phone, "13800138000");
    assert_eq!(caller.caller_name, "Customer");
    // Callers dispatch heard of after the order reach the crew as IncidentGrew.
    let mut covered = assigned.tickets.len();
    let mut last_sequence = first.sequence;
    while covered < 3 {
        let e = next_event(&mut watch).await;
        assert_eq!(e.sequence, last_sequence + 1, "no gap");
        last_sequence = e.sequence;
        let Some(crew_event::Body::IncidentGrew(grew)) = e.body else {
            panic!("the incident grew, typed: {:?}", e.body);
        };
        covered = grew.ticket_count as usize;
    }

    // Acknowledging is accepting: routing's clock stops, intake shows it.
    dispatch
        .acknowledge(AcknowledgeRequest {
            header: header(&incident, "ack-1"),
        })
        .await
        .expect("acknowledge");
    eventually("routing to record the acceptance", || async {
        backend
            .route(&incident)
            .await
            .filter(|r| r.status() == RouteStatus::Accepted)
    })
    .await;
    eventually("intake to show the crew on its way", || async {
        let view = backend.ticket(&tickets[0].ticket_id).await;
        (view.status() == TicketStatus::Dispatched).then_some(())
    })
    .await;

    // The phone drops off; dispatch is killed; two more outages come in.
    drop(watch);
    let seen = last_sequence;
    backend
        .dispatch
        .as_mut()
        .expect("dispatch")
        .kill9()
        .expect("kill dispatch");
    let mut later = Vec::new();
    for district in ["d-chengguan-03", "d-chengguan-04"] {
        let account = &accounts_in(district, 1)[0];
        let answer = intake
            .report_ticket(report(
                &format!("later-{district}"),
                Channel::Web,
                TicketKind::FaultRepair,
                account,
            ))
            .await
            .expect("report")
            .into_inner();
        later.push(answer.incident_id);
    }
    let process = backend.dispatch.as_mut().expect("dispatch");
    process.restart().expect("restart dispatch");
    process
        .wait_healthy(Duration::from_secs(30))
        .await
        .expect("dispatch back");
    let mut dispatch = backend.dispatch().await;
    let mut watch = dispatch
        .watch_dispatches(WatchDispatchesRequest {
            crew_id: CREW.into(),
            after_sequence: seen,
            ..WatchDispatchesRequest::default()
        })
        .await
        .expect("resume")
        .into_inner();
    let mut missed = Vec::new();
    for _ in 0..2 {
        missed.push(next_event(&mut watch).await);
    }
    assert_eq!(
        missed.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [seen + 1, seen + 2],
        "exactly the missed ones"
    );
    let mut orders: Vec<String> = missed
        .iter()
        .map(|e| {
            assert_eq!(short(e), "OrderAssigned");
            OrderAssigned::decode(e.event.as_ref().expect("event").payload.as_ref())
                .expect("order")
                .order_id
        })
        .collect();
    orders.sort();
    later.sort();
    assert_eq!(orders, later);

    // On site, power back, work done: every caller's ticket is completed.
    dispatch
        .arrive(ArriveRequest {
            header: header(&incident, "arrive-1"),
            position: None,
        })
        .await
        .expect("arrive");
    dispatch
        .restore(RestoreRequest {
            header: header(&incident, "restore-1"),
        })
        .await
        .expect("restore");
    dispatch
        .complete(CompleteRequest {
            header: header(&incident, "complete-1"),
            cause: "transformer fuse blown".into(),
            result: "fuse replaced, supply back".into(),
            parts_used: vec!["fuse 100A".into()],
            notes: String::new(),
        })
        .await
        .expect("complete");
    for t in &tickets {
        eventually("intake to show the ticket completed", || async {
            let view = backend.ticket(&t.ticket_id).await;
            (view.status() == TicketStatus::Completed).then_some(())
        })
        .await;
    }

    // Gateways that speak NATS see the crew's events on its own subjects.
    let js = jetstream::new(backend.nats.client().await.expect("connect nats"));
    let stream = js.get_stream("LINEGUARD_CREW").await.expect("crew stream");
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: format!("lineguard.crew.{CREW}.>"),
            ..pull::Config::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .expect("fetch");
    // Each message is the typed CrewEvent a phone watches, numbered.
    let mut subjects = Vec::new();
    let mut sequences = Vec::new();
    while let Some(Ok(message)) = messages.next().await {
        let event = CrewEvent::decode(message.payload.as_ref()).expect("a CrewEvent");
        assert_eq!(event.crew_id, CREW);
        assert!(event.body.is_some(), "typed: {event:?}");
        let subject_type = message.subject.rsplit('.').next().unwrap_or("").to_string();
        assert_eq!(subject_type, short(&event), "the subject names the event");
        sequences.push(event.sequence);
        subjects.push(message.subject.to_string());
    }
    sequences.sort_unstable();
    assert_eq!(
        sequences,
        (1..=sequences.len() as u64).collect::<Vec<_>>(),
        "every sequence number once"
    );
    let assigned_on_nats = subjects
        .iter()
        .filter(|s| *s == &format!("lineguard.crew.{CREW}.OrderAssigned"))
        .count();
    assert_eq!(assigned_on_nats, 3, "{subjects:?}");
}
