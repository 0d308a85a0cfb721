//! A scripted quarter-day of 240 tickets across three stations, delivered to
//! feedback as intake, routing and dispatch publish them: late and on-time
//! arrivals and restorations, escalations (two complaints past the station),
//! managers passed over, returns, incidents with children, reopens at
//! follow-up, complaint tickets and filed complaints (repeats among them),
//! praise tickets and recorded praise.
//!
//! The expected figures are computed here from the scenario's own data, by
//! the definitions in `scorecard.rs`, and must match the service's for every
//! metric of every manager, crew, station and the company. Then the
//! projections are dropped and rebuilt from the log: the same figures, the
//! same digest.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use lineguard_bus::{Applied, apply_event};
use lineguard_eventlog::{EventEnvelope, EventLog, LogConfig};
use lineguard_feedback::api::FeedbackService;
use lineguard_feedback::consumers::{FROM_DISPATCH, FROM_INTAKE, FROM_ROUTING, Observer};
use lineguard_feedback::followups::Feedback;
use lineguard_feedback::projection::FeedbackProjector;
use lineguard_feedback::rules::Rules;
use lineguard_feedback::scorecard;
use lineguard_protos::dispatch::v1::{ClockAlerted, CrewArrived, PowerRestored, WorkCompleted};
use lineguard_protos::feedback::v1::feedback_server::Feedback as _;
use lineguard_protos::feedback::v1::{
    ExportScorecardsRequest, FileComplaintRequest, FollowUpStatus, GetScorecardRequest, Level,
    ListDueFollowUpsRequest, Metric, Period, RankingsRequest, RecordFollowUpRequest,
    RecordPraiseRequest, Scorecard, Subject,
};
use lineguard_protos::intake::v1::{Channel, TicketKind, TicketReported};
use lineguard_protos::routing::v1::{
    AssigneeRole, ClockBreached, Company, CompanyDefined, Crew, CrewDefined, District,
    DistrictDefined, Manager, ManagerDefined, RouteReason, Station, StationDefined, TicketAccepted,
    TicketAnswered, TicketReturned, TicketRouted,
};
use prost::{Message, Name};
use prost_types::Timestamp;
use tokio_stream::StreamExt;
use tonic::{Code, Request};

const COMPANY: &str = "co-test";
const STATIONS: [&str; 3] = ["st-a", "st-b", "st-c"];
const TICKETS: usize = 240;
const CHANNELS: [Channel; 7] = [
    Channel::Hotline95598,
    Channel::StationPhone,
    Channel::StationCounter,
    Channel::ManagerPhone,
    Channel::App,
    Channel::Wechat,
    Channel::Web,
];

fn open_log(dir: &Path) -> EventLog {
    EventLog::open(
        LogConfig::new(dir.join("log"), "feedback")
            .with_event_types(lineguard_feedback::event_types())
            .with_projector(Arc::new(FeedbackProjector)),
    )
    .expect("open log")
}

fn ts(seconds: i64) -> Timestamp {
    Timestamp { seconds, nanos: 0 }
}

fn now_seconds() -> i64 {
    Timestamp::from(std::time::SystemTime::now()).seconds
}

/// Delivers events as the three consumers would, numbering them.
struct Bus {
    feedback: Feedback,
    next: u64,
}

impl Bus {
    async fn deliver<M: Message + Name>(
        &mut self,
        source: &str,
        m: &M,
        correlation: &str,
        at: i64,
    ) {
        self.next += 1;
        let event = EventEnvelope {
            event_id: format!("evt-{source}-{}", self.next),
            stream_id: correlation.into(),
            stream_version: 1,
            global_position: self.next,
            recorded_at: Some(ts(at)),
            correlation_id: correlation.into(),
            event_type: M::full_name(),
            schema_version: 1,
            payload: Bytes::from(m.encode_to_vec()),
            source: source.into(),
            ..EventEnvelope::default()
        };
        let consumer = match source {
            "intake" => FROM_INTAKE,
            "routing" => FROM_ROUTING,
            _ => FROM_DISPATCH,
        };
        let applied = apply_event(
            self.feedback.log(),
            consumer,
            &Observer(self.feedback.clone()),
            &event,
            3,
        )
        .await
        .expect("handled");
        assert_eq!(applied, Applied::Committed, "{}", M::full_name());
    }
}

// ---- The scenario's own data ----

struct DistrictPlan {
    id: String,
    station: &'static str,
    manager: String,
    crew: String,
    households: u32,
}

#[derive(Debug, Clone)]
struct TicketPlan {
    id: String,
    case: String,
    kind: TicketKind,
    channel: Channel,
    district: usize,
    account: String,
    reported: i64,
    /// Follow-ups recorded: satisfied or not.
    verdicts: Vec<bool>,
}

#[derive(Debug, Clone, Default)]
struct CasePlan {
    id: String,
    lead: String,
    tickets: Vec<String>,
    district: usize,
    reported: i64,
    field: bool,
    managers: Vec<String>,
    crews: Vec<String>,
    hops: u32,
    escalated_to_company: bool,
    accepted_at: Option<i64>,
    acceptance_breached: bool,
    arrived: Option<bool>,
    arrival_breached: bool,
    restored: Option<bool>,
    restoration_breached: bool,
    resolved: bool,
    returns: u32,
    reopens: u32,
}

