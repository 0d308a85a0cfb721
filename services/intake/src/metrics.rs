//! Intake's own figure for Prometheus: open tickets by status and line,
//! read at each scrape from the counts its projection keeps beside the
//! views (`projection::STATUS_COUNT_PREFIX`), so the figure is always a
//! recount of the log's (rebuilt with the views). An incident counts once,
//! by its lead ticket; its attached callers follow the lead.

use lineguard_eventlog::EventLog;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::projection::{STATUS_COUNT_PREFIX, is_open, status_count_of_key};

/// Counts kept at most (statuses times lines: a few dozen in practice).
const MAX_COUNTS: usize = 1_000;

/// A ticket status and line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    /// `routed`, `accepted`, `dispatched`, ...
    status: String,
    /// The line of defense holding it (1 manager, 2 station, 3 company).
    line: String,
}

/// Reads the open tickets' counts at each scrape.
#[derive(Debug)]
struct OpenTickets {
    log: EventLog,
}

impl Collector for OpenTickets {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let family = Family::<StatusLabels, Gauge>::default();
        match self
            .log
            .projection_scan(STATUS_COUNT_PREFIX, None, MAX_COUNTS)
        {
            Ok(counts) => {
                for (key, value) in counts {
                    let Some((status, line)) = status_count_of_key(&key) else {
                        continue;
                    };
                    let count = <[u8; 8]>::try_from(value.as_slice()).map_or(0, u64::from_le_bytes);
                    if !is_open(status) {
                        continue;
                    }
                    let name = status
                        .as_str_name()
                        .trim_start_matches("TICKET_STATUS_")
                        .to_ascii_lowercase();
                    family
                        .get_or_create(&StatusLabels {
                            status: name,
                            line: line.to_string(),
                        })
                        .set(i64::try_from(count).unwrap_or(i64::MAX));
                }
            }
            // Shown as no series (and a log line), never as zero tickets.
            Err(e) => tracing::warn!(error = %e, "open tickets could not be counted"),
        }
        let metric = encoder.encode_descriptor(
            "intake_open_tickets",
            "Open tickets by status and line (an incident once, by its lead)",
            None,
            family.metric_type(),
        )?;
        family.encode(metric)
    }
}

/// Registers intake's figures in `registry`, read from `log`.
pub fn register(registry: &mut Registry, log: EventLog) {
    registry.register_collector(Box::new(OpenTickets { log }));
}
