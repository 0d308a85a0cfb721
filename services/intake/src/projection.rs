//! Intake's projections, derived from its log only:
//!
//! | key | value |
//! | --- | --- |
//! | `ticket/<ticket id>` | [`TicketView`] |
//! | `open/<customer>/<kind>` | the customer's open ticket of that kind |
//! | `incident/<incident id>` | [`IncidentView`] |
//! | `district-incident/<district>/<kind>` | the district's latest incident of that kind |
//! | `by-time/<reported at, ns, 20 digits>/<ticket id>` | empty: the listing order |
//! | `account/<account number>` | its district: intake's copy of routing's directory |
//! | `customer-ticket/<customer>/<ticket id>` | empty: the customer's tickets, for erasure |
//!
//! Other services' events reach these views through `EventObserved`: intake
//! records its copy of each event it consumes in its own log, so the views
//! are rebuilt from intake's log alone.
//!
//! The customer key is the report's `customer_key`: the account number, or
//! a keyed digest of the phone number when there is no account (see
//! [`crate::customer`]; a phone number never appears in a key).

use lineguard_eventlog::{EventEnvelope, ProjectionView, Projector, decode_payload};
use lineguard_protos::dispatch::v1::{
    ClockAlerted, CrewArrived, CrewDeparted, EtrUpdated, JudgedTime, OrderAcknowledged,
    OrderAssigned, PowerRestored, WorkCompleted,
};
use lineguard_protos::intake::v1::{
    ClockAlert, CustomerDataErased, Deadline, EventObserved, IncidentMarkedProbableOutage,
    IncidentOpened, IncidentView, TicketCancelled, TicketJoinedIncident, TicketReported,
    TicketStatus, TicketUrged, TicketView,
};
use lineguard_protos::routing::v1::{
    AccountsAssigned, ClockBreached, ClockWarned, RouteReason, TicketAccepted, TicketAnswered,
    TicketRouted, TicketRoutingClosed,
};
use prost::{Message, Name};
use sha2::{Digest, Sha256};

/// Builds intake's views from its events.
#[derive(Debug, Default, Clone, Copy)]
pub struct IntakeProjector;

pub fn ticket_key(ticket_id: &str) -> Vec<u8> {
    format!("ticket/{ticket_id}").into_bytes()
}

pub fn open_key(customer: &str, kind: i32) -> Vec<u8> {
    format!("open/{customer}/{kind}").into_bytes()
}

pub fn incident_key(incident_id: &str) -> Vec<u8> {
    format!("incident/{incident_id}").into_bytes()
}

pub fn district_incident_key(district_id: &str, kind: i32) -> Vec<u8> {
    format!("district-incident/{district_id}/{kind}").into_bytes()
}

pub fn account_key(account: &str) -> Vec<u8> {
    format!("account/{account}").into_bytes()
}

/// The prefix of a customer's entries in the customer-ticket index.
pub fn customer_tickets_prefix(customer: &str) -> Vec<u8> {
    format!("customer-ticket/{customer}/").into_bytes()
}

fn customer_ticket_key(customer: &str, ticket_id: &str) -> Vec<u8> {
    format!("customer-ticket/{customer}/{ticket_id}").into_bytes()
}

/// Prefix of the listing index.
pub const BY_TIME_PREFIX: &[u8] = b"by-time/";

pub fn by_time_key(reported_at_nanos: i128, ticket_id: &str) -> Vec<u8> {
    format!("by-time/{:020}/{ticket_id}", reported_at_nanos.max(0)).into_bytes()
}

/// The ticket id at the end of a listing index key.
pub fn ticket_id_of_by_time_key(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key).ok()?.rsplit('/').next()
}

