//! `verify`: every ticket intake knows, replayed from the four logs and
//! folded ([`state`](crate::state)), compared with intake's live view. A
//! ticket still moving (its view behind its events for a moment) is looked
//! at again before it counts as a mismatch. Then routing recounts every
//! assignee's and crew's open tickets from its log
//! (`Routing/VerifyLoads`): a stored load that differs is a mismatch too.

use std::time::Duration;

use futures::{StreamExt, stream};
use indicatif::ProgressBar;
use lineguard_protos::intake::v1::{GetTicketRequest, ListTicketsRequest, TicketView};
use lineguard_protos::routing::v1::VerifyLoadsRequest;
use serde::Serialize;

use crate::endpoints::Clients;
use crate::state::{TicketState, ticket_state};
use crate::{Error, replay};

/// Tickets replayed at once.
pub const CONCURRENCY: usize = 16;
/// Looks at a differing ticket before calling it a mismatch.
pub const SETTLE_TRIES: u32 = 3;

/// One field that differs.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub ticket_id: String,
    pub field: String,
    pub replayed: String,
    pub live: String,
}

/// An assignee's or crew's stored open tickets that differ from routing's
/// recount from its log.
#[derive(Debug, Clone, Serialize)]
pub struct LoadMismatch {
    pub assignee_id: String,
    pub stored: u32,
    pub recounted: u32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub tickets: usize,
    pub events_replayed: usize,
    pub mismatches: Vec<Mismatch>,
    /// Assignees and crews whose loads were recounted.
    pub loads_checked: u64,
    /// Open tickets held in all, by the recount (0 once every ticket is done).
    pub open_tickets_held: u64,
    pub load_mismatches: Vec<LoadMismatch>,
}

impl Report {
    /// Whether everything replayed and recounted as the live views say.
    pub fn is_clean(&self) -> bool {
        self.mismatches.is_empty() && self.load_mismatches.is_empty()
    }
}

/// Every ticket id intake lists.
pub async fn all_tickets(clients: &Clients) -> Result<Vec<TicketView>, Error> {
    let mut intake = clients.intake();
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = intake
            .list_tickets(ListTicketsRequest {
                page_size: 1_000,
                page_token: token,
                ..ListTicketsRequest::default()
            })
            .await
            .map_err(Error::service("intake"))?
            .into_inner();
        out.extend(page.tickets);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// Replays one ticket and compares it with intake's view: the differences
/// and the number of events replayed.
pub async fn check_ticket(
    clients: &Clients,
    ticket_id: &str,
) -> Result<(Vec<Mismatch>, usize), Error> {
    let mut last = Vec::new();
    let mut events = 0;
    for attempt in 0..SETTLE_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let replayed = replay::ticket(clients, ticket_id).await?;
        events = replayed.events.len();
        let folded = ticket_state(ticket_id, &replayed.events, None).unwrap_or_default();
        let view = clients
            .intake()
            .get_ticket(GetTicketRequest {
                ticket_id: ticket_id.to_string(),
            })
            .await
            .map_err(Error::service("intake"))?
            .into_inner()
            .ticket
            .unwrap_or_default();
        last = folded
            .differences(&TicketState::of_view(&view))
            .into_iter()
            .map(|(field, replayed, live)| Mismatch {
                ticket_id: ticket_id.to_string(),
                field: field.to_string(),
                replayed,
                live,
            })
            .collect();
        if last.is_empty() {
            break;
        }
    }
    Ok((last, events))
}

/// Checks every ticket; `progress` advances one per ticket.
pub async fn verify(clients: &Clients, progress: &ProgressBar) -> Result<Report, Error> {
    verify_partition(clients, None, progress).await
}

/// Checks the tickets `clients`' partition opened (every ticket when
/// `partition` is `None`: an unsplit backend). A ticket replays from the
/// logs of the partition that opened it, so a split backend is verified
/// one partition at a time, each against its own instances' logs.
pub async fn verify_partition(
    clients: &Clients,
    partition: Option<lineguard_bus::Partition>,
    progress: &ProgressBar,
) -> Result<Report, Error> {
    let mut tickets = all_tickets(clients).await?;
    if let Some(partition) = partition {
        tickets.retain(|t| {
            lineguard_bus::Partition::of_case(&t.ticket_id, partition.count()) == Some(partition)
        });
    }
    progress.set_length(tickets.len() as u64);
    let results: Vec<Result<(Vec<Mismatch>, usize), Error>> = stream::iter(tickets.iter())
        .map(|t| async move {
            let r = check_ticket(clients, &t.ticket_id).await;
            progress.inc(1);
            r
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut report = Report {
        tickets: tickets.len(),
        ..Report::default()
    };
    for r in results {
        let (mismatches, events) = r?;
        report.events_replayed += events;
        report.mismatches.extend(mismatches);
    }
    report
        .mismatches
        .sort_by(|a, b| a.ticket_id.cmp(&b.ticket_id));
    let loads = clients
        .routing()
        .verify_loads(VerifyLoadsRequest {})
        .await
        .map_err(Error::service("routing"))?
        .into_inner();
    report.loads_checked = loads.assignees;
    report.open_tickets_held = loads.open_tickets;
    report.load_mismatches = loads
        .mismatches
        .into_iter()
        .map(|m| LoadMismatch {
            assignee_id: m.assignee_id,
            stored: m.stored,
            recounted: m.recounted,
        })
        .collect();
    Ok(report)
}
