//! The `lineguard.feedback.v1.Feedback` gRPC service.
//!
//! Commands (follow-up, complaint, praise) are idempotent on the caller's
//! key: a retry with the same request returns the first answer; the same
//! key with another request is `ALREADY_EXISTS`. Every refusal names the
//! field and the reason.

use std::collections::BTreeMap;
use std::pin::Pin;

use bytes::Bytes;
use lineguard_eventlog::{
    ActorKind, EventLog, ExpectedVersion, Idempotency, NewEvent, Transaction, actor,
};
use lineguard_protos::case_ids::{self, KnownAs};
use lineguard_protos::feedback::v1::feedback_client::FeedbackClient;
use lineguard_protos::feedback::v1::feedback_server::{Feedback as FeedbackApi, FeedbackServer};
use lineguard_protos::feedback::v1::{
    ComplaintFiled, CsvRow, ExportScorecardsRequest, FileComplaintRequest, FileComplaintResponse,
    FollowUpRecorded, FollowUpStatus, FollowUpView, GetScorecardRequest, GetTalliesRequest,
    GetTalliesResponse, Level, ListDueFollowUpsRequest, ListDueFollowUpsResponse, Metric, Period,
    PraiseRecorded, RankingEntry, RankingsRequest, RankingsResponse, RecordFollowUpRequest,
    RecordFollowUpResponse, RecordPraiseRequest, RecordPraiseResponse, Scorecard, Subject,
    TicketRecord, TicketReopened,
};
use lineguard_protos::intake::v1::Channel;
use lineguard_runtime::auth::{acting, caller};
use lineguard_runtime::partitions::{Page, Partitions};
use prost::Message;
use prost_types::Timestamp;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use lineguard_eventlog::command::{commit_idempotent, earlier_answer};

use crate::followups::{Feedback, now};
use crate::projection::{FOLLOW_UP_OPEN, account_complaint_key, nanos, timed_key};
use crate::scorecard::{self, check_period, csv_header, csv_row};

/// Longest free-text fields, in characters.
pub const MAX_COMMENT_CHARS: usize = 2_000;
/// Longest idempotency key.
pub const MAX_KEY_CHARS: usize = 128;
/// Longest id.
pub const MAX_ID_CHARS: usize = 64;
/// Follow-ups per page: the default and the most.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1_000;

/// The gRPC face of [`Feedback`].
#[derive(Clone)]
pub struct FeedbackService {
    feedback: Feedback,
    partitions: Partitions,
}

impl FeedbackService {
    pub fn new(feedback: Feedback) -> Self {
        FeedbackService {
            feedback,
            partitions: Partitions::sole(crate::SERVICE),
        }
    }

    /// The same service as one of `partitions`: a customer's verdict or
    /// complaint about a ticket is recorded by the partition that opened
    /// the ticket.
    pub fn in_partitions(mut self, partitions: Partitions) -> Self {
        self.partitions = partitions;
        self
    }

    /// The follow-ups due in every partition, merged by due time.
    async fn gather_due_follow_ups(
        &self,
        request: Request<ListDueFollowUpsRequest>,
    ) -> Result<ListDueFollowUpsResponse, Status> {
        let page_size = match request.get_ref().page_size as usize {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            n => return Err(invalid("page_size", format!("{n} is over {MAX_PAGE}"))),
        };
        let page = self
            .partitions
            .gather(
                &request,
                &request.get_ref().page_token,
                page_size,
                |cursor| cursor.starts_with(FOLLOW_UP_OPEN),
                |f: &FollowUpView| {
                    let due = f.due_at.unwrap_or_default();
                    String::from_utf8_lossy(&timed_key(FOLLOW_UP_OPEN, &due, &f.ticket_id))
                        .into_owned()
                },
                |channel, one| {
                    let this = self.clone();
                    async move {
                        let answer = match channel {
                            None => this.list_due_follow_ups(one).await?,
                            Some(channel) => {
                                FeedbackClient::new(channel)
                                    .list_due_follow_ups(one)
                                    .await?
                            }
                        }
                        .into_inner();
                        Ok(Page {
                            items: answer.follow_ups,
                            next_page_token: answer.next_page_token,
                        })
                    }
                },
            )
            .await?;
        Ok(ListDueFollowUpsResponse {
            follow_ups: page.items,
            next_page_token: page.next_page_token,
        })
    }

