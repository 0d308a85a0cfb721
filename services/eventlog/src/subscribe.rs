//! Live subscriptions: catch up from the store, then follow the head.
//!
//! Every event a subscriber sees is read from the store by position, both
//! while catching up and once live: the head watch only says "there is more".
//! That is why there can be no gap and no duplicate between the two phases.
//! The channel to the subscriber is bounded; when it is full the reader task
//! simply waits, and it reads no more than the channel has room for, so a
//! slow or idle subscriber costs one small buffer, never a page beside it or
//! a growing queue.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use lineguard_protos::eventlog::v1::EventEnvelope;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::error::{Error, Result};
use crate::log::EventLog;

/// A stream of committed events from a position on. Ends when the log closes;
/// yields an error (then ends) if a stored record is corrupted.
pub struct Subscription {
    events: mpsc::Receiver<Result<EventEnvelope>>,
}

impl Subscription {
    pub(crate) fn start(log: EventLog, from: u64, permit: OwnedSemaphorePermit) -> Self {
        let (tx, events) = mpsc::channel(log.limits().subscriber_buffer.max(1));
        tokio::spawn(async move {
            // Held for the task's life: the slot is free again when it ends.
            let _permit = permit;
            follow(log, from, tx).await;
        });
        Subscription { events }
    }

    /// The next event, or `None` once the log has closed.
    pub async fn next_event(&mut self) -> Option<Result<EventEnvelope>> {
        self.events.recv().await
    }
}

async fn follow(log: EventLog, mut next: u64, tx: mpsc::Sender<Result<EventEnvelope>>) {
    let mut head = log.watch_head();
    let page = log
        .limits()
        .subscriber_buffer
        .clamp(1, log.limits().max_read_page);
    loop {
        let last = *head.borrow_and_update();
        while next <= last {
            // Read only what the subscriber has room for: a subscriber that
            // does not keep up (or has gone idle) holds at most its
            // channel's events, never a page read ahead beside them.
            let room = loop {
                let room = tx.capacity();
                if room > 0 {
                    break room;
                }
                match tx.reserve().await {
                    Ok(permit) => drop(permit),
                    Err(_) => return,
                }
            };
            let want = room.min(page);
            let reader = log.clone();
            let read = tokio::task::spawn_blocking(move || reader.read_all(next, want)).await;
            let events = match read {
                Ok(Ok(events)) => events,
                Ok(Err(err)) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                Err(join) => {
                    let _ = tx
                        .send(Err(Error::invalid("subscription", join.to_string())))
                        .await;
                    return;
                }
            };
            if events.is_empty() {
                break;
            }
            for event in events {
                next = event.global_position + 1;
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            changed = head.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

impl Stream for Subscription {
    type Item = Result<EventEnvelope>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}
