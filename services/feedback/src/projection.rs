//! Feedback's records, derived from its log: the directory (as routing
//! defined it), a record per ticket and per case, complaints and praise by
//! time, open follow-ups by due time, and the follow-up timers.
//!
//! The projector reads only events (never the clock or the rules file), so
//! a rebuild from the log gives the same records, hence the same figures.
//! A case's clocks are judged on its first visit: a reopen adds a hop and
//! counts against first-time fix, but does not judge the first arrival again.

use lineguard_eventlog::{EventEnvelope, ProjectionView, Projector, decode_payload, timers};
use lineguard_protos::dispatch::v1::{ClockAlerted, CrewArrived, PowerRestored, WorkCompleted};
use lineguard_protos::feedback::v1::{
    CaseRecord, ComplaintFiled, ComplaintRecord, EventObserved, FollowUpOverdue, FollowUpRecorded,
    FollowUpScheduled, FollowUpStatus, FollowUpTimer, FollowUpView, PraiseRecord, PraiseRecorded,
    TicketRecord, TicketReopened,
};
use lineguard_protos::intake::v1::{TicketCancelled, TicketKind, TicketReported};
use lineguard_protos::routing::v1::{
    AssigneeRole, ClockBreached, CompanyDefined, CrewDefined, DistrictDefined, ManagerDefined,
    RouteReason, StationDefined, TicketAccepted, TicketAnswered, TicketReturned, TicketRouted,
    TicketRoutingClosed,
};
use prost::{Message, Name};
use prost_types::Timestamp;

pub use lineguard_eventlog::timers::nanos;

/// The follow-up clock's name in timer keys.
pub const FOLLOW_UP_CLOCK: &str = "follow-up";

/// Builds feedback's records from its events.
#[derive(Debug, Default, Clone, Copy)]
pub struct FeedbackProjector;

pub fn directory_key(kind: &str, id: &str) -> Vec<u8> {
    format!("dir/{kind}/{id}").into_bytes()
}
pub fn directory_prefix(kind: &str) -> Vec<u8> {
    format!("dir/{kind}/").into_bytes()
}
pub fn ticket_key(ticket: &str) -> Vec<u8> {
    format!("ticket/{ticket}").into_bytes()
}
pub fn case_key(case: &str) -> Vec<u8> {
    format!("case/{case}").into_bytes()
}
/// `<prefix><fire time, 20 digits>/<id>`: scans in time order.
pub fn timed_key(prefix: &str, at: &Timestamp, id: &str) -> Vec<u8> {
    format!("{prefix}{:020}/{id}", nanos(at).max(0)).into_bytes()
}
pub const REPORTED: &str = "reported/";
pub const CASE_REPORTED: &str = "case-reported/";
pub const COMPLAINT: &str = "complaint/";
pub const PRAISE: &str = "praise/";
pub const FOLLOW_UP_OPEN: &str = "followup-open/";
/// Children reported before their incident was routed, one id per line.
fn waiting_children_key(incident: &str) -> Vec<u8> {
    format!("incident-children/{incident}").into_bytes()
}
pub fn account_complaint_key(account: &str) -> Vec<u8> {
    format!("account-complaint/{account}").into_bytes()
}

fn store<M: Message>(view: &mut ProjectionView<'_>, key: Vec<u8>, value: &M) {
    view.put(key, value.encode_to_vec());
}

fn push_unique(list: &mut Vec<String>, id: &str) {
    if !id.is_empty() && !list.iter().any(|x| x == id) {
        list.push(id.to_string());
    }
}

