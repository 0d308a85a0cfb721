//! `parked` and `deadletters`: what each service's consumers hold back
//! (`lineguard.bus.v1.Consumers`): events parked until what they wait for
//! arrives, and dead letters, which an operator can send back through
//! their consumer once the cause is fixed.

use lineguard_protos::bus::v1::consumers_client::ConsumersClient;
use lineguard_protos::bus::v1::{
    DeadLetterEntry, ListDeadLettersRequest, ListParkedRequest, ParkedEntry, RetryDeadLetterRequest,
};
use serde::Serialize;

use crate::Error;
use crate::endpoints::{Clients, SERVICES};

/// One service's parked events or dead letters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Held {
    pub service: String,
    /// How many in all (the list below may show fewer).
    pub total: u64,
    pub entries: Vec<Entry>,
}

/// One parked event or dead letter.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Entry {
    pub consumer: String,
    pub event_id: String,
    pub event_type: String,
    pub correlation_id: String,
    /// What a parked event waits for, or a dead letter's error.
    pub detail: String,
}

fn client(
    clients: &Clients,
    service: &str,
) -> Result<ConsumersClient<tonic::transport::Channel>, Error> {
    Ok(ConsumersClient::new(clients.channel(service)?))
}

/// The services named, or all four.
pub fn services(only: &[String]) -> Result<Vec<&'static str>, Error> {
    if only.is_empty() {
        return Ok(SERVICES.to_vec());
    }
    only.iter()
        .map(|s| {
            SERVICES
                .iter()
                .find(|known| *known == s)
                .copied()
                .ok_or_else(|| Error::Usage(format!("unknown service {s}")))
        })
        .collect()
}

fn parked_entry(p: ParkedEntry) -> Entry {
    Entry {
        consumer: p.consumer,
        event_id: p.event_id,
        event_type: p.event_type,
        correlation_id: p.correlation_id,
        detail: format!("waiting for {} ({})", p.waiting_for, p.reason),
    }
}

fn dead_entry(d: DeadLetterEntry) -> Entry {
    Entry {
        consumer: d.consumer,
        event_id: d.event_id,
        event_type: d.event_type,
        correlation_id: d.correlation_id,
        detail: format!("{} after {} deliveries", d.error, d.deliveries),
    }
}

/// Which of a service's held events to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Events parked until what they wait for arrives.
    Parked,
    /// Events a consumer could not apply.
    DeadLetters,
}

/// Every service's parked events or dead letters (up to `page` listed each).
pub async fn held(
    clients: &Clients,
    only: &[String],
    page: u32,
    kind: Kind,
) -> Result<Vec<Held>, Error> {
    let mut out = Vec::new();
    for service in services(only)? {
        let mut consumers = client(clients, service)?;
        let (total, entries) = match kind {
            Kind::Parked => {
                let listed = consumers
                    .list_parked(ListParkedRequest {
                        consumer: String::new(),
                        page_size: page,
                    })
                    .await
                    .map_err(Error::service(service))?
                    .into_inner();
                (
                    listed.total,
                    listed.parked.into_iter().map(parked_entry).collect(),
                )
            }
            Kind::DeadLetters => {
                let listed = consumers
                    .list_dead_letters(ListDeadLettersRequest {
                        consumer: String::new(),
                        page_size: page,
                    })
                    .await
                    .map_err(Error::service(service))?
                    .into_inner();
                (
                    listed.total,
                    listed.dead_letters.into_iter().map(dead_entry).collect(),
                )
            }
        };
        out.push(Held {
            service: service.to_string(),
            total,
            entries,
        });
    }
    Ok(out)
}

/// Sends one dead letter back through its consumer.
pub async fn retry(
    clients: &Clients,
    service: &str,
    consumer: &str,
    event_id: &str,
) -> Result<(), Error> {
    let service = services(&[service.to_string()])?[0];
    client(clients, service)?
        .retry_dead_letter(RetryDeadLetterRequest {
            consumer: consumer.to_string(),
            event_id: event_id.to_string(),
        })
        .await
        .map_err(Error::service(service))?;
    Ok(())
}
