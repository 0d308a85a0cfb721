//! The `lineguard.intake.v1.Intake` gRPC service.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lineguard_eventlog::{
    ActorKind, EventLog, ExpectedVersion, Idempotency, NewEvent, Transaction, actor, blocking,
};
use lineguard_protos::case_ids::{self, KnownAs};

use crate::customer::CustomerDigest;
use crate::sealing::{self, KeyStore, SealError};
use lineguard_bus::partition::case_id;
use lineguard_protos::intake::v1::intake_client::IntakeClient;
use lineguard_protos::intake::v1::{
    Caller, CancelTicketRequest, CancelTicketResponse, Channel, Contact, CustomerDataErased,
    Disposition, EraseCustomerRequest, EraseCustomerResponse, GetTicketRequest, GetTicketResponse,
    IncidentMarkedProbableOutage, IncidentOpened, IncidentView, ListTicketsRequest,
    ListTicketsResponse, ReportTicketRequest, ReportTicketResponse, SealedContact, TicketCancelled,
    TicketJoinedIncident, TicketKind, TicketReported, TicketStatus, TicketUrged, TicketView,
    UnsealContactsRequest, UnsealContactsResponse, UnsealedContact,
    intake_server::{Intake, IntakeServer},
};
use lineguard_runtime::auth::{acting, caller};
use lineguard_runtime::partitions::{Page, Partitions};

use crate::partitioned::{StationOfDistrict, listing_key};
use prost::Message;
use prost_types::Timestamp;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::projection::{
    BY_TIME_PREFIX, account_key, customer_tickets_prefix, district_incident_key, follow_incident,
    incident_key, is_open, nanos, open_key, ticket_id_of_by_time_key, ticket_key,
};
use crate::validate;
use lineguard_eventlog::ProjectionRead;
use lineguard_eventlog::command::{commit_idempotent, decide_idempotent, earlier_answer};
use lineguard_runtime::locks::StripedLocks;

/// Intake's policy knobs.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    /// Fault calls from one district within this time of the incident's last
    /// call join it.
    pub correlation_window: Duration,
    /// Calls in one incident that make it a probable outage.
    pub outage_threshold: u32,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            correlation_window: Duration::from_secs(10 * 60),
            outage_threshold: 3,
        }
    }
}

/// Default and largest page of `ListTickets`.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1_000;
/// Index entries one `ListTickets` call examines at most, so that a filter
/// matching little costs a bounded amount per call (the token resumes).
pub const MAX_SCANNED_PER_LIST: usize = 20_000;

/// Contacts one `UnsealContacts` call opens at most.
pub const MAX_UNSEAL: usize = 1_000;
/// Tickets one `EraseCustomer` call marks erased at most per customer key
/// (the key is destroyed whatever the count; a second call marks the rest).
pub const MAX_ERASED_TICKETS: usize = 100_000;
/// `CustomerDataErased` events per commit while erasing.
const ERASED_PER_COMMIT: usize = 500;

/// Serves intake over one [`EventLog`]. Cheap to clone (the log and the
/// locks are shared): a handler hands a clone to the blocking pool, so no
/// RocksDB read ever runs on one of the async runtime's worker threads.
#[derive(Clone)]
pub struct IntakeService {
    log: EventLog,
    config: IntakeConfig,
    locks: Arc<StripedLocks>,
    customers: CustomerDigest,
    keys: Arc<dyn KeyStore>,
    partitions: Partitions,
    stations: Arc<StationOfDistrict>,
}

fn seal_error(e: SealError) -> Status {
    match e {
        SealError::NoKey(_) => Status::failed_precondition(e.to_string()),
        SealError::Corrupt(..) => Status::data_loss(e.to_string()),
        SealError::MasterKey { .. } | SealError::Store(_) => Status::unavailable(e.to_string()),
    }
}

impl IntakeService {
    /// A service over `log`, recognising repeat callers by `customers`,
    /// sealing their data with keys from `keys`.
    pub fn new(
        log: EventLog,
        config: IntakeConfig,
        customers: CustomerDigest,
        keys: Arc<dyn KeyStore>,
    ) -> Self {
        IntakeService {
            log,
            config,
            locks: Arc::new(StripedLocks::new(1024)),
            customers,
            keys,
            partitions: Partitions::sole(crate::SERVICE),
            stations: Arc::new(StationOfDistrict::new(None)),
        }
    }

    /// The same service as one of `partitions`: a report is taken by the
    /// partition owning its district's station (asked of routing over
    /// `routing`), a ticket is answered by the partition that opened it,
    /// and a listing or an erasure covers every partition.
    pub fn in_partitions(
        mut self,
        partitions: Partitions,
        routing: Option<tonic::transport::Channel>,
    ) -> Self {
        self.partitions = partitions;
        self.stations = Arc::new(StationOfDistrict::new(routing));
        self
    }

