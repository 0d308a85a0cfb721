//! Event log throughput beside raw RocksDB doing the same writes and reads
//! with the same durability (every write fsynced) and the same options.
//!
//! Run: `cargo bench --workspace --bench eventlog`
//! Scale with `LINEGUARD_BENCH_SCALE` (default 1). Each case runs nine
//! rounds, log and raw interleaved (a single round of either side varies by
//! 20-30% on a shared 2-core machine), and prints the median events/s of
//! each side, their ratio and the range of the rounds' ratios. Both sides
//! write values built before the clock starts, each event its own
//! allocation. Targets: append >= 0.7x raw, read >= 0.5x raw.
//!
//! Name words to run only the cases whose names contain one of them, e.g.
//! `cargo bench --workspace --bench eventlog -- batches` (for profiling one
//! case); the read cases read what the append cases that ran wrote.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use lineguard_eventlog::codec::{
    CF_CORRELATIONS, CF_EVENTS, CF_META, CF_OUTBOX, CF_STREAM_EVENTS, CF_STREAMS, IndexRun,
    META_PROJECTION_STATE, OutboxRun, position_key, seal, stream_key,
};
use lineguard_eventlog::{
    ActorKind, EventLog, EventTypes, ExpectedVersion, LogConfig, NewEvent, ReadDirection,
    Transaction, actor, open_raw_store,
};
use rocksdb::{WriteBatch, WriteOptions};

const EVENT_TYPE: &str = "lineguard.bench.v1.Happened";
const PAYLOAD_BYTES: usize = 300;

fn event(stream: &str) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: EVENT_TYPE.into(),
        schema_version: 1,
        payload: Bytes::from(vec![b'x'; PAYLOAD_BYTES]),
        correlation_id: stream.into(),
        causation_id: String::new(),
        actor: actor(ActorKind::System, "bench"),
        publish: true,
        trace_parent: String::new(),
    }
}

fn open_log(dir: &std::path::Path) -> EventLog {
    // Nothing drains the outbox here; let it grow.
    let limits = lineguard_eventlog::Limits {
        max_outbox_backlog: u64::MAX / 2,
        ..lineguard_eventlog::Limits::default()
    };
    EventLog::open(
        LogConfig::new(dir.join("log"), "bench")
            .with_event_types(EventTypes::new().with_name(EVENT_TYPE, 1))
            .with_limits(limits),
    )
    .expect("open log")
}

/// A raw store with the log's options, written like the log writes events.
struct Raw {
    db: rocksdb::DB,
}

/// Bytes of one raw value: about a stored envelope of one bench event.
const RAW_VALUE_BYTES: usize = PAYLOAD_BYTES + 150;

impl Raw {
    fn open(dir: &std::path::Path) -> Raw {
        Raw {
            db: open_raw_store(&dir.join("raw")).expect("raw"),
        }
    }

    /// `count` values, each its own allocation: made before the clock starts,
    /// like the log's events, and like them not all one buffer in cache.
    fn values(count: u64) -> Vec<Vec<u8>> {
        (0..count).map(|_| vec![b'x'; RAW_VALUE_BYTES]).collect()
    }

