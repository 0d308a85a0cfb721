//! [`EventLog`]: open a log, commit to it, read it back.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use lineguard_protos::eventlog::v1::{EventEnvelope, IdempotencyRecord, ProjectionState};
use prost::Message;
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch,
};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::codec::{
    ALL_COLUMN_FAMILIES, CF_CORRELATIONS, CF_EVENTS, CF_IDEMPOTENCY, CF_INBOX, CF_META, CF_OUTBOX,
    CF_PROJECTIONS, CF_STREAM_EVENTS, CF_STREAMS, CRC_LEN, IndexRun, META_CORRELATION_INDEX,
    META_PROJECTION_STATE, META_STREAM_EVENTS, OutboxRun, correlation_key,
    correlation_key_position, decode_position_key, inbox_key, needs_correlation_entry,
    position_key, seal, stream_key, stream_key_version, unseal,
};
use crate::copy::{CopyTarget, Store};
use crate::error::{Error, Result};
use crate::ids::validate_id;
use crate::limits::Limits;
use crate::projection::ProjectionView;
use crate::projection::{NoProjections, Projector, read_projection};
use crate::stored::{Fields, StoredEvent, StoredPage};
use crate::subscribe::Subscription;
use crate::txn::{CommitOutcome, EventTypes, Idempotency, Transaction};
use crate::writer::{Decider, Rebuilt, StreamHeads, Writer, WriterRequest};

/// How to open a log.
#[derive(Clone)]
pub struct LogConfig {
    /// Directory of the RocksDB files; created if missing.
    pub path: PathBuf,
    /// The owning service's name, stamped on every event as its `source`.
    pub service: String,
    pub limits: Limits,
    /// The event types this log accepts.
    pub event_types: EventTypes,
    /// Derives the projections; [`NoProjections`] keeps none.
    pub projector: Arc<dyn Projector>,
    /// Where every write is copied before it is applied, so a lost disk
    /// loses nothing ([`crate::copy`]); `None`: the disk alone.
    pub copy: Option<Arc<dyn CopyTarget>>,
}

impl LogConfig {
    /// A log at `path` for `service`, default limits, no types, no projections.
    pub fn new(path: impl Into<PathBuf>, service: impl Into<String>) -> Self {
        LogConfig {
            path: path.into(),
            service: service.into(),
            limits: Limits::default(),
            event_types: EventTypes::new(),
            projector: Arc::new(NoProjections),
            copy: None,
        }
    }

    /// Copies every write to `target` before applying it; an empty data
    /// directory is rebuilt from the copy at open.
    pub fn with_copy(mut self, target: Arc<dyn CopyTarget>) -> Self {
        self.copy = Some(target);
        self
    }

    /// Sets the accepted event types.
    pub fn with_event_types(mut self, event_types: EventTypes) -> Self {
        self.event_types = event_types;
        self
    }

    /// Sets the projector.
    pub fn with_projector(mut self, projector: Arc<dyn Projector>) -> Self {
        self.projector = projector;
        self
    }

    /// Sets the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// Why [`EventLog::decide`] committed nothing.
#[derive(Debug)]
pub enum Decided<E> {
    /// The decision declined the command, with its own error.
    Declined(E),
    /// The log refused the decision's transaction, or failed to write it.
    Log(Error),
}

/// A page of one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSlice {
    pub events: Vec<EventEnvelope>,
    /// The stream's last version.
    pub stream_version: u64,
    /// Where the next page in the same direction starts; `None` at the end.
    pub next_version: Option<u64>,
}

/// Which way a stream read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadDirection {
    Forward,
    Backward,
}

/// One service's event log: the ground truth of everything the service did.
/// Cheap to clone; all clones share one store and one writer.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

/// What a checkpoint ([`EventLog::checkpoint`]) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpointed {
    /// The last event's position in the copy.
    pub head_position: u64,
    /// The copy's projection digest.
    pub projection_digest: String,
}

struct Inner {
    db: Arc<DB>,
    store: Arc<Store>,
    path: PathBuf,
    service: String,
    limits: Limits,
    /// Shared with the deciders the writer runs ([`EventLog::decide`]).
    event_types: Arc<EventTypes>,
    commits: mpsc::Sender<WriterRequest>,
    head: watch::Receiver<u64>,
    outbox_backlog: Arc<AtomicU64>,
    /// Set while the projections are not whole (being rebuilt, or a
    /// rebuild failed): reads of them are refused rather than answered
    /// from half a rebuild.
    projections_unavailable: Arc<std::sync::atomic::AtomicBool>,
    outbox_clearing: std::sync::Mutex<()>,
    subscribers: Arc<Semaphore>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("service", &self.inner.service)
            .field("path", &self.inner.path)
            .field("head", &self.head())
            .finish()
    }
}

impl Drop for Inner {
    /// Stops the writer and waits for it, so that RocksDB is closed by the
    /// time the last handle is gone. Left to the writer thread, the close
    /// could race the process's exit and RocksDB's static destructors.
    fn drop(&mut self) {
        // Replacing the only sender closes the channel: the writer finishes
        // what is queued and returns.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.commits, closed));
        let handle = self.writer.get_mut().ok().and_then(Option::take);
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// What a log's RocksDB holds in memory ([`EventLog::store_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreMemory {
    /// Memtables of every column family, flushed or not yet.
    pub memtables_bytes: u64,
    /// The shared block cache: data, index and filter blocks, and the
    /// memtables' reservations (so it overlaps `memtables_bytes`).
    pub block_cache_bytes: u64,
    /// Table readers' memory outside the cache.
    pub table_readers_bytes: u64,
}

/// Looks up a column family the log opened.
pub(crate) fn cf<'a>(db: &'a DB, name: &'static str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name).ok_or(Error::Corrupted {
        column: name,
        location: "column family".into(),
        reason: "missing from the store".into(),
    })
}

/// RocksDB's options within a memory budget of `memory_bytes` (see
/// [`Limits::store_memory_bytes`]): one LRU block cache for every column
/// family, index and filter blocks kept in it (not beside it, unbounded),
/// and the memtables charged to it through a write buffer manager, so the
/// budget covers what RocksDB holds whatever the data's size.
fn db_options(memory_bytes: usize) -> Options {
    let memory_bytes = memory_bytes.max(crate::limits::MIN_STORE_MEMORY_BYTES);
    let cache = rocksdb::Cache::new_lru_cache(memory_bytes);
    // Half the budget for memtables, all column families together; a full
    // one flushes. Each column family's memtable is an eighth of that, so
    // a busy one cannot take it all before flushing.
    let memtables_bytes = memory_bytes / 2;
    let write_buffers = rocksdb::WriteBufferManager::new_write_buffer_manager_with_cache(
        memtables_bytes,
        false,
        cache.clone(),
    );
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.increase_parallelism(2);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    options.set_max_total_wal_size(256 * 1024 * 1024);
    options.set_block_based_table_factory(&table);
    options.set_write_buffer_manager(&write_buffers);
    options.set_write_buffer_size(memtables_bytes / 8);
    options.set_max_write_buffer_number(2);
    options
}

/// Opens a raw RocksDB with the log's column families (for tools and tests
/// that must look under the log, e.g. to damage a record on purpose), with
/// the default memory budget.
pub fn open_raw_store(path: &Path) -> Result<DB> {
    open_store(path, crate::limits::DEFAULT_STORE_MEMORY_BYTES)
}

