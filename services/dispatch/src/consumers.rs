//! What dispatch does with routing's and intake's events.

use lineguard_bus::{Handled, Handler, HandlerError, subjects::event_type_filter};
use lineguard_eventlog::{EventEnvelope, decode_payload};
use lineguard_protos::intake::v1::{TicketReported, TicketUrged};
use lineguard_protos::routing::v1::{CrewDefined, TicketRouted, TicketRoutingClosed};
use prost::Name;
use tonic::Status;

use crate::orders::{Dispatcher, Hold};

/// Durable consumer names (and inbox ids).
pub const FROM_ROUTING: &str = "dispatch-from-routing";
pub const FROM_INTAKE: &str = "dispatch-from-intake";

pub fn routing_subjects() -> Vec<String> {
    [
        CrewDefined::full_name(),
        TicketRouted::full_name(),
        TicketRoutingClosed::full_name(),
    ]
    .iter()
    .map(|t| event_type_filter("routing", t))
    .collect()
}

pub fn intake_subjects() -> Vec<String> {
    [TicketReported::full_name(), TicketUrged::full_name()]
        .iter()
        .map(|t| event_type_filter("intake", t))
        .collect()
}

fn failed(s: Status) -> HandlerError {
    HandlerError::Retry(s.message().to_string())
}

fn commit(decided: Option<(lineguard_eventlog::Transaction, Hold)>) -> Handled {
    match decided {
        Some((txn, hold)) => Handled::CommitHolding(txn, Box::new(hold)),
        None => Handled::Ignore,
    }
}

/// Turns routes into work orders.
pub struct RoutingEvents(pub Dispatcher);

impl Handler for RoutingEvents {
    /// A case's route and closing touch its order, under the dispatcher's
    /// locks: cases go side by side. A crew's definition changes what every
    /// later order may be given to: it waits for what came before it.
    fn lane(&self, event: &EventEnvelope) -> Option<String> {
        (event.event_type != CrewDefined::full_name()).then(|| event.correlation_id.clone())
    }

    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        let t = event.event_type.as_str();
        if t == CrewDefined::full_name() {
            let e: CrewDefined = decode_payload(event).map_err(HandlerError::Reject)?;
            let crew = e.crew.unwrap_or_default();
            return Ok(Handled::Commit(self.0.crew_defined(&crew)));
        }
        if t == TicketRouted::full_name() {
            let e: TicketRouted = decode_payload(event).map_err(HandlerError::Reject)?;
            // Routing's event can overtake intake's on the bus: the order
            // needs the ticket (the crew hears who called), so the route is
            // parked until intake's report is applied.
            if e.field_work
                && !e.crew_id.is_empty()
                && !self.0.ticket_known(&e.lead_ticket_id).map_err(failed)?
            {
                return Err(HandlerError::Waiting {
                    key: ticket_key(&e.lead_ticket_id),
                    reason: format!("ticket {} not yet heard of from intake", e.lead_ticket_id),
                });
            }
            return self
                .0
                .routed(&e, &event.event_id)
                .await
                .map(commit)
                .map_err(failed);
        }
        if t == TicketRoutingClosed::full_name() {
            let e: TicketRoutingClosed = decode_payload(event).map_err(HandlerError::Reject)?;
            return self
                .0
                .routing_closed(&e, &event.event_id)
                .await
                .map(commit)
                .map_err(failed);
        }
        Ok(Handled::Ignore)
    }
}

/// What a parked route waits for: intake's report of its lead ticket.
pub fn ticket_key(ticket_id: &str) -> String {
    format!("ticket:{ticket_id}")
}

/// Notes tickets (channels, incidents) and urges.
pub struct IntakeEvents(pub Dispatcher);

impl Handler for IntakeEvents {
    /// A ticket's report and urges go in its lane, and an incident's calls
    /// (its lead's and its children's reports) in the incident's, in the
    /// order intake took them.
    fn lane(&self, event: &EventEnvelope) -> Option<String> {
        if event.event_type == TicketReported::full_name()
            && let Ok(e) = decode_payload::<TicketReported>(event)
            && !e.incident_id.is_empty()
        {
            return Some(e.incident_id);
        }
        Some(event.correlation_id.clone())
    }

    fn satisfies(&self, event: &EventEnvelope) -> Vec<String> {
        if event.event_type != TicketReported::full_name() {
            return Vec::new();
        }
        decode_payload::<TicketReported>(event)
            .map(|e| vec![ticket_key(&e.ticket_id)])
            .unwrap_or_default()
    }

    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        let t = event.event_type.as_str();
        if t == TicketReported::full_name() {
            let e: TicketReported = decode_payload(event).map_err(HandlerError::Reject)?;
            return self
                .0
                .ticket_reported(&e, &event.event_id)
                .await
                .map(|decided| commit(Some(decided)))
                .map_err(failed);
        }
        if t == TicketUrged::full_name() {
            let e: TicketUrged = decode_payload(event).map_err(HandlerError::Reject)?;
            if !self.0.ticket_noted(&e.ticket_id).map_err(failed)? {
                return Err(HandlerError::Waiting {
                    key: ticket_key(&e.ticket_id),
                    reason: format!("ticket {} not yet heard of from intake", e.ticket_id),
                });
            }
            return self
                .0
                .ticket_urged(&e, &event.event_id)
                .await
                .map(|decided| commit(Some(decided)))
                .map_err(failed);
        }
        Ok(Handled::Ignore)
    }
}
