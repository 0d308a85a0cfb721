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
//!   v1alpha), the `EventLog` read API, the consumers' parked events and
//!   dead letters (`lineguard.bus.v1.Consumers`) and the service's own API;
//! - on SIGTERM or Ctrl-C: reports NOT_SERVING, finishes in-flight requests,
//!   stops the consumers, flushes the outbox (bounded by
//!   `--shutdown-timeout`), and closes the log.
//!
//! Health tells the truth: NOT_SERVING until every consumer has caught up
//! with its source, `lineguard.bus` NOT_SERVING while the outbox is stuck.
//! With `--credentials`, every call comes over TLS and is authenticated
//! ([`auth`], [`credentials`]) and held to the access policy ([`access`]).
//! Calls past `--max-requests-in-flight` are refused `RESOURCE_EXHAUSTED`
//! ([`admission`]); the log's RocksDB lives within `--store-memory-mib`.

/// Every process built on the runtime allocates with jemalloc, Rust and
/// RocksDB's C++ alike (it is built unprefixed: it is `malloc`): it gives
/// freed memory back to the system within seconds, where glibc's malloc
/// keeps an arena per busy thread at its largest (see the workspace
/// `Cargo.toml`, and [`memory`] for how it is read).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: freed pages go back to the
/// system after a second (`dirty_decay_ms`, default ten) and at once from
/// there (`muzzy_decay_ms`), by jemalloc's own background threads rather
/// than only when a thread next allocates. Measured under the end-to-end
/// benchmark's 1,000 calls/s, intake's heap kept 100–190 MiB of freed pages
/// resident with the defaults (`runtime::memory`'s report: heap resident
/// against allocated). A misspelt option aborts at start (`abort_conf`).
#[cfg(all(target_os = "linux", not(target_env = "msvc")))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: Option<&'static std::ffi::c_char> = Some(
    // SAFETY: a NUL-terminated static string, as jemalloc reads it.
    unsafe { &*JEMALLOC_OPTIONS.as_ptr().cast::<std::ffi::c_char>() },
);

/// The options [`malloc_conf`] points at.
#[cfg(all(target_os = "linux", not(target_env = "msvc")))]
pub const JEMALLOC_OPTIONS: &[u8] =
    b"abort_conf:true,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

