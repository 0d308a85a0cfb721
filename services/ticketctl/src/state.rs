//! A ticket's state folded from its replayed events, as of any instant.
//!
//! The fold follows the rules intake's customer-facing view follows, but
//! from the source logs (routing's, dispatch's own events) rather than
//! intake's copies of them: `verify` compares the two, so a view that missed
//! or misread an event shows up as a mismatch.

use std::collections::HashMap;

use lineguard_protos::dispatch::v1::{
    ClockAlerted, CrewArrived, CrewDeparted, OrderAcknowledged, OrderAssigned, PowerRestored,
    WorkCompleted,
};
use lineguard_protos::eventlog::v1::EventEnvelope;
use lineguard_protos::intake::v1::{
    IncidentOpened, TicketCancelled, TicketJoinedIncident, TicketReported, TicketStatus,
    TicketUrged, TicketView,
};
use lineguard_protos::routing::v1::{
    ClockBreached, ClockWarned, RouteReason, TicketAccepted, TicketAnswered, TicketRouted,
    TicketRoutingClosed,
};
use serde::Serialize;

use crate::replay::{decode, recorded_nanos};

/// What a ticket looked like at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TicketState {
    pub ticket_id: String,
    /// `ROUTED`, `DISPATCHED`, … (the `TicketStatus` name without its prefix).
    pub status: String,
    pub incident_id: String,
    /// Line of defense holding it: 1 manager, 2 station, 3 company (0: nobody yet).
    pub line: u32,
    /// The person or desk holding it.
    pub holder: String,
    pub crew: String,
    pub hops: u32,
    pub urges: u32,
    pub warnings: u32,
    pub breaches: u32,
    pub closed_reason: String,
}

fn status_name(s: TicketStatus) -> String {
    s.as_str_name()
        .trim_start_matches("TICKET_STATUS_")
        .to_string()
}

impl TicketState {
    /// The same fields of intake's live view.
    pub fn of_view(v: &TicketView) -> TicketState {
        TicketState {
            ticket_id: v.ticket_id.clone(),
            status: status_name(v.status()),
            incident_id: v.incident_id.clone(),
            line: v.current_line,
            holder: v.assignee_id.clone(),
            crew: v.crew_id.clone(),
            hops: v.hops,
            urges: v.urge_count,
            warnings: v.alerts.iter().filter(|a| !a.breached).count() as u32,
            breaches: v.alerts.iter().filter(|a| a.breached).count() as u32,
            closed_reason: v.closed_reason.clone(),
        }
    }

    /// Field-by-field differences from `other`: `(field, this, other)`.
    pub fn differences(&self, other: &TicketState) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        let mut cmp = |field, a: String, b: String| {
            if a != b {
                out.push((field, a, b));
            }
        };
        cmp("status", self.status.clone(), other.status.clone());
        cmp(
            "incident_id",
            self.incident_id.clone(),
            other.incident_id.clone(),
        );
        cmp("line", self.line.to_string(), other.line.to_string());
        cmp("holder", self.holder.clone(), other.holder.clone());
        cmp("crew", self.crew.clone(), other.crew.clone());
        cmp("hops", self.hops.to_string(), other.hops.to_string());
        cmp("urges", self.urges.to_string(), other.urges.to_string());
        cmp(
            "warnings",
            self.warnings.to_string(),
            other.warnings.to_string(),
        );
        cmp(
            "breaches",
            self.breaches.to_string(),
            other.breaches.to_string(),
        );
        cmp(
            "closed_reason",
            self.closed_reason.clone(),
            other.closed_reason.clone(),
        );
        out
    }
}

#[derive(Debug, Clone)]
struct Working {
    state: TicketState,
    status: TicketStatus,
}

fn is_open(s: TicketStatus) -> bool {
    !matches!(
        s,
        TicketStatus::Completed
            | TicketStatus::Answered
            | TicketStatus::Closed
            | TicketStatus::Cancelled
    )
}

/// `ticket_id`'s state after the events recorded at or before `as_of`
/// (nanoseconds since the epoch; `None`: all of them), or `None` if it was
/// not reported by then. `events` are a replay's, in its order.
pub fn ticket_state(
    ticket_id: &str,
    events: &[EventEnvelope],
    as_of: Option<i128>,
) -> Option<TicketState> {
    let mut tickets: HashMap<String, Working> = HashMap::new();
    let mut incident_leads: HashMap<String, String> = HashMap::new();
    let mut order_hops: HashMap<String, u32> = HashMap::new();
    for e in events
        .iter()
        .filter(|e| as_of.is_none_or(|t| recorded_nanos(e) <= t))
    {
        apply(e, &mut tickets, &mut incident_leads, &mut order_hops);
    }
    let me = tickets.get(ticket_id)?.clone();
    let mut state = me.state.clone();
    state.status = status_name(me.status);
    // A child follows its incident's lead, as intake shows it.
    if me.status == TicketStatus::Attached
        && let Some(lead) = incident_leads
            .get(&me.state.incident_id)
            .and_then(|l| tickets.get(l))
    {
        if lead.status != TicketStatus::Received {
            state.status = status_name(lead.status);
        }
        state.line = lead.state.line;
        state.holder.clone_from(&lead.state.holder);
        state.crew.clone_from(&lead.state.crew);
        state.hops = lead.state.hops;
        state.warnings = lead.state.warnings;
        state.breaches = lead.state.breaches;
        state.closed_reason.clone_from(&lead.state.closed_reason);
    }
    Some(state)
}

