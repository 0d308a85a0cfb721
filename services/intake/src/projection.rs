//! Intake's projections, derived from its log only:
//!
//! | key | value |
//! | --- | --- |
//! | `ticket/<ticket id>` | [`TicketView`] |
//! | `open/<customer>/<kind>` | the customer's open ticket of that kind |
//! | `incident/<incident id>` | [`IncidentView`] |
//! | `district-incident/<district>/<kind>` | the district's latest incident of that kind |
//! | `by-time/<reported at, ns, 20 digits>/<ticket id>` | empty: the listing order |
//!
//! The customer key is the account number, or a digest of the phone number
//! when there is no account (a phone number never appears in a key).

use lineguard_eventlog::{EventEnvelope, ProjectionView, Projector, decode_payload};
use lineguard_protos::intake::v1::{
    IncidentMarkedProbableOutage, IncidentOpened, IncidentView, TicketCancelled,
    TicketJoinedIncident, TicketReported, TicketStatus, TicketUrged, TicketView,
};
use prost::{Message, Name};
use sha2::{Digest, Sha256};

/// Builds intake's views from its events.
#[derive(Debug, Default, Clone, Copy)]
pub struct IntakeProjector;

pub fn ticket_key(ticket_id: &str) -> Vec<u8> {
    format!("ticket/{ticket_id}").into_bytes()
}

pub fn open_key(customer: &str, kind: i32) -> Vec<u8> {
    format!("open/{customer}/{kind}").into_bytes()
}

pub fn incident_key(incident_id: &str) -> Vec<u8> {
    format!("incident/{incident_id}").into_bytes()
}

pub fn district_incident_key(district_id: &str, kind: i32) -> Vec<u8> {
    format!("district-incident/{district_id}/{kind}").into_bytes()
}

/// Prefix of the listing index.
pub const BY_TIME_PREFIX: &[u8] = b"by-time/";

pub fn by_time_key(reported_at_nanos: i128, ticket_id: &str) -> Vec<u8> {
    format!("by-time/{:020}/{ticket_id}", reported_at_nanos.max(0)).into_bytes()
}

/// The ticket id at the end of a listing index key.
pub fn ticket_id_of_by_time_key(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key).ok()?.rsplit('/').next()
}