impl Projector for FeedbackProjector {
    fn name(&self) -> &'static str {
        "feedback"
    }

    fn version(&self) -> u32 {
        1
    }

    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
        let t = event.event_type.as_str();
        if t == EventObserved::full_name() {
            let observed: EventObserved = decode_payload(event)?;
            let inner = observed
                .event
                .ok_or_else(|| "EventObserved without its event".to_string())?;
            return observe(&inner, view);
        }
        if t == FollowUpScheduled::full_name() {
            let e: FollowUpScheduled = decode_payload(event)?;
            let Some(mut ticket) = view.get_message::<TicketRecord>(&ticket_key(&e.ticket_id))?
            else {
                return Err(format!("follow-up of unknown ticket {}", e.ticket_id));
            };
            let station = view
                .get_message::<CaseRecord>(&case_key(&e.case_id))?
                .map(|c| c.station_id)
                .unwrap_or_default();
            close_open_follow_up(view, &ticket)?;
            let due = e.due_at.unwrap_or_default();
            ticket.follow_up = Some(FollowUpView {
                ticket_id: e.ticket_id.clone(),
                case_id: e.case_id,
                kind: ticket.kind,
                channel: ticket.channel,
                district_id: ticket.district_id.clone(),
                station_id: station,
                status: FollowUpStatus::Due as i32,
                resolution: e.resolution,
                resolved_at: e.resolved_at,
                due_at: e.due_at,
                ..FollowUpView::default()
            });
            view.put(timed_key(FOLLOW_UP_OPEN, &due, &e.ticket_id), Vec::new());
            let mut timers =
                timers::OwnerTimers::of(view, &e.ticket_id).map_err(|e| e.to_string())?;
            timers.drop_where(|clock, _| clock == FOLLOW_UP_CLOCK);
            let start = e.resolved_at.unwrap_or(due);
            let ticket_id = e.ticket_id.clone();
            timers.set(FOLLOW_UP_CLOCK, &start, &due, &[], |_, _| {
                FollowUpTimer {
                    ticket_id: ticket_id.clone(),
                    due_at: Some(due),
                }
                .encode_to_vec()
            });
            timers.save();
            store(view, ticket_key(&e.ticket_id), &ticket);
        } else if t == FollowUpOverdue::full_name() {
            let e: FollowUpOverdue = decode_payload(event)?;
            update_ticket(view, &e.ticket_id, |ticket| {
                if let Some(f) = &mut ticket.follow_up {
                    f.status = FollowUpStatus::Overdue as i32;
                    f.overdue_at = e.overdue_at;
                }
            })?;
            drop_follow_up_timer(view, &e.ticket_id)?;
        } else if t == FollowUpRecorded::full_name() {
            let e: FollowUpRecorded = decode_payload(event)?;
            let Some(mut ticket) = view.get_message::<TicketRecord>(&ticket_key(&e.ticket_id))?
            else {
                return Err(format!("follow-up of unknown ticket {}", e.ticket_id));
            };
            close_open_follow_up(view, &ticket)?;
            drop_follow_up_timer(view, &e.ticket_id)?;
            ticket.follow_ups += 1;
            if e.satisfied {
                ticket.satisfied_follow_ups += 1;
            }
            let f = ticket.follow_up.get_or_insert_with(FollowUpView::default);
            f.status = FollowUpStatus::Recorded as i32;
            f.satisfied = e.satisfied;
            f.score = e.score;
            f.recorded_at = e.recorded_at;
            f.recorded_by = e.recorded_by;
            f.reopened = e.reopen;
            store(view, ticket_key(&e.ticket_id), &ticket);
        } else if t == TicketReopened::full_name() {
            let e: TicketReopened = decode_payload(event)?;
            update_ticket(view, &e.ticket_id, |ticket| ticket.reopens += 1)?;
        } else if t == ComplaintFiled::full_name() {
            let e: ComplaintFiled = decode_payload(event)?;
            let at = e.filed_at.unwrap_or_default();
            let record = ComplaintRecord {
                complaint_id: e.complaint_id.clone(),
                ticket_id: e.ticket_id,
                account_number: e.account_number.clone(),
                at: Some(at),
                against: e.against,
                previous_at: previous_complaint(view, &e.account_number, &at)?,
                is_ticket: false,
                district_id: String::new(),
            };
            store(view, timed_key(COMPLAINT, &at, &e.complaint_id), &record);
        } else if t == PraiseRecorded::full_name() {
            let e: PraiseRecorded = decode_payload(event)?;
            let at = e.recorded_at.unwrap_or_default();
            let record = PraiseRecord {
                praise_id: e.praise_id.clone(),
                at: Some(at),
                credited: e.credited,
                district_id: String::new(),
                ticket_id: e.ticket_id,
            };
            store(view, timed_key(PRAISE, &at, &e.praise_id), &record);
        }
        Ok(())
    }
}

/// The account's previous complaint time (if any); records this one as the latest.
fn previous_complaint(
    view: &mut ProjectionView<'_>,
    account: &str,
    at: &Timestamp,
) -> Result<Option<Timestamp>, String> {
    if account.is_empty() {
        return Ok(None);
    }
    let previous = view.get_message::<Timestamp>(&account_complaint_key(account))?;
    store(view, account_complaint_key(account), at);
    Ok(previous)
}

fn close_open_follow_up(
    view: &mut ProjectionView<'_>,
    ticket: &TicketRecord,
) -> Result<(), String> {
    if let Some(f) = &ticket.follow_up
        && matches!(f.status(), FollowUpStatus::Due | FollowUpStatus::Overdue)
    {
        view.delete(timed_key(
            FOLLOW_UP_OPEN,
            &f.due_at.unwrap_or_default(),
            &ticket.ticket_id,
        ));
    }
    Ok(())
}

