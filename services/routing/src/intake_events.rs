//! What routing does with intake's events: route every new ticket or
//! incident lead, let incident children follow, stop on cancellation.

use lineguard_bus::{Handled, Handler, HandlerError, subjects::event_type_filter};
use lineguard_eventlog::{
    ActorKind, EventEnvelope, ExpectedVersion, NewEvent, Transaction, actor, decode_payload,
};
use lineguard_protos::intake::v1::{TicketCancelled, TicketReported};
use lineguard_protos::routing::v1::{RouteStatus, TicketFollowedIncident, TicketRoutingClosed};
use prost::Name;

use crate::router::{Router, RouterError, now};

/// The durable consumer's name (and inbox id).
pub const CONSUMER: &str = "routing-from-intake";

/// The intake subjects routing consumes.
pub fn subjects() -> Vec<String> {
    vec![
        event_type_filter("intake", &TicketReported::full_name()),
        event_type_filter("intake", &TicketCancelled::full_name()),
    ]
}

/// Routes what intake takes in.
pub struct IntakeEvents {
    router: Router,
}

impl IntakeEvents {
    pub fn new(router: Router) -> Self {
        IntakeEvents { router }
    }
}

fn retry(e: RouterError) -> HandlerError {
    match e {
        RouterError::Log(l) if !l.is_transient() => HandlerError::Reject(l.to_string()),
        other => HandlerError::Retry(other.to_string()),
    }
}

impl Handler for IntakeEvents {
    /// A report is decided in its station's lane: one station's decisions
    /// read and change the loads of its own managers, desk and crews, so
    /// they go one after another and each sees the ones before it, while
    /// stations go side by side. (Two stations' decisions may both reach
    /// the company's desk, the last line, which has no threshold to pass
    /// over; routing's other consumers already run beside this one.) A
    /// report whose district is not known goes in one lane of its own; a
    /// cancellation waits for everything before it (it must see its
    /// ticket's route), as does anything the lookup cannot place.
    fn lane(&self, event: &EventEnvelope) -> Option<String> {
        if event.event_type != TicketReported::full_name() {
            return None;
        }
        let reported: TicketReported = decode_payload(event).ok()?;
        let district = self
            .router
            .locate(&reported.district_id, &reported.account_number)
            .ok()?;
        Some(match district {
            Some(d) => format!("station {}", d.station_id),
            None => "no district".to_string(),
        })
    }

    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        let system = actor(ActorKind::System, "routing");
        if event.event_type == TicketReported::full_name() {
            let reported: TicketReported = decode_payload(event).map_err(HandlerError::Reject)?;
            if !reported.incident_id.is_empty() && !reported.incident_lead {
                let follows = TicketFollowedIncident {
                    ticket_id: reported.ticket_id.clone(),
                    incident_id: reported.incident_id.clone(),
                };
                return Ok(Handled::Commit(Transaction::append(
                    &reported.ticket_id,
                    ExpectedVersion::NoStream,
                    vec![
                        NewEvent::new(&follows, &reported.incident_id, system)
                            .caused_by(&event.event_id),
                    ],
                )));
            }
            let case = if reported.incident_lead {
                reported.incident_id.clone()
            } else {
                reported.ticket_id.clone()
            };
            if self.router.route(&case).map_err(retry)?.is_some() {
                return Ok(Handled::Ignore);
            }
            let routed = self
                .router
                .first_route(&reported, &case, &now())
                .map_err(retry)?;
            tracing::info!(ticket_id = %reported.ticket_id, correlation_id = %case,
                line = routed.line, assignee_id = %routed.assignee_id, reason = ?routed.reason(),
                "routed");
            return Ok(Handled::Commit(Transaction::append(
                &case,
                ExpectedVersion::NoStream,
                vec![NewEvent::new(&routed, &case, system).caused_by(&event.event_id)],
            )));
        }
        if event.event_type == TicketCancelled::full_name() {
            let cancelled: TicketCancelled = decode_payload(event).map_err(HandlerError::Reject)?;
            // Only a ticket routed on its own stops; an incident goes on for
            // its other callers.
            let Some(route) = self.router.route(&cancelled.ticket_id).map_err(retry)? else {
                return Ok(Handled::Ignore);
            };
            if !matches!(route.status(), RouteStatus::Routed | RouteStatus::Accepted) {
                return Ok(Handled::Ignore);
            }
            let closed = TicketRoutingClosed {
                case_id: route.case_id.clone(),
                reason: format!("cancelled by the customer: {}", cancelled.reason),
                closed_at: Some(now()),
                hop: route.hop,
            };
            return Ok(Handled::Commit(Transaction::append(
                &route.case_id,
                ExpectedVersion::Exact(route.version),
                vec![NewEvent::new(&closed, &route.case_id, system).caused_by(&event.event_id)],
            )));
        }
        Ok(Handled::Ignore)
    }
}