/// The repeat-caller key of a report recorded before reports carried one
/// (`TicketReported.customer_key`): the account, or the unkeyed digest of
/// the phone those reports were kept under. Only for reading old logs.
fn legacy_customer_key(account_number: &str, phone: &str) -> Option<String> {
    if !account_number.is_empty() {
        return Some(format!("acct-{account_number}"));
    }
    if phone.is_empty() {
        return None;
    }
    let digest = Sha256::digest(phone.trim_start_matches('+').as_bytes());
    Some(format!(
        "phone-{}",
        digest[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// Nanoseconds since the epoch.
pub fn nanos(t: &prost_types::Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// Whether a ticket in this status still counts as open for repeat calls.
pub fn is_open(status: TicketStatus) -> bool {
    !matches!(
        status,
        TicketStatus::Completed
            | TicketStatus::Answered
            | TicketStatus::Closed
            | TicketStatus::Cancelled
    )
}

/// Shows an incident's progress on one of its child tickets: the child is
/// not routed on its own, it follows its incident's lead.
pub fn follow_incident(child: &mut TicketView, lead: &TicketView) {
    if child.status() != TicketStatus::Attached {
        return; // cancelled by its own customer, or not yet joined
    }
    if lead.status() != TicketStatus::Received {
        child.status = lead.status;
    }
    child.station_id.clone_from(&lead.station_id);
    child.company_id.clone_from(&lead.company_id);
    child.current_line = lead.current_line;
    child.assignee_id.clone_from(&lead.assignee_id);
    child.crew_id.clone_from(&lead.crew_id);
    child.hops = lead.hops;
    child.deadlines.clone_from(&lead.deadlines);
    child.estimated_restoration = lead.estimated_restoration;
    child.alerts.clone_from(&lead.alerts);
    child.policy_version.clone_from(&lead.policy_version);
    child.closed_reason.clone_from(&lead.closed_reason);
    child.routed_at = lead.routed_at;
    // The child's customer waited from their own call until the incident
    // had an owner (nothing, if it already had one).
    if let (Some(routed), Some(reported)) = (&lead.routed_at, &child.reported_at) {
        child.waiting_seconds =
            u64::try_from((nanos(routed) - nanos(reported)) / 1_000_000_000).unwrap_or(0);
    }
}

fn load_ticket(view: &ProjectionView<'_>, ticket_id: &str) -> Result<TicketView, String> {
    view.get_message(&ticket_key(ticket_id))?
        .ok_or_else(|| format!("unknown ticket {ticket_id}"))
}

fn store(view: &mut ProjectionView<'_>, key: Vec<u8>, message: &impl Message) {
    view.put(key, message.encode_to_vec());
}

/// Prefix of the counts of tickets by status and line.
pub const STATUS_COUNT_PREFIX: &[u8] = b"count-status/";

/// The key of the count of tickets in `status` at `line`.
fn status_count_key(status: i32, line: u32) -> Vec<u8> {
    format!("count-status/{status:02}/{line}").into_bytes()
}

/// `(status, line)` of a count's key.
pub fn status_count_of_key(key: &[u8]) -> Option<(TicketStatus, u32)> {
    let rest = std::str::from_utf8(key.strip_prefix(STATUS_COUNT_PREFIX)?).ok()?;
    let (status, line) = rest.split_once('/')?;
    Some((
        TicketStatus::try_from(status.parse::<i32>().ok()?).ok()?,
        line.parse().ok()?,
    ))
}

/// A ticket counted by status and line: every ticket but an incident's
/// attached child (which follows its lead and is the lead's case).
fn counted(ticket: &TicketView) -> Option<(i32, u32)> {
    match ticket.status() {
        TicketStatus::Attached | TicketStatus::Unspecified => None,
        _ => Some((ticket.status, ticket.current_line)),
    }
}

/// Stores a ticket's view and moves it between the counts by status and
/// line (so the counts are always those of the stored views: rebuilt
/// with them, never kept anywhere else).
fn store_ticket(view: &mut ProjectionView<'_>, ticket: &TicketView) -> Result<(), String> {
    let key = ticket_key(&ticket.ticket_id);
    let before = view
        .get_message::<TicketView>(&key)?
        .as_ref()
        .and_then(counted);
    let after = counted(ticket);
    if before != after {
        for (place, step) in [(before, -1i64), (after, 1)] {
            let Some((status, line)) = place else {
                continue;
            };
            let count_key = status_count_key(status, line);
            let count = view
                .get(&count_key)
                .map_err(|e| e.to_string())?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_le_bytes);
            let count = count.checked_add_signed(step).ok_or_else(|| {
                format!("count of status {status} line {line} would go below zero")
            })?;
            view.put(count_key, count.to_le_bytes().to_vec());
        }
    }
    store(view, key, ticket);
    Ok(())
}

impl Projector for IntakeProjector {
    fn name(&self) -> &'static str {
        "intake"
    }

    fn version(&self) -> u32 {
        // 3: crew actions stop clocks at their judged time.
        // 4: the view keeps its report's repeat-caller key.
        // 5: the view keeps the sealed contact; erasure; customer index.
        // 6: a route of an older hop never moves the view back.
        // 7: counts of tickets by status and line.
        7
    }

    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
        let at = event.recorded_at.unwrap_or_default();
        match event.event_type.as_str() {
            t if t == TicketReported::full_name() => {
                let e: TicketReported = decode_payload(event)?;
                let reported_at = e.reported_at.unwrap_or(at);
                let mut ticket = TicketView {
                    ticket_id: e.ticket_id.clone(),
                    status: TicketStatus::Received as i32,
                    channel: e.channel,
                    kind: e.kind,
                    service_request_type: e.service_request_type,
                    urgency: e.urgency,
                    account_number: e.account_number.clone(),
                    district_id: e.district_id.clone(),
                    address: e.address.clone(),
                    caller: e.caller.clone(),
                    description: e.description.clone(),
                    reported_at: Some(reported_at),
                    updated_at: Some(at),
                    sealed_contact: e.contact.clone(),
                    ..TicketView::default()
                };
                if let Some(sealed) = &e.contact {
                    view.put(
                        customer_ticket_key(&sealed.customer_key, &e.ticket_id),
                        Vec::new(),
                    );
                }
                let customer = if e.customer_key.is_empty() {
                    let phone = e.caller.as_ref().map_or("", |c| c.phone.as_str());
                    legacy_customer_key(&e.account_number, phone)
                } else {
                    Some(e.customer_key.clone())
                };
                if let Some(customer) = &customer {
                    view.put(open_key(customer, e.kind), e.ticket_id.as_bytes().to_vec());
                }
                ticket.customer_key = customer.unwrap_or_default();
                view.put(by_time_key(nanos(&reported_at), &e.ticket_id), Vec::new());
                store_ticket(view, &ticket)?;
            }
            t if t == CustomerDataErased::full_name() => {
                let e: CustomerDataErased = decode_payload(event)?;
                let mut ticket = load_ticket(view, &e.ticket_id)?;
                ticket.customer_data_erased = true;
                ticket.sealed_contact = None;
                ticket.address.clear();
                ticket.caller = None;
                ticket.description.clear();
                ticket.updated_at = Some(at);
                store_ticket(view, &ticket)?;
            }
            t if t == TicketUrged::full_name() => {
                let e: TicketUrged = decode_payload(event)?;
                let mut ticket = load_ticket(view, &e.ticket_id)?;
                ticket.urge_count = e.urge_count;
                ticket.updated_at = Some(at);
                store_ticket(view, &ticket)?;
            }
            t if t == IncidentOpened::full_name() => {
                let e: IncidentOpened = decode_payload(event)?;
                let opened_at = e.opened_at.unwrap_or(at);
                let incident = IncidentView {
                    incident_id: e.incident_id.clone(),
                    district_id: e.district_id.clone(),
                    kind: e.kind,
                    lead_ticket_id: e.lead_ticket_id.clone(),
                    ticket_count: 1,
                    opened_at: Some(opened_at),
                    last_call_at: Some(opened_at),
                    window_seconds: e.window_seconds,
                    probable_outage: false,
                };
                let mut lead = load_ticket(view, &e.lead_ticket_id)?;
                lead.incident_id = e.incident_id.clone();
                lead.incident_lead = true;
                lead.updated_at = Some(at);
                store_ticket(view, &lead)?;
                view.put(
                    district_incident_key(&e.district_id, e.kind),
                    e.incident_id.as_bytes().to_vec(),
                );
                store(view, incident_key(&e.incident_id), &incident);
            }
            t if t == TicketJoinedIncident::full_name() => {
                let e: TicketJoinedIncident = decode_payload(event)?;
                let mut incident: IncidentView =
                    view.get_message(&incident_key(&e.incident_id))?
                        .ok_or_else(|| format!("unknown incident {}", e.incident_id))?;
                incident.ticket_count = e.ticket_count;
                incident.last_call_at = Some(at);
                store(view, incident_key(&e.incident_id), &incident);
                let mut ticket = load_ticket(view, &e.ticket_id)?;
                ticket.incident_id = e.incident_id.clone();
                ticket.incident_lead = false;
                ticket.status = TicketStatus::Attached as i32;
                ticket.updated_at = Some(at);
                store_ticket(view, &ticket)?;
            }
            t if t == IncidentMarkedProbableOutage::full_name() => {
                let e: IncidentMarkedProbableOutage = decode_payload(event)?;
                let mut incident: IncidentView =
                    view.get_message(&incident_key(&e.incident_id))?
                        .ok_or_else(|| format!("unknown incident {}", e.incident_id))?;
                incident.probable_outage = true;
                store(view, incident_key(&e.incident_id), &incident);
            }
            t if t == TicketCancelled::full_name() => {
                let e: TicketCancelled = decode_payload(event)?;
                let mut ticket = load_ticket(view, &e.ticket_id)?;
                ticket.status = TicketStatus::Cancelled as i32;
                ticket.updated_at = Some(at);
                let customer = if ticket.customer_key.is_empty() {
                    let phone = ticket.caller.as_ref().map_or("", |c| c.phone.as_str());
                    legacy_customer_key(&ticket.account_number, phone)
                } else {
                    Some(ticket.customer_key.clone())
                };
                if let Some(customer) = customer {
                    let key = open_key(&customer, ticket.kind);
                    // Only if it still points at this ticket.
                    if view.get(&key).map_err(|e| e.to_string())?.as_deref()
                        == Some(e.ticket_id.as_bytes())
                    {
                        view.delete(key);
                    }
                }
                store_ticket(view, &ticket)?;
            }
            t if t == EventObserved::full_name() => {
                let e: EventObserved = decode_payload(event)?;
                let observed = e
                    .event
                    .ok_or_else(|| "EventObserved without its event".to_string())?;
                observe(&observed, view)?;
            }
            other => return Err(format!("intake does not project {other}")),
        }
        Ok(())
    }
}

/// The ticket a routing case is about: the ticket itself, or an incident's lead.
fn lead_of(view: &ProjectionView<'_>, case: &str) -> Result<Option<String>, String> {
    if case.starts_with("incident-") {
        Ok(view
            .get_message::<IncidentView>(&incident_key(case))?
            .map(|i| i.lead_ticket_id))
    } else {
        Ok(Some(case.to_string()))
    }
}

/// What an observed event does to its ticket's view.
type ViewChange = Box<dyn FnOnce(&mut TicketView)>;

/// Applies another service's event to intake's views.
fn observe(event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
    let t = event.event_type.as_str();
    if t == AccountsAssigned::full_name() {
        let e: AccountsAssigned = decode_payload(event)?;
        for a in e.accounts {
            view.put(account_key(&a.account_number), a.district_id.into_bytes());
        }
        return Ok(());
    }
    let (case, change): (String, ViewChange) = if t == TicketRouted::full_name() {
        let e: TicketRouted = decode_payload(event)?;
        // Routing's and dispatch's events reach intake by two consumers, so
        // a reopen's new order can be seen before the reopen itself: then
        // the new round of work is already shown and the reopen is old news.
        let new_round_shown = order_hop(view, &e.case_id)? >= e.hop;
        (
            e.case_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                // An older hop seen late (parked or handed back, then
                // applied after newer events) is history: a case's hops
                // only grow, so the view never moves back to one.
                if e.hop < ticket.hops {
                    return;
                }
                // A reopen sends a resolved ticket back to work; any other
                // route only moves a ticket not yet being worked on.
                let reopened = e.reason() == RouteReason::Reopened && !new_round_shown;
                if reopened
                    || matches!(
                        ticket.status(),
                        TicketStatus::Received | TicketStatus::Routed | TicketStatus::Accepted
                    )
                {
                    ticket.status = TicketStatus::Routed as i32;
                }
                if ticket.routed_at.is_none() {
                    ticket.routed_at = e.routed_at;
                    ticket.waiting_seconds = e.waiting_seconds;
                }
                ticket.district_id = e.district_id;
                ticket.station_id = e.station_id;
                ticket.company_id = e.company_id;
                ticket.current_line = e.line;
                ticket.assignee_id = e.assignee_id;
                ticket.crew_id = e.crew_id;
                ticket.hops = e.hop;
                ticket.policy_version = e.policy_version;
                ticket.deadlines = e
                    .deadlines
                    .into_iter()
                    .map(|d| Deadline {
                        clock: d.clock,
                        due_at: d.due_at,
                        stopped_at: None,
                    })
                    .collect();
            }),
        )
    } else if t == TicketAccepted::full_name() {
        let e: TicketAccepted = decode_payload(event)?;
        (
            e.case_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                if ticket.status() == TicketStatus::Routed {
                    ticket.status = TicketStatus::Accepted as i32;
                }
                stop_clock(ticket, "acceptance", e.accepted_at);
            }),
        )
    } else if t == TicketAnswered::full_name() {
        let e: TicketAnswered = decode_payload(event)?;
        (
            e.case_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                if is_open(ticket.status()) {
                    ticket.status = TicketStatus::Answered as i32;
                }
                stop_clock(ticket, "acceptance", e.answered_at);
                stop_clock(ticket, "contact", e.answered_at);
                stop_clock(ticket, "answer", e.answered_at);
            }),
        )
    } else if t == TicketRoutingClosed::full_name() {
        let e: TicketRoutingClosed = decode_payload(event)?;
        (
            e.case_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                if is_open(ticket.status()) {
                    ticket.status = TicketStatus::Closed as i32;
                    ticket.closed_reason = e.reason;
                }
            }),
        )
    } else if t == ClockWarned::full_name() {
        let e: ClockWarned = decode_payload(event)?;
        (
            e.case_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                ticket.alerts.push(ClockAlert {
                    clock: e.clock,
                    breached: false,
                    percent: e.percent,
                    at: e.warned_at,
                });
            }),
        )
    } else if t == ClockBreached::full_name() {
        let e: ClockBreached = decode_payload(event)?;
        (
            e.case_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                ticket.alerts.push(ClockAlert {
                    clock: e.clock,
                    breached: true,
                    percent: 100,
                    at: e.breached_at,
                });
            }),
        )
    } else if t == OrderAssigned::full_name() {
        let e: OrderAssigned = decode_payload(event)?;
        // A later hop's order for a resolved ticket is a new round of work
        // (a reopen), whether or not routing's reopen has been seen yet.
        let previous = order_hop(view, &e.order_id)?;
        if e.hop > previous {
            view.put(order_hop_key(&e.order_id), e.hop.to_be_bytes().to_vec());
        }
        let new_round = previous > 0 && e.hop > previous;
        (
            e.order_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                if new_round
                    && matches!(
                        ticket.status(),
                        TicketStatus::Completed | TicketStatus::Answered
                    )
                {
                    ticket.status = TicketStatus::Routed as i32;
                }
                ticket.crew_id = e.crew_id;
            }),
        )
    } else if t == OrderAcknowledged::full_name() || t == CrewDeparted::full_name() {
        let order = if t == OrderAcknowledged::full_name() {
            decode_payload::<OrderAcknowledged>(event)?.order_id
        } else {
            decode_payload::<CrewDeparted>(event)?.order_id
        };
        (
            order,
            Box::new(|ticket: &mut TicketView| {
                if matches!(
                    ticket.status(),
                    TicketStatus::Received | TicketStatus::Routed | TicketStatus::Accepted
                ) {
                    ticket.status = TicketStatus::Dispatched as i32;
                }
            }),
        )
    } else if t == CrewArrived::full_name() {
        let e: CrewArrived = decode_payload(event)?;
        (
            e.order_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                if is_open(ticket.status()) {
                    ticket.status = TicketStatus::OnSite as i32;
                }
                stop_clock(ticket, "arrival", e.judged_time());
            }),
        )
    } else if t == EtrUpdated::full_name() {
        let e: EtrUpdated = decode_payload(event)?;
        (
            e.order_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                ticket.estimated_restoration = e.estimated_restoration;
            }),
        )
    } else if t == PowerRestored::full_name() {
        let e: PowerRestored = decode_payload(event)?;
        (
            e.order_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                if is_open(ticket.status()) {
                    ticket.status = TicketStatus::Restored as i32;
                }
                stop_clock(ticket, "restoration", e.judged_time());
            }),
        )
    } else if t == WorkCompleted::full_name() {
        let e: WorkCompleted = decode_payload(event)?;
        (
            e.order_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                if is_open(ticket.status()) || ticket.status() == TicketStatus::Restored {
                    ticket.status = TicketStatus::Completed as i32;
                }
                stop_clock(ticket, "restoration", e.judged_time());
            }),
        )
    } else if t == ClockAlerted::full_name() {
        let e: ClockAlerted = decode_payload(event)?;
        (
            e.order_id.clone(),
            Box::new(move |ticket: &mut TicketView| {
                ticket.alerts.push(ClockAlert {
                    clock: e.clock,
                    breached: e.breached,
                    percent: e.percent,
                    at: e.at,
                });
            }),
        )
    } else {
        // Consumed for completeness, shown nowhere yet.
        return Ok(());
    };
    let Some(ticket_id) = lead_of(view, &case)? else {
        return Ok(());
    };
    let Some(mut ticket) = view.get_message::<TicketView>(&ticket_key(&ticket_id))? else {
        // Routing knows a ticket intake does not: nothing to show it on.
        return Ok(());
    };
    change(&mut ticket);
    ticket.updated_at = event.recorded_at;
    store_ticket(view, &ticket)?;
    Ok(())
}

/// The hop of the latest work order dispatch gave for a case (0: none yet).
fn order_hop_key(case: &str) -> Vec<u8> {
    format!("order-hop/{case}").into_bytes()
}

fn order_hop(view: &ProjectionView<'_>, case: &str) -> Result<u32, String> {
    Ok(view
        .get(&order_hop_key(case))
        .map_err(|e| e.to_string())?
        .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
        .map_or(0, u32::from_be_bytes))
}

fn stop_clock(ticket: &mut TicketView, clock: &str, at: Option<prost_types::Timestamp>) {
    for d in ticket.deadlines.iter_mut().filter(|d| d.clock == clock) {
        d.stopped_at = d.stopped_at.or(at);
    }
}
