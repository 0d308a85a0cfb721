//! Durable timers, kept as projections.
//!
//! A service's projector sets a timer in the same write as the event that
//! starts a clock, and drops it in the same write as the event that stops
//! the clock or acts on the timer. A timer is a projection key,
//! `timer/<fire at, ns, 20 digits>/<owner>/<clock>/<percent>`, so the due
//! ones are a prefix scan in fire order ([`due`]), they survive restarts,
//! and a rebuild from the log gives the same set. The service fires a due
//! timer by committing the event it calls for, whose projection drops the
//! timer: a timer acts at most once, and none is lost to a crash.
//!
//! `percent` 0 is the deadline itself; other values are warning points.

use prost_types::Timestamp;

use crate::error::Result;
use crate::log::EventLog;
use crate::projection::ProjectionView;

/// Prefix of every timer key.
pub const TIMER_PREFIX: &[u8] = b"timer/";

/// Nanoseconds since the epoch.
pub fn nanos(t: &Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// The instant `percent` of the way from `start` to `end`.
pub fn point_between(start: &Timestamp, end: &Timestamp, percent: u32) -> Timestamp {
    let at = nanos(start) + (nanos(end) - nanos(start)) * i128::from(percent) / 100;
    Timestamp {
        seconds: at.div_euclid(1_000_000_000) as i64,
        nanos: at.rem_euclid(1_000_000_000) as i32,
    }
}

fn timer_key(fire_at: &Timestamp, owner: &str, clock: &str, percent: u32) -> String {
    format!(
        "timer/{:020}/{owner}/{clock}/{percent}",
        nanos(fire_at).max(0)
    )
}

fn owner_key(owner: &str) -> Vec<u8> {
    format!("timers-of/{owner}").into_bytes()
}

/// The fire time encoded in a timer key.
pub fn fire_at_of(key: &[u8]) -> Option<i128> {
    let digits = key.get(TIMER_PREFIX.len()..TIMER_PREFIX.len() + 20)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Up to `limit` timers due at `now` (their key and stored value), earliest
/// first. Firing them removes them, so the next call sees the next ones.
pub fn due(log: &EventLog, now: &Timestamp, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let now = nanos(now);
    let page = log.projection_scan(TIMER_PREFIX, None, limit)?;
    Ok(page
        .into_iter()
        .take_while(|(key, _)| fire_at_of(key).is_some_and(|at| at <= now))
        .collect())
}

/// One owner's (a case's, an order's) pending timers, as the projector sees
/// them while it applies an event. Call [`OwnerTimers::save`] when done.
pub struct OwnerTimers<'v, 'a> {
    view: &'v mut ProjectionView<'a>,
    owner: String,
    keys: Vec<String>,
}

impl<'v, 'a> OwnerTimers<'v, 'a> {
    /// The pending timers of `owner`.
    pub fn of(view: &'v mut ProjectionView<'a>, owner: &str) -> Result<Self> {
        let keys = match view.get(&owner_key(owner))? {
            Some(list) => String::from_utf8_lossy(&list)
                .split('\n')
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect(),
            None => Vec::new(),
        };
        Ok(OwnerTimers {
            view,
            owner: owner.to_owned(),
            keys,
        })
    }

    /// Drops the pending timers `which(clock, percent)` selects.
    pub fn drop_where(&mut self, which: impl Fn(&str, u32) -> bool) {
        let mut kept = Vec::with_capacity(self.keys.len());
        for key in std::mem::take(&mut self.keys) {
            let mut parts = key.rsplit('/');
            let percent = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let clock = parts.next().unwrap_or("");
            if which(clock, percent) {
                self.view.delete(key.into_bytes());
            } else {
                kept.push(key);
            }
        }
        self.keys = kept;
    }

    /// Sets a clock running from `start` to `due`: a timer at each warning
    /// point and one at `due` (percent 0). `value(percent, fire_at)` is what
    /// each timer stores for the service that fires it.
    pub fn set(
        &mut self,
        clock: &str,
        start: &Timestamp,
        due: &Timestamp,
        points: &[u32],
        value: impl Fn(u32, &Timestamp) -> Vec<u8>,
    ) {
        for percent in points.iter().copied().chain([0]) {
            let fire_at = if percent == 0 {
                *due
            } else {
                point_between(start, due, percent)
            };
            let key = timer_key(&fire_at, &self.owner, clock, percent);
            self.view
                .put(key.clone().into_bytes(), value(percent, &fire_at));
            self.keys.push(key);
        }
    }

    /// Writes the owner's list of pending timers back.
    pub fn save(self) {
        let key = owner_key(&self.owner);
        if self.keys.is_empty() {
            self.view.delete(key);
        } else {
            self.view.put(key, self.keys.join("\n").into_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_and_keys_sort_by_time() {
        let start = Timestamp {
            seconds: 100,
            nanos: 0,
        };
        let end = Timestamp {
            seconds: 400,
            nanos: 0,
        };
        assert_eq!(
            point_between(&start, &end, 50),
            Timestamp {
                seconds: 250,
                nanos: 0
            }
        );
        let early = timer_key(
            &Timestamp {
                seconds: 9,
                nanos: 0,
            },
            "o",
            "c",
            0,
        );
        let late = timer_key(
            &Timestamp {
                seconds: 10,
                nanos: 0,
            },
            "o",
            "c",
            0,
        );
        assert!(early < late, "{early} < {late}");
        assert_eq!(fire_at_of(late.as_bytes()), Some(10_000_000_000));
    }
}
