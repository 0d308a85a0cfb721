//! Generated protobuf messages and gRPC stubs for every Lineguard API.
//!
//! One module per proto package, named as the package is: `lineguard.eventlog.v1`
//! is [`eventlog::v1`]. The sources are in the workspace's `proto/` directory;
//! they are compiled at build time by protox, so no `protoc` is needed.
//!
//! Every message implements [`prost::Name`], whose full name is the event type
//! recorded in an [`eventlog::v1::EventEnvelope`].

pub mod case_ids;
pub mod codec;

/// The encoded `FileDescriptorSet` of every Lineguard proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lineguard_descriptor.bin"));

/// `lineguard.intake.*`: tickets entering from any door, and their view.
pub mod intake {
    /// `lineguard.intake.v1`.
    pub mod v1 {
        #![allow(missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/lineguard.intake.v1.rs"));
    }
}

/// `lineguard.eventlog.*`: the event envelope and the log read API.
pub mod eventlog {
    /// `lineguard.eventlog.v1`.
    pub mod v1 {
        #![allow(missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/lineguard.eventlog.v1.rs"));
    }
}

/// `lineguard.bus.*`: parked events and dead letters of the consumers.
pub mod bus {
    /// `lineguard.bus.v1`.
    pub mod v1 {
        #![allow(missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/lineguard.bus.v1.rs"));
    }
}

/// `lineguard.routing.*`: the directory, availability, the time-limit policy,
/// routes and escalations.
pub mod routing {
    /// `lineguard.routing.v1`.
    pub mod v1 {
        #![allow(missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/lineguard.routing.v1.rs"));
    }
}

/// `lineguard.dispatch.*`: work orders, the crews' event sequences, crew actions.
pub mod dispatch {
    /// `lineguard.dispatch.v1`.
    pub mod v1 {
        #![allow(missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/lineguard.dispatch.v1.rs"));

        /// The time a crew action counts at, for every clock, view and
        /// scorecard: its `judged_at` (the device's time as dispatch's rule
        /// bounds it), or, in events written before that was recorded, the
        /// device's own time.
        pub trait JudgedTime {
            /// `judged_at`, else `device_time`.
            fn judged_time(&self) -> Option<prost_types::Timestamp>;
        }

        macro_rules! judged_time {
            ($($action:ty),*) => {$(
                impl JudgedTime for $action {
                    fn judged_time(&self) -> Option<prost_types::Timestamp> {
                        self.judged_at.or(self.device_time)
                    }
                }
            )*};
        }
        judged_time!(
            OrderAcknowledged,
            CrewDeparted,
            CrewArrived,
            EtrUpdated,
            PowerRestored,
            WorkCompleted,
            OrderReturned,
            NoteAdded
        );

        impl CrewEvent {
            /// The crew event of sequence `sequence` that `event` (an event
            /// of the crew's stream) is: the envelope with its payload typed
            /// in `body`. An event type this version does not know leaves
            /// `body` unset; a payload that does not decode is an error.
            pub fn typed(
                crew_id: &str,
                sequence: u64,
                event: crate::eventlog::v1::EventEnvelope,
            ) -> Result<CrewEvent, prost::DecodeError> {
                use prost::{Message, Name};
                let payload = event.payload.as_ref();
                let t = event.event_type.as_str();
                let body = if t == OrderAssigned::full_name() {
                    Some(crew_event::Body::OrderAssigned(OrderAssigned::decode(
                        payload,
                    )?))
                } else if t == OrderWithdrawn::full_name() {
                    Some(crew_event::Body::OrderWithdrawn(OrderWithdrawn::decode(
                        payload,
                    )?))
                } else if t == IncidentGrew::full_name() {
                    Some(crew_event::Body::IncidentGrew(IncidentGrew::decode(
                        payload,
                    )?))
                } else if t == CustomerUrged::full_name() {
                    Some(crew_event::Body::CustomerUrged(CustomerUrged::decode(
                        payload,
                    )?))
                } else if t == ClockAlerted::full_name() {
                    Some(crew_event::Body::ClockAlerted(ClockAlerted::decode(
                        payload,
                    )?))
                } else {
                    None
                };
                Ok(CrewEvent {
                    crew_id: crew_id.to_string(),
                    sequence,
                    event: Some(event),
                    body,
                })
            }
        }
    }
}

/// `lineguard.feedback.*`: follow-ups, reopens, complaints, praise, scorecards.
pub mod feedback {
    /// `lineguard.feedback.v1`.
    pub mod v1 {
        #![allow(missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/lineguard.feedback.v1.rs"));
    }
}
