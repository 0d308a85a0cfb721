//! `tail`: the events of all four services as they are committed, merged
//! as they arrive, filtered by service, event type and correlation id.

use futures::StreamExt;
use futures::stream::select_all;
use lineguard_protos::eventlog::v1::{EventEnvelope, GetLogInfoRequest, SubscribeRequest};

use crate::endpoints::{Clients, SERVICES};
use crate::replay::short_type;
use crate::{Error, timeline};

/// Which events to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these services (empty: all four).
    pub services: Vec<String>,
    /// Only event types containing this (`Routed`, `Clock`).
    pub event_type: Option<String>,
    /// Only this correlation id (a ticket, an incident).
    pub correlation: Option<String>,
    /// Also the copies a service keeps of another's events.
    pub with_copies: bool,
}

impl Filter {
    pub fn admits(&self, e: &EventEnvelope) -> bool {
        (self.with_copies || short_type(e) != "EventObserved")
            && self
                .event_type
                .as_ref()
                .is_none_or(|t| e.event_type.contains(t.as_str()))
            && self
                .correlation
                .as_ref()
                .is_none_or(|c| &e.correlation_id == c)
    }
}

/// One event as a line of text.
pub fn line(e: &EventEnvelope) -> String {
    format!(
        "{} {:<8} #{:<8} {:<28} {:<44} {}",
        timeline::rfc3339(crate::replay::recorded_nanos(e)),
        e.source,
        e.global_position,
        short_type(e),
        e.correlation_id,
        timeline::describe(e)
    )
}

/// Follows the services' logs from their heads (or from the start), calling
/// `each` for every admitted event, until `limit` events were shown or the
/// streams end. Returns how many were shown.
pub async fn tail(
    clients: &Clients,
    filter: &Filter,
    from_start: bool,
    limit: Option<usize>,
    mut each: impl FnMut(&EventEnvelope),
) -> Result<usize, Error> {
    let mut streams = Vec::new();
    for service in SERVICES
        .iter()
        .filter(|s| filter.services.is_empty() || filter.services.iter().any(|f| f == *s))
    {
        let mut log = clients.log(service)?;
        let from = if from_start {
            1
        } else {
            log.get_log_info(GetLogInfoRequest {})
                .await
                .map_err(Error::service(service))?
                .into_inner()
                .head_position
                + 1
        };
        let stream = log
            .subscribe(SubscribeRequest {
                from_position: from,
            })
            .await
            .map_err(Error::service(service))?
            .into_inner();
        let name = service.to_string();
        streams.push(stream.map(move |item| (name.clone(), item)).boxed());
    }
    let mut merged = select_all(streams);
    let mut shown = 0;
    while let Some((service, item)) = merged.next().await {
        let event = item
            .map_err(|status| Error::Service { service, status })?
            .event
            .unwrap_or_default();
        if filter.admits(&event) {
            each(&event);
            shown += 1;
            if limit.is_some_and(|l| shown >= l) {
                break;
            }
        }
    }
    Ok(shown)
}
