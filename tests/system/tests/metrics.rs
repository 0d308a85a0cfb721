//! Every service's Prometheus endpoint, scraped as Prometheus would (HTTPS,
//! a certificate of the installation's CA) after a seeded storm: calls by
//! method and status, commits, the relay, each consumer's outcomes and
//! lag, open tickets equal to the tickets left open, connected crews,
//! memory; no ticket id in any label; plain HTTP, a client without a
//! certificate and any other path refused. Then `deploy/`'s dashboard and
//! alert rules use only metrics a running service exports.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lineguard_harness::{FourServices, NatsServer, ServiceProcess};
use lineguard_protos::dispatch::v1::WatchDispatchesRequest;
use lineguard_protos::intake::v1::{
    Caller, Channel, GetTicketRequest, ReportTicketRequest, TicketKind,
};
use lineguard_ticketctl::simulate::{StormConfig, storm};

/// Calls in the storm.
const CALLS: usize = 40;

/// The value of the one sample named `name` whose labels include every
/// one of `labels` (`key="value"`), summed over the matching samples.
fn sample_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        if series_name != name || !labels.iter().all(|l| series_labels.contains(l)) {
            continue;
        }
        let value: f64 = value.parse().expect("a sample's value");
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// The metric families a scrape declares (`# TYPE <name> <type>`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The family a sample or query name belongs to (`_total`, `_bucket`,
/// `_count`, `_sum`, `_created` stripped).
fn family_of(name: &str) -> &str {
    for suffix in ["_total", "_bucket", "_count", "_sum", "_created"] {
        if let Some(family) = name.strip_suffix(suffix) {
            return family;
        }
    }
    name
}

/// Every `lineguard_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(found) = text[at..].find("lineguard_") {
        let start = at + found;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok {
            names.insert(text[start..end].to_string());
        }
        at = end;
    }
    names
}