struct ComplaintPlan {
    at_is_ticket: bool,
    against: Vec<(Level, String)>,
    repeat: bool,
    escalated: bool,
}

fn districts() -> Vec<DistrictPlan> {
    let mut out = Vec::new();
    for (s, station) in STATIONS.iter().enumerate() {
        for d in 0..4 {
            out.push(DistrictPlan {
                id: format!("d-{station}-{d}"),
                station,
                manager: format!("m-{station}-{}", d / 2 + 1),
                crew: format!("crew-{station}-{}", d / 2 + 1),
                households: 100 + 37 * (s as u32 * 4 + d as u32),
            });
        }
    }
    out
}

async fn define_directory(bus: &mut Bus, plan: &[DistrictPlan], at: i64) {
    bus.deliver(
        "routing",
        &CompanyDefined {
            company: Some(Company {
                company_id: COMPANY.into(),
                name: "Test County".into(),
                supervisor_desk_id: "desk-co-test".into(),
                supervision_phone: String::new(),
            }),
        },
        "directory",
        at,
    )
    .await;
    for station in STATIONS {
        bus.deliver(
            "routing",
            &StationDefined {
                station: Some(Station {
                    station_id: station.into(),
                    company_id: COMPANY.into(),
                    name: station.into(),
                    duty_desk_id: format!("desk-{station}"),
                    duty_phone: String::new(),
                }),
            },
            "directory",
            at,
        )
        .await;
        for m in 1..=2 {
            bus.deliver(
                "routing",
                &ManagerDefined {
                    manager: Some(Manager {
                        manager_id: format!("m-{station}-{m}"),
                        station_id: station.into(),
                        name: "Manager".into(),
                        phone: String::new(),
                    }),
                },
                "directory",
                at,
            )
            .await;
            bus.deliver(
                "routing",
                &CrewDefined {
                    crew: Some(Crew {
                        crew_id: format!("crew-{station}-{m}"),
                        station_id: station.into(),
                        members: vec!["a".into()],
                        district_ids: plan
                            .iter()
                            .filter(|d| d.crew == format!("crew-{station}-{m}"))
                            .map(|d| d.id.clone())
                            .collect(),
                    }),
                },
                "directory",
                at,
            )
            .await;
        }
    }
    for d in plan {
        bus.deliver(
            "routing",
            &DistrictDefined {
                district: Some(District {
                    district_id: d.id.clone(),
                    station_id: d.station.into(),
                    name: d.id.clone(),
                    area_class: 1,
                    households: d.households,
                    manager_id: d.manager.clone(),
                }),
            },
            "directory",
            at,
        )
        .await;
    }
}

#[allow(clippy::too_many_arguments)]
fn route(
    case: &CasePlan,
    d: &DistrictPlan,
    kind: TicketKind,
    hop: u32,
    line: u32,
    reason: RouteReason,
    at: i64,
) -> TicketRouted {
    let (assignee, role) = match line {
        1 => (d.manager.clone(), AssigneeRole::DistrictManager),
        2 => (format!("desk-{}", d.station), AssigneeRole::StationDesk),
        _ => ("desk-co-test".to_string(), AssigneeRole::CompanyDesk),
    };
    TicketRouted {
        case_id: case.id.clone(),
        lead_ticket_id: case.lead.clone(),
        incident_id: if case.id.starts_with("incident") {
            case.id.clone()
        } else {
            String::new()
        },
        kind: kind as i32,
        district_id: d.id.clone(),
        station_id: d.station.into(),
        company_id: COMPANY.into(),
        line,
        assignee_id: assignee,
        assignee_role: role as i32,
        crew_id: if case.field {
            d.crew.clone()
        } else {
            String::new()
        },
        hop,
        reason: reason as i32,
        reported_at: Some(ts(case.reported)),
        routed_at: Some(ts(at)),
        field_work: case.field,
        ..TicketRouted::default()
    }
}

struct Scenario {
    districts: Vec<DistrictPlan>,
    tickets: Vec<TicketPlan>,
    cases: BTreeMap<String, CasePlan>,
    complaints: Vec<ComplaintPlan>,
    praise: Vec<Vec<(Level, String)>>,
}

fn owners(d: &DistrictPlan) -> Vec<(Level, String)> {
    vec![
        (Level::Manager, d.manager.clone()),
        (Level::Station, d.station.to_string()),
        (Level::Company, COMPANY.to_string()),
    ]
}

