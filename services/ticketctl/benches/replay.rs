//! Replay of one big incident: 10,000 events across the four services'
//! logs (RocksDB, fsynced commits), read over real gRPC on loopback by
//! correlation id, merged in causal order and laid out as a timeline.
//!
//! `cargo bench --workspace --bench replay` prints the time of each part.
//! `REPLAY_CHILDREN=N` sets the incident's calls (each adds ~4 events).

use std::sync::Arc;
use std::time::Instant;

use lineguard_eventlog::{
    ActorKind, EventLog, EventLogService, EventTypes, ExpectedVersion, LogConfig, NewEvent,
    NoProjections, Transaction, actor,
};
use lineguard_protos::dispatch::v1::{CoveredTicket, IncidentGrew, OrderAssigned};
use lineguard_protos::feedback::v1::FollowUpScheduled;
use lineguard_protos::intake::v1::{IncidentOpened, TicketJoinedIncident, TicketReported};
use lineguard_protos::routing::v1::{TicketFollowedIncident, TicketRouted};
use lineguard_ticketctl::endpoints::{Clients, Endpoints};
use lineguard_ticketctl::{replay, timeline};
use prost::{Message, Name};

fn event<M: Message + Name>(m: &M, correlation: &str, cause: &str) -> NewEvent {
    let mut e = NewEvent::new(m, correlation, actor(ActorKind::System, "bench"));
    if !cause.is_empty() {
        e = e.caused_by(cause);
    }
    e
}

async fn serve(log: EventLog) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EventLogService::server(log))
            .serve_with_incoming(incoming),
    );
    format!("http://{addr}")
}

fn open(dir: &std::path::Path, service: &str) -> EventLog {
    let types = EventTypes::new()
        .with::<TicketReported>(1)
        .with::<IncidentOpened>(1)
        .with::<TicketJoinedIncident>(1)
        .with::<TicketRouted>(1)
        .with::<TicketFollowedIncident>(1)
        .with::<OrderAssigned>(1)
        .with::<IncidentGrew>(1)
        .with::<FollowUpScheduled>(1);
    EventLog::open(
        LogConfig::new(dir.join(service), service)
            .with_event_types(types)
            .with_projector(Arc::new(NoProjections)),
    )
    .expect("open")
}

/// Commits `events` as (stream, event) pairs, in order: consecutive events
/// of a stream as one append, as many appends and events per commit as the
/// log's limits allow.
async fn commit_all(log: &EventLog, events: Vec<(String, NewEvent)>) {
    let limits = log.limits().clone();
    let mut runs: Vec<(String, Vec<NewEvent>)> = Vec::new();
    let mut in_txn = 0;
    for (stream, e) in events {
        let fits = runs.last().is_some_and(|(s, _)| *s == stream);
        if in_txn == limits.max_events_per_commit
            || (!fits && runs.len() == limits.max_streams_per_commit)
        {
            commit_runs(log, std::mem::take(&mut runs)).await;
            in_txn = 0;
        }
        match runs.last_mut() {
            Some((s, batch)) if *s == stream => batch.push(e),
            _ => runs.push((stream, vec![e])),
        }
        in_txn += 1;
    }
    commit_runs(log, runs).await;
}

