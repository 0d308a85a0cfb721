//! `simulate storm`: realistic traffic against a running backend, for demos
//! and benchmarks. Calls come from a directory's accounts (the demo county,
//! or a generated county or province) at a steady rate, drawn by
//! [`crate::calls`]: feeder outages (calls from one to three neighbouring
//! districts, interleaved with other outages), repeat callers
//! (an urge on their open ticket), desk work (complaints, inquiries) that
//! an owner answers, and field work that crews do on their phones: every
//! crew follows its `WatchDispatches`, acknowledges after a delay (some only
//! after the acceptance window, so the ticket escalates), arrives (some
//! late), restores, completes, or returns an order. Follow-ups are made with
//! mixed verdicts; some dissatisfied customers reopen.
//!
//! It reports what it did and the latencies it saw, in particular from the
//! call that caused an order to the crew receiving it on its stream: a
//! customer's `ReportTicket` for a first order, the follow-up that reopened
//! the ticket or the crew's return for a later one. Orders no call caused
//! (an escalation after an acceptance window ran out) are counted, not
//! timed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lineguard_protos::dispatch::v1::{
    AcknowledgeRequest, ActionHeader, ArriveRequest, CompleteRequest, CrewAction, DepartRequest,
    OrderAssigned, RestoreRequest, ReturnOrderRequest, SubmitActionsRequest,
    WatchDispatchesRequest, crew_action,
};
use lineguard_protos::eventlog::v1::{ReadDirection, ReadStreamRequest};
use lineguard_protos::feedback::v1::{ListDueFollowUpsRequest, RecordFollowUpRequest};
use lineguard_protos::intake::v1::{
    Caller, Channel, Disposition, ReportTicketRequest, ServiceRequestType, TicketKind,
};
use lineguard_protos::routing::v1::{AcceptTicketRequest, AnswerTicketRequest, GetRouteRequest};
use prost::{Message, Name};
use prost_types::Timestamp;
use serde::Serialize;
use tokio::sync::watch;

use crate::Error;
use crate::calls::{Accounts, CallPlanner, PlannedCall, StormDirectory};
use crate::endpoints::Clients;

/// How the storm behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct StormConfig {
    /// Calls to make.
    #[arg(long, default_value_t = 1_000)]
    pub tickets: usize,
    /// Calls per second.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seed of the pseudo-random choices (the same seed, the same storm).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The demo accounts (account_number,district_id per line).
    #[arg(long, default_value = "deploy/demo-accounts.csv")]
    pub accounts: String,
    /// The directory file the crews are read from.
    #[arg(long, default_value = "deploy/directory.toml")]
    pub directory: String,
    /// Share of orders a crew leaves unacknowledged for --slow-ack (escalations).
    #[arg(long, default_value_t = 0.05)]
    pub slow_share: f64,
    /// How long a slow crew waits before acknowledging.
    #[arg(long, default_value = "6s", value_parser = parse_span)]
    pub slow_ack: Duration,
    /// Share of arrivals later than the arrival limit (by device time).
    #[arg(long, default_value_t = 0.15)]
    pub late_share: f64,
    /// Share of orders a crew returns (退单) instead of doing.
    #[arg(long, default_value_t = 0.03)]
    pub return_share: f64,
    /// Share of follow-ups with a dissatisfied customer (half of them reopen).
    #[arg(long, default_value_t = 0.1)]
    pub dissatisfied_share: f64,
    /// After the last call, how long to let the work finish.
    #[arg(long, default_value = "30s", value_parser = parse_span)]
    pub settle: Duration,
    /// The backend's clock, when its services run from a chosen start
    /// (their `--clock-start`, RFC 3339): the crews then live in that
    /// clock's time, travelling and repairing for minutes of it.
    #[arg(long)]
    pub clock_start: Option<String>,
    /// The services' `--clock-anchor` (RFC 3339).
    #[arg(long)]
    pub clock_anchor: Option<String>,
    /// The services' `--clock-speed`.
    #[arg(long, default_value_t = 1)]
    pub clock_speed: u32,
    /// Each crew's phone clock is wrong by up to this many minutes, either way.
    #[arg(long, default_value_t = 0)]
    pub phone_skew_minutes: u32,
    /// After the last call, wait (up to --settle) until no ticket is held by
    /// anyone, no follow-up is due and intake shows every ticket of the
    /// storm finished, not only until the crews are done.
    #[arg(long)]
    pub until_done: bool,
    /// Share of crews whose phones are offline in the field: they queue
    /// acknowledge, depart and arrive and send them in one batch on arrival.
    #[arg(long, default_value_t = 0.0)]
    pub offline_share: f64,
    /// Calls the call centre has in hand at once (its agents): a call that
    /// comes while every agent waits on the backend gets a busy tone and is
    /// counted as shed, not made. Keeps a storm offered more than the
    /// backend takes to its length and its memory.
    #[arg(long, default_value_t = 2_000)]
    pub max_in_flight: usize,
    /// A call that finds every agent busy waits for one instead of being
    /// shed: the storm then runs as fast as the backend answers (to
    /// measure what it sustains).
    #[arg(long)]
    pub queue_calls: bool,
    /// Calls go in waves of this many (0: as they come, at --rate): one
    /// call after another, each answered before the next, no crew, desk
    /// or follow-up acting while a wave's calls are made, and a wave begins
    /// only when the one before has been worked to its end (every ticket of
    /// it finished as intake shows it, nothing held, no follow-up due).
    /// Every call then meets the same backend whatever the machine's speed
    /// or the deployment's shape, and every crew's and desk's choices are
    /// drawn per ticket, so the same seed gives the same tickets, cases and
    /// scorecard counts: for comparing deployments (one partition with
    /// many), not for measuring speed (--rate is not used).
    #[arg(long, default_value_t = 0)]
    pub waves_of: usize,
}

impl StormConfig {
    /// Whether crews act in the backend's accelerated time (sleeping its
    /// minutes) rather than stamping the minutes ahead on their phones.
    fn paced(&self) -> bool {
        self.clock_start.is_some() || self.clock_speed > 1
    }

    /// Waits `minutes` of the backend's clock (nothing when not paced).
    async fn wait_minutes(&self, minutes: i64) {
        if self.paced() && minutes > 0 {
            let span = Duration::from_secs(u64::try_from(minutes).unwrap_or(0) * 60);
            tokio::time::sleep(span / self.clock_speed.max(1)).await;
        }
    }

