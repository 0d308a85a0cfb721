//! Prometheus metrics of a service process, served at `/metrics` on a port
//! of their own (`--metrics-addr`).
//!
//! One registry per process, every name prefixed `lineguard_` and labelled
//! with the instance's bus name (`service="intake-p1"`). What it holds:
//!
//! - gRPC calls by method and status, and their latency
//!   ([`GrpcMetricsLayer`], the outermost layer of every server, so calls
//!   refused by admission or authentication are counted too);
//! - the log's group commits (`lineguard_eventlog::metrics`) and the bus's
//!   relay and consumers (`lineguard_bus::metrics`), counted as they happen;
//! - figures read at each scrape ([`Scrape`]): the log's head and outbox
//!   backlog, each consumer's lag on JetStream, its parked and
//!   dead-lettered events recounted from the log, whether it has caught
//!   up, and the process's memory (`crate::memory`);
//! - what a service adds for itself through [`Metrics::registry`] (open
//!   tickets, clock alerts, connected crews).
//!
//! Every label's values are bounded: a method is one the API defines (any
//! other path is `unknown`), a status one of gRPC's 17 codes, a consumer
//! one of the service's; no ticket, crew or customer id is ever a label.
//!
//! Without `--credentials` the endpoint is plain HTTP and only on a
//! loopback address (as gRPC is); with them it is HTTPS, and only a client
//! presenting a certificate the installation's CA issued (Prometheus with
//! the `monitor` certificate) is answered.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use lineguard_bus::admin::ConsumersService;
use lineguard_eventlog::EventLog;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio_rustls::rustls;

use crate::HostError;

/// Connections the endpoint serves at once: Prometheus needs one per
/// scraper; more wait for one to close.
const MAX_CONNECTIONS: usize = 16;
/// Longest wait for a request's headers (and for a TLS handshake).
const READ_WAIT: Duration = Duration::from_secs(10);

/// A gRPC method, `package.Service/Method`, or `unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MethodLabels {
    /// The method, or `unknown` for a path the API does not define.
    pub method: String,
}

/// A gRPC method and the status it answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CallLabels {
    /// The method, or `unknown`.
    pub method: String,
    /// gRPC status code name (`Ok`, `NotFound`, ...).
    pub code: String,
}

/// A consumer, by durable name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// The consumer's durable name.
    pub consumer: String,
}

/// A part of the process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum MemoryPart {
    /// Live allocations on the heap (Rust and RocksDB).
    heap_allocated,
    /// Pages the heap keeps resident.
    heap_resident,
    /// RocksDB memtables.
    store_memtables,
    /// RocksDB block cache.
    store_block_cache,
    /// RocksDB table readers.
    store_table_readers,
}

/// Which part of memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MemoryLabels {
    /// The part.
    pub part: MemoryPart,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// What a clock alert was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AlertKind {
    /// A warning point passed (50%, 80%, ...).
    warning,
    /// The clock ran out.
    breach,
}

/// A clock and what it did.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClockAlertLabels {
    /// The clock (`acceptance`, `arrival`, `restoration`, ... as the
    /// policy names them; `other` for a name that is not a short word).
    pub clock: String,
    /// Warning or breach.
    pub kind: AlertKind,
}

/// Clock warnings and breaches this process recorded (routing's and
/// dispatch's clocks), by clock and kind: counted once the alert's event
/// is committed.
pub static CLOCK_ALERTS: LazyLock<Family<ClockAlertLabels, Counter>> =
    LazyLock::new(Family::default);

/// Shows `clocks`' warnings and breaches at zero from the start: a series
/// that appears only at its first breach hides the first breach from a
/// rate or an increase (Prometheus's advice: initialise known labels).
pub fn clock_alerts_known(clocks: &[&str]) {
    for clock in clocks {
        for kind in [AlertKind::warning, AlertKind::breach] {
            drop(CLOCK_ALERTS.get_or_create(&ClockAlertLabels {
                clock: (*clock).to_string(),
                kind,
            }));
        }
    }
}

/// Counts one clock alert of `clock` (committed).
pub fn clock_alert(clock: &str, kind: AlertKind) {
    // Policy names its clocks; the label stays bounded even so.
    let bounded = clock.len() <= 32 && clock.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    CLOCK_ALERTS
        .get_or_create(&ClockAlertLabels {
            clock: if bounded && !clock.is_empty() {
                clock.to_string()
            } else {
                "other".to_string()
            },
            kind,
        })
        .inc();
}

