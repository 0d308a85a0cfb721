//! What an id a caller was given names, said the same way by every service.
//!
//! A caller holds a ticket id (from `ReportTicket`), an incident id (from the
//! same answer, when the ticket leads or joined an incident) or, on a crew's
//! phone, an order id (an order is named by its case: a ticket or an
//! incident id). Every RPC that takes a case accepts any of them and answers
//! with the case it resolved to; when nothing is found, the `NOT_FOUND`
//! says which of these the id is, so a caller can tell a typo from a case
//! that is not there yet.

use tonic::Status;

/// What a service knows of an id it could not find the thing asked for by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownAs {
    /// Neither a ticket nor an incident this service has heard of.
    Unknown,
    /// A ticket on its own (its case is itself).
    Ticket,
    /// A ticket of the named incident (its case is the incident).
    TicketOfIncident(String),
    /// An incident.
    Incident,
}

/// `NOT_FOUND` for `id`, which was looked up as `what` (e.g. "route",
/// "work order") in `service`.
pub fn not_found(service: &str, what: &str, id: &str, known_as: &KnownAs) -> Status {
    Status::not_found(match known_as {
        KnownAs::Unknown => {
            format!("{id} is not a ticket or incident {service} knows (no {what})")
        }
        KnownAs::Ticket => format!("{id} is a ticket with no {what} in {service}"),
        KnownAs::TicketOfIncident(incident) => {
            format!("{id} is a ticket of incident {incident}, which has no {what} in {service}")
        }
        KnownAs::Incident => format!("{id} is an incident with no {what} in {service}"),
    })
}

/// `FAILED_PRECONDITION` for an incident id given to an RPC that acts on one
/// customer's ticket (a follow-up, a complaint, a cancellation): an
/// incident has many callers, so the caller must name the ticket.
pub fn incident_not_a_ticket(field: &str, incident: &str, lead_ticket: &str) -> Status {
    Status::failed_precondition(format!(
        "invalid {field}: {incident} is an incident (led by ticket {lead_ticket}); \
         this call acts for one customer, so name that customer's ticket"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_not_found_names_the_id_and_what_it_is() {
        let cases = [
            (KnownAs::Unknown, "not a ticket or incident"),
            (KnownAs::Ticket, "is a ticket with no route"),
            (
                KnownAs::TicketOfIncident("incident-9".into()),
                "ticket of incident incident-9",
            ),
            (KnownAs::Incident, "is an incident with no route"),
        ];
        for (known_as, says) in cases {
            let status = not_found("routing", "route", "ticket-1", &known_as);
            assert_eq!(status.code(), tonic::Code::NotFound);
            assert!(status.message().starts_with("ticket-1 "), "{status:?}");
            assert!(status.message().contains(says), "{status:?}");
        }
        let status = incident_not_a_ticket("ticket_id", "incident-9", "ticket-1");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("ticket_id"));
        assert!(status.message().contains("ticket-1"));
    }
}
