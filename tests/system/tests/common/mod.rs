//! What the system tests share: the backend's processes over a private
//! nats-server, clients to them, and waiting for eventual consistency.

#![allow(dead_code)] // each test file uses its own part of this

use std::path::Path;
use std::time::{Duration, Instant};

use lineguard_harness::{NatsServer, ServiceProcess, workspace_binary};
use lineguard_protos::dispatch::v1::dispatch_client::DispatchClient;
use lineguard_protos::eventlog::v1::{ReadStreamRequest, event_log_client::EventLogClient};
use lineguard_protos::feedback::v1::feedback_client::FeedbackClient;
use lineguard_protos::intake::v1::{
    Caller, Channel, GetTicketRequest, ReportTicketRequest, TicketKind, TicketView,
    intake_client::IntakeClient,
};
use lineguard_protos::routing::v1::{GetRouteRequest, RouteView, routing_client::RoutingClient};
use prost_types::Timestamp;
use tonic::transport::Channel as GrpcChannel;

/// The demo directory's crew of d-chengguan-01 … 05, the tests' crew.
pub const CREW: &str = "crew-chengguan-1";

/// The header of a crew action of [`CREW`] on `order` (a ticket or
/// incident id), stamped now.
pub fn header(order: &str, action: &str) -> Option<lineguard_protos::dispatch::v1::ActionHeader> {
    Some(lineguard_protos::dispatch::v1::ActionHeader {
        crew_id: CREW.into(),
        order_id: order.into(),
        action_id: action.into(),
        device_time: Some(Timestamp::from(std::time::SystemTime::now())),
    })
}

/// Fault repair's acceptance window in the test policy.
pub const WINDOW: Duration = Duration::from_secs(4);

pub use lineguard_harness::deploy_file as deploy;

/// The deployed policy with a short fault-repair acceptance window.
pub fn test_policy(dir: &Path) -> String {
    let text = std::fs::read_to_string(deploy("policy.toml")).expect("policy");
    let text = text
        .replace("version = \"2026.1\"", "version = \"test.1\"")
        .replacen(
            "acceptance = \"5m\"",
            &format!("acceptance = \"{}s\"", WINDOW.as_secs()),
            1,
        );
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).expect("write policy");
    path.display().to_string()
}

pub struct Backend {
    pub nats: NatsServer,
    pub intake: ServiceProcess,
    pub routing: ServiceProcess,
    pub dispatch: Option<ServiceProcess>,
    pub feedback: Option<ServiceProcess>,
    _dir: tempfile::TempDir,
}

