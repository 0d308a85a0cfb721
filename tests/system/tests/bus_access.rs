//! NATS is as closed as gRPC: a connection without a certificate from the
//! installation's CA is refused, each service may publish only on its own
//! subjects (NATS refuses the rest), and an envelope smuggled onto the right
//! subject by a service that does not own it is dead-lettered by the
//! consumer, never applied.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::{Backend, eventually};
use lineguard_harness::test_credentials;
use lineguard_protos::bus::v1::ListDeadLettersRequest;
use lineguard_protos::bus::v1::consumers_client::ConsumersClient;
use lineguard_protos::eventlog::v1::EventEnvelope;
use lineguard_runtime::bus_access::inbox_prefix;
use prost::Message;

fn envelope(id: &str, source: &str, event_type: &str, ticket: &str) -> EventEnvelope {
    EventEnvelope {
        event_id: id.into(),
        stream_id: ticket.into(),
        stream_version: 1,
        global_position: 1,
        correlation_id: ticket.into(),
        event_type: event_type.into(),
        schema_version: 1,
        source: source.into(),
        ..EventEnvelope::default()
    }
}

#[tokio::test]
async fn nats_refuses_what_a_service_may_not_do_and_consumers_reject_foreign_envelopes() {
    let backend = Backend::start().await;
    let url = backend.nats.url();

    // No client certificate, or no TLS at all: no connection.
    let without_certificate = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(test_credentials().ca())
        .connection_timeout(Duration::from_secs(3))
        .connect(&url)
        .await;
    assert!(
        without_certificate.is_err(),
        "a connection without a client certificate is refused"
    );
    let plain = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(&url)
        .await;
    assert!(plain.is_err(), "a plain connection is refused");

    // Intake's own user, as the intake process connects.
    let intake = backend
        .nats
        .client_as("service", "intake", Some(inbox_prefix("intake")))
        .await
        .expect("intake connects with its certificate");
    let intake_js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(3))
        .build(intake);
    let admin = backend.nats.jetstream().await.expect("admin");

    // A route forged on routing's subject: NATS refuses it, routing's
    // stream never holds it.
    let forged_subject = "lineguard.routing.TicketRouted.ticket-forged";
    let forged = envelope(
        "evt-forged-route",
        "routing",
        "lineguard.routing.v1.TicketRouted",
        "ticket-forged",
    );
    let published = match intake_js
        .publish(forged_subject, forged.encode_to_vec().into())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        published.is_err(),
        "NATS refuses intake's publish on routing's subject"
    );
    let routing_stream = admin
        .get_stream("LINEGUARD_ROUTING")
        .await
        .expect("routing's stream");
    assert!(
        routing_stream
            .get_last_raw_message_by_subject(forged_subject)
            .await
            .is_err(),
        "routing's stream holds nothing on the forged subject"
    );

    // Nor may intake manage routing's stream or read it under another
    // consumer's name.
    let deleted = intake_js.delete_stream("LINEGUARD_ROUTING").await;
    assert!(deleted.is_err(), "intake may not delete routing's stream");
    assert!(
        admin.get_stream("LINEGUARD_ROUTING").await.is_ok(),
        "routing's stream is still there"
    );
    let spy = intake_js
        .create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                durable_name: Some("dispatch-from-routing-spy".into()),
                ..Default::default()
            },
            "LINEGUARD_ROUTING",
        )
        .await;
    assert!(
        spy.is_err(),
        "intake may not read routing's stream under a name not its own"
    );

    // Intake may publish on its own subject, but an envelope there that
    // says it comes from routing is not intake's event: routing's consumer
    // of intake dead-letters it with the reason.
    let smuggled = envelope(
        "evt-smuggled",
        "routing",
        "lineguard.intake.v1.TicketReported",
        "ticket-smuggled",
    );
    intake_js
        .publish(
            "lineguard.intake.TicketReported.ticket-smuggled",
            smuggled.encode_to_vec().into(),
        )
        .await
        .expect("intake may publish on its own subject")
        .await
        .expect("JetStream keeps it");
    let channel = backend.routing.channel().await.expect("routing");
    let dead = eventually("the smuggled envelope dead-lettered", || {
        let mut consumers = ConsumersClient::new(channel.clone());
        async move {
            let listed = consumers
                .list_dead_letters(ListDeadLettersRequest::default())
                .await
                .ok()?
                .into_inner();
            listed
                .dead_letters
                .into_iter()
                .find(|d| d.subject.ends_with("ticket-smuggled"))
        }
    })
    .await;
    assert_eq!(dead.consumer, "routing-from-intake");
    assert!(
        dead.error.contains("does not match its subject"),
        "the reason is given: {dead:?}"
    );
    assert!(
        backend.route("ticket-smuggled").await.is_none(),
        "nothing smuggled was routed"
    );
}
