//! Routing: sends each ticket in one hop to the owner of the customer's district, and escalates up the three lines when a line fails to pick up.
//!
//! The process: its own RocksDB event log, the outbox relay to JetStream, and
//! gRPC on port 50052 by default (health, reflection, `EventLog`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use lineguard_eventlog::{EventTypes, NoProjections};
use lineguard_runtime::{CommonArgs, ServiceSpec};
use tonic::service::RoutesBuilder;

/// The Lineguard routing service.
#[derive(Debug, Parser)]
#[command(name = "lineguard-routing", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let spec = ServiceSpec {
        name: "routing",
        default_grpc_port: 50052,
        event_types: EventTypes::new(),
        projector: Arc::new(NoProjections),
        api_services: Vec::new(),
    };
    lineguard_runtime::run(spec, args.common, |_host| RoutesBuilder::default()).await
}
