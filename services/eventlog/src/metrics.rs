//! What the log's writer measures, for Prometheus: how long a group commit
//! takes (the batch write and its fsync), how many commits and events a
//! group carries, and how many groups failed. Process-wide, like the
//! writer's disk: [`LOG_METRICS`] is registered once by the service's host
//! (`lineguard_runtime::metrics`).

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The writer's instruments.
#[derive(Debug)]
pub struct LogMetrics {
    /// Seconds from a group's first staged commit to its write being
    /// durable (one RocksDB batch, one fsync).
    pub commit_duration: Histogram,
    /// Commits (transactions and decisions) per group.
    pub group_commits: Histogram,
    /// Events written to the log.
    pub events_appended: Counter,
    /// Group writes that failed (nothing of the group written).
    pub commit_failures: Counter,
}

/// The process's log instruments.
pub static LOG_METRICS: LazyLock<LogMetrics> = LazyLock::new(|| LogMetrics {
    // 100 µs to about 3 s: an fsync on a fast disk to a stalled one.
    commit_duration: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
    // 1 to 1,024 commits (the writer's group limit is below it).
    group_commits: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
    events_appended: Counter::default(),
    commit_failures: Counter::default(),
});

impl LogMetrics {
    /// Adds the instruments to `registry` (prefixed there, e.g. `lineguard_`).
    pub fn register(&'static self, registry: &mut Registry) {
        registry.register_with_unit(
            "eventlog_commit_duration",
            "Time from a group's first commit staged to its write durable (batch write and fsync)",
            Unit::Seconds,
            self.commit_duration.clone(),
        );
        registry.register(
            "eventlog_group_commits",
            "Commits (transactions and decisions) written together in one group",
            self.group_commits.clone(),
        );
        registry.register(
            "eventlog_events_appended",
            "Events written to the log",
            self.events_appended.clone(),
        );
        registry.register(
            "eventlog_commit_failures",
            "Group writes that failed (nothing of the group written)",
            self.commit_failures.clone(),
        );
    }

    /// Records one group written in `took` with `commits` commits and
    /// `events` events, or failed.
    pub(crate) fn group(&self, took: Duration, commits: usize, events: u64, written: bool) {
        if written {
            self.commit_duration.observe(took.as_secs_f64());
            self.group_commits.observe(commits as f64);
            self.events_appended.inc_by(events);
        } else {
            self.commit_failures.inc();
        }
    }
}
