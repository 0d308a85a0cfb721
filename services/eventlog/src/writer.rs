//! The single writer thread: validates commits against the log's state,
//! assigns versions and positions, and group-commits them.
//!
//! Commits queue on a bounded channel. The writer takes the first waiting
//! commit and every other one already queued (up to
//! [`Limits::max_group_commits`]), stages each on top of the ones before it,
//! and writes them all in one RocksDB batch with one fsync. Only then does it
//! answer the callers and advance its in-memory state, so a failed write
//! leaves both the store and the writer as they were.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lineguard_protos::eventlog::v1::{
    CommitReceipt, EventEnvelope, IdempotencyRecord, ProjectionState, StreamCommit,
};
use prost::Message;
use rocksdb::{DB, WriteBatch};
use tokio::sync::{mpsc, oneshot, watch};

use crate::codec::{
    CF_CORRELATIONS, CF_EVENTS, CF_IDEMPOTENCY, CF_INBOX, CF_META, CF_OUTBOX, CF_PROJECTIONS,
    CF_STREAM_EVENTS, CF_STREAMS, IndexRun, META_PROJECTION_STATE, OutboxRun,
    consumer_position_key, correlation_key, inbox_key, needs_correlation_entry, position_key, seal,
    stream_key,
};
use crate::copy::Store;
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::log::{
    AllFilter, cf, digest_projections, load_consumer_position, load_idempotency, load_stream_head,
    read_events_from,
};
use crate::projection::{self, Overlay, ProjectionView, Projector, write_overlay};
use crate::txn::{CommitOutcome, Transaction};

/// A decision the writer makes against its staged projections (see
/// [`EventLog::decide`](crate::EventLog::decide)): a transaction to commit,
/// none when the command is declined, or an error when the transaction is
/// not one the log takes.
pub(crate) type Decider =
    Box<dyn FnOnce(&ProjectionView<'_>) -> Result<Option<Transaction>> + Send>;

/// The answer to a decision: what its commit did (`None`: declined).
type DecideReply = oneshot::Sender<Result<Option<CommitOutcome>>>;

/// Work for the writer thread.
pub(crate) enum WriterRequest {
    Commit {
        txn: Transaction,
        reply: oneshot::Sender<Result<CommitOutcome>>,
    },
    Decide {
        decider: Decider,
        reply: DecideReply,
    },
    RebuildProjections {
        reply: oneshot::Sender<Result<Rebuilt>>,
    },
    Shutdown,
}

/// What a rebuild of the projections did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    pub events_replayed: u64,
    /// [`EventLog::projection_digest`](crate::EventLog::projection_digest) just before and just after.
    pub digest_before: String,
    pub digest_after: String,
}

pub(crate) struct Writer {
    pub db: Arc<DB>,
    /// Where every write goes: the disk, after the copy when there is one.
    pub store: Arc<Store>,
    pub service: String,
    pub limits: Limits,
    pub projector: Arc<dyn Projector>,
    pub head: u64,
    pub head_tx: watch::Sender<u64>,
    pub outbox_backlog: Arc<AtomicU64>,
    pub stream_heads: StreamHeads,
    /// Why the projections are incomplete, when a rebuild failed part way:
    /// every commit is refused until a rebuild completes (here, or when the
    /// log is opened again), because a commit records the projections as
    /// applied through its head and would make half-built ones look whole.
    pub projections_incomplete: Option<String>,
    /// Shared with readers: set from the start of a rebuild until one
    /// completes.
    pub projections_unavailable: Arc<std::sync::atomic::AtomicBool>,
}

/// The last version of recently written streams, as committed.
///
/// The writer is the only one that writes the stream index, and it records
/// a head here only after the write that made it is durable, so a cached
/// head is always the stored one. Bounded by two generations of at most
/// half the limit each: when the newer fills up, the older is dropped, so
/// at least the last half-limit distinct streams written are always found.
pub(crate) struct StreamHeads {
    newer: HashMap<String, u64>,
    older: HashMap<String, u64>,
    generation_limit: usize,
}

impl StreamHeads {
    pub(crate) fn new(limit: usize) -> Self {
        StreamHeads {
            newer: HashMap::new(),
            older: HashMap::new(),
            generation_limit: (limit / 2).max(1),
        }
    }

    fn get(&self, stream_id: &str) -> Option<u64> {
        self.newer
            .get(stream_id)
            .or_else(|| self.older.get(stream_id))
            .copied()
    }