fn drop_follow_up_timer(view: &mut ProjectionView<'_>, ticket: &str) -> Result<(), String> {
    let mut timers = timers::OwnerTimers::of(view, ticket).map_err(|e| e.to_string())?;
    timers.drop_where(|clock, _| clock == FOLLOW_UP_CLOCK);
    timers.save();
    Ok(())
}

fn update_ticket(
    view: &mut ProjectionView<'_>,
    ticket: &str,
    change: impl FnOnce(&mut TicketRecord),
) -> Result<(), String> {
    let Some(mut record) = view.get_message::<TicketRecord>(&ticket_key(ticket))? else {
        return Err(format!("event of unknown ticket {ticket}"));
    };
    change(&mut record);
    store(view, ticket_key(ticket), &record);
    Ok(())
}

/// Changes a case's record; an event of a case feedback never saw routed
/// is ignored (the consumer waits for the route, so this is a case routed
/// before feedback was deployed).
fn update_case(
    view: &mut ProjectionView<'_>,
    case: &str,
    change: impl FnOnce(&mut CaseRecord),
) -> Result<(), String> {
    if let Some(mut record) = view.get_message::<CaseRecord>(&case_key(case))? {
        change(&mut record);
        store(view, case_key(case), &record);
    }
    Ok(())
}

/// Applies another service's event to feedback's records.
fn observe(event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
    let t = event.event_type.as_str();
    if t == CompanyDefined::full_name() {
        let e: CompanyDefined = decode_payload(event)?;
        if let Some(c) = e.company {
            store(view, directory_key("company", &c.company_id), &c);
        }
    } else if t == StationDefined::full_name() {
        let e: StationDefined = decode_payload(event)?;
        if let Some(s) = e.station {
            store(view, directory_key("station", &s.station_id), &s);
        }
    } else if t == DistrictDefined::full_name() {
        let e: DistrictDefined = decode_payload(event)?;
        if let Some(d) = e.district {
            store(view, directory_key("district", &d.district_id), &d);
        }
    } else if t == ManagerDefined::full_name() {
        let e: ManagerDefined = decode_payload(event)?;
        if let Some(m) = e.manager {
            store(view, directory_key("manager", &m.manager_id), &m);
        }
    } else if t == CrewDefined::full_name() {
        let e: CrewDefined = decode_payload(event)?;
        if let Some(c) = e.crew {
            store(view, directory_key("crew", &c.crew_id), &c);
        }
    } else if t == TicketReported::full_name() {
        reported(view, decode_payload(event)?)?;
    } else if t == TicketCancelled::full_name() {
        let e: TicketCancelled = decode_payload(event)?;
        update_ticket(view, &e.ticket_id, |t| t.cancelled = true)?;
    } else if t == TicketRouted::full_name() {
        routed(view, decode_payload(event)?)?;
    } else if t == TicketAccepted::full_name() {
        let e: TicketAccepted = decode_payload(event)?;
        update_case(view, &e.case_id, |c| {
            if !c.accepted {
                c.accepted = true;
                c.accepted_at = e.accepted_at;
            }
        })?;
    } else if t == TicketAnswered::full_name() {
        let e: TicketAnswered = decode_payload(event)?;
        update_case(view, &e.case_id, |c| resolve(c, e.answered_at))?;
    } else if t == TicketReturned::full_name() {
        let e: TicketReturned = decode_payload(event)?;
        update_case(view, &e.case_id, |c| c.returns += 1)?;
    } else if t == TicketRoutingClosed::full_name() {
        let e: TicketRoutingClosed = decode_payload(event)?;
        update_case(view, &e.case_id, |c| c.closed = true)?;
    } else if t == ClockBreached::full_name() {
        let e: ClockBreached = decode_payload(event)?;
        if e.clock == "acceptance" {
            update_case(view, &e.case_id, |c| c.acceptance_breached = true)?;
        }
    } else if t == CrewArrived::full_name() {
        let e: CrewArrived = decode_payload(event)?;
        update_case(view, &e.order_id, |c| {
            if !c.arrived {
                c.arrived = true;
                c.arrived_on_time = e.on_time;
            }
        })?;
    } else if t == PowerRestored::full_name() {
        let e: PowerRestored = decode_payload(event)?;
        update_case(view, &e.order_id, |c| {
            if !c.restored {
                c.restored = true;
                c.restored_on_time = e.on_time;
            }
        })?;
    } else if t == WorkCompleted::full_name() {
        let e: WorkCompleted = decode_payload(event)?;
        let at = event.recorded_at;
        update_case(view, &e.order_id, |c| resolve(c, at))?;
    } else if t == ClockAlerted::full_name() {
        let e: ClockAlerted = decode_payload(event)?;
        if e.breached {
            update_case(view, &e.order_id, |c| match e.clock.as_str() {
                "arrival" => c.arrival_breached = true,
                "restoration" => c.restoration_breached = true,
                _ => {}
            })?;
        }
    }
    Ok(())
}