pub mod access;
pub mod admission;
pub mod auth;
pub mod bus_access;
pub mod calendar;
pub mod credentials;
pub mod locks;
pub mod memory;
pub mod metrics;
pub mod partitions;
pub mod periodic;
pub mod traces;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use lineguard_bus::admin::ConsumersService;
use lineguard_bus::{
    ConsumerConfig, ConsumerHandle, Handler, Mirror, OutboxRelay, ParkingLot, ParkingProjector,
    Partition, RelayConfig, spawn_consumer, with_parking_events,
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
    /// Address the Prometheus metrics endpoint (`GET /metrics`) listens on
    /// [default: the gRPC address's host, its port + 100: 127.0.0.1:50151
    /// for intake]. HTTPS for the CA's client certificates only with
    /// `--credentials`; without them, loopback only.
    #[arg(long, env = "LINEGUARD_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve no metrics endpoint.
    #[arg(long, env = "LINEGUARD_NO_METRICS")]
    pub no_metrics: bool,
    /// OpenTelemetry collector to send traces to over OTLP/gRPC (e.g.
    /// http://otel-collector:4317); no traces are exported without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Directory of the service's event log and state [default: .lineguard/<service>].
    #[arg(long, env = "LINEGUARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// NATS server with JetStream, or a comma-separated list of a
    /// cluster's nodes (it connects to any of them and moves to another
    /// when that one goes).
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
    /// Start this process's clock at this instant (RFC 3339, e.g.
    /// 2026-12-31T08:00:00+08:00) instead of the wall clock: for tests and
    /// demos. Every service of one run must be given the same.
    #[arg(long, env = "LINEGUARD_CLOCK_START")]
    pub clock_start: Option<String>,
    /// Let this process's clock run this many times as fast as real time
    /// (1 to 1000), from `--clock-start` or from now.
    #[arg(long, env = "LINEGUARD_CLOCK_SPEED", default_value_t = 1)]
    pub clock_speed: u32,
    /// The real instant (RFC 3339) at which the clock read `--clock-start`
    /// [default: when the process started]: processes started at different
    /// moments but given the same start, anchor and speed agree.
    #[arg(long, env = "LINEGUARD_CLOCK_ANCHOR")]
    pub clock_anchor: Option<String>,
    /// How long JetStream keeps this service's (and, for its consumers,
    /// its sources') messages; the logs keep every event regardless.
    #[arg(long, env = "LINEGUARD_STREAM_MAX_AGE", default_value = "14d", value_parser = parse_duration)]
    pub stream_max_age: Duration,
    /// How many messages JetStream keeps per stream at most (-1: no count
    /// limit, only age and 2 GiB); small values are for tests of catch-up.
    #[arg(long, env = "LINEGUARD_STREAM_MAX_MESSAGES", default_value_t = -1, allow_negative_numbers = true)]
    pub stream_max_messages: i64,
    /// Bytes JetStream reserves for and keeps of each stream this process
    /// creates (the server's max_file_store must hold them all).
    #[arg(long, env = "LINEGUARD_STREAM_MAX_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub stream_max_bytes: i64,
    /// How long JetStream remembers a message id to drop a re-publish of
    /// it (the relay's after a lost ack or a crash). nats-server keeps every
    /// id of the window in memory (about 180 bytes each, measured): 2 min
    /// at 4,000 publishes/s is ~90 MB, 15 min was ~650 MB. A re-publish
    /// after the window is still recognised by every consumer's inbox.
    #[arg(long, env = "LINEGUARD_STREAM_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub stream_duplicate_window: Duration,
    /// Copies JetStream keeps of each of this process's streams, on as many
    /// nodes of its cluster: 1 for a single server, 3 in production (one
    /// node lost loses nothing and stops nothing). A stream made with
    /// fewer is brought up to it at start.
    #[arg(long, env = "LINEGUARD_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub stream_replicas: u8,
    /// Copies every write of the event log to JetStream (stream
    /// `LINEGUARD_COPY_<SERVICE>`, no limits, `--stream-replicas` copies)
    /// before applying it, and rebuilds an empty data directory from that
    /// copy at start: a lost disk loses nothing. Costs one replicated
    /// append per write; on in production.
    #[arg(long, env = "LINEGUARD_LOG_COPY", default_value_t = false)]
    pub log_copy: bool,
    /// How many partitions every service is split into (1 to 64): each
    /// partition's instance owns a share of the stations, its own log and
    /// data directory, and its own streams and consumers on the bus (see
    /// `lineguard_bus::partition`). Every instance of one installation is
    /// given the same.
    #[arg(long, env = "LINEGUARD_PARTITIONS", default_value_t = 1)]
    pub partitions: u32,
    /// Which partition this instance is, 0 to `--partitions` - 1.
    /// Partition 0 keeps the names an unsplit service has (`intake`),
    /// partition k the service's name with `-p<k>` (`intake-p1`).
    #[arg(long, env = "LINEGUARD_PARTITION", default_value_t = 0)]
    pub partition: u32,
    /// Health service `lineguard.bus` turns NOT_SERVING when the outbox has
    /// had events JetStream did not take for this long (NATS down, its store
    /// full); the service itself stays SERVING, keeping what it commits.
    #[arg(long, env = "LINEGUARD_BUS_STALL_LIMIT", default_value = "30s", value_parser = parse_duration)]
    pub bus_stall_limit: Duration,
    /// Where another service's gRPC API is, as SERVICE=URL (repeatable, or
    /// comma-separated in the variable), e.g. intake=http://127.0.0.1:50051.
    /// A consumer of that service reads what the bus dropped (a stream's
    /// retention passed while it was away) from the service's own log.
    #[arg(long = "peer", env = "LINEGUARD_PEERS", value_delimiter = ',', value_parser = parse_peer)]
    pub peers: Vec<(String, String)>,
    /// Credentials directory (see the README's "Credentials"): this
    /// service's certificate (`service-<name>.pem`, `.key`), `ca.pem` and the
    /// token public keys. Every call then comes over TLS, authenticated,
    /// and is held to `--access-policy`. Without it the service answers
    /// plain, unauthenticated gRPC, and only on a loopback address.
    #[arg(long, env = "LINEGUARD_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Who may call what (see deploy/access.toml).
    #[arg(
        long,
        env = "LINEGUARD_ACCESS_POLICY",
        default_value = "deploy/access.toml"
    )]
    pub access_policy: PathBuf,
    /// Working calendar (TOML: holidays and make-up working days, e.g.
    /// deploy/calendar.toml) for limits counted in working days
    /// [default: Monday to Friday, UTC+8, no holidays].
    #[arg(long, env = "LINEGUARD_CALENDAR")]
    pub calendar: Option<PathBuf>,
    /// Memory the event log's RocksDB may hold, in MiB (block cache, index
    /// and filter blocks, memtables), at least 8.
    #[arg(long, env = "LINEGUARD_STORE_MEMORY_MIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=65_536))]
    pub store_memory_mib: u32,
    /// Calls this service decides at once; one more is answered
    /// RESOURCE_EXHAUSTED at once (retry it with the same idempotency key)
    /// rather than queued, so overload cannot grow the process's memory.
    /// A stream (WatchDispatches, Subscribe) counts until it has started.
    #[arg(long, env = "LINEGUARD_MAX_REQUESTS_IN_FLIGHT", default_value_t = 1_024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_requests_in_flight: u32,
    /// Threads for blocking work (RocksDB reads, waits for a fsync) at
    /// most; more such work waits for one. Each thread costs its stack and
    /// the allocator's per-thread cache whether busy or idle, and under
    /// overload Tokio's own default (512) lets a service grow to hundreds.
    #[arg(long, env = "LINEGUARD_BLOCKING_THREADS", default_value_t = 64, value_parser = clap::value_parser!(u16).range(4..=1_024))]
    pub blocking_threads: u16,
}

impl CommonArgs {
    /// The service's data directory: `--data-dir`, else `.lineguard/<bus
    /// name>` (`.lineguard/intake`, `.lineguard/intake-p1` for partition 1).
    pub fn data_dir_of(&self, service: &str) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            let partition = self.partition().unwrap_or(Partition::SOLE);
            PathBuf::from(".lineguard").join(partition.bus_name(service))
        })
    }

    /// The partition this instance is (`--partition` of `--partitions`).
    pub fn partition(&self) -> Result<Partition, HostError> {
        Partition::new(self.partition, self.partitions)
            .map_err(|e| HostError::Setup(format!("--partition/--partitions: {e}")))
    }
}

