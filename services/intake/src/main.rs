//! Intake: where a ticket enters Lineguard, from any door (95598, station, district manager, app, WeChat, web).
//!
//! The process: its own RocksDB event log, the outbox relay to JetStream, and
//! gRPC on port 50051 by default (health, reflection, `EventLog`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use lineguard_eventlog::{EventTypes, NoProjections};
use lineguard_runtime::{CommonArgs, ServiceSpec};
use tonic::service::RoutesBuilder;

/// The Lineguard intake service.
#[derive(Debug, Parser)]
#[command(name = "lineguard-intake", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let spec = ServiceSpec {
        name: "intake",
        default_grpc_port: 50051,
        event_types: EventTypes::new(),
        projector: Arc::new(NoProjections),
        api_services: Vec::new(),
    };
    lineguard_runtime::run(spec, args.common, |_host| RoutesBuilder::default()).await
}