/// Plays the scenario into feedback and returns what it did.
async fn play(bus: &mut Bus, api: &FeedbackService, base: i64) -> Scenario {
    let plan = districts();
    define_directory(bus, &plan, base - 3_600).await;
    let mut tickets: Vec<TicketPlan> = Vec::new();
    let mut cases: BTreeMap<String, CasePlan> = BTreeMap::new();
    let mut complaints = Vec::new();
    let mut last_complaint: HashMap<String, ()> = HashMap::new();
    let mut praise = Vec::new();
    let mut current_incident: Option<String> = None;

    // ---- Reports, routes and the work, one ticket at a time ----
    for i in 0..TICKETS {
        let d = i % plan.len();
        let district = &plan[d];
        let kind = match i % 10 {
            7 => TicketKind::Complaint,
            8 => TicketKind::Praise,
            9 => TicketKind::Inquiry,
            _ => TicketKind::FaultRepair,
        };
        let reported = base + i as i64 * 60;
        let id = format!("ticket-{i:03}");
        // A fault report every 24 tickets leads an incident; the fault
        // report 12 tickets later is in the same district and joins it.
        let leads = i % 24 == 0 && kind == TicketKind::FaultRepair;
        let child_of = match &current_incident {
            Some(incident) if i % 24 == 12 && kind == TicketKind::FaultRepair => {
                Some(incident.clone())
            }
            _ => None,
        };
        let account = format!("acct-{}", i % 53);
        let ticket = TicketPlan {
            id: id.clone(),
            case: if leads {
                format!("incident-{i:03}")
            } else if let Some(inc) = &child_of {
                inc.clone()
            } else {
                id.clone()
            },
            kind,
            channel: CHANNELS[i % CHANNELS.len()],
            district: d,
            account: account.clone(),
            reported,
            verdicts: Vec::new(),
        };
        bus.deliver(
            "intake",
            &TicketReported {
                ticket_id: id.clone(),
                channel: ticket.channel as i32,
                kind: kind as i32,
                account_number: account.clone(),
                district_id: district.id.clone(),
                reported_at: Some(ts(reported)),
                incident_id: if leads || child_of.is_some() {
                    ticket.case.clone()
                } else {
                    String::new()
                },
                incident_lead: leads,
                ..TicketReported::default()
            },
            &id,
            reported,
        )
        .await;
        if kind == TicketKind::Complaint {
            complaints.push(ComplaintPlan {
                at_is_ticket: true,
                against: owners(district),
                repeat: last_complaint.insert(account.clone(), ()).is_some(),
                escalated: false,
            });
        }
        if kind == TicketKind::Praise {
            praise.push(owners(district));
        }
        tickets.push(ticket.clone());
        if i % 24 == 0 {
            current_incident = leads.then(|| ticket.case.clone());
        }
        if let Some(incident) = child_of {
            if let Some(case) = cases.get_mut(&incident) {
                case.tickets.push(id.clone());
            }
            continue;
        }
        let c = cases.len();
        let mut case = CasePlan {
            id: ticket.case.clone(),
            lead: id.clone(),
            tickets: vec![id.clone()],
            district: d,
            reported,
            field: kind == TicketKind::FaultRepair,
            ..CasePlan::default()
        };
        // Hop 1: the manager, or the station desk when the manager is away.
        let mut t = reported + 5;
        let mut line = if c % 13 == 6 { 2 } else { 1 };
        let reason = if line == 1 {
            RouteReason::DistrictOwner
        } else {
            RouteReason::OwnerUnavailable
        };
        case.hops = 1;
        bus.deliver(
            "routing",
            &route(&case, district, kind, 1, line, reason, t),
            &case.id,
            t,
        )
        .await;
        if line == 1 {
            case.managers.push(district.manager.clone());
        }
        if case.field {
            case.crews.push(district.crew.clone());
        }
        // Escalations: nobody accepts in time.
        let escalations = if kind == TicketKind::Complaint && c.is_multiple_of(3) {
            2
        } else if c % 9 == 4 {
            1
        } else {
            0
        };
        for _ in 0..escalations {
            if line >= 3 {
                break;
            }
            t += 300;
            bus.deliver(
                "routing",
                &ClockBreached {
                    case_id: case.id.clone(),
                    clock: "acceptance".into(),
                    breached_at: Some(ts(t)),
                    line,
                    ..ClockBreached::default()
                },
                &case.id,
                t,
            )
            .await;
            case.acceptance_breached = true;
            line += 1;
            case.hops += 1;
            bus.deliver(
                "routing",
                &route(
                    &case,
                    district,
                    kind,
                    case.hops,
                    line,
                    RouteReason::Escalated,
                    t,
                ),
                &case.id,
                t,
            )
            .await;
            if line == 3 {
                case.escalated_to_company = true;
            }
        }
        // Accepted.
        t += 60 + (c as i64 % 5) * 30;
        bus.deliver(
            "routing",
            &TicketAccepted {
                case_id: case.id.clone(),
                line,
                hop: case.hops,
                accepted_at: Some(ts(t)),
                on_time: escalations == 0,
                ..TicketAccepted::default()
            },
            &case.id,
            t,
        )
        .await;
        case.accepted_at = Some(t);
        // A return to the same owner (the crew named a wrong address).
        if c % 11 == 10 {
            t += 30;
            bus.deliver(
                "routing",
                &TicketReturned {
                    case_id: case.id.clone(),
                    returned_at: Some(ts(t)),
                    ..TicketReturned::default()
                },
                &case.id,
                t,
            )
            .await;
            case.returns += 1;
            case.hops += 1;
            bus.deliver(
                "routing",
                &route(
                    &case,
                    district,
                    kind,
                    case.hops,
                    line,
                    RouteReason::ReturnedWrongDistrict,
                    t,
                ),
                &case.id,
                t,
            )
            .await;
        }
        if case.field {
            if c % 17 == 16 {
                // Never reached in the scenario: only the breach.
                bus.deliver(
                    "dispatch",
                    &ClockAlerted {
                        order_id: case.id.clone(),
                        crew_id: district.crew.clone(),
                        clock: "arrival".into(),
                        percent: 100,
                        breached: true,
                        ..ClockAlerted::default()
                    },
                    &case.id,
                    t + 2_700,
                )
                .await;
                case.arrival_breached = true;
                cases.insert(case.id.clone(), case);
                continue;
            }
            let late = c % 4 == 3;
            if late && c % 8 == 3 {
                bus.deliver(
                    "dispatch",
                    &ClockAlerted {
                        order_id: case.id.clone(),
                        crew_id: district.crew.clone(),
                        clock: "arrival".into(),
                        percent: 100,
                        breached: true,
                        ..ClockAlerted::default()
                    },
                    &case.id,
                    t + 2_700,
                )
                .await;
                case.arrival_breached = true;
            }
            t += if late { 3_600 } else { 1_200 };
            bus.deliver(
                "dispatch",
                &CrewArrived {
                    order_id: case.id.clone(),
                    crew_id: district.crew.clone(),
                    on_time: !late,
                    ..CrewArrived::default()
                },
                &case.id,
                t,
            )
            .await;
            case.arrived = Some(!late);
            let slow = c % 6 == 5;
            t += if slow { 14_400 } else { 5_000 };
            bus.deliver(
                "dispatch",
                &PowerRestored {
                    order_id: case.id.clone(),
                    crew_id: district.crew.clone(),
                    on_time: !slow,
                    ticket_ids: case.tickets.clone(),
                    ..PowerRestored::default()
                },
                &case.id,
                t,
            )
            .await;
            case.restored = Some(!slow);
        }
        cases.insert(case.id.clone(), case);
    }
    // Children joined after their incident's route: complete incidents now,
    // and every other field case, so that each covered ticket is followed up.
    for case in cases.values_mut() {
        let district = &plan[case.district];
        let t = case.reported + 30_000;
        if case.field && case.restored.is_some() {
            bus.deliver(
                "dispatch",
                &WorkCompleted {
                    order_id: case.id.clone(),
                    crew_id: district.crew.clone(),
                    ticket_ids: case.tickets.clone(),
                    ..WorkCompleted::default()
                },
                &case.id,
                t,
            )
            .await;
            case.resolved = true;
        } else if !case.field {
            bus.deliver(
                "routing",
                &TicketAnswered {
                    case_id: case.id.clone(),
                    answered_at: Some(ts(t)),
                    ..TicketAnswered::default()
                },
                &case.id,
                t,
            )
            .await;
            case.resolved = true;
        }
    }
    // Complaint tickets escalated to the company count as such.
    let complaint_tickets = tickets.iter().filter(|t| t.kind == TicketKind::Complaint);
    for (complaint, t) in complaints.iter_mut().zip(complaint_tickets) {
        complaint.escalated = cases[&t.case].escalated_to_company;
    }

    // ---- Follow-ups: the consumer made one due for every resolved ticket ----
    let due = list_all_due(api).await;
    let resolved_tickets: Vec<&TicketPlan> =
        tickets.iter().filter(|t| cases[&t.case].resolved).collect();
    assert_eq!(
        due.len(),
        resolved_tickets.len(),
        "a follow-up per resolved ticket"
    );
    let mut reopened_cases: Vec<String> = Vec::new();
    let mut reopening = 0;
    for (n, t) in tickets.clone().iter().enumerate() {
        if !cases[&t.case].resolved || n % 9 == 5 {
            continue; // not resolved, or not called yet
        }
        let satisfied = n % 7 != 3;
        let reopen = !satisfied && n % 2 == 1 && cases[&t.case].field;
        let answer = api
            .record_follow_up(Request::new(RecordFollowUpRequest {
                ticket_id: t.id.clone(),
                satisfied,
                score: if satisfied { 5 } else { 2 },
                comment: "called back".into(),
                recorded_by: "agent-7".into(),
                reopen,
                idempotency_key: format!("fu-{}", t.id),
            }))
            .await
            .expect("follow-up recorded")
            .into_inner();
        assert_eq!(answer.reopened, reopen);
        reopening += usize::from(reopen);
        tickets[n].verdicts.push(satisfied);
        if reopen && !reopened_cases.contains(&t.case) {
            reopened_cases.push(t.case.clone());
        }
    }
    // Routing sends each reopened case back to its owner (hop + 1); the
    // crew goes again and completes; the reopening customers are satisfied.
    for case_id in &reopened_cases {
        let case = cases.get_mut(case_id).expect("case");
        let district = &plan[case.district];
        let t = case.reported + 60_000;
        case.hops += 1;
        case.reopens += 1;
        case.resolved = false;
        let line = 1;
        let routed = route(
            case,
            district,
            TicketKind::FaultRepair,
            case.hops,
            line,
            RouteReason::Reopened,
            t,
        );
        bus.deliver("routing", &routed, case_id, t).await;
        push_unique(&mut case.managers, &district.manager);
        bus.deliver(
            "dispatch",
            &WorkCompleted {
                order_id: case.id.clone(),
                crew_id: district.crew.clone(),
                ticket_ids: case.tickets.clone(),
                ..WorkCompleted::default()
            },
            case_id,
            t + 7_200,
        )
        .await;
        case.resolved = true;
    }
    // Due now: the reopening tickets' second follow-ups, and the calls
    // never made.
    let again = list_all_due(api).await;
    let never_called = tickets
        .iter()
        .enumerate()
        .filter(|(n, t)| cases[&t.case].resolved && n % 9 == 5)
        .count();
    assert_eq!(
        again.len(),
        never_called + reopening,
        "follow-ups due again"
    );
    for t in tickets.iter_mut() {
        let was_reopened = t.verdicts == vec![false]
            && reopened_cases.contains(&t.case)
            && again.iter().any(|f| f.ticket_id == t.id);
        if was_reopened {
            api.record_follow_up(Request::new(RecordFollowUpRequest {
                ticket_id: t.id.clone(),
                satisfied: true,
                score: 4,
                recorded_by: "agent-7".into(),
                idempotency_key: format!("fu2-{}", t.id),
                ..RecordFollowUpRequest::default()
            }))
            .await
            .expect("second follow-up");
            t.verdicts.push(true);
        }
    }

    // ---- Complaints filed and praise recorded over the API ----
    for n in 0..15usize {
        let t = &tickets[(n * 17) % TICKETS];
        let case = &cases[&t.case];
        let by_worker = n % 3 == 0;
        let district = &plan[t.district];
        let account = if n % 4 == 0 {
            t.account.clone()
        } else {
            format!("acct-filed-{n}")
        };
        let req = FileComplaintRequest {
            idempotency_key: format!("complaint-{n}"),
            ticket_id: if by_worker {
                String::new()
            } else {
                t.id.clone()
            },
            worker_id: if by_worker {
                if n % 2 == 0 {
                    district.crew.clone()
                } else {
                    district.manager.clone()
                }
            } else {
                String::new()
            },
            account_number: account.clone(),
            channel: Channel::Hotline95598 as i32,
            description: "The repair took too long".into(),
        };
        let answer = api
            .file_complaint(Request::new(req.clone()))
            .await
            .expect("complaint")
            .into_inner();
        // A retry gives the same answer and files nothing more.
        let retry = api
            .file_complaint(Request::new(req))
            .await
            .expect("retry")
            .into_inner();
        assert_eq!(retry, answer);
        let mut against: Vec<(Level, String)> = Vec::new();
        if by_worker {
            let level = if n % 2 == 0 {
                Level::Crew
            } else {
                Level::Manager
            };
            let id = if n % 2 == 0 {
                &district.crew
            } else {
                &district.manager
            };
            against.push((level, id.clone()));
        } else {
            against.extend(case.managers.iter().map(|m| (Level::Manager, m.clone())));
            against.extend(case.crews.iter().map(|c| (Level::Crew, c.clone())));
        }
        against.push((Level::Station, district.station.to_string()));
        against.push((Level::Company, COMPANY.to_string()));
        let repeat = last_complaint.insert(account, ()).is_some();
        assert_eq!(answer.repeat, repeat, "complaint {n}");
        complaints.push(ComplaintPlan {
            at_is_ticket: false,
            against,
            repeat,
            escalated: false,
        });
    }
    for n in 0..12usize {
        let district = &plan[(n * 5) % plan.len()];
        let (level, id) = match n % 3 {
            0 => (Level::Manager, district.manager.clone()),
            1 => (Level::Crew, district.crew.clone()),
            _ => (Level::Station, district.station.to_string()),
        };
        api.record_praise(Request::new(RecordPraiseRequest {
            idempotency_key: format!("praise-{n}"),
            credited_to: Some(Subject {
                level: level as i32,
                id: id.clone(),
            }),
            text: "Came at midnight in the rain".into(),
            ..RecordPraiseRequest::default()
        }))
        .await
        .expect("praise");
        let mut credited = vec![(level, id)];
        if level != Level::Station {
            credited.push((Level::Station, district.station.to_string()));
        }
        credited.push((Level::Company, COMPANY.to_string()));
        praise.push(credited);
    }
    Scenario {
        districts: plan,
        tickets,
        cases,
        complaints,
        praise,
    }
}

