//! All four services as processes, a storm of 1,000 calls driven by
//! `ticketctl simulate storm` (its library), then the operator's promises:
//! replay of every ticket equals intake's live view (`verify`, also run as
//! the `ticketctl` binary with `--json`); a ticket as of several instants is
//! what its events up to then say; every service's projections rebuild to
//! the same digest; an incident's HTML timeline has its lanes and breaches.

mod common;

use std::time::Duration;

use common::*;
use lineguard_protos::eventlog::v1::RebuildProjectionsRequest;
use lineguard_protos::routing::v1::{RouteReason, TicketRouted};
use lineguard_ticketctl::endpoints::{Clients, SERVICES};
use lineguard_ticketctl::replay::{self, recorded_nanos, short_type};
use lineguard_ticketctl::simulate::{StormConfig, storm};
use lineguard_ticketctl::state::{TicketState, ticket_state};
use lineguard_ticketctl::{timeline, verify};
use prost::Message;

/// Waits until no service's log has grown for a second.
async fn quiet(backend: &Backend) {
    let processes = [
        &backend.intake,
        &backend.routing,
        backend.dispatch.as_ref().expect("dispatch"),
        backend.feedback.as_ref().expect("feedback"),
    ];
    common::quiet(&processes, Duration::from_secs(1), Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_storm_replay_equals_the_live_view_and_everything_rebuilds() {
    let backend = Backend::start_all(&["--timer-tick".into(), "100ms".into()]).await;
    let endpoints = endpoints(&backend);
    let clients = Clients::new(&endpoints).expect("clients");
    let config = StormConfig {
        // A storm's calls are about a sixth repeat callers (urges).
        tickets: 1_300,
        rate: 150.0,
        seed: 7,
        accounts: deploy("demo-accounts.csv"),
        directory: deploy("directory.toml"),
        slow_share: 0.04,
        // Past the test policy's 4 s acceptance window: these escalate.
        slow_ack: WINDOW + Duration::from_secs(2),
        late_share: 0.15,
        return_share: 0.03,
        dissatisfied_share: 0.1,
        settle: Duration::from_secs(40),
        clock_start: None,
        clock_anchor: None,
        clock_speed: 1,
        phone_skew_minutes: 0,
        offline_share: 0.0,
        max_in_flight: 2_000,
        queue_calls: false,
        waves_of: 0,
        until_done: false,
    };
    let report = storm(&clients, &config, &indicatif::ProgressBar::hidden())
        .await
        .expect("storm");
    eprintln!("{}", serde_json::to_string(&report).expect("json"));
    assert_eq!(report.calls, 1_300, "{:?}", report.errors);
    assert_eq!(
        report.new_tickets + report.joined_incidents + report.urges,
        report.calls,
        "every call is a new ticket, one joining an incident, or an urge"
    );
    assert!(
        report.new_tickets + report.joined_incidents >= 1_000,
        "1,000 tickets at least"
    );
    assert!(report.joined_incidents > 0, "correlated outages");
    assert!(report.urges > 0, "repeat callers");
    assert!(report.arrived_late > 0 && report.arrived_on_time > 0);
    assert!(report.slow_acknowledgements > 0, "escalations");
    assert!(report.completed > 0 && report.desk_answered > 0);
    assert!(report.follow_ups_satisfied > 0);
    assert!(report.report_to_crew_ms.count > 0);
    quiet(&backend).await;

    // Every ticket replayed from the four logs equals intake's live view.
    let checked = verify::verify(&clients, &indicatif::ProgressBar::hidden())
        .await
        .expect("verify");
    assert!(checked.tickets >= 1_000, "{} tickets", checked.tickets);
    assert!(
        checked.load_mismatches.is_empty(),
        "every stored load equals routing's recount: {:?}",
        checked.load_mismatches
    );
    assert!(
        checked.mismatches.is_empty(),
        "{} mismatches, first: {:?}",
        checked.mismatches.len(),
        checked.mismatches.iter().take(5).collect::<Vec<_>>()
    );
    // The same from the binary, as an operator runs it.
    let out = ticketctl(&endpoints, &["--json", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["mismatches"].as_array().map(Vec::len), Some(0));

    // An incident that escalated (a breach), with several calls.
    let mut chosen = None;
    for ticket in &report.ticket_ids {
        let r = replay::ticket(&clients, ticket).await.expect("replay");
        let breached = r.events.iter().any(|e| short_type(e) == "ClockBreached");
        if breached && r.correlation_ids.len() >= 2 && r.correlation_ids[1].starts_with("incident-")
        {
            chosen = Some(r.correlation_ids[1].clone());
            break;
        }
    }
    let incident = chosen.expect("an escalated incident");
    let replayed = replay::incident(&clients, &incident)
        .await
        .expect("replay incident");
    // Causal order: no event before its cause.
    let index: std::collections::HashMap<&str, usize> = replayed
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.event_id.as_str(), i))
        .collect();
    for (i, e) in replayed.events.iter().enumerate() {
        if let Some(&cause) = index.get(e.causation_id.as_str()) {
            assert!(cause < i, "{} before its cause", e.event_type);
        }
    }

    // As of several instants: what the events up to then say.
    let lead = replayed.correlation_ids[1].clone();
    let first_route = replayed
        .events
        .iter()
        .find(|e| short_type(e) == "TicketRouted")
        .expect("routed");
    let escalation = replayed
        .events
        .iter()
        .find(|e| {
            short_type(e) == "TicketRouted"
                && TicketRouted::decode(e.payload.as_ref())
                    .is_ok_and(|r| r.reason() == RouteReason::Escalated)
        })
        .expect("escalated");
    let before = ticket_state(
        &lead,
        &replayed.events,
        Some(recorded_nanos(&replayed.events[0]) - 1),
    );
    assert!(before.is_none(), "nothing before the first call");
    let routed =
        ticket_state(&lead, &replayed.events, Some(recorded_nanos(first_route))).expect("state");
    assert_eq!((routed.status.as_str(), routed.hops), ("ROUTED", 1));
    // The escalation is one hop more than the route it follows (the first,
    // or a reopen's if the incident was completed and reopened before its
    // holder let the acceptance window pass).
    let held = ticket_state(
        &lead,
        &replayed.events,
        Some(recorded_nanos(escalation) - 1),
    )
    .expect("state");
    assert!(held.hops >= 1);
    let escalated =
        ticket_state(&lead, &replayed.events, Some(recorded_nanos(escalation))).expect("state");
    assert_eq!(escalated.hops, held.hops + 1);
    // The next line up that can take it: a line passed over (its desk
    // past the overload threshold in a storm) is named in the route.
    assert!(escalated.line > held.line, "a line up");
    if escalated.line > held.line + 1 {
        let route = TicketRouted::decode(escalation.payload.as_ref()).expect("route");
        assert!(
            !route.reason_detail.is_empty(),
            "a line passed over is named: {route:?}"
        );
    }
    assert!(
        escalated.breaches >= 1,
        "the acceptance breach before the escalation"
    );
    let end = ticket_state(&lead, &replayed.events, None).expect("state");
    let live = TicketState::of_view(&backend.ticket(&lead).await);
    assert_eq!(end, live);

    // The JSON replay a machine checks: every step carries its event id,
    // its cause's id and its place in its service's log; causes are found
    // by id, each before what it caused, and at least the escalation's
    // chain (breach, re-route) is linked that way.
    let out = ticketctl(&endpoints, &["--json", "replay", "incident", &incident]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let steps = json["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), replayed.events.len());
    let mut seen = std::collections::HashSet::new();
    let mut linked = 0;
    for step in steps {
        let id = step["event_id"].as_str().expect("event_id");
        assert!(!id.is_empty(), "{step}");
        assert!(step["position"].as_u64() > Some(0), "{step}");
        assert!(step["stream_version"].as_u64() > Some(0), "{step}");
        assert!(
            !step["stream_id"].as_str().unwrap_or("").is_empty(),
            "{step}"
        );
        let cause = step["causation_id"].as_str().expect("causation_id");
        if index.contains_key(cause) {
            assert!(seen.contains(cause), "a cause after its effect: {step}");
            linked += 1;
        }
        seen.insert(id.to_string());
    }
    assert!(linked >= 2, "{linked} steps linked to their causes");

    // The HTML timeline: its lanes and its breaches.
    let laid_out = timeline::build(&replayed);
    assert!(laid_out.breaches >= 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("timeline.html");
    let out = ticketctl(
        &endpoints,
        &[
            "timeline",
            "incident",
            &incident,
            "--html",
            &path.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&path).expect("html");
    assert!(html.contains("Line 1: district manager"));
    assert!(html.contains("Line 2: station"));
    assert!(html.contains("Crew crew-"));
    assert!(html.contains("class=\"breach\""));
    assert!(html.contains("<svg") && html.contains("</html>"));

    // Every service's projections rebuild from its log to the same digest,
    // as the operator asks for it.
    let out = ticketctl(&endpoints, &["--json", "rebuild", "all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rebuilt: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rebuilt = rebuilt.as_array().expect("a row per service");
    assert_eq!(rebuilt.len(), SERVICES.len());
    for row in rebuilt {
        assert_eq!(row["same"], true, "{row}");
        assert!(row["events_replayed"].as_u64() > Some(0), "{row}");
    }
    // Online, over gRPC, the same.
    for service in SERVICES {
        let again = clients
            .log(service)
            .expect("client")
            .rebuild_projections(RebuildProjectionsRequest {})
            .await
            .expect("rebuild")
            .into_inner();
        assert_eq!(again.digest_before, again.digest_after, "{service}");
    }
    // And the views still agree with the logs afterwards.
    let again = verify::check_ticket(&clients, &lead).await.expect("check");
    assert!(again.0.is_empty(), "{:?}", again.0);

    // `tail` from the start of the logs, as JSON lines.
    let out = ticketctl(
        &endpoints,
        &[
            "--json",
            "tail",
            "--from-start",
            "--service",
            "routing",
            "--type",
            "TicketRouted",
            "--count",
            "5",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 5);
    assert!(lines.iter().all(
        |l| l["service"] == "routing" && l["event_type"] == "lineguard.routing.v1.TicketRouted"
    ));

    // A rebuild at start-up gives the same projections too: the digests it
    // logs, taken before and after it, before anything else is committed.
    let mut backend = backend;
    backend
        .routing
        .restart_with(&["--rebuild-projections".into()], Duration::from_secs(10))
        .expect("restart");
    backend
        .routing
        .wait_healthy(Duration::from_secs(30))
        .await
        .expect("healthy");
    let log = backend.routing.log();
    let line = log
        .lines()
        .find(|l| l.contains("rebuilt from the log at start-up"))
        .expect("the start-up rebuild logged");
    // The two digests are the 64-hex-digit words of the line (whatever the
    // log's colouring around them).
    let digests: Vec<String> = line
        .split(|c: char| !c.is_ascii_hexdigit())
        .filter(|w| w.len() == 64)
        .map(str::to_string)
        .collect();
    assert_eq!(digests.len(), 2, "{line}");
    assert_eq!(digests[0], digests[1], "{line}");
}