async fn scrape(process: &ServiceProcess) -> String {
    process
        .metrics()
        .await
        .unwrap_or_else(|e| panic!("scrape: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_exports_what_operators_watch_and_the_dashboards_use_only_that() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let services = FourServices::start(dir.path(), &nats.url(), &[], |name| {
        common::storm_backend_flags(name, &[])
    })
    .expect("start");
    services
        .wait_healthy(Duration::from_secs(90))
        .await
        .expect("healthy");
    let clients = common::admin_clients(&services);

    let report = storm(
        &clients,
        &StormConfig {
            tickets: CALLS,
            seed: 7,
            ..common::storm_at_rate(20.0)
        },
        &indicatif::ProgressBar::hidden(),
    )
    .await
    .expect("storm");
    common::assert_storm_clean(&report, CALLS);

    // Three faults in three districts no crew works now: open tickets.
    let mut left_open = Vec::new();
    for (n, account) in ["3100003686", "3100010332", "3100017617"]
        .iter()
        .enumerate()
    {
        let answer = clients
            .intake()
            .report_ticket(ReportTicketRequest {
                idempotency_key: format!("metrics-open-{n}"),
                channel: Channel::Hotline95598 as i32,
                kind: TicketKind::FaultRepair as i32,
                account_number: (*account).into(),
                address: "Metrics Road".into(),
                caller: Some(Caller {
                    name: "Open caller".into(),
                    phone: format!("1390000000{n}"),
                }),
                description: "left open".into(),
                ..ReportTicketRequest::default()
            })
            .await
            .expect("report")
            .into_inner();
        left_open.push(answer.ticket_id);
    }
    // A crew's phone connected.
    let watch = common::eventually("dispatch to take a crew's watch", || {
        let clients = clients.clone();
        async move {
            clients
                .dispatch()
                .watch_dispatches(WatchDispatchesRequest {
                    crew_id: common::CREW.into(),
                    after_sequence: 0,
                    ..WatchDispatchesRequest::default()
                })
                .await
                .ok()
        }
    })
    .await;

    // Intake's open tickets are the three left open, by their status and
    // line as intake shows them, once their routing has landed.
    let expected: BTreeMap<(String, u32), f64> =
        common::eventually("intake to show the three tickets routed", || {
            let clients = clients.clone();
            let left_open = left_open.clone();
            async move {
                let mut by_place = BTreeMap::new();
                for id in &left_open {
                    let view = clients
                        .intake()
                        .get_ticket(GetTicketRequest {
                            ticket_id: id.clone(),
                        })
                        .await
                        .ok()?
                        .into_inner()
                        .ticket?;
                    if view.current_line == 0 {
                        return None;
                    }
                    let status = view
                        .status()
                        .as_str_name()
                        .trim_start_matches("TICKET_STATUS_")
                        .to_ascii_lowercase();
                    *by_place.entry((status, view.current_line)).or_insert(0.0) += 1.0;
                }
                Some(by_place)
            }
        })
        .await;
    let intake_text = common::eventually("the open tickets' figures", || {
        let expected = expected.clone();
        let intake = &services.intake;
        async move {
            let text = scrape(intake).await;
            let total = sample_sum(&text, "lineguard_intake_open_tickets", &[]).unwrap_or(0.0);
            let each = expected.iter().all(|((status, line), n)| {
                sample_sum(
                    &text,
                    "lineguard_intake_open_tickets",
                    &[&format!("status=\"{status}\""), &format!("line=\"{line}\"")],
                ) == Some(*n)
            });
            (total == 3.0 && each).then_some(text)
        }
    })
    .await;

    let texts = [
        ("intake", intake_text),
        ("routing", scrape(&services.routing).await),
        ("dispatch", scrape(&services.dispatch).await),
        ("feedback", scrape(&services.feedback).await),
    ];
    for (name, text) in &texts {
        let service = format!("service=\"{name}\"");
        assert!(text.ends_with("# EOF\n"), "{name}: OpenMetrics text");
        // Commits, the relay, memory.
        assert!(
            sample_sum(
                text,
                "lineguard_eventlog_commit_duration_seconds_count",
                &[&service]
            )
            .is_some_and(|n| n > 0.0),
            "{name} commits timed"
        );
        assert!(
            sample_sum(text, "lineguard_eventlog_events_appended_total", &[])
                .is_some_and(|n| n > 0.0),
            "{name} appended"
        );
        assert!(
            sample_sum(text, "lineguard_relay_published_events_total", &[])
                .is_some_and(|n| n > 0.0),
            "{name} published"
        );
        assert!(sample_sum(text, "lineguard_outbox_backlog_events", &[]).is_some());
        assert!(
            sample_sum(text, "lineguard_process_resident_memory_bytes", &[])
                .is_some_and(|b| b > 1_000_000.0),
            "{name} resident memory"
        );
        // Every consumer: applied messages, its lag known, caught up,
        // nothing dead.
        let consumers: BTreeSet<String> = text
            .lines()
            .filter(|l| l.starts_with("lineguard_consumer_caught_up{"))
            .filter_map(|l| l.split("consumer=\"").nth(1))
            .filter_map(|l| l.split('"').next())
            .map(str::to_string)
            .collect();
        assert!(!consumers.is_empty(), "{name} has consumers:\n{text}");
        for consumer in &consumers {
            let c = format!("consumer=\"{consumer}\"");
            assert_eq!(
                sample_sum(text, "lineguard_consumer_caught_up", &[&c]),
                Some(1.0)
            );
            assert_eq!(
                sample_sum(text, "lineguard_consumer_lag_known", &[&c]),
                Some(1.0)
            );
            assert!(sample_sum(text, "lineguard_consumer_pending_messages", &[&c]).is_some());
            assert_eq!(
                sample_sum(text, "lineguard_consumer_dead_letters", &[&c]),
                Some(0.0)
            );
            assert_eq!(
                sample_sum(text, "lineguard_consumer_parked_events", &[&c]),
                Some(0.0)
            );
        }
        assert!(
            sample_sum(
                text,
                "lineguard_consumer_messages_total",
                &["outcome=\"applied\""]
            )
            .is_some_and(|n| n > 0.0),
            "{name} applied messages"
        );
        // No ticket, incident or customer in any label.
        for id in &report.ticket_ids {
            assert!(!text.contains(id.as_str()), "{name}: {id} in a label");
        }
        assert!(!text.contains("ticket-"), "{name}: a ticket id in a label");
        assert!(!text.contains("310001"), "{name}: an account in a label");
    }
    // gRPC calls by method and status: every storm call answered OK.
    let intake_text = &texts[0].1;
    let reported_ok = sample_sum(
        intake_text,
        "lineguard_grpc_server_calls_total",
        &[
            "method=\"lineguard.intake.v1.Intake/ReportTicket\"",
            "code=\"Ok\"",
        ],
    )
    .expect("ReportTicket counted");
    assert!(reported_ok >= (CALLS + 3) as f64, "{reported_ok}");
    assert!(
        sample_sum(
            intake_text,
            "lineguard_grpc_server_call_duration_seconds_count",
            &["method=\"lineguard.intake.v1.Intake/ReportTicket\""],
        )
        .is_some_and(|n| n >= reported_ok)
    );
    // A crew connected.
    let dispatch_text = scrape(&services.dispatch).await;
    assert!(
        sample_sum(&dispatch_text, "lineguard_dispatch_crews_connected", &[])
            .is_some_and(|n| n >= 1.0),
        "{dispatch_text}"
    );
    drop(watch);
    // A refused call is counted with its status.
    let refused = clients
        .intake()
        .get_ticket(GetTicketRequest {
            ticket_id: String::new(),
        })
        .await
        .expect_err("an empty id is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let after = scrape(&services.intake).await;
    assert!(
        sample_sum(
            &after,
            "lineguard_grpc_server_calls_total",
            &[
                "method=\"lineguard.intake.v1.Intake/GetTicket\"",
                "code=\"InvalidArgument\""
            ],
        )
        .is_some_and(|n| n >= 1.0),
        "{after}"
    );

    // Only the CA's clients, only /metrics.
    let addr = services
        .intake
        .metrics_addr()
        .expect("intake's metrics address");
    assert!(
        lineguard_runtime::metrics::scrape(addr, None)
            .await
            .is_err(),
        "plain HTTP is refused"
    );
    let no_certificate = lineguard_runtime::credentials::ClientCredentials::ca_only(
        lineguard_harness::test_credentials(),
    )
    .expect("the CA");
    assert!(
        lineguard_runtime::metrics::scrape(addr, Some(&no_certificate))
            .await
            .is_err(),
        "a client without a certificate is refused"
    );

    // The dashboard and the alert rules use only what the services export.
    let exported: BTreeSet<String> = texts
        .iter()
        .flat_map(|(_, text)| families(text))
        .chain(families(&dispatch_text))
        .collect();
    for file in [
        "grafana/lineguard-dashboard.json",
        "prometheus/alerts.yml",
        "prometheus/prometheus.yml",
    ] {
        let text = std::fs::read_to_string(lineguard_harness::deploy_file(file))
            .unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
        let used = metric_names(&text);
        assert!(
            !used.is_empty() || file.ends_with("prometheus.yml"),
            "{file} uses metrics"
        );
        for name in &used {
            assert!(
                exported.contains(family_of(name)),
                "deploy/{file} uses {name}, which no service exports (exported: {exported:?})"
            );
        }
        if file.ends_with(".json") {
            let dashboard: serde_json::Value =
                serde_json::from_str(&text).expect("the dashboard is JSON");
            assert!(
                dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8),
                "the dashboard has its panels"
            );
        }
    }
}
