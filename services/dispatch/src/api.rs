//! The `lineguard.dispatch.v1.Dispatch` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use lineguard_eventlog::ReadDirection;
use lineguard_protos::dispatch::v1::{
    AcknowledgeRequest, ActionOutcome, AddNoteRequest, ArriveRequest, CompleteRequest, Connections,
    CrewEvent, DepartRequest, GetConnectionsRequest, GetWorkOrderRequest, RestoreRequest,
    ReturnOrderRequest, SubmitActionsRequest, SubmitActionsResponse, UpdateEtrRequest,
    WatchDispatchesRequest, WorkOrderView,
    crew_action::Action,
    dispatch_server::{Dispatch, DispatchServer},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use lineguard_protos::dispatch::v1::dispatch_client::DispatchClient;
use lineguard_runtime::auth::{Principal, actor_of, caller, check_crew};
use lineguard_runtime::partitions::Partitions;

use crate::contacts::ContactOpener;
use crate::orders::Dispatcher;
use crate::projection::crew_stream;
use crate::validate;
use crate::watch::Watchers;

/// Actions one `SubmitActions` call may carry.
pub const MAX_ACTIONS_PER_BATCH: usize = 500;

/// Serves dispatch over its [`Dispatcher`].
pub struct DispatchService {
    dispatcher: Dispatcher,
    watchers: Arc<Watchers>,
    contacts: ContactOpener,
    partitions: Partitions,
}

impl DispatchService {
    /// The service, with its crews' watch notifier running (call within a
    /// tokio runtime).
    pub fn new(dispatcher: Dispatcher) -> Self {
        let watchers = Watchers::start(dispatcher.log().clone());
        DispatchService {
            dispatcher,
            watchers,
            contacts: ContactOpener::default(),
            partitions: Partitions::sole(crate::SERVICE),
        }
    }

    /// The same service as one of `partitions`: a crew's actions and
    /// orders are answered by the partition that opened the order, a
    /// crew's watch by the partition owning the crew's station.
    pub fn in_partitions(mut self, partitions: Partitions) -> Self {
        self.partitions = partitions;
        self
    }

    /// Where a batch of a crew's actions is answered: the partition holding
    /// their orders (a crew's orders are its station's, so all in one); a
    /// batch naming orders of two partitions is refused.
    fn batch_owner(
        &self,
        request: &Request<SubmitActionsRequest>,
    ) -> Result<Option<tonic::transport::Channel>, Status> {
        if self.partitions.count() == 1 {
            return Ok(None);
        }
        let mut owner = None;
        for (i, crew_action) in request.get_ref().actions.iter().enumerate() {
            let Some(action) = &crew_action.action else {
                continue;
            };
            let Ok(header) = validate::action(action) else {
                continue;
            };
            let field = format!("actions[{i}].header.order_id");
            let this = self.partitions.owner_of_case(&field, &header.order_id)?;
            match owner {
                None => owner = Some(this),
                Some(first) if first != this => {
                    return Err(Status::invalid_argument(format!(
                        "invalid {field}: order {} is not of the same station as actions[0]'s; \
                         send one station's orders in a batch",
                        header.order_id
                    )));
                }
                Some(_) => {}
            }
        }
        match owner {
            Some(owner) => self.partitions.route(request, owner),
            None => Ok(None),
        }
    }

    /// One crew action, answered by the partition holding its order.
    async fn act_or_forward<T>(
        &self,
        request: Request<T>,
        wrap: impl FnOnce(T) -> Action,
    ) -> Result<Response<WorkOrderView>, Status>
    where
        T: Clone + Send + 'static,
    {
        let action = wrap(request.get_ref().clone());
        let header = validate::action(&action)?;
        if let Some(owner) =
            self.partitions
                .route_case(&request, "header.order_id", &header.order_id)?
        {
            let relayed = self.partitions.relay(request)?.map(|_| ());
            let (metadata, extensions, ()) = relayed.into_parts();
            let relayed = Request::from_parts(metadata, extensions, action);
            return forward_action(DispatchClient::new(owner), relayed).await;
        }
        self.act(caller(&request), action).await
    }

    /// Opens customer contacts for crews with `contacts` (without, crews
    /// get their orders without them).
    pub fn with_contacts(mut self, contacts: ContactOpener) -> Self {
        self.contacts = contacts;
        self
    }

    /// The live watches (for tests and status).
    pub fn watchers(&self) -> Arc<Watchers> {
        self.watchers.clone()
    }

    pub fn server(self) -> DispatchServer<DispatchService> {
        DispatchServer::new(self)
    }

    /// One crew action, by `caller` (a crew's phone acts for its own crew only).
    async fn act(
        &self,
        caller: Option<Principal>,
        action: Action,
    ) -> Result<Response<WorkOrderView>, Status> {
        let header = validate::action(&action)?;
        check_crew(caller.as_ref(), &header.crew_id)?;
        let acted_by = caller.as_ref().map(actor_of);
        let mut order = self.dispatcher.act(&action, false, acted_by).await?;
        self.contacts.open_order(&mut order).await;
        Ok(Response::new(order))
    }
}

type CrewEvents = Pin<Box<dyn Stream<Item = Result<CrewEvent, Status>> + Send>>;

/// Sends one crew action to the partition holding its order, by its RPC.
async fn forward_action(
    mut client: DispatchClient<tonic::transport::Channel>,
    request: Request<Action>,
) -> Result<Response<WorkOrderView>, Status> {
    let (metadata, extensions, action) = request.into_parts();
    macro_rules! send {
        ($method:ident, $message:expr) => {
            client
                .$method(Request::from_parts(metadata, extensions, $message))
                .await
        };
    }
    match action {
        Action::Acknowledge(m) => send!(acknowledge, m),
        Action::Depart(m) => send!(depart, m),
        Action::Arrive(m) => send!(arrive, m),
        Action::UpdateEtr(m) => send!(update_etr, m),
        Action::Restore(m) => send!(restore, m),
        Action::Complete(m) => send!(complete, m),
        Action::ReturnOrder(m) => send!(return_order, m),
        Action::AddNote(m) => send!(add_note, m),
    }
}

#[tonic::async_trait]
impl Dispatch for DispatchService {
    type WatchDispatchesStream = CrewEvents;

    async fn watch_dispatches(
        &self,
        request: Request<WatchDispatchesRequest>,
    ) -> Result<Response<CrewEvents>, Status> {
        let caller = caller(&request);
        validate::id("crew_id", &request.get_ref().crew_id)?;
        check_crew(caller.as_ref(), &request.get_ref().crew_id)?;
        if self.partitions.count() > 1 {
            // A crew's stream is kept by the partition owning its station.
            let (dispatcher, crew_id) =
                (self.dispatcher.clone(), request.get_ref().crew_id.clone());
            let station =
                lineguard_eventlog::blocking(move || dispatcher.crew_station(&crew_id)).await?;
            if let Some(station) = station
                && let Some(owner) = self
                    .partitions
                    .route(&request, self.partitions.owner_of_station(&station))?
            {
                let events = DispatchClient::new(owner)
                    .watch_dispatches(self.partitions.relay(request)?)
                    .await?
                    .into_inner();
                return Ok(Response::new(Box::pin(events)));
            }
        }
        let req = request.into_inner();
        if !req.device_id.is_empty() {
            validate::id("device_id", &req.device_id)?;
        }
        let (dispatcher, crew_id) = (self.dispatcher.clone(), req.crew_id.clone());
        let last = lineguard_eventlog::blocking(move || {
            if !dispatcher.crew_known(&crew_id)? {
                return Err(Status::not_found(format!("crew {crew_id} not found")));
            }
            // A crew with no event yet has no stream: its last sequence is 0.
            match dispatcher.log().read_stream(
                &crew_stream(&crew_id),
                0,
                ReadDirection::Backward,
                1,
            ) {
                Ok(slice) => Ok(slice.stream_version),
                Err(lineguard_eventlog::Error::StreamNotFound { .. }) => Ok(0),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        if req.after_sequence > last {
            return Err(Status::out_of_range(format!(
                "after_sequence {} is past crew {}'s last sequence {last}",
                req.after_sequence, req.crew_id
            )));
        }
        let registration = self.watchers.register(&req.crew_id, &req.device_id)?;
        tracing::info!(crew_id = %req.crew_id, device_id = %req.device_id,
            after_sequence = req.after_sequence, last, "crew watching");
        let events = self.watchers.follow(registration, req.after_sequence);
        let contacts = self.contacts.clone();
        let opened = ReceiverStream::new(events).then(move |event| {
            let contacts = contacts.clone();
            async move {
                let mut event = event?;
                contacts.open_crew_event(&mut event).await;
                Ok(event)
            }
        });
        Ok(Response::new(Box::pin(opened)))
    }

    async fn acknowledge(
        &self,
        r: Request<AcknowledgeRequest>,
    ) -> Result<Response<WorkOrderView>, Status> {
        self.act_or_forward(r, Action::Acknowledge).await
    }
    async fn depart(&self, r: Request<DepartRequest>) -> Result<Response<WorkOrderView>, Status> {
        self.act_or_forward(r, Action::Depart).await
    }
    async fn arrive(&self, r: Request<ArriveRequest>) -> Result<Response<WorkOrderView>, Status> {
        self.act_or_forward(r, Action::Arrive).await
    }
    async fn update_etr(
        &self,
        r: Request<UpdateEtrRequest>,
    ) -> Result<Response<WorkOrderView>, Status> {
        self.act_or_forward(r, Action::UpdateEtr).await
    }
    async fn restore(&self, r: Request<RestoreRequest>) -> Result<Response<WorkOrderView>, Status> {
        self.act_or_forward(r, Action::Restore).await
    }
    async fn complete(
        &self,
        r: Request<CompleteRequest>,
    ) -> Result<Response<WorkOrderView>, Status> {
        self.act_or_forward(r, Action::Complete).await
    }
    async fn return_order(
        &self,
        r: Request<ReturnOrderRequest>,
    ) -> Result<Response<WorkOrderView>, Status> {
        self.act_or_forward(r, Action::ReturnOrder).await
    }
    async fn add_note(
        &self,
        r: Request<AddNoteRequest>,
    ) -> Result<Response<WorkOrderView>, Status> {
        self.act_or_forward(r, Action::AddNote).await
    }

    async fn submit_actions(
        &self,
        request: Request<SubmitActionsRequest>,
    ) -> Result<Response<SubmitActionsResponse>, Status> {
        let caller = caller(&request);
        if let Some(owner) = self.batch_owner(&request)? {
            return DispatchClient::new(owner)
                .submit_actions(self.partitions.relay(request)?)
                .await;
        }
        let req = request.into_inner();
        if req.actions.len() > MAX_ACTIONS_PER_BATCH {
            return Err(Status::invalid_argument(format!(
                "invalid actions: {} actions, over the limit of {MAX_ACTIONS_PER_BATCH}",
                req.actions.len()
            )));
        }
        let mut actions = Vec::with_capacity(req.actions.len());
        for (i, a) in req.actions.into_iter().enumerate() {
            let action = a.action.ok_or_else(|| {
                Status::invalid_argument(format!("invalid actions[{i}]: no action set"))
            })?;
            let header = validate::action(&action)
                .map_err(|e| Status::invalid_argument(format!("actions[{i}]: {}", e.message())))?;
            // The whole batch is refused if any action is for another crew.
            check_crew(caller.as_ref(), &header.crew_id)
                .map_err(|e| Status::permission_denied(format!("actions[{i}]: {}", e.message())))?;
            let at = header.device_time.unwrap_or_default();
            actions.push(((at.seconds, at.nanos), i, action));
        }
        // Device-time order; the batch's own order breaks ties.
        actions.sort_by_key(|(at, i, _)| (*at, *i));
        let mut outcomes = Vec::with_capacity(actions.len());
        for (_, _, action) in actions {
            let action_id = validate::action(&action)?.action_id.clone();
            let acted_by = caller.as_ref().map(actor_of);
            match self.dispatcher.act(&action, true, acted_by).await {
                Ok(mut order) => {
                    self.contacts.open_order(&mut order).await;
                    outcomes.push(ActionOutcome {
                        action_id,
                        code: "OK".into(),
                        message: String::new(),
                        order: Some(order),
                    });
                }
                Err(status) => {
                    outcomes.push(ActionOutcome {
                        action_id,
                        code: format!("{:?}", status.code()),
                        message: status.message().to_string(),
                        order: None,
                    });
                    break;
                }
            }
        }
        Ok(Response::new(SubmitActionsResponse { outcomes }))
    }

    async fn get_work_order(
        &self,
        request: Request<GetWorkOrderRequest>,
    ) -> Result<Response<WorkOrderView>, Status> {
        let caller = caller(&request);
        validate::id("order_id", &request.get_ref().order_id)?;
        if let Some(owner) =
            self.partitions
                .route_case(&request, "order_id", &request.get_ref().order_id)?
        {
            return DispatchClient::new(owner)
                .get_work_order(self.partitions.relay(request)?)
                .await;
        }
        let req = request.into_inner();
        let mut order = self.dispatcher.resolve_order(&req.order_id)?;
        check_crew(caller.as_ref(), &order.crew_id)?;
        self.contacts.open_order(&mut order).await;
        Ok(Response::new(order))
    }

    async fn get_connections(
        &self,
        request: Request<GetConnectionsRequest>,
    ) -> Result<Response<Connections>, Status> {
        // Both bounded by MAX_WATCHES (4,096) an instance.
        let narrow = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let mut connections = Connections {
            crews_connected: narrow(self.watchers.crews_connected()),
            watches: narrow(self.watchers.count()),
        };
        // The company's figure: every partition's phones. A watch is held
        // (and counted) in its crew's station's partition only; an instance
        // relaying it holds no slot for it.
        if self.partitions.count() > 1 && !Partitions::was_forwarded(&request) {
            for (partition, channel) in self.partitions.all()? {
                let Some(channel) = channel else { continue };
                let theirs = DispatchClient::new(channel)
                    .get_connections(self.partitions.relay_copy(&request)?)
                    .await
                    .map_err(|status| Partitions::from_partition(partition, status))?
                    .into_inner();
                connections.crews_connected = connections
                    .crews_connected
                    .saturating_add(theirs.crews_connected);
                connections.watches = connections.watches.saturating_add(theirs.watches);
            }
        }
        Ok(Response::new(connections))
    }
}
