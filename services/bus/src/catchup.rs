//! Reconciling with a source's own log: the bus may forget, the log never.
//!
//! A stream keeps messages for a bounded time and size; a consumer stopped
//! for longer, or one that handed a message back (nak) and was restarted
//! before JetStream delivered it again, finds messages it never applied gone
//! from the bus. The source's event log keeps everything, so every consumer
//! with a source log checks it against its own, at start and at every sweep:
//!
//! - **the mark**: the source position through which every event the
//!   consumer takes has its outcome in the consumer's log (applied: its
//!   inbox mark; parked; dead-lettered), kept in the consumer's log
//!   ([`EventLog::reconciled_through`]) and only moved forward;
//! - **how far**: up to the head the source had at the previous sweep, so
//!   that what is still on its way through the bus is left to it, and no
//!   further than the bus has delivered while it still holds messages for
//!   the consumer and keeps delivering them (a consumer behind by more than
//!   a sweep would otherwise read again from the source, and apply, what the
//!   bus is about to hand it); at once to the head when the bus shows a gap
//!   (its first message is past the consumer's ack floor, or a message
//!   handed back has left the stream);
//! - **what to read**: only the consumer's event types, and, without a gap,
//!   without their payloads — enough to see which events have their
//!   outcome here; a page with payloads is read from the first one that has
//!   not. The source serves bounded pages (`ReadAll`: events, bytes and
//!   records looked at) a few at a time;
//! - **what to apply**: every event of the source in that range whose
//!   subject the consumer's filters match and which has no outcome here,
//!   each exactly as a bus delivery (inbox, parking, dead letters): what the
//!   bus delivers later is recognised by its inbox mark. An event that cannot
//!   be applied yet holds the mark below it and is tried again at the next
//!   sweep (dead-lettered after `dead_letter_after` tries), while the rest
//!   goes on.
//!
//! So a message the bus loses costs at most two sweeps' time, never the
//! message: each event a consumer takes is applied, parked or dead-lettered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use lineguard_eventlog::{AllFilter, AllPage, EventEnvelope, EventLog};

use crate::subjects::event_subject;

/// Events read per page of a catch-up.
pub const CATCH_UP_PAGE: usize = 1_000;

/// A page of a source's log, or why it could not be read.
pub type SourcePage<'a> = Pin<Box<dyn Future<Output = Result<AllPage, String>> + Send + 'a>>;

/// Where a source's log stands, or why it could not tell.
pub type SourceStateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<SourceState, String>> + Send + 'a>>;

/// Where a source's log stands when asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceState {
    /// Its last event's position (0: empty).
    pub head_position: u64,
    /// Events committed but not yet in its stream.
    pub outbox_backlog: u64,
}

/// A source service's own event log, read from a position on.
pub trait SourceLog: Send + Sync + 'static {
    /// A page of up to `max` events from `from_position` that `filter`
    /// keeps (see [`EventLog::read_all_page`]; empty past the head).
    fn read_from(&self, from_position: u64, max: usize, filter: &AllFilter) -> SourcePage<'_>;

    /// Its head and outbox now. A consumer's readiness waits once for an
    /// empty outbox (everything the source had committed is in its stream;
    /// see [`crate::consumer::ConsumerHandle::caught_up`]); its reconciling
    /// reads up to a head it saw one sweep before.
    fn state(&self) -> SourceStateFuture<'_>;
}

/// The source's log in the same process (tests, tools).
impl SourceLog for EventLog {
    fn state(&self) -> SourceStateFuture<'_> {
        let state = SourceState {
            head_position: self.head(),
            outbox_backlog: self.outbox_backlog(),
        };
        Box::pin(async move { Ok(state) })
    }

    fn read_from(&self, from_position: u64, max: usize, filter: &AllFilter) -> SourcePage<'_> {
        let (log, filter) = (self.clone(), filter.clone());
        Box::pin(async move {
            if from_position > log.head() {
                return Ok(AllPage {
                    events: Vec::new(),
                    next_position: from_position,
                });
            }
            tokio::task::spawn_blocking(move || log.read_all_page(from_position, max, &filter))
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

/// The event types (their last segment, as subjects name them) a consumer
/// with `filters` receives, for a source to read only those; empty (every
/// type) unless each filter names one type of its source
/// (`lineguard.<source>.<Type>.*`).
pub fn type_names_of(filters: &[String]) -> Vec<String> {
    let mut names = Vec::with_capacity(filters.len());
    for filter in filters {
        let tokens: Vec<&str> = filter.split('.').collect();
        match tokens[..] {
            ["lineguard", _, name, "*"] if name != "*" && name != ">" => {
                names.push(name.to_string());
            }
            _ => return Vec::new(),
        }
    }
    names
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
    fn a_source_is_asked_only_for_the_types_a_consumer_filters_on() {
        let filters = vec![
            "lineguard.intake.TicketReported.*".to_string(),
            "lineguard.intake-p1.TicketUrged.*".to_string(),
        ];
        assert_eq!(type_names_of(&filters), ["TicketReported", "TicketUrged"]);
        assert!(type_names_of(&[]).is_empty(), "no filter: every type");
        for wide in [
            "lineguard.intake.>",
            "lineguard.intake.*.*",
            "lineguard.intake.X.ab",
        ] {
            let mut some = filters.clone();
            some.push(wide.to_string());
            assert!(
                type_names_of(&some).is_empty(),
                "{wide} takes more than one type"
            );
        }
        // Filtering by these names keeps what the subjects match.
        let filter = AllFilter {
            type_names: type_names_of(&filters),
            without_payloads: true,
        };
        assert!(filter.keeps("lineguard.intake.v1.TicketReported"));
        assert!(!filter.keeps("lineguard.intake.v1.TicketReportedLate"));
        assert!(!filter.keeps("lineguard.intake.v1.CallTaken"));
    }

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
