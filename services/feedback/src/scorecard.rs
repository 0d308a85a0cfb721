//! Every figure of every scorecard, from feedback's records.
//!
//! What counts where, in a period `[from, to)`:
//!
//! - A **ticket** counts in the period it was reported in, for every
//!   subject its case is attributed to. A **case** (a ticket routed on its
//!   own, or an incident routed through its lead) counts in its lead's
//!   period and is judged once, for the same subjects.
//! - A case is **attributed** to its company and station (where it was last
//!   routed), every district manager who held it, and every crew sent to it.
//!   Tickets never routed count nowhere.
//! - **Tickets handled**: those tickets. **Cases**: those cases.
//! - **On-time acceptance**: cases accepted without an acceptance breach, of
//!   cases accepted or breached. **Arrival** and **restoration**: cases
//!   reached (restored) on time with no breach alert, of cases reached
//!   (restored) or breached. Judged on the first visit.
//! - **Hops**: a case's last hop number; average and p90 (nearest rank).
//! - **Waiting**: from a ticket's report until an owner took its case
//!   (accepted it, or a crew acknowledged), 0 for a call after that; by the
//!   ticket's channel; tickets whose case was never taken are left out.
//! - **Satisfaction**: satisfied follow-ups of follow-ups recorded, for the
//!   period's tickets.
//! - **Complaints**: complaint tickets (against their district's manager,
//!   station and company) and filed complaints (against whom they name), in
//!   the period they were made in; per 1,000 households of the subject's
//!   districts (a crew's: the districts it serves first). **Repeat**: the
//!   same account complained within the repeat window before.
//!   **Escalated past the station**: complaint tickets whose case was
//!   escalated to the company (line 3).
//! - **First-time fix**: resolved cases (completed or answered) with no
//!   return and no reopen, of resolved cases.
//! - **Praise**: praise tickets (credited to their district's manager,
//!   station and company) and recorded praise (to whom it names, and their
//!   station and company).

use std::collections::{BTreeMap, HashMap};

use lineguard_protos::feedback::v1::{
    CaseRecord, ChannelTally, ChannelWaiting, ComplaintRecord, Count, HopsTally, Level, Metric,
    Period, PraiseRecord, Rate, Scorecard, ScorecardTally, Subject, TicketRecord,
};
use lineguard_protos::intake::v1::Channel;
use lineguard_protos::routing::v1::{Company, Crew, District, Manager, Station};
use prost::Message;
use prost_types::Timestamp;
use tonic::Status;

use crate::followups::Feedback;
use crate::projection::{
    CASE_REPORTED, COMPLAINT, PRAISE, REPORTED, case_key, directory_prefix, nanos, ticket_key,
};
use crate::rules::Rules;

/// The longest period a scorecard covers.
pub const MAX_PERIOD_DAYS: i64 = 400;
/// Records read per page while scanning.
const PAGE: usize = 1_000;

/// Checks a period: both ends set, `from` before `to`, at most [`MAX_PERIOD_DAYS`].
pub fn check_period(period: Option<&Period>) -> Result<(Timestamp, Timestamp), Status> {
    let p = period.ok_or_else(|| Status::invalid_argument("invalid period: is required"))?;
    let from = p
        .from
        .ok_or_else(|| Status::invalid_argument("invalid period.from: is required"))?;
    let to =
        p.to.ok_or_else(|| Status::invalid_argument("invalid period.to: is required"))?;
    if nanos(&to) <= nanos(&from) {
        return Err(Status::invalid_argument(
            "invalid period.to: must be after period.from",
        ));
    }
    if to.seconds - from.seconds > MAX_PERIOD_DAYS * 86_400 {
        return Err(Status::invalid_argument(format!(
            "invalid period: at most {MAX_PERIOD_DAYS} days"
        )));
    }
    Ok((from, to))
}

/// A subject as a map key: (level, id).
type Key = (i32, String);

fn key(level: Level, id: &str) -> Key {
    (level as i32, id.to_string())
}

