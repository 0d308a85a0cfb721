//! The log's replicated copy: every write, before it is applied, is held
//! by a copy on other machines, so losing this machine's disk loses
//! nothing (issue: a lost disk).
//!
//! # Design: the copy leads, the disk follows
//!
//! A service's RocksDB is one disk. With a [`CopyTarget`] configured
//! (`bus::copy`: a JetStream stream kept without limits on three nodes),
//! every RocksDB write batch the log makes — a group of commits, a page of
//! a projection rebuild, an outbox clear, a consumer's mark — is first
//! appended to the copy as one *record* and only then written locally. The
//! batch itself carries, in [`META_COPY_THROUGH`], the copy sequence of its
//! record, so the local store always knows exactly which records it holds:
//!
//! - a crash after the copy took a record but before the local write is
//!   healed at the next open: the records after the local mark are applied
//!   from the copy ([`sync_with_copy`]);
//! - a lost disk is the same case from zero: an empty data directory is
//!   rebuilt by applying the copy from its first record (a snapshot of the
//!   whole store, then every batch since), column families created in the
//!   copy's order so the batches' column family ids mean the same;
//! - a copy that is empty (first start with copying on, or a copy stream an
//!   operator deleted) is started with a snapshot of the local store.
//!
//! Records are RocksDB's own batch encoding (`WriteBatch::data`), so what
//! the copy holds is byte for byte what the disk holds: events, indexes,
//! outbox, inbox marks, idempotency records, projections. A copy of the
//! events alone would lose the idempotency records (a retried call would
//! make a second ticket) and the unpublished records (parked events).
//!
//! What a failover costs: nothing committed (a commit is answered only
//! after the copy holds it); the time to read the copy back, measured in
//! the README. What copying costs: one replicated append per RocksDB
//! write, on the commit's path.
//!
//! Only one process may write a copy: every append names the sequence it
//! expects to follow, so a second writer (two instances given the same
//! data) is refused and the log stops writing ([`Error::Copy`]) rather than
//! interleave.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use rocksdb::{DB, WriteBatch, WriteBatchIteratorCf, WriteOptions};

use crate::codec::{ALL_COLUMN_FAMILIES, CF_META, seal, unseal};
use crate::error::{Error, Result};
use crate::log::cf;

/// Key in [`CF_META`] of the copy sequence of the last record this store
/// holds (the first sequence of that record when it spans several parts).
pub const META_COPY_THROUGH: &[u8] = b"\0lineguard-copy-through";
/// Key in [`CF_META`] set by the last batch of a completed snapshot: a copy
/// read back without it was cut short and is refused.
pub const META_COPY_SNAPSHOT_COMPLETE: &[u8] = b"\0lineguard-copy-snapshot-complete";

/// A snapshot's batches stay under this size (JetStream messages are
/// bounded; the target splits bigger records into parts anyway).
const SNAPSHOT_BATCH_BYTES: usize = 256 * 1024;

/// What one record of the copy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyRecord {
    /// The beginning of a snapshot: the column families of the store that
    /// wrote it, in column family id order (names separated by `\n`), so a
    /// store rebuilt from the copy numbers them the same.
    SnapshotStarted { column_families: Vec<String> },
    /// One RocksDB write batch (`WriteBatch::data`).
    Write(Vec<u8>),
}

/// The bounds of a copy: sequences of its first and last message, 0 when
/// it holds none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyBounds {
    /// Sequence of the first message kept.
    pub first: u64,
    /// Sequence of the last message (kept or not).
    pub last: u64,
    /// Messages kept.
    pub messages: u64,
    /// Bytes the kept messages take in the copy.
    pub bytes: u64,
}

/// A replicated, append-only place the log's writes are copied to. The
/// calls block: the log calls them from its own threads.
pub trait CopyTarget: Send + Sync + 'static {
    /// What the copy holds now.
    fn bounds(&self) -> Result<CopyBounds>;
    /// Appends `record` right after sequence `expected_last` and returns
    /// once the copy holds it durably: the sequence of its first message and
    /// of its last. Transient failures (the copy unreachable) are retried
    /// inside; an error means the copy refuses the record for good (another
    /// writer appended after `expected_last`).
    fn append(&self, expected_last: u64, record: &CopyRecord) -> Result<(u64, u64)>;
    /// Drops every message before `sequence` (the start of a whole
    /// snapshot), for good.
    fn purge_before(&self, sequence: u64) -> Result<()>;
    /// Reads every record whose first message is at or after `from`, in
    /// order, through the last message, calling `apply` with each record's
    /// first sequence, until `apply` breaks.
    fn read_from(
        &self,
        from: u64,
        apply: &mut dyn FnMut(u64, CopyRecord) -> Result<ControlFlow<()>>,
    ) -> Result<()>;
}