/// The head and projection digest of the store at `path` (a backup, a
/// restored data directory), opened and closed again: for tools and
/// tests. Never on a store a running log holds open.
pub fn stored_state(path: &Path) -> Result<Checkpointed> {
    let store = open_store(path, crate::limits::MIN_STORE_MEMORY_BYTES)?;
    Ok(Checkpointed {
        head_position: last_position(&store)?,
        projection_digest: digest_projections(&store)?,
    })
}

/// Opens the log's RocksDB within `memory_bytes`.
fn open_store(path: &Path, memory_bytes: usize) -> Result<DB> {
    open_store_ordered(path, memory_bytes, &ALL_COLUMN_FAMILIES)
}

/// Opens the log's RocksDB, creating missing column families in `order`
/// (a store rebuilt from a copy numbers them as the copy's writer did).
fn open_store_ordered(path: &Path, memory_bytes: usize, order: &[&str]) -> Result<DB> {
    let options = db_options(memory_bytes);
    let descriptors = order
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, options.clone()));
    Ok(DB::open_cf_descriptors(&options, path, descriptors)?)
}

/// Opens the store of a copied log and brings it level with its copy: an
/// empty data directory is rebuilt from the copy (column families created
/// in the copy's order), a store behind its copy applies what it lacks, an
/// empty copy is started with a snapshot.
fn open_copied_store(
    path: &Path,
    memory_bytes: usize,
    target: &Arc<dyn CopyTarget>,
) -> Result<(Arc<DB>, Store)> {
    // Only a new store needs the copy's column family order: reading the
    // copy's first record on every start would be wasted.
    let new_store = !path.join("CURRENT").exists();
    let copied_order = if new_store {
        crate::copy::copied_column_families(target.as_ref())?
    } else {
        None
    };
    let db = match copied_order {
        Some(order) => {
            let known: BTreeSet<&str> = ALL_COLUMN_FAMILIES.iter().copied().collect();
            let copied: BTreeSet<&str> = order
                .iter()
                .map(String::as_str)
                .filter(|name| *name != "default")
                .collect();
            if copied != known {
                return Err(Error::Copy(format!(
                    "the copy's column families {order:?} are not this version's {ALL_COLUMN_FAMILIES:?}"
                )));
            }
            let order: Vec<&str> = order
                .iter()
                .map(String::as_str)
                .filter(|name| *name != "default")
                .collect();
            tracing::warn!(path = %path.display(), "the data directory is empty: rebuilding the log from its copy");
            open_store_ordered(path, memory_bytes, &order)?
        }
        _ => open_store(path, memory_bytes)?,
    };
    let (last, _) = crate::copy::sync_with_copy(&db, target.as_ref())?;
    let db = Arc::new(db);
    let store = Store::copied(db.clone(), target.clone(), last);
    Ok((db, store))
}

impl EventLog {
    /// Opens (or creates) the log and starts its writer thread. If the
    /// projector's name or version differs from the one that built the stored
    /// projections, they are rebuilt from the log before this returns.
    pub fn open(config: LogConfig) -> Result<EventLog> {
        validate_id("service", &config.service, config.limits.max_id_len)?;
        let (db, store) = match &config.copy {
            Some(target) => {
                open_copied_store(&config.path, config.limits.store_memory_bytes, target)?
            }
            None => {
                let db = Arc::new(open_store(&config.path, config.limits.store_memory_bytes)?);
                (db.clone(), Store::uncopied(db))
            }
        };
        let store = Arc::new(store);
        let head = last_position(&db)?;
        ensure_stream_events(&db, &store, head)?;
        let outbox_backlog = Arc::new(AtomicU64::new(count_outbox(&db)?));
        let projections_unavailable = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (head_tx, head_rx) = watch::channel(head);
        let mut writer = Writer {
            db: db.clone(),
            store: store.clone(),
            service: config.service.clone(),
            limits: config.limits.clone(),
            projector: config.projector.clone(),
            head,
            head_tx,
            outbox_backlog: outbox_backlog.clone(),
            projections_unavailable: projections_unavailable.clone(),
            stream_heads: StreamHeads::new(config.limits.max_cached_stream_heads),
            projections_incomplete: None,
        };
        let stored = load_projection_state(&db)?;
        let projector = &config.projector;
        match stored {
            Some(s) if s.projector == projector.name() && s.version == projector.version() => {
                if s.applied_through < head {
                    writer.replay_projections_from(s.applied_through + 1)?;
                }
            }
            None if head == 0 => {}
            _ => {
                tracing::info!(service = %config.service, projector = projector.name(),
                    "projector changed; rebuilding projections from the log");
                writer.rebuild_projections()?;
            }
        }
        let (commits, requests) = mpsc::channel(config.limits.max_pending_commits);
        let thread = std::thread::Builder::new()
            .name(format!("{}-eventlog-writer", config.service))
            .spawn(move || writer.run(requests))
            .map_err(|e| Error::invalid("writer thread", e.to_string()))?;
        tracing::info!(service = %config.service, path = %config.path.display(), head, "event log opened");
        Ok(EventLog {
            inner: Arc::new(Inner {
                db,
                store,
                path: config.path,
                service: config.service,
                subscribers: Arc::new(Semaphore::new(config.limits.max_subscribers)),
                limits: config.limits,
                event_types: Arc::new(config.event_types),
                commits,
                head: head_rx,
                outbox_backlog,
                projections_unavailable,
                outbox_clearing: std::sync::Mutex::new(()),
                writer: std::sync::Mutex::new(Some(thread)),
            }),
        })
    }

    /// The owning service's name.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The limits the log enforces.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The last committed global position (0 for an empty log).
    pub fn head(&self) -> u64 {
        *self.inner.head.borrow()
    }