    fn record(&mut self, stream_id: String, version: u64) {
        if self.newer.len() >= self.generation_limit && !self.newer.contains_key(&stream_id) {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(stream_id, version);
        debug_assert!(self.newer.len() <= self.generation_limit);
    }
}

/// How long the writer keeps looking for the next commit after a group,
/// yielding its core between looks, before it parks. A caller that commits
/// again right after its answer (a loop of commits, a handler's next
/// command) then finds the writer awake instead of paying a thread wake-up
/// on each side; RocksDB's own write thread waits the same way
/// (`write_thread_max_yield_usec`, 100 us). The price is at most this much
/// CPU per group, spent only while other threads have none to use.
const YIELD_BEFORE_PARKING: std::time::Duration = std::time::Duration::from_micros(100);

/// The next request: a queued one at once, else one arriving while the
/// writer yields, else whatever wakes it from parking. `None` once every
/// sender is gone.
fn next_request(requests: &mut mpsc::Receiver<WriterRequest>) -> Option<WriterRequest> {
    let start = std::time::Instant::now();
    loop {
        match requests.try_recv() {
            Ok(request) => return Some(request),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if start.elapsed() < YIELD_BEFORE_PARKING => {
                std::thread::yield_now();
            }
            Err(mpsc::error::TryRecvError::Empty) => return requests.blocking_recv(),
        }
    }
}

/// State of the group being staged: what earlier commits in it have written.
struct Group {
    next_position: u64,
    stream_heads: HashMap<String, u64>,
    idempotency: HashMap<String, IdempotencyRecord>,
    inbox: HashSet<Vec<u8>>,
    /// Highest source position per consumer, as the group leaves it.
    consumer_positions: HashMap<String, u64>,
    projections: Overlay,
    batch: WriteBatch,
    outbox_added: u64,
}

type Reply = oneshot::Sender<Result<CommitOutcome>>;

/// One piece of a group, in the order it came.
enum Pending {
    Commit(Transaction, Reply),
    Decide(Decider, DecideReply),
}

impl Pending {
    fn stored_bytes_estimate(&self) -> usize {
        match self {
            Pending::Commit(txn, _) => txn.stored_bytes_estimate(),
            // Not known until decided: the batch grows for it.
            Pending::Decide(..) => 0,
        }
    }
}

/// Where a piece of a group is answered.
enum Answer {
    Commit(Reply),
    Decide(DecideReply),
}

impl Answer {
    /// Answers with `result` (a commit's is never `None`). The caller may
    /// have given up waiting; the commit stands regardless.
    fn send(self, result: Result<Option<CommitOutcome>>) {
        match self {
            Answer::Commit(reply) => {
                let _ = reply.send(result.and_then(|outcome| {
                    outcome.ok_or_else(|| Error::invalid("commit", "declined without a decision"))
                }));
            }
            Answer::Decide(reply) => {
                let _ = reply.send(result);
            }
        }
    }
}

impl Writer {
    pub(crate) fn run(mut self, mut requests: mpsc::Receiver<WriterRequest>) {
        let mut commits: Vec<Pending> = Vec::with_capacity(self.limits.max_group_commits);
        while let Some(first) = next_request(&mut requests) {
            let mut next = Some(first);
            while let Some(request) = next.take() {
                match request {
                    WriterRequest::Commit { txn, reply } => {
                        commits.push(Pending::Commit(txn, reply));
                    }
                    WriterRequest::Decide { decider, reply } => {
                        commits.push(Pending::Decide(decider, reply));
                    }
                    WriterRequest::RebuildProjections { reply } => {
                        self.commit_group(&mut commits);
                        // Both digests between the same two commits: equal
                        // unless the rebuild changed something.
                        self.projections_unavailable.store(true, Ordering::Release);
                        let rebuilt = digest_projections(&self.db).and_then(|digest_before| {
                            let events_replayed = self.rebuild_projections()?;
                            Ok(Rebuilt {
                                events_replayed,
                                digest_before,
                                digest_after: digest_projections(&self.db)?,
                            })
                        });
                        match &rebuilt {
                            Ok(_) => {
                                self.projections_incomplete = None;
                                self.projections_unavailable.store(false, Ordering::Release);
                            }
                            Err(e) => {
                                tracing::error!(service = %self.service, error = %e,
                                    "projection rebuild failed; commits refused until a rebuild completes");
                                self.projections_incomplete = Some(e.to_string());
                            }
                        }
                        let _ = reply.send(rebuilt);
                    }
                    WriterRequest::Shutdown => {
                        self.commit_group(&mut commits);
                        tracing::info!(service = %self.service, head = self.head, "event log writer stopped");
                        return;
                    }
                }
                if commits.len() < self.limits.max_group_commits {
                    next = requests.try_recv().ok();
                }
            }
            self.commit_group(&mut commits);
        }
    }

