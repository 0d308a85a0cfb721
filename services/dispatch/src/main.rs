//! Field dispatch: turns routed field work into work orders, streams them to crews, and takes the crews' actions.
//!
//! The process: its own RocksDB event log, the outbox relay to JetStream, and
//! gRPC on port 50053 by default (health, reflection, `EventLog`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use lineguard_eventlog::{EventTypes, NoProjections};
use lineguard_runtime::{CommonArgs, ServiceSpec};
use tonic::service::RoutesBuilder;

/// The Lineguard dispatch service.
#[derive(Debug, Parser)]
#[command(name = "lineguard-dispatch", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let spec = ServiceSpec {
        name: "dispatch",
        default_grpc_port: 50053,
        event_types: EventTypes::new(),
        projector: Arc::new(NoProjections),
        api_services: Vec::new(),
    };
    lineguard_runtime::run(
        spec,
        args.common,
        async |_host| Ok(RoutesBuilder::default()),
    )
    .await
}
