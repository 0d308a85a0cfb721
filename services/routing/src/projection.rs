//! Routing's projections, derived from its log only:
//!
//! | key | value |
//! | --- | --- |
//! | `company/<id>`, `station/<id>`, `district/<id>`, `manager/<id>`, `crew/<id>` | the directory entry |
//! | `station-crew/<station>/<crew>` | empty: a station's crews |
//! | `account/<account number>` | the district id |
//! | `district-account/<district id>/<account number>` | empty: a district's accounts |
//! | `assignee/<id>` | [`AvailabilityView`]: role, availability, open tickets (see [`holders`]) |
//! | `policy/<version>` | [`PolicyAdopted`]; `policy-current`: the newest version |
//! | `route/<case id>` | [`RouteView`] of a ticket or incident |
//! | `follows/<ticket id>` | the incident a ticket leads or follows |
//! | `timer/…`, `timers-of/<case id>` | [`Timer`]s, see [`lineguard_eventlog::timers`] |
//!
//! Timers are projections too: a route writes its timers in the same batch
//! as the event, and the event that acts on a timer (a warning, an
//! escalation, a breach) deletes it in the same batch. So a timer fires at
//! most once, and a restart finds exactly the timers still due.

use lineguard_eventlog::timers::OwnerTimers;
use lineguard_eventlog::{EventEnvelope, ProjectionView, Projector, decode_payload};
use lineguard_protos::routing::v1::{
    AccountsAssigned, AssigneeRole, AvailabilityChanged, AvailabilityView, ClockBreached,
    ClockWarned, CompanyDefined, CrewDefined, DistrictDefined, Hop, ManagerDefined, PolicyAdopted,
    RouteStatus, RouteView, StationDefined, TicketAccepted, TicketAnswered, TicketFollowedIncident,
    TicketReturned, TicketRouted, TicketRoutingClosed, TicketWorkCompleted, Timer,
};
use prost::{Message, Name};
use prost_types::Timestamp;

use crate::policy::{ACCEPTANCE, ANSWER, CONTACT};

/// Builds routing's views from its events.
#[derive(Debug, Default, Clone, Copy)]
pub struct RoutingProjector;

pub fn company_key(id: &str) -> Vec<u8> {
    format!("company/{id}").into_bytes()
}
pub fn station_key(id: &str) -> Vec<u8> {
    format!("station/{id}").into_bytes()
}
pub fn district_key(id: &str) -> Vec<u8> {
    format!("district/{id}").into_bytes()
}
pub fn manager_key(id: &str) -> Vec<u8> {
    format!("manager/{id}").into_bytes()
}
pub fn crew_key(id: &str) -> Vec<u8> {
    format!("crew/{id}").into_bytes()
}
pub fn station_crews_prefix(station: &str) -> Vec<u8> {
    format!("station-crew/{station}/").into_bytes()
}
/// Prefix of a district's accounts, `district-account/<district>/`.
pub fn district_accounts_prefix(district: &str) -> Vec<u8> {
    format!("district-account/{district}/").into_bytes()
}
pub fn account_key(account: &str) -> Vec<u8> {
    format!("account/{account}").into_bytes()
}
pub fn assignee_key(id: &str) -> Vec<u8> {
    format!("assignee/{id}").into_bytes()
}
pub fn policy_key(version: &str) -> Vec<u8> {
    format!("policy/{version}").into_bytes()
}
pub const POLICY_CURRENT: &[u8] = b"policy-current";
pub fn route_key(case: &str) -> Vec<u8> {
    format!("route/{case}").into_bytes()
}
pub fn follows_key(ticket: &str) -> Vec<u8> {
    format!("follows/{ticket}").into_bytes()
}
pub use lineguard_eventlog::timers::nanos;

fn store(view: &mut ProjectionView<'_>, key: Vec<u8>, message: &impl Message) {
    view.put(key, message.encode_to_vec());
}

fn load_route(view: &ProjectionView<'_>, case: &str) -> Result<RouteView, String> {
    view.get_message(&route_key(case))?
        .ok_or_else(|| format!("no route for {case}"))
}