    /// Where a report of `district_id` is taken: this partition (`None`)
    /// or the channel to the one owning the district's station.
    async fn report_owner<T>(
        &self,
        request: &Request<T>,
        district_id: &str,
    ) -> Result<Option<tonic::transport::Channel>, Status> {
        if self.partitions.count() == 1 || Partitions::was_forwarded(request) {
            return Ok(None);
        }
        let station = if district_id.is_empty() {
            String::new()
        } else {
            self.stations.station(district_id).await?
        };
        self.partitions
            .route(request, self.partitions.owner_of_station(&station))
    }

    /// One page of tickets from every partition, merged by report time.
    async fn gather_list(
        &self,
        request: Request<ListTicketsRequest>,
        page_size: usize,
    ) -> Result<ListTicketsResponse, Status> {
        let page = self
            .partitions
            .gather(
                &request,
                &request.get_ref().page_token,
                page_size,
                |cursor| cursor.as_bytes().starts_with(BY_TIME_PREFIX),
                listing_key,
                |channel, one| {
                    let this = self.clone();
                    async move {
                        let answer = match channel {
                            None => this.list_tickets(one).await?,
                            Some(channel) => IntakeClient::new(channel).list_tickets(one).await?,
                        }
                        .into_inner();
                        Ok(Page {
                            items: answer.tickets,
                            next_page_token: answer.next_page_token,
                        })
                    }
                },
            )
            .await?;
        Ok(ListTicketsResponse {
            tickets: page.items,
            next_page_token: page.next_page_token,
        })
    }

    /// Opens a view's sealed contact into its caller, address and
    /// description (or marks it erased) and drops the sealed bytes: what
    /// is answered, never what is stored.
    fn open_view(&self, ticket: &mut TicketView) -> Result<(), Status> {
        let Some(sealed) = ticket.sealed_contact.take() else {
            return Ok(());
        };
        match sealing::open(self.keys.as_ref(), &sealed) {
            Ok(contact) => {
                ticket.address = contact.address;
                ticket.description = contact.description;
                ticket.caller = Some(Caller {
                    name: contact.caller_name,
                    phone: contact.caller_phone,
                });
                Ok(())
            }
            Err(SealError::NoKey(_)) => {
                ticket.customer_data_erased = true;
                Ok(())
            }
            Err(e) => Err(seal_error(e)),
        }
    }

    /// [`Self::open_view`] for every ticket of an answer.
    fn open_answer(&self, answer: &mut GetTicketResponse) -> Result<(), Status> {
        match &mut answer.ticket {
            Some(ticket) => self.open_view(ticket),
            None => Ok(()),
        }
    }