/// gRPC latency buckets: 250 µs to about 8 s.
fn call_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The gRPC server's instruments.
#[derive(Debug, Clone)]
pub struct GrpcMetrics {
    calls: Family<CallLabels, Counter>,
    durations: HistogramFamily<MethodLabels>,
    /// Every method the API defines, health and reflection included.
    known: Arc<BTreeSet<String>>,
}

impl GrpcMetrics {
    fn new() -> GrpcMetrics {
        let mut known = crate::access::rpcs_of(&[
            lineguard_protos::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])
        .unwrap_or_default();
        if known.is_empty() {
            tracing::warn!("no gRPC method known to the metrics: every call is labelled unknown");
        }
        known.insert(String::new()); // never a path; keeps the set non-empty
        GrpcMetrics {
            calls: Family::default(),
            durations: Family::new_with_constructor(call_histogram),
            known: Arc::new(known),
        }
    }

    /// The method label of a request path (`/package.Service/Method`).
    fn method_of(&self, path: &str) -> String {
        let method = path.strip_prefix('/').unwrap_or(path);
        if !method.is_empty() && self.known.contains(method) {
            method.to_string()
        } else {
            "unknown".to_string()
        }
    }

    fn record(&self, method: String, code: tonic::Code, took: Duration) {
        self.durations
            .get_or_create(&MethodLabels {
                method: method.clone(),
            })
            .observe(took.as_secs_f64());
        self.calls
            .get_or_create(&CallLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
    }
}

/// Figures read afresh at each scrape.
#[derive(Debug, Clone, Default)]
struct ScrapeGauges {
    head: Gauge,
    outbox_backlog: Gauge,
    pending: Family<ConsumerLabels, Gauge>,
    ack_pending: Family<ConsumerLabels, Gauge>,
    parked: Family<ConsumerLabels, Gauge>,
    dead_letters: Family<ConsumerLabels, Gauge>,
    caught_up: Family<ConsumerLabels, Gauge>,
    lag_known: Family<ConsumerLabels, Gauge>,
    resident: Gauge,
    memory: Family<MemoryLabels, Gauge>,
}

/// A gauge whose value is read by `read` at each scrape.
struct GaugeFn {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for GaugeFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GaugeFn").field("name", &self.name).finish()
    }
}

impl prometheus_client::collector::Collector for GaugeFn {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(gauge_value((self.read)()));
        let metric = encoder.encode_descriptor(self.name, self.help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }
}

/// Registers a gauge named `name` whose value `read` gives at each scrape
/// (a figure a service holds anyway, such as its connected crews).
pub fn register_gauge_fn(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    read: impl Fn() -> u64 + Send + Sync + 'static,
) {
    registry.register_collector(Box::new(GaugeFn {
        name,
        help,
        read: Box::new(read),
    }));
}

/// A count as a gauge's value (saturating: a gauge is an `i64`).
fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A process's metrics, built up while the service starts, then served.
pub struct Metrics {
    registry: Registry,
    grpc: GrpcMetrics,
    gauges: ScrapeGauges,
}

