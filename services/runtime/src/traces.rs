//! Traces across services: OpenTelemetry, exported over OTLP when
//! `--otlp-endpoint` names a collector (off by default).
//!
//! Spans stay `tracing` spans; [`layer`] makes them OpenTelemetry spans as
//! well. One trace follows a ticket through every service: its context
//! (W3C `traceparent`) travels
//!
//! - in gRPC metadata: the server span of every call
//!   ([`crate::metrics::GrpcMetricsLayer`]) takes up the caller's, and a
//!   call forwarded to another partition carries its own
//!   ([`crate::partitions::Partitions::relay`]);
//! - with every event: an event records the context of the work that
//!   wrote it (`EventEnvelope.trace_parent`, through the hooks of
//!   [`lineguard_eventlog::trace`] this module sets), the outbox relay
//!   publishes it as the NATS header `traceparent`, and a consumer's span
//!   for the event takes it up, so the events its handler writes carry it
//!   on.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and metadata key) carrying a trace context.
pub const TRACE_PARENT: &str = "traceparent";

/// How often spans are sent to the collector (and at most how long one
/// waits).
const EXPORT_EVERY: Duration = Duration::from_millis(500);

/// Exported spans of one process; flushed by [`Traces::shutdown`].
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Sends what is still buffered and stops exporting.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces: the exporter did not shut down cleanly");
        }
    }
}

/// The OpenTelemetry layer exporting `service`'s spans to the OTLP
/// collector at `endpoint` (gRPC, e.g. `http://collector:4317`), and the
/// handle that flushes it. Sets the trace hooks of the log and the bus.
/// Call within the tokio runtime.
pub fn layer<S>(
    service: &str,
    endpoint: &str,
) -> Result<
    (
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
        Traces,
    ),
    String,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .with_batch_config(
            opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_scheduled_delay(EXPORT_EVERY)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("lineguard");
    lineguard_eventlog::trace::set_hooks(lineguard_eventlog::trace::TraceHooks {
        current: current_traceparent,
        adopt,
    });
    Ok((
        tracing_opentelemetry::layer().with_tracer(tracer),
        Traces { provider },
    ))
}

/// The current span's `traceparent` (empty when it records no trace).
pub fn current_traceparent() -> String {
    let context = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACE_PARENT).unwrap_or_default()
}

/// Makes the work `traceparent` names the parent of `span`.
pub fn adopt(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACE_PARENT.to_string(), traceparent.to_string())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    // A span already closed, or no OpenTelemetry layer: nothing to join.
    let _ = span.set_parent(parent);
}

/// The `traceparent` of a gRPC request's metadata, if any (bounded: a
/// W3C trace context is 55 characters).
pub fn traceparent_of(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(TRACE_PARENT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
}

/// Puts the current span's trace context into outgoing `metadata`.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let traceparent = lineguard_eventlog::trace::current_traceparent();
    if let Ok(value) = traceparent.parse()
        && !traceparent.is_empty()
    {
        metadata.insert(TRACE_PARENT, value);
    }
}