    /// Writes `values` at consecutive positions from `first` in one batch,
    /// fsynced, with the other records the log writes for a commit of one
    /// stream: each event's copy keyed by stream and version, its stream
    /// index entry, its outbox entry (the events are published) and the
    /// projections' state. What the log does besides,
    /// and raw does not: it reads the stream's head (from its cache, here),
    /// checks the expected version, seals each record with a checksum and
    /// encodes the envelope (raw writes prepared bytes of about its size).
    fn write(&self, first: u64, values: &[Vec<u8>]) {
        let column = |name| self.db.cf_handle(name).expect("cf");
        let mut batch = WriteBatch::default();
        let stream = format!("raw-{first}");
        for ((p, value), version) in (first..).zip(values).zip(1u64..) {
            batch.put_cf(column(CF_EVENTS), position_key(p), value);
            batch.put_cf(
                column(CF_STREAM_EVENTS),
                stream_key(&stream, version),
                value,
            );
        }
        let index_key = stream_key(&stream, 1);
        let run = IndexRun {
            first_version: 1,
            first_position: first,
            count: values.len() as u64,
        };
        batch.put_cf(
            column(CF_STREAMS),
            &index_key,
            seal(&index_key, &run.encode()),
        );
        let (outbox_key, outbox_value) = OutboxRun {
            first,
            count: values.len() as u64,
        }
        .entry();
        batch.put_cf(column(CF_OUTBOX), outbox_key, outbox_value);
        batch.put_cf(
            column(CF_META),
            META_PROJECTION_STATE,
            seal(META_PROJECTION_STATE, &[0u8; 24]),
        );
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options).expect("raw write");
    }

    /// Copies the records of `column` under `id`'s prefix (a stream's
    /// copies, a correlation's entries) from the log's store at `log_path`
    /// into the same column under the same keys: raw then scans exactly the
    /// bytes the log reads (checksum and envelope included), which LZ4
    /// compresses as it does the log's, not prepared filler. The read
    /// cases' set-up, not timed. How many.
    fn copy_records(&self, log_path: &std::path::Path, column: &str, id: &str) -> u64 {
        let log = open_raw_store(log_path).expect("the log's store");
        let prefix = id_prefix(id);
        let from = log.cf_handle(column).expect("cf");
        let to = self.db.cf_handle(column).expect("cf");
        let mut iter = log.raw_iterator_cf(from);
        iter.seek(&prefix);
        let (mut batch, mut copied) = (WriteBatch::default(), 0u64);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if !key.starts_with(&prefix) {
                break;
            }
            batch.put_cf(to, key, value);
            copied += 1;
            iter.next();
        }
        iter.status().expect("copy scan");
        self.db.write(batch).expect("raw write");
        copied
    }

    /// Reads every record of `column` under `id`'s prefix by a prefix
    /// scan, in pages of 1,000 as the log reads, and hands them out as the
    /// least a reader that returns records must: each page's values copied
    /// into one buffer (the log's in-place read does the same, then checks
    /// them). With `copy` false it only adds up their lengths: no record
    /// leaves RocksDB's block cache, the bound no reader reaches. How many.
    fn scan(&self, column: &str, id: &str, copy: bool) -> usize {
        let cf = self.db.cf_handle(column).expect("cf");
        let prefix = id_prefix(id);
        let mut iter = self.db.raw_iterator_cf(cf);
        iter.seek(&prefix);
        let (mut seen, mut bytes) = (0usize, 0usize);
        let mut page: Vec<u8> = Vec::new();
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::with_capacity(1_000);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if !key.starts_with(&prefix) {
                break;
            }
            if copy {
                let start = page.len();
                page.extend_from_slice(value);
                ranges.push(start..page.len());
                if ranges.len() == 1_000 {
                    bytes += std::hint::black_box(&page).len();
                    page = Vec::new();
                    ranges.clear();
                }
            } else {
                bytes += value.len();
            }
            seen += 1;
            iter.next();
        }
        iter.status().expect("raw scan");
        bytes += std::hint::black_box(&page).len();
        assert!(bytes >= seen * PAYLOAD_BYTES);
        seen
    }
}

/// The key prefix of a stream's copies or a correlation's entries.
fn id_prefix(id: &str) -> Vec<u8> {
    let key = stream_key(id, 0);
    key[..key.len() - 8].to_vec()
}

