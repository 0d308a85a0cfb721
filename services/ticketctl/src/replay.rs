//! Replay: every event of a ticket or an incident, read from all four
//! services' logs by correlation id (`EventLog.ReadCorrelation`), merged
//! here, on the client, into one timeline in causal order: an event never
//! comes before its cause (its `causation_id`, in any service's log), and
//! otherwise in the order it was recorded.
//!
//! Copies one service keeps of another's events (`EventObserved`) are left
//! out: each fact appears once, from the log that owns it. So are the
//! consumers' records of events they parked or dead-lettered
//! (`lineguard.bus.v1`): bookkeeping of the bus, not facts of the ticket.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use futures::{StreamExt, TryStreamExt, stream};
use indicatif::ProgressBar;
use lineguard_protos::eventlog::v1::{EventEnvelope, ReadCorrelationRequest};
use lineguard_protos::intake::v1::{IncidentOpened, TicketReported};
use lineguard_protos::routing::v1::TicketFollowedIncident;
use prost::{Message, Name};
use serde::Serialize;

use crate::Error;
use crate::endpoints::{Clients, SERVICES};

/// Events read per `ReadCorrelation` call.
pub const PAGE: u32 = 1_000;
/// Reads in flight at once during a replay.
pub const IN_FLIGHT: usize = 64;
/// The most events one replay holds (an incident of a big storm is far below).
pub const MAX_EVENTS: usize = 1_000_000;

/// A replay's events, merged, and what they were read for.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    /// "ticket" or "incident".
    pub kind: &'static str,
    pub id: String,
    /// Every correlation id read: the ticket, its incident and lead; or the
    /// incident and all its tickets.
    pub correlation_ids: Vec<String>,
    #[serde(skip)]
    pub events: Vec<EventEnvelope>,
}

/// Nanoseconds since the epoch of an event's recording.
pub fn recorded_nanos(e: &EventEnvelope) -> i128 {
    e.recorded_at.as_ref().map_or(0, |t| {
        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
    })
}

/// The short name of an event type (`TicketRouted`).
pub fn short_type(e: &EventEnvelope) -> &str {
    e.event_type.rsplit('.').next().unwrap_or(&e.event_type)
}

fn is_copy(e: &EventEnvelope) -> bool {
    short_type(e) == "EventObserved" || e.event_type.starts_with("lineguard.bus.")
}

/// Every event of `correlation` in `service`'s log, in log order.
pub async fn read_correlation(
    clients: &Clients,
    service: &str,
    correlation: &str,
) -> Result<Vec<EventEnvelope>, Error> {
    let mut client = clients.log(service)?;
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page = client
            .read_correlation(ReadCorrelationRequest {
                correlation_id: correlation.to_string(),
                from_position: from,
                max_count: PAGE,
            })
            .await
            .map_err(|status| Error::Service {
                service: service.to_string(),
                status,
            })?
            .into_inner();
        out.extend(page.events.into_iter().filter(|e| !is_copy(e)));
        if out.len() > MAX_EVENTS {
            return Err(Error::TooBig(format!(
                "{correlation} has more than {MAX_EVENTS} events in {service}"
            )));
        }
        if page.next_position == 0 {
            return Ok(out);
        }
        from = page.next_position;
    }
}

/// The event's payload as `M`, if the event is of that type and decodes.
pub fn decode<M: Message + Default + Name>(e: &EventEnvelope) -> Option<M> {
    (e.event_type == M::full_name())
        .then(|| M::decode(e.payload.as_ref()).ok())
        .flatten()
}

/// Reads every correlation id from every service ([`IN_FLIGHT`] reads at a
/// time) and merges the lot; `progress` advances one per correlation id
/// and service read.
async fn read_all(
    clients: &Clients,
    ids: &[String],
    progress: &ProgressBar,
) -> Result<Vec<EventEnvelope>, Error> {
    progress.set_length((ids.len() * SERVICES.len()) as u64);
    let reads = ids.iter().flat_map(|id| {
        SERVICES.iter().map(move |service| async move {
            let read = read_correlation(clients, service, id).await;
            progress.inc(1);
            read
        })
    });
    let pages: Vec<Vec<EventEnvelope>> = stream::iter(reads)
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await?;
    let mut seen = BTreeSet::new();
    let events = pages
        .into_iter()
        .flatten()
        .filter(|e| seen.insert((e.source.clone(), e.global_position)))
        .collect();
    Ok(merge(events))
}