/// Sets the process's clock from `--clock-start` and `--clock-speed`
/// (see [`lineguard_eventlog::clock`]); the wall clock when neither is given.
pub fn configure_clock(args: &CommonArgs) -> Result<(), String> {
    if args.clock_start.is_none() && args.clock_speed == 1 {
        return Ok(());
    }
    let start = match &args.clock_start {
        Some(text) => text
            .parse::<prost_types::Timestamp>()
            .map_err(|e| format!("invalid --clock-start {text:?}: {e} (use RFC 3339)"))?,
        None => lineguard_eventlog::clock::now(),
    };
    let anchor = match &args.clock_anchor {
        Some(text) => Some(
            text.parse::<prost_types::Timestamp>()
                .map_err(|e| format!("invalid --clock-anchor {text:?}: {e} (use RFC 3339)"))?,
        ),
        None => None,
    };
    lineguard_eventlog::clock::configure(start, anchor, args.clock_speed)
        .map_err(|e| format!("invalid clock: {e}"))
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses a `--peer` value, `SERVICE=URL`.
pub fn parse_peer(text: &str) -> Result<(String, String), String> {
    let (service, url) = text
        .split_once('=')
        .ok_or_else(|| format!("invalid --peer {text:?}: use SERVICE=URL"))?;
    // A service's name, or a partition's (`intake-p1`).
    let (name, partition) = match service.rsplit_once("-p") {
        Some((name, index)) => (name, Some(index)),
        None => (service, None),
    };
    let partition_ok = partition.is_none_or(|index| {
        index.parse::<u16>().is_ok_and(|k| {
            k > 0 && k < lineguard_bus::partition::MAX_PARTITIONS && index == k.to_string()
        })
    });
    if name.is_empty()
        || !name.bytes().all(|b| b.is_ascii_lowercase())
        || !partition_ok
        || !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(format!(
            "invalid --peer {text:?}: a service name (or a partition's, SERVICE-p<k>), '=', \
             and an http:// or https:// URL"
        ));
    }
    Ok((service.to_string(), url.to_string()))
}

/// A peer service's own log, read over its `EventLog` gRPC API.
struct PeerLog {
    service: String,
    client:
        lineguard_protos::eventlog::v1::event_log_client::EventLogClient<tonic::transport::Channel>,
}

impl lineguard_bus::SourceLog for PeerLog {
    fn state(&self) -> lineguard_bus::catchup::SourceStateFuture<'_> {
        let mut client = self.client.clone();
        Box::pin(async move {
            client
                .get_log_info(lineguard_protos::eventlog::v1::GetLogInfoRequest {})
                .await
                .map(|info| {
                    let info = info.into_inner();
                    lineguard_bus::catchup::SourceState {
                        head_position: info.head_position,
                        outbox_backlog: info.outbox_backlog,
                    }
                })
                .map_err(|status| format!("{}'s log: {status}", self.service))
        })
    }

    fn read_from(
        &self,
        from_position: u64,
        max: usize,
        filter: &lineguard_eventlog::AllFilter,
    ) -> lineguard_bus::catchup::SourcePage<'_> {
        let mut client = self.client.clone();
        let request = lineguard_protos::eventlog::v1::ReadAllRequest {
            from_position,
            max_count: u32::try_from(max).unwrap_or(u32::MAX),
            type_names: filter.type_names.clone(),
            without_payloads: filter.without_payloads,
        };
        Box::pin(async move {
            match client.read_all(request).await {
                Ok(page) => {
                    let page = page.into_inner();
                    Ok(lineguard_eventlog::AllPage {
                        events: page.events,
                        next_position: page.next_position,
                    })
                }
                // Past the head: nothing (yet) to read.
                Err(status) if status.code() == tonic::Code::OutOfRange => {
                    Ok(lineguard_eventlog::AllPage {
                        events: Vec::new(),
                        next_position: from_position,
                    })
                }
                Err(status) => Err(format!("{}'s log: {status}", self.service)),
            }
        })
    }
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
    /// The working calendar (`--calendar`).
    pub calendar: Arc<calendar::Calendar>,
    name: &'static str,
    /// Which partition of the service this instance is.
    partition: Partition,
    /// The name the instance goes by on the bus and in its log: the
    /// service's for partition 0, `<service>-p<k>` for the others.
    bus_name: &'static str,
    grpc_addr: SocketAddr,
    shutdown_timeout: Duration,
    api_services: Vec<&'static str>,
    relay: OutboxRelay,
    /// The other services' logs, by service name (`--peer`).
    peers: std::collections::HashMap<String, lineguard_bus::SourceLogHandle>,
    /// Channels to the other services (`--peer`), as this service.
    peer_channels: std::collections::HashMap<String, tonic::transport::Channel>,
    /// Wakes between the service's consumers (parked events).
    parking: ParkingLot,
    /// How long the outbox may be stuck before `lineguard.bus` is NOT_SERVING.
    bus_stall_limit: Duration,
    /// TLS and the authentication layer, with `--credentials`.
    security: Option<Security>,
    /// `--max-requests-in-flight`.
    max_requests_in_flight: usize,
    /// The process's metrics and where they are served (`None`:
    /// `--no-metrics`).
    metrics: Option<(metrics::Metrics, SocketAddr)>,
    /// The metrics endpoint's TLS, with `--credentials`.
    metrics_tls: Option<tokio_rustls::TlsAcceptor>,
    /// The trace exporter, with `--otlp-endpoint`.
    traces: Option<traces::Traces>,
    consumers: Vec<ConsumerHandle>,
    shutdown_steps: Vec<ShutdownStep>,
}

