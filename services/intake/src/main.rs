//! The intake process: `lineguard-intake --help` lists its flags.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lineguard_bus::ConsumerConfig;
use lineguard_intake::api::{IntakeConfig, IntakeService};
use lineguard_intake::observe;
use lineguard_intake::projection::IntakeProjector;
use lineguard_runtime::{CommonArgs, ServiceSpec, parse_duration};
use tonic::service::RoutesBuilder;

/// The Lineguard intake service: tickets in from any door.
#[derive(Debug, Parser)]
#[command(name = "lineguard-intake", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Fault calls from one district within this time of an incident's last
    /// call join the incident.
    #[arg(long, env = "LINEGUARD_CORRELATION_WINDOW", default_value = "10m", value_parser = parse_duration)]
    correlation_window: Duration,
    /// Calls in one incident that mark it a probable outage.
    #[arg(long, env = "LINEGUARD_OUTAGE_THRESHOLD", default_value_t = 3)]
    outage_threshold: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let spec = ServiceSpec {
        name: lineguard_intake::SERVICE,
        default_grpc_port: 50051,
        event_types: lineguard_intake::event_types(),
        projector: Arc::new(IntakeProjector),
        mirror: None,
        api_services: vec!["lineguard.intake.v1.Intake"],
    };
    let config = IntakeConfig {
        correlation_window: args.correlation_window,
        outage_threshold: args.outage_threshold,
    };
    lineguard_runtime::run(spec, args.common, async move |host| {
        host.add_consumer(
            ConsumerConfig::new(observe::CONSUMER, "routing").filtered(observe::routing_subjects()),
            observe::Observer,
        );
        host.add_consumer(
            ConsumerConfig::new(observe::DISPATCH_CONSUMER, "dispatch")
                .filtered(observe::dispatch_subjects()),
            observe::Observer,
        );
        let mut routes = RoutesBuilder::default();
        routes.add_service(IntakeService::new(host.log.clone(), config).server());
        Ok(routes)
    })
    .await
}