/// Who a report is from, for spotting repeat calls; `None` when the report
/// names neither an account nor a phone.
pub fn customer_key(account_number: &str, phone: &str) -> Option<String> {
    if !account_number.is_empty() {
        return Some(format!("acct-{account_number}"));
    }
    if phone.is_empty() {
        return None;
    }
    let digest = Sha256::digest(phone.trim_start_matches('+').as_bytes());
    Some(format!(
        "phone-{}",
        digest[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// Nanoseconds since the epoch.
pub fn nanos(t: &prost_types::Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// Whether a ticket in this status still counts as open for repeat calls.
pub fn is_open(status: TicketStatus) -> bool {
    !matches!(
        status,
        TicketStatus::Completed
            | TicketStatus::Answered
            | TicketStatus::Closed
            | TicketStatus::Cancelled
    )
}

fn load<M: Message + Default>(view: &ProjectionView<'_>, key: &[u8]) -> Result<Option<M>, String> {
    match view.get(key).map_err(|e| e.to_string())? {
        Some(bytes) => M::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

fn load_ticket(view: &ProjectionView<'_>, ticket_id: &str) -> Result<TicketView, String> {
    load(view, &ticket_key(ticket_id))?.ok_or_else(|| format!("unknown ticket {ticket_id}"))
}

fn store(view: &mut ProjectionView<'_>, key: Vec<u8>, message: &impl Message) {
    view.put(key, message.encode_to_vec());
}

impl Projector for IntakeProjector {
    fn name(&self) -> &'static str {
        "intake"
    }

    fn version(&self) -> u32 {
        1
    }

    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String> {
        let at = event.recorded_at.unwrap_or_default();
        match event.event_type.as_str() {
            t if t == TicketReported::full_name() => {
                let e: TicketReported = decode_payload(event)?;
                let reported_at = e.reported_at.unwrap_or(at);
                let ticket = TicketView {
                    ticket_id: e.ticket_id.clone(),
                    status: TicketStatus::Received as i32,
                    channel: e.channel,
                    kind: e.kind,
                    service_request_type: e.service_request_type,
                    urgency: e.urgency,
                    account_number: e.account_number.clone(),
                    district_id: e.district_id.clone(),
                    address: e.address.clone(),
                    caller: e.caller.clone(),
                    description: e.description.clone(),
                    reported_at: Some(reported_at),
                    updated_at: Some(at),
                    ..TicketView::default()
                };
                let phone = e.caller.as_ref().map_or("", |c| c.phone.as_str());
                if let Some(customer) = customer_key(&e.account_number, phone) {
                    view.put(open_key(&customer, e.kind), e.ticket_id.as_bytes().to_vec());
                }
                view.put(by_time_key(nanos(&reported_at), &e.ticket_id), Vec::new());
                store(view, ticket_key(&e.ticket_id), &ticket);
            }
            t if t == TicketUrged::full_name() => {
                let e: TicketUrged = decode_payload(event)?;
                let mut ticket = load_ticket(view, &e.ticket_id)?;
                ticket.urge_count = e.urge_count;
                ticket.updated_at = Some(at);
                store(view, ticket_key(&e.ticket_id), &ticket);
            }
            t if t == IncidentOpened::full_name() => {
                let e: IncidentOpened = decode_payload(event)?;
                let opened_at = e.opened_at.unwrap_or(at);
                let incident = IncidentView {
                    incident_id: e.incident_id.clone(),
                    district_id: e.district_id.clone(),
                    kind: e.kind,
                    lead_ticket_id: e.lead_ticket_id.clone(),
                    ticket_count: 1,
                    opened_at: Some(opened_at),
                    last_call_at: Some(opened_at),
                    window_seconds: e.window_seconds,
                    probable_outage: false,
                };
                let mut lead = load_ticket(view, &e.lead_ticket_id)?;
                lead.incident_id = e.incident_id.clone();
                lead.incident_lead = true;
                lead.updated_at = Some(at);
                store(view, ticket_key(&e.lead_ticket_id), &lead);
                view.put(
                    district_incident_key(&e.district_id, e.kind),
                    e.incident_id.as_bytes().to_vec(),
                );
                store(view, incident_key(&e.incident_id), &incident);
            }
            t if t == TicketJoinedIncident::full_name() => {
                let e: TicketJoinedIncident = decode_payload(event)?;
                let mut incident: IncidentView = load(view, &incident_key(&e.incident_id))?
                    .ok_or_else(|| format!("unknown incident {}", e.incident_id))?;
                incident.ticket_count = e.ticket_count;
                incident.last_call_at = Some(at);
                store(view, incident_key(&e.incident_id), &incident);
                let mut ticket = load_ticket(view, &e.ticket_id)?;
                ticket.incident_id = e.incident_id.clone();
                ticket.incident_lead = false;
                ticket.status = TicketStatus::Attached as i32;
                ticket.updated_at = Some(at);
                store(view, ticket_key(&e.ticket_id), &ticket);
            }
            t if t == IncidentMarkedProbableOutage::full_name() => {
                let e: IncidentMarkedProbableOutage = decode_payload(event)?;
                let mut incident: IncidentView = load(view, &incident_key(&e.incident_id))?
                    .ok_or_else(|| format!("unknown incident {}", e.incident_id))?;
                incident.probable_outage = true;
                store(view, incident_key(&e.incident_id), &incident);
            }
            t if t == TicketCancelled::full_name() => {
                let e: TicketCancelled = decode_payload(event)?;
                let mut ticket = load_ticket(view, &e.ticket_id)?;
                ticket.status = TicketStatus::Cancelled as i32;
                ticket.updated_at = Some(at);
                let phone = ticket.caller.as_ref().map_or("", |c| c.phone.as_str());
                if let Some(customer) = customer_key(&ticket.account_number, phone) {
                    let key = open_key(&customer, ticket.kind);
                    // Only if it still points at this ticket.
                    if view.get(&key).map_err(|e| e.to_string())?.as_deref()
                        == Some(e.ticket_id.as_bytes())
                    {
                        view.delete(key);
                    }
                }
                store(view, ticket_key(&e.ticket_id), &ticket);
            }
            other => return Err(format!("intake does not project {other}")),
        }
        Ok(())
    }
}
