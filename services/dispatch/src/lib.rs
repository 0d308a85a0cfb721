//! Dispatch: where a crew hears of its work. A ticket or incident routed as
//! field work becomes a work order for a crew; every crew has a numbered,
//! gap-free sequence of events (new order, order withdrawn, incident grew,
//! customer urged) that its phone follows and resumes from the last number
//! it saw; crew actions (acknowledge, depart, arrive, estimate, restore,
//! complete, return, note) are idempotent on the device's action id.
//!
//! # Layout
//!
//! - [`api`]: the `lineguard.dispatch.v1.Dispatch` gRPC service.
//! - [`watch`]: `WatchDispatches`, a crew's sequence from a number on, then live.
//! - [`orders`]: [`Dispatcher`](orders::Dispatcher): orders from routes, crew actions.
//! - [`consumers`]: routing's and intake's events in.
//! - [`contacts`]: customer contacts kept sealed, opened by intake for crews.
//! - [`device_clock`]: how far a phone's clock is believed (`judged_at`).
//! - [`clocks`]: arrival and restoration warnings and breaches, durable, once each.
//! - [`validate`]: field-level checks of crew actions.
//! - [`projection`]: [`DispatchProjector`](projection::DispatchProjector), the views.

pub mod api;
pub mod clocks;
pub mod consumers;
pub mod contacts;
pub mod device_clock;
pub mod orders;
pub mod projection;
pub mod validate;
pub mod watch;

use lineguard_eventlog::EventTypes;
use lineguard_protos::dispatch::v1::{
    CaseClosedNoted, ClockAlerted, CrewArrived, CrewDeparted, CrewNoted,
    CustomerNotificationRequested, CustomerUrged, EtrUpdated, IncidentGrew, NoteAdded,
    OrderAcknowledged, OrderAssigned, OrderReturned, OrderWithdrawn, PowerRestored, TicketNoted,
    TicketUrgeNoted, WorkCompleted,
};

/// The service's name: its log's `source`, its stream `LINEGUARD_DISPATCH`.
pub const SERVICE: &str = "dispatch";

/// The events dispatch writes.
pub fn event_types() -> EventTypes {
    EventTypes::new()
        .with::<CaseClosedNoted>(1)
        .with::<CrewNoted>(1)
        .with::<TicketNoted>(1)
        .with::<TicketUrgeNoted>(1)
        .with::<OrderAssigned>(1)
        .with::<OrderWithdrawn>(1)
        .with::<IncidentGrew>(1)
        .with::<CustomerUrged>(1)
        .with::<ClockAlerted>(1)
        .with::<OrderAcknowledged>(1)
        .with::<CrewDeparted>(1)
        .with::<CrewArrived>(1)
        .with::<EtrUpdated>(1)
        .with::<PowerRestored>(1)
        .with::<WorkCompleted>(1)
        .with::<OrderReturned>(1)
        .with::<NoteAdded>(1)
        .with::<CustomerNotificationRequested>(1)
}