    /// A receiver that sees the head change after every commit.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.inner.head.clone()
    }

    /// Commits a transaction. When this returns `Committed`, the events are
    /// fsynced, indexed, in the outbox, and projected: a crash after this
    /// loses none of it.
    pub async fn commit(&self, mut txn: Transaction) -> Result<CommitOutcome> {
        txn.validate(&self.inner.limits, &self.inner.event_types)?;
        txn.stamp_trace(&crate::trace::current_traceparent());
        let (reply, answer) = oneshot::channel();
        self.inner
            .commits
            .send(WriterRequest::Commit { txn, reply })
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// [`commit`](Self::commit) for a thread outside the async runtime.
    pub fn commit_blocking(&self, txn: Transaction) -> Result<CommitOutcome> {
        txn.validate(&self.inner.limits, &self.inner.event_types)?;
        let (reply, answer) = oneshot::channel();
        self.inner
            .commits
            .blocking_send(WriterRequest::Commit { txn, reply })
            .map_err(|_| Error::Closed)?;
        answer.blocking_recv().map_err(|_| Error::Closed)?
    }

    /// Decides a command where it commits: `decide` runs on the writer
    /// thread, reading the projections as every commit before it leaves
    /// them (those of its own group too, not yet written), and the
    /// transaction it returns is committed in the same group.
    ///
    /// This is how a command whose decision depends on state other
    /// commands change (does this call join an open incident? is this
    /// caller's ticket still open?) is decided without a lock held across
    /// an fsync: many such commands share one write, each seeing the ones
    /// before it. `decide` must be quick and must not block: it holds up
    /// every commit behind it. Its error commits nothing and is returned
    /// as [`Decided::Declined`].
    pub async fn decide<R, E>(
        &self,
        decide: impl FnOnce(&ProjectionView<'_>) -> std::result::Result<(Transaction, R), E>
        + Send
        + 'static,
    ) -> std::result::Result<(CommitOutcome, R), Decided<E>>
    where
        R: Send + 'static,
        E: Send + 'static,
    {
        let (decided_tx, decided) = oneshot::channel();
        let limits = self.inner.limits.clone();
        let types = self.inner.event_types.clone();
        // Decided on the writer's thread, outside the caller's span: the
        // events carry the caller's trace context, taken here.
        let trace_parent = crate::trace::current_traceparent();
        let decider: Decider = Box::new(move |view| match decide(view) {
            Ok((mut txn, answer)) => {
                txn.validate(&limits, &types)?;
                txn.stamp_trace(&trace_parent);
                let _ = decided_tx.send(Ok(answer));
                Ok(Some(txn))
            }
            Err(declined) => {
                let _ = decided_tx.send(Err(declined));
                Ok(None)
            }
        });
        let (reply, outcome) = oneshot::channel();
        self.inner
            .commits
            .send(WriterRequest::Decide { decider, reply })
            .await
            .map_err(|_| Decided::Log(Error::Closed))?;
        let outcome = outcome
            .await
            .map_err(|_| Decided::Log(Error::Closed))?
            .map_err(Decided::Log)?;
        match (outcome, decided.await) {
            (Some(outcome), Ok(Ok(answer))) => Ok((outcome, answer)),
            (_, Ok(Err(declined))) => Err(Decided::Declined(declined)),
            _ => Err(Decided::Log(Error::Closed)),
        }
    }

    /// Reads up to `max_count` events of one stream (fewer when they pass
    /// [`Limits::max_read_page_bytes`]; at least one while there is one).
    pub fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        direction: ReadDirection,
        max_count: usize,
    ) -> Result<StreamSlice> {
        let mut events = Vec::with_capacity(max_count.min(64));
        let (stream_version, next_version) = self.scan_stream(
            stream_id,
            from_version,
            direction,
            max_count,
            |version, body| {
                events.push(decode_copy(stream_id, version, body)?);
                Ok(())
            },
        )?;
        Ok(StreamSlice {
            events,
            stream_version,
            next_version,
        })
    }

    /// [`read_stream`](Self::read_stream) for readers that want events as
    /// stored (checked the same way, fields read in place, one buffer for
    /// the page): what a replay or a bulk reader needs without decoding
    /// every envelope. Returns the events, the stream's last version and
    /// where the next page starts.
    pub fn read_stream_stored(
        &self,
        stream_id: &str,
        from_version: u64,
        direction: ReadDirection,
        max_count: usize,
    ) -> Result<(Vec<StoredEvent>, u64, Option<u64>)> {
        let mut page = StoredPage::with_capacity(max_count.min(1024));
        let (last, next) = self.scan_stream(
            stream_id,
            from_version,
            direction,
            max_count,
            |version, body| page.push_copy(stream_id, version, body),
        )?;
        Ok((page.finish(), last, next))
    }

    /// Hands `each` the version and checksum-checked body of up to
    /// `max_count` events of one stream, in the direction asked, read from
    /// the stream's copies ([`CF_STREAM_EVENTS`]): one prefix scan. `each`
    /// checks the envelope says it is that stream's event at that version
    /// (it reads the envelope anyway). Returns the stream's last version
    /// and where the next page starts.
    fn scan_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        direction: ReadDirection,
        max_count: usize,
        mut each: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<(u64, Option<u64>)> {
        validate_id("stream_id", stream_id, self.inner.limits.max_id_len)?;
        let max_count = self.page_size(max_count)?;
        let db = &self.inner.db;
        let last = load_stream_head(db, stream_id)?;
        if last == 0 {
            return Err(Error::StreamNotFound {
                stream: stream_id.to_owned(),
            });
        }
        let start = match direction {
            ReadDirection::Forward => {
                let start = from_version.max(1);
                if start > last + 1 {
                    return Err(Error::OutOfRange {
                        field: "from_version".into(),
                        requested: from_version,
                        last,
                    });
                }
                start
            }
            ReadDirection::Backward => {
                let start = if from_version == 0 {
                    last
                } else {
                    from_version
                };
                if start > last {
                    return Err(Error::OutOfRange {
                        field: "from_version".into(),
                        requested: from_version,
                        last,
                    });
                }
                start
            }
        };
        let mut copies = db.raw_iterator_cf_opt(
            cf(db, CF_STREAM_EVENTS)?,
            within_versions(stream_id, 1, last),
        );
        copies.seek(stream_key(stream_id, start));
        let mut page_bytes = PageBytes::new(&self.inner.limits);
        let mut read = 0usize;
        let mut last_read: Option<u64> = None;
        // Versions are read one after another, none skipped: a missing
        // copy is corruption, never a short page.
        let mut expected = Some(start).filter(|v| *v <= last);
        while let Some(version) = expected
            && read < max_count
        {
            let location = || format!("{stream_id} v{version}");
            let (key, value) = current(&copies, CF_STREAM_EVENTS, location)?;
            if stream_key_version(stream_id, key) != Some(version) {
                return Err(Error::Corrupted {
                    column: CF_STREAM_EVENTS,
                    location: location(),
                    reason: "missing".into(),
                });
            }
            let body = unseal(CF_STREAM_EVENTS, key, value, location)?;
            // Full: the next page starts at this version.
            if !page_bytes.take(body.len()) {
                break;
            }
            each(version, body)?;
            read += 1;
            last_read = Some(version);
            expected = match direction {
                ReadDirection::Forward => {
                    copies.next();
                    Some(version + 1).filter(|v| *v <= last)
                }
                ReadDirection::Backward => {
                    copies.prev();
                    Some(version - 1).filter(|v| *v >= 1)
                }
            };
        }
        let next_version = match (direction, last_read) {
            (ReadDirection::Forward, Some(v)) if v < last => Some(v + 1),
            (ReadDirection::Backward, Some(v)) if v > 1 => Some(v - 1),
            _ => None,
        };
        Ok((last, next_version))
    }

    /// Up to `max_count` events whose correlation id is `correlation_id`
    /// (a ticket's, a case's), in log order from `from_position` (fewer
    /// when they pass [`Limits::max_read_page_bytes`]; at least one while
    /// there is one), and the position to read on from if there may be
    /// more.
    pub fn read_correlation(
        &self,
        correlation_id: &str,
        from_position: u64,
        max_count: usize,
    ) -> Result<(Vec<EventEnvelope>, Option<u64>)> {
        let mut events = Vec::with_capacity(max_count.min(256));
        let next =
            self.scan_correlation(correlation_id, from_position, max_count, |fields, body| {
                events.push(decode_body(fields.position, body)?);
                Ok(())
            })?;
        Ok((events, next))
    }

    /// [`read_correlation`](Self::read_correlation) with the events as
    /// stored (checked the same way, fields read in place, one buffer for
    /// the page).
    pub fn read_correlation_stored(
        &self,
        correlation_id: &str,
        from_position: u64,
        max_count: usize,
    ) -> Result<(Vec<StoredEvent>, Option<u64>)> {
        let mut page = StoredPage::with_capacity(max_count.min(1024));
        let next =
            self.scan_correlation(correlation_id, from_position, max_count, |fields, body| {
                page.push_checked(body, fields.clone());
                Ok(())
            })?;
        Ok((page.finish(), next))
    }

    /// Hands `each` the checked fields and body of up to `max_count`
    /// events carrying `correlation_id`, in log order from
    /// `from_position`; the position to read on from if there may be more.
    /// Each event is checked once (checksum, envelope, where it says it
    /// is), when it becomes the head of its source.
    fn scan_correlation(
        &self,
        correlation_id: &str,
        from_position: u64,
        max_count: usize,
        mut each: impl FnMut(&Fields, &[u8]) -> Result<()>,
    ) -> Result<Option<u64>> {
        validate_id(
            "correlation_id",
            correlation_id,
            self.inner.limits.max_id_len,
        )?;
        let max_count = self.page_size(max_count)?;
        let from = from_position.max(1);
        let db = &self.inner.db;
        // Two sources, each in position order, merged smallest first: the
        // stream named like the correlation (its events mostly carry it),
        // read from its copies, and the events elsewhere that carry it, from
        // the correlation column (their envelopes inline).
        let start_version = first_version_at_or_after(db, correlation_id, from)?;
        let mut copies = db.raw_iterator_cf_opt(
            cf(db, CF_STREAM_EVENTS)?,
            within_versions(correlation_id, start_version.unwrap_or(1), u64::MAX),
        );
        if let Some(version) = start_version {
            copies.seek(stream_key(correlation_id, version));
        }
        let mut index = db.raw_iterator_cf(cf(db, CF_CORRELATIONS)?);
        index.seek(correlation_key(correlation_id, from));
        // Each source's next event, checked when it is needed (a page
        // never fails on the event after its last); `None` inside once the
        // source has no more.
        let mut a: Option<Option<Fields>> = start_version.is_none().then_some(None);
        let mut b: Option<Option<Fields>> = None;
        let mut page_bytes = PageBytes::new(&self.inner.limits);
        let mut kept = 0usize;
        let mut last_kept = None;
        while kept < max_count {
            let a_head = match a.take() {
                Some(head) => head,
                None => copy_head(&copies, correlation_id)?,
            };
            let b_head = match b.take() {
                Some(head) => head,
                None => index_head(&index, correlation_id)?,
            };
            let (from_stream, fields) = match (a_head, b_head) {
                (Some(x), Some(y)) if x.position < y.position => {
                    b = Some(Some(y));
                    (true, x)
                }
                (Some(x), None) => {
                    b = Some(None);
                    (true, x)
                }
                (x, Some(y)) => {
                    a = Some(x);
                    (false, y)
                }
                (None, None) => return Ok(None),
            };
            let iter = if from_stream { &mut copies } else { &mut index };
            // The head's record, checked as it became the head.
            let body = iter
                .value()
                .and_then(|v| v.get(CRC_LEN..))
                .unwrap_or_default();
            if fields.correlation_id(body) == correlation_id {
                // Full: the next page starts at this event, not consumed.
                if !page_bytes.take(body.len()) {
                    return Ok(last_kept.map(|p: u64| p + 1));
                }
                each(&fields, body)?;
                kept += 1;
                last_kept = Some(fields.position);
            }
            iter.next();
        }
        // More if either source has another entry (unchecked here: checked
        // when the next page reads it).
        let more = match a {
            Some(head) => head.is_some(),
            None => copies
                .key()
                .is_some_and(|key| stream_key_version(correlation_id, key).is_some()),
        } || match b {
            Some(head) => head.is_some(),
            None => index
                .key()
                .is_some_and(|key| correlation_key_position(correlation_id, key).is_some()),
        };
        Ok(last_kept.map(|p| p + 1).filter(|_| more))
    }

    /// Reads up to `max_count` events of the whole log from `from_position`
    /// (fewer when they pass [`Limits::max_read_page_bytes`]; at least one
    /// while there is one). Reading at `head + 1` returns nothing; further
    /// is an error.
    pub fn read_all(&self, from_position: u64, max_count: usize) -> Result<Vec<EventEnvelope>> {
        Ok(self
            .read_all_page(from_position, max_count, &AllFilter::default())?
            .events)
    }

    /// A page of the whole log from `from_position`, keeping what `filter`
    /// asks for: up to `max_count` events and
    /// [`Limits::max_read_page_bytes`] of them (at least one while there is
    /// one), looking at no more than [`Limits::max_read_scan`] records.
    /// Every record looked at is checked (checksum, envelope, position)
    /// whether it is kept or not. Reading at `head + 1` returns nothing;
    /// further is an error. No page holds an event past the head it was
    /// read at, so its next position is always one a reader may ask for.
    pub fn read_all_page(
        &self,
        from_position: u64,
        max_count: usize,
        filter: &AllFilter,
    ) -> Result<AllPage> {
        let (from, max_count, head) = self.whole_log_page(from_position, max_count)?;
        read_events_from(
            &self.inner.db,
            from,
            head,
            max_count,
            filter,
            &self.inner.limits,
        )
    }

    /// [`read_all`](Self::read_all) for bulk readers: each event checked
    /// the same way, but kept as stored, its fields slices of the record
    /// rather than owned copies.
    pub fn read_all_stored(
        &self,
        from_position: u64,
        max_count: usize,
    ) -> Result<Vec<StoredEvent>> {
        let (from, max_count, head) = self.whole_log_page(from_position, max_count)?;
        let db = &self.inner.db;
        let mut iter = db.raw_iterator_cf_opt(cf(db, CF_EVENTS)?, through_position(head));
        iter.seek(position_key(from));
        let mut page = StoredPage::with_capacity(max_count.min(1024));
        while page.len() < max_count
            && let (Some(key), Some(value)) = (iter.key(), iter.value())
        {
            page.push(decode_position_key(CF_EVENTS, key)?, value)?;
            iter.next();
        }
        iter.status()?;
        Ok(page.finish())
    }

    /// The first position, page size and head of a read of the whole
    /// log: the read goes no further than that head.
    fn whole_log_page(&self, from_position: u64, max_count: usize) -> Result<(u64, usize, u64)> {
        let max_count = self.page_size(max_count)?;
        let from = from_position.max(1);
        let head = self.head();
        if from > head + 1 {
            return Err(Error::OutOfRange {
                field: "from_position".into(),
                requested: from_position,
                last: head,
            });
        }
        Ok((from, max_count, head))
    }

    /// The event at one position.
    pub fn get_event(&self, position: u64) -> Result<Option<EventEnvelope>> {
        let db = &self.inner.db;
        match db.get_pinned_cf(cf(db, CF_EVENTS)?, position_key(position))? {
            Some(record) => decode_event(position, &record).map(Some),
            None => Ok(None),
        }
    }

    /// A live subscription from `from_position`: every stored event, then each
    /// new one as it is committed, in order, with no gap and no duplicate. The
    /// reader waits while the subscriber's buffer is full.
    pub fn subscribe(&self, from_position: u64) -> Result<Subscription> {
        let head = self.head();
        let from = from_position.max(1);
        if from > head + 1 {
            return Err(Error::OutOfRange {
                field: "from_position".into(),
                requested: from_position,
                last: head,
            });
        }
        let permit = self
            .inner
            .subscribers
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::TooManySubscribers {
                limit: self.inner.limits.max_subscribers,
            })?;
        Ok(Subscription::start(self.clone(), from, permit))
    }

    fn page_size(&self, requested: usize) -> Result<usize> {
        let limit = self.inner.limits.max_read_page;
        match requested {
            0 => Ok(limit),
            n if n > limit => Err(Error::limit("max_count", n, limit)),
            n => Ok(n),
        }
    }

    /// Up to `max` events waiting in the outbox, oldest first, as stored:
    /// the relay publishes their bytes as they are.
    pub fn outbox_peek(&self, max: usize) -> Result<Vec<StoredEvent>> {
        let db = &self.inner.db;
        let events_cf = cf(db, CF_EVENTS)?;
        let mut page = StoredPage::with_capacity(max.min(1024));
        let mut iter = db.raw_iterator_cf(cf(db, CF_OUTBOX)?);
        iter.seek_to_first();
        while page.len() < max
            && let (Some(key), Some(value)) = (iter.key(), iter.value())
        {
            let run = OutboxRun::decode(key, value)?;
            for position in run.first..run.end() {
                if page.len() == max {
                    break;
                }
                let Some(record) = db.get_pinned_cf(events_cf, position_key(position))? else {
                    return Err(Error::Corrupted {
                        column: CF_OUTBOX,
                        location: format!("position {position}"),
                        reason: "outbox entry without its event".into(),
                    });
                };
                page.push(position, &record)?;
            }
            iter.next();
        }
        iter.status()?;
        Ok(page.finish())
    }

    /// Removes from the outbox the events the bus has acknowledged (the
    /// relay's acknowledged prefix; any positions work). A run partly
    /// acknowledged is written again as what is left of it. Not fsynced:
    /// after a crash an entry may come back and be published again, which
    /// the bus's de-duplication and the consumers' inbox absorb.
    pub fn outbox_clear(&self, positions: &[u64]) -> Result<()> {
        let acknowledged: BTreeSet<u64> = positions.iter().copied().collect();
        let (Some(&lowest), Some(&highest)) = (acknowledged.first(), acknowledged.last()) else {
            return Ok(());
        };
        // One clearer at a time: runs are read, then rewritten.
        let _clearing = self
            .inner
            .outbox_clearing
            .lock()
            .map_err(|_| Error::Closed)?;
        let db = &self.inner.db;
        let outbox = cf(db, CF_OUTBOX)?;
        let mut batch = WriteBatch::default();
        let mut cleared = 0u64;
        let mut iter = db.raw_iterator_cf(outbox);
        iter.seek_for_prev(position_key(lowest));
        if !iter.valid() {
            iter.seek(position_key(lowest));
        }
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            let run = OutboxRun::decode(key, value)?;
            if run.first > highest {
                break;
            }
            let mut inside = acknowledged.range(run.first..run.end()).peekable();
            if inside.peek().is_some() {
                // The run goes; what is left of it goes back as new runs
                // (a batch applies in order, so a put of the same key wins).
                batch.delete_cf(outbox, key);
                let mut keep = |first: u64, end: u64| {
                    if end > first {
                        let (k, v) = OutboxRun {
                            first,
                            count: end - first,
                        }
                        .entry();
                        batch.put_cf(outbox, k, v);
                    }
                };
                let mut rest = run.first;
                for &position in inside {
                    cleared += 1;
                    keep(rest, position);
                    rest = position + 1;
                }
                keep(rest, run.end());
            }
            iter.next();
        }
        iter.status()?;
        drop(iter);
        self.inner.store.write(batch, false)?;
        // The writer counts events before they are visible, so this never
        // takes the counter below the number of events stored.
        self.inner
            .outbox_backlog
            .fetch_sub(cleared, Ordering::AcqRel);
        Ok(())
    }

    /// What the log's RocksDB holds in memory now, as RocksDB counts it:
    /// all within [`Limits::store_memory_bytes`] but the table readers'
    /// own bookkeeping (their index and filter blocks are in the cache).
    pub fn store_memory(&self) -> Result<StoreMemory> {
        let usage = rocksdb::perf::get_memory_usage_stats(Some(&[&*self.inner.db]), None)?;
        Ok(StoreMemory {
            memtables_bytes: usage.mem_table_total,
            block_cache_bytes: self.block_cache_usage()?,
            table_readers_bytes: usage.mem_table_readers_total,
        })
    }

    /// The shared block cache's usage (memtables' reservations included),
    /// read through any column family: they share the one cache.
    fn block_cache_usage(&self) -> Result<u64> {
        let db = &self.inner.db;
        Ok(db
            .property_int_value_cf(cf(db, CF_EVENTS)?, "rocksdb.block-cache-usage")?
            .unwrap_or(0))
    }

    /// Starts the log's copy again from a snapshot and drops what came
    /// before it, when `policy` says it is due (see
    /// [`crate::copy::CompactionPolicy`]); `None` when not due or not
    /// copied. Blocks, and commits wait while the snapshot is made: run it
    /// in `spawn_blocking`, rarely.
    pub fn compact_copy(
        &self,
        policy: crate::copy::CompactionPolicy,
    ) -> Result<Option<crate::copy::CopyCompacted>> {
        let db = &self.inner.db;
        let mut store_bytes = 0u64;
        for name in ALL_COLUMN_FAMILIES {
            store_bytes += db
                .property_int_value_cf(cf(db, name)?, "rocksdb.estimate-live-data-size")?
                .unwrap_or(0);
        }
        self.inner.store.compact_copy(policy, store_bytes)
    }

    /// Events committed but not yet acknowledged by the bus.
    pub fn outbox_backlog(&self) -> u64 {
        self.inner.outbox_backlog.load(Ordering::Acquire)
    }

    /// The answer kept for an idempotent command, if its key was used before:
    /// `Some(response)` for the same request, [`Error::IdempotencyConflict`]
    /// for a different one, `None` if the key is new. A fast path for
    /// retries; the commit itself re-checks, so a race still appends once.
    pub fn idempotent_response(&self, idempotency: &Idempotency) -> Result<Option<Bytes>> {
        match load_idempotency(&self.inner.db, &idempotency.key)? {
            None => Ok(None),
            Some(record)
                if record.request_fingerprint.as_ref() == idempotency.fingerprint.as_slice() =>
            {
                Ok(Some(record.response))
            }
            Some(_) => Err(Error::IdempotencyConflict {
                key: idempotency.key.clone(),
            }),
        }
    }

    /// Whether `consumer` has processed `message_id`.
    pub fn inbox_contains(&self, consumer: &str, message_id: &str) -> Result<bool> {
        let db = &self.inner.db;
        Ok(db
            .get_pinned_cf(cf(db, CF_INBOX)?, inbox_key(consumer, message_id))?
            .is_some())
    }

    /// The highest position in its source's log of a message `consumer`
    /// has applied (0 if none was recorded): where a catch-up starts.
    pub fn consumer_position(&self, consumer: &str) -> Result<u64> {
        load_consumer_position(&self.inner.db, consumer)
    }

    /// The source position through which `consumer` has checked its
    /// source's log: every event it takes at or below it has its outcome
    /// in this log (applied, parked or dead-lettered). 0 if never checked.
    pub fn reconciled_through(&self, consumer: &str) -> Result<u64> {
        let key = crate::codec::reconciled_through_key(consumer);
        load_meta_u64(&self.inner.db, &key, || {
            format!("reconciled position of {consumer}")
        })
        .map(|p| p.unwrap_or(0))
    }

    /// Records that `consumer` has checked its source's log through
    /// `position` (see [`EventLog::reconciled_through`]). The mark only
    /// moves forward: a lower `position` leaves it as it is. One writer per
    /// consumer (its own task) is assumed.
    pub fn record_reconciled_through(&self, consumer: &str, position: u64) -> Result<()> {
        if position <= self.reconciled_through(consumer)? {
            return Ok(());
        }
        let db = &self.inner.db;
        let key = crate::codec::reconciled_through_key(consumer);
        let value = crate::codec::seal(&key, &position.to_be_bytes());
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(db, CF_META)?, &key, value);
        self.inner.store.write(batch, true)?;
        Ok(())
    }

    /// Refuses a projection read while the projections are not whole.
    fn projections_readable(&self) -> Result<()> {
        if self.inner.projections_unavailable.load(Ordering::Acquire) {
            return Err(Error::ProjectionsIncomplete {
                reason: "the projections are being rebuilt".into(),
            });
        }
        Ok(())
    }

    /// One projection value. Refused (`ProjectionsIncomplete`, a transient
    /// error) while a rebuild is under way.
    pub fn projection_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.projections_readable()?;
        read_projection(&self.inner.db, key)
    }

    /// Up to `limit` projection entries whose keys start with `prefix`, after
    /// `start_after` if given, in key order.
    pub fn projection_scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.projections_readable()?;
        let db = &self.inner.db;
        let from = start_after.unwrap_or(prefix);
        let mut out = Vec::new();
        for item in db.iterator_cf(
            cf(db, CF_PROJECTIONS)?,
            IteratorMode::From(from, Direction::Forward),
        ) {
            let (key, value) = item?;
            if !key.starts_with(prefix) || out.len() == limit {
                break;
            }
            if start_after.is_some_and(|after| *after == *key) {
                continue;
            }
            let body = unseal(CF_PROJECTIONS, &key, &value, || format!("key {key:02x?}"))?;
            out.push((key.to_vec(), body.to_vec()));
        }
        Ok(out)
    }

    /// The projection entries under `prefix`, read `page` at a time (see
    /// [`ProjectionPages`]): for scans that may be longer than one read.
    pub fn projection_pages(&self, prefix: &[u8], page: usize) -> ProjectionPages<'_> {
        ProjectionPages {
            log: self,
            prefix: prefix.to_vec(),
            page: page.max(1),
            after: None,
            done: false,
        }
    }

    /// Takes a consistent copy of the whole store into `dir` (which must
    /// not exist, on the log's filesystem: the data directory is the place)
    /// while the log serves: RocksDB's checkpoint, hard links to the
    /// immutable table files and a copy of the rest, every commit before
    /// it whole and none after it in part. Returns the copy's head and
    /// projection digest, read from the copy itself. Blocking.
    pub fn checkpoint(&self, dir: &Path) -> Result<Checkpointed> {
        rocksdb::checkpoint::Checkpoint::new(&self.inner.db)?.create_checkpoint(dir)?;
        // Opened once to read what it holds (its WAL replayed into tables),
        // then closed: what is streamed is a store at rest.
        stored_state(dir)
    }

    /// Where the log's store is (its data directory's `eventlog`).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// SHA-256 over every projection entry in key order: equal digests mean
    /// equal projections.
    pub fn projection_digest(&self) -> Result<String> {
        digest_projections(&self.inner.db)
    }

    /// Drops every projection and rebuilds it from the log, between commits.
    /// Returns the number of events replayed.
    pub async fn rebuild_projections(&self) -> Result<u64> {
        Ok(self.rebuild_projections_checked().await?.events_replayed)
    }

    /// [`EventLog::rebuild_projections`], with the projection digests taken
    /// just before and just after it, between the same two commits.
    pub async fn rebuild_projections_checked(&self) -> Result<Rebuilt> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .commits
            .send(WriterRequest::RebuildProjections { reply })
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Checks every stored event: checksum, decoding, contiguous positions,
    /// that the stream index points at it and that its copy by stream is
    /// the same envelope. Returns the number of events checked.
    pub fn verify(&self) -> Result<u64> {
        let db = &self.inner.db;
        let mut expected = 1;
        for item in db.iterator_cf(cf(db, CF_EVENTS)?, IteratorMode::Start) {
            let (key, value) = item?;
            let position = decode_position_key(CF_EVENTS, &key)?;
            let body = unseal(CF_EVENTS, &key, &value, || format!("position {position}"))?;
            let event = decode_body(position, body)?;
            if position != expected {
                return Err(Error::Corrupted {
                    column: CF_EVENTS,
                    location: format!("position {position}"),
                    reason: format!("gap: expected position {expected}"),
                });
            }
            let points_here = index_run_at_or_before(db, &event.stream_id, event.stream_version)?
                .and_then(|run| run.position_of(event.stream_version))
                == Some(position);
            if !points_here {
                return Err(Error::Corrupted {
                    column: CF_STREAMS,
                    location: format!("{} v{}", event.stream_id, event.stream_version),
                    reason: format!("index does not point at position {position}"),
                });
            }
            // Its copy by stream is the same envelope.
            let copy_key = stream_key(&event.stream_id, event.stream_version);
            let location = || format!("{} v{}", event.stream_id, event.stream_version);
            let copy = db.get_pinned_cf(cf(db, CF_STREAM_EVENTS)?, &copy_key)?;
            let same = match &copy {
                Some(copy) => unseal(CF_STREAM_EVENTS, &copy_key, copy, location)? == body,
                None => false,
            };
            if !same {
                return Err(Error::Corrupted {
                    column: CF_STREAM_EVENTS,
                    location: location(),
                    reason: format!("no copy of the event at position {position}"),
                });
            }
            expected += 1;
        }
        Ok(expected - 1)
    }

    /// Stops the writer after the commits already queued, then returns. Later
    /// commits fail with [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        // The writer may already be gone; either way it is stopped after this.
        let _ = self.inner.commits.send(WriterRequest::Shutdown).await;
        let handle = self.inner.writer.lock().map_err(|_| Error::Closed)?.take();
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|_| Error::Closed)?
                .map_err(|_| Error::Closed)?;
        }
        Ok(())
    }
}

