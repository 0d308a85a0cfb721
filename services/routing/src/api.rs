//! The `lineguard.routing.v1.Routing` gRPC service.

use std::collections::HashSet;

use bytes::Bytes;
use futures::StreamExt;
use lineguard_eventlog::{
    ActorKind, CommitOutcome, Error as LogError, ExpectedVersion, Idempotency, NewEvent,
    Transaction, actor,
};
use lineguard_protos::case_ids::{self, KnownAs};
use lineguard_protos::routing::v1::routing_client::RoutingClient;
use lineguard_protos::routing::v1::{
    AcceptTicketRequest, AccountsAssigned, AnswerTicketRequest, AssigneeRole, Availability,
    AvailabilityChanged, AvailabilityView, Company, CompanyDefined, Crew, CrewDefined,
    DirectoryChangeResponse, District, DistrictDefined, GetAvailabilityRequest, GetPolicyRequest,
    GetRouteRequest, ImportAccountsRequest, ImportAccountsResponse, LookupOwnerRequest,
    LookupOwnerResponse, Manager, ManagerDefined, PolicyAdopted, ReturnReason, ReturnTicketRequest,
    RouteStatus, RouteView, SetAvailabilityRequest, Station, StationDefined, TicketAccepted,
    TicketAnswered, VerifyLoadsRequest, VerifyLoadsResponse,
    routing_server::{Routing, RoutingServer},
};
use lineguard_protos::routing::v1::{
    Contact, ListDistrictAccountsRequest, ListDistrictAccountsResponse, WhoServesRequest,
    WhoServesResponse,
};
use lineguard_runtime::auth::{Principal, acting, caller};
use lineguard_runtime::partitions::Partitions;
use prost::{Message, Name};
use tonic::{Request, Response, Status, Streaming};

use crate::directory::{
    ACCOUNTS_PER_EVENT, DIRECTORY_STREAM, DirectoryError, check_company, check_crew,
    check_district, check_id, check_manager, check_station,
};
use crate::policy::ANSWER;
use crate::projection::nanos;
use crate::router::{Router, RouterError, now};

/// Accounts one `ImportAccounts` message may carry.
pub const MAX_ACCOUNTS_PER_MESSAGE: usize = 10_000;
/// Longest answer text and note, in characters.
pub const MAX_TEXT_CHARS: usize = 2_000;
/// Longest outcome code.
pub const MAX_OUTCOME_CHARS: usize = 64;
/// Longest idempotency key.
pub const MAX_KEY_CHARS: usize = 128;
/// Attempts at a command that lost a race with another writer of the case.
const CONFLICT_ATTEMPTS: usize = 5;

/// Serves routing over its [`Router`].
pub struct RoutingService {
    router: Router,
    partitions: Partitions,
}

impl RoutingService {
    pub fn new(router: Router) -> Self {
        RoutingService {
            router,
            partitions: Partitions::sole(crate::SERVICE),
        }
    }

    /// The same service as one of `partitions`: a call about a case is
    /// answered by the partition that opened it, a call about a manager's
    /// or desk's availability by the partition owning its station.
    pub fn in_partitions(mut self, partitions: Partitions) -> Self {
        self.partitions = partitions;
        self
    }

    /// The station of a manager, a station's desk or a crew; `None` for
    /// the company's desk (or nobody the directory knows).
    fn station_of_assignee(&self, assignee_id: &str) -> Result<Option<String>, Status> {
        let directory = self.router.directory();
        Ok(
            match directory
                .station_of(assignee_id)
                .map_err(RouterError::from)?
            {
                Some(station) => Some(station),
                None => directory
                    .crew(assignee_id)
                    .map_err(RouterError::from)?
                    .map(|crew| crew.station_id),
            },
        )
    }

    /// Where a call about `assignee_id` is answered: the partition owning
    /// its station; here when it has none (the company's desk, which every
    /// partition keeps: see `set_availability`).
    fn assignee_owner<T>(
        &self,
        request: &Request<T>,
        assignee_id: &str,
    ) -> Result<Option<tonic::transport::Channel>, Status> {
        if self.partitions.count() == 1 {
            return Ok(None);
        }
        match self.station_of_assignee(assignee_id)? {
            Some(station) => self
                .partitions
                .route(request, self.partitions.owner_of_station(&station)),
            None => Ok(None),
        }
    }

    pub fn server(self) -> RoutingServer<RoutingService> {
        RoutingServer::new(self)
    }

