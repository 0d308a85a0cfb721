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

use lineguard_eventlog::{ActorKind, ExpectedVersion, NewEvent, Transaction, actor};
use lineguard_protos::dispatch::v1::{ClockAlerted, DispatchTimer, OrderStatus};
use prost::Message;
use prost_types::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Status;

use crate::orders::Dispatcher;
use crate::projection::{TIMER_PREFIX, crew_stream, nanos};

/// Timers examined per scan.
pub const SCAN_BATCH: usize = 256;

pub const ARRIVAL: &str = "arrival";
pub const RESTORATION: &str = "restoration";

fn fire_at_of(key: &[u8]) -> Option<i128> {
    let digits = key.get(TIMER_PREFIX.len()..TIMER_PREFIX.len() + 20)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Fires every timer due at `now`; returns how many fired.
pub async fn fire_due(dispatcher: &Dispatcher, now: &Timestamp) -> Result<usize, Status> {
    let limit = nanos(now);
    let mut fired = 0;
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let batch = dispatcher
            .log()
            .projection_scan(TIMER_PREFIX, cursor.as_deref(), SCAN_BATCH)
            .map_err(Status::from)?;
        let Some((last, _)) = batch.last() else {
            return Ok(fired);
        };
        cursor = Some(last.clone());
        let full = batch.len() == SCAN_BATCH;
        for (key, value) in batch {
            if fire_at_of(&key).is_none_or(|at| at > limit) {
                return Ok(fired);
            }
            let timer = DispatchTimer::decode(value.as_slice())
                .map_err(|e| Status::data_loss(format!("undecodable timer: {e}")))?;
            if fire(dispatcher, &key, &timer, now).await? {
                fired += 1;
            }
        }
        if !full {
            return Ok(fired);
        }
    }
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
    Ok(true)
}

/// The background task calling [`fire_due`] every `tick`.
pub struct ClockTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ClockTask {
    pub fn spawn(dispatcher: Dispatcher, tick: Duration) -> ClockTask {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            while !*stopped.borrow() {
                let now = Timestamp::from(std::time::SystemTime::now());
                if let Err(e) = fire_due(&dispatcher, &now).await {
                    tracing::warn!(error = %e, "clock timers could not fire; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(tick) => {},
                    _ = stopped.changed() => {},
                }
            }
        });
        ClockTask { stop, task }
    }

    /// Stops after the timer in hand.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