/// One case's timings, a pair (log, raw) per round.
struct Case {
    name: &'static str,
    /// Events per round.
    events: u64,
    rounds: Vec<(f64, f64)>,
    target: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn report(case: &Case) {
    let log_rate = median(
        case.rounds
            .iter()
            .map(|(log, _)| case.events as f64 / log)
            .collect(),
    );
    let raw_rate = median(
        case.rounds
            .iter()
            .map(|(_, raw)| case.events as f64 / raw)
            .collect(),
    );
    let ratios: Vec<f64> = case.rounds.iter().map(|(log, raw)| raw / log).collect();
    let (low, high) = ratios
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let ratio = log_rate / raw_rate;
    let verdict = match case.target {
        t if t <= 0.0 => "for comparison".to_string(),
        t if ratio >= t => format!("target {t:.1}x: met"),
        t => format!("target {t:.1}x: MISSED"),
    };
    println!(
        "{:<32} {:>9} events  log {:>10.0} ev/s  raw {:>10.0} ev/s  ratio {:>5.2}x [{low:.2}-{high:.2}]  ({verdict})",
        case.name, case.events, log_rate, raw_rate, ratio,
    );
}

fn timed(work: impl FnOnce()) -> f64 {
    let start = Instant::now();
    work();
    start.elapsed().as_secs_f64()
}

/// Times committing `txns` one after another on this thread.
fn time_commits(log: &EventLog, txns: Vec<Transaction>) -> f64 {
    timed(|| {
        for txn in txns {
            log.commit_blocking(txn).expect("commit");
        }
    })
}

/// Times raw writes of `events` values, `per_commit` to a batch, at the
/// positions from `next` on (which it advances); the values are made before
/// the clock starts.
fn time_raw_commits(raw: &Raw, next: &std::cell::Cell<u64>, events: u64, per_commit: usize) -> f64 {
    let values = Raw::values(events);
    timed(|| {
        for batch in values.chunks(per_commit) {
            raw.write(next.get(), batch);
            next.set(next.get() + batch.len() as u64);
        }
    })
}

/// Runs `log` and `raw` for `rounds` rounds, alternating which goes first
/// so that neither always follows the other's background flushes.
fn rounds(
    rounds: usize,
    mut log: impl FnMut() -> f64,
    mut raw: impl FnMut() -> f64,
) -> Vec<(f64, f64)> {
    (0..rounds)
        .map(|round| {
            if round % 2 == 0 {
                let l = log();
                (l, raw())
            } else {
                let r = raw();
                (log(), r)
            }
        })
        .collect()
}

/// Times reading positions 1..=`head` in pages; `page(from)` reads one and
/// returns how many events it held and the last one's position.
fn read_whole_log(head: u64, mut page: impl FnMut(u64) -> (usize, Option<u64>)) -> f64 {
    timed(|| {
        let mut next = 1;
        let mut seen = 0u64;
        while next <= head {
            let (count, last) = page(next);
            seen += count as u64;
            next = last.map_or(head + 1, |p| p + 1);
        }
        assert_eq!(seen, head);
    })
}

/// Rounds per case; each case reports the median rate of each side.
const ROUNDS: usize = 9;

fn single_txns(n: u64, round: usize) -> Vec<Transaction> {
    (0..n)
        .map(|i| {
            let stream = format!("ticket-r{round}-s{}", i % 1000);
            Transaction::append(&stream, ExpectedVersion::Any, vec![event(&stream)])
        })
        .collect()
}

/// Whether the case `name` was asked for: every case when the command line
/// names none, else those containing one of the words it names.
fn wanted(name: &str) -> bool {
    // `cargo bench` passes `--bench` itself; flags are not case names.
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    words.is_empty() || words.iter().any(|word| name.contains(word.as_str()))
}

fn main() {
    let scale: u64 = std::env::var("LINEGUARD_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path());
    let raw = Raw::open(dir.path());
    let next_raw = std::cell::Cell::new(1u64);
    println!(
        "event log vs raw RocksDB, every write fsynced, {PAYLOAD_BYTES}-byte payloads, scale {scale}, \
         median of {ROUNDS} interleaved rounds [lowest-highest round ratio]"
    );

    // Every transaction is built before its clock starts, and so is every
    // raw value: both sides are timed on writing alone.

    // 1. One event per commit, one writer.
    let raw = Arc::new(raw);
    let name = "append, single";
    if wanted(name) {
        let n = 1_000 * scale;
        let mut round = 0;
        let timings = rounds(
            ROUNDS,
            || {
                round += 1;
                time_commits(&log, single_txns(n, round))
            },
            || time_raw_commits(&raw, &next_raw, n, 1),
        );
        report(&Case {
            name,
            events: n,
            rounds: timings,
            target: 0.7,
        });
    }

    // 2. 100 events per commit, one writer.
    let name = "append, batches of 100";
    if wanted(name) {
        // 200 commits a round (about a tenth of a second here): rounds of
        // 100 varied by more than the overhead being measured.
        let batches = 200 * scale;
        let mut round = 0;
        let timings = rounds(
            ROUNDS,
            || {
                round += 1;
                let txns: Vec<Transaction> = (0..batches)
                    .map(|i| {
                        let stream = format!("incident-r{round}-b{i}");
                        let events = (0..100).map(|_| event(&stream)).collect();
                        Transaction::append(&stream, ExpectedVersion::Any, events)
                    })
                    .collect();
                time_commits(&log, txns)
            },
            || time_raw_commits(&raw, &next_raw, batches * 100, 100),
        );
        report(&Case {
            name,
            events: batches * 100,
            rounds: timings,
            target: 0.7,
        });
    }

    // 3. 64 concurrent writers, one event per commit each.
    let writers = 64u64;
    let per_writer = 100 * scale;
    let name = "append, 64 concurrent writers";
    if wanted(name) {
        let mut round = 0;
        let timings = rounds(
            ROUNDS,
            || {
                round += 1;
                let prepared: Vec<Vec<Transaction>> = (0..writers)
                    .map(|w| {
                        let stream = format!("crew-r{round}-{w}");
                        (0..per_writer)
                            .map(|_| {
                                Transaction::append(
                                    &stream,
                                    ExpectedVersion::Any,
                                    vec![event(&stream)],
                                )
                            })
                            .collect()
                    })
                    .collect();
                timed(|| {
                    let threads: Vec<_> = prepared
                        .into_iter()
                        .map(|txns| {
                            let log = log.clone();
                            std::thread::spawn(move || {
                                for txn in txns {
                                    log.commit_blocking(txn).expect("commit");
                                }
                            })
                        })
                        .collect();
                    threads.into_iter().for_each(|t| t.join().expect("writer"));
                })
            },
            || {
                let base = next_raw.get();
                next_raw.set(base + writers * per_writer);
                let prepared: Vec<Vec<Vec<u8>>> =
                    (0..writers).map(|_| Raw::values(per_writer)).collect();
                timed(|| {
                    let threads: Vec<_> = prepared
                        .into_iter()
                        .zip(0..)
                        .map(|(values, w)| {
                            let raw = raw.clone();
                            std::thread::spawn(move || {
                                for (value, i) in values.chunks(1).zip(0..) {
                                    raw.write(base + w * per_writer + i, value);
                                }
                            })
                        })
                        .collect();
                    threads.into_iter().for_each(|t| t.join().expect("writer"));
                })
            },
        );
        report(&Case {
            name,
            events: writers * per_writer,
            rounds: timings,
            target: 0.7,
        });
    }

    // 4. Full read of what was written, in pages of 1,000, every record's
    // checksum, envelope and position checked. Bulk readers (the relay, a
    // scan) read events in place; `read_all` also decodes each envelope
    // into owned strings, shown beside it.
    //
    // Both stores are closed and opened again first: recovery writes what
    // their write-ahead logs hold to table files, so both sides read table
    // files, as after any restart, instead of whichever memtable happened
    // not to be flushed yet (a skiplist reads several times slower).
    let head = log.head();
    drop(log);
    let log = open_log(dir.path());
    assert_eq!(log.head(), head, "the log reopened at its head");
    drop(Arc::into_inner(raw).expect("every raw writer joined"));
    let raw = Raw::open(dir.path());
    let read_in_place = || {
        read_whole_log(head, |from| {
            let page = log.read_all_stored(from, 1000).expect("read");
            (page.len(), page.last().map(|e| e.position()))
        })
    };
    let read_owned = || {
        read_whole_log(head, |from| {
            let page = log.read_all(from, 1000).expect("read");
            (page.len(), page.last().map(|e| e.global_position))
        })
    };
    let read_raw = || {
        timed(|| {
            let cf = raw.db.cf_handle(CF_EVENTS).expect("cf");
            let mut bytes = 0usize;
            let mut seen = 0u64;
            for item in raw.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
                let (_, value) = item.expect("raw read");
                bytes += value.len();
                seen += 1;
            }
            assert!(bytes > 0 && seen >= head);
        })
    };
    let name = "read, full log, in place";
    if wanted(name) && head > 0 {
        report(&Case {
            name,
            events: head,
            rounds: rounds(ROUNDS, read_in_place, read_raw),
            target: 0.5,
        });
    }
    let name = "read, full log, owned envelopes";
    if wanted(name) && head > 0 {
        report(&Case {
            name,
            events: head,
            rounds: rounds(ROUNDS, read_owned, read_raw),
            target: 0.0,
        });
    }
    drop(log);
    drop(raw);
    read_one_case(&dir.path().join("case"), scale);
}

/// Reads one page from a position or version: how many, and where the
/// next starts.
type PageReader<'a> = dyn Fn(u64) -> (usize, Option<u64>) + 'a;

/// Events of the one case the case reads read.
const CASE_EVENTS: u64 = 10_000;
/// Events the case gets per commit, each commit followed by one of another
/// stream: the case's events lie in runs among the rest, as an incident's do.
const CASE_RUN: u64 = 10;
/// Reads of the whole case timed as one round: one read of 10,000 events
/// takes a few milliseconds, the size of a scheduler's time slice, so a
/// round of one read measured the machine's other threads as much as the
/// read (rounds of the same read differed 2x). Twenty take long enough.
const CASE_READS_PER_ROUND: u64 = 20;

/// Case 5, reading one case as replay and every aggregate load do: one stream
/// of 10,000 events, and one correlation of 10,000 events spread over many
/// streams (an incident's children), each read in pages of 1,000, beside a
/// raw prefix scan of the same records (the very bytes the log stores for
/// them, copied into raw under the same keys, so they lie side by side as
/// the log's do) that copies each page out as the log does. Each is read
/// twice: checked and read in place (`read_stream_stored`,
/// `read_correlation_stored`), and decoded into owned envelopes; the in
/// place reads also beside a raw scan that only adds up lengths. What the
/// log does and raw does not: it reads the stream's head (or the
/// correlation's first version), checks each record's checksum and key,
/// walks its envelope (checking it is the event the key says) and hands
/// out each event with its fields.
fn read_one_case(path: &std::path::Path, scale: u64) {
    let events = CASE_EVENTS * scale;
    std::fs::create_dir_all(path).expect("case dir");
    let log = open_log(path);
    let raw = Raw::open(path);
    for run in 0..events / CASE_RUN {
        let child = format!("child-{run}");
        let case_events = (0..CASE_RUN).map(|_| event("incident-big")).collect();
        let child_events = (0..CASE_RUN)
            .map(|_| NewEvent {
                correlation_id: "incident-spread".into(),
                ..event(&child)
            })
            .collect();
        let other = format!("other-{run}");
        log.commit_blocking(
            Transaction::append("incident-big", ExpectedVersion::Any, case_events)
                .and_append(&child, ExpectedVersion::Any, child_events)
                .and_append(&other, ExpectedVersion::Any, vec![event(&other)]),
        )
        .expect("commit");
    }
    // Both read table files, as after a restart (see the full read), and
    // both compacted, as a log that has run a while is: freshly flushed
    // files overlap, and a scan merges them key by key (the log's more so:
    // its copies column holds three streams' events written together).
    drop(log);
    let compact = |store: &std::path::Path| {
        let db = open_raw_store(store).expect("store");
        for name in lineguard_eventlog::codec::ALL_COLUMN_FAMILIES {
            let cf = db.cf_handle(name).expect("cf");
            db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
    };
    compact(&path.join("log"));
    // Raw holds the very records the log reads: the stream's copies and
    // the correlation's entries, under the same keys.
    assert_eq!(
        raw.copy_records(&path.join("log"), CF_STREAM_EVENTS, "incident-big"),
        events
    );
    assert_eq!(
        raw.copy_records(&path.join("log"), CF_CORRELATIONS, "incident-spread"),
        events
    );
    drop(raw);
    compact(&path.join("raw"));
    let log = open_log(path);
    let raw = Raw::open(path);
    let raw_scan = |column: &'static str, id: &'static str, copy: bool| {
        let raw = &raw;
        move || {
            timed(|| {
                for _ in 0..CASE_READS_PER_ROUND {
                    assert_eq!(raw.scan(column, id, copy) as u64, events);
                }
            })
        }
    };
    let stream_raw = raw_scan(CF_STREAM_EVENTS, "incident-big", true);
    let stream_raw_lengths = raw_scan(CF_STREAM_EVENTS, "incident-big", false);
    let correlation_raw = raw_scan(CF_CORRELATIONS, "incident-spread", true);
    let correlation_raw_lengths = raw_scan(CF_CORRELATIONS, "incident-spread", false);
    let pages_of = |read_page: &PageReader| {
        let mut from = Some(1);
        let mut seen = 0u64;
        while let Some(at) = from {
            let (count, next) = read_page(at);
            seen += count as u64;
            from = next;
        }
        assert_eq!(seen, events);
    };
    let read_log = |read_page: &PageReader| {
        timed(|| {
            for _ in 0..CASE_READS_PER_ROUND {
                pages_of(read_page);
            }
        })
    };
    let stream_in_place = |version: u64| {
        let (page, _, next) = log
            .read_stream_stored("incident-big", version, ReadDirection::Forward, 1_000)
            .expect("read stream");
        (page.len(), next)
    };
    let stream_owned = |version: u64| {
        let slice = log
            .read_stream("incident-big", version, ReadDirection::Forward, 1_000)
            .expect("read stream");
        (slice.events.len(), slice.next_version)
    };
    let correlation_in_place = |position: u64| {
        let (page, next) = log
            .read_correlation_stored("incident-spread", position, 1_000)
            .expect("read correlation");
        (page.len(), next)
    };
    let correlation_owned = |position: u64| {
        let (page, next) = log
            .read_correlation("incident-spread", position, 1_000)
            .expect("read correlation");
        (page.len(), next)
    };
    type RawScan<'r> = dyn Fn() -> f64 + 'r;
    let cases: [(&'static str, &PageReader, &RawScan, f64); 6] = [
        (
            "read, one stream, in place",
            &stream_in_place,
            &stream_raw,
            0.8,
        ),
        (
            "read, one stream, owned envelopes",
            &stream_owned,
            &stream_raw,
            0.0,
        ),
        (
            "read, one correlation, in place",
            &correlation_in_place,
            &correlation_raw,
            0.8,
        ),
        (
            "read, one correlation, owned envelopes",
            &correlation_owned,
            &correlation_raw,
            0.0,
        ),
        // The same reads beside a raw scan that copies nothing out (only
        // adds up lengths), for comparison.
        (
            "read, one stream, in place, vs lengths only",
            &stream_in_place,
            &stream_raw_lengths,
            0.0,
        ),
        (
            "read, one correlation, in place, vs lengths only",
            &correlation_in_place,
            &correlation_raw_lengths,
            0.0,
        ),
    ];
    for (name, read_page, read_raw, target) in cases {
        if wanted(name) {
            report(&Case {
                name,
                events: events * CASE_READS_PER_ROUND,
                rounds: rounds(ROUNDS, || read_log(read_page), read_raw),
                target,
            });
        }
    }
}