/// One subject's counts, from which its scorecard is finished. Every count
/// adds up across partitions (hops are kept as a histogram, so their p90
/// does too); households come from the directory, the same everywhere.
#[derive(Debug, Default, Clone, PartialEq)]
struct Tally {
    tickets: u64,
    cases: u64,
    acceptance: (u64, u64),
    arrival: (u64, u64),
    restoration: (u64, u64),
    first_time_fix: (u64, u64),
    satisfaction: (u64, u64),
    /// Cases by their last hop number.
    hops: BTreeMap<u32, u64>,
    waiting: BTreeMap<i32, (u64, f64)>,
    complaints: u64,
    repeat_complaints: u64,
    escalated_complaints: u64,
    praise: u64,
    households: u64,
}

impl Tally {
    fn to_proto(&self, (level, id): &Key) -> ScorecardTally {
        let count = |(met, total): (u64, u64)| Some(Count { met, total });
        ScorecardTally {
            subject: Some(Subject {
                level: *level,
                id: id.clone(),
            }),
            tickets: self.tickets,
            cases: self.cases,
            acceptance: count(self.acceptance),
            arrival: count(self.arrival),
            restoration: count(self.restoration),
            first_time_fix: count(self.first_time_fix),
            satisfaction: count(self.satisfaction),
            hops: self
                .hops
                .iter()
                .map(|(hops, cases)| HopsTally {
                    hops: *hops,
                    cases: *cases,
                })
                .collect(),
            waiting: self
                .waiting
                .iter()
                .map(|(channel, (tickets, seconds))| ChannelTally {
                    channel: *channel,
                    tickets: *tickets,
                    seconds: *seconds,
                })
                .collect(),
            complaints: self.complaints,
            repeat_complaints: self.repeat_complaints,
            escalated_complaints: self.escalated_complaints,
            praise: self.praise,
            households: self.households,
        }
    }

    /// Adds another partition's counts of the same subject.
    fn add(&mut self, other: &ScorecardTally) {
        let add = |mine: &mut (u64, u64), theirs: &Option<Count>| {
            if let Some(c) = theirs {
                mine.0 += c.met;
                mine.1 += c.total;
            }
        };
        self.tickets += other.tickets;
        self.cases += other.cases;
        add(&mut self.acceptance, &other.acceptance);
        add(&mut self.arrival, &other.arrival);
        add(&mut self.restoration, &other.restoration);
        add(&mut self.first_time_fix, &other.first_time_fix);
        add(&mut self.satisfaction, &other.satisfaction);
        for h in &other.hops {
            *self.hops.entry(h.hops).or_default() += h.cases;
        }
        for w in &other.waiting {
            let slot = self.waiting.entry(w.channel).or_default();
            slot.0 += w.tickets;
            slot.1 += w.seconds;
        }
        self.complaints += other.complaints;
        self.repeat_complaints += other.repeat_complaints;
        self.escalated_complaints += other.escalated_complaints;
        self.praise += other.praise;
        // The directory's, not a count: every partition says the same.
        self.households = self.households.max(other.households);
    }
}

/// Every subject's counts for a period, in one partition or summed over
/// all of them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tallies(BTreeMap<Key, Tally>);

impl Tallies {
    /// As [`GetTallies`](lineguard_protos::feedback::v1::GetTalliesResponse) carries them.
    pub fn to_protos(&self) -> Vec<ScorecardTally> {
        self.0.iter().map(|(k, t)| t.to_proto(k)).collect()
    }

    /// Adds another partition's counts (subjects it alone knows included).
    pub fn add(&mut self, other: &[ScorecardTally]) {
        for theirs in other {
            let Some(subject) = &theirs.subject else {
                continue;
            };
            self.0
                .entry((subject.level, subject.id.clone()))
                .or_default()
                .add(theirs);
        }
    }

    /// Every subject's scorecard.
    pub fn finish(self, period: &Period, rules: &Rules) -> BTreeMap<(i32, String), Scorecard> {
        self.0
            .into_iter()
            .map(|(k, t)| {
                let card = finish(&k, t, period, rules);
                (k, card)
            })
            .collect()
    }
}

fn judge(rate: &mut (u64, u64), decided: bool, met: bool) {
    if decided {
        rate.1 += 1;
        if met {
            rate.0 += 1;
        }
    }
}

fn rate((met, total): (u64, u64)) -> Option<Rate> {
    Some(Rate {
        met,
        total,
        percent: if total == 0 {
            0.0
        } else {
            100.0 * met as f64 / total as f64
        },
    })
}