/// Where the copy stands, under one lock: appends are serialised so that
/// records are applied locally in copy order.
struct Cursor {
    /// The copy's last sequence (what the next append expects).
    last_sequence: u64,
    /// Set when a record reached the copy but not the disk: the store is
    /// behind its copy and takes no more writes until it is reopened.
    stalled: Option<String>,
}

/// Every write to a log's RocksDB goes through here: straight to the disk,
/// or to the copy first when there is one.
pub(crate) struct Store {
    db: Arc<DB>,
    copy: Option<(Arc<dyn CopyTarget>, Mutex<Cursor>)>,
}

impl Store {
    /// A store whose writes are not copied.
    pub(crate) fn uncopied(db: Arc<DB>) -> Store {
        Store { db, copy: None }
    }

    /// A store copied to `target`, whose last sequence is `last_sequence`
    /// (after [`sync_with_copy`]).
    pub(crate) fn copied(db: Arc<DB>, target: Arc<dyn CopyTarget>, last_sequence: u64) -> Store {
        Store {
            db,
            copy: Some((
                target,
                Mutex::new(Cursor {
                    last_sequence,
                    stalled: None,
                }),
            )),
        }
    }

    /// Writes `batch`, fsynced if `sync`; with a copy, only after the copy
    /// holds it. Blocks for the copy's append: call it off the async
    /// runtime's workers (the writer thread, `spawn_blocking`).
    pub(crate) fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        let Some((target, cursor)) = &self.copy else {
            self.db.write_opt(batch, &options)?;
            return Ok(());
        };
        if batch.is_empty() {
            return Ok(());
        }
        // The copy's append needs the async runtime's workers free to drive
        // its I/O: a worker that waits here, for the lock or the append,
        // first hands its other tasks to another thread. (Callers on a
        // worker are a mistake this survives; they belong in
        // `spawn_blocking`.)
        let on_worker = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
            runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        });
        if on_worker {
            tokio::task::block_in_place(|| self.write_copied(target.as_ref(), cursor, batch, sync))
        } else {
            self.write_copied(target.as_ref(), cursor, batch, sync)
        }
    }

    fn write_copied(
        &self,
        target: &dyn CopyTarget,
        cursor: &Mutex<Cursor>,
        batch: WriteBatch,
        sync: bool,
    ) -> Result<()> {
        let mut cursor = cursor.lock().map_err(|_| Error::Closed)?;
        if let Some(reason) = &cursor.stalled {
            return Err(Error::Copy(reason.clone()));
        }
        match copy_then_write(&self.db, target, cursor.last_sequence, batch, sync) {
            Ok(last) => {
                cursor.last_sequence = last;
                Ok(())
            }
            Err(CopiedWrite::NotCopied(e)) => {
                // Where the copy ends is not certain after a refused append
                // (it may hold a record this disk does not): no write may
                // follow until the log is reopened and follows the copy.
                let reason = format!("{e}; the log takes no more writes until it is reopened");
                tracing::error!(%reason, "the log's copy refused a write");
                cursor.stalled = Some(reason);
                Err(e)
            }
            Err(CopiedWrite::NotWritten(reason)) => {
                tracing::error!(%reason, "a copied write did not reach the store; the log takes no more writes");
                cursor.stalled = Some(reason.clone());
                Err(Error::Copy(reason))
            }
        }
    }
}

/// When the copy is started again from a snapshot ([`Store::compact_copy`]).
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// Never below this many bytes of copy.
    pub min_copy_bytes: u64,
    /// Only once the copy holds this many times the store's live data.
    pub copy_to_store_ratio: u64,
}

impl Default for CompactionPolicy {
    /// At 1 GiB and four times the store: a snapshot costs one store's
    /// worth of appends and stalls writes while it is made, so it is rare.
    fn default() -> Self {
        CompactionPolicy {
            min_copy_bytes: 1 << 30,
            copy_to_store_ratio: 4,
        }
    }
}

