//! The one clock every Lineguard process reads.
//!
//! Every time a service records or judges — an event's `recorded_at`, a
//! route's deadlines, a timer's firing, a crew action's receipt, a
//! follow-up's due time — comes from [`now`]. By default that is the
//! system's wall clock. A process may instead be started at a chosen
//! instant and let time run faster ([`configure`], the services' flags
//! `--clock-start` and `--clock-speed`), so that a test or a demo can live
//! through a month of clocks, weekends and holidays in minutes: every
//! service of one run given the same start and speed (and started within
//! a moment of each other) agrees on the time to within that moment times
//! the speed.
//!
//! The accelerated clock is monotonic (it advances with `Instant`), so it
//! never steps back even if the system clock does.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

/// Fastest a clock may run: a year in under nine hours at most.
pub const MAX_SPEED: u32 = 1_000;

struct Accelerated {
    started: Instant,
    start_nanos: i128,
    speed: u32,
}

static CLOCK: OnceLock<Accelerated> = OnceLock::new();

/// Sets this process's clock to read `start` at the real instant `anchor`
/// (now, if `None`) and to run `speed` times as fast as real time. Once per
/// process, before anything reads it. Processes given the same start,
/// anchor and speed read the same time, whenever each was started.
pub fn configure(start: Timestamp, anchor: Option<Timestamp>, speed: u32) -> Result<(), String> {
    if speed == 0 || speed > MAX_SPEED {
        return Err(format!("clock speed {speed} is not within 1..={MAX_SPEED}"));
    }
    let real_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as i128;
    let since_anchor = anchor.map_or(0, |a| (real_now - nanos_of(&a)).max(0));
    let started = Instant::now()
        .checked_sub(Duration::from_nanos(
            u64::try_from(since_anchor).unwrap_or(u64::MAX),
        ))
        .ok_or_else(|| "the clock anchor is too far in the past".to_string())?;
    CLOCK
        .set(Accelerated {
            started,
            start_nanos: nanos_of(&start),
            speed,
        })
        .map_err(|_| "the clock was already configured".to_string())
}

/// Whether the clock runs from a chosen start, and how fast.
pub fn speed() -> u32 {
    CLOCK.get().map_or(1, |c| c.speed)
}

/// Nanoseconds since the Unix epoch, by this process's clock.
pub fn now_nanos() -> i128 {
    match CLOCK.get() {
        Some(c) => {
            let elapsed = c.started.elapsed().as_nanos() as i128;
            c.start_nanos + elapsed * i128::from(c.speed)
        }
        None => {
            let since = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            since.as_nanos() as i128
        }
    }
}

/// The current time, as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp(now_nanos())
}

/// A span of the clock's time as real time to wait (at least 1 ms): a
/// test waiting for an hour of an accelerated clock waits an hour / speed.
pub fn real(span: Duration) -> Duration {
    (span / speed()).max(Duration::from_millis(1))
}

fn timestamp(n: i128) -> Timestamp {
    Timestamp {
        seconds: n.div_euclid(1_000_000_000) as i64,
        nanos: n.rem_euclid(1_000_000_000) as i32,
    }
}

fn nanos_of(t: &Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// Where a component reads the time: the process clock ([`now`]) in every
/// service, or a clock set by hand in a test that plays out a scenario at
/// chosen instants. A component holds one and asks it, never the system.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<i128>>>,
}

impl Clock {
    /// The process clock.
    pub fn process() -> Clock {
        Clock::default()
    }

    /// A clock that stands at `start` until [`Clock::set`] moves it.
    pub fn manual(start: Timestamp) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(nanos_of(&start)))),
        }
    }

    /// The current time by this clock.
    pub fn now(&self) -> Timestamp {
        match &self.manual {
            Some(at) => timestamp(*at.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
            None => now(),
        }
    }

    /// Moves a manual clock to `at` (forward or back); the process clock
    /// cannot be set, and this returns false for it.
    pub fn set(&self, at: Timestamp) -> bool {
        match &self.manual {
            Some(cell) => {
                *cell
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = nanos_of(&at);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_clock_is_the_wall_clock() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as i128;
        let n = now_nanos();
        assert!(n >= before && n - before < 5_000_000_000);
    }

    #[test]
    fn a_manual_clock_stands_where_it_is_set() {
        let start = Timestamp {
            seconds: 1_800_000_000,
            nanos: 5,
        };
        let clock = Clock::manual(start);
        assert_eq!(clock.now(), start);
        let later = Timestamp {
            seconds: 1_800_003_600,
            nanos: 0,
        };
        assert!(clock.clone().set(later), "clones share the hands");
        assert_eq!(clock.now(), later);
        assert!(!Clock::process().set(later));
    }
}
