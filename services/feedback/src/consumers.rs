//! The other services' events feedback consumes. Each is kept in feedback's
//! own log as an `EventObserved` (stream `observed-<source>`, never
//! published again), from which the projector derives every record.
//!
//! Causal order across three consumers: an event about a case is parked
//! until feedback has seen the case routed (`case:<id>`), and a route until
//! feedback has seen its lead ticket reported (`ticket:<id>`); each is
//! applied the moment what it waits for is. A completion or
//! an answer makes follow-ups due, in the same commit as its copy.

use lineguard_bus::{Handled, Handler, HandlerError, subjects::event_type_filter};
use lineguard_eventlog::{
    ActorKind, EventEnvelope, ExpectedVersion, NewEvent, Transaction, actor, decode_payload,
};
use lineguard_protos::dispatch::v1::{ClockAlerted, CrewArrived, PowerRestored, WorkCompleted};
use lineguard_protos::feedback::v1::EventObserved;
use lineguard_protos::intake::v1::{TicketCancelled, TicketReported};
use lineguard_protos::routing::v1::{
    ClockBreached, CompanyDefined, CrewDefined, DistrictDefined, ManagerDefined, StationDefined,
    TicketAccepted, TicketAnswered, TicketReturned, TicketRouted, TicketRoutingClosed,
};
use prost::Name;
use tonic::Status;

use crate::followups::Feedback;

/// The durable consumers (and their inbox ids).
pub const FROM_INTAKE: &str = "feedback-from-intake";
pub const FROM_ROUTING: &str = "feedback-from-routing";
pub const FROM_DISPATCH: &str = "feedback-from-dispatch";

fn filters(source: &str, types: &[String]) -> Vec<String> {
    types.iter().map(|t| event_type_filter(source, t)).collect()
}

/// Intake's events feedback keeps: every ticket, and cancellations.
pub fn intake_subjects() -> Vec<String> {
    filters(
        "intake",
        &[TicketReported::full_name(), TicketCancelled::full_name()],
    )
}

/// Routing's events feedback keeps: the directory and every case's route.
pub fn routing_subjects() -> Vec<String> {
    filters(
        "routing",
        &[
            CompanyDefined::full_name(),
            StationDefined::full_name(),
            DistrictDefined::full_name(),
            ManagerDefined::full_name(),
            CrewDefined::full_name(),
            TicketRouted::full_name(),
            TicketAccepted::full_name(),
            TicketAnswered::full_name(),
            TicketReturned::full_name(),
            TicketRoutingClosed::full_name(),
            ClockBreached::full_name(),
        ],
    )
}

/// Dispatch's events feedback keeps: arrivals, restorations, completions, breaches.
pub fn dispatch_subjects() -> Vec<String> {
    filters(
        "dispatch",
        &[
            CrewArrived::full_name(),
            PowerRestored::full_name(),
            WorkCompleted::full_name(),
            ClockAlerted::full_name(),
        ],
    )
}

/// The stream of feedback's copies of `source`'s events.
pub fn observed_stream(source: &str) -> String {
    format!("observed-{source}")
}