/// The idempotency record under `key`, if any.
/// Projection entries under a prefix, a page at a time, each page after the
/// last key of the one before (entries written meanwhile past that key are
/// seen; none is seen twice).
pub struct ProjectionPages<'a> {
    log: &'a EventLog,
    prefix: Vec<u8>,
    page: usize,
    after: Option<Vec<u8>>,
    done: bool,
}

impl ProjectionPages<'_> {
    /// The next page of (key, value) pairs; empty once the prefix is read.
    pub fn next_page(&mut self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(Vec::new());
        }
        let page = self
            .log
            .projection_scan(&self.prefix, self.after.as_deref(), self.page)?;
        self.done = page.len() < self.page;
        self.after = page.last().map(|(key, _)| key.clone());
        Ok(page)
    }
}

pub(crate) fn load_consumer_position(db: &DB, consumer: &str) -> Result<u64> {
    let key = crate::codec::consumer_position_key(consumer);
    load_meta_u64(db, &key, || format!("consumer position of {consumer}")).map(|p| p.unwrap_or(0))
}

/// A big-endian u64 of the meta column, if there is one at `key`.
fn load_meta_u64(db: &DB, key: &[u8], what: impl Fn() -> String) -> Result<Option<u64>> {
    match db.get_pinned_cf(cf(db, CF_META)?, key)? {
        Some(value) => {
            let body = crate::codec::unseal(CF_META, key, &value, &what)?;
            let bytes: [u8; 8] = body.try_into().map_err(|_| Error::Corrupted {
                column: CF_META,
                location: what(),
                reason: "not 8 bytes".into(),
            })?;
            Ok(Some(u64::from_be_bytes(bytes)))
        }
        None => Ok(None),
    }
}