fn resolve(case: &mut CaseRecord, at: Option<Timestamp>) {
    case.resolved = true;
    case.resolved_at = at;
}

fn reported(view: &mut ProjectionView<'_>, e: TicketReported) -> Result<(), String> {
    let at = e.reported_at.unwrap_or_default();
    let case_id = if e.incident_id.is_empty() {
        e.ticket_id.clone()
    } else {
        e.incident_id.clone()
    };
    let ticket = TicketRecord {
        ticket_id: e.ticket_id.clone(),
        case_id: case_id.clone(),
        kind: e.kind,
        channel: e.channel,
        account_number: e.account_number.clone(),
        district_id: e.district_id.clone(),
        incident_id: e.incident_id.clone(),
        reported_at: Some(at),
        ..TicketRecord::default()
    };
    store(view, ticket_key(&e.ticket_id), &ticket);
    view.put(timed_key(REPORTED, &at, &e.ticket_id), Vec::new());
    if !e.incident_id.is_empty() && !e.incident_lead {
        // A child: in its incident's case now, or when the incident is routed.
        let mut joined = false;
        update_case(view, &case_id, |c| {
            push_unique(&mut c.ticket_ids, &e.ticket_id);
            joined = true;
        })?;
        if !joined {
            let key = waiting_children_key(&e.incident_id);
            let mut list = view
                .get(&key)
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            list.extend_from_slice(e.ticket_id.as_bytes());
            list.push(b'\n');
            view.put(key, list);
        }
    }
    match e.kind() {
        TicketKind::Complaint => {
            let record = ComplaintRecord {
                complaint_id: e.ticket_id.clone(),
                ticket_id: e.ticket_id.clone(),
                account_number: e.account_number.clone(),
                at: Some(at),
                against: Vec::new(),
                previous_at: previous_complaint(view, &e.account_number, &at)?,
                is_ticket: true,
                district_id: e.district_id.clone(),
            };
            store(view, timed_key(COMPLAINT, &at, &e.ticket_id), &record);
        }
        TicketKind::Praise => {
            let record = PraiseRecord {
                praise_id: e.ticket_id.clone(),
                at: Some(at),
                credited: Vec::new(),
                district_id: e.district_id,
                ticket_id: e.ticket_id.clone(),
            };
            store(view, timed_key(PRAISE, &at, &e.ticket_id), &record);
        }
        _ => {}
    }
    Ok(())
}

fn routed(view: &mut ProjectionView<'_>, e: TicketRouted) -> Result<(), String> {
    let mut case = match view.get_message::<CaseRecord>(&case_key(&e.case_id))? {
        Some(case) => case,
        None => {
            let reported_at = e.reported_at.unwrap_or_default();
            let mut ticket_ids = vec![e.lead_ticket_id.clone()];
            if !e.incident_id.is_empty() {
                let key = waiting_children_key(&e.incident_id);
                if let Some(list) = view.get(&key).map_err(|e| e.to_string())? {
                    for child in String::from_utf8_lossy(&list).lines() {
                        push_unique(&mut ticket_ids, child);
                    }
                    view.delete(key);
                }
            }
            view.put(
                timed_key(CASE_REPORTED, &reported_at, &e.case_id),
                Vec::new(),
            );
            CaseRecord {
                case_id: e.case_id.clone(),
                lead_ticket_id: e.lead_ticket_id.clone(),
                ticket_ids,
                kind: e.kind,
                reported_at: Some(reported_at),
                ..CaseRecord::default()
            }
        }
    };
    case.district_id = e.district_id.clone();
    case.station_id = e.station_id.clone();
    case.company_id = e.company_id.clone();
    case.hops = case.hops.max(e.hop);
    if e.assignee_role() == AssigneeRole::DistrictManager {
        push_unique(&mut case.manager_ids, &e.assignee_id);
    }
    push_unique(&mut case.crew_ids, &e.crew_id);
    if e.line >= 3 && e.reason() == RouteReason::Escalated {
        case.escalated_past_station = true;
    }
    if e.reason() == RouteReason::Reopened {
        case.reopens += 1;
        case.resolved = false;
        case.closed = false;
    }
    store(view, case_key(&e.case_id), &case);
    Ok(())
}