/// The whole life of one ticket: its own events, and its incident's (the
/// incident's handling is the ticket's handling), with the lead's report.
pub async fn ticket(clients: &Clients, ticket_id: &str) -> Result<Replayed, Error> {
    let own = read_correlation(clients, "intake", ticket_id).await?;
    let reported = own
        .iter()
        .find_map(decode::<TicketReported>)
        .ok_or_else(|| {
            Error::NotFound(format!("ticket {ticket_id}: intake has no report of it"))
        })?;
    let mut ids = vec![ticket_id.to_string()];
    if !reported.incident_id.is_empty() {
        ids.push(reported.incident_id.clone());
        if !reported.incident_lead {
            let incident = read_correlation(clients, "intake", &reported.incident_id).await?;
            if let Some(opened) = incident.iter().find_map(decode::<IncidentOpened>) {
                ids.push(opened.lead_ticket_id);
            }
        }
    }
    Ok(Replayed {
        kind: "ticket",
        id: ticket_id.to_string(),
        events: read_all(clients, &ids, &ProgressBar::hidden()).await?,
        correlation_ids: ids,
    })
}

/// The whole life of an incident: its own events and every ticket's in it.
pub async fn incident(clients: &Clients, incident_id: &str) -> Result<Replayed, Error> {
    incident_with_progress(clients, incident_id, &ProgressBar::hidden()).await
}

/// [`incident`], advancing `progress` as each ticket's events are read (an
/// incident of a storm has thousands of tickets).
pub async fn incident_with_progress(
    clients: &Clients,
    incident_id: &str,
    progress: &ProgressBar,
) -> Result<Replayed, Error> {
    let own = read_correlation(clients, "intake", incident_id).await?;
    let opened = own
        .iter()
        .find_map(decode::<IncidentOpened>)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "incident {incident_id}: intake has no record of it"
            ))
        })?;
    let mut ids = vec![incident_id.to_string(), opened.lead_ticket_id.clone()];
    // Children: routing records each one following the incident.
    for e in read_correlation(clients, "routing", incident_id).await? {
        if let Some(f) = decode::<TicketFollowedIncident>(&e)
            && !ids.contains(&f.ticket_id)
        {
            ids.push(f.ticket_id);
        }
    }
    Ok(Replayed {
        kind: "incident",
        id: incident_id.to_string(),
        events: read_all(clients, &ids, progress).await?,
        correlation_ids: ids,
    })
}

/// Orders events so that none comes before its cause, and otherwise by
/// recording time (then service, then log position, for a stable order).
pub fn merge(events: Vec<EventEnvelope>) -> Vec<EventEnvelope> {
    let rank = |e: &EventEnvelope| SERVICES.iter().position(|s| *s == e.source).unwrap_or(4);
    let by_id: HashMap<&str, usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.event_id.as_str(), i))
        .collect();
    // Events waiting for their cause, by the cause's index.
    let mut waiting: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut ready = BinaryHeap::new();
    let key = |i: usize| {
        let e = &events[i];
        Reverse((recorded_nanos(e), rank(e), e.global_position, i))
    };
    for (i, e) in events.iter().enumerate() {
        match by_id.get(e.causation_id.as_str()) {
            Some(&cause) if cause != i && !e.causation_id.is_empty() => {
                waiting.entry(cause).or_default().push(i)
            }
            _ => ready.push(key(i)),
        }
    }
    let mut order = Vec::with_capacity(events.len());
    let mut placed = vec![false; events.len()];
    while let Some(Reverse((_, _, _, i))) = ready.pop() {
        order.push(i);
        placed[i] = true;
        for effect in waiting.remove(&i).unwrap_or_default() {
            ready.push(key(effect));
        }
    }
    // A cycle of causes cannot happen in a sound log; if it did, keep the
    // events rather than drop them.
    let mut rest: Vec<usize> = (0..events.len()).filter(|i| !placed[*i]).collect();
    rest.sort_by_key(|&i| key(i).0);
    order.extend(rest);
    let mut slots: Vec<Option<EventEnvelope>> = events.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;

    fn event(id: &str, source: &str, at: i64, cause: &str) -> EventEnvelope {
        EventEnvelope {
            event_id: id.into(),
            source: source.into(),
            recorded_at: Some(Timestamp {
                seconds: at,
                nanos: 0,
            }),
            causation_id: cause.into(),
            ..EventEnvelope::default()
        }
    }

    #[test]
    fn an_effect_never_precedes_its_cause_even_with_an_earlier_clock() {
        // Routing's clock runs behind intake's: its route looks earlier
        // than the report that caused it.
        let events = vec![
            event("route", "routing", 9, "report"),
            event("report", "intake", 10, ""),
            event("ack", "dispatch", 12, "route"),
            event("other", "feedback", 11, ""),
        ];
        let order: Vec<String> = merge(events).into_iter().map(|e| e.event_id).collect();
        assert_eq!(order, ["report", "route", "other", "ack"]);
    }

    #[test]
    fn otherwise_by_time_then_service() {
        let events = vec![
            event("b", "routing", 5, ""),
            event("a", "intake", 5, ""),
            event("c", "intake", 1, "missing-cause"),
        ];
        let order: Vec<String> = merge(events).into_iter().map(|e| e.event_id).collect();
        assert_eq!(order, ["c", "a", "b"]);
    }
}
