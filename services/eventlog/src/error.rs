//! The log's one error type, and how it reads as a gRPC status.

use crate::txn::ExpectedVersion;

/// Result with the log's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the log. Input errors name the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is malformed or missing.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },

    /// A field is over one of the [`Limits`](crate::Limits).
    #[error("{field} is {actual}, over the limit of {limit}")]
    LimitExceeded {
        field: String,
        actual: u64,
        limit: u64,
    },

    /// Optimistic concurrency: the stream is not at the version the caller expected.
    #[error("wrong expected version for stream {stream}: expected {expected}, current {current}")]
    WrongExpectedVersion {
        stream: String,
        expected: ExpectedVersion,
        /// The stream's last version; 0 when it does not exist.
        current: u64,
    },

    /// The idempotency key was used before for a request with other content.
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyConflict { key: String },

    /// The event type is not one this log was opened to accept.
    #[error("unknown event type {event_type:?} (schema version {schema_version})")]
    UnknownEventType {
        event_type: String,
        schema_version: u32,
    },

    /// A read of a stream that has no events.
    #[error("stream {stream} not found")]
    StreamNotFound { stream: String },

    /// A read that starts past the end of a stream or of the log.
    #[error("{field} {requested} is past the end (last is {last})")]
    OutOfRange {
        field: String,
        requested: u64,
        last: u64,
    },

    /// A stored record failed its checksum or does not decode; never served as data.
    #[error("corrupted record in {column} at {location}: {reason}")]
    Corrupted {
        column: &'static str,
        location: String,
        reason: String,
    },

    /// Too many events are waiting for the bus; the commit is refused.
    #[error(
        "outbox backlog of {backlog} events would pass its limit of {limit}: the bus is unreachable"
    )]
    OutboxFull { backlog: u64, limit: u64 },

    /// Every subscriber slot is taken.
    #[error("too many subscribers (limit {limit})")]
    TooManySubscribers { limit: usize },

    /// The projector refused an event; the whole commit was rolled back.
    #[error("projection {projector} failed on {event_type} at position {position}: {reason}")]
    Projection {
        projector: &'static str,
        event_type: String,
        position: u64,
        reason: String,
    },

    /// RocksDB failed; nothing of the commit was written.
    #[error("storage: {0}")]
    Storage(#[from] rocksdb::Error),

    /// A rebuild of the projections failed part way: the log refuses commits
    /// until a rebuild completes (ask for one, or restart the process).
    #[error(
        "projections are incomplete after a failed rebuild ({reason}); commits refused until a rebuild completes"
    )]
    ProjectionsIncomplete { reason: String },

    /// The log's replicated copy refused a write, or cannot be followed
    /// (see [`copy`](crate::copy)); nothing of the write was applied here.
    #[error("the log's copy: {0}")]
    Copy(String),

    /// The log has been closed.
    #[error("the event log is closed")]
    Closed,

    /// A failure injected by a test through a fail point.
    #[error("injected failure at {0}")]
    Injected(&'static str),
}

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn limit(field: impl Into<String>, actual: usize, limit: usize) -> Self {
        Error::LimitExceeded {
            field: field.into(),
            actual: actual as u64,
            limit: limit as u64,
        }
    }

    /// A copy of a write failure, for each commit of a group that shared it.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Storage(e) => Error::Storage(e.clone()),
            Error::Injected(at) => Error::Injected(at),
            Error::Copy(reason) => Error::Copy(reason.clone()),
            Error::ProjectionsIncomplete { reason } => Error::ProjectionsIncomplete {
                reason: reason.clone(),
            },
            other => Error::invalid("commit", other.to_string()),
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Storage(_)
                | Error::OutboxFull { .. }
                | Error::TooManySubscribers { .. }
                | Error::Injected(_)
                | Error::ProjectionsIncomplete { .. }
                | Error::Copy(_)
        )
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use tonic::Code;
        let code = match &err {
            Error::InvalidArgument { .. }
            | Error::LimitExceeded { .. }
            | Error::UnknownEventType { .. } => Code::InvalidArgument,
            Error::WrongExpectedVersion { .. } => Code::FailedPrecondition,
            Error::IdempotencyConflict { .. } => Code::AlreadyExists,
            Error::StreamNotFound { .. } => Code::NotFound,
            Error::OutOfRange { .. } => Code::OutOfRange,
            Error::Corrupted { .. } => Code::DataLoss,
            Error::OutboxFull { .. } | Error::TooManySubscribers { .. } => Code::ResourceExhausted,
            Error::Projection { .. } => Code::FailedPrecondition,
            Error::Storage(_) | Error::Injected(_) => Code::Unavailable,
            Error::Closed | Error::ProjectionsIncomplete { .. } | Error::Copy(_) => {
                Code::Unavailable
            }
        };
        tonic::Status::new(code, err.to_string())
    }
}
