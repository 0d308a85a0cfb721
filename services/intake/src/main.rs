//! The intake process: `lineguard-intake --help` lists its flags.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lineguard_bus::ConsumerConfig;
use lineguard_intake::api::{IntakeConfig, IntakeService};
use lineguard_intake::customer::CustomerDigest;
use lineguard_intake::observe;
use lineguard_intake::projection::IntakeProjector;
use lineguard_intake::sealing::{LocalKeyStore, MasterKey};
use lineguard_runtime::{CommonArgs, HostError, ServiceSpec, parse_duration};
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
    /// The secret (16 bytes or more) of the keyed digest that recognises a
    /// repeat caller by phone [default: <data dir>/secrets/customer-digest.key,
    /// made at first start]. Keep it with the data: another secret stops
    /// recognising the callers of open tickets.
    #[arg(long, env = "LINEGUARD_CUSTOMER_DIGEST_KEY_FILE")]
    customer_digest_key_file: Option<std::path::PathBuf>,
    /// The master key (64 hex digits) that wraps every customer's data key.
    /// Wins over --master-key-file. Keep it apart from the data: with the
    /// data dir alone, nothing sealed can be read.
    #[arg(long, env = "LINEGUARD_MASTER_KEY", hide_env_values = true)]
    master_key: Option<String>,
    /// A file holding the master key (64 hex digits) [default: <data
    /// dir>/secrets/master.key, made at first start: development only].
    #[arg(long, env = "LINEGUARD_MASTER_KEY_FILE")]
    master_key_file: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    lineguard_runtime::block_on(args.common.blocking_threads, serve(args))
}

/// The process, from its parsed flags to its exit.
async fn serve(args: Args) -> ExitCode {
    let spec = ServiceSpec {
        name: lineguard_intake::SERVICE,
        default_grpc_port: 50051,
        event_types: lineguard_intake::event_types(),
        projector: Arc::new(IntakeProjector),
        mirror: None,
        api_services: vec!["lineguard.intake.v1.Intake"],
    };
    let data_dir = args.common.data_dir_of(lineguard_intake::SERVICE);
    let digest_file = args
        .customer_digest_key_file
        .clone()
        .unwrap_or_else(|| data_dir.join("secrets").join("customer-digest.key"));
    let config = IntakeConfig {
        correlation_window: args.correlation_window,
        outage_threshold: args.outage_threshold,
    };
    let (log_copy, replicas) = (
        args.common.log_copy,
        usize::from(args.common.stream_replicas),
    );
    lineguard_runtime::run(spec, args.common, async move |host| {
        host.add_consumer(
            ConsumerConfig::new(observe::CONSUMER, "routing").filtered(observe::routing_subjects()),
            observe::Observer,
        )?;
        host.add_consumer(
            ConsumerConfig::new(observe::DISPATCH_CONSUMER, "dispatch")
                .filtered(observe::dispatch_subjects()),
            observe::Observer,
        )?;
        let customers = CustomerDigest::load_or_create(&digest_file)
            .map_err(|e| HostError::Setup(e.to_string()))?;
        let setup = |e: lineguard_intake::sealing::SealError| HostError::Setup(e.to_string());
        let master = match (&args.master_key, &args.master_key_file) {
            (Some(hex), _) => MasterKey::from_hex("LINEGUARD_MASTER_KEY", hex).map_err(setup)?,
            (None, Some(file)) => MasterKey::load_or_create(file).map_err(setup)?,
            (None, None) => {
                let file = data_dir.join("secrets").join("master.key");
                tracing::warn!(file = %file.display(),
                    "no --master-key: using one kept beside the data (development only)");
                MasterKey::load_or_create(&file).map_err(setup)?
            }
        };
        let keys_path = data_dir.join("keys");
        let keys = if log_copy {
            // The keys are on the same disk as the log: kept off it too.
            let bucket_name = lineguard_bus::copy::key_bucket_name(host.bus_name());
            let bucket = lineguard_intake::key_copy::ensure_key_bucket(
                &host.jetstream,
                &bucket_name,
                replicas,
            )
            .await
            .map_err(setup)?;
            let replica = Arc::new(lineguard_intake::key_copy::JetStreamKeyReplica::new(
                host.jetstream.clone(),
                bucket,
                tokio::runtime::Handle::current(),
            ));
            tokio::task::spawn_blocking(move || {
                LocalKeyStore::open_replicated(&keys_path, master, replica)
            })
            .await
            .map_err(|e| HostError::Setup(e.to_string()))?
            .map_err(setup)?
        } else {
            LocalKeyStore::open(&keys_path, master).map_err(setup)?
        };
        let log = host.log.clone();
        if let Some(registry) = host.metrics_registry() {
            lineguard_intake::metrics::register(registry, log);
        }
        let mut routes = RoutesBuilder::default();
        routes.add_service(
            IntakeService::new(host.log.clone(), config, customers, Arc::new(keys))
                .in_partitions(host.partitions(), host.peer_channel("routing"))
                .server(),
        );
        Ok(routes)
    })
    .await
}