    /// Destroys the data key of `customer` and marks each of its tickets
    /// erased. The key goes first: once it is gone nothing can read the
    /// data, whether or not the marks are all written (a second call
    /// writes the missing ones).
    fn erase(
        &self,
        customer: &str,
        erased_by: &lineguard_eventlog::Actor,
        reason: &str,
    ) -> Result<(bool, Vec<String>), Status> {
        let destroyed = self.keys.destroy(customer).map_err(seal_error)?;
        let prefix = customer_tickets_prefix(customer);
        let mut tickets = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        while tickets.len() < MAX_ERASED_TICKETS {
            let page = self
                .log
                .projection_scan(&prefix, after.as_deref(), 1_000)
                .map_err(Status::from)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, _) in &page {
                // `customer-ticket/<customer>/<ticket id>`
                let Some(ticket_id) = std::str::from_utf8(key)
                    .ok()
                    .and_then(|k| k.rsplit('/').next())
                else {
                    continue;
                };
                let marked = self
                    .view::<TicketView>(&ticket_key(ticket_id))?
                    .is_some_and(|t| t.customer_data_erased);
                if !marked {
                    tickets.push(ticket_id.to_string());
                }
            }
        }
        let at = now();
        for chunk in tickets.chunks(ERASED_PER_COMMIT) {
            let mut txn: Option<Transaction> = None;
            for ticket_id in chunk {
                let erased = CustomerDataErased {
                    ticket_id: ticket_id.clone(),
                    customer_key: customer.to_string(),
                    erased_at: Some(at),
                    erased_by: erased_by.id.clone(),
                    reason: reason.to_string(),
                };
                let events = vec![NewEvent::new(&erased, ticket_id, erased_by.clone())];
                txn = Some(match txn {
                    None => Transaction::append(ticket_id, ExpectedVersion::StreamExists, events),
                    Some(t) => t.and_append(ticket_id, ExpectedVersion::StreamExists, events),
                });
            }
            if let Some(txn) = txn {
                self.log.commit_blocking(txn).map_err(Status::from)?;
            }
        }
        Ok((destroyed, tickets))
    }

    /// The tonic server.
    pub fn server(self) -> IntakeServer<IntakeService> {
        IntakeServer::new(self)
    }

    fn view<M: Message + Default>(&self, key: &[u8]) -> Result<Option<M>, Status> {
        read_view(&self.log, key)
    }

    /// A ticket's customer-facing view; a child of an incident shows its
    /// incident's progress (it is not routed on its own).
    fn ticket(&self, ticket_id: &str) -> Result<Option<TicketView>, Status> {
        let Some(mut ticket) = self.view::<TicketView>(&ticket_key(ticket_id))? else {
            return Ok(None);
        };
        if !ticket.incident_lead
            && !ticket.incident_id.is_empty()
            && let Some(incident) = self.view::<IncidentView>(&incident_key(&ticket.incident_id))?
            && let Some(lead) = self.view::<TicketView>(&ticket_key(&incident.lead_ticket_id))?
        {
            follow_incident(&mut ticket, &lead);
        }
        // Not yet with an owner: the customer has been waiting since the call.
        if ticket.routed_at.is_none()
            && is_open(ticket.status())
            && let Some(reported) = &ticket.reported_at
        {
            let waited = nanos(&now()) - nanos(reported);
            ticket.waiting_seconds = u64::try_from(waited / 1_000_000_000).unwrap_or(0);
        }
        Ok(Some(ticket))
    }

    /// The ticket `id` names, with the case it belongs to: a ticket id, or
    /// an incident id (its lead ticket). `NOT_FOUND` says which it is not.
    fn ticket_or_incident(&self, id: &str) -> Result<GetTicketResponse, Status> {
        let (ticket, incident) = match self.ticket(id)? {
            Some(ticket) => {
                let incident = if ticket.incident_id.is_empty() {
                    None
                } else {
                    self.view::<IncidentView>(&incident_key(&ticket.incident_id))?
                };
                (ticket, incident)
            }
            None => {
                let Some(incident) = self.view::<IncidentView>(&incident_key(id))? else {
                    return Err(case_ids::not_found(
                        "intake",
                        "ticket",
                        id,
                        &KnownAs::Unknown,
                    ));
                };
                let ticket = self.ticket(&incident.lead_ticket_id)?.ok_or_else(|| {
                    Status::data_loss(format!(
                        "incident {id} names lead ticket {}, which intake has no view of",
                        incident.lead_ticket_id
                    ))
                })?;
                (ticket, Some(incident))
            }
        };
        let case_id = match &incident {
            Some(incident) => incident.incident_id.clone(),
            None => ticket.ticket_id.clone(),
        };
        Ok(GetTicketResponse {
            ticket: Some(ticket),
            case_id,
            incident,
        })
    }

    /// The report's district and where it came from: the caller's, else the
    /// account's in intake's copy of routing's directory, else none.
    fn locate(&self, req: &ReportTicketRequest) -> Result<(String, &'static str), Status> {
        if !req.district_id.is_empty() {
            return Ok((req.district_id.clone(), "caller"));
        }
        if req.account_number.is_empty() {
            return Ok((String::new(), ""));
        }
        Ok(
            match self.log.projection_get(&account_key(&req.account_number))? {
                Some(d) => (String::from_utf8_lossy(&d).into_owned(), "account"),
                None => (String::new(), ""),
            },
        )
    }

    /// One page of `ListTickets`: reads up to [`MAX_SCANNED_PER_LIST`]
    /// index entries, so run it on the blocking pool.
    fn list_page(
        &self,
        req: &ListTicketsRequest,
        page_size: usize,
        mut cursor: Option<Vec<u8>>,
    ) -> Result<ListTicketsResponse, Status> {
        let from = req.reported_from.map(|t| nanos(&t));
        let to = req.reported_to.map(|t| nanos(&t));
        let mut tickets = Vec::with_capacity(page_size.min(64));
        let mut scanned = 0;
        let mut exhausted = false;
        while tickets.len() < page_size && scanned < MAX_SCANNED_PER_LIST {
            let batch = self
                .log
                .projection_scan(BY_TIME_PREFIX, cursor.as_deref(), 256)
                .map_err(Status::from)?;
            if batch.is_empty() {
                exhausted = true;
                break;
            }
            for (key, _) in batch {
                scanned += 1;
                cursor = Some(key.clone());
                let Some(ticket_id) = ticket_id_of_by_time_key(&key) else {
                    continue;
                };
                let Some(ticket) = self.ticket(ticket_id)? else {
                    continue;
                };
                if matches(req, &ticket, from, to) {
                    tickets.push(ticket);
                    if tickets.len() == page_size {
                        break;
                    }
                }
            }
        }
        let more = !exhausted
            && cursor.as_deref().is_some_and(|c| {
                self.log
                    .projection_scan(BY_TIME_PREFIX, Some(c), 1)
                    .is_ok_and(|next| !next.is_empty())
            });
        let next_page_token = match (more, cursor) {
            (true, Some(c)) => String::from_utf8_lossy(&c).into_owned(),
            _ => String::new(),
        };
        Ok(ListTicketsResponse {
            tickets,
            next_page_token,
        })
    }

    /// Decides what a validated report becomes (its customer key and
    /// sealed contact, its district), reading the projections through
    /// `read`; returns the writes and the answer. Made on the log's writer
    /// ([`lineguard_eventlog::EventLog::decide`]): it sees every report
    /// committed before it, so two calls of one customer or one district
    /// are decided one after the other without a lock, and many share a
    /// commit.
    fn decide_report(
        &self,
        read: &impl ProjectionRead,
        req: &ReportTicketRequest,
        (channel, kind): (Channel, TicketKind),
        who: lineguard_eventlog::Actor,
        (customer, contact): (Option<&str>, SealedContact),
        (district_id, district_source): (&str, &str),
    ) -> Result<(Transaction, ReportTicketResponse), Status> {
        // The time of the decision, which commits right after it.
        let now = now();
        if let Some(customer) = customer
            && let Some(open) = read.projection(&open_key(customer, kind as i32))?
        {
            let ticket_id = String::from_utf8_lossy(&open).into_owned();
            if let Some(ticket) = read_view::<TicketView>(read, &ticket_key(&ticket_id))?
                && is_open(ticket.status())
            {
                let urge_count = ticket.urge_count + 1;
                let urged = TicketUrged {
                    ticket_id: ticket_id.clone(),
                    channel: channel as i32,
                    urge_count,
                    urged_at: Some(now),
                };
                let txn = Transaction::append(
                    &ticket_id,
                    ExpectedVersion::StreamExists,
                    vec![NewEvent::new(&urged, &ticket_id, who)],
                );
                let response = ReportTicketResponse {
                    ticket_id,
                    status: ticket.status,
                    disposition: Disposition::UrgedOpenTicket as i32,
                    incident_id: ticket.incident_id,
                    urge_count,
                };
                return Ok((txn, response));
            }
        }

        let ticket_id = case_id("ticket", self.partitions.own(), &Uuid::now_v7().to_string());
        let mut reported = TicketReported {
            ticket_id: ticket_id.clone(),
            channel: channel as i32,
            kind: kind as i32,
            service_request_type: req.service_request_type,
            urgency: req.urgency,
            account_number: req.account_number.clone(),
            district_id: district_id.to_string(),
            // Sealed in `contact`: never in plain text in a log.
            address: String::new(),
            caller: None,
            description: String::new(),
            reported_at: Some(now),
            idempotency_key: req.idempotency_key.clone(),
            incident_id: String::new(),
            incident_lead: false,
            district_source: district_source.to_string(),
            customer_key: customer.unwrap_or_default().to_string(),
            contact: Some(contact),
        };
        let mut ticket_events = Vec::with_capacity(2);
        let mut response = ReportTicketResponse {
            ticket_id: ticket_id.clone(),
            status: TicketStatus::Received as i32,
            disposition: Disposition::NewTicket as i32,
            incident_id: String::new(),
            urge_count: 0,
        };
        let mut incident_append = None;

        // The report's own event id, so later events of the commit can name it.
        let reported_event_id = Uuid::now_v7();
        let cause = reported_event_id.to_string();
        if kind == TicketKind::FaultRepair && !district_id.is_empty() {
            let open_incident = match read
                .projection(&district_incident_key(district_id, kind as i32))?
            {
                Some(id) => {
                    read_view::<IncidentView>(read, &incident_key(&String::from_utf8_lossy(&id)))?
                }
                None => None,
            }
            .filter(|incident| within_window(incident, &now));
            // A fault already fixed (power restored, work completed,
            // closed) is over: a new call is a new fault, not part of it.
            let open_incident = match open_incident {
                Some(incident) => {
                    let lead =
                        read_view::<TicketView>(read, &ticket_key(&incident.lead_ticket_id))?;
                    lead.filter(|l| still_working(l.status())).map(|_| incident)
                }
                None => None,
            };
            let threshold = self.config.outage_threshold.max(1);
            match open_incident {
                Some(incident) => {
                    let ticket_count = incident.ticket_count + 1;
                    ticket_events.push(
                        NewEvent::new(
                            &TicketJoinedIncident {
                                ticket_id: ticket_id.clone(),
                                incident_id: incident.incident_id.clone(),
                                ticket_count,
                            },
                            &ticket_id,
                            who.clone(),
                        )
                        .caused_by(&cause),
                    );
                    if ticket_count >= threshold && !incident.probable_outage {
                        let marked = IncidentMarkedProbableOutage {
                            incident_id: incident.incident_id.clone(),
                            ticket_count,
                            threshold,
                        };
                        incident_append = Some((
                            incident.incident_id.clone(),
                            ExpectedVersion::StreamExists,
                            vec![
                                NewEvent::new(&marked, &incident.incident_id, system())
                                    .caused_by(&cause),
                            ],
                        ));
                    }
                    response.status = TicketStatus::Attached as i32;
                    response.disposition = Disposition::JoinedIncident as i32;
                    response.incident_id = incident.incident_id;
                }
                None => {
                    let incident_id = case_id(
                        "incident",
                        self.partitions.own(),
                        &Uuid::now_v7().to_string(),
                    );
                    let opened = IncidentOpened {
                        incident_id: incident_id.clone(),
                        district_id: district_id.to_string(),
                        kind: kind as i32,
                        lead_ticket_id: ticket_id.clone(),
                        opened_at: Some(now),
                        window_seconds: self.config.correlation_window.as_secs() as u32,
                    };
                    let mut events =
                        vec![NewEvent::new(&opened, &incident_id, system()).caused_by(&cause)];
                    if threshold == 1 {
                        let marked = IncidentMarkedProbableOutage {
                            incident_id: incident_id.clone(),
                            ticket_count: 1,
                            threshold,
                        };
                        events
                            .push(NewEvent::new(&marked, &incident_id, system()).caused_by(&cause));
                    }
                    incident_append =
                        Some((incident_id.clone(), ExpectedVersion::NoStream, events));
                    response.incident_id = incident_id;
                }
            }
        }
        reported.incident_id = response.incident_id.clone();
        reported.incident_lead = !reported.incident_id.is_empty()
            && response.disposition == Disposition::NewTicket as i32;
        let mut reported_event = NewEvent::new(&reported, &ticket_id, who);
        reported_event.event_id = reported_event_id;
        ticket_events.insert(0, reported_event);
        let mut txn = Transaction::append(&ticket_id, ExpectedVersion::NoStream, ticket_events);
        if let Some((stream, expected, events)) = incident_append {
            txn = txn.and_append(stream, expected, events);
        }
        Ok((txn, response))
    }
}