fn push_unique(list: &mut Vec<String>, id: &str) {
    if !list.iter().any(|x| x == id) {
        list.push(id.to_string());
    }
}

async fn list_all_due(api: &FeedbackService) -> Vec<lineguard_protos::feedback::v1::FollowUpView> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = api
            .list_due_follow_ups(Request::new(ListDueFollowUpsRequest {
                page_size: 50,
                page_token: token,
                ..ListDueFollowUpsRequest::default()
            }))
            .await
            .expect("list")
            .into_inner();
        out.extend(page.follow_ups);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

// ---- The expected figures, from the scenario alone ----

#[derive(Debug, Default, Clone, PartialEq)]
struct Expected {
    tickets: u64,
    cases: u64,
    acceptance: (u64, u64),
    arrival: (u64, u64),
    restoration: (u64, u64),
    hops: Vec<u32>,
    waiting: BTreeMap<i32, Vec<f64>>,
    satisfaction: (u64, u64),
    complaints: u64,
    households: u64,
    repeat: u64,
    escalated: u64,
    first_time_fix: (u64, u64),
    praise: u64,
}

fn count(rate: &mut (u64, u64), judged: bool, met: bool) {
    if judged {
        rate.1 += 1;
        rate.0 += u64::from(met);
    }
}

fn expected(s: &Scenario) -> BTreeMap<(i32, String), Expected> {
    let mut out: BTreeMap<(i32, String), Expected> = BTreeMap::new();
    let k = |l: Level, id: &str| (l as i32, id.to_string());
    for d in &s.districts {
        for key in [
            k(Level::Manager, &d.manager),
            k(Level::Station, d.station),
            k(Level::Company, COMPANY),
        ] {
            out.entry(key).or_default().households += u64::from(d.households);
        }
        out.entry(k(Level::Crew, &d.crew)).or_default().households += u64::from(d.households);
    }
    let subjects = |c: &CasePlan| {
        let d = &s.districts[c.district];
        let mut v = vec![k(Level::Company, COMPANY), k(Level::Station, d.station)];
        v.extend(c.managers.iter().map(|m| k(Level::Manager, m)));
        v.extend(c.crews.iter().map(|m| k(Level::Crew, m)));
        v
    };
    for t in &s.tickets {
        let c = &s.cases[&t.case];
        for key in subjects(c) {
            let e = out.entry(key).or_default();
            e.tickets += 1;
            e.satisfaction.1 += t.verdicts.len() as u64;
            e.satisfaction.0 += t.verdicts.iter().filter(|v| **v).count() as u64;
            if let Some(accepted) = c.accepted_at {
                e.waiting
                    .entry(t.channel as i32)
                    .or_default()
                    .push((accepted - t.reported).max(0) as f64);
            }
        }
    }
    for c in s.cases.values() {
        for key in subjects(c) {
            let e = out.entry(key).or_default();
            e.cases += 1;
            count(&mut e.acceptance, true, !c.acceptance_breached);
            count(
                &mut e.arrival,
                c.arrived.is_some() || c.arrival_breached,
                c.arrived == Some(true) && !c.arrival_breached,
            );
            count(
                &mut e.restoration,
                c.restored.is_some() || c.restoration_breached,
                c.restored == Some(true) && !c.restoration_breached,
            );
            count(
                &mut e.first_time_fix,
                c.resolved,
                c.returns == 0 && c.reopens == 0,
            );
            e.hops.push(c.hops);
        }
    }
    for c in &s.complaints {
        for (level, id) in &c.against {
            let e = out.entry(k(*level, id)).or_default();
            e.complaints += 1;
            e.repeat += u64::from(c.repeat);
            e.escalated += u64::from(c.at_is_ticket && c.escalated);
        }
    }
    for credited in &s.praise {
        for (level, id) in credited {
            out.entry(k(*level, id)).or_default().praise += 1;
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

fn check(card: &Scorecard, e: &Expected, who: &str) {
    let rate = |r: &Option<lineguard_protos::feedback::v1::Rate>| {
        let r = r.unwrap_or_default();
        (r.met, r.total)
    };
    assert_eq!(card.tickets_handled, e.tickets, "{who}: tickets handled");
    assert_eq!(card.cases, e.cases, "{who}: cases");
    assert_eq!(
        rate(&card.on_time_acceptance),
        e.acceptance,
        "{who}: acceptance"
    );
    assert_eq!(rate(&card.on_time_arrival), e.arrival, "{who}: arrival");
    assert_eq!(
        rate(&card.on_time_restoration),
        e.restoration,
        "{who}: restoration"
    );
    assert_eq!(
        rate(&card.follow_up_satisfaction),
        e.satisfaction,
        "{who}: satisfaction"
    );
    assert_eq!(
        rate(&card.first_time_fix),
        e.first_time_fix,
        "{who}: first-time fix"
    );
    let mut hops = e.hops.clone();
    hops.sort_unstable();
    let avg = if hops.is_empty() {
        0.0
    } else {
        hops.iter().sum::<u32>() as f64 / hops.len() as f64
    };
    assert!(
        close(card.average_hops, avg),
        "{who}: average hops {} vs {avg}",
        card.average_hops
    );
    let p90 = if hops.is_empty() {
        0
    } else {
        hops[((hops.len() * 9).div_ceil(10)) - 1]
    };
    assert_eq!(card.p90_hops, p90, "{who}: p90 hops");
    let all: Vec<f64> = e.waiting.values().flatten().copied().collect();
    let avg_wait = if all.is_empty() {
        0.0
    } else {
        all.iter().sum::<f64>() / all.len() as f64
    };
    assert!(
        close(card.average_waiting_seconds, avg_wait),
        "{who}: waiting {} vs {avg_wait}",
        card.average_waiting_seconds
    );
    assert_eq!(
        card.waiting_by_channel.len(),
        e.waiting.len(),
        "{who}: channels"
    );
    for w in &card.waiting_by_channel {
        let v = &e.waiting[&w.channel];
        assert_eq!(
            w.tickets,
            v.len() as u64,
            "{who}: channel {} tickets",
            w.channel
        );
        let avg = v.iter().sum::<f64>() / v.len() as f64;
        assert!(
            close(w.average_seconds, avg),
            "{who}: channel {} waiting",
            w.channel
        );
    }
    assert_eq!(card.complaints, e.complaints, "{who}: complaints");
    assert_eq!(card.households, e.households, "{who}: households");
    let per_1000 = if e.households == 0 {
        0.0
    } else {
        e.complaints as f64 * 1000.0 / e.households as f64
    };
    assert!(
        close(card.complaints_per_1000_households, per_1000),
        "{who}: per 1,000"
    );
    assert_eq!(card.repeat_complaints, e.repeat, "{who}: repeat complaints");
    assert_eq!(
        card.complaints_escalated_past_station, e.escalated,
        "{who}: escalated"
    );
    assert_eq!(card.praise, e.praise, "{who}: praise");
}

fn period(base: i64) -> Period {
    Period {
        from: Some(ts(base - 3_600)),
        to: Some(ts(now_seconds() + 3_600)),
    }
}

#[tokio::test]
async fn every_figure_of_every_scorecard_matches_the_scenario_and_survives_a_rebuild() {
    let dir = tempfile::tempdir().expect("tempdir");
    let feedback = Feedback::new(open_log(dir.path()), Rules::default());
    let api = FeedbackService::new(feedback.clone());
    let mut bus = Bus {
        feedback: feedback.clone(),
        next: 0,
    };
    let base = now_seconds() - 2 * 86_400;
    let scenario = play(&mut bus, &api, base).await;

    // The scenario has what the issue asks for.
    assert!(scenario.tickets.len() >= 200);
    let cases = scenario.cases.values();
    assert!(
        cases.clone().any(|c| c.arrived == Some(false)),
        "late arrivals"
    );
    assert!(
        cases.clone().any(|c| c.arrived == Some(true)),
        "on-time arrivals"
    );
    assert!(
        cases.clone().any(|c| c.escalated_to_company),
        "escalations past the station"
    );
    assert!(cases.clone().any(|c| c.reopens > 0), "reopens");
    assert!(cases.clone().any(|c| c.tickets.len() > 1), "incidents");
    assert!(
        scenario.complaints.iter().any(|c| c.repeat),
        "repeat complaints"
    );
    assert!(
        scenario.complaints.iter().any(|c| c.escalated),
        "escalated complaints"
    );
    assert!(!scenario.praise.is_empty());

    let want = expected(&scenario);
    let p = period(base);
    let cards = scorecard::compute(&feedback, &p).expect("scorecards");
    for level in [Level::Manager, Level::Crew, Level::Station, Level::Company] {
        let n = cards.keys().filter(|k| k.0 == level as i32).count();
        assert!(n >= 1, "{level:?} cards");
    }
    assert_eq!(cards.len(), want.len(), "one card per subject");
    for (key, e) in &want {
        let card = cards
            .get(key)
            .unwrap_or_else(|| panic!("no card for {key:?}"));
        check(card, e, &format!("{key:?}"));
        let (stars, _) = feedback.rules().stars(card);
        assert_eq!(card.stars, stars);
    }

    // The gRPC face gives the same card, and a ranking consistent with it.
    let station = api
        .get_scorecard(Request::new(GetScorecardRequest {
            subject: Some(Subject {
                level: Level::Station as i32,
                id: "st-b".into(),
            }),
            period: Some(p),
        }))
        .await
        .expect("station card")
        .into_inner();
    assert_eq!(
        Some(&station),
        cards.get(&(Level::Station as i32, "st-b".to_string()))
    );
    let ranked = api
        .rankings(Request::new(RankingsRequest {
            level: Level::Manager as i32,
            period: Some(p),
            metric: Metric::FirstTimeFix as i32,
            limit: 0,
        }))
        .await
        .expect("rankings")
        .into_inner()
        .entries;
    assert_eq!(ranked.len(), 6, "every manager judged");
    for pair in ranked.windows(2) {
        assert!(pair[0].value >= pair[1].value && pair[0].rank <= pair[1].rank);
    }

    // The CSV export: a header, then a row per card (company, stations,
    // managers, crews), each the card's figures.
    let rows: Vec<String> = api
        .export_scorecards(Request::new(ExportScorecardsRequest {
            period: Some(p),
            level: Level::Unspecified as i32,
        }))
        .await
        .expect("export")
        .into_inner()
        .map(|row| row.expect("row").line)
        .collect()
        .await;
    assert_eq!(rows.len(), cards.len() + 1);
    assert_eq!(rows[0], scorecard::csv_header());
    assert!(rows[1].starts_with("company,co-test,"), "{}", rows[1]);
    let st_b_row = scorecard::csv_row(&station);
    assert!(rows.contains(&st_b_row), "st-b's row");
    let width = rows[0].split(',').count();
    assert!(rows.iter().all(|r| r.split(',').count() == width));

    // Rebuild from the log: the same records, the same figures.
    let digest = feedback.log().projection_digest().expect("digest");
    feedback.log().rebuild_projections().await.expect("rebuild");
    assert_eq!(feedback.log().projection_digest().expect("digest"), digest);
    let rebuilt = scorecard::compute(&feedback, &p).expect("scorecards");
    assert_eq!(rebuilt, cards);

    // Those not called back go overdue once their limit passes.
    let waiting = list_all_due(&api).await;
    assert!(!waiting.is_empty());
    let later = Timestamp {
        seconds: now_seconds() + 2 * 86_400,
        nanos: 0,
    };
    let marked = feedback.mark_overdue(&later).await.expect("overdue");
    assert_eq!(marked, waiting.len());
    assert_eq!(
        feedback.mark_overdue(&later).await.expect("again"),
        0,
        "once each"
    );
    let overdue = api
        .list_due_follow_ups(Request::new(ListDueFollowUpsRequest {
            overdue_only: true,
            page_size: 1_000,
            ..ListDueFollowUpsRequest::default()
        }))
        .await
        .expect("overdue list")
        .into_inner()
        .follow_ups;
    assert_eq!(overdue.len(), waiting.len());
    assert!(
        overdue
            .iter()
            .all(|f| f.status() == FollowUpStatus::Overdue && f.overdue_at.is_some())
    );
}

#[tokio::test]
async fn bad_requests_name_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let feedback = Feedback::new(open_log(dir.path()), Rules::default());
    let api = FeedbackService::new(feedback.clone());
    let mut bus = Bus {
        feedback: feedback.clone(),
        next: 0,
    };
    let plan = districts();
    define_directory(&mut bus, &plan, now_seconds()).await;
    let head = feedback.log().head();
    let follow_up = |f: fn(&mut RecordFollowUpRequest)| {
        let mut r = RecordFollowUpRequest {
            ticket_id: "ticket-1".into(),
            satisfied: false,
            score: 2,
            recorded_by: "agent-1".into(),
            idempotency_key: "k1".into(),
            ..RecordFollowUpRequest::default()
        };
        f(&mut r);
        r
    };
    for (req, field) in [
        (follow_up(|r| r.score = 0), "score"),
        (follow_up(|r| r.score = 6), "score"),
        (follow_up(|r| r.idempotency_key.clear()), "idempotency_key"),
        (follow_up(|r| r.ticket_id = "bad id!".into()), "ticket_id"),
        (
            follow_up(|r| {
                r.satisfied = true;
                r.reopen = true;
            }),
            "reopen",
        ),
        (follow_up(|r| r.recorded_by.clear()), "recorded_by"),
    ] {
        let err = api
            .record_follow_up(Request::new(req))
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let err = api
        .record_follow_up(Request::new(follow_up(|_| {})))
        .await
        .expect_err("unknown ticket");
    assert_eq!(err.code(), Code::NotFound);

    let err = api
        .file_complaint(Request::new(FileComplaintRequest {
            idempotency_key: "c1".into(),
            worker_id: "m-nobody".into(),
            description: "rude".into(),
            ..FileComplaintRequest::default()
        }))
        .await
        .expect_err("unknown worker");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("worker_id"), "{}", err.message());
    let err = api
        .file_complaint(Request::new(FileComplaintRequest {
            idempotency_key: "c2".into(),
            description: "rude".into(),
            ..FileComplaintRequest::default()
        }))
        .await
        .expect_err("nobody named");
    assert!(err.message().contains("ticket_id"), "{}", err.message());
    let err = api
        .record_praise(Request::new(RecordPraiseRequest {
            idempotency_key: "p1".into(),
            credited_to: Some(Subject {
                level: Level::Crew as i32,
                id: "crew-nobody".into(),
            }),
            ..RecordPraiseRequest::default()
        }))
        .await
        .expect_err("unknown crew");
    assert!(
        err.message().contains("credited_to.id"),
        "{}",
        err.message()
    );
    for (p, field) in [
        (Period::default(), "period.from"),
        (
            Period {
                from: Some(ts(100)),
                to: Some(ts(50)),
            },
            "period.to",
        ),
        (
            Period {
                from: Some(ts(0)),
                to: Some(ts(500 * 86_400)),
            },
            "at most",
        ),
    ] {
        let err = api
            .get_scorecard(Request::new(GetScorecardRequest {
                subject: Some(Subject {
                    level: Level::Station as i32,
                    id: "st-a".into(),
                }),
                period: Some(p),
            }))
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    // A follow-up before the work is done is refused with the reason.
    bus.deliver(
        "intake",
        &TicketReported {
            ticket_id: "ticket-1".into(),
            kind: TicketKind::FaultRepair as i32,
            channel: Channel::App as i32,
            district_id: plan[0].id.clone(),
            reported_at: Some(ts(now_seconds())),
            ..TicketReported::default()
        },
        "ticket-1",
        now_seconds(),
    )
    .await;
    let head = head + 1;
    let err = api
        .record_follow_up(Request::new(follow_up(|_| {})))
        .await
        .expect_err("not resolved");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not completed"), "{}", err.message());
    assert_eq!(feedback.log().head(), head, "nothing written by refusals");
}
