//! `WatchDispatches`: a crew's events from a sequence number on, then live.
//!
//! The crew's sequence is its stream's version in dispatch's log. The
//! stream is read from the store page by page; when it is caught up the task
//! waits for the log's head to move and reads again. Nothing is held in
//! memory but one page and a bounded channel: a slow phone slows its own
//! reader, never grows a queue.

use lineguard_eventlog::{EventLog, ReadDirection};
use lineguard_protos::dispatch::v1::CrewEvent;
use tokio::sync::mpsc;
use tonic::Status;

use crate::projection::crew_stream;

/// Events read from the store at a time.
pub const PAGE: usize = 256;
/// Events waiting for a slow phone at most.
pub const BUFFER: usize = 64;

/// Starts following `crew_id`'s stream after `after_sequence`.
pub fn follow(
    log: EventLog,
    crew_id: String,
    after_sequence: u64,
) -> mpsc::Receiver<Result<CrewEvent, Status>> {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let stream = crew_stream(&crew_id);
        let mut head = log.watch_head();
        let mut next = after_sequence + 1;
        loop {
            head.borrow_and_update();
            let reader = log.clone();
            let id = stream.clone();
            let page = tokio::task::spawn_blocking(move || {
                reader.read_stream(&id, next, ReadDirection::Forward, PAGE)
            })
            .await;
            let events = match page {
                Ok(Ok(slice)) => slice.events,
                // Nothing for this crew yet: wait for its first event.
                Ok(Err(lineguard_eventlog::Error::StreamNotFound { .. })) => Vec::new(),
                Ok(Err(e)) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
            };
            if events.is_empty() {
                tokio::select! {
                    changed = head.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
                continue;
            }
            for event in events {
                next = event.stream_version + 1;
                let crew_event = CrewEvent {
                    crew_id: crew_id.clone(),
                    sequence: event.stream_version,
                    event: Some(event),
                };
                if tx.send(Ok(crew_event)).await.is_err() {
                    return; // the phone went away
                }
            }
        }
    });
    rx
}