pub(crate) fn load_idempotency(db: &DB, key: &str) -> Result<Option<IdempotencyRecord>> {
    let Some(value) = db.get_pinned_cf(cf(db, CF_IDEMPOTENCY)?, key.as_bytes())? else {
        return Ok(None);
    };
    let body = unseal(CF_IDEMPOTENCY, key.as_bytes(), &value, || {
        format!("key {key:?}")
    })?;
    IdempotencyRecord::decode(body)
        .map(Some)
        .map_err(|e| Error::Corrupted {
            column: CF_IDEMPOTENCY,
            location: format!("key {key:?}"),
            reason: e.to_string(),
        })
}

/// Decodes and checks one stored event record.
/// The record an iterator stands on, which an index or a merge says is
/// there (`location` names it if it is not).
fn current<'a>(
    iter: &'a rocksdb::DBRawIterator<'_>,
    column: &'static str,
    location: impl FnOnce() -> String,
) -> Result<(&'a [u8], &'a [u8])> {
    match (iter.key(), iter.value()) {
        (Some(key), Some(value)) => Ok((key, value)),
        _ => {
            iter.status()?;
            Err(Error::Corrupted {
                column,
                location: location(),
                reason: "missing".into(),
            })
        }
    }
}

/// Decodes the checked body of `stream_id`'s copy at `version`, which must
/// say it is that event.
fn decode_copy(stream_id: &str, version: u64, body: &[u8]) -> Result<EventEnvelope> {
    let event = EventEnvelope::decode(body).map_err(|e| Error::Corrupted {
        column: CF_STREAM_EVENTS,
        location: format!("{stream_id} v{version}"),
        reason: format!("undecodable envelope: {e}"),
    })?;
    if event.stream_id != stream_id || event.stream_version != version {
        return Err(Error::Corrupted {
            column: CF_STREAM_EVENTS,
            location: format!("{stream_id} v{version}"),
            reason: format!(
                "envelope says {} v{}",
                event.stream_id, event.stream_version
            ),
        });
    }
    Ok(event)
}