fn apply(
    e: &EventEnvelope,
    tickets: &mut HashMap<String, Working>,
    leads: &mut HashMap<String, String>,
    order_hops: &mut HashMap<String, u32>,
) {
    // Intake's own facts about tickets and incidents.
    if let Some(r) = decode::<TicketReported>(e) {
        tickets.insert(
            r.ticket_id.clone(),
            Working {
                state: TicketState {
                    ticket_id: r.ticket_id,
                    ..TicketState::default()
                },
                status: TicketStatus::Received,
            },
        );
        return;
    }
    if let Some(u) = decode::<TicketUrged>(e) {
        if let Some(t) = tickets.get_mut(&u.ticket_id) {
            t.state.urges = u.urge_count;
        }
        return;
    }
    if let Some(o) = decode::<IncidentOpened>(e) {
        leads.insert(o.incident_id.clone(), o.lead_ticket_id.clone());
        if let Some(t) = tickets.get_mut(&o.lead_ticket_id) {
            t.state.incident_id = o.incident_id;
        }
        return;
    }
    if let Some(j) = decode::<TicketJoinedIncident>(e) {
        if let Some(t) = tickets.get_mut(&j.ticket_id) {
            t.state.incident_id = j.incident_id;
            t.status = TicketStatus::Attached;
        }
        return;
    }
    if let Some(c) = decode::<TicketCancelled>(e) {
        if let Some(t) = tickets.get_mut(&c.ticket_id) {
            t.status = TicketStatus::Cancelled;
        }
        return;
    }
    // Routing's and dispatch's facts about a case: shown on the case's
    // ticket (an incident's: its lead).
    let case = e.correlation_id.as_str();
    let target = if case.starts_with("incident-") {
        leads.get(case).cloned()
    } else {
        Some(case.to_string())
    };
    let Some(t) = target.and_then(|id| tickets.get_mut(&id)) else {
        return;
    };
    let s = &mut t.state;
    let order_hop = order_hops.get(case).copied().unwrap_or(0);
    if let Some(r) = decode::<TicketRouted>(e) {
        // An older hop never moves the ticket back (as intake shows it).
        if r.hop < s.hops {
            return;
        }
        // Intake may see a reopen's new order before the reopen: then the
        // reopen does not set the ticket back.
        let reopened = r.reason() == RouteReason::Reopened && order_hop < r.hop;
        if reopened
            || matches!(
                t.status,
                TicketStatus::Received | TicketStatus::Routed | TicketStatus::Accepted
            )
        {
            t.status = TicketStatus::Routed;
        }
        s.line = r.line;
        s.holder = r.assignee_id;
        s.crew = r.crew_id;
        s.hops = r.hop;
    } else if decode::<TicketAccepted>(e).is_some() {
        if t.status == TicketStatus::Routed {
            t.status = TicketStatus::Accepted;
        }
    } else if decode::<TicketAnswered>(e).is_some() {
        if is_open(t.status) {
            t.status = TicketStatus::Answered;
        }
    } else if let Some(c) = decode::<TicketRoutingClosed>(e) {
        if is_open(t.status) {
            t.status = TicketStatus::Closed;
            s.closed_reason = c.reason;
        }
    } else if decode::<ClockWarned>(e).is_some() {
        s.warnings += 1;
    } else if decode::<ClockBreached>(e).is_some() {
        s.breaches += 1;
    } else if let Some(a) = decode::<OrderAssigned>(e) {
        if a.hop > order_hop {
            order_hops.insert(case.to_string(), a.hop);
            if order_hop > 0 && matches!(t.status, TicketStatus::Completed | TicketStatus::Answered)
            {
                t.status = TicketStatus::Routed;
            }
        }
        s.crew = a.crew_id;
    } else if decode::<OrderAcknowledged>(e).is_some() || decode::<CrewDeparted>(e).is_some() {
        if matches!(
            t.status,
            TicketStatus::Received | TicketStatus::Routed | TicketStatus::Accepted
        ) {
            t.status = TicketStatus::Dispatched;
        }
    } else if decode::<CrewArrived>(e).is_some() {
        if is_open(t.status) {
            t.status = TicketStatus::OnSite;
        }
    } else if decode::<PowerRestored>(e).is_some() {
        if is_open(t.status) {
            t.status = TicketStatus::Restored;
        }
    } else if decode::<WorkCompleted>(e).is_some() {
        if is_open(t.status) || t.status == TicketStatus::Restored {
            t.status = TicketStatus::Completed;
        }
    } else if let Some(a) = decode::<ClockAlerted>(e) {
        if a.breached {
            s.breaches += 1;
        } else {
            s.warnings += 1;
        }
    }
}
