//! Dispatch's projections, derived from its log only:
//!
//! | key | value |
//! | --- | --- |
//! | `order/<order id>` | [`WorkOrderView`] |
//! | `ticket/<ticket id>` | [`TicketNoted`]: channel, account, incident |
//! | `incident-ticket/<incident id>/<ticket id>` | empty: an incident's tickets |
//! | `crew/<crew id>` | [`CrewNoted`]: the crews routing's directory knows |
//! | `closed/<case id>` | the last hop routing closed the case at (`CaseClosedNoted`), 4 bytes BE |
//! | `timer/…`, `timers-of/<order id>` | [`DispatchTimer`]s, see [`lineguard_eventlog::timers`] |
//!
//! A crew's sequence is not a projection: it is the version of the crew's
//! stream in the log (`crew-<id>`), so it is as durable and gap-free as the
//! log itself.

use bytes::Bytes;
use lineguard_eventlog::timers::OwnerTimers;
use lineguard_eventlog::{EventEnvelope, ProjectionView, Projector, StoredEvent, decode_payload};
use lineguard_protos::dispatch::v1::CrewEvent;
use lineguard_protos::dispatch::v1::DispatchTimer;
use lineguard_protos::dispatch::v1::{
    CaseClosedNoted, ClockAlerted, CrewArrived, CrewDeparted, CrewNoted,
    CustomerNotificationRequested, CustomerUrged, EtrUpdated, IncidentGrew, JudgedTime, NoteAdded,
    OrderAcknowledged, OrderAssigned, OrderReturned, OrderStatus, OrderWithdrawn, PowerRestored,
    TicketNoted, TicketUrgeNoted, WorkCompleted, WorkOrderView,
};
use prost::{Message, Name};
use prost_types::Timestamp;

/// Builds dispatch's views from its events.
#[derive(Debug, Default, Clone, Copy)]
pub struct DispatchProjector;

pub fn order_key(order: &str) -> Vec<u8> {
    format!("order/{order}").into_bytes()
}
pub fn ticket_key(ticket: &str) -> Vec<u8> {
    format!("ticket/{ticket}").into_bytes()
}
pub fn crew_key(crew: &str) -> Vec<u8> {
    format!("crew/{crew}").into_bytes()
}
pub fn closed_key(case: &str) -> Vec<u8> {
    format!("closed/{case}").into_bytes()
}
pub fn incident_tickets_prefix(incident: &str) -> Vec<u8> {
    format!("incident-ticket/{incident}/").into_bytes()
}

pub use lineguard_eventlog::timers::nanos;

/// What a dispatch timer stores.
fn timer_value(order: &str, clock: &str, due: Timestamp) -> impl Fn(u32, &Timestamp) -> Vec<u8> {
    let (order, clock) = (order.to_string(), clock.to_string());
    move |percent, fire_at| {
        DispatchTimer {
            order_id: order.clone(),
            clock: clock.clone(),
            percent,
            fire_at: Some(*fire_at),
            due_at: Some(due),
        }
        .encode_to_vec()
    }
}

/// Drops an order's pending timers that `which(clock, percent)` selects.
fn drop_timers(
    view: &mut ProjectionView<'_>,
    order: &str,
    which: impl Fn(&str, u32) -> bool,
) -> Result<(), String> {
    let mut timers = OwnerTimers::of(view, order).map_err(|e| e.to_string())?;
    timers.drop_where(which);
    timers.save();
    Ok(())
}

/// Sets a clock's warnings (between `start` and `due`) and its breach.
fn set_timers(
    view: &mut ProjectionView<'_>,
    order: &str,
    clock: &str,
    start: &Timestamp,
    due: &Timestamp,
    points: &[u32],
) -> Result<(), String> {
    let mut timers = OwnerTimers::of(view, order).map_err(|e| e.to_string())?;
    timers.set(clock, start, due, points, timer_value(order, clock, *due));
    timers.save();
    Ok(())
}

/// Prefix of the log streams holding crews' events.
pub const CREW_STREAM_PREFIX: &str = "crew-";

/// The log stream holding a crew's events (`crew-<crew id>`, so
/// `crew-crew-a` for crew `crew-a`); its versions are the crew's sequence
/// numbers.
pub fn crew_stream(crew_id: &str) -> String {
    format!("{CREW_STREAM_PREFIX}{crew_id}")
}

/// The subject a crew's event is also published on, for gateways that
/// speak NATS: `lineguard.crew.<crew id>.<EventType>` (JetStream stream
/// `LINEGUARD_CREW`), and its payload there: the typed [`CrewEvent`] a
/// phone gets from `WatchDispatches`, with the crew's sequence number.
pub fn crew_message(event: &StoredEvent) -> Result<Option<(String, Bytes)>, String> {
    let Some(crew) = event.stream_id().strip_prefix(CREW_STREAM_PREFIX) else {
        return Ok(None);
    };
    let short = event.event_type().rsplit('.').next().unwrap_or_default();
    let envelope = event.to_envelope().map_err(|e| e.to_string())?;
    let typed = CrewEvent::typed(crew, event.stream_version(), envelope)
        .map_err(|e| format!("undecodable crew event: {e}"))?;
    Ok(Some((
        format!("lineguard.crew.{crew}.{short}"),
        Bytes::from(typed.encode_to_vec()),
    )))
}