    /// `at` moved on by `minutes`: the backend's time now when paced (the
    /// minutes were waited), else the minutes stamped ahead.
    fn after_minutes(&self, at: &Timestamp, minutes: i64) -> Timestamp {
        if self.paced() {
            now()
        } else {
            plus_minutes(at, minutes)
        }
    }
}

/// Sets this process's clock as the backend's (`--clock-start`, …), so the
/// crews' phones read the time the services read.
fn configure_clock(config: &StormConfig) -> Result<(), Error> {
    if !config.paced() {
        return Ok(());
    }
    let parse = |flag: &str, text: &str| {
        text.parse::<Timestamp>()
            .map_err(|e| Error::Usage(format!("{flag} {text:?}: {e} (use RFC 3339)")))
    };
    let start = match &config.clock_start {
        Some(text) => parse("--clock-start", text)?,
        None => now(),
    };
    let anchor = config
        .clock_anchor
        .as_deref()
        .map(|t| parse("--clock-anchor", t))
        .transpose()?;
    match lineguard_eventlog::clock::configure(start, anchor, config.clock_speed) {
        Ok(()) => Ok(()),
        // Already set (a second storm in one process): the same clock.
        Err(e) if e.contains("already") => Ok(()),
        Err(e) => Err(Error::Usage(e)),
    }
}

/// Parses `500ms`, `6s`, `2m`.
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let (n, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = n.parse().map_err(|_| format!("invalid span {text:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid span unit in {text:?} (ms, s or m)")),
    }
}

/// A small, seedable generator (SplitMix64): the same seed, the same storm.
#[derive(Debug, Clone)]
pub struct Dice(u64);