    /// Stages, writes and answers every queued commit.
    fn commit_group(&mut self, commits: &mut Vec<Pending>) {
        if commits.is_empty() {
            return;
        }
        if let Some(reason) = &self.projections_incomplete {
            for pending in commits.drain(..) {
                let refused = Err(Error::ProjectionsIncomplete {
                    reason: reason.clone(),
                });
                match pending {
                    Pending::Commit(_, reply) => Answer::Commit(reply).send(refused),
                    Pending::Decide(_, reply) => Answer::Decide(reply).send(refused),
                }
            }
            return;
        }
        let staged_at = std::time::Instant::now();
        let group_commits = commits.len();
        let mut group = Group {
            next_position: self.head + 1,
            stream_heads: HashMap::new(),
            idempotency: HashMap::new(),
            inbox: HashSet::new(),
            consumer_positions: HashMap::new(),
            projections: Overlay::new(),
            // Sized up front: growing a batch of hundreds of events copies it
            // again and again.
            batch: WriteBatch::with_capacity_bytes(
                commits.iter().map(Pending::stored_bytes_estimate).sum(),
            ),
            outbox_added: 0,
        };
        // What staging used up, dropped only after the callers have their
        // answers: freeing a group's events is not the callers' wait.
        let mut spent = Vec::with_capacity(commits.len());
        let mut results: Vec<(Result<Option<CommitOutcome>>, Answer)> = commits
            .drain(..)
            .map(|pending| match pending {
                Pending::Commit(txn, reply) => (
                    self.stage(txn, &mut group, &mut spent).map(Some),
                    Answer::Commit(reply),
                ),
                Pending::Decide(decider, reply) => (
                    self.stage_decision(decider, &mut group, &mut spent),
                    Answer::Decide(reply),
                ),
            })
            .collect();

        if !group.batch.is_empty() {
            // Counted before the entries become visible: the relay may clear
            // them the moment the write lands, and must never count below zero.
            self.outbox_backlog
                .fetch_add(group.outbox_added, Ordering::AcqRel);
            let written = self.write_group(&mut group);
            crate::metrics::LOG_METRICS.group(
                staged_at.elapsed(),
                group_commits,
                group.next_position - (self.head + 1),
                written.is_ok(),
            );
            if let Err(err) = written {
                self.outbox_backlog
                    .fetch_sub(group.outbox_added, Ordering::AcqRel);
                tracing::error!(service = %self.service, error = %err, "group commit failed; nothing written");
                for (result, _) in &mut results {
                    // A declined decision wrote nothing and stays declined.
                    if !matches!(result, Ok(None)) {
                        *result = Err(err.duplicate());
                    }
                }
            } else {
                // Written and not yet the head: readers must not see it
                // (a test holds the writer here).
                fail::fail_point!("eventlog::before_head");
                self.head = group.next_position - 1;
                self.head_tx.send_replace(self.head);
                for (stream_id, version) in group.stream_heads {
                    self.stream_heads.record(stream_id, version);
                }
            }
        }
        for (result, answer) in results {
            answer.send(result);
        }
        drop(spent);
    }

