//! Traces across services: the four services export their spans over OTLP
//! to a collector (here one in the test process); a customer's call starts
//! a trace at intake's `ReportTicket`, and the work every other service
//! does for that ticket (routing routes it, dispatch orders a crew,
//! feedback and intake take note) is in the same trace, its context
//! carried in gRPC metadata, in each event and in the NATS headers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lineguard_harness::{FourServices, NatsServer, free_port};
use lineguard_protos::intake::v1::{Caller, Channel, ReportTicketRequest, TicketKind};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: Vec<u8>,
    name: String,
    attributes: BTreeMap<String, String>,
}

/// An OTLP trace collector keeping every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| text(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .filter_map(|kv| Some((kv.key.clone(), text(&span.attributes, &kv.key)?)))
                        .collect();
                    received.push(Received {
                        service: service.clone(),
                        trace_id: span.trace_id.clone(),
                        name: span.name.clone(),
                        attributes,
                    });
                }
            }
        }
        self.spans.lock().expect("spans").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tickets_work_in_all_four_services_is_one_trace() {
    let collector = Collector::default();
    let port = free_port().expect("a port");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the collector");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let services = FourServices::start(
        dir.path(),
        &nats.url(),
        &[
            "--otlp-endpoint".to_string(),
            format!("http://127.0.0.1:{port}"),
        ],
        |name| common::storm_backend_flags(name, &[]),
    )
    .expect("start");
    services
        .wait_healthy(Duration::from_secs(90))
        .await
        .expect("healthy");
    let clients = common::admin_clients(&services);

    let answer = clients
        .intake()
        .report_ticket(ReportTicketRequest {
            idempotency_key: "traced-1".into(),
            channel: Channel::Hotline95598 as i32,
            kind: TicketKind::FaultRepair as i32,
            account_number: "3100003686".into(),
            address: "Trace Lane".into(),
            caller: Some(Caller {
                name: "Traced caller".into(),
                phone: "13900000001".into(),
            }),
            description: "lights out".into(),
            ..ReportTicketRequest::default()
        })
        .await
        .expect("report")
        .into_inner();
    // A fault call leads an incident: the case routing and dispatch work
    // (and intake follows) is the incident's.
    let (ticket_id, case_id) = (answer.ticket_id.clone(), answer.incident_id.clone());
    let of_the_ticket = |s: &Received| {
        s.attributes
            .get("correlation_id")
            .is_some_and(|c| *c == ticket_id || (!case_id.is_empty() && *c == case_id))
    };

    // Every service's work on the ticket, each in the trace of the call.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (report_trace, traces_by_service) = loop {
        let spans = collector.spans.lock().expect("spans").clone();
        let report = spans.iter().find(|s| {
            s.service == "intake"
                && s.name == "grpc"
                && s.attributes.get("rpc").map(String::as_str)
                    == Some("lineguard.intake.v1.Intake/ReportTicket")
        });
        let mut by_service: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
        for span in spans.iter().filter(|s| of_the_ticket(s)).chain(report) {
            by_service
                .entry(span.service.clone())
                .or_default()
                .insert(span.trace_id.clone());
        }
        if let Some(report) = report
            && by_service.len() == 4
        {
            break (report.trace_id.clone(), by_service);
        }
        if std::time::Instant::now() > deadline {
            let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
            for s in &spans {
                *seen.entry((s.service.clone(), s.name.clone())).or_default() += 1;
            }
            panic!(
                "no trace of {ticket_id} in all four services: {by_service:?}; spans received: {seen:?}; \
                 a consume span: {:?}",
                spans.iter().find(|s| s.name == "consume")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(report_trace.len(), 16, "a W3C trace id");
    assert!(report_trace.iter().any(|b| *b != 0));
    for (service, trace_ids) in &traces_by_service {
        assert_eq!(
            trace_ids,
            &BTreeSet::from([report_trace.clone()]),
            "{service}'s work on the ticket is in the report's trace"
        );
    }
    assert_eq!(
        traces_by_service.keys().collect::<Vec<_>>(),
        ["dispatch", "feedback", "intake", "routing"]
    );
}