/// Decodes an event's checked body read at `position`.
pub(crate) fn decode_body(position: u64, body: &[u8]) -> Result<EventEnvelope> {
    checked_envelope(position, EventEnvelope::decode(body))
}

/// Read options for an iterator over the log's events that ends at
/// `through` (the head a read was checked against; see
/// [`read_events_from`]): RocksDB stops there, events written and not yet
/// the head stay unseen.
fn through_position(through: u64) -> rocksdb::ReadOptions {
    let mut options = rocksdb::ReadOptions::default();
    if let Some(after) = through.checked_add(1) {
        options.set_iterate_upper_bound(position_key(after));
    }
    options
}

/// Read options for an iterator over `stream_id`'s copies from version
/// `first` to `last`: RocksDB then stops at the stream's end and skips
/// the files and blocks outside it, instead of comparing every key past it.
fn within_versions(stream_id: &str, first: u64, last: u64) -> rocksdb::ReadOptions {
    let mut options = rocksdb::ReadOptions::default();
    options.set_iterate_lower_bound(stream_key(stream_id, first));
    let upper = match last.checked_add(1) {
        Some(after) => stream_key(stream_id, after),
        // Past every version: the first key of the next stream name.
        None => {
            let mut key = stream_id.as_bytes().to_vec();
            key.push(1);
            key
        }
    };
    options.set_iterate_upper_bound(upper);
    options
}

