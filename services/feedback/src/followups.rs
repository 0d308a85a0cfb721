//! [`Feedback`]: what the service decides: follow-ups falling due and
//! going overdue, the customer's verdict and reopen, complaints and praise.
//!
//! Every decision about one ticket is taken under that ticket's lock and
//! committed before the lock is released, so a verdict and an overdue
//! timer (or two retries) never both act on the same follow-up.

use std::sync::Arc;
use std::time::Duration;

use lineguard_eventlog::{
    Actor, ActorKind, EventLog, ExpectedVersion, NewEvent, Transaction, actor, timers,
};
use lineguard_protos::feedback::v1::{
    CaseRecord, FollowUpOverdue, FollowUpScheduled, FollowUpStatus, FollowUpTimer, Level, Subject,
    TicketRecord,
};
use lineguard_protos::routing::v1::{Crew, Manager, Station};
use lineguard_runtime::locks::StripedLocks;
use lineguard_runtime::periodic::Periodic;
use prost::Message;
use prost_types::Timestamp;
use tonic::Status;

use crate::projection::{case_key, directory_key, nanos, ticket_key};
use crate::rules::Rules;

/// Due follow-up timers acted on per tick (the rest wait for the next).
pub const SCAN_BATCH: usize = 256;

/// The current time.
pub fn now() -> Timestamp {
    lineguard_eventlog::clock::now()
}

/// `at` plus `span`.
pub fn after(at: &Timestamp, span: Duration) -> Timestamp {
    let n = nanos(at) + span.as_nanos() as i128;
    Timestamp {
        seconds: n.div_euclid(1_000_000_000) as i64,
        nanos: n.rem_euclid(1_000_000_000) as i32,
    }
}

/// Feedback's shared state.
#[derive(Clone)]
pub struct Feedback {
    log: EventLog,
    locks: Arc<StripedLocks>,
    rules: Arc<Rules>,
}

fn system() -> Actor {
    actor(ActorKind::System, "feedback")
}

fn undecodable(key: &[u8], e: prost::DecodeError) -> Status {
    Status::data_loss(format!(
        "undecodable record {}: {e}",
        String::from_utf8_lossy(key)
    ))
}

impl Feedback {
    pub fn new(log: EventLog, rules: Rules) -> Self {
        Feedback {
            log,
            locks: Arc::new(StripedLocks::new(256)),
            rules: Arc::new(rules),
        }
    }

    pub fn log(&self) -> &EventLog {
        &self.log
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Locks the given tickets (in a fixed order: no deadlock).
    pub async fn lock_owned(&self, tickets: &[String]) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let keys: Vec<String> = tickets.iter().map(|t| format!("ticket/{t}")).collect();
        self.locks.lock_owned(&keys).await
    }

    fn get<M: Message + Default>(&self, key: &[u8]) -> Result<Option<M>, Status> {
        match self.log.projection_get(key).map_err(Status::from)? {
            Some(bytes) => M::decode(bytes.as_slice())
                .map(Some)
                .map_err(|e| undecodable(key, e)),
            None => Ok(None),
        }
    }

    pub fn ticket(&self, ticket: &str) -> Result<Option<TicketRecord>, Status> {
        self.get(&ticket_key(ticket))
    }

    pub fn case(&self, case: &str) -> Result<Option<CaseRecord>, Status> {
        self.get(&case_key(case))
    }

    pub fn manager(&self, id: &str) -> Result<Option<Manager>, Status> {
        self.get(&directory_key("manager", id))
    }

    pub fn crew(&self, id: &str) -> Result<Option<Crew>, Status> {
        self.get(&directory_key("crew", id))
    }

    pub fn station(&self, id: &str) -> Result<Option<Station>, Status> {
        self.get(&directory_key("station", id))
    }