    /// Runs a decision against the projections as the group so far leaves
    /// them and stages the transaction it makes (`None`: declined). A
    /// decision that panics is refused, never the writer's end.
    fn stage_decision(
        &self,
        decider: Decider,
        group: &mut Group,
        spent: &mut Vec<Vec<EventEnvelope>>,
    ) -> Result<Option<CommitOutcome>> {
        let decided = {
            let view = ProjectionView::new(&self.db, &group.projections);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decider(&view)))
        };
        match decided {
            Ok(Ok(Some(txn))) => self.stage(txn, group, spent).map(Some),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(refused)) => Err(refused),
            Err(_) => {
                tracing::error!(service = %self.service, "a decision panicked on the writer thread; refused");
                Err(Error::invalid("decision", "the decision panicked"))
            }
        }
    }

    fn write_group(&self, group: &mut Group) -> Result<()> {
        fail::fail_point!("eventlog::before_write", |_| Err(Error::Injected(
            "before_write"
        )));
        write_overlay(&self.db, &mut group.batch, &group.projections)?;
        self.put_projection_state(
            &mut group.batch,
            self.projector.name(),
            self.projector.version(),
            group.next_position - 1,
        )?;
        self.write_batch(std::mem::take(&mut group.batch))
    }

    fn write_batch(&self, batch: WriteBatch) -> Result<()> {
        self.store.write(batch, true)?;
        Ok(())
    }

    /// Checks one commit against the log as the earlier commits of the group
    /// leave it and, if it holds, adds its writes to the group. On error the
    /// group is untouched.
    fn stage(
        &self,
        txn: Transaction,
        group: &mut Group,
        spent: &mut Vec<Vec<EventEnvelope>>,
    ) -> Result<CommitOutcome> {
        let inbox = match &txn.inbox {
            Some(mark) => {
                let key = inbox_key(&mark.consumer, &mark.message_id);
                if group.inbox.contains(&key)
                    || self
                        .db
                        .get_pinned_cf(cf(&self.db, CF_INBOX)?, &key)?
                        .is_some()
                {
                    return Ok(CommitOutcome::AlreadyProcessed);
                }
                Some(key)
            }
            None => None,
        };
        if let Some(idem) = &txn.idempotency {
            let earlier = match group.idempotency.get(&idem.key) {
                Some(record) => Some(record.clone()),
                None => load_idempotency(&self.db, &idem.key)?,
            };
            if let Some(record) = earlier {
                if record.request_fingerprint.as_ref() != idem.fingerprint.as_slice() {
                    return Err(Error::IdempotencyConflict {
                        key: idem.key.clone(),
                    });
                }
                return Ok(CommitOutcome::Duplicate {
                    receipt: record.receipt.unwrap_or_default(),
                    response: record.response,
                });
            }
        }

        let count = txn.event_count() as u64;
        let published = txn.published_count() as u64;
        let backlog = self.outbox_backlog.load(Ordering::Acquire) + group.outbox_added;
        if backlog + published > self.limits.max_outbox_backlog {
            return Err(Error::OutboxFull {
                backlog,
                limit: self.limits.max_outbox_backlog,
            });
        }

        let Transaction {
            appends,
            idempotency,
            inbox: inbox_mark,
        } = txn;
        let mut ops: Vec<(&'static str, Vec<u8>, Vec<u8>)> =
            Vec::with_capacity(4 * count as usize + 2);
        let mut envelopes = Vec::with_capacity(count as usize);
        let mut streams = Vec::with_capacity(appends.len());
        let mut position = group.next_position;
        // The commit's published events as runs of consecutive positions:
        // one outbox entry per run rather than one per event.
        let mut outbox_runs: Vec<OutboxRun> = Vec::new();
        let recorded_at = crate::clock::now();
        for append in appends {
            let current = match group.stream_heads.get(&append.stream_id) {
                Some(&v) => v,
                None => match self.stream_heads.get(&append.stream_id) {
                    Some(v) => v,
                    None => load_stream_head(&self.db, &append.stream_id)?,
                },
            };
            if !append.expected.admits(current) {
                return Err(Error::WrongExpectedVersion {
                    stream: append.stream_id.clone(),
                    expected: append.expected,
                    current,
                });
            }
            let run = IndexRun {
                first_version: current + 1,
                first_position: position,
                count: append.events.len() as u64,
            };
            let index_key = stream_key(&append.stream_id, run.first_version);
            let index_value = seal(&index_key, &run.encode());
            ops.push((CF_STREAMS, index_key, index_value));
            let appended = append.events.len() as u64;
            for (offset, event) in append.events.into_iter().enumerate() {
                let version = current + 1 + offset as u64;
                let correlation_entry =
                    needs_correlation_entry(&append.stream_id, &event.correlation_id)
                        .then(|| correlation_key(&event.correlation_id, position));
                let envelope = EventEnvelope {
                    // Straight to hex, not through `Display`'s formatter.
                    event_id: event
                        .event_id
                        .hyphenated()
                        .encode_lower(&mut uuid::Uuid::encode_buffer())
                        .to_owned(),
                    stream_id: append.stream_id.clone(),
                    stream_version: version,
                    global_position: position,
                    recorded_at: Some(recorded_at),
                    causation_id: event.causation_id,
                    correlation_id: event.correlation_id,
                    actor: Some(event.actor),
                    event_type: event.event_type,
                    schema_version: event.schema_version,
                    payload: event.payload,
                    source: self.service.clone(),
                    trace_parent: event.trace_parent,
                };
                // Encoded once, stored three ways: by position (the log),
                // by stream (its copy) and, if its correlation is not its
                // stream's, by correlation.
                let body = envelope.encode_to_vec();
                let pos_key = position_key(position);
                ops.push((CF_EVENTS, pos_key.to_vec(), seal(&pos_key, &body)));
                let copy_key = stream_key(&append.stream_id, version);
                let copy = seal(&copy_key, &body);
                ops.push((CF_STREAM_EVENTS, copy_key, copy));
                if let Some(key) = correlation_entry {
                    let value = seal(&key, &body);
                    ops.push((CF_CORRELATIONS, key, value));
                }
                if event.publish {
                    match outbox_runs.last_mut() {
                        Some(run) if run.end() == position => run.count += 1,
                        _ => outbox_runs.push(OutboxRun {
                            first: position,
                            count: 1,
                        }),
                    }
                }
                envelopes.push(envelope);
                position += 1;
            }
            streams.push(StreamCommit {
                stream_id: append.stream_id,
                first_version: current + 1,
                last_version: current + appended,
            });
        }
        for run in outbox_runs {
            let (key, value) = run.entry();
            ops.push((CF_OUTBOX, key.to_vec(), value));
        }
        fail::fail_point!("eventlog::after_events", |_| Err(Error::Injected(
            "after_events"
        )));

        let mut view = ProjectionView::new(&self.db, &group.projections);
        for envelope in &envelopes {
            projection::apply(self.projector.as_ref(), envelope, &mut view)?;
        }
        let projection_writes = view.writes;
        fail::fail_point!("eventlog::after_projections", |_| Err(Error::Injected(
            "after_projections"
        )));

        let receipt = CommitReceipt {
            streams,
            first_position: if count > 0 { group.next_position } else { 0 },
            last_position: if count > 0 { position - 1 } else { 0 },
        };
        if let Some(key) = &inbox {
            let value = seal(key, &receipt.last_position.to_be_bytes());
            ops.push((CF_INBOX, key.clone(), value));
        }
        let consumer_position = match &inbox_mark {
            Some(mark) if mark.source_position > 0 => {
                let stored = match group.consumer_positions.get(&mark.consumer) {
                    Some(&p) => p,
                    None => load_consumer_position(&self.db, &mark.consumer)?,
                };
                let highest = stored.max(mark.source_position);
                let key = consumer_position_key(&mark.consumer);
                let value = seal(&key, &highest.to_be_bytes());
                ops.push((CF_META, key, value));
                Some((mark.consumer.clone(), highest))
            }
            _ => None,
        };
        let idempotency_record = idempotency.map(|idem| {
            let record = IdempotencyRecord {
                request_fingerprint: idem.fingerprint.to_vec().into(),
                receipt: Some(receipt.clone()),
                response: idem.response,
            };
            let key = idem.key.as_bytes().to_vec();
            let value = seal(&key, &record.encode_to_vec());
            ops.push((CF_IDEMPOTENCY, key, value));
            (idem.key, record)
        });
        fail::fail_point!("eventlog::after_marks", |_| Err(Error::Injected(
            "after_marks"
        )));

        // Everything checked: from here on nothing fails, so the group only
        // ever holds whole commits.
        for (column, key, value) in ops {
            group.batch.put_cf(cf(&self.db, column)?, key, value);
        }
        group.projections.extend(projection_writes);
        for stream in &receipt.streams {
            group
                .stream_heads
                .insert(stream.stream_id.clone(), stream.last_version);
        }
        if let Some(key) = inbox {
            group.inbox.insert(key);
        }
        if let Some((consumer, highest)) = consumer_position {
            group.consumer_positions.insert(consumer, highest);
        }
        if let Some((key, record)) = idempotency_record {
            group.idempotency.insert(key, record);
        }
        group.next_position = position;
        group.outbox_added += published;
        spent.push(envelopes);
        Ok(CommitOutcome::Committed(receipt))
    }

    /// Drops every projection and replays the whole log through the projector.
    /// Runs on the writer thread, so no commit interleaves. Returns the number
    /// of events replayed.
    ///
    /// Crash-safe in steps: the stored projection state first names no
    /// projector, so a log opened after a crash while projections are being
    /// cleared rebuilds them all again; once they are clear it names this
    /// projector with nothing applied, and every replayed page moves it on
    /// in the page's own write, so a crash while replaying resumes after the
    /// last page written, never applying an event twice.
    pub(crate) fn rebuild_projections(&mut self) -> Result<u64> {
        self.write_projection_state("", 0, 0)?;
        let projections = cf(&self.db, CF_PROJECTIONS)?;
        loop {
            let keys: Vec<Box<[u8]>> = self
                .db
                .iterator_cf(projections, rocksdb::IteratorMode::Start)
                .take(10_000)
                .map(|item| item.map(|(key, _)| key))
                .collect::<std::result::Result<_, _>>()?;
            if keys.is_empty() {
                break;
            }
            let mut batch = WriteBatch::default();
            for key in keys {
                batch.delete_cf(projections, key);
            }
            self.store.write(batch, false)?;
        }
        fail::fail_point!("eventlog::rebuild_after_clear", |_| Err(Error::Injected(
            "rebuild_after_clear"
        )));
        self.write_projection_state(self.projector.name(), self.projector.version(), 0)?;
        self.replay_projections_from(1)
    }

    /// Applies the projector to every event from `from` to the head, a page
    /// per write, each write also recording the page's last position as
    /// applied.
    pub(crate) fn replay_projections_from(&mut self, from: u64) -> Result<u64> {
        let mut next = from;
        let mut replayed = 0;
        while next <= self.head {
            let page = read_events_from(
                &self.db,
                next,
                self.head,
                self.limits.max_read_page,
                &AllFilter::default(),
                &self.limits,
            )?
            .events;
            let Some(last) = page.last().map(|e| e.global_position) else {
                break;
            };
            let empty = Overlay::new();
            let mut view = ProjectionView::new(&self.db, &empty);
            for event in &page {
                projection::apply(self.projector.as_ref(), event, &mut view)?;
            }
            let mut batch = WriteBatch::default();
            write_overlay(&self.db, &mut batch, &view.writes)?;
            self.put_projection_state(
                &mut batch,
                self.projector.name(),
                self.projector.version(),
                last,
            )?;
            self.store.write(batch, false)?;
            replayed += page.len() as u64;
            next = last + 1;
            fail::fail_point!("eventlog::replay_after_page", |_| Err(Error::Injected(
                "replay_after_page"
            )));
        }
        self.write_projection_state(self.projector.name(), self.projector.version(), self.head)?;
        Ok(replayed)
    }

    /// Records, fsynced, which projector the stored projections are of and
    /// the last position applied to them.
    fn write_projection_state(
        &self,
        projector: &str,
        version: u32,
        applied_through: u64,
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        self.put_projection_state(&mut batch, projector, version, applied_through)?;
        self.write_batch(batch)
    }

    fn put_projection_state(
        &self,
        batch: &mut WriteBatch,
        projector: &str,
        version: u32,
        applied_through: u64,
    ) -> Result<()> {
        let state = ProjectionState {
            projector: projector.to_owned(),
            version,
            applied_through,
        };
        batch.put_cf(
            cf(&self.db, CF_META)?,
            META_PROJECTION_STATE,
            seal(META_PROJECTION_STATE, &state.encode_to_vec()),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_heads_stay_bounded_and_keep_the_recent_ones() {
        let mut heads = StreamHeads::new(4);
        for round in 1..=3u64 {
            for stream in 0..10 {
                heads.record(format!("s{stream}"), round * 100 + stream);
                assert!(heads.newer.len() + heads.older.len() <= 4, "bounded");
                assert_eq!(heads.get(&format!("s{stream}")), Some(round * 100 + stream));
            }
        }
        // The last half-limit streams written are always found, with their
        // latest heads; older ones may be gone, never wrong.
        assert_eq!(heads.get("s9"), Some(309));
        assert_eq!(heads.get("s8"), Some(308));
        for stream in 0..10 {
            if let Some(v) = heads.get(&format!("s{stream}")) {
                assert_eq!(v, 300 + stream, "s{stream}");
            }
        }
        // Writing a stream the newer generation holds never drops a generation.
        let mut heads = StreamHeads::new(4);
        heads.record("a".into(), 1);
        heads.record("b".into(), 1);
        heads.record("b".into(), 2);
        assert_eq!((heads.get("a"), heads.get("b")), (Some(1), Some(2)));
    }
}