impl Metrics {
    /// The registry of the instance named `bus_name`, with the log's, the
    /// bus's, the gRPC server's and the scraped instruments in it.
    pub fn new(bus_name: &str) -> Metrics {
        let mut registry = Registry::with_prefix_and_labels(
            "lineguard",
            [(Cow::Borrowed("service"), Cow::Owned(bus_name.to_string()))].into_iter(),
        );
        lineguard_eventlog::metrics::LOG_METRICS.register(&mut registry);
        lineguard_bus::metrics::BUS_METRICS.register(&mut registry);
        let grpc = GrpcMetrics::new();
        registry.register(
            "grpc_server_calls",
            "gRPC calls answered, by method and status (a stream's status as it opened)",
            grpc.calls.clone(),
        );
        registry.register_with_unit(
            "grpc_server_call_duration",
            "Time to answer a gRPC call (to a stream's opening)",
            Unit::Seconds,
            grpc.durations.clone(),
        );
        registry.register(
            "clock_alerts",
            "Clock warnings and breaches recorded, by clock and kind",
            CLOCK_ALERTS.clone(),
        );
        let gauges = ScrapeGauges::default();
        let r = &mut registry;
        r.register(
            "eventlog_head_position",
            "Position of the last event written to the log",
            gauges.head.clone(),
        );
        r.register(
            "outbox_backlog_events",
            "Events committed and not yet published to JetStream",
            gauges.outbox_backlog.clone(),
        );
        r.register(
            "consumer_pending_messages",
            "Messages of the consumer's stream JetStream has not yet delivered to it (lag)",
            gauges.pending.clone(),
        );
        r.register(
            "consumer_ack_pending_messages",
            "Messages delivered to the consumer and not yet acknowledged",
            gauges.ack_pending.clone(),
        );
        r.register(
            "consumer_lag_known",
            "1 when JetStream answered for the consumer's lag at the last scrape, else 0",
            gauges.lag_known.clone(),
        );
        r.register(
            "consumer_parked_events",
            "Events the consumer holds parked, recounted from the log",
            gauges.parked.clone(),
        );
        r.register(
            "consumer_dead_letters",
            "Events the consumer dead-lettered and holds, recounted from the log",
            gauges.dead_letters.clone(),
        );
        r.register(
            "consumer_caught_up",
            "1 once the consumer has applied what its source held at start-up",
            gauges.caught_up.clone(),
        );
        r.register_with_unit(
            "process_resident_memory",
            "Resident set size of the process",
            Unit::Bytes,
            gauges.resident.clone(),
        );
        r.register_with_unit(
            "process_memory",
            "The process's heap and its log's RocksDB memory, by part",
            Unit::Bytes,
            gauges.memory.clone(),
        );
        Metrics {
            registry,
            grpc,
            gauges,
        }
    }

    /// Where a service registers instruments of its own (prefixed and
    /// labelled like the rest).
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The layer counting and timing every gRPC call.
    pub fn grpc_layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            metrics: self.grpc.clone(),
        }
    }

    /// Serves `/metrics` on `listener` until `stop` turns true: plain, or
    /// over TLS with `tls`. Each scrape reads `log` and `consumers` afresh.
    pub fn serve(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        (log, consumers): (EventLog, ConsumersService),
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let scrape = Arc::new(Scrape {
            registry: self.registry,
            gauges: self.gauges,
            log,
            consumers,
        });
        tokio::spawn(accept(listener, tls, scrape, stop))
    }
}

/// What one scrape reads and encodes.
struct Scrape {
    registry: Registry,
    gauges: ScrapeGauges,
    log: EventLog,
    consumers: ConsumersService,
}