/// What a service with `--credentials` serves with.
struct Security {
    tls: tonic::transport::ServerTlsConfig,
    authenticator: Arc<auth::Authenticator>,
}

/// Loads the credentials and the access policy, or refuses to serve
/// without them anywhere but on loopback.
fn load_security(
    service: &str,
    args: &CommonArgs,
    grpc_addr: SocketAddr,
) -> Result<Option<Security>, HostError> {
    let Some(dir) = &args.credentials else {
        if !grpc_addr.ip().is_loopback() {
            return Err(HostError::Setup(format!(
                "--grpc-addr {grpc_addr} is not a loopback address: serving there needs \
                 --credentials (TLS and authentication)"
            )));
        }
        tracing::warn!(service, %grpc_addr,
            "no --credentials: plain, unauthenticated gRPC on loopback (development and tests only)");
        return Ok(None);
    };
    let setup = |e: &dyn std::fmt::Display| HostError::Setup(e.to_string());
    let rpcs = access::rpcs_of(&[lineguard_protos::FILE_DESCRIPTOR_SET]).map_err(|e| setup(&e))?;
    let policy = access::AccessPolicy::load(&args.access_policy, &rpcs).map_err(|e| setup(&e))?;
    let dir = credentials::CredentialsDir::new(dir);
    let server = credentials::ServerCredentials::load(&dir, service).map_err(|e| setup(&e))?;
    let token_keys = dir.token_public_keys().map_err(|e| setup(&e))?;
    let authenticator =
        auth::Authenticator::new(Arc::new(policy), &token_keys).map_err(|e| setup(&e))?;
    tracing::info!(service, policy = %args.access_policy.display(), token_keys = token_keys.len(),
        "TLS, authentication and the access policy on every call");
    Ok(Some(Security {
        tls: server.tls(),
        authenticator: Arc::new(authenticator),
    }))
}

/// Sets up `tracing` once for the process. Customer names and phone numbers
/// are never logged: spans carry ticket, event and correlation ids only.
pub fn init_tracing(format: LogFormat, level: &str) {
    let _ = init_tracing_exported(format, level, None);
}

/// As [`init_tracing`], and with `otlp` (`(service, endpoint)`) the spans
/// exported to that OpenTelemetry collector as well ([`traces`]); returns
/// the exporter's handle (flush it at exit). Call within the tokio runtime.
pub fn init_tracing_exported(
    format: LogFormat,
    level: &str,
    otlp: Option<(&str, &str)>,
) -> Result<Option<traces::Traces>, String> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour codes only for a person at a terminal: a file or a pipe (a
    // log collector) gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (exported, handle) = match otlp {
        Some((service, endpoint)) => {
            let (layer, handle) = traces::layer(service, endpoint)?;
            (Some(layer), Some(handle))
        }
        None => (None, None),
    };
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(colour)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(colour)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(exported)
        .with(logs)
        .with(filter)
        .try_init();
    Ok(handle)
}

