//! Intake's view of other services' events: each one intake consumes is
//! recorded in intake's own log as an `EventObserved` (never published
//! again), so the customer-facing views are derived from intake's log alone
//! and rebuild from it.

use lineguard_bus::{Handled, Handler, HandlerError, subjects::event_type_filter};
use lineguard_eventlog::{ActorKind, EventEnvelope, ExpectedVersion, NewEvent, Transaction, actor};
use lineguard_protos::dispatch::v1::{
    ClockAlerted, CrewArrived, CrewDeparted, EtrUpdated, OrderAcknowledged, OrderAssigned,
    PowerRestored, WorkCompleted,
};
use lineguard_protos::intake::v1::EventObserved;
use lineguard_protos::routing::v1::{
    AccountsAssigned, ClockBreached, ClockWarned, TicketAccepted, TicketAnswered, TicketRouted,
    TicketRoutingClosed,
};
use prost::Name;

/// The durable consumers of routing's and dispatch's events (and their inbox ids).
pub const CONSUMER: &str = "intake-from-routing";
pub const DISPATCH_CONSUMER: &str = "intake-from-dispatch";

/// Routing's events intake shows on its views.
pub fn routing_subjects() -> Vec<String> {
    [
        AccountsAssigned::full_name(),
        TicketRouted::full_name(),
        TicketAccepted::full_name(),
        TicketAnswered::full_name(),
        TicketRoutingClosed::full_name(),
        ClockWarned::full_name(),
        ClockBreached::full_name(),
    ]
    .iter()
    .map(|t| event_type_filter("routing", t))
    .collect()
}

/// Dispatch's events intake shows on its views.
pub fn dispatch_subjects() -> Vec<String> {
    [
        OrderAssigned::full_name(),
        OrderAcknowledged::full_name(),
        CrewDeparted::full_name(),
        CrewArrived::full_name(),
        EtrUpdated::full_name(),
        PowerRestored::full_name(),
        WorkCompleted::full_name(),
        ClockAlerted::full_name(),
    ]
    .iter()
    .map(|t| event_type_filter("dispatch", t))
    .collect()
}

/// The stream of intake's copies of `source`'s events.
pub fn observed_stream(source: &str) -> String {
    format!("observed-{source}")
}

/// Records each consumed event as an `EventObserved`.
pub struct Observer;

impl Handler for Observer {
    /// A case's events change only that case's view (its ticket, or its
    /// incident's lead): cases are applied side by side.
    fn lane(&self, event: &EventEnvelope) -> Option<String> {
        Some(event.correlation_id.clone())
    }

    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        let stream = observed_stream(&event.source);
        let observed = EventObserved {
            event: Some(event.clone()),
        };
        let copy = NewEvent::new(
            &observed,
            &event.correlation_id,
            actor(ActorKind::System, "intake"),
        )
        .caused_by(&event.event_id)
        .unpublished();
        Ok(Handled::Commit(Transaction::append(
            stream,
            ExpectedVersion::Any,
            vec![copy],
        )))
    }
}