impl Scrape {
    /// The registry encoded, after reading the figures that are read at
    /// each scrape.
    async fn text(&self) -> Result<String, String> {
        let g = &self.gauges;
        g.head.set(gauge_value(self.log.head()));
        g.outbox_backlog.set(gauge_value(self.log.outbox_backlog()));
        for status in self.consumers.statuses().await.map_err(|s| s.to_string())? {
            let labels = ConsumerLabels {
                consumer: status.consumer.clone(),
            };
            let lag_known = status.bus_error.is_empty();
            if lag_known {
                g.pending
                    .get_or_create(&labels)
                    .set(gauge_value(status.pending));
                g.ack_pending
                    .get_or_create(&labels)
                    .set(gauge_value(status.ack_pending));
            }
            g.lag_known.get_or_create(&labels).set(i64::from(lag_known));
            g.parked
                .get_or_create(&labels)
                .set(gauge_value(status.parked));
            g.dead_letters
                .get_or_create(&labels)
                .set(gauge_value(status.dead_letters));
            g.caught_up
                .get_or_create(&labels)
                .set(i64::from(status.caught_up));
        }
        let log = self.log.clone();
        // RocksDB's memory properties take its mutex: off the async workers.
        let reading = tokio::task::spawn_blocking(move || crate::memory::read(&log))
            .await
            .map_err(|e| e.to_string())?;
        g.resident
            .set(gauge_value(reading.resident_bytes.unwrap_or(0)));
        let parts = [
            (MemoryPart::heap_allocated, reading.heap_allocated_bytes),
            (MemoryPart::heap_resident, reading.heap_resident_bytes),
            (
                MemoryPart::store_memtables,
                Some(reading.store.memtables_bytes),
            ),
            (
                MemoryPart::store_block_cache,
                Some(reading.store.block_cache_bytes),
            ),
            (
                MemoryPart::store_table_readers,
                Some(reading.store.table_readers_bytes),
            ),
        ];
        for (part, bytes) in parts {
            if let Some(bytes) = bytes {
                g.memory
                    .get_or_create(&MemoryLabels { part })
                    .set(gauge_value(bytes));
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .map_err(|e| e.to_string())?;
        Ok(text)
    }

    /// The answer to one HTTP request.
    async fn answer(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Full<Bytes>> {
        let reply = |status: hyper::StatusCode, content_type: &str, body: String| {
            let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            if let Ok(value) = http::HeaderValue::from_str(content_type) {
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, value);
            }
            response
        };
        if request.uri().path() != "/metrics" {
            return reply(
                hyper::StatusCode::NOT_FOUND,
                "text/plain",
                "only /metrics is served here\n".into(),
            );
        }
        if request.method() != http::Method::GET {
            return reply(
                hyper::StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET /metrics\n".into(),
            );
        }
        match self.text().await {
            Ok(text) => reply(
                hyper::StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(why) => {
                tracing::warn!(%why, "metrics could not be read");
                reply(
                    hyper::StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("metrics could not be read: {why}\n"),
                )
            }
        }
    }
}

/// Accepts connections until `stop`, at most [`MAX_CONNECTIONS`] at once.
async fn accept(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    scrape: Arc<Scrape>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors, say: a pause, not a busy loop.
                tracing::warn!(error = %e, "metrics endpoint could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (scrape, tls) = (scrape.clone(), tls.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let scrape = scrape.clone();
                async move { Ok::<_, Infallible>(scrape.answer(request).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(READ_WAIT);
            let served = match tls {
                Some(acceptor) => match tokio::time::timeout(READ_WAIT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(stream)) => {
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                    }
                    // A client without the CA's certificate, or too slow.
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "metrics: TLS handshake refused");
                        Ok(())
                    }
                    Err(_) => Ok(()),
                },
                None => {
                    http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics connection ended");
            }
            drop(slot);
        });
    }
}

/// The TLS acceptor of the metrics endpoint: the service's certificate,
/// and a client certificate the installation's CA issued required.
pub fn tls_acceptor(
    credentials: &crate::credentials::ServerCredentials,
) -> Result<tokio_rustls::TlsAcceptor, HostError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let setup = |what: &str, e: &dyn std::fmt::Display| {
        HostError::Setup(format!("metrics TLS: {what}: {e}"))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&credentials.ca) {
        let ca = ca.map_err(|e| setup("the CA", &e))?;
        roots.add(ca).map_err(|e| setup("the CA", &e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| setup("client verifier", &e))?;
    let chain = CertificateDer::pem_slice_iter(&credentials.certificate)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup("the certificate", &e))?;
    let key = PrivateKeyDer::from_pem_slice(&credentials.key).map_err(|e| setup("the key", &e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup("protocol versions", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| setup("certificate and key", &e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Binds the metrics endpoint at `addr`, refusing a non-loopback address
/// without TLS.
pub async fn bind(addr: SocketAddr, tls: bool) -> Result<tokio::net::TcpListener, HostError> {
    if !tls && !addr.ip().is_loopback() {
        return Err(HostError::Setup(format!(
            "--metrics-addr {addr} is not a loopback address: serving metrics there needs \
             --credentials (TLS, the CA's client certificates only)"
        )));
    }
    Ok(tokio::net::TcpListener::bind(addr).await?)
}

/// Longest wait for a whole scrape by [`scrape`].
const SCRAPE_WAIT: Duration = Duration::from_secs(10);
/// Largest metrics page [`scrape`] reads.
const MAX_SCRAPE_BYTES: usize = 16 * 1024 * 1024;

/// Reads `http(s)://addr/metrics` as Prometheus would: over TLS with
/// `credentials` (the CA, and a client certificate), plain without.
/// For `ticketctl` and tests.
pub async fn scrape(
    addr: SocketAddr,
    credentials: Option<&crate::credentials::ClientCredentials>,
) -> Result<String, String> {
    use http_body_util::BodyExt;
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let request = hyper::Request::get("/metrics")
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = match credentials {
            Some(credentials) => {
                let stream = tls_connector(credentials)?
                    .connect(
                        rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
                        tcp,
                    )
                    .await
                    .map_err(|e| format!("{addr}: TLS: {e}"))?;
                send(stream, request).await?
            }
            None => send(tcp, request).await?,
        };
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_SCRAPE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{addr}: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("{addr}: HTTP {status}: {text}"))
        }
    };
    tokio::time::timeout(SCRAPE_WAIT, fetch)
        .await
        .map_err(|_| format!("{addr}: no answer within {SCRAPE_WAIT:?}"))?
}

/// Sends `request` over `stream` (HTTP/1.1) and returns the response.
async fn send<S>(
    stream: S,
    request: hyper::Request<http_body_util::Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// A TLS connector trusting the installation's CA, presenting
/// `credentials`' certificate.
fn tls_connector(
    credentials: &crate::credentials::ClientCredentials,
) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&credentials.ca) {
        roots
            .add(ca.map_err(|e| format!("the CA: {e}"))?)
            .map_err(|e| format!("the CA: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let config = match &credentials.identity {
        Some((certificate, key)) => {
            let chain = CertificateDer::pem_slice_iter(certificate)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the certificate: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The tower layer counting and timing every gRPC call by method and status.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: GrpcMetrics,
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> GrpcMetricsService<S> {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

impl GrpcMetricsLayer {
    /// A layer whose figures no endpoint serves (`--no-metrics`): the
    /// server's shape stays one.
    pub fn unserved() -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            metrics: GrpcMetrics::new(),
        }
    }
}

/// A service wrapped by [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B> tower_service::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = self.metrics.method_of(request.uri().path());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        // The call's span, in the caller's trace when it sent one: what the
        // handler does (and the events it writes) belongs to it.
        let span = tracing::info_span!("grpc", rpc = %method);
        if let Some(traceparent) = crate::traces::traceparent_of(request.headers()) {
            lineguard_eventlog::trace::adopt(&span, traceparent);
        }
        let answer = span.in_scope(|| self.inner.call(request));
        Box::pin(tracing::Instrument::instrument(
            async move {
                let answer = answer.await;
                // A refusal or a unary error comes as headers alone with its
                // status; an answer that goes on (a unary reply, a stream)
                // started as OK, its final status in trailers not read here.
                let code = match &answer {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(tonic::Code::Ok, tonic::Code::from),
                    Err(_) => tonic::Code::Unknown,
                };
                metrics.record(method, code, started.elapsed());
                answer
            },
            span,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_label_is_one_the_api_defines() {
        let metrics = GrpcMetrics::new();
        assert_eq!(
            metrics.method_of("/lineguard.intake.v1.Intake/ReportTicket"),
            "lineguard.intake.v1.Intake/ReportTicket"
        );
        assert_eq!(
            metrics.method_of("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        // Whatever a hostile caller sends, the label's values stay bounded.
        assert_eq!(metrics.method_of("/x.Y/ticket-123"), "unknown");
        assert_eq!(metrics.method_of("/"), "unknown");
        assert_eq!(metrics.method_of(""), "unknown");
    }

    #[test]
    fn calls_are_counted_by_method_and_status_in_prometheus_text() {
        let mut metrics = Metrics::new("intake-p1");
        metrics.grpc.record(
            "lineguard.intake.v1.Intake/ReportTicket".into(),
            tonic::Code::Ok,
            Duration::from_millis(3),
        );
        metrics.grpc.record(
            "lineguard.intake.v1.Intake/ReportTicket".into(),
            tonic::Code::InvalidArgument,
            Duration::from_millis(1),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, metrics.registry()).expect("encodes");
        assert!(
            text.contains(
                "lineguard_grpc_server_calls_total{service=\"intake-p1\",method=\"lineguard.intake.v1.Intake/ReportTicket\",code=\"InvalidArgument\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("lineguard_grpc_server_call_duration_seconds_count{service=\"intake-p1\",method=\"lineguard.intake.v1.Intake/ReportTicket\"} 2"),
            "{text}"
        );
        assert!(text.contains("# TYPE lineguard_eventlog_commit_duration_seconds histogram"));
        assert!(text.ends_with("# EOF\n"));
    }
}
