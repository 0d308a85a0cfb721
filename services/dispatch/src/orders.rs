//! Work orders: made from routing's routes, changed by crew actions.
//!
//! Every change to one order is decided under that order's lock (one
//! process owns dispatch's log), from the order's view, and committed with
//! the events that make it: the order's own facts on its stream (the ticket
//! or incident id), what the crew must hear on the crew's stream. A crew's
//! sequence numbers are its stream's versions: contiguous, durable.

use std::sync::Arc;

use bytes::Bytes;
use lineguard_eventlog::clock::Clock;
use lineguard_eventlog::{
    Actor, ActorKind, CommitOutcome, Error as LogError, EventLog, ExpectedVersion, Idempotency,
    NewEvent, Transaction, actor,
};
use lineguard_protos::case_ids::{self, KnownAs};
use lineguard_protos::dispatch::v1::{
    CaseClosedNoted, CoveredTicket, CrewArrived, CrewDeparted, CrewNoted,
    CustomerNotificationRequested, CustomerUrged, EtrUpdated, IncidentGrew, NoteAdded,
    NotificationMedium, OrderAcknowledged, OrderAssigned, OrderReturned, OrderStatus,
    OrderWithdrawn, PowerRestored, TicketNoted, TicketUrgeNoted, WorkCompleted, WorkOrderView,
    crew_action::Action,
};
use lineguard_protos::intake::v1::{Channel, TicketReported, TicketUrged};
use lineguard_protos::routing::v1::{Crew, TicketRouted, TicketRoutingClosed};
use lineguard_runtime::calendar::Calendar;
use lineguard_runtime::locks::StripedLocks;
use prost::Message;
use prost_types::Timestamp;
use tonic::Status;

use crate::projection::{
    closed_key, crew_key, crew_stream, incident_tickets_prefix, order_key, ticket_key,
};

/// Longest free text of an action (notes, cause, result), in characters.
pub const MAX_TEXT_CHARS: usize = 2_000;
/// Most parts listed on a completion.
pub const MAX_PARTS: usize = 100;
/// Longest action id.
pub const MAX_ACTION_ID: usize = 128;
/// Tickets one order lists at most (an incident's children beyond are
/// counted in `IncidentGrew` but not listed).
pub const MAX_TICKETS_PER_ORDER: usize = 10_000;

/// Locks a consumer's decision holds until its commit has landed.
pub type Hold = Vec<tokio::sync::OwnedMutexGuard<()>>;

/// Dispatch's shared state.
#[derive(Clone)]
pub struct Dispatcher {
    log: EventLog,
    locks: Arc<StripedLocks>,
    /// How far a live action's device time may be from its receipt (see
    /// [`crate::device_clock`]).
    device_skew: std::time::Duration,
    /// The working calendar restoration limits in working days count by.
    calendar: Arc<Calendar>,
    /// Where dispatch reads the time (the process clock but in tests).
    clock: Clock,
}

fn system() -> Actor {
    actor(ActorKind::System, "dispatch")
}

use lineguard_eventlog::timers::nanos;

/// How a customer who came through `channel` hears of progress.
pub fn medium(channel: Channel) -> NotificationMedium {
    match channel {
        Channel::App => NotificationMedium::AppPush,
        Channel::Wechat => NotificationMedium::Wechat,
        _ => NotificationMedium::Sms,
    }
}

fn is_active(status: OrderStatus) -> bool {
    matches!(
        status,
        OrderStatus::Assigned
            | OrderStatus::Acknowledged
            | OrderStatus::EnRoute
            | OrderStatus::OnSite
    )
}

impl Dispatcher {
    pub fn new(log: EventLog) -> Self {
        Dispatcher {
            log,
            locks: Arc::new(StripedLocks::new(1024)),
            device_skew: crate::device_clock::DEFAULT_SKEW,
            calendar: Arc::new(Calendar::default()),
            clock: Clock::process(),
        }
    }

    /// The same dispatcher, reading the time from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The current time by dispatch's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The same dispatcher, counting working days by `calendar`.
    pub fn with_calendar(mut self, calendar: Arc<Calendar>) -> Self {
        self.calendar = calendar;
        self
    }

    /// The same dispatcher, accepting device times within `skew` of receipt.
    pub fn with_device_skew(mut self, skew: std::time::Duration) -> Self {
        self.device_skew = skew;
        self
    }

