//! The routing decision: who owns a ticket now.
//!
//! A district's owners form a chain of three lines: its manager (1), its
//! station's duty desk (2), its company's supervisor desk (3). A new ticket
//! goes to the first line that can take it now (on duty, not on leave, not
//! overloaded): one hop, whatever door it came through. An escalation, a
//! return or a reopen moves it along the chain, one hop each. The last line
//! always takes what reaches it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lineguard_eventlog::{Error as LogError, EventLog, NewEvent};
use lineguard_protos::intake::v1::{ServiceRequestType, TicketKind, TicketReported};
use lineguard_protos::routing::v1::{
    AreaClass, AssigneeRole, Availability, AvailabilityView, Company, District, PolicyAdopted,
    ReturnReason, RouteReason, RouteStatus, RouteView, TicketReturned, TicketRouted,
    TicketRoutingClosed,
};
use prost::Message;
use prost_types::Timestamp;

use crate::directory::{DirectoryError, DirectoryReader};
use crate::policy::{ACCEPTANCE, Policy, PolicyError};
use crate::projection::{
    POLICY_CURRENT, apply_routed, assignee_key, follows_key, nanos, policy_key, route_key,
};
use lineguard_runtime::calendar::Calendar;

/// Routing's knobs.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// An assignee holding more open tickets than this is passed over.
    pub overload_threshold: u32,
    /// The working calendar limits in working days are counted by.
    pub calendar: Arc<Calendar>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            overload_threshold: 50,
            calendar: Arc::new(Calendar::default()),
        }
    }
}

/// Why routing could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{0}")]
    NotFound(String),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        match e {
            RouterError::NotFound(m) => tonic::Status::not_found(m),
            RouterError::Invalid { .. } => tonic::Status::invalid_argument(e.to_string()),
            RouterError::Precondition(m) => tonic::Status::failed_precondition(m),
            RouterError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            RouterError::Directory(d) => tonic::Status::invalid_argument(d.to_string()),
            RouterError::Policy(p) => tonic::Status::failed_precondition(p.to_string()),
            RouterError::Log(l) => tonic::Status::from(l),
        }
    }
}

/// The current time as a protobuf timestamp.
pub fn now() -> Timestamp {
    lineguard_eventlog::clock::now()
}

/// Whole seconds from `from` to `to`, never negative.
pub fn seconds_between(from: &Timestamp, to: &Timestamp) -> u64 {
    u64::try_from((nanos(to) - nanos(from)) / 1_000_000_000).unwrap_or(0)
}

/// One line of a district's chain of owners.
#[derive(Debug, Clone)]
struct Owner {
    line: u32,
    assignee_id: String,
    role: AssigneeRole,
}

/// Who gets the ticket, and what was passed over on the way.
#[derive(Debug, Clone)]
pub struct Choice {
    pub line: u32,
    pub assignee_id: String,
    pub role: AssigneeRole,
    /// Why earlier lines were passed over; empty when none was.
    pub passed_over: Vec<String>,
}

/// Where a ticket is: its district and the owners above it.
#[derive(Debug, Clone, Default)]
pub struct Place {
    pub district: Option<District>,
    pub station_id: String,
    pub company: Option<Company>,
}

/// Routing's shared state: the log, the directory, the policies.
#[derive(Clone)]
pub struct Router {
    log: EventLog,
    directory: DirectoryReader,
    config: RoutingConfig,
    policies: Arc<Mutex<HashMap<String, Arc<Policy>>>>,
}