    /// Every subject's scorecard for `period`: from this instance's records
    /// when the service is unsplit, else from every partition's counts
    /// summed (a station's records may lie in two partitions once it has
    /// moved, a company's always do).
    async fn cards(&self, period: Period) -> Result<BTreeMap<(i32, String), Scorecard>, Status> {
        let feedback = self.feedback.clone();
        let mut tallies =
            tokio::task::spawn_blocking(move || scorecard::tallies(&feedback, &period))
                .await
                .map_err(|e| Status::internal(format!("scorecard task failed: {e}")))??;
        if self.partitions.count() > 1 {
            for (partition, channel) in self.partitions.all()? {
                let Some(channel) = channel else { continue };
                // Asked as this service: counts, not a caller's answer.
                let theirs = FeedbackClient::new(channel)
                    .max_decoding_message_size(MAX_TALLIES_BYTES)
                    .get_tallies(GetTalliesRequest {
                        period: Some(period),
                    })
                    .await
                    .map_err(|status| Partitions::from_partition(partition, status))?
                    .into_inner();
                tallies.add(&theirs.tallies);
            }
        }
        Ok(tallies.finish(&period, self.feedback.rules()))
    }

    /// The station of a manager, crew or station (`None`: a company, or
    /// nobody the directory knows).
    fn station_of(&self, level: Level, id: &str) -> Result<Option<String>, Status> {
        Ok(match level {
            Level::Manager => self.feedback.manager(id)?.map(|m| m.station_id),
            Level::Crew => self.feedback.crew(id)?.map(|c| c.station_id),
            Level::Station => Some(id.to_string()),
            Level::Company | Level::Unspecified => None,
        })
    }

    /// Where a record about a ticket, else about a worker or station, is
    /// made: the ticket's partition, else the one owning the worker's
    /// station, else partition 0. Always the same one for the same request,
    /// so a retry meets its idempotency record wherever it is sent.
    fn record_owner<T>(
        &self,
        request: &Request<T>,
        ticket_id: &str,
        (level, worker): (Level, &str),
    ) -> Result<Option<tonic::transport::Channel>, Status> {
        if self.partitions.count() == 1 {
            return Ok(None);
        }
        if !ticket_id.is_empty() {
            return self.partitions.route_case(request, "ticket_id", ticket_id);
        }
        let station = match level {
            // A worker named without a level: a manager, else a crew.
            Level::Unspecified => match self.station_of(Level::Manager, worker)? {
                Some(station) => Some(station),
                None => self.station_of(Level::Crew, worker)?,
            },
            level => self.station_of(level, worker)?,
        };
        let owner = self
            .partitions
            .owner_of_station(station.as_deref().unwrap_or_default());
        self.partitions.route(request, owner)
    }

    pub fn server(self) -> FeedbackServer<Self> {
        FeedbackServer::new(self)
    }

    fn log(&self) -> &EventLog {
        self.feedback.log()
    }
}

/// Largest `GetTallies` answer read from another partition: a province's
/// subjects (some 7,000 managers, crews and stations) take about 2 MB.
pub const MAX_TALLIES_BYTES: usize = 64 * 1024 * 1024;

/// `INVALID_ARGUMENT` naming `field`.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid {field}: {reason}"))
}

fn id(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > MAX_ID_CHARS {
        return Err(invalid(
            field,
            format!("must be 1 to {MAX_ID_CHARS} characters"),
        ));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(field, "may hold only letters, digits, '-' and '_'"));
    }
    Ok(())
}

