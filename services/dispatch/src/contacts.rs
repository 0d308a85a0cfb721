//! Customer contacts for crews.
//!
//! Dispatch keeps every customer's name, phone, address and description
//! sealed, as intake sealed them (`lineguard_intake::sealing`): its log,
//! its views and the crew subjects on the bus hold only the sealed bytes.
//! What a crew is answered (a work order, a dispatch event) is opened on
//! the way out by intake (`Intake/UnsealContacts`), the only holder of the
//! keys, and never stored. An erased customer's contact comes back marked
//! `customer_data_erased`.
//!
//! Intake unreachable: the crew still gets its order, without the contact
//! (a crew must never miss an order for want of a phone number); asking
//! for the order again opens it once intake answers.

use lineguard_protos::dispatch::v1::{CoveredTicket, CrewEvent, WorkOrderView, crew_event::Body};
use lineguard_protos::intake::v1::UnsealContactsRequest;
use lineguard_protos::intake::v1::intake_client::IntakeClient;
use tonic::transport::Channel;

/// How long an opening may take before the crew is answered without it.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sealed contacts through intake.
#[derive(Debug, Clone, Default)]
pub struct ContactOpener {
    intake: Option<IntakeClient<Channel>>,
}

impl ContactOpener {
    /// An opener calling intake over `channel`; `None`: contacts are never
    /// opened (crews get orders without them).
    pub fn new(channel: Option<Channel>) -> ContactOpener {
        ContactOpener {
            intake: channel.map(IntakeClient::new),
        }
    }

    /// Fills each ticket's caller, address and description from its sealed
    /// contact (or marks it erased), and drops the sealed bytes.
    pub async fn open_tickets(&self, tickets: &mut [&mut CoveredTicket]) {
        let mut sealed = Vec::new();
        let mut holders = Vec::new();
        for (i, ticket) in tickets.iter_mut().enumerate() {
            if let Some(contact) = ticket.contact.take() {
                sealed.push(contact);
                holders.push(i);
            }
        }
        if sealed.is_empty() {
            return;
        }
        let Some(intake) = &self.intake else {
            return;
        };
        let mut intake = intake.clone();
        let request = UnsealContactsRequest { contacts: sealed };
        let opened = match tokio::time::timeout(OPEN_TIMEOUT, intake.unseal_contacts(request)).await
        {
            Ok(Ok(response)) => response.into_inner().contacts,
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), error = %status.message(),
                    "intake did not open contacts; the crew is answered without them");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    "intake did not open contacts in time; the crew is answered without them"
                );
                return;
            }
        };
        // Answers come in request order, one per contact.
        for (i, answer) in holders.into_iter().zip(opened) {
            let ticket = &mut tickets[i];
            if answer.erased {
                ticket.customer_data_erased = true;
            } else if let Some(contact) = answer.contact {
                ticket.caller_name = contact.caller_name;
                ticket.callback_phone = contact.caller_phone;
                ticket.address = contact.address;
                ticket.description = contact.description;
            }
        }
    }

    /// Opens a work order's tickets.
    pub async fn open_order(&self, order: &mut WorkOrderView) {
        let mut tickets: Vec<&mut CoveredTicket> = order.tickets.iter_mut().collect();
        self.open_tickets(&mut tickets).await;
    }

    /// Opens the tickets of a crew event's typed body (the envelope's
    /// payload stays as recorded: sealed).
    pub async fn open_crew_event(&self, event: &mut CrewEvent) {
        let mut tickets: Vec<&mut CoveredTicket> = match &mut event.body {
            Some(Body::OrderAssigned(assigned)) => assigned.tickets.iter_mut().collect(),
            Some(Body::IncidentGrew(grew)) => grew.ticket.iter_mut().collect(),
            _ => Vec::new(),
        };
        self.open_tickets(&mut tickets).await;
    }
}
