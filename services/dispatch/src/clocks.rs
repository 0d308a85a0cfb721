//! The crew's clocks: arrival (from the report, by area class) and
//! restoration (from arrival), with warnings at the policy's points and a
//! breach at the limit, each an event on the crew's stream (`ClockAlerted`).
//!
//! Timers are projections (`timer/<fire at>/<order>/<clock>/<percent>`),
//! set by the projector with the event that starts a clock and dropped in
//! the batch of the event that stops it or fires it. [`fire_due`] commits
//! the alert under the order's lock, so each fires once, and a restart finds
//! exactly the ones still to fire.

use std::time::Duration;

use lineguard_eventlog::{ActorKind, ExpectedVersion, NewEvent, Transaction, actor, timers};
use lineguard_protos::dispatch::v1::{ClockAlerted, DispatchTimer, OrderStatus};
use lineguard_runtime::periodic::Periodic;
use prost::Message;
use prost_types::Timestamp;
use tonic::Status;

use crate::orders::Dispatcher;
use crate::projection::crew_stream;

/// Due timers read per page, and fired per call (the rest wait for the
/// next tick).
pub const SCAN_BATCH: usize = 256;
/// Due timers looked at per call; one that cannot fire now is passed over.
pub const SCAN_LOOK_AT: usize = 64 * SCAN_BATCH;

pub const ARRIVAL: &str = "arrival";
pub const RESTORATION: &str = "restoration";

/// Fires the timers due at `now` (at most [`SCAN_BATCH`]); returns how many fired.
pub async fn fire_due(dispatcher: &Dispatcher, now: &Timestamp) -> Result<usize, Status> {
    let mut fired = 0;
    let mut due = timers::DueTimers::new(dispatcher.log(), now, SCAN_BATCH, SCAN_LOOK_AT);
    while fired < SCAN_BATCH
        && let Some((key, value)) = due.next_timer().map_err(Status::from)?
    {
        let timer = DispatchTimer::decode(value.as_slice())
            .map_err(|e| Status::data_loss(format!("undecodable timer: {e}")))?;
        if fire(dispatcher, &key, &timer, now).await? {
            fired += 1;
        }
    }
    Ok(fired)
}

async fn fire(
    dispatcher: &Dispatcher,
    key: &[u8],
    timer: &DispatchTimer,
    now: &Timestamp,
) -> Result<bool, Status> {
    let _guard = dispatcher.lock(&timer.order_id).await;
    // Re-read under the lock: an action may have stopped the clock meanwhile.
    if dispatcher
        .log()
        .projection_get(key)
        .map_err(Status::from)?
        .is_none()
    {
        return Ok(false);
    }
    let Some(order) = dispatcher.order(&timer.order_id)? else {
        return Ok(false);
    };
    let running = match timer.clock.as_str() {
        ARRIVAL => matches!(
            order.status(),
            OrderStatus::Assigned | OrderStatus::Acknowledged | OrderStatus::EnRoute
        ),
        _ => order.status() == OrderStatus::OnSite,
    };
    if !running {
        tracing::warn!(order_id = %timer.order_id, clock = %timer.clock, "stale clock timer ignored");
        return Ok(false);
    }
    let alerted = ClockAlerted {
        order_id: order.order_id.clone(),
        crew_id: order.crew_id.clone(),
        clock: timer.clock.clone(),
        percent: if timer.percent == 0 {
            100
        } else {
            timer.percent
        },
        breached: timer.percent == 0,
        due_at: timer.due_at,
        at: Some(*now),
    };
    dispatcher
        .log()
        .commit(Transaction::append(
            crew_stream(&order.crew_id),
            ExpectedVersion::Any,
            vec![NewEvent::new(
                &alerted,
                &order.order_id,
                actor(ActorKind::System, "dispatch-clock"),
            )],
        ))
        .await
        .map_err(Status::from)?;
    tracing::info!(order_id = %order.order_id, correlation_id = %order.order_id, crew_id = %order.crew_id,
        clock = %timer.clock, percent = alerted.percent, breached = alerted.breached, "clock alert");
    lineguard_runtime::metrics::clock_alert(
        &timer.clock,
        if alerted.breached {
            lineguard_runtime::metrics::AlertKind::breach
        } else {
            lineguard_runtime::metrics::AlertKind::warning
        },
    );
    Ok(true)
}

/// The background task calling [`fire_due`] every `tick`.
pub fn spawn(dispatcher: Dispatcher, tick: Duration) -> Periodic {
    Periodic::spawn("dispatch-clocks", tick, move || {
        let dispatcher = dispatcher.clone();
        async move {
            let now = dispatcher.now();
            fire_due(&dispatcher, &now).await
        }
    })
}