/// A route as it stands after `e`: the one place a hop changes a route.
pub fn apply_routed(route: &mut RouteView, e: &TicketRouted) {
    route.hops.push(Hop {
        hop: e.hop,
        line: e.line,
        assignee_id: e.assignee_id.clone(),
        assignee_role: e.assignee_role,
        reason: e.reason,
        reason_detail: e.reason_detail.clone(),
        routed_at: e.routed_at,
        waiting_seconds: e.waiting_seconds,
    });
    route.case_id = e.case_id.clone();
    route.lead_ticket_id = e.lead_ticket_id.clone();
    route.incident_id = e.incident_id.clone();
    route.kind = e.kind;
    route.service_request_type = e.service_request_type;
    route.channel = e.channel;
    route.district_id = e.district_id.clone();
    route.station_id = e.station_id.clone();
    route.company_id = e.company_id.clone();
    route.area_class = e.area_class;
    route.policy_version = e.policy_version.clone();
    route.status = RouteStatus::Routed as i32;
    route.line = e.line;
    route.assignee_id = e.assignee_id.clone();
    route.assignee_role = e.assignee_role;
    route.crew_id = e.crew_id.clone();
    route.hop = e.hop;
    route.reported_at = e.reported_at;
    route.routed_at = e.routed_at;
    route.acceptance_due_at = e.acceptance_due_at;
    route.accepted_at = None;
    route.deadlines = e.deadlines.clone();
    route.limits = e.limits.clone();
    route.field_work = e.field_work;
    route.warn_at_percent = e.warn_at_percent.clone();
}

/// Records an assignee's role, keeping its availability and load.
fn define_assignee(
    view: &mut ProjectionView<'_>,
    id: &str,
    role: AssigneeRole,
) -> Result<(), String> {
    if id.is_empty() {
        return Ok(());
    }
    let mut a: AvailabilityView = view.get_message(&assignee_key(id))?.unwrap_or_default();
    a.assignee_id = id.to_string();
    a.role = role as i32;
    store(view, assignee_key(id), &a);
    Ok(())
}

/// Who a route holds now: its assignee and, for field work, its crew,
/// while the route is open (routed or accepted). A person's open tickets
/// are exactly the routes that hold them, so every load is a function of
/// the routes: [`recount_loads`] derives it again from the log.
pub fn holders(route: &RouteView) -> Vec<&str> {
    if !matches!(route.status(), RouteStatus::Routed | RouteStatus::Accepted) {
        return Vec::new();
    }
    let mut who = Vec::with_capacity(2);
    if !route.assignee_id.is_empty() {
        who.push(route.assignee_id.as_str());
    }
    if route.field_work && !route.crew_id.is_empty() && route.crew_id != route.assignee_id {
        who.push(route.crew_id.as_str());
    }
    who
}

fn add_load(view: &mut ProjectionView<'_>, id: &str, delta: i32) -> Result<(), String> {
    let mut a: AvailabilityView =
        view.get_message(&assignee_key(id))?
            .unwrap_or_else(|| AvailabilityView {
                assignee_id: id.to_string(),
                ..AvailabilityView::default()
            });
    let Some(open) = a.open_tickets.checked_add_signed(delta) else {
        // Loads are derived from routes (see `holders`): a release without
        // a hold is a bug in this projector, not a state to carry on from.
        return Err(format!("{id}'s open tickets would fall below zero"));
    };
    a.open_tickets = open;
    store(view, assignee_key(id), &a);
    Ok(())
}

/// Stores a case's route, moving the loads from whoever `before` held to
/// whoever `after` holds: the one place a load changes.
fn store_route(
    view: &mut ProjectionView<'_>,
    before: Option<&RouteView>,
    after: &RouteView,
) -> Result<(), String> {
    let held_before = before.map(holders).unwrap_or_default();
    let held_after = holders(after);
    for id in held_before.iter().filter(|id| !held_after.contains(id)) {
        add_load(view, id, -1)?;
    }
    for id in held_after.iter().filter(|id| !held_before.contains(id)) {
        add_load(view, id, 1)?;
    }
    store(view, route_key(&after.case_id), after);
    Ok(())
}

/// What a routing timer stores: enough to act on it without the route.
fn timer_value(
    case: &str,
    clock: &str,
    due: Timestamp,
    hop: u32,
) -> impl Fn(u32, &Timestamp) -> Vec<u8> {
    let (case, clock) = (case.to_string(), clock.to_string());
    move |percent, fire_at| {
        Timer {
            case_id: case.clone(),
            clock: clock.clone(),
            percent,
            due_at: Some(*fire_at),
            clock_due_at: Some(due),
            hop,
        }
        .encode_to_vec()
    }
}

fn timers_of<'v, 'a>(
    view: &'v mut ProjectionView<'a>,
    case: &str,
) -> Result<OwnerTimers<'v, 'a>, String> {
    OwnerTimers::of(view, case).map_err(|e| e.to_string())
}

