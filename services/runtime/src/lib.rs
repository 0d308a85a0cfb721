//! What every Lineguard service process does the same way.
//!
//! A service's `main` parses its flags (with [`CommonArgs`] flattened in)
//! and calls [`run`] with its [`ServiceSpec`] and a set-up closure that
//! registers its consumers and returns its gRPC services. The host then:
//!
//! - opens the service's own event log under `--data-dir`;
//! - connects to NATS (retrying in the background: a service starts, and
//!   keeps committing, while NATS is down) and runs the outbox relay;
//! - serves gRPC with `grpc.health.v1` health, server reflection (v1 and
//!   v1alpha), the `EventLog` read API and the service's own API;
//! - on SIGTERM or Ctrl-C: reports NOT_SERVING, finishes in-flight requests,
//!   stops the consumers, flushes the outbox (bounded by
//!   `--shutdown-timeout`), and closes the log.

pub mod locks;
pub mod periodic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use lineguard_bus::{
    ConsumerConfig, ConsumerHandle, Handler, Mirror, OutboxRelay, RelayConfig, spawn_consumer,
};
use lineguard_eventlog::{EventLog, EventLogService, EventTypes, LogConfig, Projector};
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Flags every service takes. Environment variables name the same settings.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Address the gRPC server listens on [default: 127.0.0.1:<the service's port>].
    #[arg(long, env = "LINEGUARD_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Directory of the service's event log and state [default: .lineguard/<service>].
    #[arg(long, env = "LINEGUARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// NATS server with JetStream.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Log output format.
    #[arg(long, env = "LINEGUARD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` EnvFilter syntax (RUST_LOG wins if set).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Longest wait, on shutdown, for in-flight work and the outbox flush.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Drop the projections and rebuild them from the log before serving
    /// (logs the digests before and after).
    #[arg(long)]
    pub rebuild_projections: bool,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses `250ms`, `10s` (or a bare number of seconds), `2m`, `24h` and `30d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3_600)),
        "d" => Ok(Duration::from_secs(n * 86_400)),
        _ => Err(format!(
            "invalid duration unit in {text:?} (use ms, s, m, h or d)"
        )),
    }
}

/// What makes one service different from another, as far as the host cares.
pub struct ServiceSpec {
    /// `intake`, `routing`, `dispatch` or `feedback`.
    pub name: &'static str,
    /// Port used when `--grpc-addr` is not given.
    pub default_grpc_port: u16,
    /// Event types the service's log accepts.
    pub event_types: EventTypes,
    /// The service's projector.
    pub projector: Arc<dyn Projector>,
    /// Fully qualified names of the service's own gRPC services, for health.
    pub api_services: Vec<&'static str>,
    /// A second subject some of its events are also published on.
    pub mirror: Option<Mirror>,
}

/// Why a service could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("event log: {0}")]
    Log(#[from] lineguard_eventlog::Error),
    #[error("nats: {0}")]
    Nats(String),
    #[error("grpc: {0}")]
    Grpc(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("set-up: {0}")]
    Setup(String),
}

/// Work a service asks to have done at shutdown, before its consumers stop.
type ShutdownStep = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A running service process: its log, its bus connections, its tasks.
pub struct Host {
    /// The service's own event log.
    pub log: EventLog,
    /// JetStream on the service's NATS connection.
    pub jetstream: jetstream::Context,
    /// The NATS connection.
    pub nats: async_nats::Client,
    name: &'static str,
    grpc_addr: SocketAddr,
    shutdown_timeout: Duration,
    api_services: Vec<&'static str>,
    relay: OutboxRelay,
    consumers: Vec<ConsumerHandle>,
    shutdown_steps: Vec<ShutdownStep>,
}

/// Sets up `tracing` once for the process. Customer names and phone numbers
/// are never logged: spans carry ticket, event and correlation ids only.
pub fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

impl Host {
    /// Opens the log, connects to NATS in the background and starts the relay.
    pub async fn start(spec: ServiceSpec, args: CommonArgs) -> Result<Host, HostError> {
        init_tracing(args.log_format, &args.log_level);
        let data_dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".lineguard").join(spec.name));
        std::fs::create_dir_all(&data_dir)?;
        let log_config = LogConfig::new(data_dir.join("eventlog"), spec.name)
            .with_event_types(spec.event_types)
            .with_projector(spec.projector);
        let log = tokio::task::spawn_blocking(move || EventLog::open(log_config))
            .await
            .map_err(|e| HostError::Io(std::io::Error::other(e)))??;
        if args.rebuild_projections {
            let rebuilt = log.rebuild_projections_checked().await?;
            tracing::info!(service = spec.name, replayed = rebuilt.events_replayed,
                digest_before = %rebuilt.digest_before, digest_after = %rebuilt.digest_after,
                "projections rebuilt from the log at start-up");
        }

        let nats = async_nats::ConnectOptions::new()
            .name(format!("lineguard-{}", spec.name))
            .retry_on_initial_connect()
            .connect(&args.nats_url)
            .await
            .map_err(|e| HostError::Nats(e.to_string()))?;
        let jetstream = jetstream::new(nats.clone());
        let relay = OutboxRelay::spawn(
            log.clone(),
            jetstream.clone(),
            RelayConfig {
                mirror: spec.mirror.clone(),
                ..RelayConfig::default()
            },
        );
        let grpc_addr = args
            .grpc_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], spec.default_grpc_port)));
        tracing::info!(service = spec.name, %grpc_addr, data_dir = %data_dir.display(),
            nats_url = %args.nats_url, "service starting");
        Ok(Host {
            log,
            jetstream,
            nats,
            name: spec.name,
            grpc_addr,
            shutdown_timeout: args.shutdown_timeout,
            api_services: spec.api_services,
            relay,
            consumers: Vec::new(),
            shutdown_steps: Vec::new(),
        })
    }

    /// Starts a durable consumer committing into this service's log.
    pub fn add_consumer<H: Handler>(&mut self, config: ConsumerConfig, handler: H) {
        self.consumers.push(spawn_consumer(
            self.jetstream.clone(),
            self.log.clone(),
            config,
            handler,
        ));
    }

    /// Runs `step` at shutdown, after gRPC has stopped and before the
    /// consumers stop (e.g. stopping a service's own background task).
    pub fn on_shutdown(&mut self, step: impl std::future::Future<Output = ()> + Send + 'static) {
        self.shutdown_steps.push(Box::pin(step));
    }

    /// Serves gRPC until SIGTERM or Ctrl-C, then shuts down in order.
    pub async fn serve(self, mut routes: RoutesBuilder) -> Result<(), HostError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(lineguard_protos::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| HostError::Grpc(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| HostError::Grpc(e.to_string()))?;
        routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(EventLogService::server(self.log.clone()));

        let listener = tokio::net::TcpListener::bind(self.grpc_addr).await?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut names = vec!["", "lineguard.eventlog.v1.EventLog"];
        names.extend(self.api_services.iter().copied());
        set_status(&health, &names, ServingStatus::Serving).await;
        tracing::info!(service = self.name, grpc_addr = %self.grpc_addr, "serving");

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let health_on_stop = health.clone();
        let names_on_stop = names.clone();
        let service = self.name;
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!(service, "shutdown requested");
            set_status(&health_on_stop, &names_on_stop, ServingStatus::NotServing).await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let server = tonic::transport::Server::builder()
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
        // Graceful shutdown waits for every connection to close, and a client
        // may never close its own (hyperium/hyper#4170): in-flight requests
        // get the shutdown timeout, then the connections are dropped.
        let drain_deadline = async {
            stopped(stop_rx).await;
            tokio::time::sleep(self.shutdown_timeout).await;
        };
        tokio::select! {
            served = server => served.map_err(|e| HostError::Grpc(e.to_string()))?,
            () = drain_deadline => {
                tracing::warn!(service = self.name, "connections still open after the shutdown timeout; closing them");
            }
        }
        self.shutdown().await
    }

    /// Stops consumers, flushes the outbox, closes the log.
    pub async fn shutdown(self) -> Result<(), HostError> {
        for step in self.shutdown_steps {
            step.await;
        }
        for consumer in self.consumers {
            consumer.stop().await;
        }
        let flushed = self.relay.flush(self.shutdown_timeout).await;
        if !flushed {
            tracing::warn!(
                service = self.name,
                backlog = self.log.outbox_backlog(),
                "outbox not flushed before the shutdown timeout; it is kept and sent at next start"
            );
        }
        self.relay.stop().await;
        self.log.close().await?;
        // Unbounded while NATS is down: the outbox keeps whatever was not sent.
        if tokio::time::timeout(Duration::from_secs(2), self.nats.flush())
            .await
            .is_err()
        {
            tracing::warn!(service = self.name, "NATS unreachable at shutdown");
        }
        tracing::info!(service = self.name, "stopped");
        Ok(())
    }
}

/// Runs a service process to its end: starts the [`Host`], lets `setup`
/// do the service's start-up work, register consumers and return its gRPC
/// routes, serves until SIGTERM or Ctrl-C, shuts down. A failure is logged
/// and printed, and the exit code says whether the process ended cleanly.
pub async fn run(
    spec: ServiceSpec,
    args: CommonArgs,
    setup: impl AsyncFnOnce(&mut Host) -> Result<RoutesBuilder, HostError>,
) -> ExitCode {
    let name = spec.name;
    let result = async {
        let mut host = Host::start(spec, args).await?;
        let routes = match setup(&mut host).await {
            Ok(routes) => routes,
            Err(e) => {
                host.shutdown().await?;
                return Err(e);
            }
        };
        host.serve(routes).await
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(service = name, error = %err, "service failed");
            eprintln!("lineguard-{name}: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn set_status(health: &HealthReporter, names: &[&str], status: ServingStatus) {
    for name in names {
        health.set_service_status(*name, status).await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("10w").is_err());
        assert!(parse_duration("x").is_err());
    }
}