/// The view at `key` as `read` sees it.
fn read_view<M: Message + Default>(
    read: &impl ProjectionRead,
    key: &[u8],
) -> Result<Option<M>, Status> {
    read.projection_message(key).map_err(Status::from)
}

/// Whether an incident led by a ticket in this status is still being worked:
/// calls about it join it.
fn still_working(status: TicketStatus) -> bool {
    matches!(
        status,
        TicketStatus::Received
            | TicketStatus::Routed
            | TicketStatus::Accepted
            | TicketStatus::Dispatched
            | TicketStatus::OnSite
    )
}

fn within_window(incident: &IncidentView, now: &Timestamp) -> bool {
    let last = incident.last_call_at.unwrap_or_default();
    let window = i128::from(incident.window_seconds) * 1_000_000_000;
    nanos(now) - nanos(&last) <= window
}

/// The actor id of a channel: which door, never who called.
fn channel_actor(channel: Channel) -> String {
    channel.as_str_name().to_ascii_lowercase().replace('_', "-")
}

fn system() -> lineguard_eventlog::Actor {
    actor(ActorKind::System, "intake")
}

fn now() -> Timestamp {
    lineguard_eventlog::clock::now()
}

#[tonic::async_trait]
impl Intake for IntakeService {
    async fn report_ticket(
        &self,
        request: Request<ReportTicketRequest>,
    ) -> Result<Response<ReportTicketResponse>, Status> {
        let principal = caller(&request);
        let (channel, kind) = validate::report(request.get_ref())?;
        let req = Arc::new(request.get_ref().clone());
        // Kept for forwarding: the message, its deadline and its caller.
        let forwarding = request;
        // The door is the channel (in the event); who came through it is
        // the caller.
        let who = acting(
            principal.as_ref(),
            actor(ActorKind::Channel, channel_actor(channel)),
        );
        let fingerprint = req.encode_to_vec();
        let key = format!("report:{}", req.idempotency_key);
        let probe = Idempotency::new(key.clone(), &fingerprint, Bytes::new());
        let (this, request) = (self.clone(), req.clone());
        let (earlier, (district_id, district_source)) = blocking(move || {
            let earlier = earlier_answer::<ReportTicketResponse>(&this.log, &probe)?;
            Ok::<_, Status>((earlier, this.locate(&request)?))
        })
        .await?;
        if let Some(answer) = earlier {
            return Ok(Response::new(answer));
        }
        if let Some(owner) = self.report_owner(&forwarding, &district_id).await? {
            let relayed = self.partitions.relay(forwarding)?;
            return IntakeClient::new(owner).report_ticket(relayed).await;
        }
        let phone = req.caller.as_ref().map_or("", |c| c.phone.as_str());
        let customer = self.customers.key(&req.account_number, phone);
        // Sealed before anything is written: a caller without account or
        // phone gets a key of the report's own.
        let sealing_key = customer
            .clone()
            .unwrap_or_else(|| format!("report-{}", Uuid::now_v7()));
        let contact = Contact {
            caller_name: req
                .caller
                .as_ref()
                .map(|c| c.name.clone())
                .unwrap_or_default(),
            caller_phone: phone.to_string(),
            address: req.address.clone(),
            description: req.description.clone(),
        };
        let this = self.clone();
        let sealed = blocking(move || {
            sealing::seal(this.keys.as_ref(), &sealing_key, &contact).map_err(seal_error)
        })
        .await?;
        // Decided where it commits: no lock, and the reports of one
        // incident's callers share the commits of a group.
        let (this, request) = (self.clone(), req.clone());
        let answer: ReportTicketResponse =
            decide_idempotent(&self.log, key, fingerprint, move |read| {
                this.decide_report(
                    read,
                    &request,
                    (channel, kind),
                    who,
                    (customer.as_deref(), sealed),
                    (&district_id, district_source),
                )
            })
            .await?;
        tracing::info!(ticket_id = %answer.ticket_id, incident_id = %answer.incident_id,
            disposition = ?answer.disposition(), channel = ?channel, kind = ?kind, "report taken");
        Ok(Response::new(answer))
    }