impl Host {
    /// Opens the log, connects to NATS in the background and starts the relay.
    pub async fn start(spec: ServiceSpec, args: CommonArgs) -> Result<Host, HostError> {
        let exported_as = args.partition()?.bus_name(spec.name);
        let traces = init_tracing_exported(
            args.log_format,
            &args.log_level,
            args.otlp_endpoint
                .as_deref()
                .map(|endpoint| (exported_as.as_str(), endpoint)),
        )
        .map_err(HostError::Setup)?;
        configure_clock(&args).map_err(HostError::Setup)?;
        let calendar = match &args.calendar {
            Some(path) => {
                calendar::Calendar::load(path).map_err(|e| HostError::Setup(e.to_string()))?
            }
            None => calendar::Calendar::default(),
        };
        tracing::info!(service = spec.name, calendar = %calendar.version, "working calendar");
        if args.clock_start.is_some() || args.clock_speed != 1 {
            tracing::warn!(service = spec.name, clock_start = ?args.clock_start,
                clock_speed = args.clock_speed, "running on an accelerated clock (tests and demos only)");
        }
        let partition = args.partition()?;
        // Made once per process and kept for its life, like the service's
        // own name.
        let bus_name: &'static str = if partition.index() == 0 {
            spec.name
        } else {
            Box::leak(partition.bus_name(spec.name).into_boxed_str())
        };
        let data_dir = args.data_dir_of(spec.name);
        std::fs::create_dir_all(&data_dir)?;
        // Every service's consumers park events and dead-letter them in the
        // service's own log: their events and records sit beside its own.
        let limits = lineguard_eventlog::Limits {
            store_memory_bytes: args.store_memory_mib as usize * 1024 * 1024,
            ..lineguard_eventlog::Limits::default()
        };
        let rights = check_bus_rights(spec.name, spec.mirror.as_ref())?;
        let credentials_dir = args
            .credentials
            .as_ref()
            .map(credentials::CredentialsDir::new);
        if credentials_dir.is_none() && !nats_url_is_loopback(&args.nats_url) {
            return Err(HostError::Setup(format!(
                "--nats-url {} is not a loopback address: connecting there needs \
                 --credentials (TLS and a certificate NATS maps to this service's user)",
                args.nats_url
            )));
        }
        // As `service:<name>` over TLS with credentials; NATS holds the
        // connection to the service's rights (bus_access::BUS_RIGHTS).
        let nats = bus_access::connect_options(
            &format!("lineguard-{bus_name}"),
            credentials_dir.as_ref(),
            ("service", rights.service),
            Some(bus_access::inbox_prefix(rights.service)),
        )
        .connect(bus_access::server_list(&args.nats_url))
        .await
        .map_err(|e| HostError::Nats(e.to_string()))?;
        let jetstream = jetstream::new(nats.clone());
        let mut log_config = LogConfig::new(data_dir.join("eventlog"), bus_name)
            .with_limits(limits)
            .with_event_types(with_parking_events(spec.event_types))
            .with_projector(ParkingProjector::wrap(spec.projector));
        if args.log_copy {
            let copy = log_copy_at_start(&jetstream, bus_name, args.stream_replicas).await;
            log_config = log_config.with_copy(copy);
        }
        // Off the runtime's workers: opening may replay projections or
        // read the whole copy back.
        let log = tokio::task::spawn_blocking(move || EventLog::open(log_config))
            .await
            .map_err(|e| HostError::Io(std::io::Error::other(e)))??;
        if args.rebuild_projections {
            let rebuilt = log.rebuild_projections_checked().await?;
            tracing::info!(service = spec.name, replayed = rebuilt.events_replayed,
                digest_before = %rebuilt.digest_before, digest_after = %rebuilt.digest_after,
                "projections rebuilt from the log at start-up");
        }
        let stream = lineguard_bus::StreamSettings {
            max_age: args.stream_max_age,
            max_messages: args.stream_max_messages,
            max_bytes: args.stream_max_bytes,
            duplicate_window: args.stream_duplicate_window,
            replicas: usize::from(args.stream_replicas),
        };
        ensure_streams_at_start(&jetstream, bus_name, spec.mirror.as_ref(), &stream).await?;
        let relay = OutboxRelay::spawn(
            log.clone(),
            jetstream.clone(),
            RelayConfig {
                mirror: spec.mirror.clone(),
                stream,
                ..RelayConfig::default()
            },
        );
        let grpc_addr = args
            .grpc_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], spec.default_grpc_port)));
        let security = load_security(spec.name, &args, grpc_addr)?;
        let metrics = (!args.no_metrics).then(|| {
            let addr = args.metrics_addr.unwrap_or_else(|| {
                SocketAddr::new(grpc_addr.ip(), metrics_port_for(grpc_addr.port()))
            });
            (metrics::Metrics::new(bus_name), addr)
        });
        let metrics_tls = match (&args.credentials, &metrics) {
            (Some(dir), Some(_)) => {
                let server = credentials::ServerCredentials::load(
                    &credentials::CredentialsDir::new(dir),
                    spec.name,
                )
                .map_err(|e| HostError::Setup(e.to_string()))?;
                Some(metrics::tls_acceptor(&server)?)
            }
            _ => None,
        };
        // Peers are called as this service (`service:<name>`) when there are
        // credentials.
        let peer_credentials = match &args.credentials {
            Some(dir) => Some(
                credentials::ClientCredentials::load(
                    &credentials::CredentialsDir::new(dir),
                    "service",
                    spec.name,
                )
                .map_err(|e| HostError::Setup(e.to_string()))?,
            ),
            None => None,
        };
        let mut peers = std::collections::HashMap::new();
        let mut peer_channels = std::collections::HashMap::new();
        for (service, url) in &args.peers {
            let channel = match &peer_credentials {
                Some(credentials) => credentials
                    .channel(url)
                    .map_err(|e| HostError::Setup(format!("--peer {service}={url}: {e}")))?,
                None => tonic::transport::Endpoint::from_shared(url.clone())
                    .map_err(|e| HostError::Setup(format!("--peer {service}={url}: {e}")))?
                    .connect_timeout(Duration::from_secs(5))
                    .connect_lazy(),
            };
            peer_channels.insert(service.clone(), channel.clone());
            let log = PeerLog {
                service: service.clone(),
                client: lineguard_protos::eventlog::v1::event_log_client::EventLogClient::new(
                    channel,
                ),
            };
            peers.insert(
                service.clone(),
                lineguard_bus::SourceLogHandle(Arc::new(log)),
            );
        }
        tracing::info!(service = spec.name, %partition, bus_name, %grpc_addr,
            data_dir = %data_dir.display(), nats_url = %args.nats_url, "service starting");
        let memory_reporter = memory::MemoryReporter::spawn(bus_name, log.clone());
        let mut host = Host {
            log,
            jetstream,
            nats,
            calendar: Arc::new(calendar),
            name: spec.name,
            partition,
            bus_name,
            grpc_addr,
            shutdown_timeout: args.shutdown_timeout,
            api_services: spec.api_services,
            relay,
            peers,
            peer_channels,
            parking: ParkingLot::new(),
            bus_stall_limit: args.bus_stall_limit,
            security,
            max_requests_in_flight: args.max_requests_in_flight as usize,
            metrics,
            metrics_tls,
            traces,
            consumers: Vec::new(),
            shutdown_steps: Vec::new(),
        };
        host.on_shutdown(memory_reporter.stop());
        if args.log_copy {
            let compactor = copy_compactor(bus_name, host.log.clone());
            host.on_shutdown(compactor.stop());
        }
        Ok(host)
    }

    /// Starts a durable consumer committing into this service's log; it
    /// catches up from its source's own log (if `--peer` names it) when the
    /// bus has dropped what it missed.
    ///
    /// The consumer must be one [`bus_access::BUS_RIGHTS`] gives this
    /// service (named `<service>-from-<source>`): NATS would refuse any other.
    /// An instance of partition k runs it on partition k of the source, as
    /// `<service>-p<k>-from-<source>-p<k>` ([`ConsumerConfig::in_partition`]).
    pub fn add_consumer<H: Handler>(
        &mut self,
        mut config: ConsumerConfig,
        handler: H,
    ) -> Result<(), HostError> {
        let expected = bus_access::consumer_name(self.name, &config.source_service);
        let granted = bus_access::rights_of(self.name)
            .is_some_and(|r| r.consumes.contains(&config.source_service.as_str()));
        if !granted || config.name != expected {
            return Err(HostError::Setup(format!(
                "consumer {} of {}: bus_access::BUS_RIGHTS gives {} the consumer {expected} \
                 only if it lists {} among the streams it consumes",
                config.name, config.source_service, self.name, config.source_service
            )));
        }
        let source = self.partition.bus_name(&config.source_service);
        config = config.in_partition(
            self.partition,
            bus_access::consumer_name(self.bus_name, &source),
        );
        if config.source_log.is_none() {
            config.source_log = self.peers.get(&config.source_service).cloned();
        }
        self.consumers.push(spawn_consumer(
            self.jetstream.clone(),
            self.log.clone(),
            config,
            handler,
            self.parking.clone(),
        ));
        Ok(())
    }

    /// A channel to another service's instance of this partition named
    /// by `--peer` (`intake` for partition 0, `intake-p1` for partition 1),
    /// calling as this service (`service:<name>`, with credentials).
    pub fn peer_channel(&self, service: &str) -> Option<tonic::transport::Channel> {
        self.peer_channels
            .get(&self.partition.bus_name(service))
            .cloned()
    }

    /// This service's partitions as this instance reaches them: the other
    /// partitions' instances over the channels `--peer <service>-p<k>=URL`
    /// names (calling as `service:<name>`), for forwarding a call to its
    /// owner ([`partitions::Partitions`]).
    pub fn partitions(&self) -> partitions::Partitions {
        partitions::Partitions::new(self.name, self.partition, |p| {
            self.peer_channels.get(&p.bus_name(self.name)).cloned()
        })
    }

    /// Where the service registers metrics of its own (`None` with
    /// `--no-metrics`): names are prefixed `lineguard_` and labelled with
    /// the instance there.
    pub fn metrics_registry(&mut self) -> Option<&mut prometheus_client::registry::Registry> {
        self.metrics.as_mut().map(|(metrics, _)| metrics.registry())
    }

    /// Which partition of its service this instance is.
    pub fn partition(&self) -> Partition {
        self.partition
    }

    /// The name this instance goes by on the bus, in its log and on disk
    /// (see [`lineguard_bus::partition`]).
    pub fn bus_name(&self) -> &'static str {
        self.bus_name
    }

    /// Runs `step` at shutdown, after gRPC has stopped and before the
    /// consumers stop (e.g. stopping a service's own background task).
    pub fn on_shutdown(&mut self, step: impl std::future::Future<Output = ()> + Send + 'static) {
        self.shutdown_steps.push(Box::pin(step));
    }

    /// Serves gRPC until SIGTERM or Ctrl-C, then shuts down in order.
    pub async fn serve(mut self, mut routes: RoutesBuilder) -> Result<(), HostError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let consumers_service = ConsumersService::new(self.log.clone(), self.parking.clone())
            .with_consumers(
                self.jetstream.clone(),
                self.consumers.iter().map(ConsumerHandle::watched).collect(),
            );
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
            .add_service(EventLogService::server(self.log.clone()))
            .add_service(consumers_service.clone().into_server());

        let listener = tokio::net::TcpListener::bind(self.grpc_addr).await?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut names = vec![
            "",
            "lineguard.eventlog.v1.EventLog",
            "lineguard.bus.v1.Consumers",
        ];
        names.extend(self.api_services.iter().copied());
        // Answering, not yet ready: NOT_SERVING until every consumer has
        // applied what its source held at start-up (see `ConsumerHandle::
        // caught_up`), so that, say, intake's copy of the directory is loaded.
        set_status(&health, &names, ServingStatus::NotServing).await;
        tracing::info!(service = self.name, grpc_addr = %self.grpc_addr,
            consumers = self.consumers.len(), "answering; ready once the consumers have caught up");

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut grpc_metrics = None;
        if let Some((metrics, addr)) = self.metrics.take() {
            let listener = metrics::bind(addr, self.metrics_tls.is_some()).await?;
            let bound = listener.local_addr()?;
            tracing::info!(service = self.name, metrics_addr = %bound,
                tls = self.metrics_tls.is_some(), "metrics at /metrics");
            grpc_metrics = Some(metrics.grpc_layer());
            metrics.serve(
                listener,
                self.metrics_tls.take(),
                (self.log.clone(), consumers_service),
                stop_rx.clone(),
            );
        }
        tokio::spawn(report_ready(
            self.name,
            health.clone(),
            names.clone(),
            self.consumers
                .iter()
                .map(ConsumerHandle::caught_up)
                .collect(),
            stop_rx.clone(),
        ));
        tokio::spawn(report_bus(
            self.name,
            health.clone(),
            self.relay.monitor(),
            self.bus_stall_limit,
            stop_rx.clone(),
        ));
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
        let mut builder = tonic::transport::Server::builder();
        let layer = match &self.security {
            Some(security) => {
                builder = builder
                    .tls_config(security.tls.clone())
                    .map_err(|e| HostError::Grpc(e.to_string()))?;
                auth::AuthLayer::new(security.authenticator.clone(), self.name)
            }
            None => auth::AuthLayer::disabled(self.name),
        };
        // Admission outside authentication: an overloaded service refuses
        // before it spends a signature check on a call it cannot take.
        let admission = admission::AdmissionLayer::new(self.name, self.max_requests_in_flight);
        // Outermost: calls refused by admission or authentication count.
        let server = builder
            .layer(tower_layer::Stack::new(
                tower_layer::Stack::new(layer, admission),
                grpc_metrics.unwrap_or_else(metrics::GrpcMetricsLayer::unserved),
            ))
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
        if let Some(traces) = &self.traces {
            traces.shutdown();
        }
        Ok(())
    }
}