fn text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    let n = value.chars().count();
    if n > max {
        return Err(invalid(
            field,
            format!("{n} characters, over the limit of {max}"),
        ));
    }
    if value.chars().any(|c| c.is_control() && c != '\n') {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

fn idempotency_key(value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid("idempotency_key", "is required"));
    }
    if value.len() > MAX_KEY_CHARS || !value.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            "idempotency_key",
            format!("must be 1 to {MAX_KEY_CHARS} printable ASCII characters"),
        ));
    }
    Ok(())
}

fn channel(field: &str, value: i32) -> Result<(), Status> {
    Channel::try_from(value)
        .map(|_| ())
        .map_err(|_| invalid(field, format!("{value} is not a channel")))
}

fn subject(level: Level, id: &str) -> Subject {
    Subject {
        level: level as i32,
        id: id.to_string(),
    }
}

fn push_unique(list: &mut Vec<Subject>, s: Subject) {
    if !s.id.is_empty() && !list.contains(&s) {
        list.push(s);
    }
}

type CsvStream = Pin<Box<dyn Stream<Item = Result<CsvRow, Status>> + Send>>;

impl FeedbackService {
    /// The one customer's ticket `ticket_id` names. An incident id is
    /// refused with its lead ticket named: a follow-up, complaint or praise
    /// is one customer's, and an incident has many.
    fn ticket_or_not_found(&self, ticket_id: &str) -> Result<TicketRecord, Status> {
        if let Some(ticket) = self.feedback.ticket(ticket_id)? {
            return Ok(ticket);
        }
        let known_as = match self.feedback.case(ticket_id)? {
            Some(case) if case.lead_ticket_id != ticket_id => {
                return Err(case_ids::incident_not_a_ticket(
                    "ticket_id",
                    ticket_id,
                    &case.lead_ticket_id,
                ));
            }
            Some(_) => KnownAs::Ticket,
            None => KnownAs::Unknown,
        };
        Err(case_ids::not_found(
            "feedback",
            "ticket record",
            ticket_id,
            &known_as,
        ))
    }

    /// Whom a complaint counts against: a named worker and their station and
    /// company; a ticket's handlers (managers, crews), station and company.
    fn complaint_against(&self, req: &FileComplaintRequest) -> Result<Vec<Subject>, Status> {
        let mut against = Vec::new();
        if !req.worker_id.is_empty() {
            let level = if self.feedback.manager(&req.worker_id)?.is_some() {
                Level::Manager
            } else if self.feedback.crew(&req.worker_id)?.is_some() {
                Level::Crew
            } else {
                return Err(invalid(
                    "worker_id",
                    format!("no manager or crew {} in the directory", req.worker_id),
                ));
            };
            for s in self
                .feedback
                .with_superiors(&subject(level, &req.worker_id))?
                .unwrap_or_default()
            {
                push_unique(&mut against, s);
            }
        }
        if !req.ticket_id.is_empty() {
            let ticket = self.ticket_or_not_found(&req.ticket_id)?;
            let case = self.feedback.case(&ticket.case_id)?.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "ticket {} has not been routed yet: nobody handled it to complain of",
                    req.ticket_id
                ))
            })?;
            if req.worker_id.is_empty() {
                for m in &case.manager_ids {
                    push_unique(&mut against, subject(Level::Manager, m));
                }
                for c in &case.crew_ids {
                    push_unique(&mut against, subject(Level::Crew, c));
                }
            }
            push_unique(&mut against, subject(Level::Station, &case.station_id));
            push_unique(&mut against, subject(Level::Company, &case.company_id));
        }
        Ok(against)
    }
}