    /// Holds the order's lock: decisions about one order, one at a time.
    pub async fn lock(&self, order_id: &str) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        self.locks.lock(&[order_id.to_string()]).await
    }

    /// Dispatch's own log.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    fn get<M: Message + Default>(&self, key: &[u8]) -> Result<Option<M>, Status> {
        match self.log.projection_get(key).map_err(Status::from)? {
            Some(bytes) => M::decode(bytes.as_slice())
                .map(Some)
                .map_err(|e| Status::data_loss(format!("undecodable view: {e}"))),
            None => Ok(None),
        }
    }

    /// An order's view.
    pub fn order(&self, order_id: &str) -> Result<Option<WorkOrderView>, Status> {
        self.get(&order_key(order_id))
    }

    /// The order `id` names: an order (a case) id, or a ticket whose case
    /// (the ticket itself, or the incident it leads or joined) has one.
    /// `NOT_FOUND` says what `id` is when there is no such order.
    pub fn resolve_order(&self, id: &str) -> Result<WorkOrderView, Status> {
        if let Some(order) = self.order(id)? {
            return Ok(order);
        }
        let known_as = match self.get::<TicketNoted>(&ticket_key(id))? {
            Some(noted) if !noted.incident_id.is_empty() => {
                if let Some(order) = self.order(&noted.incident_id)? {
                    return Ok(order);
                }
                KnownAs::TicketOfIncident(noted.incident_id)
            }
            Some(_) => KnownAs::Ticket,
            None => KnownAs::Unknown,
        };
        Err(case_ids::not_found("dispatch", "work order", id, &known_as))
    }

    /// The last hop routing closed `case` at, as dispatch heard of it.
    fn closed_at_hop(&self, case: &str) -> Result<Option<u32>, Status> {
        let Some(bytes) = self
            .log
            .projection_get(&closed_key(case))
            .map_err(Status::from)?
        else {
            return Ok(None);
        };
        let hop: [u8; 4] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| Status::data_loss(format!("undecodable closed hop of {case}")))?;
        Ok(Some(u32::from_be_bytes(hop)))
    }

    /// Whether dispatch has heard of this ticket from intake.
    pub fn ticket_known(&self, ticket_id: &str) -> Result<bool, Status> {
        Ok(self
            .log
            .projection_get(&ticket_key(ticket_id))
            .map_err(Status::from)?
            .is_some())
    }

    /// Whether routing's directory (as dispatch heard of it) has this crew.
    pub fn crew_known(&self, crew_id: &str) -> Result<bool, Status> {
        Ok(self.get::<CrewNoted>(&crew_key(crew_id))?.is_some())
    }

    /// The station a crew belongs to, as dispatch heard from routing.
    pub fn crew_station(&self, crew_id: &str) -> Result<Option<String>, Status> {
        Ok(self
            .get::<CrewNoted>(&crew_key(crew_id))?
            .map(|crew| crew.station_id))
    }

    /// The tickets dispatch knows to belong to an incident, lead first.
    fn incident_tickets(
        &self,
        incident: &str,
        lead: Option<CoveredTicket>,
    ) -> Result<Vec<CoveredTicket>, Status> {
        let prefix = incident_tickets_prefix(incident);
        let keys = self
            .log
            .projection_scan(&prefix, None, MAX_TICKETS_PER_ORDER)
            .map_err(Status::from)?;
        let lead_id = lead
            .as_ref()
            .map(|t| t.ticket_id.clone())
            .unwrap_or_default();
        let mut tickets = Vec::with_capacity(keys.len() + 1);
        tickets.extend(lead);
        for (key, _) in keys {
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if id != lead_id
                && let Some(noted) = self.get::<TicketNoted>(&ticket_key(&id))?
            {
                tickets.extend(noted.ticket);
            }
        }
        Ok(tickets)
    }

    /// A crew of routing's directory, noted for dispatch.
    pub fn crew_defined(&self, crew: &Crew) -> Transaction {
        let noted = CrewNoted {
            crew_id: crew.crew_id.clone(),
            station_id: crew.station_id.clone(),
        };
        // Not on the crew's stream: that holds only what the phone shows.
        Transaction::append(
            "crews",
            ExpectedVersion::Any,
            vec![NewEvent::new(&noted, "crews", system()).unpublished()],
        )
    }

    /// What a route means for the crews: a new order, or an order moving
    /// from one crew to another.
    pub async fn routed(
        &self,
        routed: &TicketRouted,
        cause: &str,
    ) -> Result<Option<(Transaction, Hold)>, Status> {
        if !routed.field_work {
            return Ok(None);
        }
        let order_id = routed.case_id.as_str();
        let hold = self.locks.lock_owned(&[order_id.to_string()]).await;
        let existing = self.order(order_id)?;
        // The bus may deliver routing's events out of order: a route of a
        // hop the order has already passed, or of a hop routing has since
        // closed, changes nothing (a closed case comes back only through a
        // reopen, which is a newer hop).
        if let Some(o) = &existing
            && routed.hop <= o.hop
        {
            tracing::info!(
                order_id,
                correlation_id = order_id,
                hop = routed.hop,
                order_hop = o.hop,
                "route of an older hop ignored"
            );
            return Ok(None);
        }
        if let Some(closed) = self.closed_at_hop(order_id)?
            && routed.hop <= closed
        {
            tracing::info!(
                order_id,
                correlation_id = order_id,
                hop = routed.hop,
                closed_hop = closed,
                "route of a closed hop ignored"
            );
            return Ok(None);
        }
        if routed.crew_id.is_empty() {
            tracing::warn!(
                order_id,
                correlation_id = order_id,
                "field work routed with no crew to send"
            );
        }
        let mut events: Vec<(String, NewEvent)> = Vec::new();
        if let Some(o) = &existing
            && is_active(o.status())
        {
            if o.crew_id == routed.crew_id {
                return Ok(None); // the same crew keeps it: nothing for them to hear
            }
            let withdrawn = OrderWithdrawn {
                order_id: order_id.to_string(),
                crew_id: o.crew_id.clone(),
                reason: format!(
                    "moved to line {} ({}), crew {}",
                    routed.line, routed.assignee_id, routed.crew_id
                ),
                withdrawn_at: Some(self.now()),
            };
            let stream = crew_stream(&o.crew_id);
            events.push((
                stream.clone(),
                NewEvent::new(&withdrawn, order_id, system()).caused_by(cause),
            ));
        }
        if !routed.crew_id.is_empty() {
            // Routing's event can overtake intake's on the bus: wait for the
            // ticket (the consumer retries), so the crew hears who called.
            let Some(lead) = self.get::<TicketNoted>(&ticket_key(&routed.lead_ticket_id))? else {
                return Err(Status::unavailable(format!(
                    "ticket {} not yet heard of from intake",
                    routed.lead_ticket_id
                )));
            };
            let tickets = if routed.incident_id.is_empty() {
                lead.ticket.into_iter().collect()
            } else {
                self.incident_tickets(&routed.incident_id, lead.ticket)?
            };
            let arrival_due_at = routed
                .deadlines
                .iter()
                .find(|d| d.clock == "arrival")
                .and_then(|d| d.due_at);
            let restoration = routed.limits.iter().find(|l| l.clock == "restoration");
            let restoration_limit_seconds = restoration.map_or(0, |l| l.seconds);
            let restoration_limit_working_days = restoration.map_or(0, |l| l.working_days);
            let assigned = OrderAssigned {
                order_id: order_id.to_string(),
                crew_id: routed.crew_id.clone(),
                incident_id: routed.incident_id.clone(),
                kind: routed.kind,
                district_id: routed.district_id.clone(),
                station_id: routed.station_id.clone(),
                line: routed.line,
                hop: routed.hop,
                tickets,
                reported_at: routed.reported_at,
                assigned_at: Some(self.now()),
                arrival_due_at,
                restoration_limit_seconds,
                restoration_limit_working_days,
                policy_version: routed.policy_version.clone(),
                warn_at_percent: routed.warn_at_percent.clone(),
            };
            events.push((
                crew_stream(&routed.crew_id),
                NewEvent::new(&assigned, order_id, system()).caused_by(cause),
            ));
        }
        Ok(Some((transaction(events), hold)))
    }

    /// Routing closed the ticket (returned as not ours, cancelled): the crew
    /// stops.
    pub async fn routing_closed(
        &self,
        closed: &TicketRoutingClosed,
        cause: &str,
    ) -> Result<Option<(Transaction, Hold)>, Status> {
        let order_id = closed.case_id.as_str();
        let hold = self.locks.lock_owned(&[order_id.to_string()]).await;
        let order = self.order(order_id)?;
        // A closing of a hop older than the order's is about work already
        // moved on (delivered late): the newer hop's order stands.
        if let Some(o) = &order
            && closed.hop != 0
            && closed.hop < o.hop
        {
            return Ok(None);
        }
        let mut events = Vec::with_capacity(2);
        if closed.hop != 0 {
            let noted = CaseClosedNoted {
                case_id: order_id.to_string(),
                hop: closed.hop,
            };
            events.push((
                order_id.to_string(),
                NewEvent::new(&noted, order_id, system())
                    .caused_by(cause)
                    .unpublished(),
            ));
        }
        if let Some(o) = order.filter(|o| is_active(o.status())) {
            let withdrawn = OrderWithdrawn {
                order_id: order_id.to_string(),
                crew_id: o.crew_id.clone(),
                reason: closed.reason.clone(),
                withdrawn_at: Some(self.now()),
            };
            events.push((
                crew_stream(&o.crew_id),
                NewEvent::new(&withdrawn, order_id, system()).caused_by(cause),
            ));
        }
        if events.is_empty() {
            return Ok(None);
        }
        Ok(Some((transaction(events), hold)))
    }

    /// A ticket intake took in: noted (channel, account, incident); a child
    /// joining an incident a crew already has is news for that crew.
    pub async fn ticket_reported(
        &self,
        reported: &TicketReported,
        cause: &str,
    ) -> Result<(Transaction, Hold), Status> {
        let caller = reported.caller.clone().unwrap_or_default();
        let ticket = CoveredTicket {
            ticket_id: reported.ticket_id.clone(),
            channel: reported.channel,
            account_number: reported.account_number.clone(),
            // Plain only in reports recorded before sealing; since, the
            // sealed contact alone (opened for crews by intake).
            address: reported.address.clone(),
            description: reported.description.clone(),
            caller_name: caller.name,
            callback_phone: caller.phone,
            urge_count: 0,
            contact: reported.contact.clone(),
            customer_data_erased: false,
        };
        let noted = TicketNoted {
            ticket: Some(ticket.clone()),
            incident_id: reported.incident_id.clone(),
        };
        let mut events = vec![(
            reported.ticket_id.clone(),
            NewEvent::new(&noted, &reported.ticket_id, system())
                .caused_by(cause)
                .unpublished(),
        )];
        let mut hold = Hold::new();
        if !reported.incident_id.is_empty() && !reported.incident_lead {
            // Held until committed: an assignment being decided now either
            // sees this ticket noted, or is seen here and told it grew.
            hold = self
                .locks
                .lock_owned(std::slice::from_ref(&reported.incident_id))
                .await;
            if let Some(o) = self
                .order(&reported.incident_id)?
                .filter(|o| is_active(o.status()))
            {
                let grew = IncidentGrew {
                    order_id: o.order_id.clone(),
                    crew_id: o.crew_id.clone(),
                    ticket: Some(ticket),
                    ticket_count: o.tickets.len() as u32 + 1,
                };
                events.push((
                    crew_stream(&o.crew_id),
                    NewEvent::new(&grew, &o.order_id, system()).caused_by(cause),
                ));
            }
        }
        Ok((transaction(events), hold))
    }

    /// A customer chased a ticket (already noted: see
    /// [`Dispatcher::ticket_noted`]): the urge is counted on the ticket, so
    /// an order made later starts with it, and the crew holding the ticket
    /// now, if any, hears of it.
    pub async fn ticket_urged(
        &self,
        urged: &TicketUrged,
        cause: &str,
    ) -> Result<(Transaction, Hold), Status> {
        let incident_id = self
            .get::<TicketNoted>(&ticket_key(&urged.ticket_id))?
            .map(|n| n.incident_id)
            .unwrap_or_default();
        let order_id = if incident_id.is_empty() {
            urged.ticket_id.clone()
        } else {
            incident_id.clone()
        };
        // Held until committed: an assignment being decided now either sees
        // this urge noted, or is seen here and its crew told.
        let hold = self.locks.lock_owned(std::slice::from_ref(&order_id)).await;
        let noted = TicketUrgeNoted {
            ticket_id: urged.ticket_id.clone(),
            incident_id,
            urge_count: urged.urge_count,
            urged_at: urged.urged_at,
        };
        let mut events = vec![(
            urged.ticket_id.clone(),
            NewEvent::new(&noted, &urged.ticket_id, system())
                .caused_by(cause)
                .unpublished(),
        )];
        if let Some(o) = self.order(&order_id)?.filter(|o| is_active(o.status())) {
            let event = CustomerUrged {
                order_id: order_id.clone(),
                crew_id: o.crew_id.clone(),
                ticket_id: urged.ticket_id.clone(),
                urge_count: urged.urge_count,
            };
            events.push((
                crew_stream(&o.crew_id),
                NewEvent::new(&event, &order_id, system()).caused_by(cause),
            ));
        }
        Ok((transaction(events), hold))
    }

    /// Whether intake's report of `ticket_id` has been noted here.
    pub fn ticket_noted(&self, ticket_id: &str) -> Result<bool, Status> {
        Ok(self.get::<TicketNoted>(&ticket_key(ticket_id))?.is_some())
    }

    /// Applies one crew action: checks who may do what when, commits its
    /// events with the action's idempotency record, answers with the order.
    /// `offline`: the action comes in a batch queued on the phone (its
    /// device time may be older than the skew; see [`crate::device_clock`]).
    pub async fn act(
        &self,
        action: &Action,
        offline: bool,
        acted_by: Option<lineguard_eventlog::Actor>,
    ) -> Result<WorkOrderView, Status> {
        let header = crate::validate::action(action)?;
        let key = format!("action:{}:{}", header.crew_id, header.action_id);
        let fingerprint = action_fingerprint(action);
        let probe = Idempotency::new(key.clone(), &fingerprint, Bytes::new());
        match self.log.idempotent_response(&probe) {
            Ok(Some(bytes)) => return decode_view(&bytes),
            Ok(None) => {}
            Err(LogError::IdempotencyConflict { .. }) => {
                return Err(action_id_reused(&header.action_id));
            }
            Err(e) => return Err(e.into()),
        }
        // The id may name the order's ticket or incident: lock the order
        // itself, then read it again under the lock.
        let order_id = self.resolve_order(&header.order_id)?.order_id;
        let order_id = order_id.as_str();
        let _guard = self.locks.lock(&[order_id.to_string()]).await;
        let order = self.resolve_order(order_id)?;
        if !self.crew_known(&header.crew_id)? {
            return Err(Status::not_found(format!(
                "crew {} not found",
                header.crew_id
            )));
        }
        if order.crew_id != header.crew_id {
            return Err(Status::permission_denied(format!(
                "work order {order_id} is crew {}'s, not {}'s",
                order.crew_id, header.crew_id
            )));
        }
        if order.status() == OrderStatus::Withdrawn {
            return Err(Status::permission_denied(format!(
                "work order {order_id} was withdrawn from crew {}",
                header.crew_id
            )));
        }
        let judged = crate::device_clock::judge(
            &header.device_time.unwrap_or_default(),
            &self.now(),
            &crate::device_clock::Bounds {
                assigned_at: order.assigned_at,
                previous: order.last_judged_at.or(order.last_device_time),
            },
            offline,
            self.device_skew,
        );
        if judged.adjusted {
            tracing::warn!(order_id, correlation_id = order_id, crew_id = %header.crew_id,
                action_id = %header.action_id, "device clock outside the accepted skew; time adjusted");
        }
        let (events, view) = decide(&order, action, header, &judged, &self.calendar, acted_by)?;
        let txn = Transaction::append(order_id, ExpectedVersion::Any, events).idempotent(
            Idempotency::new(key, &fingerprint, Bytes::from(view.encode_to_vec())),
        );
        match self.log.commit(txn).await {
            Ok(CommitOutcome::Committed(_)) => {
                tracing::info!(order_id, correlation_id = order_id, crew_id = %header.crew_id,
                    action_id = %header.action_id, status = ?view.status(), "crew action applied");
                Ok(view)
            }
            Ok(CommitOutcome::Duplicate { response, .. }) => decode_view(&response),
            Ok(CommitOutcome::AlreadyProcessed) => {
                Err(Status::internal("unexpected inbox outcome"))
            }
            Err(LogError::IdempotencyConflict { .. }) => Err(action_id_reused(&header.action_id)),
            Err(e) => Err(e.into()),
        }
    }
}