impl Drop for Backend {
    /// A failing test shows what each process logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut processes = vec![("intake", &self.intake), ("routing", &self.routing)];
            if let Some(d) = &self.dispatch {
                processes.push(("dispatch", d));
            }
            if let Some(f) = &self.feedback {
                processes.push(("feedback", f));
            }
            for (name, process) in processes {
                let log = process.log();
                let trouble: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
                    .take(40)
                    .collect();
                eprintln!(
                    "---- {name}: first {} warnings, errors, panics ----",
                    trouble.len()
                );
                for line in trouble {
                    eprintln!("{line}");
                }
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- {name} (last {} lines) ----", tail.len());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

impl Backend {
    /// Intake and routing (fault repair accepted within [`WINDOW`]).
    pub async fn start() -> Backend {
        Self::start_with(true, false).await
    }

    /// Intake, routing and, if asked, dispatch; a short fault-repair
    /// acceptance window, or the deployed policy's.
    pub async fn start_with(short_window: bool, with_dispatch: bool) -> Backend {
        Self::launch(short_window, with_dispatch, None).await
    }

    /// All four services: a short fault-repair acceptance window, and
    /// feedback started with `feedback_args`.
    pub async fn start_all(feedback_args: &[String]) -> Backend {
        Self::launch(true, true, Some(feedback_args)).await
    }

    async fn launch(
        short_window: bool,
        with_dispatch: bool,
        feedback_args: Option<&[String]>,
    ) -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = NatsServer::start().expect("nats");
        let routing = ServiceProcess::start_with_args(
            workspace_binary("lineguard-routing"),
            &dir.path().join("routing"),
            &nats.url(),
            &[
                "--policy".into(),
                if short_window {
                    test_policy(dir.path())
                } else {
                    deploy("policy.toml")
                },
                "--directory".into(),
                deploy("directory.toml"),
                "--timer-tick".into(),
                "100ms".into(),
            ],
        )
        .expect("routing");
        let intake = ServiceProcess::start(
            workspace_binary("lineguard-intake"),
            &dir.path().join("intake"),
            &nats.url(),
        )
        .expect("intake");
        let dispatch = with_dispatch.then(|| {
            ServiceProcess::start_with_args(
                workspace_binary("lineguard-dispatch"),
                &dir.path().join("dispatch"),
                &nats.url(),
                &[
                    "--timer-tick".into(),
                    "100ms".into(),
                    // Crews' contacts are opened by intake.
                    "--peer".into(),
                    format!("intake={}", intake.endpoint()),
                ],
            )
            .expect("dispatch")
        });
        let feedback = feedback_args.map(|args| {
            ServiceProcess::start_with_args(
                workspace_binary("lineguard-feedback"),
                &dir.path().join("feedback"),
                &nats.url(),
                args,
            )
            .expect("feedback")
        });
        let backend = Backend {
            nats,
            intake,
            routing,
            dispatch,
            feedback,
            _dir: dir,
        };
        if let Some(feedback) = &backend.feedback {
            feedback
                .wait_healthy(Duration::from_secs(30))
                .await
                .expect("feedback healthy");
        }
        if let Some(dispatch) = &backend.dispatch {
            dispatch
                .wait_healthy(Duration::from_secs(30))
                .await
                .expect("dispatch healthy");
        }
        backend
            .routing
            .wait_healthy(Duration::from_secs(30))
            .await
            .expect("routing healthy");
        backend
            .intake
            .wait_healthy(Duration::from_secs(30))
            .await
            .expect("intake healthy");
        backend.wait_for_directory_copy().await;
        backend
    }

    pub async fn dispatch(&self) -> DispatchClient<GrpcChannel> {
        let process = self.dispatch.as_ref().expect("started with dispatch");
        DispatchClient::new(process.channel().await.expect("dispatch channel"))
    }

    /// `crew`'s dispatch events from its first, once dispatch knows the
    /// crew (it learns crews from routing's directory).
    pub async fn watch_crew(
        &self,
        crew: &str,
    ) -> tonic::Streaming<lineguard_protos::dispatch::v1::CrewEvent> {
        let dispatch = self.dispatch().await;
        eventually("dispatch to know the crew", || {
            let mut dispatch = dispatch.clone();
            async move {
                dispatch
                    .watch_dispatches(lineguard_protos::dispatch::v1::WatchDispatchesRequest {
                        crew_id: crew.into(),
                        after_sequence: 0,
                        ..Default::default()
                    })
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    pub async fn feedback(&self) -> FeedbackClient<GrpcChannel> {
        let process = self.feedback.as_ref().expect("started with feedback");
        FeedbackClient::new(process.channel().await.expect("feedback channel"))
    }

    pub async fn intake(&self) -> IntakeClient<GrpcChannel> {
        IntakeClient::new(self.intake.channel().await.expect("intake channel"))
    }

    pub async fn routing(&self) -> RoutingClient<GrpcChannel> {
        RoutingClient::new(self.routing.channel().await.expect("routing channel"))
    }

    /// Intake resolves accounts to districts from its copy of routing's
    /// directory: wait until it has all of it (3 AccountsAssigned events for
    /// the demo's 5,166 accounts).
    pub async fn wait_for_directory_copy(&self) {
        let log = EventLogClient::new(self.intake.channel().await.expect("channel"));
        eventually("intake's copy of the accounts", || {
            let mut log = log.clone();
            async move {
                let events = log
                    .read_stream(ReadStreamRequest {
                        stream_id: "observed-routing".into(),
                        from_version: 1,
                        max_count: 100,
                        ..ReadStreamRequest::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .events;
                (events.len() >= 3).then_some(())
            }
        })
        .await;
    }

    pub async fn route(&self, id: &str) -> Option<RouteView> {
        self.routing()
            .await
            .get_route(GetRouteRequest {
                ticket_id: id.into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    pub async fn ticket(&self, id: &str) -> TicketView {
        self.intake()
            .await
            .get_ticket(GetTicketRequest {
                ticket_id: id.into(),
            })
            .await
            .expect("ticket")
            .into_inner()
            .ticket
            .expect("view")
    }

    /// Routing's own events on a case's stream, by short type name.
    pub async fn routing_events(&self, case: &str) -> Vec<(String, Vec<u8>)> {
        let mut log = EventLogClient::new(self.routing.channel().await.expect("channel"));
        log.read_stream(ReadStreamRequest {
            stream_id: case.into(),
            from_version: 1,
            max_count: 1_000,
            ..ReadStreamRequest::default()
        })
        .await
        .expect("read")
        .into_inner()
        .events
        .into_iter()
        .map(|e| (short_type(&e.event_type), e.payload.to_vec()))
        .collect()
    }
}

/// The last segment of an event's type (`TicketRouted`).
pub fn short_type(event_type: &str) -> String {
    event_type.rsplit('.').next().unwrap_or("").to_string()
}

/// The events `process`'s log holds about `correlation` (one page).
pub async fn correlated(
    process: &ServiceProcess,
    correlation: &str,
) -> Vec<lineguard_protos::eventlog::v1::EventEnvelope> {
    let mut log = EventLogClient::new(process.channel().await.expect("channel"));
    log.read_correlation(lineguard_protos::eventlog::v1::ReadCorrelationRequest {
        correlation_id: correlation.into(),
        ..Default::default()
    })
    .await
    .expect("read")
    .into_inner()
    .events
}

/// Polls `probe` until it gives a value (at most 20 s).
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first `n` demo accounts in `district`.
pub fn accounts_in(district: &str, n: usize) -> Vec<String> {
    let csv = std::fs::read_to_string(deploy("demo-accounts.csv")).expect("accounts");
    let accounts: Vec<String> = csv
        .lines()
        .filter_map(|l| l.strip_suffix(&format!(",{district}")))
        .take(n)
        .map(str::to_string)
        .collect();
    assert_eq!(accounts.len(), n, "demo accounts in {district}");
    accounts
}

pub fn report(key: &str, channel: Channel, kind: TicketKind, account: &str) -> ReportTicketRequest {
    ReportTicketRequest {
        idempotency_key: key.into(),
        channel: channel as i32,
        kind: kind as i32,
        account_number: account.into(),
        address: "No. 8 Riverside Road".into(),
        caller: Some(Caller {
            name: "Customer".into(),
            phone: "13800138000".into(),
        }),
        description: "No power in the whole building".into(),
        ..ReportTicketRequest::default()
    }
}

pub fn seconds(t: &Option<Timestamp>) -> f64 {
    t.as_ref()
        .map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

/// Waits until no process's log head has moved for `still`, at most `limit`.
pub async fn quiet(processes: &[&ServiceProcess], still: Duration, limit: Duration) {
    use lineguard_protos::eventlog::v1::GetLogInfoRequest;
    let mut last = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let mut heads = Vec::new();
        for p in processes {
            let mut log = EventLogClient::new(p.channel().await.expect("channel"));
            heads.push(
                log.get_log_info(GetLogInfoRequest {})
                    .await
                    .expect("info")
                    .into_inner()
                    .head_position,
            );
        }
        if heads == last {
            return;
        }
        assert!(Instant::now() < deadline, "the backend never went quiet");
        last = heads;
        tokio::time::sleep(still).await;
    }
}

/// Waits, at most `limit`, until no consumer of any of `processes` holds
/// a parked event (one waits for its prerequisite, or for the next sweep,
/// every 10 s, when a wake was missed), then asserts that none holds a
/// parked or a dead-lettered event.
pub async fn assert_nothing_parked_or_dead_within(processes: &[&ServiceProcess], limit: Duration) {
    use lineguard_protos::bus::v1::ListParkedRequest;
    use lineguard_protos::bus::v1::consumers_client::ConsumersClient;
    let deadline = Instant::now() + limit;
    'wait: while Instant::now() < deadline {
        for p in processes {
            let mut consumers = ConsumersClient::new(p.channel().await.expect("channel"));
            let parked = consumers
                .list_parked(ListParkedRequest::default())
                .await
                .expect("parked")
                .into_inner();
            if parked.total > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue 'wait;
            }
        }
        break;
    }
    assert_nothing_parked_or_dead(processes).await;
}

/// Asserts that no consumer of any of `processes` holds a parked or a
/// dead-lettered event.
pub async fn assert_nothing_parked_or_dead(processes: &[&ServiceProcess]) {
    use lineguard_protos::bus::v1::consumers_client::ConsumersClient;
    use lineguard_protos::bus::v1::{ListDeadLettersRequest, ListParkedRequest};
    for p in processes {
        let mut consumers = ConsumersClient::new(p.channel().await.expect("channel"));
        let dead = consumers
            .list_dead_letters(ListDeadLettersRequest::default())
            .await
            .expect("dead letters")
            .into_inner();
        assert_eq!(dead.total, 0, "{:?}", dead.dead_letters);
        let parked = consumers
            .list_parked(ListParkedRequest::default())
            .await
            .expect("parked")
            .into_inner();
        assert_eq!(parked.total, 0, "{:?}", parked.parked);
    }
}

/// The flags each service of a storm's backend gets beside the common
/// ones: routing the deployed policy and directory, feedback the rules,
/// fast timer ticks, and intake `intake_flags`.
pub fn storm_backend_flags(name: &str, intake_flags: &[String]) -> Vec<String> {
    let (policy, directory, rules) = (
        deploy("policy.toml"),
        deploy("directory.toml"),
        deploy("feedback.toml"),
    );
    let own: Vec<&str> = match name {
        "routing" => vec!["--policy", &policy, "--directory", &directory],
        "feedback" => vec!["--rules", &rules, "--timer-tick", "100ms"],
        "dispatch" => vec!["--timer-tick", "100ms"],
        _ => vec![],
    };
    let mut own: Vec<String> = own.into_iter().map(str::to_string).collect();
    if name == "intake" {
        own.extend_from_slice(intake_flags);
    }
    own
}

/// Clients of `services`, as an administrator.
pub fn admin_clients(
    services: &lineguard_harness::FourServices,
) -> lineguard_ticketctl::endpoints::Clients {
    let endpoints = lineguard_ticketctl::endpoints::Endpoints {
        intake: services.intake.endpoint(),
        routing: services.routing.endpoint(),
        dispatch: services.dispatch.endpoint(),
        feedback: services.feedback.endpoint(),
        credentials: Some(lineguard_harness::test_credentials().path.clone()),
        principal: "admin:dev".into(),
    };
    lineguard_ticketctl::endpoints::Clients::new(&endpoints).expect("clients")
}

/// A storm at `rate` calls a second of nothing but plain calls worked to
/// their end, over the demo county.
pub fn storm_at_rate(rate: f64) -> lineguard_ticketctl::simulate::StormConfig {
    lineguard_ticketctl::simulate::StormConfig {
        tickets: 0,
        rate,
        seed: 0,
        accounts: deploy("demo-accounts.csv"),
        directory: deploy("directory.toml"),
        slow_share: 0.0,
        slow_ack: Duration::from_secs(1),
        late_share: 0.0,
        return_share: 0.0,
        dissatisfied_share: 0.0,
        settle: Duration::from_secs(120),
        clock_start: None,
        clock_anchor: None,
        clock_speed: 1,
        phone_skew_minutes: 5,
        offline_share: 0.0,
        max_in_flight: 2_000,
        queue_calls: false,
        waves_of: 0,
        until_done: true,
    }
}

/// Once the backend is quiet: nothing parked or dead anywhere, every load
/// equal to routing's recount and every ticket worked to its end, and
/// every ticket replays from the four logs to intake's live view, exactly
/// `tickets` of them (none lost between the services, none made twice).
pub async fn assert_everything_adds_up(
    services: &lineguard_harness::FourServices,
    clients: &lineguard_ticketctl::endpoints::Clients,
    tickets: usize,
) {
    assert_partition_adds_up(services, clients, None, tickets).await;
}

/// [`assert_everything_adds_up`] for one partition of a split backend:
/// its instances quiet, its loads equal to its routing's recount, and the
/// `tickets` it opened replayed from its own four logs (`None`: unsplit).
pub async fn assert_partition_adds_up(
    services: &lineguard_harness::FourServices,
    clients: &lineguard_ticketctl::endpoints::Clients,
    partition: Option<lineguard_bus::Partition>,
    tickets: usize,
) {
    let processes = services.all();
    quiet(&processes, Duration::from_secs(3), Duration::from_secs(120)).await;
    // A parked event may still wait for the sweep that wakes it.
    assert_nothing_parked_or_dead_within(&processes, Duration::from_secs(60)).await;
    quiet(&processes, Duration::from_secs(3), Duration::from_secs(120)).await;
    let loads = clients
        .routing()
        .verify_loads(lineguard_protos::routing::v1::VerifyLoadsRequest {})
        .await
        .expect("verify loads")
        .into_inner();
    assert!(loads.mismatches.is_empty(), "{:?}", loads.mismatches);
    assert_eq!(loads.open_tickets, 0, "every ticket worked to its end");
    let checked = lineguard_ticketctl::verify::verify_partition(
        clients,
        partition,
        &indicatif::ProgressBar::hidden(),
    )
    .await
    .expect("verify");
    assert_eq!(
        checked.tickets, tickets,
        "intake holds exactly the tickets the calls made"
    );
    assert!(
        checked.is_clean(),
        "{:?} {:?}",
        checked.mismatches,
        checked.load_mismatches
    );
}

/// The four services of a [`Backend::start_all`], as ticketctl names them
/// (as an administrator).
pub fn endpoints(backend: &Backend) -> lineguard_ticketctl::endpoints::Endpoints {
    let feedback = backend.feedback.as_ref().expect("feedback");
    let dispatch = backend.dispatch.as_ref().expect("dispatch");
    lineguard_ticketctl::endpoints::Endpoints {
        intake: backend.intake.endpoint(),
        routing: backend.routing.endpoint(),
        dispatch: dispatch.endpoint(),
        feedback: feedback.endpoint(),
        credentials: Some(lineguard_harness::test_credentials().path.clone()),
        principal: "admin:dev".into(),
    }
}

/// Runs the `ticketctl` binary against `endpoints`.
pub fn ticketctl(
    endpoints: &lineguard_ticketctl::endpoints::Endpoints,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new(workspace_binary("ticketctl"))
        .arg("--credentials")
        .arg(&lineguard_harness::test_credentials().path)
        .args([
            "--intake",
            &endpoints.intake,
            "--routing",
            &endpoints.routing,
        ])
        .args([
            "--dispatch",
            &endpoints.dispatch,
            "--feedback",
            &endpoints.feedback,
        ])
        .args(args)
        .output()
        .expect("run ticketctl")
}

/// A storm that went through cleanly: every one of its `calls` taken, no
/// call failed (the driver retries what may heal, so an error is a
/// question for the backend), no order reached a phone twice, and crews
/// completed work.
pub fn assert_storm_clean(report: &lineguard_ticketctl::simulate::StormReport, calls: usize) {
    assert_eq!(report.calls, calls, "{:?}", report.errors);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.orders_received_twice, 0, "no order twice");
    assert!(report.completed > 0);
}

/// The head and projection digest of `service`'s log, as its EventLog API
/// reports them.
pub async fn log_state(
    clients: &lineguard_ticketctl::endpoints::Clients,
    service: &str,
) -> (u64, String) {
    let digest = clients
        .log(service)
        .expect("log client")
        .get_projection_digest(lineguard_protos::eventlog::v1::GetProjectionDigestRequest {})
        .await
        .expect("digest")
        .into_inner();
    (digest.head_position, digest.digest)
}
