//! `status`: every service at a glance, for an operator or a probe: its
//! health (`grpc.health.v1`, the service and `lineguard.bus`), its log's
//! head and outbox backlog, each consumer's lag on JetStream, whether it
//! has caught up, what it holds parked and dead-lettered, and dispatch's
//! connected crews. Each question has its own deadline, so a service that
//! hangs is reported as such instead of hanging the command.
//!
//! Something needs a person (the command exits 1) when a service does
//! not answer or is not SERVING, its outbox is stuck (`lineguard.bus`
//! NOT_SERVING), a consumer holds dead letters, or JetStream cannot say
//! how far behind a consumer is. Parked events and lag are shown, not
//! judged: both are normal for a while under load.

use std::time::Duration;

use lineguard_protos::bus::v1::ListConsumersRequest;
use lineguard_protos::bus::v1::consumers_client::ConsumersClient;
use lineguard_protos::dispatch::v1::GetConnectionsRequest;
use lineguard_protos::dispatch::v1::dispatch_client::DispatchClient;
use lineguard_protos::eventlog::v1::GetLogInfoRequest;
use serde::Serialize;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::endpoints::{Clients, SERVICES};

/// Longest wait for any one answer.
const ASK_WAIT: Duration = Duration::from_secs(3);

/// What every service said.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// True when nothing needs a person.
    pub healthy: bool,
    /// What needs a person, one line each.
    pub problems: Vec<String>,
    /// Each service, in intake, routing, dispatch, feedback order.
    pub services: Vec<ServiceStatus>,
}

/// One service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceStatus {
    pub service: String,
    /// Its overall health (`SERVING`, `NOT_SERVING`, …), or `UNREACHABLE`.
    pub health: String,
    /// Health of `lineguard.bus`: NOT_SERVING when the outbox is stuck.
    pub bus: String,
    /// The log's last committed position.
    pub head_position: u64,
    /// Events committed and not yet taken by JetStream.
    pub outbox_backlog: u64,
    pub consumers: Vec<ConsumerLine>,
    /// Dispatch only: crews with a phone on `WatchDispatches`, and watches.
    pub crews_connected: Option<u32>,
    pub watches: Option<u32>,
    /// Why a question went unanswered.
    pub errors: Vec<String>,
}

/// One consumer of a service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsumerLine {
    pub consumer: String,
    pub stream: String,
    /// Messages not yet delivered to it (its lag).
    pub pending: u64,
    /// Delivered and not yet acknowledged.
    pub ack_pending: u64,
    pub caught_up: bool,
    pub parked: u64,
    pub dead_letters: u64,
    /// Why JetStream could not say its lag (empty when it did).
    pub bus_error: String,
}

/// Asks every service, all at once.
pub async fn status(clients: &Clients) -> Status {
    let asked =
        futures::future::join_all(SERVICES.iter().map(|s| service_status(clients, s))).await;
    let mut problems = Vec::new();
    for s in &asked {
        if s.health != "SERVING" {
            problems.push(format!("{}: {}", s.service, s.health));
        }
        if s.bus == "NOT_SERVING" {
            problems.push(format!(
                "{}: outbox stuck ({} events JetStream has not taken)",
                s.service, s.outbox_backlog
            ));
        }
        for c in &s.consumers {
            if c.dead_letters > 0 {
                problems.push(format!(
                    "{}: consumer {} holds {} dead letters (ticketctl deadletters)",
                    s.service, c.consumer, c.dead_letters
                ));
            }
            if !c.bus_error.is_empty() {
                problems.push(format!(
                    "{}: consumer {}: lag unknown: {}",
                    s.service, c.consumer, c.bus_error
                ));
            }
        }
    }
    Status {
        healthy: problems.is_empty(),
        problems,
        services: asked,
    }
}

/// `what` within [`ASK_WAIT`], its failure as text.
async fn ask<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(ASK_WAIT, call).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) => Err(format!("{what}: {:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("{what}: no answer within {ASK_WAIT:?}")),
    }
}