async fn commit_runs(log: &EventLog, runs: Vec<(String, Vec<NewEvent>)>) {
    if runs.is_empty() {
        return;
    }
    let mut txn = Transaction::default();
    for (stream, events) in runs {
        txn = txn.and_append(stream, ExpectedVersion::Any, events);
    }
    log.commit(txn).await.expect("commit");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let children: usize = std::env::var("REPLAY_CHILDREN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let (intake, routing, dispatch, feedback) = (
        open(dir.path(), "intake"),
        open(dir.path(), "routing"),
        open(dir.path(), "dispatch"),
        open(dir.path(), "feedback"),
    );
    let incident = "incident-bench";
    let lead = "ticket-lead";
    let payload = |n: usize| format!("No power at number {n}, the whole street is dark");

    // Intake: the incident, its lead and every child's report and joining.
    let mut intake_events = Vec::new();
    let lead_report = event(
        &TicketReported {
            ticket_id: lead.into(),
            incident_id: incident.into(),
            incident_lead: true,
            district_id: "d-1".into(),
            description: payload(0),
            ..TicketReported::default()
        },
        lead,
        "",
    );
    let lead_cause = lead_report.event_id.to_string();
    intake_events.push((lead.to_string(), lead_report));
    intake_events.push((
        incident.to_string(),
        event(
            &IncidentOpened {
                incident_id: incident.into(),
                lead_ticket_id: lead.into(),
                district_id: "d-1".into(),
                ..IncidentOpened::default()
            },
            incident,
            &lead_cause,
        ),
    ));
    let mut routing_events = vec![(
        incident.to_string(),
        event(
            &TicketRouted {
                case_id: incident.into(),
                lead_ticket_id: lead.into(),
                incident_id: incident.into(),
                line: 1,
                hop: 1,
                assignee_id: "m-1".into(),
                crew_id: "crew-1".into(),
                field_work: true,
                ..TicketRouted::default()
            },
            incident,
            &lead_cause,
        ),
    )];
    let mut dispatch_events = vec![(
        "crew-crew-1".to_string(),
        event(
            &OrderAssigned {
                order_id: incident.into(),
                crew_id: "crew-1".into(),
                ..OrderAssigned::default()
            },
            incident,
            "",
        ),
    )];
    let mut feedback_events = Vec::new();
    for n in 1..=children {
        let child = format!("ticket-{n:05}");
        let report = event(
            &TicketReported {
                ticket_id: child.clone(),
                incident_id: incident.into(),
                description: payload(n),
                ..TicketReported::default()
            },
            &child,
            "",
        );
        let cause = report.event_id.to_string();
        intake_events.push((child.clone(), report));
        intake_events.push((
            child.clone(),
            event(
                &TicketJoinedIncident {
                    ticket_id: child.clone(),
                    incident_id: incident.into(),
                    ticket_count: n as u32 + 1,
                },
                &child,
                &cause,
            ),
        ));
        routing_events.push((
            child.clone(),
            event(
                &TicketFollowedIncident {
                    ticket_id: child.clone(),
                    incident_id: incident.into(),
                },
                incident,
                &cause,
            ),
        ));
        dispatch_events.push((
            "crew-crew-1".to_string(),
            event(
                &IncidentGrew {
                    order_id: incident.into(),
                    crew_id: "crew-1".into(),
                    ticket: Some(CoveredTicket {
                        ticket_id: child.clone(),
                        ..CoveredTicket::default()
                    }),
                    ticket_count: n as u32 + 1,
                },
                incident,
                &cause,
            ),
        ));
        feedback_events.push((
            child.clone(),
            event(
                &FollowUpScheduled {
                    ticket_id: child.clone(),
                    case_id: incident.into(),
                    resolution: "completed".into(),
                    ..FollowUpScheduled::default()
                },
                incident,
                "",
            ),
        ));
    }
    let total =
        intake_events.len() + routing_events.len() + dispatch_events.len() + feedback_events.len();
    let started = Instant::now();
    commit_all(&intake, intake_events).await;
    commit_all(&routing, routing_events).await;
    commit_all(&dispatch, dispatch_events).await;
    commit_all(&feedback, feedback_events).await;
    let wrote = started.elapsed();
    let endpoints = Endpoints {
        intake: serve(intake).await,
        routing: serve(routing).await,
        dispatch: serve(dispatch).await,
        feedback: serve(feedback).await,
        // In-process servers on loopback, without TLS.
        credentials: None,
        principal: "admin:dev".into(),
    };
    let clients = Clients::new(&endpoints).expect("clients");
    println!(
        "replay of one incident: {children} calls, {total} events in 4 logs (written in {:.2}s)",
        wrote.as_secs_f64()
    );
    // A warm-up, then three timed runs.
    let _ = replay::incident(&clients, incident).await.expect("replay");
    let mut runs = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let replayed = replay::incident(&clients, incident).await.expect("replay");
        let read = started.elapsed();
        let laid_out = timeline::build(&replayed);
        let html = timeline::render_html(&laid_out);
        let all = started.elapsed();
        assert_eq!(replayed.events.len(), total, "every event replayed");
        assert!(html.len() > 1_000);
        println!(
            "  read {} correlation ids and merged {} events in {:.3}s; with the timeline and HTML {:.3}s",
            replayed.correlation_ids.len(),
            replayed.events.len(),
            read.as_secs_f64(),
            all.as_secs_f64()
        );
        runs.push(all.as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    println!(
        "median replay of a {total}-event incident: {:.3}s (target: well under 1 s)",
        runs[1]
    );
}