/// The p90 by nearest rank of the values `histogram` counts (value ->
/// how many times), 0 for none.
pub fn p90(histogram: &BTreeMap<u32, u64>) -> u32 {
    let count: u64 = histogram.values().sum();
    let rank = (count * 9).div_ceil(10).max(1);
    let mut seen = 0;
    for (value, times) in histogram {
        seen += times;
        if seen >= rank {
            return *value;
        }
    }
    0
}

/// The directory as feedback's copy has it.
struct Directory {
    districts: Vec<District>,
    stations: HashMap<String, Station>,
    companies: Vec<Company>,
    managers: Vec<Manager>,
    crews: Vec<Crew>,
}

impl Directory {
    /// The district's manager, station and company.
    fn owners(&self, district_id: &str) -> Vec<Key> {
        let Some(d) = self.districts.iter().find(|d| d.district_id == district_id) else {
            return Vec::new();
        };
        let mut out = vec![
            key(Level::Manager, &d.manager_id),
            key(Level::Station, &d.station_id),
        ];
        if let Some(s) = self.stations.get(&d.station_id) {
            out.push(key(Level::Company, &s.company_id));
        }
        out
    }
}

fn scan_all<M: Message + Default>(fb: &Feedback, prefix: &[u8]) -> Result<Vec<M>, Status> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = fb
            .log()
            .projection_scan(prefix, after.as_deref(), PAGE)
            .map_err(Status::from)?;
        let done = page.len() < PAGE;
        for (k, v) in &page {
            out.push(M::decode(v.as_slice()).map_err(|e| {
                Status::data_loss(format!("undecodable {}: {e}", String::from_utf8_lossy(k)))
            })?);
        }
        after = page.last().map(|(k, _)| k.clone());
        if done {
            return Ok(out);
        }
    }
}

/// Entries `<prefix><time>/<id>` with time in `[from, to)`, in time order:
/// the id and the stored value.
fn scan_period(
    fb: &Feedback,
    prefix: &str,
    from: &Timestamp,
    to: &Timestamp,
    mut each: impl FnMut(&str, &[u8]) -> Result<(), Status>,
) -> Result<(), Status> {
    let mut after = format!("{prefix}{:020}", nanos(from).max(0)).into_bytes();
    let end = nanos(to);
    loop {
        let page = fb
            .log()
            .projection_scan(prefix.as_bytes(), Some(&after), PAGE)
            .map_err(Status::from)?;
        let done = page.len() < PAGE;
        for (k, v) in &page {
            let rest = &k[prefix.len()..];
            let at: i128 = std::str::from_utf8(&rest[..20.min(rest.len())])
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(i128::MAX);
            if at >= end {
                return Ok(());
            }
            let id = String::from_utf8_lossy(rest.get(21..).unwrap_or_default());
            each(&id, v)?;
        }
        match page.last() {
            Some((k, _)) if !done => after = k.clone(),
            _ => return Ok(()),
        }
    }
}

fn decode<M: Message + Default>(what: &str, bytes: &[u8]) -> Result<M, Status> {
    M::decode(bytes).map_err(|e| Status::data_loss(format!("undecodable {what}: {e}")))
}

/// Every subject's scorecard for the period, by (level, id), from this
/// partition's records alone.
pub fn compute(
    fb: &Feedback,
    period: &Period,
) -> Result<BTreeMap<(i32, String), Scorecard>, Status> {
    Ok(tallies(fb, period)?.finish(period, fb.rules()))
}

