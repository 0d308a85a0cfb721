//! The subject scheme. One JetStream stream per service, holding every event
//! that service's log publishes:
//!
//! | what | name |
//! | --- | --- |
//! | stream of a service | `LINEGUARD_<SERVICE>` (e.g. `LINEGUARD_INTAKE`) |
//! | an event | `lineguard.<service>.<EventType>.<case bucket>` |
//! |  e.g. | `lineguard.intake.TicketReported.3f` |
//!
//! `<EventType>` is the last segment of the payload's protobuf name. A
//! consumer of one kind of event filters on `lineguard.<service>.<EventType>.*`.
//!
//! The last token is the case's bucket ([`case_bucket`]: two hex digits
//! from a stable hash of the correlation id), not the id itself, so a
//! stream has at most [`CASE_BUCKETS`] subjects per event type. JetStream
//! keeps an index entry in memory for every distinct subject a stream
//! holds, for as long as it holds it: measured on nats-server 2.15, about
//! 225 bytes a subject, so one subject per ticket made the server grow with
//! every ticket for the stream's whole retention (14 days: gigabytes in a
//! province's typhoon). A case's events still share one subject, so a
//! ticket's events on the bus are found by their bucket and then their
//! envelope's correlation id; the logs (`ticketctl replay`) are where a
//! case is read.
//!
//! Messages published before the buckets carry the correlation id itself
//! as the last token ([`legacy_event_subject`]); consumers still accept
//! them, so a stream written by an older relay drains after an upgrade.

/// Prefix of every Lineguard subject.
pub const ROOT: &str = "lineguard";

/// Distinct last tokens of a service's event subjects: each event type of
/// a stream has at most this many subjects.
pub const CASE_BUCKETS: u64 = 256;

/// Name of the JetStream stream holding `service`'s events.
pub fn stream_name(service: &str) -> String {
    format!("LINEGUARD_{}", service.to_ascii_uppercase())
}

/// The subjects a service's stream captures.
pub fn service_subjects(service: &str) -> String {
    format!("{ROOT}.{service}.>")
}

/// The last segment of a fully qualified event type.
pub fn short_type(event_type: &str) -> &str {
    event_type.rsplit('.').next().unwrap_or(event_type)
}

/// The bucket of a case (`correlation_id`) on the bus: two lowercase hex
/// digits, `00` to `ff`, from FNV-1a (the stable hash partitions use), the
/// same in every process and every release.
pub fn case_bucket(correlation_id: &str) -> String {
    format!(
        "{:02x}",
        crate::partition::fnv1a(correlation_id.as_bytes()) % CASE_BUCKETS
    )
}

/// The subject an event (from `source`'s log, of `event_type`, about
/// `correlation_id`) is published on.
pub fn event_subject(source: &str, event_type: &str, correlation_id: &str) -> String {
    format!(
        "{ROOT}.{source}.{}.{}",
        short_type(event_type),
        case_bucket(correlation_id)
    )
}

/// The subject a relay before the case buckets published an event on:
/// the correlation id itself as the last token (ids are restricted to
/// `[A-Za-z0-9_-]` by the log, so it is one subject-safe token).
pub fn legacy_event_subject(source: &str, event_type: &str, correlation_id: &str) -> String {
    format!(
        "{ROOT}.{source}.{}.{correlation_id}",
        short_type(event_type)
    )
}

/// Whether `subject` is one an event (from `source`, of `event_type`,
/// about `correlation_id`) may have been published on: its own
/// [`event_subject`], or its [`legacy_event_subject`].
pub fn is_event_subject(
    subject: &str,
    source: &str,
    event_type: &str,
    correlation_id: &str,
) -> bool {
    subject == event_subject(source, event_type, correlation_id)
        || subject == legacy_event_subject(source, event_type, correlation_id)
}

/// A filter matching every event of one type (given by its full protobuf
/// name) from `service`.
pub fn event_type_filter(service: &str, event_type: &str) -> String {
    format!("{ROOT}.{service}.{}.*", short_type(event_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_scheme() {
        assert_eq!(
            event_subject("intake", "lineguard.intake.v1.TicketReported", "ticket-1"),
            format!(
                "lineguard.intake.TicketReported.{}",
                case_bucket("ticket-1")
            )
        );
        assert_eq!(stream_name("intake"), "LINEGUARD_INTAKE");
        assert_eq!(
            event_type_filter("intake", "lineguard.intake.v1.TicketReported"),
            "lineguard.intake.TicketReported.*"
        );
    }

    #[test]
    fn a_case_bucket_is_stable_and_one_of_256() {
        // Pinned: a bucket that moved between releases would put a case's
        // later events on another subject than its earlier ones.
        assert_eq!(case_bucket(""), "25");
        assert_eq!(case_bucket("ticket-1"), case_bucket("ticket-1"));
        let buckets: std::collections::BTreeSet<String> = (0..100_000)
            .map(|i| case_bucket(&format!("ticket-0192aaaa-bbbb-7ccc-8ddd-{i:012}")))
            .collect();
        assert_eq!(
            buckets.len() as u64,
            CASE_BUCKETS,
            "ids spread over every bucket"
        );
        assert!(buckets.iter().all(|b| {
            b.len() == 2
                && b.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        }));
    }

    #[test]
    fn an_event_may_come_on_its_subject_or_on_the_one_before_buckets() {
        let reported = "lineguard.intake.v1.TicketReported";
        let bucketed = event_subject("intake", reported, "ticket-1");
        let legacy = legacy_event_subject("intake", reported, "ticket-1");
        assert_eq!(legacy, "lineguard.intake.TicketReported.ticket-1");
        assert!(is_event_subject(&bucketed, "intake", reported, "ticket-1"));
        assert!(is_event_subject(&legacy, "intake", reported, "ticket-1"));
        assert!(!is_event_subject(&legacy, "intake", reported, "ticket-2"));
        assert!(!is_event_subject(
            &bucketed, "routing", reported, "ticket-1"
        ));
    }
}