fn health_name(status: i32) -> String {
    use tonic_health::pb::health_check_response::ServingStatus;
    ServingStatus::try_from(status).map_or_else(
        |_| format!("UNKNOWN({status})"),
        |s| s.as_str_name().to_string(),
    )
}

async fn service_status(clients: &Clients, service: &str) -> ServiceStatus {
    let mut status = ServiceStatus {
        service: service.to_string(),
        ..ServiceStatus::default()
    };
    let channel = match clients.channel(service) {
        Ok(channel) => channel,
        Err(e) => {
            status.health = "UNREACHABLE".into();
            status.errors.push(e.to_string());
            return status;
        }
    };
    let mut health = HealthClient::new(channel.clone());
    match ask("health", health.check(HealthCheckRequest::default())).await {
        Ok(answer) => status.health = health_name(answer.status),
        Err(why) => {
            // Nothing else will answer either.
            status.health = "UNREACHABLE".into();
            status.errors.push(why);
            return status;
        }
    }
    let bus = HealthCheckRequest {
        service: "lineguard.bus".into(),
    };
    match ask("bus health", health.check(bus)).await {
        Ok(answer) => status.bus = health_name(answer.status),
        Err(why) => status.errors.push(why),
    }
    let mut log =
        lineguard_protos::eventlog::v1::event_log_client::EventLogClient::new(channel.clone());
    match ask("log info", log.get_log_info(GetLogInfoRequest {})).await {
        Ok(info) => {
            status.head_position = info.head_position;
            status.outbox_backlog = info.outbox_backlog;
        }
        Err(why) => status.errors.push(why),
    }
    let mut consumers = ConsumersClient::new(channel.clone());
    match ask(
        "consumers",
        consumers.list_consumers(ListConsumersRequest {}),
    )
    .await
    {
        Ok(listed) => {
            status.consumers = listed
                .consumers
                .into_iter()
                .map(|c| ConsumerLine {
                    consumer: c.consumer,
                    stream: c.stream,
                    pending: c.pending,
                    ack_pending: c.ack_pending,
                    caught_up: c.caught_up,
                    parked: c.parked,
                    dead_letters: c.dead_letters,
                    bus_error: c.bus_error,
                })
                .collect();
        }
        Err(why) => status.errors.push(why),
    }
    if service == "dispatch" {
        let mut dispatch = DispatchClient::new(channel);
        match ask(
            "connections",
            dispatch.get_connections(GetConnectionsRequest {}),
        )
        .await
        {
            Ok(connections) => {
                status.crews_connected = Some(connections.crews_connected);
                status.watches = Some(connections.watches);
            }
            Err(why) => status.errors.push(why),
        }
    }
    status
}

/// The status as an operator reads it.
pub fn render(status: &Status) -> String {
    let mut text = String::new();
    for s in &status.services {
        text.push_str(&format!(
            "{:<9} {:<12} bus {:<12} head {:>10}  outbox {:>8}",
            s.service, s.health, s.bus, s.head_position, s.outbox_backlog
        ));
        if let (Some(crews), Some(watches)) = (s.crews_connected, s.watches) {
            text.push_str(&format!("  crews connected {crews} ({watches} watches)"));
        }
        text.push('\n');
        for c in &s.consumers {
            text.push_str(&format!(
                "  {:<28} lag {:>8}  unacked {:>5}  {:<11} parked {:>5}  dead {:>5}{}\n",
                c.consumer,
                c.pending,
                c.ack_pending,
                if c.caught_up {
                    "caught up"
                } else {
                    "catching up"
                },
                c.parked,
                c.dead_letters,
                if c.bus_error.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", c.bus_error)
                }
            ));
        }
        for e in &s.errors {
            text.push_str(&format!("  ! {e}\n"));
        }
    }
    if status.healthy {
        text.push_str("healthy\n");
    } else {
        for p in &status.problems {
            text.push_str(&format!("needs a person: {p}\n"));
        }
    }
    text
}