/// What a compaction of the copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyCompacted {
    /// Bytes of copy before.
    pub bytes_before: u64,
    /// The sequence the copy now starts at (its new snapshot).
    pub first_sequence: u64,
}

impl Store {
    /// Starts the copy again from a snapshot of the store and drops what
    /// came before it, when `policy` says the copy has grown long enough:
    /// kept as it is, a copy grows with every write for as long as the
    /// service runs. Writes wait while the snapshot is made (the cursor is
    /// held: a write interleaved with the snapshot's batches would be
    /// overwritten by them when the copy is read back). `None`: not due,
    /// or no copy.
    pub(crate) fn compact_copy(
        &self,
        policy: CompactionPolicy,
        store_bytes: u64,
    ) -> Result<Option<CopyCompacted>> {
        let Some((target, cursor)) = &self.copy else {
            return Ok(None);
        };
        let bounds = target.bounds()?;
        let due = bounds.bytes >= policy.min_copy_bytes
            && bounds.bytes >= store_bytes.saturating_mul(policy.copy_to_store_ratio);
        if !due {
            return Ok(None);
        }
        let mut cursor = cursor.lock().map_err(|_| Error::Closed)?;
        if let Some(reason) = &cursor.stalled {
            return Err(Error::Copy(reason.clone()));
        }
        let (first, last) = ship_snapshot(
            &self.db,
            target.as_ref(),
            cursor.last_sequence,
            SnapshotFor::Compacting,
        )
        .inspect_err(|_| {
            // Where the copy ends is not known any more: follow it again.
            cursor.stalled =
                Some("a compaction of the copy failed part way: reopen the log".into());
        })?;
        cursor.last_sequence = last;
        drop(cursor);
        target.purge_before(first)?;
        Ok(Some(CopyCompacted {
            bytes_before: bounds.bytes,
            first_sequence: first,
        }))
    }
}

/// How a copied write failed.
enum CopiedWrite {
    /// The copy refused it: nothing was written anywhere.
    NotCopied(Error),
    /// The copy holds it but the store does not (or the copy put it out of
    /// place): the store is behind its copy until it is reopened.
    NotWritten(String),
}

/// Appends `batch`, marked with its record's sequence, to the copy right
/// after `last`, then writes it to `db`. Returns the copy's new last
/// sequence.
fn copy_then_write(
    db: &DB,
    target: &dyn CopyTarget,
    last: u64,
    mut batch: WriteBatch,
    sync: bool,
) -> std::result::Result<u64, CopiedWrite> {
    let first = last + 1;
    let meta = cf(db, CF_META).map_err(CopiedWrite::NotCopied)?;
    batch.put_cf(
        meta,
        META_COPY_THROUGH,
        seal(META_COPY_THROUGH, &first.to_be_bytes()),
    );
    let record = CopyRecord::Write(batch.data().to_vec());
    let (copied_first, copied_last) = target
        .append(last, &record)
        .map_err(CopiedWrite::NotCopied)?;
    if copied_first != first {
        // The batch names `first`; a record put elsewhere would be read
        // back as if it were not held.
        return Err(CopiedWrite::NotWritten(format!(
            "the copy put record {first} at {copied_first}: reopen the log to follow the copy"
        )));
    }
    let mut options = WriteOptions::default();
    options.set_sync(sync);
    db.write_opt(batch, &options).map_err(|e| {
        CopiedWrite::NotWritten(format!(
            "record {first} is in the copy but its local write failed ({e}): \
             reopen the log to apply it from the copy"
        ))
    })?;
    Ok(copied_last)
}

/// The column families of `db`, in id order: found by putting one key in
/// each into a batch that is never written and reading back the ids
/// RocksDB encoded.
pub(crate) fn column_family_order(db: &DB) -> Result<Vec<String>> {
    struct Ids(Vec<(u32, String)>);
    impl WriteBatchIteratorCf for Ids {
        fn put_cf(&mut self, cf_id: u32, key: &[u8], _value: &[u8]) {
            self.0
                .push((cf_id, String::from_utf8_lossy(key).into_owned()));
        }
        fn delete_cf(&mut self, _cf_id: u32, _key: &[u8]) {}
        fn merge_cf(&mut self, _cf_id: u32, _key: &[u8], _value: &[u8]) {}
    }
    let mut probe = WriteBatch::default();
    for name in ALL_COLUMN_FAMILIES {
        probe.put_cf(cf(db, name)?, name.as_bytes(), b"");
    }
    let mut ids = Ids(Vec::new());
    probe.iterate_cf(&mut ids);
    ids.0.sort();
    // "default" is always id 0 and holds nothing of the log's.
    Ok(std::iter::once("default".to_string())
        .chain(ids.0.into_iter().map(|(_, name)| name))
        .collect())
}