#[tonic::async_trait]
impl FeedbackApi for FeedbackService {
    async fn record_follow_up(
        &self,
        request: Request<RecordFollowUpRequest>,
    ) -> Result<Response<RecordFollowUpResponse>, Status> {
        let principal = caller(&request);
        id("ticket_id", &request.get_ref().ticket_id)?;
        if let Some(owner) =
            self.partitions
                .route_case(&request, "ticket_id", &request.get_ref().ticket_id)?
        {
            return FeedbackClient::new(owner)
                .record_follow_up(self.partitions.relay(request)?)
                .await;
        }
        let req = request.into_inner();
        idempotency_key(&req.idempotency_key)?;
        if !(1..=5).contains(&req.score) {
            return Err(invalid("score", format!("{} is not 1 to 5", req.score)));
        }
        if req.reopen && req.satisfied {
            return Err(invalid(
                "reopen",
                "only a dissatisfied customer reopens a ticket",
            ));
        }
        id("recorded_by", &req.recorded_by)?;
        text("comment", &req.comment, MAX_COMMENT_CHARS)?;
        let fingerprint = req.encode_to_vec();
        let key = format!("follow-up:{}", req.idempotency_key);
        let probe = Idempotency::new(key.clone(), &fingerprint, Bytes::new());
        if let Some(answer) = earlier_answer(self.log(), &probe)? {
            return Ok(Response::new(answer));
        }
        let _guard = self
            .feedback
            .lock_owned(std::slice::from_ref(&req.ticket_id))
            .await;
        let ticket = self.ticket_or_not_found(&req.ticket_id)?;
        let Some(pending) = ticket
            .follow_up
            .clone()
            .filter(|f| matches!(f.status(), FollowUpStatus::Due | FollowUpStatus::Overdue))
        else {
            let why = match &ticket.follow_up {
                None => "its work is not completed or answered yet",
                Some(_) => "its follow-up is already recorded",
            };
            return Err(Status::failed_precondition(format!(
                "no follow-up due for ticket {}: {why}",
                req.ticket_id
            )));
        };
        let at = now();
        let who = acting(
            principal.as_ref(),
            actor(ActorKind::Person, &req.recorded_by),
        );
        let recorded = FollowUpRecorded {
            ticket_id: req.ticket_id.clone(),
            case_id: pending.case_id.clone(),
            satisfied: req.satisfied,
            score: req.score,
            comment: req.comment.clone(),
            recorded_by: req.recorded_by.clone(),
            recorded_at: Some(at),
            reopen: req.reopen,
        };
        let recorded = NewEvent::new(&recorded, &pending.case_id, who.clone());
        let cause = recorded.event_id.to_string();
        let mut events = vec![recorded];
        if req.reopen {
            let reopened = TicketReopened {
                ticket_id: req.ticket_id.clone(),
                case_id: pending.case_id.clone(),
                reason: format!("dissatisfied at follow-up (score {})", req.score),
                reopened_at: Some(at),
            };
            events.push(NewEvent::new(&reopened, &pending.case_id, who).caused_by(cause));
        }
        let view = FollowUpView {
            status: FollowUpStatus::Recorded as i32,
            satisfied: req.satisfied,
            score: req.score,
            recorded_at: Some(at),
            recorded_by: req.recorded_by.clone(),
            reopened: req.reopen,
            ..pending
        };
        let response = RecordFollowUpResponse {
            follow_up: Some(view),
            reopened: req.reopen,
        };
        let txn = Transaction::append(&req.ticket_id, ExpectedVersion::Any, events);
        let idempotency =
            Idempotency::new(key, &fingerprint, Bytes::from(response.encode_to_vec()));
        let answer: RecordFollowUpResponse =
            commit_idempotent(self.log(), txn, idempotency).await?;
        tracing::info!(ticket_id = %req.ticket_id, correlation_id = %ticket.case_id,
            satisfied = req.satisfied, score = req.score, reopened = req.reopen, "follow-up recorded");
        Ok(Response::new(answer))
    }

