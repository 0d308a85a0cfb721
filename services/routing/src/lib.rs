//! Routing: sends every ticket (or incident, through its lead ticket) in one
//! hop to the owner of the customer's district, whatever door it came
//! through, and climbs the three lines of defense (district manager →
//! station duty desk → company supervisor desk) only when a line fails to
//! accept within the policy's acceptance window.
//!
//! Routing learns of tickets from intake's events on the bus (and of crews'
//! acknowledgements and returns from dispatch's, of reopens from feedback's)
//! and writes only
//! its own log: routes, acceptances, returns, answers, clock warnings and
//! breaches, the directory, availability and the time-limit policy.
//!
//! # Layout
//!
//! - [`api`]: the `lineguard.routing.v1.Routing` gRPC service.
//! - [`intake_events`]: the consumer that routes what intake takes in.
//! - [`dispatch_events`]: a crew's acknowledgement accepts the ticket; its return hands it
//!   back; its completion ends the hop (the case no longer counts in anyone's load).
//! - [`feedback_events`]: a ticket reopened at follow-up goes back to its owner.
//! - [`loads`]: every assignee's and crew's open tickets recounted from the log.
//! - [`router`]: [`Router`](router::Router), the decision of who holds a ticket.
//! - [`timers`]: durable timers: escalation, warnings, breaches, exactly once.
//! - [`directory`]: the directory file, its checks, and reads of it.
//! - [`policy`]: the versioned time-limit policy file.
//! - [`projection`]: [`RoutingProjector`](projection::RoutingProjector), the views.
//! - [`startup`]: adopting the policy file and loading the directory file.

pub mod api;
pub mod directory;
pub mod dispatch_events;
pub mod feedback_events;
pub mod intake_events;
pub mod loads;
pub mod policy;
pub mod projection;
pub mod router;
pub mod startup;
pub mod timers;

use lineguard_eventlog::EventTypes;
use lineguard_protos::routing::v1::{
    AccountsAssigned, AvailabilityChanged, ClockBreached, ClockWarned, CompanyDefined, CrewDefined,
    DistrictDefined, ManagerDefined, PolicyAdopted, StationDefined, TicketAccepted, TicketAnswered,
    TicketFollowedIncident, TicketReturned, TicketRouted, TicketRoutingClosed, TicketWorkCompleted,
};

/// The service's name: its log's `source`, its stream `LINEGUARD_ROUTING`.
pub const SERVICE: &str = "routing";

/// The events routing writes.
pub fn event_types() -> EventTypes {
    EventTypes::new()
        .with::<CompanyDefined>(1)
        .with::<StationDefined>(1)
        .with::<DistrictDefined>(1)
        .with::<ManagerDefined>(1)
        .with::<CrewDefined>(1)
        .with::<AccountsAssigned>(1)
        .with::<AvailabilityChanged>(1)
        .with::<PolicyAdopted>(1)
        .with::<TicketRouted>(1)
        .with::<TicketFollowedIncident>(1)
        .with::<TicketAccepted>(1)
        .with::<TicketReturned>(1)
        .with::<TicketAnswered>(1)
        .with::<TicketRoutingClosed>(1)
        .with::<TicketWorkCompleted>(1)
        .with::<ClockWarned>(1)
        .with::<ClockBreached>(1)
}
