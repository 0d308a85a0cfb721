//! Loads recounted from the log: the check that a person's open tickets are
//! exactly the cases they hold.
//!
//! The projector keeps every assignee's and crew's `open_tickets` as it
//! applies routes ([`holders`](crate::projection::holders)). This module
//! derives the same figure a second way, straight from routing's events,
//! with a fold of its own (status, holder and crew of each case), and
//! compares the two. A stored load that drifts from the recount is a bug,
//! and over months it is the bug that sends every ticket to the company.

use std::collections::{BTreeMap, HashMap};

use lineguard_eventlog::{EventLog, decode_payload};
use lineguard_protos::routing::v1::{
    AvailabilityView, LoadMismatch, RouteStatus, TicketAccepted, TicketAnswered, TicketRouted,
    TicketRoutingClosed, TicketWorkCompleted, VerifyLoadsResponse,
};
use prost::{Message, Name};

use crate::router::RouterError;

/// Where the stored loads are (see [`crate::projection`]).
const ASSIGNEE_PREFIX: &[u8] = b"assignee/";
/// Events (and stored loads) read per page of the recount.
const PAGE: usize = 1_000;

/// What the recount keeps of one case.
#[derive(Debug, Default)]
struct Held {
    status: i32,
    assignee_id: String,
    crew_id: String,
    field_work: bool,
}

impl Held {
    fn holders(&self) -> impl Iterator<Item = &str> {
        let open = self.status == RouteStatus::Routed as i32
            || self.status == RouteStatus::Accepted as i32;
        let assignee = (open && !self.assignee_id.is_empty()).then_some(self.assignee_id.as_str());
        let crew = (open
            && self.field_work
            && !self.crew_id.is_empty()
            && self.crew_id != self.assignee_id)
            .then_some(self.crew_id.as_str());
        assignee.into_iter().chain(crew)
    }
}

/// Recounts every load from routing's log and compares it with the stored
/// one. Reads the whole log: run it off the async runtime's threads.
pub fn verify_loads(log: &EventLog) -> Result<VerifyLoadsResponse, RouterError> {
    let mut cases: HashMap<String, Held> = HashMap::new();
    let mut events_read = 0u64;
    let mut from = 1;
    let set_status = |cases: &mut HashMap<String, Held>, case: &str, status: RouteStatus| {
        if let Some(held) = cases.get_mut(case) {
            held.status = status as i32;
        }
    };
    loop {
        let page = log.read_all(from, PAGE)?;
        let Some(last) = page.last().map(|e| e.global_position) else {
            break;
        };
        for event in &page {
            let t = event.event_type.as_str();
            let bad = |e: String| RouterError::Precondition(format!("{t}: {e}"));
            if t == TicketRouted::full_name() {
                let e: TicketRouted = decode_payload(event).map_err(bad)?;
                let held = cases.entry(e.case_id).or_default();
                held.status = RouteStatus::Routed as i32;
                held.assignee_id = e.assignee_id;
                held.crew_id = e.crew_id;
                held.field_work = e.field_work;
            } else if t == TicketAccepted::full_name() {
                let e: TicketAccepted = decode_payload(event).map_err(bad)?;
                set_status(&mut cases, &e.case_id, RouteStatus::Accepted);
            } else if t == TicketAnswered::full_name() {
                let e: TicketAnswered = decode_payload(event).map_err(bad)?;
                set_status(&mut cases, &e.case_id, RouteStatus::Answered);
            } else if t == TicketRoutingClosed::full_name() {
                let e: TicketRoutingClosed = decode_payload(event).map_err(bad)?;
                set_status(&mut cases, &e.case_id, RouteStatus::Closed);
            } else if t == TicketWorkCompleted::full_name() {
                let e: TicketWorkCompleted = decode_payload(event).map_err(bad)?;
                set_status(&mut cases, &e.case_id, RouteStatus::WorkCompleted);
            }
        }
        events_read += page.len() as u64;
        from = last + 1;
    }
    let mut recounted: BTreeMap<String, u32> = BTreeMap::new();
    for held in cases.values() {
        for who in held.holders() {
            *recounted.entry(who.to_string()).or_default() += 1;
        }
    }
    let mut stored: BTreeMap<String, u32> = BTreeMap::new();
    let mut pages = log.projection_pages(ASSIGNEE_PREFIX, PAGE);
    loop {
        let page = pages.next_page()?;
        if page.is_empty() {
            break;
        }
        for (_, value) in &page {
            let a = AvailabilityView::decode(value.as_slice())
                .map_err(|e| RouterError::Precondition(format!("undecodable availability: {e}")))?;
            stored.insert(a.assignee_id, a.open_tickets);
        }
    }
    let mut ids: Vec<&String> = stored.keys().chain(recounted.keys()).collect();
    ids.sort();
    ids.dedup();
    let mismatches = ids
        .iter()
        .filter_map(|id| {
            let (s, r) = (
                stored.get(*id).copied().unwrap_or(0),
                recounted.get(*id).copied().unwrap_or(0),
            );
            (s != r).then(|| LoadMismatch {
                assignee_id: (*id).clone(),
                stored: s,
                recounted: r,
            })
        })
        .collect();
    Ok(VerifyLoadsResponse {
        events_read,
        assignees: ids.len() as u64,
        open_tickets: recounted.values().map(|&n| u64::from(n)).sum(),
        mismatches,
    })
}