/// Every subject's counts for the period, from this partition's records.
pub fn tallies(fb: &Feedback, period: &Period) -> Result<Tallies, Status> {
    let (from, to) = check_period(Some(period))?;
    let rules = fb.rules();
    let dir = Directory {
        districts: scan_all(fb, &directory_prefix("district"))?,
        stations: scan_all::<Station>(fb, &directory_prefix("station"))?
            .into_iter()
            .map(|s| (s.station_id.clone(), s))
            .collect(),
        companies: scan_all(fb, &directory_prefix("company"))?,
        managers: scan_all(fb, &directory_prefix("manager"))?,
        crews: scan_all(fb, &directory_prefix("crew"))?,
    };
    let mut tallies: BTreeMap<Key, Tally> = BTreeMap::new();
    for m in &dir.managers {
        tallies
            .entry(key(Level::Manager, &m.manager_id))
            .or_default();
    }
    for c in &dir.crews {
        let households = c
            .district_ids
            .iter()
            .filter_map(|id| dir.districts.iter().find(|d| &d.district_id == id))
            .map(|d| u64::from(d.households))
            .sum();
        tallies
            .entry(key(Level::Crew, &c.crew_id))
            .or_default()
            .households = households;
    }
    for s in dir.stations.values() {
        tallies
            .entry(key(Level::Station, &s.station_id))
            .or_default();
    }
    for c in &dir.companies {
        tallies
            .entry(key(Level::Company, &c.company_id))
            .or_default();
    }
    for d in &dir.districts {
        for k in dir.owners(&d.district_id) {
            if k.0 != Level::Crew as i32 {
                tallies.entry(k).or_default().households += u64::from(d.households);
            }
        }
    }

    let mut cases: HashMap<String, Option<CaseRecord>> = HashMap::new();
    let mut case_of = |id: &str| -> Result<Option<CaseRecord>, Status> {
        if let Some(c) = cases.get(id) {
            return Ok(c.clone());
        }
        let c = match fb
            .log()
            .projection_get(&case_key(id))
            .map_err(Status::from)?
        {
            Some(bytes) => Some(decode::<CaseRecord>("case", &bytes)?),
            None => None,
        };
        cases.insert(id.to_string(), c.clone());
        Ok(c)
    };
    fn subjects(case: &CaseRecord) -> Vec<Key> {
        let mut out = Vec::new();
        if !case.company_id.is_empty() {
            out.push(key(Level::Company, &case.company_id));
        }
        if !case.station_id.is_empty() {
            out.push(key(Level::Station, &case.station_id));
        }
        out.extend(case.manager_ids.iter().map(|m| key(Level::Manager, m)));
        out.extend(case.crew_ids.iter().map(|c| key(Level::Crew, c)));
        out
    }

    scan_period(fb, REPORTED, &from, &to, |ticket_id, _| {
        let Some(bytes) = fb
            .log()
            .projection_get(&ticket_key(ticket_id))
            .map_err(Status::from)?
        else {
            return Ok(());
        };
        let ticket: TicketRecord = decode("ticket", &bytes)?;
        let Some(case) = case_of(&ticket.case_id)? else {
            return Ok(());
        };
        let waited = case.accepted.then(|| {
            let reported = ticket.reported_at.as_ref().map_or(0, nanos);
            let taken = case.accepted_at.as_ref().map_or(0, nanos);
            (taken - reported).max(0) as f64 / 1e9
        });
        for k in subjects(&case) {
            let t = tallies.entry(k).or_default();
            t.tickets += 1;
            t.satisfaction.0 += u64::from(ticket.satisfied_follow_ups);
            t.satisfaction.1 += u64::from(ticket.follow_ups);
            if let Some(w) = waited {
                let slot = t.waiting.entry(ticket.channel).or_default();
                slot.0 += 1;
                slot.1 += w;
            }
        }
        Ok(())
    })?;

    scan_period(fb, CASE_REPORTED, &from, &to, |case_id, _| {
        let Some(case) = case_of(case_id)? else {
            return Ok(());
        };
        for k in subjects(&case) {
            let t = tallies.entry(k).or_default();
            t.cases += 1;
            judge(
                &mut t.acceptance,
                case.accepted || case.acceptance_breached,
                case.accepted && !case.acceptance_breached,
            );
            judge(
                &mut t.arrival,
                case.arrived || case.arrival_breached,
                case.arrived && case.arrived_on_time && !case.arrival_breached,
            );
            judge(
                &mut t.restoration,
                case.restored || case.restoration_breached,
                case.restored && case.restored_on_time && !case.restoration_breached,
            );
            judge(
                &mut t.first_time_fix,
                case.resolved,
                case.returns == 0 && case.reopens == 0,
            );
            *t.hops.entry(case.hops).or_default() += 1;
        }
        Ok(())
    })?;

    let repeat_within = rules.repeat_complaint_within.as_nanos() as i128;
    scan_period(fb, COMPLAINT, &from, &to, |_, bytes| {
        let c: ComplaintRecord = decode("complaint", bytes)?;
        let against: Vec<Key> = if c.is_ticket {
            dir.owners(&c.district_id)
        } else {
            c.against.iter().map(|s| (s.level, s.id.clone())).collect()
        };
        let repeat = match (&c.previous_at, &c.at) {
            (Some(prev), Some(at)) => nanos(at) - nanos(prev) <= repeat_within,
            _ => false,
        };
        let escalated =
            c.is_ticket && case_of(&c.ticket_id)?.is_some_and(|k| k.escalated_past_station);
        for k in against {
            let t = tallies.entry(k).or_default();
            t.complaints += 1;
            t.repeat_complaints += u64::from(repeat);
            t.escalated_complaints += u64::from(escalated);
        }
        Ok(())
    })?;

    scan_period(fb, PRAISE, &from, &to, |_, bytes| {
        let p: PraiseRecord = decode("praise", bytes)?;
        let credited: Vec<Key> = if p.credited.is_empty() {
            dir.owners(&p.district_id)
        } else {
            p.credited.iter().map(|s| (s.level, s.id.clone())).collect()
        };
        for k in credited {
            tallies.entry(k).or_default().praise += 1;
        }
        Ok(())
    })?;

    Ok(Tallies(tallies))
}

