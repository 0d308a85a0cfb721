//! Intake: where a ticket enters Lineguard, from any door (the 95598
//! hotline, a station's phone or counter, a district manager's phone, the
//! app, WeChat, the web), and the customer-facing view of every ticket.
//!
//! A report becomes one of three things, decided under a lock on the
//! customer and the district and committed atomically with its idempotency
//! record: a new ticket; a new ticket joining an open incident (calls of the
//! same fault kind in the same district within the correlation window); or
//! an urge on the customer's open ticket of the same kind.
//!
//! # Layout
//!
//! - [`api`]: the `lineguard.intake.v1.Intake` gRPC service.
//! - [`validate`]: field-level checks; every error names its field.
//! - [`customer`]: the keyed digest that recognises a repeat caller by phone.
//! - [`sealing`]: customer data sealed per customer, and erased by
//!   destroying the customer's key.
//! - [`projection`]: [`IntakeProjector`](projection::IntakeProjector), the views.
//! - [`observe`]: the consumer recording other services' events for the views.
//! - [`partitioned`]: which partition takes a report, and listings gathered
//!   from every partition.

pub mod api;
pub mod customer;
pub mod key_copy;
pub mod metrics;
pub mod observe;
pub mod partitioned;
pub mod projection;
pub mod sealing;
pub mod validate;

use lineguard_eventlog::EventTypes;
use lineguard_protos::intake::v1::{
    CustomerDataErased, EventObserved, IncidentMarkedProbableOutage, IncidentOpened,
    TicketCancelled, TicketJoinedIncident, TicketReported, TicketUrged,
};

/// The service's name: its log's `source`, its stream `LINEGUARD_INTAKE`.
pub const SERVICE: &str = "intake";

/// The events intake writes.
pub fn event_types() -> EventTypes {
    EventTypes::new()
        .with::<TicketReported>(1)
        .with::<TicketUrged>(1)
        .with::<IncidentOpened>(1)
        .with::<TicketJoinedIncident>(1)
        .with::<IncidentMarkedProbableOutage>(1)
        .with::<TicketCancelled>(1)
        .with::<EventObserved>(1)
        .with::<CustomerDataErased>(1)
}
