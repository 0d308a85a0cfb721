//! The subject scheme. One JetStream stream per service, holding every event
//! that service's log publishes:
//!
//! | what | name |
//! | --- | --- |
//! | stream of a service | `LINEGUARD_<SERVICE>` (e.g. `LINEGUARD_INTAKE`) |
//! | an event | `lineguard.<service>.<EventType>.<correlation id>` |
//! |  e.g. | `lineguard.intake.TicketReported.ticket-0192…` |
//!
//! `<EventType>` is the last segment of the payload's protobuf name. Ids are
//! restricted to `[A-Za-z0-9_-]` by the log, so every token is subject-safe.
//! A consumer of one kind of event filters on `lineguard.<service>.<EventType>.*`;
//! a replay of one ticket filters on `lineguard.*.*.<ticket id>`.

/// Prefix of every Lineguard subject.
pub const ROOT: &str = "lineguard";

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

/// The subject an event (from `source`'s log, of `event_type`, about
/// `correlation_id`) is published on.
pub fn event_subject(source: &str, event_type: &str, correlation_id: &str) -> String {
    format!(
        "{ROOT}.{source}.{}.{correlation_id}",
        short_type(event_type)
    )
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
            "lineguard.intake.TicketReported.ticket-1"
        );
        assert_eq!(stream_name("intake"), "LINEGUARD_INTAKE");
        assert_eq!(
            event_type_filter("intake", "lineguard.intake.v1.TicketReported"),
            "lineguard.intake.TicketReported.*"
        );
    }
}
