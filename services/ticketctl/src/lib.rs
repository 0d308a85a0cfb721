//! `ticketctl`: the operator's view of Lineguard. It replays the whole life
//! of any ticket or incident from the four services' own logs, shows a
//! ticket as it was at any instant, checks intake's live views against the
//! logs, rebuilds projections, follows live events, draws an incident's
//! timeline, and drives a storm of tickets for demos and benchmarks.
//!
//! Replay is a client-side merge: each service's `EventLog.ReadCorrelation`
//! gives the events of a correlation id (a ticket, an incident) from its
//! own log; [`replay::merge`] puts them in causal order. No service reads
//! another's log, and no service has to be up to date with another for a
//! replay to be complete.
//!
//! # Layout
//!
//! - [`endpoints`]: where the services are; gRPC clients.
//! - [`replay`]: reading and merging a ticket's or incident's events.
//! - [`state`]: a ticket's state folded from its events, as of any instant.
//! - [`timeline`]: steps, durations, holders, alerts; text and HTML/SVG.
//! - [`verify`]: every ticket replayed and compared with intake's view.
//! - [`tail`]: live events from all four services, filtered.
//! - [`simulate`]: a storm of realistic traffic, with latencies.
//! - [`calls`]: who calls in a storm, and about what (correlated outages).
//! - [`county`]: a seeded county of any size (directory and accounts).
//! - [`consumers`]: parked events and dead letters of every service.
//! - [`sheet`]: a district's printable meter-box labels (numbers, QR code).

pub mod backup;
pub mod calls;
pub mod consumers;
pub mod county;
pub mod endpoints;
pub mod replay;
pub mod sheet;
pub mod simulate;
pub mod state;
pub mod status;
pub mod tail;
pub mod timeline;
pub mod verify;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooBig(String),
    #[error("{service}: {} ({:?})", status.message(), status.code())]
    Service {
        service: String,
        status: tonic::Status,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A failed call to `service`.
    pub fn service(service: &str) -> impl FnOnce(tonic::Status) -> Error + '_ {
        move |status| Error::Service {
            service: service.to_string(),
            status,
        }
    }
}

/// Parses an RFC 3339 instant into nanoseconds since the epoch.
pub fn parse_instant(text: &str) -> Result<i128, Error> {
    let t: prost_types::Timestamp = text
        .parse()
        .map_err(|e| Error::Usage(format!("invalid instant {text:?} (RFC 3339 expected): {e}")))?;
    Ok(i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos))
}
