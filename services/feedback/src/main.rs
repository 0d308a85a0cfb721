//! Feedback: follow-up calls, reopens, complaints and praise, scorecards and service stars.
//!
//! The process: its own RocksDB event log, the outbox relay to JetStream, and
//! gRPC on port 50054 by default (health, reflection, `EventLog`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use lineguard_eventlog::{EventTypes, NoProjections};
use lineguard_runtime::{CommonArgs, ServiceSpec};
use tonic::service::RoutesBuilder;

/// The Lineguard feedback service.
#[derive(Debug, Parser)]
#[command(name = "lineguard-feedback", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let spec = ServiceSpec {
        name: "feedback",
        default_grpc_port: 50054,
        event_types: EventTypes::new(),
        projector: Arc::new(NoProjections),
        api_services: Vec::new(),
        mirror: None,
    };
    lineguard_runtime::run(
        spec,
        args.common,
        async |_host| Ok(RoutesBuilder::default()),
    )
    .await
}
