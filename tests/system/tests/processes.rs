//! The four service processes, started as an operator would: each answers
//! health, reflection (v1 and v1alpha) and the EventLog API; bad requests get
//! clear statuses; SIGTERM stops cleanly; SIGKILL and restart lose nothing.

use std::time::Duration;

use futures::StreamExt;
use lineguard_harness::{NatsServer, ServiceProcess, workspace_binary};
use lineguard_protos::eventlog::v1::{
    GetLogInfoRequest, ReadAllRequest, ReadStreamRequest, SubscribeRequest,
    event_log_client::EventLogClient,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const SERVICES: [&str; 4] = ["intake", "routing", "dispatch", "feedback"];

fn start(service: &str, nats: &NatsServer, dir: &std::path::Path) -> ServiceProcess {
    let binary = workspace_binary(&format!("lineguard-{service}"));
    assert!(
        binary.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        binary.display()
    );
    // Routing needs a time-limit policy before it can route anything.
    let extra = match service {
        "routing" => vec!["--policy".to_string(), deploy_file("policy.toml")],
        _ => Vec::new(),
    };
    ServiceProcess::start_with_args(binary, &dir.join(service), &nats.url(), &extra)
        .expect("start service")
}

fn deploy_file(name: &str) -> String {
    format!("{}/../../deploy/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn channel(endpoint: String) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(endpoint)
        .expect("endpoint")
        .tls_config(lineguard_harness::admin_credentials().tls("127.0.0.1"))
        .expect("tls")
        .connect()
        .await
        .expect("connect")
}

/// The services a reflection endpoint lists; `$version` is `v1` or `v1alpha`,
/// whose generated clients have the same shape in different modules.
macro_rules! reflection_services {
    ($version:ident, $endpoint:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(channel($endpoint).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .expect(concat!("reflection ", stringify!($version)))
            .into_inner();
        match responses
            .next()
            .await
            .expect("a response")
            .expect("ok")
            .message_response
        {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }};
}

#[tokio::test]
async fn every_service_serves_health_reflection_and_its_event_log() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let processes: Vec<_> = SERVICES
        .iter()
        .map(|s| start(s, &nats, dir.path()))
        .collect();
    for (service, process) in SERVICES.iter().zip(&processes) {
        process
            .wait_healthy(Duration::from_secs(60))
            .await
            .expect("healthy");
        let endpoint = process.endpoint();

        let mut health = HealthClient::new(channel(endpoint.clone()).await);
        let status = health
            .check(HealthCheckRequest {
                service: "lineguard.eventlog.v1.EventLog".into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");

        for listed in [
            reflection_services!(v1, endpoint.clone()),
            reflection_services!(v1alpha, endpoint.clone()),
        ] {
            let mut wanted = vec!["lineguard.eventlog.v1.EventLog", "grpc.health.v1.Health"];
            if *service == "intake" {
                wanted.push("lineguard.intake.v1.Intake");
            }
            for wanted in wanted {
                assert!(
                    listed.iter().any(|s| s == wanted),
                    "{service}: {wanted} not in {listed:?}"
                );
            }
        }

        let mut log = EventLogClient::new(process.channel().await.expect("connect"));
        let info = log
            .get_log_info(GetLogInfoRequest {})
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.service, *service);
        // Routing's log starts with the adoption of its time-limit policy.
        let recorded_at_start = u64::from(*service == "routing");
        assert_eq!(info.head_position, recorded_at_start);

        let err = log
            .read_stream(ReadStreamRequest {
                stream_id: "bad id!".into(),
                ..Default::default()
            })
            .await
            .expect_err("malformed id");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("stream_id"), "{}", err.message());
        let err = log
            .read_stream(ReadStreamRequest {
                stream_id: "ticket-none".into(),
                ..Default::default()
            })
            .await
            .expect_err("unknown stream");
        assert_eq!(err.code(), tonic::Code::NotFound);
        let err = log
            .read_all(ReadAllRequest {
                from_position: 9,
                max_count: 0,
                ..Default::default()
            })
            .await
            .expect_err("past the end");
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        let err = log
            .read_all(ReadAllRequest {
                from_position: 0,
                max_count: 1_000_000,
                ..Default::default()
            })
            .await
            .expect_err("page too large");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("max_count"), "{}", err.message());
        let page = log
            .read_all(ReadAllRequest {
                from_position: 0,
                max_count: 10,
                ..Default::default()
            })
            .await
            .expect("first page")
            .into_inner();
        assert_eq!(page.events.len() as u64, recorded_at_start);
        assert_eq!(page.next_position, recorded_at_start + 1);
        let err = log
            .subscribe(SubscribeRequest { from_position: 5 })
            .await
            .expect_err("past the end");
        assert_eq!(err.code(), tonic::Code::OutOfRange);
    }
    for (service, mut process) in SERVICES.iter().zip(processes) {
        let status = process
            .terminate(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{service}: {e}\n{}", process.log()));
        assert!(
            status.success(),
            "{service} exits cleanly on SIGTERM: {status:?}\n{}",
            process.log()
        );
        assert!(
            process.log().contains("stopped"),
            "{service} logged its shutdown"
        );
    }
}

#[tokio::test]
async fn a_service_killed_with_sigkill_restarts_on_its_data() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = start("routing", &nats, dir.path());
    process
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("healthy");
    process.kill9().expect("kill -9");
    process.restart().expect("restart");
    process
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("healthy after kill -9");
    let mut log = EventLogClient::new(process.channel().await.expect("connect"));
    let info = log
        .get_log_info(GetLogInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.service, "routing");
}

#[tokio::test]
async fn a_service_starts_while_nats_is_down_and_is_ready_once_it_is_back() {
    let mut nats = NatsServer::start().expect("nats");
    let url = nats.url();
    nats.stop().expect("stop nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = workspace_binary("lineguard-feedback");
    let mut process =
        ServiceProcess::start(binary, &dir.path().join("feedback"), &url).expect("start");
    // It starts and answers (its log is open), but it cannot know what its
    // sources published while it cannot reach the bus: NOT_SERVING.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let not_serving =
        Some(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32);
    while process.health("").await != not_serving {
        assert!(std::time::Instant::now() < deadline, "{}", process.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut log = EventLogClient::new(process.channel().await.expect("connect"));
    log.get_log_info(GetLogInfoRequest {})
        .await
        .expect("the log answers without NATS");
    nats.restart().expect("nats back");
    process
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("ready once NATS is back");
    let status = process
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", process.log()));
    assert!(status.success(), "{}", process.log());
}
