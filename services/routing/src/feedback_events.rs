//! What routing does with feedback's events: a ticket reopened by a
//! dissatisfied customer goes back to the owner of its district as a new
//! hop (reason `REOPENED`), with its clocks running again.

use lineguard_bus::{Handled, Handler, HandlerError, subjects::event_type_filter};
use lineguard_eventlog::{
    ActorKind, EventEnvelope, ExpectedVersion, NewEvent, Transaction, actor, decode_payload,
};
use lineguard_protos::feedback::v1::TicketReopened;
use lineguard_protos::routing::v1::RouteStatus;
use prost::Name;

use crate::router::{Router, RouterError, now};

/// The durable consumer's name (and inbox id).
pub const CONSUMER: &str = "routing-from-feedback";

/// The feedback subjects routing consumes.
pub fn subjects() -> Vec<String> {
    vec![event_type_filter("feedback", &TicketReopened::full_name())]
}

/// Routes reopened tickets back to their owners.
pub struct FeedbackEvents {
    router: Router,
}

impl FeedbackEvents {
    pub fn new(router: Router) -> Self {
        FeedbackEvents { router }
    }
}

fn retry(e: RouterError) -> HandlerError {
    match e {
        RouterError::Log(l) if !l.is_transient() => HandlerError::Reject(l.to_string()),
        other => HandlerError::Retry(other.to_string()),
    }
}

impl Handler for FeedbackEvents {
    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        if event.event_type != TicketReopened::full_name() {
            return Ok(Handled::Ignore);
        }
        let reopened: TicketReopened = decode_payload(event).map_err(HandlerError::Reject)?;
        let route = match self.router.route(&reopened.case_id).map_err(retry)? {
            Some(route) => Some(route),
            None => self.router.case_of(&reopened.ticket_id).map_err(retry)?,
        };
        let Some(route) = route else {
            tracing::warn!(ticket_id = %reopened.ticket_id, correlation_id = %reopened.case_id,
                "reopen of a ticket routing never routed: ignored");
            return Ok(Handled::Ignore);
        };
        // Still waiting for its holder to take it: already where a reopen
        // would send it. Closed (not ours, cancelled): nobody to send it to.
        if matches!(route.status(), RouteStatus::Routed | RouteStatus::Closed) {
            tracing::warn!(ticket_id = %reopened.ticket_id, correlation_id = %route.case_id,
                status = ?route.status(), "reopen of a case not resolved: ignored");
            return Ok(Handled::Ignore);
        }
        let routed = self
            .router
            .reopened(&route, &reopened.reason, &now())
            .map_err(retry)?;
        tracing::info!(ticket_id = %reopened.ticket_id, correlation_id = %route.case_id,
            hop = routed.hop, line = routed.line, assignee_id = %routed.assignee_id, "reopened");
        Ok(Handled::Commit(Transaction::append(
            &route.case_id,
            ExpectedVersion::Exact(route.version),
            vec![
                NewEvent::new(&routed, &route.case_id, actor(ActorKind::System, "routing"))
                    .caused_by(&event.event_id),
            ],
        )))
    }
}