    /// Records a directory entry unless it is stored exactly so already.
    async fn define<T: PartialEq, E: Message + Name>(
        &self,
        stored: Result<Option<T>, DirectoryError>,
        entry: &T,
        event: E,
    ) -> Result<Response<DirectoryChangeResponse>, Status> {
        let changed = stored.map_err(RouterError::from)?.as_ref() != Some(entry);
        if changed {
            let event = NewEvent::new(
                &event,
                DIRECTORY_STREAM,
                actor(ActorKind::System, "directory-api"),
            );
            self.router
                .log()
                .commit(Transaction::append(
                    DIRECTORY_STREAM,
                    ExpectedVersion::Any,
                    vec![event],
                ))
                .await
                .map_err(Status::from)?;
        }
        Ok(Response::new(DirectoryChangeResponse { changed }))
    }

    /// The district a caller names by account number or district id (one
    /// of the two is required).
    fn district_of(&self, account_number: &str, district_id: &str) -> Result<District, Status> {
        if account_number.is_empty() && district_id.is_empty() {
            return Err(invalid("account_number", "this or district_id is required"));
        }
        if !account_number.is_empty() {
            id("account_number", account_number)?;
        }
        if !district_id.is_empty() {
            id("district_id", district_id)?;
        }
        self.router
            .locate(district_id, account_number)?
            .ok_or_else(|| {
                Status::not_found("neither the district nor the account is in the directory")
            })
    }

    /// The route of the case `id` names: a ticket on its own, an incident, or
    /// a ticket that leads or follows one (its incident's route).
    fn route_of(&self, id: &str) -> Result<RouteView, Status> {
        if let Some(route) = self.router.case_of(id)? {
            return Ok(route);
        }
        let known_as = match self.router.incident_of(id)? {
            Some(incident) => KnownAs::TicketOfIncident(incident),
            None => KnownAs::Unknown,
        };
        Err(case_ids::not_found("routing", "route", id, &known_as))
    }

