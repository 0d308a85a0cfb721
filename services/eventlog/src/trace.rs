//! Where an event's trace context comes from, and where a consumer's work
//! takes it up: two hooks the service's host sets once
//! (`lineguard_runtime::traces`, over OpenTelemetry), so that the log and
//! the bus carry W3C trace context (`traceparent`) without depending on a
//! tracing backend. Unset (tracing off), an event carries none and a
//! consumer's span starts no trace of its own.

use std::sync::OnceLock;

/// The host's trace functions.
#[derive(Debug, Clone, Copy)]
pub struct TraceHooks {
    /// The current span's `traceparent` (empty when none is recording).
    pub current: fn() -> String,
    /// Makes `traceparent` the parent of a span not yet entered.
    pub adopt: fn(&tracing::Span, &str),
}

static HOOKS: OnceLock<TraceHooks> = OnceLock::new();

/// Sets the hooks, once per process (later calls are ignored).
pub fn set_hooks(hooks: TraceHooks) {
    let _ = HOOKS.set(hooks);
}

/// The current span's `traceparent`, empty with tracing off.
pub fn current_traceparent() -> String {
    HOOKS.get().map_or_else(String::new, |h| (h.current)())
}

/// Makes the work `traceparent` names the parent of `span` (nothing with
/// tracing off or an empty context).
pub fn adopt(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    if let Some(hooks) = HOOKS.get() {
        (hooks.adopt)(span, traceparent);
    }
}