/// The event the copies iterator is at, checked, if it is still one of
/// `stream_id`'s copies.
fn copy_head(copies: &rocksdb::DBRawIterator<'_>, stream_id: &str) -> Result<Option<Fields>> {
    let entry = sealed_entry(
        copies,
        CF_STREAM_EVENTS,
        |key| stream_key_version(stream_id, key),
        |version| format!("{stream_id} v{version}"),
    )?;
    entry
        .map(|(version, body)| Fields::of_copy(stream_id, version, body))
        .transpose()
}

/// The event the correlation index iterator is at, checked, if it is
/// still an entry of `correlation_id`. Every entry holds its envelope (an
/// older log's entries get theirs at open: `ensure_stream_events`).
fn index_head(index: &rocksdb::DBRawIterator<'_>, correlation_id: &str) -> Result<Option<Fields>> {
    let entry = sealed_entry(
        index,
        CF_CORRELATIONS,
        |key| correlation_key_position(correlation_id, key),
        |position| format!("position {position}, correlation {correlation_id}"),
    )?;
    entry
        .map(|(position, body)| Fields::at_position(CF_CORRELATIONS, position, body))
        .transpose()
}

/// The entry of `column` an iterator is at, if `place` accepts its key:
/// that place and the entry's body, checked against its checksum.
fn sealed_entry<'a, P: Copy>(
    iter: &'a rocksdb::DBRawIterator<'_>,
    column: &'static str,
    place: impl FnOnce(&[u8]) -> Option<P>,
    location: impl Fn(P) -> String,
) -> Result<Option<(P, &'a [u8])>> {
    let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
        iter.status()?;
        return Ok(None);
    };
    let Some(at) = place(key) else {
        return Ok(None);
    };
    let body = unseal(column, key, value, || location(at))?;
    Ok(Some((at, body)))
}

/// The first version of `stream_id` whose event is at `position` or after,
/// from the stream index (small: one entry a commit); `None` if there is
/// none (or no such stream).
fn first_version_at_or_after(db: &DB, stream_id: &str, position: u64) -> Result<Option<u64>> {
    let mut runs = db.raw_iterator_cf(cf(db, CF_STREAMS)?);
    runs.seek(stream_key(stream_id, 0));
    while let (Some(key), Some(value)) = (runs.key(), runs.value()) {
        let Some(run) = IndexRun::decode(stream_id, key, value)? else {
            break;
        };
        if run.first_position + run.count > position {
            let skipped = position.saturating_sub(run.first_position);
            return Ok(Some(run.first_version + skipped));
        }
        runs.next();
    }
    runs.status()?;
    Ok(None)
}

pub(crate) fn decode_event(position: u64, record: &[u8]) -> Result<EventEnvelope> {
    let key = position_key(position);
    let body = unseal(CF_EVENTS, &key, record, || format!("position {position}"))?;
    checked_envelope(position, EventEnvelope::decode(body))
}

/// A decoded envelope, if it decoded and says it is at `position`.
fn checked_envelope(
    position: u64,
    decoded: std::result::Result<EventEnvelope, prost::DecodeError>,
) -> Result<EventEnvelope> {
    let event = decoded.map_err(|e| Error::Corrupted {
        column: CF_EVENTS,
        location: format!("position {position}"),
        reason: format!("undecodable envelope: {e}"),
    })?;
    if event.global_position != position {
        return Err(Error::Corrupted {
            column: CF_EVENTS,
            location: format!("position {position}"),
            reason: format!("envelope says position {}", event.global_position),
        });
    }
    Ok(event)
}

/// What a read of the whole log ([`EventLog::read_all_page`]) keeps of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllFilter {
    /// Only events whose type's last segment is one of these
    /// (`TicketReported` for `lineguard.intake.v1.TicketReported`, the
    /// name the bus's subjects carry); empty: every event.
    pub type_names: Vec<String>,
    /// Each event without its payload: what a reader needs to tell which
    /// events it already holds, at a fraction of the bytes.
    pub without_payloads: bool,
}

impl AllFilter {
    /// Whether an event of `event_type` is kept.
    pub fn keeps(&self, event_type: &str) -> bool {
        let name = event_type.rsplit('.').next().unwrap_or(event_type);
        self.type_names.is_empty() || self.type_names.iter().any(|t| t == name)
    }
}

/// A page of the whole log, and where the next one starts.
#[derive(Debug, Clone, Default)]
pub struct AllPage {
    /// The events kept, in log order.
    pub events: Vec<EventEnvelope>,
    /// The position after the last record looked at (kept or not): pass it
    /// as the next read's `from_position`. Equal to the position asked
    /// when nothing was there.
    pub next_position: u64,
}

/// The bytes a page of a read has taken of [`Limits::max_read_page_bytes`]:
/// every read (the whole log, a stream, a correlation) stops before the
/// event that would pass them, never before its first event.
struct PageBytes {
    limit: usize,
    taken: usize,
    events: usize,
}

