//! Feedback: the customer's verdict and how well everyone served.
//!
//! When a ticket's work is completed or its answer given, a follow-up call
//! (回访) falls due; the customer's verdict is recorded, and a dissatisfied
//! customer can reopen the ticket, which routing sends back to its owner as
//! a new hop. Complaints and praise are credited to named staff, crews and
//! stations. Scorecards, rankings and service stars are computed from
//! records the projector derives from the events feedback consumes from
//! intake, routing and dispatch, each kept in feedback's own log as an
//! `EventObserved`: dropping the projections and replaying the log gives the
//! same figures.
//!
//! # Layout
//!
//! - [`api`]: the `lineguard.feedback.v1.Feedback` gRPC service.
//! - [`consumers`]: the other services' events in; follow-ups fall due.
//! - [`followups`]: [`Feedback`](followups::Feedback): follow-ups, reopens,
//!   complaints, praise, and the overdue timer.
//! - [`scorecard`]: every figure of every scorecard, and the service stars.
//! - [`rules`]: follow-up limits, the repeat-complaint window, the star rule.
//! - [`projection`]: [`FeedbackProjector`](projection::FeedbackProjector), the records.

pub mod api;
pub mod consumers;
pub mod followups;
pub mod projection;
pub mod rules;
pub mod scorecard;

use lineguard_eventlog::EventTypes;
use lineguard_protos::feedback::v1::{
    ComplaintFiled, EventObserved, FollowUpOverdue, FollowUpRecorded, FollowUpScheduled,
    PraiseRecorded, TicketReopened,
};

/// The service's name: its log's `source`, its stream `LINEGUARD_FEEDBACK`.
pub const SERVICE: &str = "feedback";

/// The events feedback writes.
pub fn event_types() -> EventTypes {
    EventTypes::new()
        .with::<EventObserved>(1)
        .with::<FollowUpScheduled>(1)
        .with::<FollowUpOverdue>(1)
        .with::<FollowUpRecorded>(1)
        .with::<TicketReopened>(1)
        .with::<ComplaintFiled>(1)
        .with::<PraiseRecorded>(1)
}