/// Runs a service process's `main` on a multi-threaded Tokio runtime
/// whose blocking pool holds at most `blocking_threads` threads (its
/// `--blocking-threads`; the one runtime every service runs on, since
/// `#[tokio::main]` cannot read a flag). An idle blocking thread ends
/// after ten seconds, as Tokio's do.
pub fn block_on(blocking_threads: u16, main: impl Future<Output = ExitCode>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(usize::from(blocking_threads))
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
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

/// The health service name of the bus: SERVING while the outbox drains.
pub const BUS_HEALTH_NAME: &str = "lineguard.bus";

/// How often the bus's health is looked at.
const BUS_HEALTH_CHECK: Duration = Duration::from_secs(1);

/// The service's rights on the bus; its mirror stream must be among them.
fn check_bus_rights(
    name: &str,
    mirror: Option<&Mirror>,
) -> Result<&'static bus_access::BusRights, HostError> {
    let rights = bus_access::rights_of(name).ok_or_else(|| {
        HostError::Setup(format!("{name} has no entry in bus_access::BUS_RIGHTS"))
    })?;
    if let Some(mirror) = mirror
        && !rights.publishes.contains(&mirror.stream_name)
    {
        return Err(HostError::Setup(format!(
            "{name} mirrors to stream {}, which bus_access::BUS_RIGHTS does not let it publish to",
            mirror.stream_name
        )));
    }
    Ok(rights)
}

