//! Where a service's memory is, read the same way in every process.
//!
//! Every process allocates from one heap, jemalloc's: Rust through the
//! `#[global_allocator]`, RocksDB's C++ because jemalloc is built
//! unprefixed and so *is* `malloc` (see the workspace `Cargo.toml`). So
//! three readings account for a process: what the kernel says is resident,
//! what the heap holds for live allocations and keeps resident, and what
//! the log's RocksDB says it holds (memtables, block cache, table readers:
//! allocations inside the heap's figure, bounded by `--store-memory-mib`).
//! A process whose resident size grows while these stay flat is growing
//! outside the heap (thread stacks, mapped files); one whose heap grows
//! past its store's figure holds something in Rust it should not.
//!
//! [`MemoryReporter`] logs the readings every [`REPORT_EVERY`] at `info`
//! (target `lineguard::memory`), so a long run's growth is in its logs.

use std::time::Duration;

use lineguard_eventlog::{EventLog, StoreMemory};

use crate::periodic::Periodic;

/// How often the readings are logged.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);

/// One reading of a process's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryReading {
    /// Resident set size as the kernel counts it (`VmRSS`); `None` where
    /// `/proc` is not.
    pub resident_bytes: Option<u64>,
    /// The heap's live allocations (jemalloc `stats.allocated`), Rust's and
    /// RocksDB's; `None` without jemalloc's statistics.
    pub heap_allocated_bytes: Option<u64>,
    /// Pages the heap keeps resident, live or cached for reuse (jemalloc
    /// `stats.resident`).
    pub heap_resident_bytes: Option<u64>,
    /// What the log's RocksDB holds, as it counts it.
    pub store: StoreMemory,
}

/// Reads the process's memory and `log`'s store.
pub fn read(log: &EventLog) -> MemoryReading {
    let (heap_allocated_bytes, heap_resident_bytes) = heap();
    MemoryReading {
        resident_bytes: resident_bytes(),
        heap_allocated_bytes,
        heap_resident_bytes,
        store: log.store_memory().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the store's memory");
            StoreMemory::default()
        }),
    }
}

/// The kernel's count of the process's resident memory.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// jemalloc's allocated and resident bytes, refreshed (its statistics are
/// cached until the epoch advances).
#[cfg(not(target_env = "msvc"))]
fn heap() -> (Option<u64>, Option<u64>) {
    use tikv_jemalloc_ctl::{epoch, stats};
    if epoch::advance().is_err() {
        return (None, None);
    }
    let as_u64 = |bytes: usize| u64::try_from(bytes).ok();
    (
        stats::allocated::read().ok().and_then(as_u64),
        stats::resident::read().ok().and_then(as_u64),
    )
}

#[cfg(target_env = "msvc")]
fn heap() -> (Option<u64>, Option<u64>) {
    (None, None)
}

/// Logs a service's [`MemoryReading`] every [`REPORT_EVERY`].
pub struct MemoryReporter(Periodic);

impl MemoryReporter {
    /// Starts logging `log`'s process's readings under `service`'s name.
    pub fn spawn(service: &'static str, log: EventLog) -> MemoryReporter {
        MemoryReporter(Periodic::spawn("memory report", REPORT_EVERY, move || {
            let log = log.clone();
            async move {
                // RocksDB's memory properties take its mutex: off the
                // async workers.
                let reading = tokio::task::spawn_blocking(move || read(&log))
                    .await
                    .map_err(|e| e.to_string())?;
                let mib = |bytes: Option<u64>| bytes.map(|b| b / (1024 * 1024));
                tracing::info!(
                    target: "lineguard::memory",
                    service,
                    resident_mib = mib(reading.resident_bytes),
                    heap_allocated_mib = mib(reading.heap_allocated_bytes),
                    heap_resident_mib = mib(reading.heap_resident_bytes),
                    store_memtables_mib = reading.store.memtables_bytes / (1024 * 1024),
                    store_block_cache_mib = reading.store.block_cache_bytes / (1024 * 1024),
                    store_table_readers_mib = reading.store.table_readers_bytes / (1024 * 1024),
                    "memory"
                );
                Ok::<usize, String>(0)
            }
        }))
    }

    /// Stops reporting.
    pub async fn stop(self) {
        self.0.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heap's figures are the whole process's: tests that read them
    /// run one at a time (cargo test runs a crate's tests on threads of
    /// one process).
    static HEAP_READINGS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A log in a temporary directory, and the heap to itself.
    fn test_log() -> (
        std::sync::MutexGuard<'static, ()>,
        tempfile::TempDir,
        EventLog,
    ) {
        let alone = HEAP_READINGS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(lineguard_eventlog::LogConfig::new(
            dir.path(),
            "memory-test",
        ))
        .expect("open log");
        (alone, dir, log)
    }

    #[test]
    fn a_reading_accounts_for_the_heap_and_the_store() {
        let (_alone, _dir, log) = test_log();
        let before = read(&log);
        let resident = before.resident_bytes.expect("VmRSS on Linux");
        let allocated = before.heap_allocated_bytes.expect("jemalloc statistics");
        let heap_resident = before.heap_resident_bytes.expect("jemalloc statistics");
        assert!(allocated > 0 && heap_resident >= allocated);
        assert!(
            resident >= heap_resident / 2,
            "the heap is within the process"
        );

        // 64 MiB held live shows in the heap's figure.
        let held = vec![1u8; 64 * 1024 * 1024];
        let during = read(&log);
        assert!(
            during.heap_allocated_bytes.expect("stats") >= allocated + 60 * 1024 * 1024,
            "{during:?} after {before:?}"
        );
        drop(std::hint::black_box(held));
        assert!(
            during.store.block_cache_bytes
                <= lineguard_eventlog::limits::DEFAULT_STORE_MEMORY_BYTES as u64,
            "{during:?}"
        );
    }

    /// The options the runtime gives jemalloc are the ones it runs with.
    #[cfg(all(target_os = "linux", not(target_env = "msvc")))]
    #[test]
    fn jemalloc_runs_with_the_runtimes_options() {
        assert!(
            tikv_jemalloc_ctl::opt::background_thread::read().expect("opt.background_thread"),
            "malloc_conf was not read: {:?}",
            std::str::from_utf8(crate::JEMALLOC_OPTIONS)
        );
    }

    unsafe extern "C" {
        fn malloc(size: usize) -> *mut std::ffi::c_void;
        fn free(pointer: *mut std::ffi::c_void);
    }

    /// C and C++ code (RocksDB) calling `malloc` gets jemalloc: its memory
    /// is in the heap's figures and given back the same way.
    #[cfg(all(target_os = "linux", not(target_env = "msvc")))]
    #[test]
    fn c_malloc_is_jemalloc() {
        let (_alone, _dir, log) = test_log();
        let size = 48 * 1024 * 1024;
        let before = read(&log).heap_allocated_bytes.expect("stats");
        // SAFETY: a plain allocation, written within its size and freed once.
        let during = unsafe {
            let block = malloc(size);
            assert!(!block.is_null());
            std::ptr::write_bytes(block.cast::<u8>(), 1, size);
            let during = read(&log).heap_allocated_bytes.expect("stats");
            free(block);
            during
        };
        let after = read(&log).heap_allocated_bytes.expect("stats");
        assert!(
            during >= before + size as u64 - 1024 * 1024,
            "{before} → {during}"
        );
        assert!(after + (size as u64) / 2 < during, "{during} → {after}");
    }
}
