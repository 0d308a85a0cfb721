//! Explicit bounds on everything the log accepts or holds in memory.

/// Every bound the log enforces. Each one, when crossed, is a clear error
/// naming the field and the limit, never a silent truncation or a panic.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload of one event, in bytes.
    pub max_payload_bytes: usize,
    /// Most events one commit may append, over all its streams.
    pub max_events_per_commit: usize,
    /// Most payload bytes one commit may carry, over all its events.
    pub max_commit_bytes: usize,
    /// Most streams one commit may append to.
    pub max_streams_per_commit: usize,
    /// Longest stream, correlation, causation, actor, consumer or message id.
    pub max_id_len: usize,
    /// Longest event type name.
    pub max_event_type_len: usize,
    /// Longest idempotency key.
    pub max_idempotency_key_len: usize,
    /// Largest response kept under an idempotency key.
    pub max_idempotent_response_bytes: usize,
    /// Most events one read returns.
    pub max_read_page: usize,
    /// Most bytes of stored events one read returns, of the whole log, a
    /// stream or a correlation (it returns at least one event): a page of
    /// large events stays within what one gRPC message may carry (4 MiB by
    /// default) and what a service serving its peers' catch-up holds per
    /// read.
    pub max_read_page_bytes: usize,
    /// Most records one filtered read of the whole log looks at before it
    /// returns what it kept, with where to go on: a filter that matches
    /// little must not make one read walk the whole log.
    pub max_read_scan: usize,
    /// Events buffered per subscriber before the reader waits for it (and
    /// the most it reads ahead): what an idle subscription holds at most.
    pub subscriber_buffer: usize,
    /// Live subscriptions at once.
    pub max_subscribers: usize,
    /// Commits waiting for the writer; callers past this wait (backpressure).
    pub max_pending_commits: usize,
    /// Most commits that share one write and one fsync.
    pub max_group_commits: usize,
    /// Events committed but not yet acknowledged by the bus. Past this, commits
    /// fail rather than let the backlog grow without end while the bus is down.
    pub max_outbox_backlog: u64,
    /// Stream heads the writer remembers, so a commit to a recently written
    /// stream skips looking its version up in the store.
    pub max_cached_stream_heads: usize,
    /// RocksDB's memory, in bytes: one block cache shared by every column
    /// family, holding the index and filter blocks too, with the memtables
    /// charged against it. Without a budget each of the eight column
    /// families keeps up to two 64 MiB memtables and its own cache, and
    /// the index blocks grow with the data: a month of a county's events
    /// would grow a process past any sizing.
    pub store_memory_bytes: usize,
}

/// The default [`Limits::store_memory_bytes`]: 64 MiB.
pub const DEFAULT_STORE_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// The smallest [`Limits::store_memory_bytes`] accepted: 8 MiB (below it the
/// memtables would flush a few kilobytes at a time).
pub const MIN_STORE_MEMORY_BYTES: usize = 8 * 1024 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 256 * 1024,
            max_events_per_commit: 1_000,
            max_commit_bytes: 4 * 1024 * 1024,
            max_streams_per_commit: 16,
            max_id_len: 128,
            max_event_type_len: 128,
            max_idempotency_key_len: 256,
            max_idempotent_response_bytes: 64 * 1024,
            max_read_page: 1_000,
            max_read_page_bytes: 1024 * 1024,
            max_read_scan: 20_000,
            subscriber_buffer: 64,
            max_subscribers: 1_024,
            max_pending_commits: 4_096,
            max_group_commits: 512,
            max_outbox_backlog: 10_000_000,
            max_cached_stream_heads: 65_536,
            store_memory_bytes: DEFAULT_STORE_MEMORY_BYTES,
        }
    }
}