fn transaction(events: Vec<(String, NewEvent)>) -> Transaction {
    let mut txn = Transaction::default();
    for (stream, event) in events {
        txn = txn.and_append(stream, ExpectedVersion::Any, vec![event]);
    }
    txn
}

fn decode_view(bytes: &[u8]) -> Result<WorkOrderView, Status> {
    WorkOrderView::decode(bytes)
        .map_err(|e| Status::data_loss(format!("undecodable stored answer: {e}")))
}

fn action_id_reused(action_id: &str) -> Status {
    Status::already_exists(format!(
        "action_id {action_id} was already used for a different action"
    ))
}

/// The bytes an action is recognised by: its kind and its whole content.
fn action_fingerprint(action: &Action) -> Vec<u8> {
    lineguard_protos::dispatch::v1::CrewAction {
        action: Some(action.clone()),
    }
    .encode_to_vec()
}

fn precondition(order: &WorkOrderView, what: &str) -> Status {
    Status::failed_precondition(format!(
        "work order {} is {}: {what}",
        order.order_id,
        order.status().as_str_name()
    ))
}

/// The events an action makes and the order as it will stand.
fn decide(
    order: &WorkOrderView,
    action: &Action,
    header: &lineguard_protos::dispatch::v1::ActionHeader,
    judged: &crate::device_clock::Judged,
    calendar: &Calendar,
    acted_by: Option<lineguard_eventlog::Actor>,
) -> Result<(Vec<NewEvent>, WorkOrderView), Status> {
    use OrderStatus as S;
    // The authenticated phone (or dispatcher) that acted; the crew the
    // header names only on a server without credentials.
    let who = acted_by.unwrap_or_else(|| actor(ActorKind::Crew, &header.crew_id));
    let order_id = order.order_id.clone();
    let crew_id = header.crew_id.clone();
    let action_id = header.action_id.clone();
    let device_time = header.device_time;
    let received_at = Some(judged.received_at);
    let judged_at = Some(judged.judged_at);
    let device_clock_adjusted = judged.adjusted;
    let status = order.status();
    let mut view = order.clone();
    view.last_device_time = device_time;
    view.last_judged_at = judged_at;
    let mut events = Vec::new();
    match action {
        Action::Acknowledge(_) => {
            if status != S::Assigned {
                return Err(precondition(order, "it was already acknowledged"));
            }
            view.status = S::Acknowledged as i32;
            view.acknowledged_at = judged_at;
            events.push(NewEvent::new(
                &OrderAcknowledged {
                    order_id: order_id.clone(),
                    crew_id,
                    action_id,
                    device_time,
                    received_at,
                    judged_at,
                    device_clock_adjusted,
                    recorded_at: received_at,
                },
                &order_id,
                who,
            ));
        }
        Action::Depart(_) => {
            match status {
                S::Acknowledged => {}
                S::Assigned => return Err(precondition(order, "acknowledge it before departing")),
                _ => return Err(precondition(order, "the crew has already departed")),
            }
            view.status = S::EnRoute as i32;
            view.departed_at = judged_at;
            events.push(NewEvent::new(
                &CrewDeparted {
                    order_id: order_id.clone(),
                    crew_id,
                    action_id,
                    device_time,
                    received_at,
                    judged_at,
                    device_clock_adjusted,
                },
                &order_id,
                who,
            ));
        }
        Action::Arrive(a) => {
            match status {
                S::Acknowledged | S::EnRoute => {}
                S::Assigned => return Err(precondition(order, "arriving before acknowledging")),
                _ => return Err(precondition(order, "the crew has already arrived")),
            }
            let on_time = match (&order.arrival_due_at, &judged_at) {
                (Some(due), Some(at)) => nanos(at) <= nanos(due),
                _ => true,
            };
            view.status = S::OnSite as i32;
            view.arrived_at = judged_at;
            let restoration_due_at = if order.restoration_limit_working_days > 0 {
                Some(
                    calendar
                        .add_working_days(&judged.judged_at, order.restoration_limit_working_days),
                )
            } else if order.restoration_limit_seconds > 0 {
                Some(Timestamp {
                    seconds: judged.judged_at.seconds + order.restoration_limit_seconds as i64,
                    nanos: judged.judged_at.nanos,
                })
            } else {
                None
            };
            view.restoration_due_at = restoration_due_at;
            events.push(NewEvent::new(
                &CrewArrived {
                    order_id: order_id.clone(),
                    crew_id,
                    action_id,
                    device_time,
                    received_at,
                    judged_at,
                    device_clock_adjusted,
                    position: a.position,
                    on_time,
                    restoration_due_at,
                },
                &order_id,
                who,
            ));
        }
        Action::UpdateEtr(u) => {
            if !matches!(status, S::Acknowledged | S::EnRoute | S::OnSite) {
                return Err(precondition(
                    order,
                    "an estimate needs an acknowledged, unrestored order",
                ));
            }
            view.estimated_restoration = u.estimated_restoration;
            events.push(NewEvent::new(
                &EtrUpdated {
                    order_id: order_id.clone(),
                    crew_id,
                    action_id,
                    device_time,
                    received_at,
                    judged_at,
                    device_clock_adjusted,
                    estimated_restoration: u.estimated_restoration,
                },
                &order_id,
                who,
            ));
        }
        Action::Restore(_) => {
            if status != S::OnSite {
                return Err(precondition(order, "restoring before arriving"));
            }
            let on_time = match (&order.restoration_due_at, &judged_at) {
                (Some(due), Some(at)) => nanos(at) <= nanos(due),
                _ => true,
            };
            view.status = S::Restored as i32;
            view.restored_at = judged_at;
            let ticket_ids = order.tickets.iter().map(|t| t.ticket_id.clone()).collect();
            events.push(NewEvent::new(
                &PowerRestored {
                    order_id: order_id.clone(),
                    crew_id,
                    action_id,
                    device_time,
                    received_at,
                    judged_at,
                    device_clock_adjusted,
                    on_time,
                    ticket_ids,
                },
                &order_id,
                who.clone(),
            ));
            events.extend(notifications(order, "restored", &who));
        }
        Action::Complete(c) => {
            if !matches!(status, S::OnSite | S::Restored) {
                return Err(precondition(order, "completing before arriving"));
            }
            view.status = S::Completed as i32;
            view.completed_at = judged_at;
            let ticket_ids = order.tickets.iter().map(|t| t.ticket_id.clone()).collect();
            events.push(NewEvent::new(
                &WorkCompleted {
                    order_id: order_id.clone(),
                    crew_id,
                    action_id,
                    device_time,
                    received_at,
                    judged_at,
                    device_clock_adjusted,
                    cause: c.cause.clone(),
                    result: c.result.clone(),
                    parts_used: c.parts_used.clone(),
                    notes: c.notes.clone(),
                    ticket_ids,
                },
                &order_id,
                who.clone(),
            ));
            events.extend(notifications(order, "completed", &who));
        }
        Action::ReturnOrder(r) => {
            if !is_active(status) {
                return Err(precondition(order, "only an open order can be returned"));
            }
            view.status = S::Returned as i32;
            events.push(NewEvent::new(
                &OrderReturned {
                    order_id: order_id.clone(),
                    crew_id,
                    action_id,
                    device_time,
                    received_at,
                    judged_at,
                    device_clock_adjusted,
                    reason: r.reason.clone(),
                    correct_district_id: r.correct_district_id.clone(),
                    note: r.note.clone(),
                },
                &order_id,
                who,
            ));
        }
        Action::AddNote(n) => {
            events.push(NewEvent::new(
                &NoteAdded {
                    order_id: order_id.clone(),
                    crew_id,
                    action_id,
                    device_time,
                    received_at,
                    judged_at,
                    device_clock_adjusted,
                    text: n.text.clone(),
                },
                &order_id,
                who,
            ));
        }
    }
    Ok((events, view))
}

/// One notification per ticket the order covers (an incident: every caller).
fn notifications(order: &WorkOrderView, what: &str, who: &Actor) -> Vec<NewEvent> {
    order
        .tickets
        .iter()
        .map(|t| {
            let request = CustomerNotificationRequested {
                ticket_id: t.ticket_id.clone(),
                order_id: order.order_id.clone(),
                medium: medium(t.channel()) as i32,
                what: what.to_string(),
            };
            NewEvent::new(&request, &t.ticket_id, who.clone())
        })
        .collect()
}