fn finish(k: &Key, t: Tally, period: &Period, rules: &Rules) -> Scorecard {
    let hop_sum: u64 = t.hops.iter().map(|(h, n)| u64::from(*h) * n).sum();
    let hop_cases: u64 = t.hops.values().sum();
    let (waited, waited_sum) = t
        .waiting
        .values()
        .fold((0u64, 0f64), |(n, s), (cn, cs)| (n + cn, s + cs));
    let mut card = Scorecard {
        subject: Some(Subject {
            level: k.0,
            id: k.1.clone(),
        }),
        period: Some(*period),
        tickets_handled: t.tickets,
        cases: t.cases,
        on_time_acceptance: rate(t.acceptance),
        on_time_arrival: rate(t.arrival),
        on_time_restoration: rate(t.restoration),
        average_hops: if hop_cases == 0 {
            0.0
        } else {
            hop_sum as f64 / hop_cases as f64
        },
        p90_hops: p90(&t.hops),
        average_waiting_seconds: if waited == 0 {
            0.0
        } else {
            waited_sum / waited as f64
        },
        waiting_by_channel: t
            .waiting
            .iter()
            .map(|(channel, (n, sum))| ChannelWaiting {
                channel: *channel,
                tickets: *n,
                average_seconds: sum / *n as f64,
            })
            .collect(),
        follow_up_satisfaction: rate(t.satisfaction),
        complaints: t.complaints,
        households: t.households,
        complaints_per_1000_households: if t.households == 0 {
            0.0
        } else {
            t.complaints as f64 * 1000.0 / t.households as f64
        },
        repeat_complaints: t.repeat_complaints,
        complaints_escalated_past_station: t.escalated_complaints,
        first_time_fix: rate(t.first_time_fix),
        praise: t.praise,
        stars: 0,
        stars_reason: String::new(),
    };
    let (stars, why) = rules.stars(&card);
    card.stars = stars;
    card.stars_reason = why;
    card
}

/// A metric's value on a card, and whether higher is better; `None` when
/// the card has nothing to judge on it.
pub fn metric_value(card: &Scorecard, metric: Metric) -> Option<(f64, bool)> {
    let of_rate = |r: &Option<Rate>| {
        r.as_ref()
            .filter(|r| r.total > 0)
            .map(|r| (r.percent, true))
    };
    match metric {
        Metric::Unspecified => None,
        Metric::TicketsHandled => Some((card.tickets_handled as f64, true)),
        Metric::OnTimeAcceptance => of_rate(&card.on_time_acceptance),
        Metric::OnTimeArrival => of_rate(&card.on_time_arrival),
        Metric::OnTimeRestoration => of_rate(&card.on_time_restoration),
        Metric::AverageHops => (card.cases > 0).then_some((card.average_hops, false)),
        Metric::AverageWaiting => {
            (!card.waiting_by_channel.is_empty()).then_some((card.average_waiting_seconds, false))
        }
        Metric::FollowUpSatisfaction => of_rate(&card.follow_up_satisfaction),
        Metric::ComplaintsPer1000Households => {
            (card.households > 0).then_some((card.complaints_per_1000_households, false))
        }
        Metric::FirstTimeFix => of_rate(&card.first_time_fix),
        Metric::Praise => Some((card.praise as f64, true)),
        Metric::Stars => Some((f64::from(card.stars), true)),
    }
}

