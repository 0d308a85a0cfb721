//! How far a phone's clock is believed.
//!
//! Crews work on phones whose clocks can be minutes (or years) wrong, and a
//! phone's clock is also the one thing a crew could set to look on time.
//! Every crew action therefore carries three times:
//!
//! - `device_time`: what the phone said, kept as sent;
//! - `received_at`: when dispatch received the action, by the service's
//!   clock (`lineguard_runtime::clock`);
//! - `judged_at`: the time every clock (arrival, restoration), every view
//!   and every scorecard uses, by this rule:
//!
//! ```text
//! upper = received_at + skew                 an action cannot have happened
//!                                            after dispatch heard of it
//!                                            (but for the skew of clocks)
//! lower = max(order assigned_at,             nor before the order existed,
//!             previous action's judged_at)   nor before the action before it
//! live action (not an offline batch):
//!   lower = max(lower, received_at - skew)   a phone online now is late by
//!                                            at most the skew
//! judged_at = clamp(device_time, lower, upper)
//! ```
//!
//! An offline batch (`SubmitActions`) may be older than the skew: each of
//! its times is bounded by the action before it and by its own receipt.
//! A device time outside `[lower, received_at + skew]` marks the action
//! `device_clock_adjusted`, so operators see which phones are wrong.
//!
//! What a phone cannot do: claim an action more than the skew after
//! dispatch received it, claim an action before the order was assigned or
//! before the action that preceded it, or (when online) claim more than the
//! skew of slack before its receipt. Every bound but the skew comes from
//! dispatch's own clock.

use std::time::Duration;

use prost_types::Timestamp;

use lineguard_eventlog::timers::nanos;

/// The skew accepted when none is configured.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(120);

/// A crew action's times, judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    pub received_at: Timestamp,
    pub judged_at: Timestamp,
    /// The device's time was outside what the rule accepts.
    pub adjusted: bool,
}

/// What is known of the order when an action arrives.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bounds {
    /// When the order was assigned (dispatch's clock).
    pub assigned_at: Option<Timestamp>,
    /// The judged time of the order's previous action.
    pub previous: Option<Timestamp>,
}

fn from_nanos(n: i128) -> Timestamp {
    Timestamp {
        seconds: n.div_euclid(1_000_000_000) as i64,
        nanos: n.rem_euclid(1_000_000_000) as i32,
    }
}

/// Judges `device_time` received at `received_at` by the rule above.
pub fn judge(
    device_time: &Timestamp,
    received_at: &Timestamp,
    bounds: &Bounds,
    offline: bool,
    skew: Duration,
) -> Judged {
    let skew_nanos = i128::try_from(skew.as_nanos()).unwrap_or(i128::MAX / 4);
    let received = nanos(received_at);
    let device = nanos(device_time);
    let mut lower = [bounds.assigned_at.as_ref(), bounds.previous.as_ref()]
        .into_iter()
        .flatten()
        .map(nanos)
        .max()
        .unwrap_or(i128::MIN);
    if !offline {
        lower = lower.max(received - skew_nanos);
    }
    let upper = received + skew_nanos;
    // Earlier facts come from dispatch's own clock and are at or before
    // this receipt; should they not be (a clock stepped back), receipt wins.
    let lower = lower.min(received);
    let judged = device.clamp(lower, upper);
    let adjusted = device < lower || device > upper;
    debug_assert!(lower <= judged && judged <= upper);
    Judged {
        received_at: *received_at,
        judged_at: from_nanos(judged),
        adjusted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    const SKEW: Duration = Duration::from_secs(120);

    fn bounds(assigned: i64, previous: Option<i64>) -> Bounds {
        Bounds {
            assigned_at: Some(at(assigned)),
            previous: previous.map(at),
        }
    }

    #[test]
    fn an_honest_clock_is_believed() {
        let j = judge(&at(1_000), &at(1_001), &bounds(0, Some(500)), false, SKEW);
        assert_eq!((j.judged_at, j.adjusted), (at(1_000), false));
    }

    #[test]
    fn a_clock_ahead_never_counts_later_than_receipt_and_the_skew() {
        // Within the skew: ordinary drift, believed.
        let j = judge(&at(1_060), &at(1_000), &bounds(0, None), false, SKEW);
        assert_eq!((j.judged_at, j.adjusted), (at(1_060), false));
        // Twenty-four minutes ahead (seen in a storm): the skew's end, flagged.
        let j = judge(
            &at(1_000 + 24 * 60),
            &at(1_000),
            &bounds(0, None),
            false,
            SKEW,
        );
        assert_eq!((j.judged_at, j.adjusted), (at(1_120), true));
    }

    #[test]
    fn a_live_action_cannot_claim_more_than_the_skew_of_slack() {
        // Claims arrival ten minutes before it told dispatch: two minutes are allowed.
        let j = judge(&at(400), &at(1_000), &bounds(0, Some(300)), false, SKEW);
        assert_eq!((j.judged_at, j.adjusted), (at(880), true));
    }

    #[test]
    fn an_offline_batch_may_be_older_but_not_before_what_came_first() {
        // Queued offline an hour ago, sent now: believed.
        let j = judge(&at(1_000), &at(4_600), &bounds(0, Some(900)), true, SKEW);
        assert_eq!((j.judged_at, j.adjusted), (at(1_000), false));
        // Before the previous action: the previous action's time.
        let j = judge(&at(800), &at(4_600), &bounds(0, Some(900)), true, SKEW);
        assert_eq!((j.judged_at, j.adjusted), (at(900), true));
        // Before the order was assigned: the assignment's time.
        let j = judge(&at(10), &at(4_600), &bounds(500, None), true, SKEW);
        assert_eq!((j.judged_at, j.adjusted), (at(500), true));
    }

    #[test]
    fn judged_times_stay_between_the_bounds_whatever_the_phone_says() {
        for device in [
            i64::MIN / 4_000_000_000,
            -1,
            0,
            499,
            999,
            1_000,
            1_100,
            1 << 40,
        ] {
            for offline in [false, true] {
                let j = judge(
                    &at(device),
                    &at(1_000),
                    &bounds(100, Some(200)),
                    offline,
                    SKEW,
                );
                let n = nanos(&j.judged_at);
                assert!(
                    n >= nanos(&at(200)) && n <= nanos(&at(1_120)),
                    "{device} {offline}"
                );
            }
        }
    }
}
