//! What the bus side of a service counts, for Prometheus: events the outbox
//! relay published, and per consumer what became of the messages it was
//! delivered (applied, parked, dead-lettered, handed back to be delivered
//! again). Process-wide: [`BUS_METRICS`] is registered once by the
//! service's host (`lineguard_runtime::metrics`), beside the figures it
//! reads at each scrape (lag from JetStream, parked and dead-lettered
//! events recounted from the log).
//!
//! The consumer label is the consumer's durable name: one per source a
//! service reads, fixed by `lineguard_runtime::bus_access` (bounded).

use std::sync::LazyLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Which consumer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// The consumer's durable name (`routing-from-intake`).
    pub consumer: String,
}

/// What became of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Applied to the service's log (or found already recorded there).
    applied,
    /// Parked in the log until what it waits for lands.
    parked,
    /// Dead-lettered in the log (refused, or failing past its deliveries).
    dead_lettered,
    /// Handed back to JetStream to be delivered again later.
    redelivered,
}

/// A consumer and an outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The consumer's durable name.
    pub consumer: String,
    /// What became of the message.
    pub outcome: Outcome,
}

/// The bus side's instruments.
#[derive(Debug, Default)]
pub struct BusMetrics {
    /// Events the outbox relay published and JetStream acknowledged.
    pub relay_published: Counter,
    /// Runs of the outbox JetStream refused as one atomic batch (one held a
    /// message it already had, or the stream takes no batches), published
    /// again one message at a time.
    pub relay_runs_one_by_one: Counter,
    /// Delivered messages by consumer and outcome.
    pub consumer_messages: Family<OutcomeLabels, Counter>,
}

/// The process's bus instruments.
pub static BUS_METRICS: LazyLock<BusMetrics> = LazyLock::new(BusMetrics::default);

impl BusMetrics {
    /// Adds the instruments to `registry` (prefixed there, e.g. `lineguard_`).
    pub fn register(&'static self, registry: &mut Registry) {
        registry.register(
            "relay_published_events",
            "Events the outbox relay published and JetStream acknowledged",
            self.relay_published.clone(),
        );
        registry.register(
            "relay_runs_one_by_one",
            "Runs of the outbox refused as one atomic batch and published one message at a time",
            self.relay_runs_one_by_one.clone(),
        );
        registry.register(
            "consumer_messages",
            "Messages a consumer was delivered, by what became of them",
            self.consumer_messages.clone(),
        );
    }

    /// Counts one message of `consumer` ending as `outcome`.
    pub fn message(&self, consumer: &str, outcome: Outcome) {
        self.consumer_messages
            .get_or_create(&OutcomeLabels {
                consumer: consumer.to_string(),
                outcome,
            })
            .inc();
    }
}