/// The cards of one level ranked by `metric`, best first; equal values
/// share a rank; cards with nothing to judge on the metric are left out.
pub fn rank(cards: Vec<Scorecard>, metric: Metric) -> Vec<(u32, f64, Scorecard)> {
    let mut valued: Vec<(f64, bool, Scorecard)> = cards
        .into_iter()
        .filter_map(|c| metric_value(&c, metric).map(|(v, higher)| (v, higher, c)))
        .collect();
    valued.sort_by(|a, b| {
        let order = if a.1 {
            b.0.total_cmp(&a.0)
        } else {
            a.0.total_cmp(&b.0)
        };
        let id = |c: &Scorecard| c.subject.as_ref().map(|s| s.id.clone()).unwrap_or_default();
        order.then_with(|| id(&a.2).cmp(&id(&b.2)))
    });
    let mut out: Vec<(u32, f64, Scorecard)> = Vec::with_capacity(valued.len());
    for (i, (value, _, card)) in valued.into_iter().enumerate() {
        let rank = match out.last() {
            Some((r, v, _)) if *v == value => *r,
            _ => i as u32 + 1,
        };
        out.push((rank, value, card));
    }
    out
}

const CHANNELS: [Channel; 7] = [
    Channel::Hotline95598,
    Channel::StationPhone,
    Channel::StationCounter,
    Channel::ManagerPhone,
    Channel::App,
    Channel::Wechat,
    Channel::Web,
];

fn level_name(level: i32) -> &'static str {
    match Level::try_from(level).unwrap_or(Level::Unspecified) {
        Level::Manager => "manager",
        Level::Crew => "crew",
        Level::Station => "station",
        Level::Company => "company",
        Level::Unspecified => "",
    }
}

