//! Catching up from a source's own log when the bus has forgotten.
//!
//! A stream keeps messages for a bounded time and size; a consumer stopped
//! for longer finds that messages it never acknowledged have expired. The
//! source's event log keeps everything, so such a consumer reads what it
//! missed from there (`EventLog.ReadAll` of the source service) before it
//! resumes the bus:
//!
//! - **detecting the gap**: JetStream's first message of the stream is past
//!   the consumer's ack floor plus one: something between was dropped before
//!   this consumer acknowledged it (checked at every session start and every
//!   sweep);
//! - **where to start**: the highest source position this consumer has
//!   applied, recorded in the same commit as each inbox mark
//!   ([`EventLog::consumer_position`]);
//! - **what to apply**: every event of the source from there to its head
//!   whose subject the consumer's filters match, each exactly as a bus
//!   delivery (inbox, parking, dead letters): what the bus still holds is
//!   recognised by its inbox mark when it comes again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use lineguard_eventlog::{EventEnvelope, EventLog};

use crate::subjects::event_subject;

/// Events read per page of a catch-up.
pub const CATCH_UP_PAGE: usize = 1_000;

/// A page of a source's log, or why it could not be read.
pub type SourcePage<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<EventEnvelope>, String>> + Send + 'a>>;

/// Whether a source's outbox was empty when asked, or why it could not tell.
pub type SourceDrained<'a> = Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;

/// A source service's own event log, read from a position on.
pub trait SourceLog: Send + Sync + 'static {
    /// Up to `max` events from `from_position` (empty past the head).
    fn read_from(&self, from_position: u64, max: usize) -> SourcePage<'_>;

    /// Whether the source's outbox is empty now: everything it had
    /// committed is in its stream. A consumer's readiness waits for this
    /// once (see [`crate::consumer::ConsumerHandle::caught_up`]).
    fn drained(&self) -> SourceDrained<'_>;
}

/// The source's log in the same process (tests, tools).
impl SourceLog for EventLog {
    fn drained(&self) -> SourceDrained<'_> {
        let backlog = self.outbox_backlog();
        Box::pin(async move { Ok(backlog == 0) })
    }

    fn read_from(&self, from_position: u64, max: usize) -> SourcePage<'_> {
        let log = self.clone();
        Box::pin(async move {
            if from_position > log.head() {
                return Ok(Vec::new());
            }
            tokio::task::spawn_blocking(move || log.read_all(from_position, max))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }
}

/// A consumer's way to its source's log.
#[derive(Clone)]
pub struct SourceLogHandle(pub Arc<dyn SourceLog>);

impl std::fmt::Debug for SourceLogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceLog")
    }
}

/// Whether a NATS subject matches a filter (`*` one token, `>` the rest).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in filter.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// Whether a consumer with `filters` (none: everything) receives `event`.
pub fn wanted(filters: &[String], event: &EventEnvelope) -> bool {
    let subject = event_subject(&event.source, &event.event_type, &event.correlation_id);
    filters.is_empty() || filters.iter().any(|f| subject_matches(f, &subject))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_filters_token_by_token() {
        let s = "lineguard.intake.TicketReported.ticket-1";
        assert!(subject_matches("lineguard.intake.TicketReported.*", s));
        assert!(subject_matches("lineguard.intake.>", s));
        assert!(subject_matches(s, s));
        assert!(!subject_matches("lineguard.intake.TicketUrged.*", s));
        assert!(!subject_matches("lineguard.intake.*", s));
        assert!(!subject_matches("lineguard.intake.TicketReported.*.x", s));
        assert!(!subject_matches("lineguard.routing.>", s));
    }
}