impl Router {
    pub fn new(log: EventLog, config: RoutingConfig) -> Self {
        Router {
            directory: DirectoryReader::new(log.clone()),
            log,
            config,
            policies: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Routing's own log.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    pub fn directory(&self) -> &DirectoryReader {
        &self.directory
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    fn get<M: Message + Default>(&self, key: &[u8]) -> Result<Option<M>, RouterError> {
        match self.log.projection_get(key)? {
            Some(bytes) => M::decode(bytes.as_slice()).map(Some).map_err(|e| {
                RouterError::Log(LogError::Corrupted {
                    column: "projections",
                    location: String::from_utf8_lossy(key).into_owned(),
                    reason: e.to_string(),
                })
            }),
            None => Ok(None),
        }
    }

    /// A stored policy version, parsed (and cached: versions never change).
    pub fn policy(&self, version: &str) -> Result<Arc<Policy>, RouterError> {
        if let Ok(cache) = self.policies.lock()
            && let Some(p) = cache.get(version)
        {
            return Ok(p.clone());
        }
        let adopted: PolicyAdopted = self.get(&policy_key(version))?.ok_or_else(|| {
            RouterError::NotFound(format!("policy version {version} was never adopted"))
        })?;
        let policy = Arc::new(Policy::parse(&adopted.source_text)?);
        if let Ok(mut cache) = self.policies.lock() {
            cache.insert(version.to_string(), policy.clone());
        }
        Ok(policy)
    }

    /// The newest adopted policy version, if any.
    pub fn current_policy_version(&self) -> Result<Option<String>, RouterError> {
        Ok(self
            .log
            .projection_get(POLICY_CURRENT)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The adopted record of a version.
    pub fn adopted_policy(&self, version: &str) -> Result<Option<PolicyAdopted>, RouterError> {
        self.get(&policy_key(version))
    }

    /// A case's route.
    pub fn route(&self, case: &str) -> Result<Option<RouteView>, RouterError> {
        self.get(&route_key(case))
    }

    /// The case a ticket id belongs to: itself, or the incident it follows.
    pub fn case_of(&self, ticket_or_incident: &str) -> Result<Option<RouteView>, RouterError> {
        if let Some(route) = self.route(ticket_or_incident)? {
            return Ok(Some(route));
        }
        match self.incident_of(ticket_or_incident)? {
            Some(incident) => self.route(&incident),
            None => Ok(None),
        }
    }

    /// The incident a ticket leads or follows, if routing has heard of it.
    pub fn incident_of(&self, ticket: &str) -> Result<Option<String>, RouterError> {
        Ok(self
            .log
            .projection_get(&follows_key(ticket))?
            .map(|incident| String::from_utf8_lossy(&incident).into_owned()))
    }

    /// An assignee's availability record (role, leave, load).
    pub fn availability(&self, assignee: &str) -> Result<Option<AvailabilityView>, RouterError> {
        self.get(&assignee_key(assignee))
    }

    /// Why `a` cannot take a ticket at `now`, or `None` if it can.
    pub fn unavailable_reason(&self, a: &AvailabilityView, now: &Timestamp) -> Option<String> {
        let id = &a.assignee_id;
        match a.availability() {
            Availability::OffDuty => return Some(format!("{id} is off duty")),
            Availability::OnLeave => {
                let started = a.leave_from.as_ref().is_none_or(|f| nanos(f) <= nanos(now));
                let ongoing = a.leave_until.as_ref().is_none_or(|u| nanos(now) < nanos(u));
                if started && ongoing {
                    return Some(match &a.leave_until {
                        Some(until) => format!("{id} is on leave until {until}"),
                        None => format!("{id} is on leave"),
                    });
                }
            }
            Availability::OnDuty | Availability::Unspecified => {}
        }
        if a.open_tickets > self.config.overload_threshold {
            return Some(format!(
                "{id} is overloaded ({} open tickets, over {})",
                a.open_tickets, self.config.overload_threshold
            ));
        }
        None
    }

    /// `a` as seen at `now`: with `overloaded` and `available_now` filled in.
    pub fn availability_at(&self, mut a: AvailabilityView, now: &Timestamp) -> AvailabilityView {
        a.overloaded = a.open_tickets > self.config.overload_threshold;
        a.available_now = self.unavailable_reason(&a, now).is_none();
        a
    }

    /// The company tickets of unknown districts go to: the first by id.
    fn default_company(&self) -> Result<Option<Company>, RouterError> {
        let first = self.log.projection_scan(b"company/", None, 1)?;
        match first.into_iter().next() {
            Some((_, value)) => Company::decode(value.as_slice())
                .map(Some)
                .map_err(|e| RouterError::Precondition(format!("undecodable company: {e}"))),
            None => Ok(None),
        }
    }

    /// The district (if known) and the owners above it.
    pub fn place(&self, district: Option<District>) -> Result<Place, RouterError> {
        let Some(district) = district else {
            return Ok(Place {
                district: None,
                station_id: String::new(),
                company: self.default_company()?,
            });
        };
        let station = self.directory.station(&district.station_id)?;
        let company = match &station {
            Some(s) => self.directory.company(&s.company_id)?,
            None => self.default_company()?,
        };
        Ok(Place {
            station_id: station.map(|s| s.station_id).unwrap_or_default(),
            district: Some(district),
            company,
        })
    }

    /// The district a report is about: the one it names if known, else the
    /// account's.
    pub fn locate(
        &self,
        district_id: &str,
        account: &str,
    ) -> Result<Option<District>, RouterError> {
        if !district_id.is_empty()
            && let Some(d) = self.directory.district(district_id)?
        {
            return Ok(Some(d));
        }
        if !account.is_empty()
            && let Some(id) = self.directory.account_district(account)?
        {
            return Ok(self.directory.district(&id)?);
        }
        Ok(None)
    }

    fn chain(&self, place: &Place) -> Result<Vec<Owner>, RouterError> {
        let mut chain = Vec::with_capacity(3);
        if let Some(d) = &place.district {
            chain.push(Owner {
                line: 1,
                assignee_id: d.manager_id.clone(),
                role: AssigneeRole::DistrictManager,
            });
        }
        if let Some(station) = self.directory.station(&place.station_id)? {
            chain.push(Owner {
                line: 2,
                assignee_id: station.duty_desk_id,
                role: AssigneeRole::StationDesk,
            });
        }
        if let Some(c) = &place.company {
            chain.push(Owner {
                line: 3,
                assignee_id: c.supervisor_desk_id.clone(),
                role: AssigneeRole::CompanyDesk,
            });
        }
        Ok(chain)
    }

    /// The first owner at `from_line` or above who can take a ticket now;
    /// the last line takes it regardless.
    pub fn choose(
        &self,
        place: &Place,
        from_line: u32,
        now: &Timestamp,
    ) -> Result<Choice, RouterError> {
        let chain = self.chain(place)?;
        let candidates: Vec<&Owner> = chain.iter().filter(|o| o.line >= from_line).collect();
        let Some(last) = candidates.last() else {
            return Err(RouterError::Precondition(format!(
                "no owner at line {from_line} or above: the directory has no company"
            )));
        };
        let mut passed_over = Vec::new();
        for owner in &candidates {
            let availability =
                self.availability(&owner.assignee_id)?
                    .unwrap_or_else(|| AvailabilityView {
                        assignee_id: owner.assignee_id.clone(),
                        ..AvailabilityView::default()
                    });
            match self.unavailable_reason(&availability, now) {
                Some(reason) if owner.line != last.line => passed_over.push(reason),
                Some(reason) => {
                    passed_over.push(format!("{reason}; the last line takes it regardless"));
                    break;
                }
                None => {
                    return Ok(Choice {
                        line: owner.line,
                        assignee_id: owner.assignee_id.clone(),
                        role: owner.role,
                        passed_over,
                    });
                }
            }
        }
        Ok(Choice {
            line: last.line,
            assignee_id: last.assignee_id.clone(),
            role: last.role,
            passed_over,
        })
    }

    /// The crew to send for field work at `line`: one serving the district,
    /// else any of the station's, preferring those who can go now.
    pub fn crew_for(&self, place: &Place, now: &Timestamp) -> Result<String, RouterError> {
        let Some(district) = &place.district else {
            return Ok(String::new());
        };
        let crews = self.directory.station_crews(&place.station_id)?;
        let serves = |c: &&lineguard_protos::routing::v1::Crew| {
            c.district_ids.contains(&district.district_id)
        };
        let free = |c: &&lineguard_protos::routing::v1::Crew| -> Result<bool, RouterError> {
            Ok(match self.availability(&c.crew_id)? {
                Some(a) => self.unavailable_reason(&a, now).is_none(),
                None => true,
            })
        };
        for want_serving in [true, false] {
            for crew in crews.iter().filter(|c| !want_serving || serves(c)) {
                if free(&crew)? {
                    return Ok(crew.crew_id.clone());
                }
            }
        }
        Ok(crews
            .iter()
            .find(serves)
            .or(crews.first())
            .map(|c| c.crew_id.clone())
            .unwrap_or_default())
    }

    /// The first route of a new ticket or incident (through its lead).
    pub fn first_route(
        &self,
        reported: &TicketReported,
        case_id: &str,
        now: &Timestamp,
    ) -> Result<TicketRouted, RouterError> {
        let version = self
            .current_policy_version()?
            .ok_or_else(|| RouterError::Precondition("no time-limit policy adopted yet".into()))?;
        let policy = self.policy(&version)?;
        let district = self.locate(&reported.district_id, &reported.account_number)?;
        let place = self.place(district)?;
        let choice = self.choose(&place, 1, now)?;
        let kind = reported.kind();
        let sub_type = reported.service_request_type();
        let area = place
            .district
            .as_ref()
            .map_or(AreaClass::Urban, District::area_class);
        let reported_at = reported.reported_at.unwrap_or(*now);
        let (deadlines, limits) = policy.clocks(
            kind,
            sub_type,
            area,
            &reported_at,
            now,
            &self.config.calendar,
        );
        let field_work = policy.limits(kind, sub_type).field_work;
        let (reason, detail) = if place.district.is_none() {
            (
                RouteReason::DistrictUnknown,
                "neither the district nor the account is in the directory".to_string(),
            )
        } else if choice.passed_over.is_empty() {
            (RouteReason::DistrictOwner, String::new())
        } else {
            (RouteReason::OwnerUnavailable, choice.passed_over.join("; "))
        };
        self.routed(RouteSpec {
            case_id,
            lead_ticket_id: &reported.ticket_id,
            incident_id: &reported.incident_id,
            kind,
            sub_type,
            channel: reported.channel,
            place: &place,
            area,
            policy: &policy,
            choice,
            hop: 1,
            reason,
            detail,
            reported_at,
            now,
            deadlines,
            limits,
            field_work,
            previous_assignee: String::new(),
        })
    }

    /// The next hop of a case already routed: from `from_line` up, in
    /// `district` (the case's own unless a return named another).
    pub fn next_hop(
        &self,
        route: &RouteView,
        district: Option<District>,
        from_line: u32,
        reason: RouteReason,
        detail: String,
        now: &Timestamp,
    ) -> Result<TicketRouted, RouterError> {
        let policy = self.policy(&route.policy_version)?;
        let place = self.place(district)?;
        let choice = self.choose(&place, from_line, now)?;
        let area = place
            .district
            .as_ref()
            .map_or(route.area_class(), District::area_class);
        let kind = route.kind();
        let sub_type = route.service_request_type();
        let acceptance = policy.limits(kind, sub_type).acceptance.get(area);
        let mut deadlines = route.deadlines.clone();
        for d in deadlines.iter_mut().filter(|d| d.clock == ACCEPTANCE) {
            d.due_at = Some(acceptance.after(now, &self.config.calendar));
        }
        let detail = if choice.passed_over.is_empty() {
            detail
        } else {
            format!("{detail}; passed over: {}", choice.passed_over.join("; "))
        };
        self.routed(RouteSpec {
            case_id: &route.case_id,
            lead_ticket_id: &route.lead_ticket_id,
            incident_id: &route.incident_id,
            kind,
            sub_type,
            channel: route.channel,
            place: &place,
            area,
            policy: &policy,
            choice,
            hop: route.hop + 1,
            reason,
            detail,
            reported_at: route.reported_at.unwrap_or(*now),
            now,
            deadlines,
            limits: route.limits.clone(),
            field_work: route.field_work,
            previous_assignee: route.assignee_id.clone(),
        })
    }

    /// A dissatisfied customer reopened a resolved case: back to the owner
    /// of its district (or the next line that can take it now), hop + 1,
    /// with every clock running again from now under the case's policy.
    pub fn reopened(
        &self,
        route: &RouteView,
        reason: &str,
        now: &Timestamp,
    ) -> Result<TicketRouted, RouterError> {
        let district = if route.district_id.is_empty() {
            None
        } else {
            self.directory.district(&route.district_id)?
        };
        let mut routed = self.next_hop(
            route,
            district,
            1,
            RouteReason::Reopened,
            format!("reopened: {reason}"),
            now,
        )?;
        let policy = self.policy(&route.policy_version)?;
        let (deadlines, _) = policy.clocks(
            route.kind(),
            route.service_request_type(),
            routed.area_class(),
            now,
            now,
            &self.config.calendar,
        );
        routed.acceptance_due_at = deadlines
            .iter()
            .find(|d| d.clock == ACCEPTANCE)
            .and_then(|d| d.due_at);
        routed.deadlines = deadlines;
        Ok(routed)
    }

    /// A holder hands a case back: the return, then the next hop in the
    /// right district (`correct`) or the close with the reason. Returns the
    /// events and the route as it will stand.
    pub fn returned(
        &self,
        route: &RouteView,
        who: lineguard_eventlog::Actor,
        reason: ReturnReason,
        correct: Option<District>,
        note: &str,
        at: &Timestamp,
    ) -> Result<(Vec<NewEvent>, RouteView), RouterError> {
        let returned = TicketReturned {
            case_id: route.case_id.clone(),
            assignee_id: who.id.clone(),
            reason: reason as i32,
            correct_district_id: correct
                .as_ref()
                .map(|d| d.district_id.clone())
                .unwrap_or_default(),
            note: note.to_string(),
            returned_at: Some(*at),
        };
        let returned = NewEvent::new(&returned, &route.case_id, who.clone());
        let cause = returned.event_id.to_string();
        let mut view = route.clone();
        let next = match correct {
            Some(district) => {
                if district.district_id == route.district_id {
                    return Err(RouterError::Invalid {
                        field: "correct_district_id",
                        reason: "is the ticket's district already".into(),
                    });
                }
                let detail = format!(
                    "returned by {}: belongs to {}",
                    who.id, district.district_id
                );
                let routed = self.next_hop(
                    route,
                    Some(district),
                    1,
                    RouteReason::ReturnedWrongDistrict,
                    detail,
                    at,
                )?;
                apply_routed(&mut view, &routed);
                NewEvent::new(&routed, &route.case_id, who).caused_by(cause)
            }
            None => {
                let why = match reason {
                    ReturnReason::CustomerSideFault => "returned: customer-side fault",
                    _ => "returned: not ours",
                };
                let closed = TicketRoutingClosed {
                    case_id: route.case_id.clone(),
                    reason: why.to_string(),
                    closed_at: Some(*at),
                    hop: route.hop,
                };
                view.status = RouteStatus::Closed as i32;
                view.closed_reason = why.to_string();
                NewEvent::new(&closed, &route.case_id, who).caused_by(cause)
            }
        };
        Ok((vec![returned, next], view))
    }

    fn routed(&self, s: RouteSpec<'_>) -> Result<TicketRouted, RouterError> {
        let crew_id = if s.field_work {
            self.crew_for(s.place, s.now)?
        } else {
            String::new()
        };
        let acceptance_due_at = s
            .deadlines
            .iter()
            .find(|d| d.clock == ACCEPTANCE)
            .and_then(|d| d.due_at);
        let district = s.place.district.clone().unwrap_or_default();
        Ok(TicketRouted {
            case_id: s.case_id.to_string(),
            lead_ticket_id: s.lead_ticket_id.to_string(),
            incident_id: s.incident_id.to_string(),
            kind: s.kind as i32,
            service_request_type: s.sub_type as i32,
            channel: s.channel,
            district_id: district.district_id,
            station_id: s.place.station_id.clone(),
            company_id: s
                .place
                .company
                .as_ref()
                .map(|c| c.company_id.clone())
                .unwrap_or_default(),
            area_class: s.area as i32,
            policy_version: s.policy.version.clone(),
            line: s.choice.line,
            assignee_id: s.choice.assignee_id,
            assignee_role: s.choice.role as i32,
            crew_id,
            hop: s.hop,
            reason: s.reason as i32,
            reason_detail: s.detail,
            reported_at: Some(s.reported_at),
            routed_at: Some(*s.now),
            waiting_seconds: seconds_between(&s.reported_at, s.now),
            acceptance_due_at,
            deadlines: s.deadlines,
            limits: s.limits,
            field_work: s.field_work,
            previous_assignee_id: s.previous_assignee,
            households: district.households,
            warn_at_percent: s.policy.warn_at_percent.clone(),
        })
    }
}

struct RouteSpec<'a> {
    case_id: &'a str,
    lead_ticket_id: &'a str,
    incident_id: &'a str,
    kind: TicketKind,
    sub_type: ServiceRequestType,
    channel: i32,
    place: &'a Place,
    area: AreaClass,
    policy: &'a Policy,
    choice: Choice,
    hop: u32,
    reason: RouteReason,
    detail: String,
    reported_at: Timestamp,
    now: &'a Timestamp,
    deadlines: Vec<lineguard_protos::routing::v1::Deadline>,
    limits: Vec<lineguard_protos::routing::v1::ClockLimit>,
    field_work: bool,
    previous_assignee: String,
}