/// The sequence through which `db` holds the copy (0: none).
pub(crate) fn copied_through(db: &DB) -> Result<u64> {
    meta_u64(db, META_COPY_THROUGH)
}

fn meta_u64(db: &DB, key: &'static [u8]) -> Result<u64> {
    let Some(value) = db.get_pinned_cf(cf(db, CF_META)?, key)? else {
        return Ok(0);
    };
    let body = unseal(CF_META, key, &value, || {
        String::from_utf8_lossy(key).into_owned()
    })?;
    let bytes: [u8; 8] = body.try_into().map_err(|_| Error::Corrupted {
        column: CF_META,
        location: String::from_utf8_lossy(key).into_owned(),
        reason: "not a big-endian u64".into(),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// The column family order a store rebuilt from `target` must have: the
/// first record's, when the copy holds anything. `None`: the copy is
/// empty (or was emptied), there is nothing to rebuild from.
pub(crate) fn copied_column_families(target: &dyn CopyTarget) -> Result<Option<Vec<String>>> {
    let bounds = target.bounds()?;
    if bounds.messages == 0 {
        return Ok(None);
    }
    let mut order = None;
    target.read_from(bounds.first, &mut |_, record| {
        if let CopyRecord::SnapshotStarted { column_families } = record {
            order = Some(column_families);
        }
        // Only the first record matters.
        Ok(ControlFlow::Break(()))
    })?;
    match order {
        Some(order) => Ok(Some(order)),
        None => Err(Error::Copy(format!(
            "the copy's first record ({}) is not a snapshot: it cannot rebuild a store",
            bounds.first
        ))),
    }
}

/// Brings `db` and its copy together at open, before anything else writes:
/// applies the records the copy holds past the store's mark (everything,
/// for a store rebuilt from nothing), or starts the copy with a snapshot
/// when it is empty. Returns the copy's last sequence and how many records
/// were applied.
pub(crate) fn sync_with_copy(db: &DB, target: &dyn CopyTarget) -> Result<(u64, u64)> {
    let bounds = target.bounds()?;
    let through = copied_through(db)?;
    let store_empty = store_is_empty(db)?;
    if bounds.messages == 0 {
        // Nothing to follow: this store starts the copy.
        if through > 0 {
            tracing::warn!(
                through,
                copy_last = bounds.last,
                "the copy holds nothing of what this store copied before (a new copy stream?): starting it again with a snapshot"
            );
        }
        let (_, last) = ship_snapshot(db, target, bounds.last, SnapshotFor::Starting)?;
        return Ok((last, 0));
    }
    if through == 0 && !store_empty {
        return Err(Error::Copy(format!(
            "the copy (sequences {}..={}) was written by another store and this store was never copied: \
             refusing to mix them (empty the data directory to rebuild from the copy, or delete the copy stream to copy this store)",
            bounds.first, bounds.last
        )));
    }
    if through > bounds.last {
        return Err(Error::Copy(format!(
            "this store holds the copy through {through} but the copy ends at {}: \
             the copy stream was replaced; delete it to copy this store again",
            bounds.last
        )));
    }
    if through > 0 && through < bounds.first {
        return Err(Error::Copy(format!(
            "this store holds the copy through {through} but the copy now starts at {} \
             (it was compacted since this disk was last written): empty the data directory \
             to rebuild it from the copy",
            bounds.first
        )));
    }
    let from = if through == 0 { bounds.first } else { through };
    let mut applied = 0u64;
    let started = std::time::Instant::now();
    let order = column_family_order(db)?;
    target.read_from(from, &mut |sequence, record| {
        if sequence <= through {
            return Ok(ControlFlow::Continue(())); // the store's own last record
        }
        match record {
            CopyRecord::SnapshotStarted { column_families } => {
                if column_families != order {
                    return Err(Error::Copy(format!(
                        "the copy's column families {column_families:?} are numbered unlike this store's {order:?}"
                    )));
                }
            }
            CopyRecord::Write(data) => {
                let mut options = WriteOptions::default();
                options.set_sync(false);
                db.write_opt(WriteBatch::from_data(&data), &options)?;
                applied += 1;
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    db.flush_wal(true)?;
    if through == 0 && meta_u64(db, META_COPY_SNAPSHOT_COMPLETE)? == 0 {
        return Err(Error::Copy(
            "the copy's snapshot was cut short (its writer stopped while making it): \
             it cannot rebuild a store"
                .into(),
        ));
    }
    if applied > 0 {
        tracing::info!(
            records = applied,
            from,
            through = bounds.last,
            seconds = started.elapsed().as_secs_f64(),
            rebuilt = through == 0,
            "applied the log's copy to the store"
        );
    }
    if meta_u64(db, META_COPY_SNAPSHOT_COMPLETE)? == 0 {
        // A snapshot this store began was cut short: make a whole one.
        let (_, last) = ship_snapshot(db, target, bounds.last, SnapshotFor::Starting)?;
        return Ok((last, applied));
    }
    Ok((bounds.last, applied))
}

fn store_is_empty(db: &DB) -> Result<bool> {
    for name in ALL_COLUMN_FAMILIES {
        let mut iter = db.raw_iterator_cf(cf(db, name)?);
        iter.seek_to_first();
        if iter.valid() {
            return Ok(false);
        }
        iter.status()?;
    }
    Ok(true)
}

/// Why a snapshot is shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotFor {
    /// The copy holds nothing usable: the snapshot is its beginning, and
    /// until it is whole the copy cannot rebuild a store.
    Starting,
    /// The copy is whole and grew long: the snapshot will replace what came
    /// before it. Cut short, it only adds puts of what is there.
    Compacting,
}

/// Appends a snapshot of the whole store after `last`: a
/// [`CopyRecord::SnapshotStarted`], then every key of every column family
/// in batches, each also applied locally (they put what is there, plus the
/// copy mark), the last one marking the snapshot complete. No other write
/// may interleave (at open nothing else writes; a compaction holds the
/// cursor). Returns the sequence the snapshot starts at and the copy's new
/// last sequence.
fn ship_snapshot(
    db: &DB,
    target: &dyn CopyTarget,
    last: u64,
    purpose: SnapshotFor,
) -> Result<(u64, u64)> {
    let started = std::time::Instant::now();
    let (snapshot_first, mut last) = target.append(
        last,
        &CopyRecord::SnapshotStarted {
            column_families: column_family_order(db)?,
        },
    )?;
    let snapshot = db.snapshot();
    let mut batch = WriteBatch::default();
    if purpose == SnapshotFor::Starting {
        // Until this snapshot is whole, neither the disk nor the copy may
        // say a snapshot is complete (a crash part way makes a new one at
        // the next open).
        batch.delete_cf(cf(db, CF_META)?, META_COPY_SNAPSHOT_COMPLETE);
    }
    let mut keys = 0u64;
    for name in ALL_COLUMN_FAMILIES {
        let family = cf(db, name)?;
        let mut iter = snapshot.raw_iterator_cf(family);
        iter.seek_to_first();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if !(name == CF_META && key == META_COPY_SNAPSHOT_COMPLETE) {
                batch.put_cf(family, key, value);
                keys += 1;
            }
            if batch.size_in_bytes() >= SNAPSHOT_BATCH_BYTES {
                last = snapshot_write(db, target, last, std::mem::take(&mut batch))?;
            }
            iter.next();
        }
        iter.status()?;
    }
    batch.put_cf(
        cf(db, CF_META)?,
        META_COPY_SNAPSHOT_COMPLETE,
        seal(META_COPY_SNAPSHOT_COMPLETE, &last.to_be_bytes()),
    );
    last = snapshot_write(db, target, last, batch)?;
    db.flush_wal(true)?;
    tracing::info!(
        keys,
        snapshot_first,
        copy_last = last,
        seconds = started.elapsed().as_secs_f64(),
        ?purpose,
        "a snapshot of the store was copied"
    );
    Ok((snapshot_first, last))
}

/// One batch of a snapshot: copied, then written (unsynced: the snapshot
/// ends with a WAL flush).
fn snapshot_write(db: &DB, target: &dyn CopyTarget, last: u64, batch: WriteBatch) -> Result<u64> {
    copy_then_write(db, target, last, batch, false).map_err(|e| match e {
        CopiedWrite::NotCopied(e) => e,
        CopiedWrite::NotWritten(reason) => Error::Copy(reason),
    })
}
