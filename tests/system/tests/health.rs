//! Health tells the truth: a service answers NOT_SERVING until it can do
//! its job (intake until its copy of routing's directory is loaded), the
//! bus has a health name of its own that turns NOT_SERVING while the
//! outbox cannot drain, and a NATS store too small for the streams stops
//! the start with a message saying what to change.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use lineguard_harness::{NatsServer, ServiceProcess, free_port, workspace_binary};
use lineguard_protos::intake::v1::intake_client::IntakeClient;
use lineguard_protos::intake::v1::{Channel, GetTicketRequest, TicketKind};
use tonic_health::pb::health_check_response::ServingStatus;

const SERVING: Option<i32> = Some(ServingStatus::Serving as i32);
const NOT_SERVING: Option<i32> = Some(ServingStatus::NotServing as i32);

fn loopback() -> SocketAddr {
    ([127, 0, 0, 1], free_port().expect("port")).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_is_not_serving_until_its_copy_of_the_directory_is_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsServer::start().expect("nats");
    let (intake_addr, routing_addr) = (loopback(), loopback());
    // Intake first, told where routing will be: routing is not there yet.
    let intake = ServiceProcess::start_on(
        workspace_binary("lineguard-intake"),
        intake_addr,
        &dir.path().join("intake"),
        &nats.url(),
        &["--peer".into(), format!("routing=https://{routing_addr}")],
    )
    .expect("intake");
    let answering = Instant::now() + Duration::from_secs(20);
    while intake.health("").await.is_none() {
        assert!(Instant::now() < answering, "intake answers health");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // For three seconds, with no routing: answering, but not ready.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(intake.health("").await, NOT_SERVING, "no directory yet");
        assert_eq!(
            intake.health("lineguard.intake.v1.Intake").await,
            NOT_SERVING
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let routing = ServiceProcess::start_on(
        workspace_binary("lineguard-routing"),
        routing_addr,
        &dir.path().join("routing"),
        &nats.url(),
        &[
            "--policy".into(),
            deploy("policy.toml"),
            "--directory".into(),
            deploy("directory.toml"),
        ],
    )
    .expect("routing");
    routing
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("routing ready");
    intake
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("intake ready");
    // The first report by account number after SERVING finds its district.
    let mut client = IntakeClient::new(intake.channel().await.expect("channel"));
    let account = &accounts_in("d-chengguan-03", 1)[0];
    let answer = client
        .report_ticket(report(
            "right-after-start",
            Channel::App,
            TicketKind::Complaint,
            account,
        ))
        .await
        .expect("report")
        .into_inner();
    let view = client
        .get_ticket(GetTicketRequest {
            ticket_id: answer.ticket_id,
        })
        .await
        .expect("ticket")
        .into_inner()
        .ticket
        .expect("view");
    assert_eq!(view.district_id, "d-chengguan-03");
    assert!(intake.log().contains("caught up with what the source held"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_has_its_own_health_which_fails_while_the_outbox_cannot_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsServer::start().expect("nats");
    let intake = ServiceProcess::start_with_args(
        workspace_binary("lineguard-intake"),
        &dir.path().join("intake"),
        &nats.url(),
        &["--bus-stall-limit".into(), "1s".into()],
    )
    .expect("intake");
    intake
        .wait_healthy(Duration::from_secs(30))
        .await
        .expect("ready");
    eventually("the bus to be healthy", || async {
        (intake.health("lineguard.bus").await == SERVING).then_some(())
    })
    .await;

    // NATS goes away; intake still takes reports (they wait in its outbox)
    // and says so: the bus is NOT_SERVING, the service is not.
    nats.kill().expect("kill nats");
    let mut client = IntakeClient::new(intake.channel().await.expect("channel"));
    client
        .report_ticket(report(
            "while-nats-is-down",
            Channel::Web,
            TicketKind::Complaint,
            &accounts_in("d-chengguan-02", 1)[0],
        ))
        .await
        .expect("a report is kept while NATS is down");
    eventually("the bus to be reported stuck", || async {
        (intake.health("lineguard.bus").await == NOT_SERVING).then_some(())
    })
    .await;
    assert_eq!(
        intake.health("").await,
        SERVING,
        "intake still takes reports"
    );
    assert!(intake.log().contains("the outbox has not drained"));

    // NATS back: the outbox drains and the bus is healthy again.
    nats.restart().expect("nats back");
    let back = Instant::now() + Duration::from_secs(40);
    while intake.health("lineguard.bus").await != SERVING {
        assert!(
            Instant::now() < back,
            "the bus healthy again after NATS is back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_store_too_small_for_the_streams_stops_the_start_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 64 MiB of file store; each stream asks to reserve 2 GiB.
    let nats =
        NatsServer::start_with_config("jetstream { max_file_store: 67108864 }").expect("nats");
    let mut intake = ServiceProcess::start(
        workspace_binary("lineguard-intake"),
        &dir.path().join("intake"),
        &nats.url(),
    )
    .expect("intake");
    let status = intake
        .wait_exit(Duration::from_secs(30))
        .expect("wait")
        .expect("the process stops instead of serving without a bus");
    assert!(!status.success());
    let log = intake.log();
    assert!(
        log.contains("NATS refused stream LINEGUARD_INTAKE"),
        "the message names the stream:\n{log}"
    );
    assert!(log.contains("max_file_store"), "and what to change:\n{log}");
}
