//! The routing process: `lineguard-routing --help` lists its flags.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lineguard_bus::ConsumerConfig;
use lineguard_routing::api::RoutingService;
use lineguard_routing::dispatch_events::{self, DispatchEvents};
use lineguard_routing::feedback_events::{self, FeedbackEvents};
use lineguard_routing::intake_events::{self, IntakeEvents};
use lineguard_routing::projection::RoutingProjector;
use lineguard_routing::router::{Router, RoutingConfig};
use lineguard_routing::startup::{adopt_policy_file, load_directory_file};
use lineguard_runtime::{CommonArgs, HostError, ServiceSpec, parse_duration};
use tonic::service::RoutesBuilder;

/// The Lineguard routing service: one hop to the district's owner,
/// escalation up the three lines.
#[derive(Debug, Parser)]
#[command(name = "lineguard-routing", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Directory file (TOML) to bring the stored directory in line with at
    /// start-up; without it the stored directory is used as it is.
    #[arg(long, env = "LINEGUARD_DIRECTORY")]
    directory: Option<PathBuf>,
    /// Time-limit policy file (TOML) to adopt at start-up; without it the
    /// newest adopted version stays in force.
    #[arg(long, env = "LINEGUARD_POLICY")]
    policy: Option<PathBuf>,
    /// An assignee with more open tickets than this is passed over.
    #[arg(long, env = "LINEGUARD_OVERLOAD_THRESHOLD", default_value_t = 50)]
    overload_threshold: u32,
    /// How often due timers are looked for (escalations, warnings, breaches).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    timer_tick: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    lineguard_runtime::block_on(args.common.blocking_threads, serve(args))
}

/// The process, from its parsed flags to its exit.
async fn serve(args: Args) -> ExitCode {
    let spec = ServiceSpec {
        name: lineguard_routing::SERVICE,
        default_grpc_port: 50052,
        event_types: lineguard_routing::event_types(),
        projector: Arc::new(RoutingProjector),
        mirror: None,
        api_services: vec!["lineguard.routing.v1.Routing"],
    };
    let overload_threshold = args.overload_threshold;
    lineguard_runtime::run(spec, args.common, async move |host| {
        let config = RoutingConfig {
            overload_threshold,
            calendar: host.calendar.clone(),
        };
        let router = Router::new(host.log.clone(), config);
        let setup = |e: lineguard_routing::router::RouterError| HostError::Setup(e.to_string());
        if let Some(path) = &args.policy {
            adopt_policy_file(&router, path).await.map_err(setup)?;
        }
        if router.current_policy_version().map_err(setup)?.is_none() {
            return Err(HostError::Setup(
                "no time-limit policy: give --policy (e.g. deploy/policy.toml)".into(),
            ));
        }
        if let Some(path) = &args.directory {
            load_directory_file(&router, path).await.map_err(setup)?;
        }
        host.add_consumer(
            ConsumerConfig::new(intake_events::CONSUMER, "intake")
                .filtered(intake_events::subjects()),
            IntakeEvents::new(router.clone()),
        )?;
        host.add_consumer(
            ConsumerConfig::new(dispatch_events::CONSUMER, "dispatch")
                .filtered(dispatch_events::subjects()),
            DispatchEvents::new(router.clone()),
        )?;
        host.add_consumer(
            ConsumerConfig::new(feedback_events::CONSUMER, "feedback")
                .filtered(feedback_events::subjects()),
            FeedbackEvents::new(router.clone()),
        )?;
        {
            use lineguard_routing::policy::{ACCEPTANCE, ANSWER, ARRIVAL, CONTACT, RESTORATION};
            lineguard_runtime::metrics::clock_alerts_known(&[
                ACCEPTANCE,
                ARRIVAL,
                RESTORATION,
                CONTACT,
                ANSWER,
            ]);
        }
        let timers = lineguard_routing::timers::spawn(router.clone(), args.timer_tick);
        host.on_shutdown(timers.stop());
        let mut routes = RoutesBuilder::default();
        routes.add_service(
            RoutingService::new(router)
                .in_partitions(host.partitions())
                .server(),
        );
        Ok(routes)
    })
    .await
}