/// A case resolved: its id, the tickets it covers, "completed" or "answered".
type Resolution = (String, Vec<String>, &'static str);

/// Records each consumed event, and the follow-ups a resolution makes due.
pub struct Observer(pub Feedback);

fn retry(e: Status) -> HandlerError {
    HandlerError::Retry(e.message().to_string())
}

impl Observer {
    /// The case the event is about, when feedback must have seen it routed
    /// first, and the ticket a route needs seen reported first.
    fn prerequisite(&self, event: &EventEnvelope) -> Result<Option<(bool, String)>, HandlerError> {
        let t = event.event_type.as_str();
        let reject = HandlerError::Reject;
        let case = |id: String| Ok(Some((true, id)));
        if t == TicketRouted::full_name() {
            let e: TicketRouted = decode_payload(event).map_err(reject)?;
            return Ok(Some((false, e.lead_ticket_id)));
        }
        if t == TicketAccepted::full_name() {
            return case(
                decode_payload::<TicketAccepted>(event)
                    .map_err(reject)?
                    .case_id,
            );
        }
        if t == TicketAnswered::full_name() {
            return case(
                decode_payload::<TicketAnswered>(event)
                    .map_err(reject)?
                    .case_id,
            );
        }
        if t == TicketReturned::full_name() {
            return case(
                decode_payload::<TicketReturned>(event)
                    .map_err(reject)?
                    .case_id,
            );
        }
        if t == TicketRoutingClosed::full_name() {
            return case(
                decode_payload::<TicketRoutingClosed>(event)
                    .map_err(reject)?
                    .case_id,
            );
        }
        if t == ClockBreached::full_name() {
            return case(
                decode_payload::<ClockBreached>(event)
                    .map_err(reject)?
                    .case_id,
            );
        }
        if t == CrewArrived::full_name() {
            return case(
                decode_payload::<CrewArrived>(event)
                    .map_err(reject)?
                    .order_id,
            );
        }
        if t == PowerRestored::full_name() {
            return case(
                decode_payload::<PowerRestored>(event)
                    .map_err(reject)?
                    .order_id,
            );
        }
        if t == WorkCompleted::full_name() {
            return case(
                decode_payload::<WorkCompleted>(event)
                    .map_err(reject)?
                    .order_id,
            );
        }
        if t == ClockAlerted::full_name() {
            return case(
                decode_payload::<ClockAlerted>(event)
                    .map_err(reject)?
                    .order_id,
            );
        }
        Ok(None)
    }

    /// The case a resolution ends, the tickets it covers, and what it was.
    fn resolution(&self, event: &EventEnvelope) -> Result<Option<Resolution>, HandlerError> {
        let t = event.event_type.as_str();
        if t == WorkCompleted::full_name() {
            let e: WorkCompleted = decode_payload(event).map_err(HandlerError::Reject)?;
            return Ok(Some((e.order_id, e.ticket_ids, "completed")));
        }
        if t == TicketAnswered::full_name() {
            let e: TicketAnswered = decode_payload(event).map_err(HandlerError::Reject)?;
            let tickets = self
                .0
                .case(&e.case_id)
                .map_err(retry)?
                .map(|c| c.ticket_ids)
                .unwrap_or_default();
            return Ok(Some((e.case_id, tickets, "answered")));
        }
        Ok(None)
    }
}

impl Handler for Observer {
    fn satisfies(&self, event: &EventEnvelope) -> Vec<String> {
        let t = event.event_type.as_str();
        if t == TicketReported::full_name() {
            return decode_payload::<TicketReported>(event)
                .map(|e| vec![format!("ticket:{}", e.ticket_id)])
                .unwrap_or_default();
        }
        if t == TicketRouted::full_name() {
            return decode_payload::<TicketRouted>(event)
                .map(|e| vec![format!("case:{}", e.case_id)])
                .unwrap_or_default();
        }
        Vec::new()
    }

    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        match self.prerequisite(event)? {
            Some((true, case)) if self.0.case(&case).map_err(retry)?.is_none() => {
                return Err(HandlerError::Waiting {
                    key: format!("case:{case}"),
                    reason: format!("case {case} not yet seen routed"),
                });
            }
            Some((false, ticket)) if self.0.ticket(&ticket).map_err(retry)?.is_none() => {
                return Err(HandlerError::Waiting {
                    key: format!("ticket:{ticket}"),
                    reason: format!("ticket {ticket} not yet seen reported"),
                });
            }
            _ => {}
        }
        let copy = NewEvent::new(
            &EventObserved {
                event: Some(event.clone()),
            },
            &event.correlation_id,
            actor(ActorKind::System, "feedback"),
        )
        .caused_by(&event.event_id)
        .unpublished();
        let txn = Transaction::append(
            observed_stream(&event.source),
            ExpectedVersion::Any,
            vec![copy],
        );
        let Some((case, tickets, what)) = self.resolution(event)? else {
            return Ok(Handled::Commit(txn));
        };
        let guards = self.0.lock_owned(&tickets).await;
        let at = event.recorded_at.unwrap_or_default();
        let scheduled = self
            .0
            .schedule(&case, &tickets, what, &at, &event.event_id)
            .map_err(retry)?;
        // One stream, the case's, for all of a resolution's follow-ups: an
        // incident covers any number of tickets, a commit at most 16 streams.
        let mut follow_ups = Vec::with_capacity(scheduled.len());
        for (ticket_id, e) in scheduled {
            tracing::info!(ticket_id = %ticket_id, correlation_id = %case, resolution = what,
                "follow-up due");
            follow_ups.push(e);
        }
        let txn = if follow_ups.is_empty() {
            txn
        } else {
            txn.and_append(&case, ExpectedVersion::Any, follow_ups)
        };
        Ok(Handled::CommitHolding(txn, Box::new(guards)))
    }
}