/// Whether a NATS URL (or a comma-separated list) names loopback hosts only.
/// The metrics port beside gRPC port `grpc_port` (+100: 50151 for intake's
/// 50051, 50161 for partition 1's 50061); an ephemeral gRPC port (0)
/// gets an ephemeral metrics port.
fn metrics_port_for(grpc_port: u16) -> u16 {
    if grpc_port == 0 {
        0
    } else {
        grpc_port.saturating_add(100)
    }
}

fn nats_url_is_loopback(urls: &str) -> bool {
    urls.split(',').all(|url| {
        let rest = url.trim().split("://").last().unwrap_or_default();
        let host_port = rest.rsplit('@').next().unwrap_or_default();
        let host = match host_port.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host_port.split(':').next().unwrap_or_default(),
        };
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

/// Creates (or updates) the service's streams once before anything else,
/// so that a refusal that cannot heal (no room in NATS's store for their
/// limits, JetStream off) stops the start with a message saying what to
/// change. NATS unreachable or slow is not such a refusal: the relay goes
/// on trying in the background, as it does whenever NATS is down.
/// How often a service looks whether its log's copy is due for a
/// compaction ([`lineguard_eventlog::copy::CompactionPolicy`]).
const COPY_COMPACTION_CHECK: Duration = Duration::from_secs(600);

/// Starts the log's copy again from a snapshot when it has grown long
/// (checked every [`COPY_COMPACTION_CHECK`]), so the copy a lost disk is
/// rebuilt from stays a few times the store's size.
fn copy_compactor(service: &'static str, log: EventLog) -> periodic::Periodic {
    periodic::Periodic::spawn("log copy compaction", COPY_COMPACTION_CHECK, move || {
        let log = log.clone();
        async move {
            let compacted = tokio::task::spawn_blocking(move || {
                log.compact_copy(lineguard_eventlog::copy::CompactionPolicy::default())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            if let Some(done) = compacted {
                tracing::info!(
                    service,
                    bytes_before = done.bytes_before,
                    first_sequence = done.first_sequence,
                    "the log's copy was compacted"
                );
            }
            Ok::<usize, String>(usize::from(compacted.is_some()))
        }
    })
}

/// The log's copy on JetStream ([`lineguard_bus::copy`]), its stream made
/// first: a copied log cannot open without its copy, so this waits for
/// NATS as long as it takes.
async fn log_copy_at_start(
    jetstream: &jetstream::Context,
    service: &'static str,
    replicas: u8,
) -> Arc<dyn lineguard_eventlog::copy::CopyTarget> {
    let mut pause = Duration::from_millis(200);
    loop {
        match lineguard_bus::copy::ensure_copy_stream(jetstream, service, usize::from(replicas))
            .await
        {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(service, error = %e, "the log's copy stream is not ready; the log waits for it");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
    Arc::new(lineguard_bus::copy::JetStreamCopy::new(
        jetstream.clone(),
        service,
        tokio::runtime::Handle::current(),
    ))
}

async fn ensure_streams_at_start(
    jetstream: &jetstream::Context,
    service: &str,
    mirror: Option<&Mirror>,
    settings: &lineguard_bus::StreamSettings,
) -> Result<(), HostError> {
    const START_TRY: Duration = Duration::from_secs(5);
    let names = std::iter::once(service).chain(mirror.map(|m| m.stream_name));
    for name in names {
        match tokio::time::timeout(
            START_TRY,
            lineguard_bus::ensure_stream(jetstream, name, settings),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(refused @ lineguard_bus::Error::StreamRefused { .. })) => {
                return Err(HostError::Setup(refused.to_string()));
            }
            Ok(Err(e)) => {
                tracing::warn!(service, error = %e, "stream not ready at start-up; the relay keeps trying");
            }
            Err(_) => {
                tracing::warn!(
                    service,
                    "NATS did not answer at start-up; the relay keeps trying"
                );
            }
        }
    }
    Ok(())
}

/// Turns the service SERVING once every consumer has caught up (unless it
/// is stopping by then).
async fn report_ready(
    service: &'static str,
    health: HealthReporter,
    names: Vec<&'static str>,
    mut caught_up: Vec<tokio::sync::watch::Receiver<bool>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let started = tokio::time::Instant::now();
    for consumer in &mut caught_up {
        let go_on = tokio::select! {
            done = consumer.wait_for(|caught_up| *caught_up) => done.is_ok(),
            _ = stopping.wait_for(|stop| *stop) => false,
        };
        if !go_on {
            return;
        }
    }
    if *stopping.borrow() {
        return;
    }
    set_status(&health, &names, ServingStatus::Serving).await;
    tracing::info!(
        service,
        waited_ms = started.elapsed().as_millis() as u64,
        "ready: serving"
    );
}

/// Keeps [`BUS_HEALTH_NAME`] SERVING while the outbox drains, NOT_SERVING
/// while it has been stuck for longer than `stall_limit`.
async fn report_bus(
    service: &'static str,
    health: HealthReporter,
    relay: lineguard_bus::RelayMonitor,
    stall_limit: Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut serving = None;
    let mut tick = tokio::time::interval(BUS_HEALTH_CHECK);
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            stopped = stopping.wait_for(|stop| *stop) => stopped.is_ok(),
        };
        if stop {
            health
                .set_service_status(BUS_HEALTH_NAME, ServingStatus::NotServing)
                .await;
            return;
        }
        let state = relay.health();
        let draining = state.stalled_for < stall_limit;
        if serving != Some(draining) {
            let status = if draining {
                tracing::info!(service, backlog = state.backlog, "bus: the outbox drains");
                ServingStatus::Serving
            } else {
                tracing::error!(
                    service,
                    backlog = state.backlog,
                    stalled_s = state.stalled_for.as_secs(),
                    last_error = state.last_error.as_deref().unwrap_or(""),
                    "bus: the outbox has not drained for longer than the limit; events are kept and sent when NATS takes them"
                );
                ServingStatus::NotServing
            };
            health.set_service_status(BUS_HEALTH_NAME, status).await;
            serving = Some(draining);
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
    fn a_peer_is_a_service_or_a_partition_of_one() {
        let peer = |text: &str| parse_peer(text).map(|(name, _)| name);
        assert_eq!(peer("intake=https://a:1"), Ok("intake".to_string()));
        assert_eq!(peer("intake-p1=https://a:1"), Ok("intake-p1".to_string()));
        for bad in [
            "intake-p0=https://a:1",
            "intake-p01=https://a:1",
            "intake-px=https://a:1",
            "intake-p64=https://a:1",
            "-p1=https://a:1",
            "Intake=https://a:1",
            "intake=ftp://a",
        ] {
            assert!(parse_peer(bad).is_err(), "{bad}");
        }
    }

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

    /// The service's flags alone, as a service's `main` parses them.
    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn blocking_work_runs_on_at_most_the_threads_asked_for() {
        use clap::Parser;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let flags = Flags::try_parse_from(["service", "--blocking-threads", "4"]).expect("flags");
        assert!(Flags::try_parse_from(["service", "--blocking-threads", "2"]).is_err());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let code = block_on(flags.common.blocking_threads, async {
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let (running, most, threads) = (running.clone(), most.clone(), threads.clone());
                    tokio::task::spawn_blocking(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        if let Ok(mut seen) = threads.lock() {
                            seen.insert(std::thread::current().id());
                        }
                        std::thread::sleep(Duration::from_millis(30));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                })
                .collect();
            for task in tasks {
                if task.await.is_err() {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        });
        assert_eq!(code, ExitCode::SUCCESS, "every blocking task ran");
        assert_eq!(most.load(Ordering::SeqCst), 4, "four at once, never more");
        let distinct = threads.lock().map(|seen| seen.len()).unwrap_or_default();
        assert_eq!(distinct, 4, "on four threads");
    }
}