    async fn get_ticket(
        &self,
        request: Request<GetTicketRequest>,
    ) -> Result<Response<GetTicketResponse>, Status> {
        validate::id("ticket_id", &request.get_ref().ticket_id)?;
        if let Some(owner) =
            self.partitions
                .route_case(&request, "ticket_id", &request.get_ref().ticket_id)?
        {
            return IntakeClient::new(owner)
                .get_ticket(self.partitions.relay(request)?)
                .await;
        }
        let ticket_id = request.into_inner().ticket_id;
        let this = self.clone();
        let answer = blocking(move || {
            let mut answer = this.ticket_or_incident(&ticket_id)?;
            this.open_answer(&mut answer)?;
            Ok::<_, Status>(answer)
        })
        .await?;
        Ok(Response::new(answer))
    }

    async fn list_tickets(
        &self,
        request: Request<ListTicketsRequest>,
    ) -> Result<Response<ListTicketsResponse>, Status> {
        let page_size = match request.get_ref().page_size as usize {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(validate::invalid(
                    "page_size",
                    format!("{n} is over the limit of {MAX_PAGE}"),
                ));
            }
            n => n,
        };
        if self.partitions.count() > 1 && !Partitions::was_forwarded(&request) {
            return Ok(Response::new(self.gather_list(request, page_size).await?));
        }
        let req = request.into_inner();
        let cursor = if req.page_token.is_empty() {
            None
        } else if req.page_token.as_bytes().starts_with(BY_TIME_PREFIX)
            && req.page_token.len() <= 256
        {
            Some(req.page_token.clone().into_bytes())
        } else {
            return Err(validate::invalid(
                "page_token",
                "not a token this service issued",
            ));
        };
        let this = self.clone();
        let page = blocking(move || {
            let mut page = this.list_page(&req, page_size, cursor)?;
            for ticket in &mut page.tickets {
                this.open_view(ticket)?;
            }
            Ok::<_, Status>(page)
        })
        .await?;
        Ok(Response::new(page))
    }

    async fn cancel_ticket(
        &self,
        request: Request<CancelTicketRequest>,
    ) -> Result<Response<CancelTicketResponse>, Status> {
        let principal = caller(&request);
        validate::id("ticket_id", &request.get_ref().ticket_id)?;
        validate::reason(&request.get_ref().reason)?;
        validate::idempotency_key(&request.get_ref().idempotency_key)?;
        if let Some(owner) =
            self.partitions
                .route_case(&request, "ticket_id", &request.get_ref().ticket_id)?
        {
            return IntakeClient::new(owner)
                .cancel_ticket(self.partitions.relay(request)?)
                .await;
        }
        let req = request.into_inner();
        let fingerprint = req.encode_to_vec();
        let key = format!("cancel:{}", req.idempotency_key);
        let probe = Idempotency::new(key.clone(), &fingerprint, Bytes::new());
        let this = self.clone();
        let earlier = blocking(move || {
            let mut answer = earlier_answer::<CancelTicketResponse>(&this.log, &probe)?;
            if let Some(ticket) = answer.as_mut().and_then(|a| a.ticket.as_mut()) {
                this.open_view(ticket)?;
            }
            Ok::<_, Status>(answer)
        })
        .await?;
        if let Some(answer) = earlier {
            return Ok(Response::new(answer));
        }
        let _guard = self
            .locks
            .lock(&[format!("ticket/{}", req.ticket_id)])
            .await;
        let (this, id) = (self.clone(), req.ticket_id.clone());
        let mut ticket = match blocking(move || this.ticket_or_incident(&id)).await? {
            GetTicketResponse {
                ticket: Some(ticket),
                ..
            } if ticket.ticket_id == req.ticket_id => ticket,
            GetTicketResponse { ticket, .. } => {
                let lead = ticket.map(|t| t.ticket_id).unwrap_or_default();
                return Err(case_ids::incident_not_a_ticket(
                    "ticket_id",
                    &req.ticket_id,
                    &lead,
                ));
            }
        };
        if !is_open(ticket.status()) {
            return Err(Status::failed_precondition(format!(
                "ticket {} is {} and can no longer be cancelled",
                req.ticket_id,
                ticket.status().as_str_name()
            )));
        }
        let at = now();
        let cancelled = TicketCancelled {
            ticket_id: req.ticket_id.clone(),
            reason: req.reason.clone(),
            cancelled_at: Some(at),
        };
        let txn = Transaction::append(
            &req.ticket_id,
            ExpectedVersion::StreamExists,
            vec![NewEvent::new(
                &cancelled,
                &req.ticket_id,
                acting(principal.as_ref(), actor(ActorKind::Channel, "customer")),
            )],
        );
        ticket.status = TicketStatus::Cancelled as i32;
        ticket.updated_at = Some(at);
        let response = CancelTicketResponse {
            ticket: Some(ticket),
        };
        let idempotency =
            Idempotency::new(key, &fingerprint, Bytes::from(response.encode_to_vec()));
        // The answer is kept (for retries) as the view is, sealed; it is
        // opened on the way out, every time.
        let mut answer: CancelTicketResponse =
            commit_idempotent(&self.log, txn, idempotency).await?;
        tracing::info!(ticket_id = %req.ticket_id, "ticket cancelled");
        let this = self.clone();
        let answer = blocking(move || {
            if let Some(ticket) = &mut answer.ticket {
                this.open_view(ticket)?;
            }
            Ok::<_, Status>(answer)
        })
        .await?;
        Ok(Response::new(answer))
    }

    async fn erase_customer(
        &self,
        request: Request<EraseCustomerRequest>,
    ) -> Result<Response<EraseCustomerResponse>, Status> {
        let principal = caller(&request);
        validate::erasure(request.get_ref())?;
        // Every partition keeps its own customers' keys: each erases its own.
        let mut elsewhere = EraseCustomerResponse::default();
        if self.partitions.count() > 1 && !Partitions::was_forwarded(&request) {
            for (partition, channel) in self.partitions.all()? {
                let Some(channel) = channel else { continue };
                let answer = IntakeClient::new(channel)
                    .erase_customer(self.partitions.relay_copy(&request)?)
                    .await
                    .map_err(|status| {
                        Status::new(
                            status.code(),
                            format!(
                                "partition {}: {} (erasure is safe to call again)",
                                partition.index(),
                                status.message()
                            ),
                        )
                    })?
                    .into_inner();
                elsewhere
                    .erased_customer_keys
                    .extend(answer.erased_customer_keys);
                elsewhere.tickets += answer.tickets;
            }
        }
        let req = request.into_inner();
        // Without credentials (development on loopback) there is no
        // principal to name.
        let erased_by = acting(
            principal.as_ref(),
            actor(ActorKind::Person, "unauthenticated"),
        );
        let mut customers = Vec::with_capacity(2);
        if let Some(key) = self.customers.key(&req.account_number, "") {
            customers.push(key);
        }
        if let Some(key) = self.customers.key("", &req.phone) {
            customers.push(key);
        }
        let mut response = EraseCustomerResponse::default();
        for customer in customers {
            let _guard = self.locks.lock(&[format!("customer/{customer}")]).await;
            let (this, who, reason, key) = (
                self.clone(),
                erased_by.clone(),
                req.reason.clone(),
                customer.clone(),
            );
            let (destroyed, tickets) = blocking(move || this.erase(&key, &who, &reason)).await?;
            // Never the phone or the account: the key names the customer.
            tracing::info!(customer_key = %customer, destroyed, tickets = tickets.len(),
                erased_by = %erased_by.id, "customer data erased");
            if destroyed || !tickets.is_empty() {
                response.erased_customer_keys.push(customer);
            }
            response.tickets += tickets.len() as u32;
        }
        response
            .erased_customer_keys
            .extend(elsewhere.erased_customer_keys);
        response.tickets += elsewhere.tickets;
        Ok(Response::new(response))
    }

    async fn unseal_contacts(
        &self,
        request: Request<UnsealContactsRequest>,
    ) -> Result<Response<UnsealContactsResponse>, Status> {
        // Only a service that shows contacts to their people (dispatch, to
        // crews) or an administrator: the access policy lets services in,
        // this narrows it to dispatch.
        if let Some(principal) = caller(&request)
            && !(principal.role == "admin"
                || (principal.role == "service" && principal.id == "dispatch"))
        {
            return Err(Status::permission_denied(format!(
                "{}:{} may not open customer contacts",
                principal.role, principal.id
            )));
        }
        if request.get_ref().contacts.len() > MAX_UNSEAL {
            return Err(validate::invalid(
                "contacts",
                format!(
                    "{} contacts, over the limit of {MAX_UNSEAL}",
                    request.get_ref().contacts.len()
                ),
            ));
        }
        // A contact is sealed with a key only the partition that took its
        // report holds: what this one cannot open, the others are asked.
        let others = self
            .partitions
            .copies_for_the_others(&Partitions::without_message(&request))?;
        let sealed = request.into_inner().contacts;
        let (this, to_open) = (self.clone(), sealed.clone());
        let contacts = blocking(move || {
            to_open
                .iter()
                .map(|sealed| match sealing::open(this.keys.as_ref(), sealed) {
                    Ok(contact) => Ok(UnsealedContact {
                        contact: Some(contact),
                        erased: false,
                    }),
                    Err(SealError::NoKey(_)) => Ok(UnsealedContact {
                        contact: None,
                        erased: true,
                    }),
                    Err(e) => Err(seal_error(e)),
                })
                .collect::<Result<Vec<_>, Status>>()
        })
        .await?;
        let mut contacts = contacts;
        unseal_elsewhere(others, &sealed, &mut contacts).await?;
        Ok(Response::new(UnsealContactsResponse { contacts }))
    }
}