    async fn list_due_follow_ups(
        &self,
        request: Request<ListDueFollowUpsRequest>,
    ) -> Result<Response<ListDueFollowUpsResponse>, Status> {
        if self.partitions.count() > 1 && !Partitions::was_forwarded(&request) {
            return self.gather_due_follow_ups(request).await.map(Response::new);
        }
        let req = request.into_inner();
        if !req.station_id.is_empty() {
            id("station_id", &req.station_id)?;
        }
        let page_size = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            n => return Err(invalid("page_size", format!("{n} is over {MAX_PAGE}"))),
        };
        let mut after: Option<Vec<u8>> = if req.page_token.is_empty() {
            None
        } else if req.page_token.starts_with(FOLLOW_UP_OPEN) && req.page_token.len() < 200 {
            Some(req.page_token.clone().into_bytes())
        } else {
            return Err(invalid("page_token", "not a token this service gave"));
        };
        let mut out = Vec::new();
        // Filters can skip many entries: read in pages until this one is full.
        loop {
            let page = self
                .log()
                .projection_scan(FOLLOW_UP_OPEN.as_bytes(), after.as_deref(), MAX_PAGE)
                .map_err(Status::from)?;
            let exhausted = page.len() < MAX_PAGE;
            for (key, _) in page {
                let ticket_id =
                    String::from_utf8_lossy(&key[FOLLOW_UP_OPEN.len() + 21..]).into_owned();
                after = Some(key);
                let Some(f) = self.feedback.ticket(&ticket_id)?.and_then(|t| t.follow_up) else {
                    continue;
                };
                if (!req.station_id.is_empty() && f.station_id != req.station_id)
                    || (req.overdue_only && f.status() != FollowUpStatus::Overdue)
                {
                    continue;
                }
                out.push(f);
                if out.len() == page_size {
                    let token = after
                        .clone()
                        .map(|a| String::from_utf8_lossy(&a).into_owned());
                    return Ok(Response::new(ListDueFollowUpsResponse {
                        follow_ups: out,
                        next_page_token: token.unwrap_or_default(),
                    }));
                }
            }
            if exhausted {
                return Ok(Response::new(ListDueFollowUpsResponse {
                    follow_ups: out,
                    next_page_token: String::new(),
                }));
            }
        }
    }

    async fn file_complaint(
        &self,
        request: Request<FileComplaintRequest>,
    ) -> Result<Response<FileComplaintResponse>, Status> {
        let principal = caller(&request);
        if !request.get_ref().ticket_id.is_empty() {
            id("ticket_id", &request.get_ref().ticket_id)?;
        }
        let (ticket_id, worker_id) = (&request.get_ref().ticket_id, &request.get_ref().worker_id);
        if let Some(owner) =
            self.record_owner(&request, ticket_id, (Level::Unspecified, worker_id))?
        {
            return FeedbackClient::new(owner)
                .file_complaint(self.partitions.relay(request)?)
                .await;
        }
        let req = request.into_inner();
        idempotency_key(&req.idempotency_key)?;
        if req.ticket_id.is_empty() && req.worker_id.is_empty() {
            return Err(invalid(
                "ticket_id",
                "a ticket_id or a worker_id is required",
            ));
        }
        if !req.ticket_id.is_empty() {
            id("ticket_id", &req.ticket_id)?;
        }
        if !req.worker_id.is_empty() {
            id("worker_id", &req.worker_id)?;
        }
        if !req.account_number.is_empty() {
            id("account_number", &req.account_number)?;
        }
        channel("channel", req.channel)?;
        text("description", &req.description, MAX_COMMENT_CHARS)?;
        if req.description.trim().is_empty() {
            return Err(invalid("description", "is required"));
        }
        let fingerprint = req.encode_to_vec();
        let key = format!("complaint:{}", req.idempotency_key);
        let probe = Idempotency::new(key.clone(), &fingerprint, Bytes::new());
        if let Some(answer) = earlier_answer(self.log(), &probe)? {
            return Ok(Response::new(answer));
        }
        let against = self.complaint_against(&req)?;
        let account = if req.account_number.is_empty() && !req.ticket_id.is_empty() {
            self.ticket_or_not_found(&req.ticket_id)?.account_number
        } else {
            req.account_number.clone()
        };
        // One account's complaints are decided one at a time: the repeat
        // flag depends on the one before.
        let _guard = self
            .feedback
            .lock_owned(&[format!("account-{account}")])
            .await;
        let at = now();
        let repeat = match self
            .log()
            .projection_get(&account_complaint_key(&account))
            .map_err(Status::from)?
        {
            Some(bytes) if !account.is_empty() => {
                let previous = Timestamp::decode(bytes.as_slice())
                    .map_err(|e| Status::data_loss(format!("undecodable complaint time: {e}")))?;
                nanos(&at) - nanos(&previous)
                    <= self.feedback.rules().repeat_complaint_within.as_nanos() as i128
            }
            _ => false,
        };
        let complaint_id = format!("complaint-{}", Uuid::now_v7());
        let filed = ComplaintFiled {
            complaint_id: complaint_id.clone(),
            ticket_id: req.ticket_id.clone(),
            worker_id: req.worker_id.clone(),
            account_number: account,
            channel: req.channel,
            description: req.description.clone(),
            filed_at: Some(at),
            against: against.clone(),
        };
        let correlation = if req.ticket_id.is_empty() {
            complaint_id.clone()
        } else {
            req.ticket_id.clone()
        };
        let txn = Transaction::append(
            &complaint_id,
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                &filed,
                &correlation,
                acting(principal.as_ref(), actor(ActorKind::System, "feedback")),
            )],
        );
        let response = FileComplaintResponse {
            complaint_id: complaint_id.clone(),
            against,
            repeat,
        };
        let idempotency =
            Idempotency::new(key, &fingerprint, Bytes::from(response.encode_to_vec()));
        let answer: FileComplaintResponse = commit_idempotent(self.log(), txn, idempotency).await?;
        tracing::info!(complaint_id = %answer.complaint_id, ticket_id = %req.ticket_id,
            correlation_id = %correlation, repeat = answer.repeat, "complaint filed");
        Ok(Response::new(answer))
    }

    async fn record_praise(
        &self,
        request: Request<RecordPraiseRequest>,
    ) -> Result<Response<RecordPraiseResponse>, Status> {
        let principal = caller(&request);
        let credited = request.get_ref().credited_to.clone().unwrap_or_default();
        if let Some(owner) = self.record_owner(
            &request,
            &request.get_ref().ticket_id,
            (credited.level(), &credited.id),
        )? {
            return FeedbackClient::new(owner)
                .record_praise(self.partitions.relay(request)?)
                .await;
        }
        let req = request.into_inner();
        idempotency_key(&req.idempotency_key)?;
        let credited_to = req
            .credited_to
            .clone()
            .ok_or_else(|| invalid("credited_to", "is required"))?;
        if credited_to.level() == Level::Unspecified {
            return Err(invalid("credited_to.level", "is required"));
        }
        id("credited_to.id", &credited_to.id)?;
        if !req.ticket_id.is_empty() {
            id("ticket_id", &req.ticket_id)?;
            self.ticket_or_not_found(&req.ticket_id)?;
        }
        channel("channel", req.channel)?;
        text("text", &req.text, MAX_COMMENT_CHARS)?;
        let fingerprint = req.encode_to_vec();
        let key = format!("praise:{}", req.idempotency_key);
        let probe = Idempotency::new(key.clone(), &fingerprint, Bytes::new());
        if let Some(answer) = earlier_answer(self.log(), &probe)? {
            return Ok(Response::new(answer));
        }
        let credited = self.feedback.with_superiors(&credited_to)?.ok_or_else(|| {
            invalid(
                "credited_to.id",
                format!(
                    "no {:?} {} in the directory",
                    credited_to.level(),
                    credited_to.id
                ),
            )
        })?;
        let praise_id = format!("praise-{}", Uuid::now_v7());
        let recorded = PraiseRecorded {
            praise_id: praise_id.clone(),
            ticket_id: req.ticket_id.clone(),
            credited_to: Some(credited_to),
            credited: credited.clone(),
            channel: req.channel,
            text: req.text.clone(),
            recorded_at: Some(now()),
        };
        let correlation = if req.ticket_id.is_empty() {
            praise_id.clone()
        } else {
            req.ticket_id.clone()
        };
        let txn = Transaction::append(
            &praise_id,
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                &recorded,
                &correlation,
                acting(principal.as_ref(), actor(ActorKind::System, "feedback")),
            )],
        );
        let response = RecordPraiseResponse {
            praise_id,
            credited,
        };
        let idempotency =
            Idempotency::new(key, &fingerprint, Bytes::from(response.encode_to_vec()));
        let answer: RecordPraiseResponse = commit_idempotent(self.log(), txn, idempotency).await?;
        tracing::info!(praise_id = %answer.praise_id, correlation_id = %correlation, "praise recorded");
        Ok(Response::new(answer))
    }

    async fn get_scorecard(
        &self,
        request: Request<GetScorecardRequest>,
    ) -> Result<Response<Scorecard>, Status> {
        let req = request.into_inner();
        let s = req
            .subject
            .ok_or_else(|| invalid("subject", "is required"))?;
        if s.level() == Level::Unspecified {
            return Err(invalid("subject.level", "is required"));
        }
        id("subject.id", &s.id)?;
        let period = req.period.ok_or_else(|| invalid("period", "is required"))?;
        check_period(Some(&period))?;
        let cards = self.cards(period).await?;
        cards
            .get(&(s.level, s.id.clone()))
            .cloned()
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!("no {:?} {} in the directory", s.level(), s.id))
            })
    }

    async fn rankings(
        &self,
        request: Request<RankingsRequest>,
    ) -> Result<Response<RankingsResponse>, Status> {
        let req = request.into_inner();
        let level = req.level();
        if level == Level::Unspecified {
            return Err(invalid("level", "is required"));
        }
        let metric = req.metric();
        if metric == Metric::Unspecified {
            return Err(invalid("metric", "is required"));
        }
        let period = req.period.ok_or_else(|| invalid("period", "is required"))?;
        check_period(Some(&period))?;
        let cards = self.cards(period).await?;
        let of_level: Vec<Scorecard> = cards
            .into_values()
            .filter(|c| c.subject.as_ref().is_some_and(|s| s.level == level as i32))
            .collect();
        let mut entries: Vec<RankingEntry> = scorecard::rank(of_level, metric)
            .into_iter()
            .map(|(rank, value, card)| RankingEntry {
                rank,
                value,
                scorecard: Some(card),
            })
            .collect();
        if req.limit > 0 {
            entries.truncate(req.limit as usize);
        }
        Ok(Response::new(RankingsResponse { entries }))
    }

    type ExportScorecardsStream = CsvStream;

    async fn export_scorecards(
        &self,
        request: Request<ExportScorecardsRequest>,
    ) -> Result<Response<Self::ExportScorecardsStream>, Status> {
        let req = request.into_inner();
        let level = Level::try_from(req.level).map_err(|_| invalid("level", "not a level"))?;
        let period = req.period.ok_or_else(|| invalid("period", "is required"))?;
        check_period(Some(&period))?;
        let cards = self.cards(period).await?;
        let mut rows = vec![Ok(CsvRow { line: csv_header() })];
        // Company, station, manager, crew: as printed for the station wall.
        let order = [Level::Company, Level::Station, Level::Manager, Level::Crew];
        for l in order
            .iter()
            .filter(|l| level == Level::Unspecified || **l == level)
        {
            rows.extend(
                cards
                    .values()
                    .filter(|c| c.subject.as_ref().is_some_and(|s| s.level == *l as i32))
                    .map(|c| Ok(CsvRow { line: csv_row(c) })),
            );
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(rows))))
    }

    async fn get_tallies(
        &self,
        request: Request<GetTalliesRequest>,
    ) -> Result<Response<GetTalliesResponse>, Status> {
        let period = request
            .into_inner()
            .period
            .ok_or_else(|| invalid("period", "is required"))?;
        check_period(Some(&period))?;
        let feedback = self.feedback.clone();
        // This partition's own counts: never gathered (no loop).
        let tallies = tokio::task::spawn_blocking(move || scorecard::tallies(&feedback, &period))
            .await
            .map_err(|e| Status::internal(format!("scorecard task failed: {e}")))??;
        Ok(Response::new(GetTalliesResponse {
            tallies: tallies.to_protos(),
        }))
    }
}