/// The CSV header of [`csv_row`].
pub fn csv_header() -> String {
    let mut cols: Vec<String> = [
        "level",
        "id",
        "period_from",
        "period_to",
        "tickets_handled",
        "cases",
        "on_time_acceptance_met",
        "on_time_acceptance_total",
        "on_time_acceptance_percent",
        "on_time_arrival_met",
        "on_time_arrival_total",
        "on_time_arrival_percent",
        "on_time_restoration_met",
        "on_time_restoration_total",
        "on_time_restoration_percent",
        "average_hops",
        "p90_hops",
        "average_waiting_seconds",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for c in CHANNELS {
        let name = c
            .as_str_name()
            .trim_start_matches("CHANNEL_")
            .to_ascii_lowercase();
        cols.push(format!("waiting_{name}_tickets"));
        cols.push(format!("waiting_{name}_average_seconds"));
    }
    cols.extend(
        [
            "follow_ups_satisfied",
            "follow_ups",
            "satisfaction_percent",
            "complaints",
            "households",
            "complaints_per_1000_households",
            "repeat_complaints",
            "complaints_escalated_past_station",
            "first_time_fixes",
            "resolved_cases",
            "first_time_fix_percent",
            "praise",
            "stars",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    cols.join(",")
}

fn field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn rfc3339(t: &Option<Timestamp>) -> String {
    t.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// One card as a CSV line (the columns of [`csv_header`]).
pub fn csv_row(card: &Scorecard) -> String {
    let subject = card.subject.clone().unwrap_or_default();
    let period = card.period.unwrap_or_default();
    let r = |rate: &Option<Rate>| {
        let rate = rate.unwrap_or_default();
        [
            rate.met.to_string(),
            rate.total.to_string(),
            format!("{:.2}", rate.percent),
        ]
    };
    let mut cols = vec![
        level_name(subject.level).to_string(),
        field(&subject.id),
        rfc3339(&period.from),
        rfc3339(&period.to),
        card.tickets_handled.to_string(),
        card.cases.to_string(),
    ];
    cols.extend(r(&card.on_time_acceptance));
    cols.extend(r(&card.on_time_arrival));
    cols.extend(r(&card.on_time_restoration));
    cols.push(format!("{:.3}", card.average_hops));
    cols.push(card.p90_hops.to_string());
    cols.push(format!("{:.1}", card.average_waiting_seconds));
    for c in CHANNELS {
        match card
            .waiting_by_channel
            .iter()
            .find(|w| w.channel == c as i32)
        {
            Some(w) => {
                cols.push(w.tickets.to_string());
                cols.push(format!("{:.1}", w.average_seconds));
            }
            None => {
                cols.push("0".into());
                cols.push(String::new());
            }
        }
    }
    cols.extend(r(&card.follow_up_satisfaction));
    cols.push(card.complaints.to_string());
    cols.push(card.households.to_string());
    cols.push(format!("{:.3}", card.complaints_per_1000_households));
    cols.push(card.repeat_complaints.to_string());
    cols.push(card.complaints_escalated_past_station.to_string());
    cols.extend(r(&card.first_time_fix));
    cols.push(card.praise.to_string());
    cols.push(card.stars.to_string());
    cols.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values: impl IntoIterator<Item = u32>) -> BTreeMap<u32, u64> {
        let mut h = BTreeMap::new();
        for v in values {
            *h.entry(v).or_default() += 1;
        }
        h
    }

    #[test]
    fn p90_is_the_nearest_rank() {
        assert_eq!(p90(&BTreeMap::new()), 0);
        assert_eq!(p90(&histogram([3])), 3);
        assert_eq!(p90(&histogram(1..=10)), 9);
        assert_eq!(p90(&histogram((1..=11).rev())), 10);
        assert_eq!(p90(&histogram([1, 1, 1, 1, 1, 1, 1, 1, 1, 4])), 1);
    }

    /// Two partitions' counts summed finish into the scorecard one
    /// partition holding all the records would give: rates, averages and
    /// the p90 of hops included; households are not summed.
    #[test]
    fn tallies_of_parts_add_up_to_the_whole() {
        let subject = key(Level::Company, "co-1");
        let part = |hops: &[u32], accepted: (u64, u64), waited: (u64, f64)| {
            let mut t = Tally {
                tickets: hops.len() as u64,
                cases: hops.len() as u64,
                acceptance: accepted,
                households: 1_000,
                complaints: 1,
                ..Tally::default()
            };
            for h in hops {
                *t.hops.entry(*h).or_default() += 1;
            }
            t.waiting.insert(Channel::App as i32, waited);
            t
        };
        let first = part(&[1, 1, 2], (2, 3), (3, 30.0));
        let second = part(&[1, 3, 3, 1], (4, 4), (1, 90.0));
        let whole = Tally {
            complaints: 2,
            ..part(&[1, 1, 2, 1, 3, 3, 1], (6, 7), (4, 120.0))
        };
        let mut summed = Tallies::default();
        for part in [&first, &second] {
            summed.add(&[part.to_proto(&subject)]);
        }
        let rules = Rules::default();
        let period = Period::default();
        let from_parts = summed.finish(&period, &rules);
        let mut one = BTreeMap::new();
        one.insert(subject.clone(), whole);
        let from_whole = Tallies(one).finish(&period, &rules);
        let (parts, whole) = (&from_parts[&subject], &from_whole[&subject]);
        assert_eq!(parts.p90_hops, 3);
        assert_eq!(parts.households, 1_000, "the directory's, not a sum");
        assert_eq!(parts.complaints, 2);
        assert_eq!(parts, whole);
    }

    #[test]
    fn ranks_share_ties_and_leave_out_the_unjudged() {
        let card = |id: &str, met, total| Scorecard {
            subject: Some(Subject {
                level: Level::Station as i32,
                id: id.into(),
            }),
            first_time_fix: rate((met, total)),
            ..Scorecard::default()
        };
        let ranked = rank(
            vec![
                card("a", 1, 2),
                card("b", 2, 2),
                card("c", 1, 2),
                card("d", 0, 0),
            ],
            Metric::FirstTimeFix,
        );
        let got: Vec<(u32, String)> = ranked
            .iter()
            .map(|(r, _, c)| (*r, c.subject.clone().unwrap_or_default().id))
            .collect();
        assert_eq!(got, vec![(1, "b".into()), (2, "a".into()), (2, "c".into())]);
    }

    #[test]
    fn csv_rows_match_the_header() {
        let header = csv_header();
        let row = csv_row(&Scorecard::default());
        assert_eq!(header.split(',').count(), row.split(',').count());
        assert_eq!(field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }
}
