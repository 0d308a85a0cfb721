//! What routing does with dispatch's events: a crew's acknowledgement of
//! its work order is the acceptance of the ticket (it stops the acceptance
//! clock, as `AcceptTicket` does for desk work); a crew's return (退单) is
//! handled as `ReturnTicket` is: re-routed to the right district or closed;
//! a crew's completion ends the hop's field work (`TicketWorkCompleted`),
//! so the case no longer counts in its holder's or its crew's load.

use lineguard_bus::{Handled, Handler, HandlerError, subjects::event_type_filter};
use lineguard_eventlog::{
    ActorKind, EventEnvelope, ExpectedVersion, NewEvent, Transaction, actor, decode_payload,
};
use lineguard_protos::dispatch::v1::{OrderAcknowledged, OrderReturned, WorkCompleted};
use lineguard_protos::routing::v1::{
    ReturnReason, RouteStatus, TicketAccepted, TicketWorkCompleted,
};
use prost::Name;

use crate::projection::nanos;
use crate::router::Router;

/// The durable consumer's name (and inbox id).
pub const CONSUMER: &str = "routing-from-dispatch";

/// The dispatch subjects routing consumes.
pub fn subjects() -> Vec<String> {
    vec![
        event_type_filter("dispatch", &OrderAcknowledged::full_name()),
        event_type_filter("dispatch", &OrderReturned::full_name()),
        event_type_filter("dispatch", &WorkCompleted::full_name()),
    ]
}

/// Records crews' acknowledgements as acceptances, and their returns.
pub struct DispatchEvents {
    router: Router,
}

impl DispatchEvents {
    pub fn new(router: Router) -> Self {
        DispatchEvents { router }
    }
}

impl DispatchEvents {
    fn crew_returned(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        let r: OrderReturned = decode_payload(event).map_err(HandlerError::Reject)?;
        let retry = |e: crate::router::RouterError| HandlerError::Retry(e.to_string());
        let Some(route) = self
            .router
            .route(&r.order_id)
            .map_err(retry)?
            .filter(|route| {
                matches!(route.status(), RouteStatus::Routed | RouteStatus::Accepted)
                    && route.crew_id == r.crew_id
            })
        else {
            return Ok(Handled::Ignore);
        };
        let (reason, correct) = match r.reason.as_str() {
            "wrong_district" => {
                let district = self
                    .router
                    .directory()
                    .district(&r.correct_district_id)
                    .map_err(|e| HandlerError::Retry(e.to_string()))?;
                match district {
                    Some(d) if d.district_id != route.district_id => {
                        (ReturnReason::WrongDistrict, Some(d))
                    }
                    // Not a district routing can send it to: nobody's, so closed.
                    _ => (ReturnReason::NotOurs, None),
                }
            }
            "customer_side_fault" => (ReturnReason::CustomerSideFault, None),
            _ => (ReturnReason::NotOurs, None),
        };
        let at = event.recorded_at.unwrap_or_default();
        let (events, _) = self
            .router
            .returned(
                &route,
                crew_actor(event, &r.crew_id),
                reason,
                correct,
                &r.note,
                &at,
            )
            .map_err(retry)?;
        let events = events
            .into_iter()
            .map(|e| e.caused_by(&event.event_id))
            .collect();
        Ok(Handled::Commit(Transaction::append(
            &route.case_id,
            ExpectedVersion::Exact(route.version),
            events,
        )))
    }
}

impl DispatchEvents {
    fn work_completed(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        let done: WorkCompleted = decode_payload(event).map_err(HandlerError::Reject)?;
        let route = self
            .router
            .route(&done.order_id)
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        // Only the work of the hop that sent this crew, while it is open: a
        // completion of an older hop's order (the case moved on) ends nothing.
        let Some(route) = route.filter(|r| {
            matches!(r.status(), RouteStatus::Routed | RouteStatus::Accepted)
                && r.field_work
                && r.crew_id == done.crew_id
        }) else {
            return Ok(Handled::Ignore);
        };
        let completed = TicketWorkCompleted {
            case_id: route.case_id.clone(),
            hop: route.hop,
            assignee_id: route.assignee_id.clone(),
            crew_id: done.crew_id.clone(),
            completed_at: done.device_time.or(event.recorded_at),
        };
        Ok(Handled::Commit(Transaction::append(
            &route.case_id,
            ExpectedVersion::Exact(route.version),
            vec![
                NewEvent::new(&completed, &route.case_id, crew_actor(event, &done.crew_id))
                    .caused_by(&event.event_id),
            ],
        )))
    }
}

impl Handler for DispatchEvents {
    async fn handle(&self, event: &EventEnvelope) -> Result<Handled, HandlerError> {
        if event.event_type == OrderReturned::full_name() {
            return self.crew_returned(event);
        }
        if event.event_type == WorkCompleted::full_name() {
            return self.work_completed(event);
        }
        if event.event_type != OrderAcknowledged::full_name() {
            return Ok(Handled::Ignore);
        }
        let ack: OrderAcknowledged = decode_payload(event).map_err(HandlerError::Reject)?;
        let route = self
            .router
            .route(&ack.order_id)
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        // Only the crew the current hop sent, while the route waits for it.
        let Some(route) =
            route.filter(|r| r.status() == RouteStatus::Routed && r.crew_id == ack.crew_id)
        else {
            return Ok(Handled::Ignore);
        };
        let at = ack.recorded_at.or(event.recorded_at).unwrap_or_default();
        let on_time = route
            .acceptance_due_at
            .as_ref()
            .is_none_or(|due| nanos(&at) <= nanos(due));
        let accepted = TicketAccepted {
            case_id: route.case_id.clone(),
            assignee_id: ack.crew_id.clone(),
            line: route.line,
            hop: route.hop,
            accepted_at: Some(at),
            on_time,
        };
        Ok(Handled::Commit(Transaction::append(
            &route.case_id,
            ExpectedVersion::Exact(route.version),
            vec![
                NewEvent::new(&accepted, &route.case_id, crew_actor(event, &ack.crew_id))
                    .caused_by(&event.event_id),
            ],
        )))
    }
}

/// Who acted in dispatch: the crew action's own actor (the authenticated
/// phone), or the crew when the event names none.
fn crew_actor(event: &EventEnvelope, crew_id: &str) -> lineguard_eventlog::Actor {
    event
        .actor
        .clone()
        .unwrap_or_else(|| actor(ActorKind::Crew, crew_id))
}
