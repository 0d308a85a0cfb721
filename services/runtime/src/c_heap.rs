//! The C heap: RocksDB's C++ allocates with glibc's malloc, not with the
//! Rust allocator. glibc gives every thread that allocates at the same time
//! as another an arena of its own (up to eight per core) and keeps what is
//! freed in each: a service whose blocking pool's threads read RocksDB
//! grew to a dozen 64 MiB arenas, most of it free (measured: intake 430 MB
//! resident under load, with the log's RocksDB held to 64 MiB). Two arenas
//! and a periodic trim keep the C heap near what RocksDB holds.

use std::time::Duration;

/// Arenas glibc's malloc may use.
pub const MAX_ARENAS: i32 = 2;

/// How often freed C heap pages are handed back.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Caps glibc's arenas and, on a Tokio runtime, starts handing freed pages
/// back every [`TRIM_EVERY`]. Call once, early; elsewhere than glibc it
/// does nothing.
pub fn bound() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets a malloc parameter; M_ARENA_MAX takes
        // effect for arenas made after it, and none is torn down.
        let set = unsafe { libc::mallopt(libc::M_ARENA_MAX, MAX_ARENAS) };
        if set != 1 {
            tracing::warn!("glibc refused to cap its malloc arenas");
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async {
                let mut every = tokio::time::interval(TRIM_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    // On the blocking pool: a trim walks every arena's free
                    // lists, which must not hold up a worker thread.
                    let _ = tokio::task::spawn_blocking(|| {
                        // SAFETY: malloc_trim only returns free pages.
                        unsafe { libc::malloc_trim(0) }
                    })
                    .await;
                }
            });
        }
    }
}