impl Dice {
    pub fn new(seed: u64) -> Dice {
        Dice(seed)
    }
    pub fn roll(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// In `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.roll() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.roll() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// What the storm did and saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StormReport {
    pub calls: usize,
    /// Calls that found every agent busy (`--max-in-flight`): not made.
    pub calls_shed: usize,
    /// `ReportTicket` answers RESOURCE_EXHAUSTED (the backend's bound on
    /// calls in flight), each retried after a pause with the same key.
    pub refused_by_backend: usize,
    /// Calls retried (same idempotency key) after no answer.
    pub retries: usize,
    pub new_tickets: usize,
    pub joined_incidents: usize,
    pub urges: usize,
    pub desk_answered: usize,
    pub orders_received: usize,
    /// Orders a phone received a second time (must stay 0).
    pub orders_received_twice: usize,
    /// Orders no call of the storm caused (an escalation to another crew
    /// after the acceptance window ran out): not in `report_to_crew_ms`.
    pub orders_not_caused_by_a_call: usize,
    pub acknowledged: usize,
    pub slow_acknowledgements: usize,
    pub arrived_on_time: usize,
    pub arrived_late: usize,
    pub returned: usize,
    pub completed: usize,
    /// Offline phones' queued actions sent as one batch.
    pub offline_batches: usize,
    pub follow_ups_satisfied: usize,
    pub follow_ups_dissatisfied: usize,
    pub reopened: usize,
    pub errors: BTreeMap<String, usize>,
    pub seconds: f64,
    pub calls_per_second: f64,
    /// From the first call to the last order a crew received, seconds: the
    /// calls' work reached the crews at `calls / last_order_seconds` a
    /// second.
    pub last_order_seconds: f64,
    /// `ReportTicket` round trips, milliseconds.
    pub report_latency_ms: Percentiles,
    /// From the call that caused an order (`ReportTicket` for a first
    /// order; the reopening follow-up or the crew's return for a later one)
    /// to the crew receiving it, milliseconds.
    pub report_to_crew_ms: Percentiles,
    /// With `--until-done`, what the backend still held when the storm
    /// stopped waiting (`None`: everything was done, or it was not asked).
    pub not_done: Option<Remaining>,
    /// Tickets (ids) the storm created.
    #[serde(skip)]
    pub ticket_ids: Vec<String>,
}

/// Open work the backend holds: what `--until-done` waits to see at zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Remaining {
    /// Tickets held by a manager, desk or crew (routing's recount).
    pub held_tickets: u64,
    /// Follow-ups not yet made (feedback), at most one page counted.
    pub open_follow_ups: usize,
    /// Tickets of the storm (in waves, of the wave) intake does not show
    /// finished.
    pub unfinished_tickets: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut values: Vec<f64>) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_by(f64::total_cmp);
        let at =
            |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1];
        Percentiles {
            count: values.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// Shared tallies of the running storm.
#[derive(Default)]
struct Tally {
    report: StormReport,
    report_ms: Vec<f64>,
    crew_ms: Vec<f64>,
    /// Per ticket, the last call that sent its work to a crew.
    causes: HashMap<String, Cause>,
    /// Orders (id, hop) the crews' phones have received.
    received: std::collections::HashSet<(String, u32)>,
    /// When the last new order reached a phone.
    last_order: Option<Instant>,
    /// Per ticket the storm made, the number of the call that made it:
    /// what a crew's or a desk's choices for that ticket are drawn from.
    call_of: HashMap<String, usize>,
    /// Per (call, what was drawn), how many draws so far: the second order
    /// for a ticket (after a return or a reopen) draws anew.
    draws: HashMap<(usize, u64), u64>,
}

/// A call that sends a ticket's work to a crew, and whether an order it
/// caused has reached a crew yet.
#[derive(Debug, Clone, Copy)]
struct Cause {
    sent: Instant,
    /// An order received after it has been timed from it (or it causes
    /// none: a caller joining an incident already ordered).
    timed: bool,
}

impl Tally {
    /// Records that the call sent at `sent` sends `ticket`'s work to a crew
    /// (a new ticket, a reopen, a return).
    fn caused(&mut self, ticket: &str, sent: Instant) {
        self.causes
            .insert(ticket.to_string(), Cause { sent, timed: false });
    }

    /// The dice for one choice about `tickets` (an order's plan, a
    /// follow-up's verdict): drawn from the storm's seed, what is chosen,
    /// the first call among the tickets and how many times it was drawn
    /// for before, so the same ticket gets the same choices whichever crew
    /// or partition it meets and in whatever order. `None` when no ticket
    /// is known yet (its call not answered).
    fn dice_for(&mut self, seed: u64, what: u64, tickets: &[&str]) -> Option<Dice> {
        let call = tickets
            .iter()
            .filter_map(|t| self.call_of.get(*t))
            .min()
            .copied()?;
        let drawn = self.draws.entry((call, what)).or_default();
        let mut mix = Dice::new(seed ^ what.rotate_left(32));
        let mut mix = Dice::new(mix.roll() ^ call as u64);
        let dice = Dice::new(mix.roll() ^ *drawn);
        *drawn += 1;
        Some(dice)
    }

    /// An order for `tickets` reached its crew at `received`: how long after
    /// the call that caused it, if a call did (the earliest not yet timed of
    /// its tickets'; every one of them is timed from then on).
    fn order_received(&mut self, tickets: &[&str], received: Instant) -> Option<Duration> {
        let cause = tickets
            .iter()
            .filter_map(|t| self.causes.get(*t))
            .filter(|c| !c.timed && c.sent <= received)
            .map(|c| c.sent)
            .min();
        for ticket in tickets {
            if let Some(c) = self.causes.get_mut(*ticket) {
                c.timed = true;
            }
        }
        cause.map(|sent| received.duration_since(sent))
    }
}

type Shared = Arc<Mutex<Tally>>;

fn count(tally: &Shared, f: impl FnOnce(&mut StormReport)) {
    if let Ok(mut t) = tally.lock() {
        f(&mut t.report);
    }
}

fn error(tally: &Shared, what: &str, status: &tonic::Status) {
    let key = format!("{what}: {:?}", status.code());
    count(tally, |r| *r.errors.entry(key).or_default() += 1);
}

/// The time by this process's clock: the backend's, once
/// [`configure_clock`] has set it.
fn now() -> Timestamp {
    lineguard_eventlog::clock::now()
}

fn plus_minutes(t: &Timestamp, minutes: i64) -> Timestamp {
    Timestamp {
        seconds: t.seconds + minutes * 60,
        nanos: t.nanos,
    }
}

/// Runs the storm; `progress` advances one per call made.
pub async fn storm(
    clients: &Clients,
    config: &StormConfig,
    progress: &indicatif::ProgressBar,
) -> Result<StormReport, Error> {
    if !(config.rate > 0.0 && config.rate <= 10_000.0) {
        return Err(Error::Usage(
            "--rate must be more than 0 and at most 10000".into(),
        ));
    }
    if !(0.0..=1.0).contains(&config.offline_share) || config.phone_skew_minutes > 24 * 60 {
        return Err(Error::Usage(
            "--offline-share must be within 0..=1 and --phone-skew-minutes at most 1440".into(),
        ));
    }
    if !(1..=100_000).contains(&config.max_in_flight) {
        return Err(Error::Usage(
            "--max-in-flight must be within 1..=100000".into(),
        ));
    }
    configure_clock(config)?;
    let directory = StormDirectory::read(&config.directory)?;
    let accounts = Accounts::read(&config.accounts, &directory)?;
    let crews = directory.crews();
    let tally: Shared = Arc::new(Mutex::new(Tally::default()));
    let (stop_tx, stop) = watch::channel(false);
    // True while a wave's calls are made (`--waves-of`): crews, desks and
    // the follow-up desk wait for it to turn false.
    let lockstep = config.waves_of > 0;
    let (making_calls, gate) = watch::channel(false);
    let started = Instant::now();
    // Orders assigned before this instant are an earlier storm's: taken
    // before any phone or call starts, so none of this storm's is older.
    let storm_began = lineguard_eventlog::timers::nanos(&now());
    let mut workers = Vec::new();
    for (i, crew) in crews.iter().enumerate() {
        let mut dice = Dice::new(config.seed ^ (0xC0FFEE + i as u64));
        let skew = i64::from(config.phone_skew_minutes);
        let phone = Phone {
            skew_minutes: if skew == 0 {
                0
            } else {
                dice.below(2 * skew as usize + 1) as i64 - skew
            },
            offline: dice.chance(config.offline_share),
        };
        workers.push(tokio::spawn(crew_phone(
            clients.clone(),
            crew.clone(),
            config.clone(),
            phone,
            dice,
            tally.clone(),
            (stop.clone(), gate.clone(), storm_began),
        )));
    }
    workers.push(tokio::spawn(follow_up_desk(
        clients.clone(),
        config.clone(),
        Dice::new(config.seed ^ 0xF011),
        tally.clone(),
        (stop.clone(), gate.clone()),
    )));

    // The calls, at the rate asked for (or in waves).
    progress.set_length(config.tickets as u64);
    let mut dice = Dice::new(config.seed);
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate));
    // Call n is due at n / rate from the start, whenever the one before it
    // went out: a late tick (the timer's millisecond, a busy loop) is made
    // up at once, so the rate offered is the rate asked for and a slow
    // backend cannot slow the calls it is offered (no coordinated
    // omission). Delaying instead held 1,000/s to a little under.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut planner = CallPlanner::new(&accounts, config.seed ^ 0xCA11);
    // In waves one agent takes every call, one answered before the next.
    let agents = Arc::new(tokio::sync::Semaphore::new(if lockstep {
        1
    } else {
        config.max_in_flight
    }));
    let mut calls = tokio::task::JoinSet::new();
    let mut wave_began_at_ticket = 0;
    let mut not_done = None;
    for n in 0..config.tickets {
        if !lockstep {
            interval.tick().await;
        } else if n % config.waves_of == 0 {
            if n > 0 {
                let wave = end_wave(&agents, &making_calls, &tally, wave_began_at_ticket).await;
                not_done = settle(clients, config, &tally, Some(&wave)).await;
                if not_done.is_some() {
                    break; // shown in the report: the storm stops here
                }
            }
            wave_began_at_ticket = tally.lock().map_or(0, |t| t.report.ticket_ids.len());
            making_calls.send_replace(true);
        }
        // Answered calls are reaped as the storm goes: its memory stays
        // that of the calls in flight.
        while calls.try_join_next().is_some() {}
        let PlannedCall { account, kind, .. } = planner.next_call();
        progress.inc(1);
        let agent = match agents.clone().try_acquire_owned() {
            Ok(agent) => agent,
            Err(_) if config.queue_calls || lockstep => {
                match agents.clone().acquire_owned().await {
                    Ok(agent) => agent,
                    Err(_) => break,
                }
            }
            Err(_) => {
                count(&tally, |r| r.calls_shed += 1);
                continue;
            }
        };
        let channel = [
            Channel::Hotline95598,
            Channel::StationPhone,
            Channel::ManagerPhone,
            Channel::App,
            Channel::Wechat,
            Channel::Web,
        ][dice.below(6)];
        let request = ReportTicketRequest {
            idempotency_key: format!("storm-{}-{n}", config.seed),
            channel: channel as i32,
            kind: kind as i32,
            service_request_type: if kind == TicketKind::ServiceRequest {
                [
                    ServiceRequestType::Reconnection,
                    ServiceRequestType::SurgeDamage,
                    ServiceRequestType::MeterFault,
                    ServiceRequestType::Other,
                ][n % 4] as i32
            } else {
                0
            },
            account_number: accounts.number(account).to_string(),
            address: "Storm Street".into(),
            caller: Some(Caller {
                name: "Storm caller".into(),
                phone: format!("1380000{:04}", account % 10_000),
            }),
            description: "simulated".into(),
            ..ReportTicketRequest::default()
        };
        // A desk picks a call up within seconds, or (in the backend's
        // accelerated time) within its first few minutes.
        let desk_delay = if config.paced() {
            Duration::from_secs(60 + dice.below(120) as u64) / config.clock_speed.max(1)
        } else {
            Duration::from_millis(200 + dice.below(1_500) as u64)
        };
        calls.spawn(call(
            clients.clone(),
            (n, request, kind),
            (agent, desk_delay),
            gate.clone(),
            tally.clone(),
        ));
    }
    let last_wave = if lockstep && not_done.is_none() {
        Some(end_wave(&agents, &making_calls, &tally, wave_began_at_ticket).await)
    } else {
        making_calls.send_replace(false);
        None
    };
    while calls.join_next().await.is_some() {}
    // Let the crews and desks finish.
    if not_done.is_none() {
        not_done = settle(clients, config, &tally, last_wave.as_deref()).await;
    }
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = w.await;
    }
    let mut t = tally
        .lock()
        .map_err(|_| Error::Usage("storm tally poisoned".into()))?;
    let seconds = started.elapsed().as_secs_f64();
    let mut report = t.report.clone();
    report.seconds = seconds;
    report.calls_per_second = report.calls as f64 / seconds.max(1e-9);
    report.last_order_seconds = t
        .last_order
        .map_or(0.0, |at| at.duration_since(started).as_secs_f64());
    report.report_latency_ms = Percentiles::of(std::mem::take(&mut t.report_ms));
    report.report_to_crew_ms = Percentiles::of(std::mem::take(&mut t.crew_ms));
    report.not_done = not_done;
    Ok(report)
}