/// Asks every other partition (`others`: `Partitions::copies_for_the_others`)
/// to open the contacts of `sealed` this one found no key for
/// (`opened[i].erased`): a contact is sealed with a key only the partition
/// that took its report holds. One that opens a contact answers it; a
/// contact no partition opens is erased.
async fn unseal_elsewhere(
    others: Vec<(
        lineguard_bus::Partition,
        tonic::transport::Channel,
        Request<()>,
    )>,
    sealed: &[SealedContact],
    opened: &mut [UnsealedContact],
) -> Result<(), Status> {
    for (partition, channel, copy) in others {
        let missing: Vec<usize> = (0..opened.len()).filter(|i| opened[*i].erased).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let (metadata, extensions, ()) = copy.into_parts();
        let ask = UnsealContactsRequest {
            contacts: missing.iter().map(|i| sealed[*i].clone()).collect(),
        };
        let answer = IntakeClient::new(channel)
            .unseal_contacts(Request::from_parts(metadata, extensions, ask))
            .await
            .map_err(|status| Partitions::from_partition(partition, status))?
            .into_inner();
        for (at, theirs) in missing.iter().zip(answer.contacts) {
            if !theirs.erased {
                opened[*at] = theirs;
            }
        }
    }
    Ok(())
}

fn matches(req: &ListTicketsRequest, t: &TicketView, from: Option<i128>, to: Option<i128>) -> bool {
    let reported = t.reported_at.as_ref().map_or(0, nanos);
    (req.status == 0 || req.status == t.status)
        && (req.kind == 0 || req.kind == t.kind)
        && (req.channel == 0 || req.channel == t.channel)
        && (req.district_id.is_empty() || req.district_id == t.district_id)
        && (req.station_id.is_empty() || req.station_id == t.station_id)
        && (req.incident_id.is_empty() || req.incident_id == t.incident_id)
        && from.is_none_or(|f| reported >= f)
        && to.is_none_or(|t| reported < t)
}