    /// Runs a command against a case: reads the route, lets `decide` build
    /// the events and the answer, and commits them with the route's version
    /// and the idempotency record, retrying if another writer got there first.
    async fn command(
        &self,
        ticket_id: &str,
        key: String,
        fingerprint: &[u8],
        decide: impl Fn(&RouteView) -> Result<(Vec<NewEvent>, RouteView), Status>,
    ) -> Result<RouteView, Status> {
        let probe = Idempotency::new(key.clone(), fingerprint, Bytes::new());
        match self.router.log().idempotent_response(&probe) {
            Ok(Some(bytes)) => return decode_answer::<RouteView>(&bytes),
            Ok(None) => {}
            Err(LogError::IdempotencyConflict { .. }) => return Err(key_reused()),
            Err(e) => return Err(e.into()),
        }
        for _ in 0..CONFLICT_ATTEMPTS {
            let route = self.route_of(ticket_id)?;
            let (events, mut answer) = decide(&route)?;
            answer.version = route.version + events.len() as u64;
            let txn = Transaction::append(
                &route.case_id,
                ExpectedVersion::Exact(route.version),
                events,
            )
            .idempotent(Idempotency::new(
                key.clone(),
                fingerprint,
                Bytes::from(answer.encode_to_vec()),
            ));
            match self.router.log().commit(txn).await {
                Ok(CommitOutcome::Committed(_)) => return Ok(answer),
                Ok(CommitOutcome::Duplicate { response, .. }) => return decode_answer(&response),
                Ok(CommitOutcome::AlreadyProcessed) => {
                    return Err(Status::internal("unexpected inbox outcome"));
                }
                Err(LogError::WrongExpectedVersion { .. }) => continue,
                Err(LogError::IdempotencyConflict { .. }) => return Err(key_reused()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(Status::aborted(format!(
            "{ticket_id} kept changing under the command; try again"
        )))
    }
}

fn decode_answer<R: Message + Default>(bytes: &[u8]) -> Result<R, Status> {
    R::decode(bytes).map_err(|e| Status::data_loss(format!("undecodable stored answer: {e}")))
}

fn key_reused() -> Status {
    Status::already_exists("idempotency_key was already used for a different request")
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid {field}: {reason}"))
}

fn id(field: &str, value: &str) -> Result<(), Status> {
    check_id(field, value).map_err(|e| Status::invalid_argument(format!("invalid {e}")))
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

fn text(field: &str, value: &str, max: usize, required: bool) -> Result<(), Status> {
    if required && value.trim().is_empty() {
        return Err(invalid(field, "is required"));
    }
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

/// A referenced directory entry must exist.
fn require<T>(
    what: &str,
    field: &str,
    id: &str,
    found: Result<Option<T>, DirectoryError>,
) -> Result<(), Status> {
    match found.map_err(RouterError::from)? {
        Some(_) => Ok(()),
        None => Err(invalid(
            field,
            format!("{what} {id} is not in the directory"),
        )),
    }
}

fn directory_error(e: DirectoryError) -> Status {
    Status::invalid_argument(format!("invalid {e}"))
}

/// Only the holder of a case may act on it.
fn must_hold(route: &RouteView, assignee_id: &str) -> Result<(), Status> {
    if route.assignee_id != assignee_id {
        return Err(Status::permission_denied(format!(
            "{} is held by {}, not {assignee_id}",
            route.case_id, route.assignee_id
        )));
    }
    Ok(())
}

fn must_be_open(route: &RouteView) -> Result<(), Status> {
    match route.status() {
        RouteStatus::Routed | RouteStatus::Accepted => Ok(()),
        other => Err(Status::failed_precondition(format!(
            "{} is {} and can no longer change hands",
            route.case_id,
            other.as_str_name()
        ))),
    }
}

impl RoutingService {
    /// A desk (a district manager's or a station's duty desk) acts only
    /// for itself or for its own station's managers and desk, whatever the
    /// request names; other roles the policy lets call are not scoped.
    fn check_desk(&self, principal: Option<&Principal>, assignee_id: &str) -> Result<(), Status> {
        let Some(p) = principal.filter(|p| p.role == "desk") else {
            return Ok(());
        };
        if p.id == assignee_id {
            return Ok(());
        }
        let directory = self.router.directory();
        let station = |id: &str| {
            directory
                .station_of(id)
                .map_err(|e| Status::internal(e.to_string()))
        };
        match (station(&p.id)?, station(assignee_id)?) {
            (Some(own), Some(theirs)) if own == theirs => Ok(()),
            (own, _) => Err(Status::permission_denied(format!(
                "desk {} acts for its own station ({}) only: {assignee_id} is not in it",
                p.id,
                own.as_deref().unwrap_or("none known")
            ))),
        }
    }
}

/// Makes a directory change in every other partition: `call` sends one
/// partition its copy of the request (`Partitions::copies_for_the_others`).
async fn copy_to_the_others<T, Fut>(
    others: Vec<(
        lineguard_bus::Partition,
        tonic::transport::Channel,
        Request<T>,
    )>,
    call: impl Fn(RoutingClient<tonic::transport::Channel>, Request<T>) -> Fut,
) -> Result<(), Status>
where
    Fut: std::future::Future<Output = Result<Response<DirectoryChangeResponse>, Status>>,
{
    for (partition, channel, copy) in others {
        call(RoutingClient::new(channel), copy)
            .await
            .map_err(|status| Partitions::from_partition(partition, status))?;
    }
    Ok(())
}

fn person(id: &str) -> lineguard_eventlog::Actor {
    actor(ActorKind::Person, id)
}

#[tonic::async_trait]
impl Routing for RoutingService {
    async fn define_company(
        &self,
        request: Request<Company>,
    ) -> Result<Response<DirectoryChangeResponse>, Status> {
        // Every partition holds the whole directory.
        let others = self.partitions.copies_for_the_others(&request)?;
        let c = request.into_inner();
        check_company(&c).map_err(directory_error)?;
        let stored = self.router.directory().company(&c.company_id);
        let event = CompanyDefined {
            company: Some(c.clone()),
        };
        let local = self.define(stored, &c, event).await?;
        copy_to_the_others(others, |mut client, copy| async move {
            client.define_company(copy).await
        })
        .await?;
        Ok(local)
    }

    async fn define_station(
        &self,
        request: Request<Station>,
    ) -> Result<Response<DirectoryChangeResponse>, Status> {
        // Every partition holds the whole directory.
        let others = self.partitions.copies_for_the_others(&request)?;
        let s = request.into_inner();
        check_station(&s).map_err(directory_error)?;
        let dir = self.router.directory();
        require(
            "company",
            "company_id",
            &s.company_id,
            dir.company(&s.company_id),
        )?;
        let event = StationDefined {
            station: Some(s.clone()),
        };
        let local = self.define(dir.station(&s.station_id), &s, event).await?;
        copy_to_the_others(others, |mut client, copy| async move {
            client.define_station(copy).await
        })
        .await?;
        Ok(local)
    }

    async fn define_district(
        &self,
        request: Request<District>,
    ) -> Result<Response<DirectoryChangeResponse>, Status> {
        // Every partition holds the whole directory.
        let others = self.partitions.copies_for_the_others(&request)?;
        let d = request.into_inner();
        check_district(&d).map_err(directory_error)?;
        let dir = self.router.directory();
        require(
            "station",
            "station_id",
            &d.station_id,
            dir.station(&d.station_id),
        )?;
        require(
            "manager",
            "manager_id",
            &d.manager_id,
            dir.manager(&d.manager_id),
        )?;
        let event = DistrictDefined {
            district: Some(d.clone()),
        };
        let local = self.define(dir.district(&d.district_id), &d, event).await?;
        copy_to_the_others(others, |mut client, copy| async move {
            client.define_district(copy).await
        })
        .await?;
        Ok(local)
    }

    async fn define_manager(
        &self,
        request: Request<Manager>,
    ) -> Result<Response<DirectoryChangeResponse>, Status> {
        // Every partition holds the whole directory.
        let others = self.partitions.copies_for_the_others(&request)?;
        let m = request.into_inner();
        check_manager(&m).map_err(directory_error)?;
        let dir = self.router.directory();
        require(
            "station",
            "station_id",
            &m.station_id,
            dir.station(&m.station_id),
        )?;
        let event = ManagerDefined {
            manager: Some(m.clone()),
        };
        let local = self.define(dir.manager(&m.manager_id), &m, event).await?;
        copy_to_the_others(others, |mut client, copy| async move {
            client.define_manager(copy).await
        })
        .await?;
        Ok(local)
    }

    async fn define_crew(
        &self,
        request: Request<Crew>,
    ) -> Result<Response<DirectoryChangeResponse>, Status> {
        // Every partition holds the whole directory.
        let others = self.partitions.copies_for_the_others(&request)?;
        let c = request.into_inner();
        check_crew(&c).map_err(directory_error)?;
        let dir = self.router.directory();
        require(
            "station",
            "station_id",
            &c.station_id,
            dir.station(&c.station_id),
        )?;
        for (i, d) in c.district_ids.iter().enumerate() {
            require(
                "district",
                &format!("district_ids[{i}]"),
                d,
                dir.district(d),
            )?;
        }
        let event = CrewDefined {
            crew: Some(c.clone()),
        };
        let local = self.define(dir.crew(&c.crew_id), &c, event).await?;
        copy_to_the_others(others, |mut client, copy| async move {
            client.define_crew(copy).await
        })
        .await?;
        Ok(local)
    }

    async fn import_accounts(
        &self,
        request: Request<Streaming<ImportAccountsRequest>>,
    ) -> Result<Response<ImportAccountsResponse>, Status> {
        // Every partition holds the whole directory: each message, once
        // checked and applied here, is passed on to every other partition
        // over a stream of its own (bounded: a slow partition slows the
        // import, never grows a queue).
        let mut copies = Vec::new();
        for (partition, channel, copy) in self
            .partitions
            .copies_for_the_others(&Partitions::without_message(&request))?
        {
            let (sender, receiver) = tokio::sync::mpsc::channel(4);
            let (metadata, extensions, ()) = copy.into_parts();
            let relayed = Request::from_parts(
                metadata,
                extensions,
                tokio_stream::wrappers::ReceiverStream::new(receiver),
            );
            let call =
                tokio::spawn(
                    async move { RoutingClient::new(channel).import_accounts(relayed).await },
                );
            copies.push((partition, sender, call));
        }
        let mut stream = request.into_inner();
        let dir = self.router.directory();
        let mut known_districts: HashSet<String> = HashSet::new();
        let mut totals = ImportAccountsResponse::default();
        let mut message_no = 0u64;
        while let Some(message) = stream.next().await {
            let message = message?;
            if message.accounts.len() > MAX_ACCOUNTS_PER_MESSAGE {
                return Err(invalid(
                    "accounts",
                    format!(
                        "message {message_no} holds {} accounts, over the limit of {MAX_ACCOUNTS_PER_MESSAGE}",
                        message.accounts.len()
                    ),
                ));
            }
            let mut changed = Vec::with_capacity(message.accounts.len());
            let checked = if copies.is_empty() {
                Vec::new()
            } else {
                message.accounts.clone()
            };
            for (i, a) in message.accounts.into_iter().enumerate() {
                let at = |field: &str| format!("message {message_no} accounts[{i}].{field}");
                check_id(&at("account_number"), &a.account_number).map_err(directory_error)?;
                check_id(&at("district_id"), &a.district_id).map_err(directory_error)?;
                if !known_districts.contains(&a.district_id) {
                    if dir
                        .district(&a.district_id)
                        .map_err(RouterError::from)?
                        .is_none()
                    {
                        return Err(invalid(
                            &at("district_id"),
                            format!("district {} is not in the directory", a.district_id),
                        ));
                    }
                    known_districts.insert(a.district_id.clone());
                }
                totals.received += 1;
                if dir
                    .account_district(&a.account_number)
                    .map_err(RouterError::from)?
                    .as_deref()
                    == Some(a.district_id.as_str())
                {
                    totals.unchanged += 1;
                } else {
                    changed.push(a);
                }
            }
            for (_, sender, _) in &copies {
                // A partition that stopped listening says why below.
                let _ = sender
                    .send(ImportAccountsRequest {
                        accounts: checked.clone(),
                    })
                    .await;
            }
            if !changed.is_empty() {
                let who = actor(ActorKind::System, "directory-import");
                let events = changed
                    .chunks(ACCOUNTS_PER_EVENT)
                    .map(|chunk| {
                        NewEvent::new(
                            &AccountsAssigned {
                                accounts: chunk.to_vec(),
                                source: "import".into(),
                            },
                            DIRECTORY_STREAM,
                            who.clone(),
                        )
                    })
                    .collect();
                self.router
                    .log()
                    .commit(Transaction::append(
                        DIRECTORY_STREAM,
                        ExpectedVersion::Any,
                        events,
                    ))
                    .await
                    .map_err(Status::from)?;
                totals.changed += changed.len() as u64;
            }
            message_no += 1;
        }
        for (partition, sender, call) in copies {
            drop(sender);
            call.await
                .map_err(|e| Status::internal(format!("partition {}: {e}", partition.index())))?
                .map_err(|status| Partitions::from_partition(partition, status))?;
        }
        tracing::info!(
            received = totals.received,
            changed = totals.changed,
            "accounts imported"
        );
        Ok(Response::new(totals))
    }

    async fn lookup_owner(
        &self,
        request: Request<LookupOwnerRequest>,
    ) -> Result<Response<LookupOwnerResponse>, Status> {
        let req = request.into_inner();
        let district = self.district_of(&req.account_number, &req.district_id)?;
        let dir = self.router.directory();
        let station = dir
            .station(&district.station_id)
            .map_err(RouterError::from)?;
        let company = match &station {
            Some(s) => dir.company(&s.company_id).map_err(RouterError::from)?,
            None => None,
        };
        Ok(Response::new(LookupOwnerResponse {
            district: Some(district),
            station,
            company,
        }))
    }

    async fn who_serves(
        &self,
        request: Request<WhoServesRequest>,
    ) -> Result<Response<WhoServesResponse>, Status> {
        let district = self.district_of(
            &request.get_ref().account_number,
            &request.get_ref().district_id,
        )?;
        // Who serves depends on loads and availability, which the partition
        // owning the district's station keeps.
        if self.partitions.count() > 1
            && let Some(owner) = self.partitions.route(
                &request,
                self.partitions.owner_of_station(&district.station_id),
            )?
        {
            return RoutingClient::new(owner)
                .who_serves(self.partitions.relay(request)?)
                .await;
        }
        let at = now();
        let place = self.router.place(Some(district.clone()))?;
        // The same rule as a new ticket's first hop: who would take it now.
        let choice = self.router.choose(&place, 1, &at)?;
        let dir = self.router.directory();
        let manager = dir
            .manager(&district.manager_id)
            .map_err(RouterError::from)?
            .map(|m| Contact {
                line: 1,
                role: AssigneeRole::DistrictManager as i32,
                id: m.manager_id,
                name: m.name,
                phone: m.phone,
            });
        let station = dir
            .station(&place.station_id)
            .map_err(RouterError::from)?
            .map(|s| Contact {
                line: 2,
                role: AssigneeRole::StationDesk as i32,
                id: s.duty_desk_id,
                name: s.name,
                phone: s.duty_phone,
            });
        let company = place.company.as_ref().map(|c| Contact {
            line: 3,
            role: AssigneeRole::CompanyDesk as i32,
            id: c.supervisor_desk_id.clone(),
            name: c.name.clone(),
            phone: c.supervision_phone.clone(),
        });
        let serving = [&manager, &station, &company]
            .into_iter()
            .flatten()
            .find(|c| c.line == choice.line)
            .cloned();
        Ok(Response::new(WhoServesResponse {
            district_id: district.district_id,
            district_name: district.name,
            serving,
            reason: choice.passed_over.join("; "),
            manager,
            station,
            company,
            as_of: Some(at),
        }))
    }

    async fn list_district_accounts(
        &self,
        request: Request<ListDistrictAccountsRequest>,
    ) -> Result<Response<ListDistrictAccountsResponse>, Status> {
        const DEFAULT_PAGE: usize = 1_000;
        const MAX_PAGE: usize = 10_000;
        let req = request.into_inner();
        id("district_id", &req.district_id)?;
        let page_size = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(invalid(
                    "page_size",
                    format!("{n} is over the limit of {MAX_PAGE}"),
                ));
            }
            n => n,
        };
        if !req.page_token.is_empty() {
            id("page_token", &req.page_token)?;
        }
        let dir = self.router.directory();
        if dir
            .district(&req.district_id)
            .map_err(RouterError::from)?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "district {} is not in the directory",
                req.district_id
            )));
        }
        let after = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
        let account_numbers = dir
            .district_accounts(&req.district_id, after, page_size)
            .map_err(RouterError::from)?;
        let next_page_token = if account_numbers.len() == page_size {
            account_numbers.last().cloned().unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListDistrictAccountsResponse {
            account_numbers,
            next_page_token,
        }))
    }

    async fn set_availability(
        &self,
        request: Request<SetAvailabilityRequest>,
    ) -> Result<Response<AvailabilityView>, Status> {
        id("assignee_id", &request.get_ref().assignee_id)?;
        if let Some(owner) = self.assignee_owner(&request, &request.get_ref().assignee_id)? {
            return RoutingClient::new(owner)
                .set_availability(self.partitions.relay(request)?)
                .await;
        }
        // Of no station (the company's desk, which holds a load in every
        // partition): set in every partition.
        let others = if self.partitions.count() > 1
            && self
                .station_of_assignee(&request.get_ref().assignee_id)?
                .is_none()
        {
            self.partitions.copies_for_the_others(&request)?
        } else {
            Vec::new()
        };
        let principal = caller(&request);
        let req = request.into_inner();
        id("assignee_id", &req.assignee_id)?;
        self.check_desk(principal.as_ref(), &req.assignee_id)?;
        text("note", &req.note, MAX_TEXT_CHARS, false)?;
        let availability = Availability::try_from(req.availability)
            .ok()
            .filter(|a| *a != Availability::Unspecified)
            .ok_or_else(|| {
                invalid(
                    "availability",
                    format!("{} is not ON_DUTY, OFF_DUTY or ON_LEAVE", req.availability),
                )
            })?;
        if availability != Availability::OnLeave
            && (req.leave_from.is_some() || req.leave_until.is_some())
        {
            return Err(invalid("leave_from", "only ON_LEAVE takes a time range"));
        }
        if let (Some(from), Some(until)) = (&req.leave_from, &req.leave_until)
            && nanos(until) <= nanos(from)
        {
            return Err(invalid("leave_until", "must be after leave_from"));
        }
        let current = self
            .router
            .availability(&req.assignee_id)?
            .filter(|a| a.role() != AssigneeRole::Unspecified)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "{} is not a manager, desk or crew in the directory",
                    req.assignee_id
                ))
            })?;
        let changed = AvailabilityChanged {
            assignee_id: req.assignee_id.clone(),
            role: current.role,
            availability: availability as i32,
            leave_from: req.leave_from,
            leave_until: req.leave_until,
            note: req.note,
        };
        let stream = format!("availability-{}", req.assignee_id);
        self.router
            .log()
            .commit(Transaction::append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::new(
                    &changed,
                    &stream,
                    acting(principal.as_ref(), person(&req.assignee_id)),
                )],
            ))
            .await
            .map_err(Status::from)?;
        tracing::info!(assignee_id = %req.assignee_id, availability = ?availability, "availability changed");
        for (partition, channel, copy) in others {
            RoutingClient::new(channel)
                .set_availability(copy)
                .await
                .map_err(|status| Partitions::from_partition(partition, status))?;
        }
        let view = self
            .router
            .availability(&req.assignee_id)?
            .ok_or_else(|| Status::internal("availability vanished after commit"))?;
        Ok(Response::new(self.router.availability_at(view, &now())))
    }

    async fn get_availability(
        &self,
        request: Request<GetAvailabilityRequest>,
    ) -> Result<Response<AvailabilityView>, Status> {
        id("assignee_id", &request.get_ref().assignee_id)?;
        if let Some(owner) = self.assignee_owner(&request, &request.get_ref().assignee_id)? {
            return RoutingClient::new(owner)
                .get_availability(self.partitions.relay(request)?)
                .await;
        }
        let principal = caller(&request);
        let req = request.into_inner();
        id("assignee_id", &req.assignee_id)?;
        self.check_desk(principal.as_ref(), &req.assignee_id)?;
        let view = self.router.availability(&req.assignee_id)?.ok_or_else(|| {
            Status::not_found(format!("{} is not known to routing", req.assignee_id))
        })?;
        Ok(Response::new(self.router.availability_at(view, &now())))
    }

    async fn accept_ticket(
        &self,
        request: Request<AcceptTicketRequest>,
    ) -> Result<Response<RouteView>, Status> {
        id("ticket_id", &request.get_ref().ticket_id)?;
        if let Some(owner) =
            self.partitions
                .route_case(&request, "ticket_id", &request.get_ref().ticket_id)?
        {
            return RoutingClient::new(owner)
                .accept_ticket(self.partitions.relay(request)?)
                .await;
        }
        let principal = caller(&request);
        let req = request.into_inner();
        id("ticket_id", &req.ticket_id)?;
        id("assignee_id", &req.assignee_id)?;
        self.check_desk(principal.as_ref(), &req.assignee_id)?;
        idempotency_key(&req.idempotency_key)?;
        let fingerprint = req.encode_to_vec();
        let at = now();
        let answer = self
            .command(
                &req.ticket_id,
                format!("accept:{}", req.idempotency_key),
                &fingerprint,
                |route| {
                    must_hold(route, &req.assignee_id)?;
                    if route.status() != RouteStatus::Routed {
                        return Err(Status::failed_precondition(format!(
                            "{} is {}, not waiting for acceptance",
                            route.case_id,
                            route.status().as_str_name()
                        )));
                    }
                    let on_time = route
                        .acceptance_due_at
                        .as_ref()
                        .is_none_or(|due| nanos(&at) <= nanos(due));
                    let accepted = TicketAccepted {
                        case_id: route.case_id.clone(),
                        assignee_id: req.assignee_id.clone(),
                        line: route.line,
                        hop: route.hop,
                        accepted_at: Some(at),
                        on_time,
                    };
                    let mut view = route.clone();
                    view.status = RouteStatus::Accepted as i32;
                    view.accepted_at = Some(at);
                    Ok((
                        vec![NewEvent::new(
                            &accepted,
                            &route.case_id,
                            acting(principal.as_ref(), person(&req.assignee_id)),
                        )],
                        view,
                    ))
                },
            )
            .await?;
        tracing::info!(correlation_id = %answer.case_id, assignee_id = %req.assignee_id, "accepted");
        Ok(Response::new(answer))
    }

    async fn return_ticket(
        &self,
        request: Request<ReturnTicketRequest>,
    ) -> Result<Response<RouteView>, Status> {
        id("ticket_id", &request.get_ref().ticket_id)?;
        if let Some(owner) =
            self.partitions
                .route_case(&request, "ticket_id", &request.get_ref().ticket_id)?
        {
            return RoutingClient::new(owner)
                .return_ticket(self.partitions.relay(request)?)
                .await;
        }
        let principal = caller(&request);
        let req = request.into_inner();
        id("ticket_id", &req.ticket_id)?;
        id("assignee_id", &req.assignee_id)?;
        self.check_desk(principal.as_ref(), &req.assignee_id)?;
        idempotency_key(&req.idempotency_key)?;
        text("note", &req.note, MAX_TEXT_CHARS, false)?;
        let reason = ReturnReason::try_from(req.reason)
            .ok()
            .filter(|r| *r != ReturnReason::Unspecified)
            .ok_or_else(|| {
                invalid(
                    "reason",
                    "must be WRONG_DISTRICT, CUSTOMER_SIDE_FAULT or NOT_OURS",
                )
            })?;
        let correct = if reason == ReturnReason::WrongDistrict {
            id("correct_district_id", &req.correct_district_id)?;
            Some(
                self.router
                    .directory()
                    .district(&req.correct_district_id)
                    .map_err(RouterError::from)?
                    .ok_or_else(|| {
                        invalid(
                            "correct_district_id",
                            format!(
                                "district {} is not in the directory",
                                req.correct_district_id
                            ),
                        )
                    })?,
            )
        } else {
            None
        };
        let fingerprint = req.encode_to_vec();
        let at = now();
        let router = self.router.clone();
        let answer = self
            .command(
                &req.ticket_id,
                format!("return:{}", req.idempotency_key),
                &fingerprint,
                |route| {
                    must_hold(route, &req.assignee_id)?;
                    must_be_open(route)?;
                    router
                        .returned(
                            route,
                            acting(principal.as_ref(), person(&req.assignee_id)),
                            reason,
                            correct.clone(),
                            &req.note,
                            &at,
                        )
                        .map_err(|e| match e {
                            RouterError::Invalid { .. } => Status::invalid_argument(e.to_string()),
                            other => Status::from(other),
                        })
                },
            )
            .await?;
        tracing::info!(correlation_id = %answer.case_id, assignee_id = %req.assignee_id, reason = ?reason, "returned");
        Ok(Response::new(answer))
    }

    async fn answer_ticket(
        &self,
        request: Request<AnswerTicketRequest>,
    ) -> Result<Response<RouteView>, Status> {
        id("ticket_id", &request.get_ref().ticket_id)?;
        if let Some(owner) =
            self.partitions
                .route_case(&request, "ticket_id", &request.get_ref().ticket_id)?
        {
            return RoutingClient::new(owner)
                .answer_ticket(self.partitions.relay(request)?)
                .await;
        }
        let principal = caller(&request);
        let req = request.into_inner();
        id("ticket_id", &req.ticket_id)?;
        id("assignee_id", &req.assignee_id)?;
        self.check_desk(principal.as_ref(), &req.assignee_id)?;
        idempotency_key(&req.idempotency_key)?;
        text("answer", &req.answer, MAX_TEXT_CHARS, true)?;
        text("outcome", &req.outcome, MAX_OUTCOME_CHARS, true)?;
        let fingerprint = req.encode_to_vec();
        let at = now();
        let answer = self
            .command(
                &req.ticket_id,
                format!("answer:{}", req.idempotency_key),
                &fingerprint,
                |route| {
                    must_hold(route, &req.assignee_id)?;
                    must_be_open(route)?;
                    if route.field_work {
                        return Err(Status::failed_precondition(format!(
                            "{} is field work: the crew completes it through dispatch",
                            route.case_id
                        )));
                    }
                    let who = acting(principal.as_ref(), person(&req.assignee_id));
                    let mut events = Vec::with_capacity(2);
                    if route.status() == RouteStatus::Routed {
                        let on_time = route
                            .acceptance_due_at
                            .as_ref()
                            .is_none_or(|due| nanos(&at) <= nanos(due));
                        let accepted = TicketAccepted {
                            case_id: route.case_id.clone(),
                            assignee_id: req.assignee_id.clone(),
                            line: route.line,
                            hop: route.hop,
                            accepted_at: Some(at),
                            on_time,
                        };
                        events.push(NewEvent::new(&accepted, &route.case_id, who.clone()));
                    }
                    let on_time = route
                        .deadlines
                        .iter()
                        .find(|d| d.clock == ANSWER)
                        .and_then(|d| d.due_at.as_ref())
                        .is_none_or(|due| nanos(&at) <= nanos(due));
                    let answered = TicketAnswered {
                        case_id: route.case_id.clone(),
                        assignee_id: req.assignee_id.clone(),
                        answer: req.answer.clone(),
                        outcome: req.outcome.clone(),
                        answered_at: Some(at),
                        on_time,
                    };
                    events.push(NewEvent::new(&answered, &route.case_id, who));
                    let mut view = route.clone();
                    view.status = RouteStatus::Answered as i32;
                    Ok((events, view))
                },
            )
            .await?;
        tracing::info!(correlation_id = %answer.case_id, assignee_id = %req.assignee_id, "answered");
        Ok(Response::new(answer))
    }

    async fn get_route(
        &self,
        request: Request<GetRouteRequest>,
    ) -> Result<Response<RouteView>, Status> {
        id("ticket_id", &request.get_ref().ticket_id)?;
        if let Some(owner) =
            self.partitions
                .route_case(&request, "ticket_id", &request.get_ref().ticket_id)?
        {
            return RoutingClient::new(owner)
                .get_route(self.partitions.relay(request)?)
                .await;
        }
        let req = request.into_inner();
        id("ticket_id", &req.ticket_id)?;
        let route = self.route_of(&req.ticket_id)?;
        Ok(Response::new(route))
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PolicyAdopted>, Status> {
        let req = request.into_inner();
        let version = if req.version.is_empty() {
            self.router
                .current_policy_version()?
                .ok_or_else(|| Status::not_found("no policy adopted yet"))?
        } else {
            req.version
        };
        let adopted = self.router.adopted_policy(&version)?.ok_or_else(|| {
            Status::not_found(format!("policy version {version} was never adopted"))
        })?;
        Ok(Response::new(adopted))
    }

    async fn verify_loads(
        &self,
        request: Request<VerifyLoadsRequest>,
    ) -> Result<Response<VerifyLoadsResponse>, Status> {
        // Each partition recounts its own loads; the company's answer is
        // their sum (the company desk holds a load in each partition).
        let mut elsewhere = VerifyLoadsResponse::default();
        if self.partitions.count() > 1 && !Partitions::was_forwarded(&request) {
            for (partition, channel) in self.partitions.all()? {
                let Some(channel) = channel else { continue };
                let answer = RoutingClient::new(channel)
                    .verify_loads(self.partitions.relay_copy(&request)?)
                    .await
                    .map_err(|status| Partitions::from_partition(partition, status))?
                    .into_inner();
                elsewhere.events_read += answer.events_read;
                elsewhere.assignees += answer.assignees;
                elsewhere.open_tickets += answer.open_tickets;
                elsewhere.mismatches.extend(answer.mismatches);
            }
        }
        let log = self.router.log().clone();
        let mut checked =
            lineguard_eventlog::blocking(move || crate::loads::verify_loads(&log)).await?;
        checked.events_read += elsewhere.events_read;
        checked.assignees += elsewhere.assignees;
        checked.open_tickets += elsewhere.open_tickets;
        checked.mismatches.extend(elsewhere.mismatches);
        if !checked.mismatches.is_empty() {
            tracing::error!(
                mismatches = checked.mismatches.len(),
                "stored loads differ from the recount"
            );
        }
        Ok(Response::new(checked))
    }
}