/// How long a storm must look done (nothing held, no follow-up open, every
/// order worked, no new order) before it is taken as done.
pub const DONE_CONFIRM: Duration = Duration::from_secs(2);

/// Whether a wave's calls are being made (`--waves-of`): crews, desks and
/// the follow-up desk act only once it is false.
type Gate = watch::Receiver<bool>;

/// Waits until no wave's calls are being made (at once without waves).
async fn calls_made(gate: &mut Gate) {
    // An error is the storm ending: nothing to wait for then.
    let _ = gate.wait_for(|making| !*making).await;
}

/// Ends a wave: waits for its last call's answer (the one agent back),
/// lets crews and desks work, and returns the tickets the wave made.
async fn end_wave(
    agents: &tokio::sync::Semaphore,
    making_calls: &watch::Sender<bool>,
    tally: &Shared,
    began_at_ticket: usize,
) -> Vec<String> {
    // Closed never: the permit only proves the last answer is in.
    drop(agents.acquire().await);
    making_calls.send_replace(false);
    tally.lock().map_or_else(
        |_| Vec::new(),
        |t| t.report.ticket_ids[began_at_ticket.min(t.report.ticket_ids.len())..].to_vec(),
    )
}

/// Waits (up to `--settle`) until the storm's work is done: every order a
/// phone received worked, and with `--until-done` or in waves nothing held
/// and no follow-up due, and every ticket of the storm (in waves, of the
/// `wave`) finished as intake shows it; done only when it stays so for
/// [`DONE_CONFIRM`] with no new order. Returns what was left when it
/// stopped waiting (`None`: done).
async fn settle(
    clients: &Clients,
    config: &StormConfig,
    tally: &Shared,
    wave: Option<&[String]>,
) -> Option<Remaining> {
    let deadline = Instant::now() + config.settle;
    // Done only when it stays done for DONE_CONFIRM with no new order: a
    // follow-up that reopens a ticket is recorded by feedback before
    // routing hears of it, and for that moment nothing looks held.
    let mut done_since: Option<(Instant, usize)> = None;
    // With --until-done or in waves: the storm's (the wave's) tickets
    // intake has not yet shown finished (`None` until first asked).
    let mut unconfirmed: Option<Vec<String>> = None;
    let confirming = config.until_done || wave.is_some();
    loop {
        // Plain values, not the lock's result: no guard is held across the await.
        let (crews_done, orders) = tally
            .lock()
            .map(|t| {
                let r = &t.report;
                (
                    (r.orders_received > 0 || wave.is_some())
                        && r.completed + r.returned >= r.orders_received,
                    r.orders_received,
                )
            })
            .unwrap_or((true, 0));
        let mut remaining = if confirming {
            remaining_work(clients).await
        } else {
            None
        };
        if confirming && crews_done && remaining.is_none() {
            // Nothing held is not yet done: a report whose event has not
            // reached routing (its relay held up by a lost NATS node, say)
            // is held by nobody. Done once intake shows every ticket of the
            // storm (in waves, of the wave) finished; asked only when all
            // else looks done, and each ticket only until it has been seen
            // finished (a reopen after that is held by routing, which
            // `remaining_work` sees).
            let tickets = unconfirmed.get_or_insert_with(|| match wave {
                Some(wave) => wave.to_vec(),
                None => tally
                    .lock()
                    .map_or_else(|_| Vec::new(), |t| t.report.ticket_ids.clone()),
            });
            *tickets = still_unfinished(clients, tickets).await;
            if !tickets.is_empty() {
                remaining
                    .get_or_insert_with(Remaining::default)
                    .unfinished_tickets = tickets.len();
            }
        }
        if crews_done && remaining.is_none() {
            match done_since {
                Some((since, seen)) if seen == orders => {
                    if since.elapsed() >= DONE_CONFIRM {
                        return None;
                    }
                }
                _ => done_since = Some((Instant::now(), orders)),
            }
        } else {
            done_since = None;
        }
        if Instant::now() > deadline {
            return remaining.or(Some(Remaining::default()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Those of `tickets` intake does not show finished (completed,
/// answered, closed or cancelled); one it cannot show counts.
async fn still_unfinished(clients: &Clients, tickets: &[String]) -> Vec<String> {
    use lineguard_protos::intake::v1::{GetTicketRequest, TicketStatus};
    let mut intake = clients.intake();
    let mut unfinished = Vec::new();
    for ticket_id in tickets {
        let status = intake
            .get_ticket(GetTicketRequest {
                ticket_id: ticket_id.clone(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().ticket)
            .map(|t| t.status());
        if !matches!(
            status,
            Some(
                TicketStatus::Completed
                    | TicketStatus::Answered
                    | TicketStatus::Closed
                    | TicketStatus::Cancelled
            )
        ) {
            unfinished.push(ticket_id.clone());
        }
    }
    unfinished
}

/// The open work the backend holds (`None` when it holds none): tickets
/// held by anyone (routing's recount of loads from its log) and follow-ups
/// waiting to be made. A service that does not answer counts as work left.
async fn remaining_work(clients: &Clients) -> Option<Remaining> {
    let held = clients
        .routing()
        .verify_loads(lineguard_protos::routing::v1::VerifyLoadsRequest {})
        .await
        .map(|r| r.into_inner().open_tickets);
    let open = clients
        .feedback()
        .list_due_follow_ups(ListDueFollowUpsRequest {
            page_size: 1_000,
            ..ListDueFollowUpsRequest::default()
        })
        .await
        .map(|r| r.into_inner().follow_ups.len());
    match (held, open) {
        (Ok(0), Ok(0)) => None,
        (held, open) => Some(Remaining {
            held_tickets: held.unwrap_or(u64::MAX),
            open_follow_ups: open.unwrap_or(usize::MAX),
            unfinished_tickets: 0,
        }),
    }
}

/// One customer's call, taken by `agent` until intake answers; desk work
/// is then accepted and answered by its owner.
async fn call(
    clients: Clients,
    (n, request, kind): (usize, ReportTicketRequest, TicketKind),
    (agent, desk_delay): (tokio::sync::OwnedSemaphorePermit, Duration),
    mut gate: Gate,
    tally: Shared,
) {
    let sent = Instant::now();
    // A call centre retries a call that got no answer, with the same key:
    // intake answers a retry as it answered the first (never two tickets).
    let mut attempt = 0;
    let answer = loop {
        attempt += 1;
        match clients.intake().report_ticket(request.clone()).await {
            Ok(a) => break a.into_inner(),
            Err(status)
                if attempt < 4
                    && matches!(
                        status.code(),
                        tonic::Code::Cancelled
                            | tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::ResourceExhausted
                    ) =>
            {
                count(&tally, |r| {
                    r.retries += 1;
                    if status.code() == tonic::Code::ResourceExhausted {
                        r.refused_by_backend += 1;
                    }
                });
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(status) => return error(&tally, "report", &status),
        }
    };
    let ms = sent.elapsed().as_secs_f64() * 1e3;
    if let Ok(mut t) = tally.lock() {
        t.report_ms.push(ms);
        t.report.calls += 1;
        // An urge's ticket keeps the call that made it.
        t.call_of.entry(answer.ticket_id.clone()).or_insert(n);
        match answer.disposition() {
            Disposition::UrgedOpenTicket => t.report.urges += 1,
            Disposition::JoinedIncident => {
                t.report.joined_incidents += 1;
                t.report.ticket_ids.push(answer.ticket_id.clone());
            }
            _ => {
                t.report.new_tickets += 1;
                t.report.ticket_ids.push(answer.ticket_id.clone());
            }
        }
        // A retry's answer is the first one's: the first send is the cause.
        // A caller joining an incident causes no order of their own.
        if !t.causes.contains_key(&answer.ticket_id) {
            match answer.disposition() {
                Disposition::UrgedOpenTicket => {}
                Disposition::JoinedIncident => {
                    t.causes
                        .insert(answer.ticket_id.clone(), Cause { sent, timed: true });
                }
                _ => t.caused(&answer.ticket_id, sent),
            }
        }
    }
    // The agent is free once the answer is noted (in waves, the next call
    // then finds this one's ticket known).
    drop(agent);
    if kind == TicketKind::FaultRepair || answer.disposition() != Disposition::NewTicket {
        return;
    }
    tokio::time::sleep(desk_delay).await;
    calls_made(&mut gate).await;
    answer_desk_work(&clients, &answer.ticket_id, &tally).await;
}

async fn answer_desk_work(clients: &Clients, ticket: &str, tally: &Shared) {
    let mut routing = clients.routing();
    let started = Instant::now();
    let mut attempt = 0u32;
    // The hops this desk has sent an answer for.
    let mut answer_tried = std::collections::BTreeSet::new();
    loop {
        if attempt > 0 {
            if started.elapsed() > KEEP_TRYING_FOR {
                // Never routed to a desk within the time, or never
                // answerable: shown in the report, not dropped.
                let status = tonic::Status::deadline_exceeded("never answerable");
                return error(tally, "desk work", &status);
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        attempt += 1;
        let route = match routing
            .get_route(GetRouteRequest {
                ticket_id: ticket.to_string(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            // Not routed yet (NOT_FOUND), or routing busy.
            Err(_) => continue,
        };
        if route.field_work {
            return; // a crew's to do, not a desk's
        }
        use lineguard_protos::routing::v1::RouteStatus;
        match route.status() {
            RouteStatus::Routed | RouteStatus::Accepted => {}
            // Answered at this hop, and only this desk answers desk work:
            // an answer of ours whose reply was lost (routing restarted,
            // or a write outlived the call's deadline). Asking again with
            // the same key gets the stored answer.
            RouteStatus::Answered if answer_tried.contains(&route.hop) => {}
            // Not (yet, or no longer) with an owner: a reopen still on its way.
            _ => continue,
        }
        if route.status() != RouteStatus::Answered {
            let accepted = routing
                .accept_ticket(AcceptTicketRequest {
                    ticket_id: ticket.to_string(),
                    assignee_id: route.assignee_id.clone(),
                    idempotency_key: format!("storm-accept-{ticket}-{}", route.hop),
                })
                .await;
            match &accepted {
                // Routing busy, rebuilding its views or restarting: again.
                Err(status) if transient(status.code()) => continue,
                Err(status) if status.code() != tonic::Code::FailedPrecondition => {
                    return error(tally, "accept", status);
                }
                _ => {}
            }
        }
        answer_tried.insert(route.hop);
        match routing
            .answer_ticket(AnswerTicketRequest {
                ticket_id: ticket.to_string(),
                assignee_id: route.assignee_id,
                answer: "explained on the phone".into(),
                outcome: "explained".into(),
                // One answer per hop: a reopened ticket is answered again.
                idempotency_key: format!("storm-answer-{ticket}-{}", route.hop),
            })
            .await
        {
            Ok(_) => return count(tally, |r| r.desk_answered += 1),
            // Moved on meanwhile (escalated), or routing busy: ask again.
            Err(s) if s.code() == tonic::Code::PermissionDenied || transient(s.code()) => {
                continue;
            }
            Err(s) => return error(tally, "answer", &s),
        }
    }
}

/// The crew's last sequence number so far (its phone starts after it).
async fn last_sequence(clients: &Clients, crew: &str) -> u64 {
    let Ok(mut log) = clients.log("dispatch") else {
        return 0;
    };
    log.read_stream(ReadStreamRequest {
        stream_id: format!("crew-{crew}"),
        from_version: 0,
        direction: ReadDirection::Backward as i32,
        max_count: 1,
    })
    .await
    .map(|r| r.into_inner().stream_version)
    .unwrap_or(0)
}

fn header(crew: &str, order: &str, action: &str, device_time: Timestamp) -> Option<ActionHeader> {
    Some(ActionHeader {
        crew_id: crew.to_string(),
        order_id: order.to_string(),
        action_id: format!("{action}-{order}"),
        device_time: Some(device_time),
    })
}

/// How a crew's phone is wrong: its clock, its network.
#[derive(Debug, Clone, Copy)]
struct Phone {
    /// Minutes its clock is ahead (negative: behind).
    skew_minutes: i64,
    /// Queues its actions and sends them in one batch on arrival.
    offline: bool,
}

/// A crew's phone: follows the crew's orders and works each one.
#[allow(clippy::too_many_arguments)]
async fn crew_phone(
    clients: Clients,
    crew: String,
    config: StormConfig,
    phone: Phone,
    mut dice: Dice,
    tally: Shared,
    (mut stop, gate, storm_began): (watch::Receiver<bool>, Gate, i128),
) {
    // Where to resume: the crew's last sequence as the log asked knows it.
    // A crew of a station another partition owns has its stream there, so
    // that log may know none of it and the watch starts from the crew's
    // first event: orders assigned before this storm began (`storm_began`,
    // nanoseconds) are passed over (never worked again), whichever
    // partition holds them.
    let mut after = last_sequence(&clients, &crew).await;
    while !*stop.borrow() {
        let stream = clients
            .dispatch()
            .watch_dispatches(WatchDispatchesRequest {
                crew_id: crew.clone(),
                after_sequence: after,
                ..WatchDispatchesRequest::default()
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return,
                next = stream.next() => next,
            };
            let Some(Ok(event)) = next else { break };
            after = event.sequence;
            let Some(envelope) = event.event else {
                continue;
            };
            if envelope.event_type != OrderAssigned::full_name()
                || envelope
                    .recorded_at
                    .as_ref()
                    .map_or(0, lineguard_eventlog::timers::nanos)
                    < storm_began
            {
                continue;
            }
            let Ok(order) = OrderAssigned::decode(envelope.payload.as_ref()) else {
                continue;
            };
            let received = Instant::now();
            if let Ok(mut t) = tally.lock() {
                if !t.received.insert((order.order_id.clone(), order.hop)) {
                    // A phone resuming from its last sequence never sees an
                    // order again: this would be a bug.
                    t.report.orders_received_twice += 1;
                    continue;
                }
                t.report.orders_received += 1;
                t.last_order = Some(received);
                let tickets: Vec<&str> =
                    order.tickets.iter().map(|c| c.ticket_id.as_str()).collect();
                match t.order_received(&tickets, received) {
                    Some(waited) => t.crew_ms.push(waited.as_secs_f64() * 1e3),
                    None => t.report.orders_not_caused_by_a_call += 1,
                }
            }
            // Drawn per ticket once the wave's calls are made (every
            // ticket's call then known); the crew's own dice for an order
            // of tickets the storm did not make.
            let fallback = Dice::new(dice.roll());
            tokio::spawn(work_order(
                clients.clone(),
                crew.clone(),
                order,
                (fallback, gate.clone()),
                config.clone(),
                phone,
                tally.clone(),
            ));
        }
    }
}

/// How a crew works one order, drawn from its dice.
struct OrderPlan {
    slow: bool,
    late: bool,
    give_back: bool,
    ack_after: Duration,
    travel_minutes: i64,
    repair_minutes: i64,
}

/// What is drawn for ([`Tally::dice_for`]): an order's plan.
const DRAW_ORDER: u64 = 1;
/// What is drawn for ([`Tally::dice_for`]): a follow-up's verdict.
const DRAW_FOLLOW_UP: u64 = 2;

impl OrderPlan {
    fn draw(dice: &mut Dice, config: &StormConfig) -> OrderPlan {
        OrderPlan {
            slow: dice.chance(config.slow_share),
            late: dice.chance(config.late_share),
            give_back: dice.chance(config.return_share),
            ack_after: if config.paced() {
                Duration::from_secs(30 + dice.below(150) as u64) / config.clock_speed.max(1)
            } else {
                Duration::from_millis(50 + dice.below(400) as u64)
            },
            travel_minutes: 10 + dice.below(25) as i64,
            repair_minutes: 20 + dice.below(90) as i64,
        }
    }
}

async fn work_order(
    clients: Clients,
    crew: String,
    order: OrderAssigned,
    (fallback, mut gate): (Dice, Gate),
    config: StormConfig,
    phone: Phone,
    tally: Shared,
) {
    calls_made(&mut gate).await;
    let tickets: Vec<&str> = order.tickets.iter().map(|c| c.ticket_id.as_str()).collect();
    let mut dice = tally
        .lock()
        .ok()
        .and_then(|mut t| t.dice_for(config.seed, DRAW_ORDER, &tickets))
        .unwrap_or(fallback);
    let plan = OrderPlan::draw(&mut dice, &config);
    let dispatch = clients.dispatch();
    let id = order.order_id.as_str();
    let round = format!("{}-h{}", crew, order.hop);
    // What the phone's clock says when the true time is `at`.
    let device = |at: &Timestamp| plus_minutes(at, phone.skew_minutes);
    let action =
        |what: &str, at: &Timestamp| header(&crew, id, &format!("{what}-{round}"), device(at));
    tokio::time::sleep(if plan.slow {
        config.slow_ack
    } else {
        plan.ack_after
    })
    .await;
    let t0 = now();
    // Every phone acknowledges from the depot; an offline one loses
    // coverage on the road and queues what follows until it is on site.
    let ack = AcknowledgeRequest {
        header: action("ack", &t0),
    };
    match resend(|| {
        let (mut dispatch, ack) = (dispatch.clone(), ack.clone());
        async move { dispatch.acknowledge(ack).await }
    })
    .await
    {
        Ok(_) => count(&tally, |r| {
            r.acknowledged += 1;
            r.slow_acknowledgements += usize::from(plan.slow);
        }),
        // Taken from this crew meanwhile (escalated to another, cancelled).
        Err(s) => return error(&tally, "acknowledge", &s),
    }
    if plan.give_back {
        let give_back = ReturnOrderRequest {
            header: action("return", &now()),
            reason: "customer_side_fault".into(),
            note: "the fault is inside the house".into(),
            ..ReturnOrderRequest::default()
        };
        // The return sends the tickets' work on (to another crew, or a
        // desk): an order that follows is timed from it. Noted before it
        // is sent, as that order may reach a phone before the answer does.
        if let Ok(mut t) = tally.lock() {
            let sent = Instant::now();
            for ticket in &order.tickets {
                t.caused(&ticket.ticket_id, sent);
            }
        }
        match resend(|| {
            let (mut dispatch, give_back) = (dispatch.clone(), give_back.clone());
            async move { dispatch.return_order(give_back).await }
        })
        .await
        {
            Ok(_) => count(&tally, |r| r.returned += 1),
            Err(s) => error(&tally, "return", &s),
        }
        return;
    }
    // Unpaced, the drive and the repair take minutes of the crew's clock,
    // stamped ahead; paced, they take minutes of the backend's clock.
    let arrival_due = order
        .arrival_due_at
        .unwrap_or_else(|| plus_minutes(&t0, 45));
    // Late: past the arrival limit, if that limit is a matter of hours
    // (a service visit due in a day is not made late on purpose).
    let minutes_to_due = (arrival_due.seconds - t0.seconds) / 60;
    let travel = if plan.late && minutes_to_due <= 3 * 60 {
        minutes_to_due.max(0) + 5 + plan.travel_minutes
    } else {
        plan.travel_minutes.min(30)
    };
    config.wait_minutes(1).await;
    let departed = config.after_minutes(&t0, 1);
    let depart = DepartRequest {
        header: action("depart", &departed),
    };
    config.wait_minutes(travel - 1).await;
    let arrived_at = config.after_minutes(&t0, travel);
    let arrive = ArriveRequest {
        header: action("arrive", &arrived_at),
        position: None,
    };
    if phone.offline {
        // Back in coverage on site: the queue goes in one batch.
        let queued = vec![
            CrewAction {
                action: Some(crew_action::Action::Depart(depart)),
            },
            CrewAction {
                action: Some(crew_action::Action::Arrive(arrive)),
            },
        ];
        let batch = SubmitActionsRequest { actions: queued };
        let outcomes = match resend(|| {
            let (mut dispatch, batch) = (dispatch.clone(), batch.clone());
            async move { dispatch.submit_actions(batch).await }
        })
        .await
        {
            Ok(r) => r.outcomes,
            Err(s) => return error(&tally, "submit actions", &s),
        };
        if let Some(failed) = outcomes.iter().find(|o| o.code != "OK") {
            let status =
                tonic::Status::new(tonic::Code::FailedPrecondition, failed.message.clone());
            return error(&tally, "offline batch", &status);
        }
        count(&tally, |r| r.offline_batches += 1);
    } else {
        let departed = resend(|| {
            let (mut dispatch, depart) = (dispatch.clone(), depart.clone());
            async move { dispatch.depart(depart).await }
        })
        .await;
        if let Err(s) = departed {
            return error(&tally, "depart", &s);
        }
        let arrived = resend(|| {
            let (mut dispatch, arrive) = (dispatch.clone(), arrive.clone());
            async move { dispatch.arrive(arrive).await }
        })
        .await;
        if let Err(s) = arrived {
            return error(&tally, "arrive", &s);
        }
    }
    count(&tally, |r| {
        if plan.late {
            r.arrived_late += 1;
        } else {
            r.arrived_on_time += 1;
        }
    });
    config.wait_minutes(plan.repair_minutes).await;
    let restored_at = config.after_minutes(&arrived_at, plan.repair_minutes);
    let restore = RestoreRequest {
        header: action("restore", &restored_at),
    };
    if let Err(s) = resend(|| {
        let (mut dispatch, restore) = (dispatch.clone(), restore.clone());
        async move { dispatch.restore(restore).await }
    })
    .await
    {
        return error(&tally, "restore", &s);
    }
    config.wait_minutes(5).await;
    let complete = CompleteRequest {
        header: action("complete", &config.after_minutes(&restored_at, 5)),
        cause: "blown fuse".into(),
        result: "replaced".into(),
        ..CompleteRequest::default()
    };
    match resend(|| {
        let (mut dispatch, complete) = (dispatch.clone(), complete.clone());
        async move { dispatch.complete(complete).await }
    })
    .await
    {
        Ok(_) => count(&tally, |r| r.completed += 1),
        Err(s) => error(&tally, "complete", &s),
    }
}

/// Sends a crew action, again while dispatch cannot be reached (a restart):
/// the action's id makes a resend safe, as a phone resends after a lost
/// connection.
async fn resend<T, F, Fut>(mut send: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        match send().await {
            Ok(answer) => return Ok(answer.into_inner()),
            Err(s) if transient(s.code()) && started.elapsed() < KEEP_TRYING_FOR => {
                attempt += 1;
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// How long a phone or a desk keeps trying a call the backend could not
/// take: a person does not give up on a job because the backend was busy
/// for a while. Past it the call is counted as an error, never dropped
/// silently.
const KEEP_TRYING_FOR: Duration = Duration::from_secs(300);

/// Whether a refusal may go away by itself: the backend restarting, busy
/// (`RESOURCE_EXHAUSTED` past its calls in flight) or slow. Every call the
/// storm repeats carries the same idempotency key or action id, so a
/// repeat is never applied twice.
fn transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::ResourceExhausted
            | tonic::Code::DeadlineExceeded
    )
}

/// The wait before attempt `attempt + 1`: 100 ms doubling to 2 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(5)).min(2_000))
}

/// The follow-up desk: calls every customer whose follow-up is due.
async fn follow_up_desk(
    clients: Clients,
    config: StormConfig,
    mut desk_dice: Dice,
    tally: Shared,
    (mut stop, mut gate): (watch::Receiver<bool>, Gate),
) {
    let mut feedback = clients.feedback();
    loop {
        calls_made(&mut gate).await;
        let due = feedback
            .list_due_follow_ups(ListDueFollowUpsRequest {
                page_size: 1_000,
                ..ListDueFollowUpsRequest::default()
            })
            .await
            .map(|r| r.into_inner().follow_ups)
            .unwrap_or_default();
        for f in due {
            // Drawn per ticket: the same verdict whichever round finds it due.
            let mut dice = tally
                .lock()
                .ok()
                .and_then(|mut t| t.dice_for(config.seed, DRAW_FOLLOW_UP, &[&f.ticket_id]))
                .unwrap_or_else(|| Dice::new(desk_dice.roll()));
            let satisfied = !dice.chance(config.dissatisfied_share);
            let reopen = !satisfied && dice.chance(0.5);
            // One follow-up per resolution: a reopened ticket resolved
            // again gets a key of its own.
            let key = format!(
                "storm-fu-{}-{}",
                f.ticket_id,
                f.resolved_at
                    .map_or(0, |t| i128::from(t.seconds) * 1_000_000_000
                        + i128::from(t.nanos))
            );
            if reopen && let Ok(mut t) = tally.lock() {
                // The reopened ticket's new order is timed from this call
                // (noted first: the order may come before the answer).
                t.caused(&f.ticket_id, Instant::now());
            }
            match feedback
                .record_follow_up(RecordFollowUpRequest {
                    ticket_id: f.ticket_id.clone(),
                    satisfied,
                    score: if satisfied {
                        4 + dice.below(2) as u32
                    } else {
                        1 + dice.below(2) as u32
                    },
                    comment: String::new(),
                    recorded_by: "storm-desk".into(),
                    reopen,
                    idempotency_key: key,
                })
                .await
            {
                Ok(_) => {
                    count(&tally, |r| {
                        if satisfied {
                            r.follow_ups_satisfied += 1;
                        } else {
                            r.follow_ups_dissatisfied += 1;
                        }
                        r.reopened += usize::from(reopen);
                    });
                    if reopen {
                        // Back with its owner: desk work is answered again
                        // (field work comes back to a crew as a new order).
                        let (clients, tally, ticket) =
                            (clients.clone(), tally.clone(), f.ticket_id.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            answer_desk_work(&clients, &ticket, &tally).await;
                        });
                    }
                }
                // Still due: asked again on the next round.
                Err(s) if transient(s.code()) => {}
                Err(s) => error(&tally, "follow-up", &s),
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tickets_choices_are_drawn_from_its_call_whatever_the_order() {
        let roll = |dice: Option<Dice>| dice.map(|mut d| d.roll());
        let mut one = Tally::default();
        one.call_of.insert("t-a".into(), 3);
        one.call_of.insert("t-b".into(), 7);
        let mut other = Tally::default();
        other.call_of.insert("p1-b".into(), 7);
        other.call_of.insert("p1-a".into(), 3);
        // Another run names the tickets otherwise and meets them in
        // another order: each ticket's draws are the same.
        let b_first = roll(other.dice_for(9, DRAW_ORDER, &["p1-b"]));
        let a_first = roll(other.dice_for(9, DRAW_ORDER, &["p1-a"]));
        assert_eq!(roll(one.dice_for(9, DRAW_ORDER, &["t-a"])), a_first);
        assert_eq!(roll(one.dice_for(9, DRAW_ORDER, &["t-b"])), b_first);
        assert_ne!(a_first, b_first);
        // A second order for a ticket draws anew; a follow-up draws apart.
        let a_second = roll(one.dice_for(9, DRAW_ORDER, &["t-a"]));
        assert_ne!(a_second, a_first);
        assert_eq!(roll(other.dice_for(9, DRAW_ORDER, &["p1-a"])), a_second);
        assert_ne!(roll(one.dice_for(9, DRAW_FOLLOW_UP, &["t-a"])), a_first);
        // An incident's order is drawn from its first call's ticket.
        assert_eq!(
            roll(one.dice_for(9, DRAW_ORDER, &["t-b", "t-a"])),
            roll(other.dice_for(9, DRAW_ORDER, &["p1-a", "p1-b"]))
        );
        // A ticket no call of the storm made has no draw of its own.
        assert!(one.dice_for(9, DRAW_ORDER, &["t-unknown"]).is_none());
    }

    #[test]
    fn each_order_is_timed_from_the_call_that_caused_it() {
        let mut tally = Tally::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // A first caller, and a second joining the incident (no order of
        // their own).
        tally.caused("t-1", at(0));
        tally.causes.insert(
            "t-2".into(),
            Cause {
                sent: at(50),
                timed: true,
            },
        );
        assert_eq!(
            tally.order_received(&["t-1", "t-2"], at(120)),
            Some(Duration::from_millis(120)),
            "the first order, from the first call"
        );
        // An escalation hands the incident to another crew: no call caused
        // that order.
        assert_eq!(tally.order_received(&["t-1", "t-2"], at(400_000)), None);
        // The second caller is dissatisfied and reopens: the new order is
        // timed from the follow-up, not from their first call.
        tally.caused("t-2", at(900_000));
        assert_eq!(
            tally.order_received(&["t-1", "t-2"], at(900_300)),
            Some(Duration::from_millis(300))
        );
        // A crew returns it: the next order is timed from the return.
        tally.caused("t-1", at(1_000_000));
        tally.caused("t-2", at(1_000_000));
        assert_eq!(
            tally.order_received(&["t-1", "t-2"], at(1_000_040)),
            Some(Duration::from_millis(40))
        );
        // An order for a ticket the storm never called about is not timed.
        assert_eq!(tally.order_received(&["t-9"], at(1_000_100)), None);
    }
}
