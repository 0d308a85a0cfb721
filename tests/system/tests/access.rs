//! Every RPC of every service, called as every role over TLS: the access
//! policy (`deploy/access.toml`) decides, the same in each process; a call
//! without credentials is UNAUTHENTICATED; a refused call writes nothing;
//! a crew's phone acts for its own crew only.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, header, quiet};
use lineguard_harness::{ServiceProcess, test_credentials};
use lineguard_protos::dispatch::v1::{
    AcknowledgeRequest, GetWorkOrderRequest, SubmitActionsRequest, WatchDispatchesRequest,
    dispatch_client::DispatchClient,
};
use lineguard_protos::eventlog::v1::GetLogInfoRequest;
use lineguard_protos::eventlog::v1::event_log_client::EventLogClient;
use lineguard_runtime::access::{AccessPolicy, OPEN_SERVICES, rpcs_of};
use lineguard_runtime::credentials::ClientCredentials;
use tonic::Code;
use tonic::transport::Channel;

fn policy() -> Arc<AccessPolicy> {
    let rpcs = rpcs_of(&[lineguard_protos::FILE_DESCRIPTOR_SET]).expect("rpcs");
    Arc::new(AccessPolicy::load(&lineguard_harness::access_policy(), &rpcs).expect("policy"))
}

/// A TLS channel that presents no certificate (tokens only).
async fn tls_only(process: &ServiceProcess) -> Channel {
    let credentials = ClientCredentials::ca_only(test_credentials()).expect("ca");
    tonic::transport::Endpoint::from_shared(process.endpoint())
        .expect("endpoint")
        .tls_config(credentials.tls("127.0.0.1"))
        .expect("tls")
        .connect()
        .await
        .expect("connect")
}

fn bearer<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    request
}

/// Calls `rpc` (`package.Service/Method`) with an empty request (valid
/// protobuf for every request type), as `token` (none: no credentials).
async fn call(channel: &Channel, rpc: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_str(&format!("/{rpc}")).expect("path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    // Server streaming fits every method on the wire, and returns at the
    // response's headers: a refusal is in them, a stream is not waited on.
    let call = grpc.server_streaming(bearer((), token), path, codec);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(result) => result.map(drop),
        Err(_) => Ok(()),
    }
}

/// The services each process serves: its own API, `EventLog`, `Consumers`.
fn served_by(rpc: &str) -> &'static str {
    for service in ["intake", "routing", "dispatch", "feedback"] {
        if rpc.starts_with(&format!("lineguard.{service}.")) {
            return service;
        }
    }
    "every"
}