/// Applies `change` to an order's view (which must exist).
fn update(
    view: &mut ProjectionView<'_>,
    order: &str,
    event: &EventEnvelope,
    change: impl FnOnce(&mut WorkOrderView),
) -> Result<(), String> {
    let mut o: WorkOrderView = view
        .get_message(&order_key(order))?
        .ok_or_else(|| format!("unknown order {order}"))?;
    change(&mut o);
    o.version = o.version.max(event.global_position);
    view.put(order_key(order), o.encode_to_vec());
    Ok(())
}

impl Projector for DispatchProjector {
    fn name(&self) -> &'static str {
        "dispatch"
    }

    fn version(&self) -> u32 {
        // 2: timers moved to the event log's shared timer table.
        // 3: closed cases remembered by hop.
        // 4: crew actions count at their judged time (device clocks bounded).
        // 5: urges noted per ticket, carried into orders made later.
        5
    }

    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
        let t = event.event_type.as_str();
        if t == CaseClosedNoted::full_name() {
            let e: CaseClosedNoted = decode_payload(event)?;
            view.put(closed_key(&e.case_id), e.hop.to_be_bytes().to_vec());
        } else if t == CrewNoted::full_name() {
            let e: CrewNoted = decode_payload(event)?;
            view.put(crew_key(&e.crew_id), e.encode_to_vec());
        } else if t == TicketNoted::full_name() {
            let e: TicketNoted = decode_payload(event)?;
            let ticket = e.ticket.clone().unwrap_or_default();
            if !e.incident_id.is_empty() {
                let mut key = incident_tickets_prefix(&e.incident_id);
                key.extend_from_slice(ticket.ticket_id.as_bytes());
                view.put(key, Vec::new());
            }
            view.put(ticket_key(&ticket.ticket_id), e.encode_to_vec());
        } else if t == TicketUrgeNoted::full_name() {
            let e: TicketUrgeNoted = decode_payload(event)?;
            if let Some(mut noted) = view.get_message::<TicketNoted>(&ticket_key(&e.ticket_id))?
                && let Some(ticket) = noted.ticket.as_mut()
            {
                // Intake's count is absolute: a late duplicate never lowers it.
                ticket.urge_count = ticket.urge_count.max(e.urge_count);
                view.put(ticket_key(&e.ticket_id), noted.encode_to_vec());
            }
        } else if t == OrderAssigned::full_name() {
            let e: OrderAssigned = decode_payload(event)?;
            let previous: Option<WorkOrderView> = view.get_message(&order_key(&e.order_id))?;
            let o = WorkOrderView {
                order_id: e.order_id.clone(),
                incident_id: e.incident_id,
                crew_id: e.crew_id,
                status: OrderStatus::Assigned as i32,
                kind: e.kind,
                district_id: e.district_id,
                station_id: e.station_id,
                line: e.line,
                hop: e.hop,
                tickets: e.tickets.clone(),
                reported_at: e.reported_at,
                assigned_at: e.assigned_at,
                arrival_due_at: e.arrival_due_at,
                restoration_limit_seconds: e.restoration_limit_seconds,
                restoration_limit_working_days: e.restoration_limit_working_days,
                policy_version: e.policy_version,
                warn_at_percent: e.warn_at_percent,
                // The urges made before the order, by then noted per ticket.
                urge_count: e
                    .tickets
                    .iter()
                    .map(|t| t.urge_count)
                    .sum::<u32>()
                    .max(previous.as_ref().map_or(0, |p| p.urge_count)),
                version: event.global_position,
                ..WorkOrderView::default()
            };
            drop_timers(view, &e.order_id, |_, _| true)?;
            if let (Some(start), Some(due)) = (&o.reported_at, &o.arrival_due_at) {
                set_timers(view, &e.order_id, "arrival", start, due, &o.warn_at_percent)?;
            }
            view.put(order_key(&e.order_id), o.encode_to_vec());
        } else if t == OrderWithdrawn::full_name() {
            let e: OrderWithdrawn = decode_payload(event)?;
            update(view, &e.order_id, event, |o| {
                // A reassignment in the same commit overwrites this.
                if o.crew_id == e.crew_id {
                    o.status = OrderStatus::Withdrawn as i32;
                }
            })?;
            drop_timers(view, &e.order_id, |_, _| true)?;
        } else if t == IncidentGrew::full_name() {
            let e: IncidentGrew = decode_payload(event)?;
            update(view, &e.order_id, event, |o| {
                if let Some(ticket) = e.ticket
                    && !o.tickets.iter().any(|t| t.ticket_id == ticket.ticket_id)
                {
                    o.urge_count += ticket.urge_count;
                    o.tickets.push(ticket);
                }
            })?;
        } else if t == CustomerUrged::full_name() {
            let e: CustomerUrged = decode_payload(event)?;
            update(view, &e.order_id, event, |o| {
                o.urge_count += 1;
                if let Some(ticket) = o.tickets.iter_mut().find(|t| t.ticket_id == e.ticket_id) {
                    ticket.urge_count = ticket.urge_count.max(e.urge_count);
                }
            })?;
        } else if t == ClockAlerted::full_name() {
            let e: ClockAlerted = decode_payload(event)?;
            update(view, &e.order_id, event, |_| {})?;
            let fired = if e.breached { 0 } else { e.percent };
            drop_timers(view, &e.order_id, |clock, percent| {
                clock == e.clock && percent == fired
            })?;
        } else if t == OrderAcknowledged::full_name() {
            let e: OrderAcknowledged = decode_payload(event)?;
            update(view, &e.order_id, event, |o| {
                o.status = OrderStatus::Acknowledged as i32;
                o.acknowledged_at = e.judged_time();
                o.last_device_time = e.device_time;
                o.last_judged_at = e.judged_time();
            })?;
        } else if t == CrewDeparted::full_name() {
            let e: CrewDeparted = decode_payload(event)?;
            update(view, &e.order_id, event, |o| {
                o.status = OrderStatus::EnRoute as i32;
                o.departed_at = e.judged_time();
                o.last_device_time = e.device_time;
                o.last_judged_at = e.judged_time();
            })?;
        } else if t == CrewArrived::full_name() {
            let e: CrewArrived = decode_payload(event)?;
            update(view, &e.order_id, event, |o| {
                o.status = OrderStatus::OnSite as i32;
                o.arrived_at = e.judged_time();
                o.last_device_time = e.device_time;
                o.last_judged_at = e.judged_time();
                if e.restoration_due_at.is_some() {
                    o.restoration_due_at = e.restoration_due_at;
                } else if let Some(arrived) = e.judged_time()
                    && o.restoration_limit_seconds > 0
                {
                    o.restoration_due_at = Some(prost_types::Timestamp {
                        seconds: arrived.seconds + o.restoration_limit_seconds as i64,
                        nanos: arrived.nanos,
                    });
                }
            })?;
            drop_timers(view, &e.order_id, |clock, _| clock == "arrival")?;
            let o: WorkOrderView = view
                .get_message(&order_key(&e.order_id))?
                .unwrap_or_default();
            if let (Some(start), Some(due)) = (&o.arrived_at, &o.restoration_due_at) {
                set_timers(
                    view,
                    &e.order_id,
                    "restoration",
                    start,
                    due,
                    &o.warn_at_percent,
                )?;
            }
        } else if t == EtrUpdated::full_name() {
            let e: EtrUpdated = decode_payload(event)?;
            update(view, &e.order_id, event, |o| {
                o.estimated_restoration = e.estimated_restoration;
                o.last_device_time = e.device_time;
                o.last_judged_at = e.judged_time();
            })?;
        } else if t == PowerRestored::full_name() {
            let e: PowerRestored = decode_payload(event)?;
            drop_timers(view, &e.order_id, |_, _| true)?;
            update(view, &e.order_id, event, |o| {
                o.status = OrderStatus::Restored as i32;
                o.restored_at = e.judged_time();
                o.last_device_time = e.device_time;
                o.last_judged_at = e.judged_time();
            })?;
        } else if t == WorkCompleted::full_name() {
            let e: WorkCompleted = decode_payload(event)?;
            drop_timers(view, &e.order_id, |_, _| true)?;
            update(view, &e.order_id, event, |o| {
                o.status = OrderStatus::Completed as i32;
                o.completed_at = e.judged_time();
                o.last_device_time = e.device_time;
                o.last_judged_at = e.judged_time();
            })?;
        } else if t == OrderReturned::full_name() {
            let e: OrderReturned = decode_payload(event)?;
            drop_timers(view, &e.order_id, |_, _| true)?;
            update(view, &e.order_id, event, |o| {
                o.status = OrderStatus::Returned as i32;
                o.last_device_time = e.device_time;
                o.last_judged_at = e.judged_time();
            })?;
        } else if t == NoteAdded::full_name() {
            let e: NoteAdded = decode_payload(event)?;
            update(view, &e.order_id, event, |o| {
                o.last_device_time = e.device_time;
                o.last_judged_at = e.judged_time();
            })?;
        } else if t == CustomerNotificationRequested::full_name() {
            // A fact for the gateways; no view of dispatch's changes.
        } else {
            return Err(format!("dispatch does not project {t}"));
        }
        Ok(())
    }
}