impl Projector for RoutingProjector {
    fn name(&self) -> &'static str {
        "routing"
    }

    fn version(&self) -> u32 {
        // 2: timers moved to the event log's shared timer table.
        // 3: loads are the routes' holders (crews included), work completion.
        // 4: an incident's lead ticket is indexed like its children; each
        //    district's accounts are listed.
        4
    }

    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
        let t = event.event_type.as_str();
        if t == CompanyDefined::full_name() {
            let e: CompanyDefined = decode_payload(event)?;
            let company = e.company.unwrap_or_default();
            define_assignee(view, &company.supervisor_desk_id, AssigneeRole::CompanyDesk)?;
            store(view, company_key(&company.company_id), &company);
        } else if t == StationDefined::full_name() {
            let e: StationDefined = decode_payload(event)?;
            let station = e.station.unwrap_or_default();
            define_assignee(view, &station.duty_desk_id, AssigneeRole::StationDesk)?;
            store(view, station_key(&station.station_id), &station);
        } else if t == DistrictDefined::full_name() {
            let e: DistrictDefined = decode_payload(event)?;
            let district = e.district.unwrap_or_default();
            store(view, district_key(&district.district_id), &district);
        } else if t == ManagerDefined::full_name() {
            let e: ManagerDefined = decode_payload(event)?;
            let manager = e.manager.unwrap_or_default();
            define_assignee(view, &manager.manager_id, AssigneeRole::DistrictManager)?;
            store(view, manager_key(&manager.manager_id), &manager);
        } else if t == CrewDefined::full_name() {
            let e: CrewDefined = decode_payload(event)?;
            let crew = e.crew.unwrap_or_default();
            if let Some(old) =
                view.get_message::<lineguard_protos::routing::v1::Crew>(&crew_key(&crew.crew_id))?
                && old.station_id != crew.station_id
            {
                let mut key = station_crews_prefix(&old.station_id);
                key.extend_from_slice(crew.crew_id.as_bytes());
                view.delete(key);
            }
            let mut key = station_crews_prefix(&crew.station_id);
            key.extend_from_slice(crew.crew_id.as_bytes());
            view.put(key, Vec::new());
            define_assignee(view, &crew.crew_id, AssigneeRole::Crew)?;
            store(view, crew_key(&crew.crew_id), &crew);
        } else if t == AccountsAssigned::full_name() {
            let e: AccountsAssigned = decode_payload(event)?;
            for a in e.accounts {
                // An account moved to another district leaves the old one's list.
                if let Some(old) = view
                    .get(&account_key(&a.account_number))
                    .map_err(|e| e.to_string())?
                    && old != a.district_id.as_bytes()
                {
                    let mut key = district_accounts_prefix(&String::from_utf8_lossy(&old));
                    key.extend_from_slice(a.account_number.as_bytes());
                    view.delete(key);
                }
                let mut key = district_accounts_prefix(&a.district_id);
                key.extend_from_slice(a.account_number.as_bytes());
                view.put(key, Vec::new());
                view.put(account_key(&a.account_number), a.district_id.into_bytes());
            }
        } else if t == AvailabilityChanged::full_name() {
            let e: AvailabilityChanged = decode_payload(event)?;
            let mut a: AvailabilityView = view
                .get_message(&assignee_key(&e.assignee_id))?
                .unwrap_or_default();
            a.assignee_id = e.assignee_id.clone();
            a.role = e.role;
            a.availability = e.availability;
            a.leave_from = e.leave_from;
            a.leave_until = e.leave_until;
            store(view, assignee_key(&e.assignee_id), &a);
        } else if t == PolicyAdopted::full_name() {
            let e: PolicyAdopted = decode_payload(event)?;
            view.put(POLICY_CURRENT.to_vec(), e.version.clone().into_bytes());
            store(view, policy_key(&e.version), &e);
        } else if t == TicketRouted::full_name() {
            let e: TicketRouted = decode_payload(event)?;
            let previous: Option<RouteView> = view.get_message(&route_key(&e.case_id))?;
            let first = previous.is_none();
            let mut route = previous.clone().unwrap_or_default();
            let routed_at = e.routed_at.unwrap_or_default();
            apply_routed(&mut route, &e);
            route.version = event.stream_version;

            // The lead's ticket id names the incident's case too.
            if first && !e.lead_ticket_id.is_empty() && e.lead_ticket_id != e.case_id {
                view.put(
                    follows_key(&e.lead_ticket_id),
                    e.case_id.clone().into_bytes(),
                );
            }
            let mut timers = timers_of(view, &e.case_id)?;
            timers.drop_where(|clock, _| clock == ACCEPTANCE);
            if let Some(due) = e.acceptance_due_at {
                let value = timer_value(&e.case_id, ACCEPTANCE, due, e.hop);
                timers.set(ACCEPTANCE, &routed_at, &due, &e.warn_at_percent, value);
            }
            if first {
                let reported = e.reported_at.unwrap_or(routed_at);
                for d in e
                    .deadlines
                    .iter()
                    .filter(|d| d.clock == CONTACT || d.clock == ANSWER)
                {
                    if let Some(due) = d.due_at {
                        let value = timer_value(&e.case_id, &d.clock, due, e.hop);
                        timers.set(&d.clock, &reported, &due, &e.warn_at_percent, value);
                    }
                }
            }
            timers.save();
            store_route(view, previous.as_ref(), &route)?;
        } else if t == TicketFollowedIncident::full_name() {
            let e: TicketFollowedIncident = decode_payload(event)?;
            view.put(
                follows_key(&e.ticket_id),
                e.incident_id.clone().into_bytes(),
            );
            if let Some(mut route) = view.get_message::<RouteView>(&route_key(&e.incident_id))? {
                route.children += 1;
                store(view, route_key(&e.incident_id), &route);
            }
        } else if t == TicketAccepted::full_name() {
            let e: TicketAccepted = decode_payload(event)?;
            let before = load_route(view, &e.case_id)?;
            let mut route = before.clone();
            route.status = RouteStatus::Accepted as i32;
            route.accepted_at = e.accepted_at;
            route.version = event.stream_version;
            let mut timers = timers_of(view, &e.case_id)?;
            timers.drop_where(|clock, _| clock == ACCEPTANCE);
            timers.save();
            store_route(view, Some(&before), &route)?;
        } else if t == TicketReturned::full_name() {
            // The route it leads to (or its closing) comes in the same commit.
            let e: TicketReturned = decode_payload(event)?;
            let mut route = load_route(view, &e.case_id)?;
            route.version = event.stream_version;
            store(view, route_key(&e.case_id), &route);
        } else if t == TicketAnswered::full_name() || t == TicketRoutingClosed::full_name() {
            let (case, status, reason) = if t == TicketAnswered::full_name() {
                let e: TicketAnswered = decode_payload(event)?;
                (e.case_id, RouteStatus::Answered, String::new())
            } else {
                let e: TicketRoutingClosed = decode_payload(event)?;
                (e.case_id, RouteStatus::Closed, e.reason)
            };
            let before = load_route(view, &case)?;
            let mut route = before.clone();
            route.status = status as i32;
            route.closed_reason = reason;
            route.version = event.stream_version;
            let mut timers = timers_of(view, &case)?;
            timers.drop_where(|_, _| true);
            timers.save();
            store_route(view, Some(&before), &route)?;
        } else if t == TicketWorkCompleted::full_name() {
            let e: TicketWorkCompleted = decode_payload(event)?;
            let before = load_route(view, &e.case_id)?;
            let mut route = before.clone();
            route.status = RouteStatus::WorkCompleted as i32;
            route.version = event.stream_version;
            // Every clock of the hop stops with the work: none may be left
            // to fire (or to stand in the timer scan's way).
            let mut timers = timers_of(view, &e.case_id)?;
            timers.drop_where(|_, _| true);
            timers.save();
            store_route(view, Some(&before), &route)?;
        } else if t == ClockWarned::full_name() {
            let e: ClockWarned = decode_payload(event)?;
            let mut route = load_route(view, &e.case_id)?;
            route.version = event.stream_version;
            let mut timers = timers_of(view, &e.case_id)?;
            timers.drop_where(|clock, percent| clock == e.clock && percent == e.percent);
            timers.save();
            store(view, route_key(&e.case_id), &route);
        } else if t == ClockBreached::full_name() {
            let e: ClockBreached = decode_payload(event)?;
            let mut route = load_route(view, &e.case_id)?;
            route.version = event.stream_version;
            let mut timers = timers_of(view, &e.case_id)?;
            timers.drop_where(|clock, _| clock == e.clock);
            timers.save();
            store(view, route_key(&e.case_id), &route);
        } else {
            return Err(format!("routing does not project {t}"));
        }
        Ok(())
    }
}
