//! Durable timers: acceptance windows (escalation), and the warnings and
//! breaches of routing's clocks.
//!
//! Timers live in the projection (`timer/<fire at>/…`), written by the
//! projector with the route that sets them. [`fire_due`] acts on every timer
//! whose time has come by committing the event it calls for, with the
//! case's expected version; the projector deletes the timer in that same
//! batch. A crash before the commit leaves the timer to fire after the
//! restart; a crash after it leaves nothing to fire again: exactly once.

use std::time::Duration;

use lineguard_eventlog::{
    ActorKind, Error as LogError, ExpectedVersion, NewEvent, Transaction, actor, timers,
};
use lineguard_protos::routing::v1::{
    ClockBreached, ClockWarned, RouteReason, RouteStatus, RouteView, Timer,
};
use lineguard_runtime::periodic::Periodic;
use prost::Message;
use prost_types::Timestamp;

use crate::policy::ACCEPTANCE;
use crate::router::{Router, RouterError, now, seconds_between};

/// Due timers read per page, and acted on per call (the rest wait for the
/// next tick).
pub const SCAN_BATCH: usize = 256;
/// Due timers looked at per call: a timer that cannot fire now (its case
/// changed meanwhile) is passed over, so at most this many stand between
/// the earliest and the first that can fire.
pub const SCAN_LOOK_AT: usize = 64 * SCAN_BATCH;

/// Acts on the timers due at `now` (at most [`SCAN_BATCH`]); returns how
/// many fired. A timer whose case changed meanwhile is left for next time.
pub async fn fire_due(router: &Router, now: &Timestamp) -> Result<usize, RouterError> {
    let mut fired = 0;
    let mut due = timers::DueTimers::new(router.log(), now, SCAN_BATCH, SCAN_LOOK_AT);
    while fired < SCAN_BATCH
        && let Some((key, value)) = due.next_timer()?
    {
        let timer = Timer::decode(value.as_slice())
            .map_err(|e| RouterError::Precondition(format!("undecodable timer {key:02x?}: {e}")))?;
        if fire(router, &timer, now).await? {
            fired += 1;
        }
    }
    Ok(fired)
}

/// Commits what one due timer calls for. `Ok(false)`: nothing to do now.
async fn fire(router: &Router, timer: &Timer, now: &Timestamp) -> Result<bool, RouterError> {
    let Some(route) = router.route(&timer.case_id)? else {
        tracing::warn!(case_id = %timer.case_id, clock = %timer.clock, "timer of an unknown case");
        return Ok(false);
    };
    let open = match route.status() {
        RouteStatus::Routed => true,
        RouteStatus::Accepted => timer.clock != ACCEPTANCE,
        _ => false,
    };
    if !open || (timer.clock == ACCEPTANCE && timer.hop != route.hop) {
        // The projector drops a case's timers when it moves on; one left
        // behind is a bug worth seeing, not a reason to act.
        tracing::warn!(case_id = %timer.case_id, clock = %timer.clock, hop = timer.hop,
            route_hop = route.hop, "stale timer ignored");
        return Ok(false);
    }
    let events = events_for(router, &route, timer, now)?;
    let txn = Transaction::append(
        &route.case_id,
        ExpectedVersion::Exact(route.version),
        events,
    );
    match router.log().commit(txn).await {
        Ok(_) => {
            tracing::info!(case_id = %route.case_id, correlation_id = %route.case_id,
                clock = %timer.clock, percent = timer.percent, hop = route.hop, "timer fired");
            lineguard_runtime::metrics::clock_alert(
                &timer.clock,
                if timer.percent > 0 {
                    lineguard_runtime::metrics::AlertKind::warning
                } else {
                    lineguard_runtime::metrics::AlertKind::breach
                },
            );
            Ok(true)
        }
        Err(LogError::WrongExpectedVersion { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn events_for(
    router: &Router,
    route: &RouteView,
    timer: &Timer,
    now: &Timestamp,
) -> Result<Vec<NewEvent>, RouterError> {
    let who = actor(ActorKind::System, "routing-timer");
    let case = route.case_id.as_str();
    if timer.percent > 0 {
        let warned = ClockWarned {
            case_id: case.to_string(),
            clock: timer.clock.clone(),
            percent: timer.percent,
            due_at: timer.clock_due_at,
            warned_at: Some(*now),
            assignee_id: route.assignee_id.clone(),
        };
        return Ok(vec![NewEvent::new(&warned, case, who)]);
    }
    let breached = ClockBreached {
        case_id: case.to_string(),
        clock: timer.clock.clone(),
        due_at: timer.clock_due_at,
        breached_at: Some(*now),
        assignee_id: route.assignee_id.clone(),
        line: route.line,
    };
    let mut events = vec![NewEvent::new(&breached, case, who.clone())];
    if timer.clock == ACCEPTANCE && route.line < 3 {
        let district = if route.district_id.is_empty() {
            None
        } else {
            router.directory().district(&route.district_id)?
        };
        let window = route
            .routed_at
            .as_ref()
            .zip(timer.clock_due_at.as_ref())
            .map_or(0, |(from, to)| seconds_between(from, to));
        let detail = format!(
            "{} did not accept within {window}s at line {}",
            route.assignee_id, route.line
        );
        let escalated = router.next_hop(
            route,
            district,
            route.line + 1,
            RouteReason::Escalated,
            detail,
            now,
        )?;
        let cause = events[0].event_id.to_string();
        events.push(NewEvent::new(&escalated, case, who).caused_by(cause));
    }
    Ok(events)
}

/// The background task calling [`fire_due`] every `tick`.
pub fn spawn(router: Router, tick: Duration) -> Periodic {
    Periodic::spawn("routing-timers", tick, move || {
        let router = router.clone();
        async move { fire_due(&router, &now()).await }
    })
}