impl PageBytes {
    fn new(limits: &Limits) -> Self {
        PageBytes {
            limit: limits.max_read_page_bytes,
            taken: 0,
            events: 0,
        }
    }

    /// Takes an event of `bytes` into the page; `false` (and nothing
    /// taken) when the page is full.
    fn take(&mut self, bytes: usize) -> bool {
        if self.events > 0 && self.taken + bytes > self.limit {
            return false;
        }
        self.taken += bytes;
        self.events += 1;
        true
    }
}

/// A page of the whole log from `from` (see [`EventLog::read_all_page`]):
/// up to `max_count` events `filter` keeps, within `limits`'
/// `max_read_page_bytes` (at least one) and `max_read_scan` records, and
/// none past `through`. `through` is the head the read was checked
/// against: a group's events are in RocksDB a moment before the writer
/// makes them the head, and a page that showed them would send its reader
/// on to a position past the head, which the next read refuses.
pub(crate) fn read_events_from(
    db: &DB,
    from: u64,
    through: u64,
    max_count: usize,
    filter: &AllFilter,
    limits: &Limits,
) -> Result<AllPage> {
    let mut iter = db.raw_iterator_cf_opt(cf(db, CF_EVENTS)?, through_position(through));
    iter.seek(position_key(from));
    let mut events = Vec::with_capacity(max_count.min(1024));
    let mut page_bytes = PageBytes::new(limits);
    let mut scanned = 0usize;
    let mut next_position = from;
    while events.len() < max_count
        && scanned < limits.max_read_scan
        && let (Some(key), Some(value)) = (iter.key(), iter.value())
    {
        let position = decode_position_key(CF_EVENTS, key)?;
        let body = unseal(CF_EVENTS, key, value, || format!("position {position}"))?;
        // Only a filter by type needs the type before the decoding: the
        // walk checks the record as the decoding would.
        let kept = filter.type_names.is_empty()
            || filter.keeps(Fields::at_position(CF_EVENTS, position, body)?.event_type(body));
        if kept {
            // The payload becomes a slice of one copy of the record;
            // without it, the copy goes with the decoding.
            let mut event = checked_envelope(
                position,
                EventEnvelope::decode(Bytes::copy_from_slice(body)),
            )?;
            let bytes = if filter.without_payloads {
                body.len() - event.payload.len()
            } else {
                body.len()
            };
            if !page_bytes.take(bytes) {
                break;
            }
            if filter.without_payloads {
                event.payload = Bytes::new();
            }
            events.push(event);
        }
        scanned += 1;
        next_position = position + 1;
        iter.next();
    }
    iter.status()?;
    debug_assert!(events.len() <= max_count && scanned <= limits.max_read_scan);
    Ok(AllPage {
        events,
        next_position,
    })
}

/// The index entry of `stream_id` with the highest first version at or
/// before `version`.
fn index_run_at_or_before(db: &DB, stream_id: &str, version: u64) -> Result<Option<IndexRun>> {
    let mut iter = db.raw_iterator_cf(cf(db, CF_STREAMS)?);
    iter.seek_for_prev(stream_key(stream_id, version));
    let run = match (iter.key(), iter.value()) {
        (Some(key), Some(value)) => IndexRun::decode(stream_id, key, value)?,
        _ => None,
    };
    iter.status()?;
    Ok(run)
}

/// A stream's last version, 0 if it has no events.
pub(crate) fn load_stream_head(db: &DB, stream_id: &str) -> Result<u64> {
    Ok(index_run_at_or_before(db, stream_id, u64::MAX)?.map_or(0, |run| run.last_version()))
}

/// SHA-256 over every projection entry (key and body lengths and bytes), in key order.
pub(crate) fn digest_projections(db: &DB) -> Result<String> {
    let mut hasher = Sha256::new();
    for item in db.iterator_cf(cf(db, CF_PROJECTIONS)?, IteratorMode::Start) {
        let (key, value) = item?;
        let body = unseal(CF_PROJECTIONS, &key, &value, || format!("key {key:02x?}"))?;
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(&key);
        hasher.update((body.len() as u64).to_be_bytes());
        hasher.update(body);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Events copied per write while a log from before the stream copies
/// gets them.
const COPIES_PER_WRITE: usize = 10_000;

/// Gives every stored event its copy in [`CF_STREAM_EVENTS`] and, if it
/// carries another stream's correlation, its entry (with its envelope) in
/// [`CF_CORRELATIONS`], once, for a log written before either existed; a
/// crash part way copies again from the start (each write puts what is
/// already there).
fn ensure_stream_events(db: &DB, store: &Store, head: u64) -> Result<()> {
    let meta = cf(db, CF_META)?;
    if db.get_pinned_cf(meta, META_STREAM_EVENTS)?.is_some()
        && db.get_pinned_cf(meta, META_CORRELATION_INDEX)?.is_some()
    {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut iter = db.raw_iterator_cf(cf(db, CF_EVENTS)?);
    iter.seek_to_first();
    let mut batch = rocksdb::WriteBatch::default();
    let mut copied = 0u64;
    while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
        let position = decode_position_key(CF_EVENTS, key)?;
        let body = unseal(CF_EVENTS, key, value, || format!("position {position}"))?;
        let event = decode_body(position, body)?;
        let copy_key = stream_key(&event.stream_id, event.stream_version);
        batch.put_cf(cf(db, CF_STREAM_EVENTS)?, &copy_key, seal(&copy_key, body));
        if needs_correlation_entry(&event.stream_id, &event.correlation_id) {
            let key = correlation_key(&event.correlation_id, position);
            batch.put_cf(cf(db, CF_CORRELATIONS)?, &key, seal(&key, body));
        }
        copied += 1;
        if batch.len() >= COPIES_PER_WRITE {
            store.write(std::mem::take(&mut batch), false)?;
        }
        iter.next();
    }
    iter.status()?;
    batch.put_cf(meta, META_STREAM_EVENTS, seal(META_STREAM_EVENTS, b"1"));
    batch.put_cf(
        meta,
        META_CORRELATION_INDEX,
        seal(META_CORRELATION_INDEX, b"1"),
    );
    store.write(batch, true)?;
    if head > 0 {
        tracing::info!(
            events = head,
            copied,
            seconds = started.elapsed().as_secs_f64(),
            "events copied by stream for an older log"
        );
    }
    Ok(())
}

fn last_position(db: &DB) -> Result<u64> {
    let mut iter = db.raw_iterator_cf(cf(db, CF_EVENTS)?);
    iter.seek_to_last();
    let position = match iter.key() {
        Some(key) => decode_position_key(CF_EVENTS, key)?,
        None => 0,
    };
    iter.status()?;
    Ok(position)
}

/// Events waiting in the outbox: the sum of its runs.
fn count_outbox(db: &DB) -> Result<u64> {
    let mut iter = db.raw_iterator_cf(cf(db, CF_OUTBOX)?);
    iter.seek_to_first();
    let mut count = 0;
    while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
        count += OutboxRun::decode(key, value)?.count;
        iter.next();
    }
    iter.status()?;
    Ok(count)
}

fn load_projection_state(db: &DB) -> Result<Option<ProjectionState>> {
    let Some(value) = db.get_pinned_cf(cf(db, CF_META)?, META_PROJECTION_STATE)? else {
        return Ok(None);
    };
    let body = unseal(CF_META, META_PROJECTION_STATE, &value, || {
        "projection state".into()
    })?;
    ProjectionState::decode(body)
        .map(Some)
        .map_err(|e| Error::Corrupted {
            column: CF_META,
            location: "projection state".into(),
            reason: e.to_string(),
        })
}
