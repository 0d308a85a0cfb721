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
    let mut due = DueTimers::new(log, now, limit, limit);
    let mut out = Vec::new();
    while let Some(timer) = due.next_timer()? {
        out.push(timer);
    }
    Ok(out)
}

/// The timers due at one instant, earliest first, read a page at a time,
/// each page after the last key of the one before. A timer the service
/// cannot fire now (a conflict, a case that moved on) is passed over and
/// never stands in the way of those behind it; at most `max_looked_at` are
/// looked at in one scan, so one scan's work is bounded.
pub struct DueTimers<'a> {
    log: &'a EventLog,
    now_nanos: i128,
    page_size: usize,
    left_to_look_at: usize,
    after: Option<Vec<u8>>,
    page: std::vec::IntoIter<(Vec<u8>, Vec<u8>)>,
    exhausted: bool,
}

impl<'a> DueTimers<'a> {
    /// The timers of `log` due at `now`, read `page_size` at a time (at
    /// least 1), at most `max_looked_at` of them.
    pub fn new(log: &'a EventLog, now: &Timestamp, page_size: usize, max_looked_at: usize) -> Self {
        DueTimers {
            log,
            now_nanos: nanos(now),
            page_size: page_size.max(1),
            left_to_look_at: max_looked_at,
            after: None,
            page: Vec::new().into_iter(),
            exhausted: false,
        }
    }

    /// The next due timer (its key and stored value); `None` when no timer
    /// is left due, or the scan has looked at its maximum.
    pub fn next_timer(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.left_to_look_at == 0 {
            return Ok(None);
        }
        if let Some(timer) = self.page.next() {
            self.left_to_look_at -= 1;
            return Ok(Some(timer));
        }
        if self.exhausted {
            return Ok(None);
        }
        let wanted = self.page_size.min(self.left_to_look_at);
        let scanned = self
            .log
            .projection_scan(TIMER_PREFIX, self.after.as_deref(), wanted)?;
        let full = scanned.len() == wanted;
        let due: Vec<_> = scanned
            .into_iter()
            .take_while(|(key, _)| fire_at_of(key).is_some_and(|at| at <= self.now_nanos))
            .collect();
        self.exhausted = !full || due.len() < wanted;
        self.after = due.last().map(|(key, _)| key.clone());
        self.page = due.into_iter();
        match self.page.next() {
            Some(timer) => {
                self.left_to_look_at -= 1;
                Ok(Some(timer))
            }
            None => Ok(None),
        }
    }
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