async fn heads(processes: &[(&str, &ServiceProcess)]) -> Vec<u64> {
    let mut out = Vec::new();
    for (_, process) in processes {
        let info = EventLogClient::new(process.channel().await.expect("channel"))
            .get_log_info(GetLogInfoRequest {})
            .await
            .expect("info")
            .into_inner();
        out.push(info.head_position);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_of_every_service_as_every_role_is_allowed_or_denied_by_the_policy() {
    let backend = Backend::start_all(&[]).await;
    let dispatch = backend.dispatch.as_ref().expect("dispatch");
    let feedback = backend.feedback.as_ref().expect("feedback");
    let processes = [
        ("intake", &backend.intake),
        ("routing", &backend.routing),
        ("dispatch", dispatch),
        ("feedback", feedback),
    ];
    let mut channels = BTreeMap::new();
    for (name, process) in &processes {
        channels.insert(*name, tls_only(process).await);
    }
    let policy = policy();
    let issuer = test_credentials().token_issuer().expect("issuer");
    let day = Duration::from_secs(24 * 3_600);
    let tokens: BTreeMap<String, String> = policy
        .roles()
        .map(|role| {
            let crew = if role == "crew" { "crew-table" } else { "" };
            let token = issuer
                .issue(&format!("table-{role}"), role, crew, "", day)
                .expect("token");
            (role.to_string(), token)
        })
        .collect();
    let rpcs = rpcs_of(&[lineguard_protos::FILE_DESCRIPTOR_SET]).expect("rpcs");
    let guarded: Vec<&String> = rpcs
        .iter()
        .filter(|rpc| {
            let service = rpc.split_once('/').map_or(rpc.as_str(), |(s, _)| s);
            !OPEN_SERVICES.contains(&service) && service.starts_with("lineguard.")
        })
        .collect();
    assert!(guarded.len() > 40, "{} RPCs", guarded.len());

    // First every call that must be refused, then the logs must be as they
    // were: a refused call writes nothing. (The services first settle: the
    // consumers catching up at start-up write too.)
    quiet(
        &[&backend.intake, &backend.routing, dispatch, feedback],
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let before = heads(&processes).await;
    let mut refused = 0;
    for rpc in &guarded {
        for (name, channel) in &channels {
            let target = served_by(rpc);
            if target != "every" && target != *name {
                continue;
            }
            let status = call(channel, rpc, None).await.expect_err("no credentials");
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{rpc} on {name}: {status:?}"
            );
            refused += 1;
            for (role, token) in &tokens {
                if policy.check(role, rpc).is_ok() {
                    continue;
                }
                let status = call(channel, rpc, Some(token))
                    .await
                    .expect_err("outside the role");
                assert_eq!(
                    status.code(),
                    Code::PermissionDenied,
                    "{role} calling {rpc} on {name}: {status:?}"
                );
                assert!(
                    status.message().contains(role.as_str()) && status.message().contains(*rpc),
                    "names the role and the RPC: {}",
                    status.message()
                );
                refused += 1;
            }
        }
    }
    assert_eq!(
        heads(&processes).await,
        before,
        "refused calls wrote nothing"
    );

    // Then every call the policy allows gets past the door: whatever the
    // service answers an empty request, it is not a refusal.
    let mut allowed = 0;
    for rpc in &guarded {
        for (name, channel) in &channels {
            let target = served_by(rpc);
            if target != "every" && target != *name {
                continue;
            }
            for (role, token) in &tokens {
                if policy.check(role, rpc).is_err() {
                    continue;
                }
                if let Err(status) = call(channel, rpc, Some(token)).await {
                    assert!(
                        !matches!(
                            status.code(),
                            Code::Unauthenticated | Code::PermissionDenied
                        ) || !status.message().contains("may not call"),
                        "{role} calling {rpc} on {name} was refused: {status:?}"
                    );
                }
                allowed += 1;
            }
        }
    }
    eprintln!("{refused} calls refused, {allowed} allowed, as the policy says");
    assert!(refused > 100 && allowed > 40);
}

#[tokio::test]
async fn a_crews_phone_acts_for_its_own_crew_only() {
    let backend = Backend::start_with(true, true).await;
    let dispatch = backend.dispatch.as_ref().expect("dispatch");
    let issuer = test_credentials().token_issuer().expect("issuer");
    let phone = issuer
        .issue(
            "phone-7",
            "crew",
            "crew-north-1",
            "device-7",
            Duration::from_secs(3_600),
        )
        .expect("token");
    let mut client = DispatchClient::new(tls_only(dispatch).await);

    let watch = client
        .watch_dispatches(bearer(
            WatchDispatchesRequest {
                crew_id: "crew-south-2".into(),
                ..WatchDispatchesRequest::default()
            },
            Some(&phone),
        ))
        .await
        .expect_err("another crew's stream");
    assert_eq!(watch.code(), Code::PermissionDenied, "{watch:?}");
    assert!(watch.message().contains("crew-north-1"), "{watch:?}");

    let mut other_crew = header("order-1", "a-1");
    if let Some(h) = other_crew.as_mut() {
        h.crew_id = "crew-south-2".into();
    }
    let act = client
        .acknowledge(bearer(
            AcknowledgeRequest {
                header: other_crew.clone(),
            },
            Some(&phone),
        ))
        .await
        .expect_err("acting for another crew");
    assert_eq!(act.code(), Code::PermissionDenied, "{act:?}");

    let batch = client
        .submit_actions(bearer(
            SubmitActionsRequest {
                actions: vec![lineguard_protos::dispatch::v1::CrewAction {
                    action: Some(
                        lineguard_protos::dispatch::v1::crew_action::Action::Acknowledge(
                            AcknowledgeRequest { header: other_crew },
                        ),
                    ),
                }],
            },
            Some(&phone),
        ))
        .await
        .expect_err("a batch for another crew");
    assert_eq!(batch.code(), Code::PermissionDenied, "{batch:?}");

    // Its own crew gets past the door (the order does not exist: NOT_FOUND).
    let mut own = header("order-1", "a-2");
    if let Some(h) = own.as_mut() {
        h.crew_id = "crew-north-1".into();
    }
    let own = client
        .acknowledge(bearer(AcknowledgeRequest { header: own }, Some(&phone)))
        .await
        .expect_err("no such order");
    assert_ne!(own.code(), Code::PermissionDenied, "{own:?}");

    let order = client
        .get_work_order(bearer(
            GetWorkOrderRequest {
                order_id: "nothing-here".into(),
            },
            Some(&phone),
        ))
        .await
        .expect_err("no such order");
    assert_eq!(order.code(), Code::NotFound, "{order:?}");
}

/// The actor of each event a caller causes, read from `process`'s log.
async fn actors(process: &ServiceProcess, correlation: &str) -> Vec<(String, String)> {
    common::correlated(process, correlation)
        .await
        .into_iter()
        .map(|e| {
            let actor = e.actor.map(|a| a.id).unwrap_or_default();
            (common::short_type(&e.event_type), actor)
        })
        .collect()
}

/// Who acted is the authenticated principal, never a request field: the
/// report is the calling system's (the door stays in the event), the
/// acknowledgement the crew's phone's, in dispatch's log and in routing's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_principal_not_a_request_field_is_each_events_actor() {
    use common::{CREW, accounts_in, report};
    use futures::StreamExt;
    use lineguard_protos::dispatch::v1::crew_event;
    use lineguard_protos::intake::v1::{Channel as Door, TicketKind};
    let backend = Backend::start_with(true, true).await;
    let dispatch = backend.dispatch.as_ref().expect("dispatch");
    let mut watch = backend.watch_crew(CREW).await;
    let account = accounts_in("d-chengguan-01", 1).remove(0);
    // admin:dev by certificate, reporting for the app.
    let reported = backend
        .intake()
        .await
        .report_ticket(report(
            "actor-1",
            Door::App,
            TicketKind::FaultRepair,
            &account,
        ))
        .await
        .expect("report")
        .into_inner();
    let reported_by = actors(&backend.intake, &reported.ticket_id).await;
    assert!(
        reported_by.contains(&("TicketReported".into(), "admin-dev".into())),
        "{reported_by:?}"
    );

    let first = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("an order in time")
        .expect("open")
        .expect("event");
    let Some(crew_event::Body::OrderAssigned(order)) = first.body else {
        panic!("an order first");
    };
    let phone = test_credentials()
        .token_issuer()
        .expect("issuer")
        .issue(
            "phone-9",
            "crew",
            CREW,
            "device-9",
            Duration::from_secs(3_600),
        )
        .expect("token");
    DispatchClient::new(tls_only(dispatch).await)
        .acknowledge(bearer(
            AcknowledgeRequest {
                header: header(&order.order_id, "ack-actor-1"),
            },
            Some(&phone),
        ))
        .await
        .expect("acknowledged by the phone");
    let phone_actor = format!("{CREW}-device-9");
    let in_dispatch = actors(dispatch, &order.order_id).await;
    assert!(
        in_dispatch.contains(&("OrderAcknowledged".into(), phone_actor.clone())),
        "{in_dispatch:?}"
    );
    let accepted = common::eventually("routing to accept the case", || {
        let routing = &backend.routing;
        let case = order.order_id.clone();
        let phone_actor = phone_actor.clone();
        async move {
            actors(routing, &case)
                .await
                .into_iter()
                .find(|(t, _)| t == "TicketAccepted")
                .map(|(_, actor)| (actor == phone_actor).then_some(()).ok_or(actor))
        }
    })
    .await;
    assert_eq!(accepted, Ok(()), "routing's acceptance names the phone");
}

/// A desk acts for its own station only: the duty desk of a station for
/// its managers and itself, a manager for itself and its station; another
/// station's manager is PERMISSION_DENIED whatever the request says.
#[tokio::test]
async fn a_desk_acts_for_its_own_station_only() {
    use lineguard_protos::routing::v1::routing_client::RoutingClient;
    use lineguard_protos::routing::v1::{
        Availability, GetAvailabilityRequest, SetAvailabilityRequest,
    };
    let backend = Backend::start().await;
    let issuer = test_credentials().token_issuer().expect("issuer");
    let desk = issuer
        .issue(
            "desk-st-chengguan",
            "desk",
            "",
            "",
            Duration::from_secs(3_600),
        )
        .expect("token");
    let manager = issuer
        .issue("m-dongpo-01", "desk", "", "", Duration::from_secs(3_600))
        .expect("token");
    let mut routing = RoutingClient::new(tls_only(&backend.routing).await);
    let set = |assignee: &str| SetAvailabilityRequest {
        assignee_id: assignee.into(),
        availability: Availability::OnDuty as i32,
        note: "back from the field".into(),
        ..SetAvailabilityRequest::default()
    };

    // The station desk: its own managers, yes; another station's, no.
    routing
        .set_availability(bearer(set("m-chengguan-02"), Some(&desk)))
        .await
        .expect("the station's own manager");
    let other = routing
        .set_availability(bearer(set("m-dongpo-01"), Some(&desk)))
        .await
        .expect_err("another station's manager");
    assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");
    assert!(other.message().contains("st-chengguan"), "{other:?}");
    let peek = routing
        .get_availability(bearer(
            GetAvailabilityRequest {
                assignee_id: "desk-st-xihe".into(),
            },
            Some(&desk),
        ))
        .await
        .expect_err("another station's desk");
    assert_eq!(peek.code(), Code::PermissionDenied, "{peek:?}");

    // A manager: itself and its station's desk, not another station.
    routing
        .set_availability(bearer(set("m-dongpo-01"), Some(&manager)))
        .await
        .expect("itself");
    routing
        .get_availability(bearer(
            GetAvailabilityRequest {
                assignee_id: "desk-st-dongpo".into(),
            },
            Some(&manager),
        ))
        .await
        .expect("its station's desk");
    let foreign = routing
        .set_availability(bearer(set("m-chengguan-01"), Some(&manager)))
        .await
        .expect_err("another station");
    assert_eq!(foreign.code(), Code::PermissionDenied, "{foreign:?}");
}