    /// A subject and the station and company above it, as the directory
    /// stands; `None` if the directory does not know it.
    pub fn with_superiors(&self, subject: &Subject) -> Result<Option<Vec<Subject>>, Status> {
        let station_id = match subject.level() {
            Level::Manager => self.manager(&subject.id)?.map(|m| m.station_id),
            Level::Crew => self.crew(&subject.id)?.map(|c| c.station_id),
            Level::Station => self.station(&subject.id)?.map(|s| s.station_id),
            Level::Company => {
                let known = self
                    .log
                    .projection_get(&directory_key("company", &subject.id))
                    .map_err(Status::from)?
                    .is_some();
                return Ok(known.then(|| vec![subject.clone()]));
            }
            Level::Unspecified => None,
        };
        let Some(station_id) = station_id else {
            return Ok(None);
        };
        let mut out = vec![subject.clone()];
        let station = Subject {
            level: Level::Station as i32,
            id: station_id.clone(),
        };
        if !out.contains(&station) {
            out.push(station);
        }
        if let Some(s) = self.station(&station_id)? {
            out.push(Subject {
                level: Level::Company as i32,
                id: s.company_id,
            });
        }
        Ok(Some(out))
    }

    /// The follow-ups a resolution makes due: one per covered ticket that
    /// has none pending and none recorded since its last reopen.
    pub fn schedule(
        &self,
        case_id: &str,
        tickets: &[String],
        resolution: &str,
        resolved_at: &Timestamp,
        cause: &str,
    ) -> Result<Vec<(String, NewEvent)>, Status> {
        let mut events = Vec::new();
        for ticket_id in tickets {
            let Some(ticket) = self.ticket(ticket_id)? else {
                continue;
            };
            if ticket.cancelled {
                continue;
            }
            let needs_one = match &ticket.follow_up {
                None => true,
                Some(f) => f.status() == FollowUpStatus::Recorded && f.reopened,
            };
            if !needs_one {
                continue;
            }
            let scheduled = FollowUpScheduled {
                ticket_id: ticket_id.clone(),
                case_id: case_id.to_string(),
                resolution: resolution.to_string(),
                resolved_at: Some(*resolved_at),
                due_at: Some(after(resolved_at, self.rules.follow_up_within(ticket.kind))),
            };
            events.push((
                ticket_id.clone(),
                NewEvent::new(&scheduled, case_id, system()).caused_by(cause),
            ));
        }
        Ok(events)
    }

    /// Marks the follow-ups due by `now` overdue (at most [`SCAN_BATCH`]);
    /// returns how many.
    pub async fn mark_overdue(&self, now: &Timestamp) -> Result<usize, Status> {
        let mut marked = 0;
        let mut due = timers::DueTimers::new(&self.log, now, SCAN_BATCH, 64 * SCAN_BATCH);
        while marked < SCAN_BATCH
            && let Some((key, value)) = due.next_timer().map_err(Status::from)?
        {
            let timer =
                FollowUpTimer::decode(value.as_slice()).map_err(|e| undecodable(&key, e))?;
            let _guard = self
                .lock_owned(std::slice::from_ref(&timer.ticket_id))
                .await;
            // Re-read under the lock: a verdict may have come meanwhile.
            if self
                .log
                .projection_get(&key)
                .map_err(Status::from)?
                .is_none()
            {
                continue;
            }
            let due = self
                .ticket(&timer.ticket_id)?
                .and_then(|t| t.follow_up)
                .filter(|f| f.status() == FollowUpStatus::Due);
            let Some(due) = due else {
                continue;
            };
            let overdue = FollowUpOverdue {
                ticket_id: timer.ticket_id.clone(),
                due_at: due.due_at,
                overdue_at: Some(*now),
            };
            self.log
                .commit(Transaction::append(
                    &timer.ticket_id,
                    ExpectedVersion::Any,
                    vec![NewEvent::new(&overdue, &due.case_id, system())],
                ))
                .await
                .map_err(Status::from)?;
            tracing::info!(ticket_id = %timer.ticket_id, correlation_id = %due.case_id,
                "follow-up overdue");
            marked += 1;
        }
        Ok(marked)
    }

    /// The background task marking follow-ups overdue every `tick`.
    pub fn spawn_overdue_timer(&self, tick: Duration) -> Periodic {
        let feedback = self.clone();
        Periodic::spawn("feedback-follow-ups", tick, move || {
            let feedback = feedback.clone();
            async move { feedback.mark_overdue(&now()).await }
        })
    }
}
