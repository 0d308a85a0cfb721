//! Partitions: a service run as P instances, each owning a disjoint share
//! of the work, its own RocksDB log and its own names on the bus.
//!
//! An instance's **bus name** is what its log records as every event's
//! source and what everything it owns on the bus is named after: its
//! stream (`LINEGUARD_<NAME>`), its subjects (`lineguard.<name>.…`), its
//! durable consumers (`<name>-from-<source name>`), its log's copy and its
//! data directory. Partition 0 goes by the service's own name
//! (`intake`), partition k > 0 by `<service>-p<k>` (`intake-p1`), so that
//! going from one partition to P keeps partition 0's streams, copy, data
//! and consumers where they are and only adds new ones.
//!
//! An instance consumes only its own partition of each source (routing's
//! partition 1 reads `intake-p1`'s stream), so the subjects it is handed
//! and the catch-up from its source's log carry the partition; a case
//! whose events all belong to one partition never crosses between them.

use std::fmt;

/// The most partitions a service may be split into: the NATS users'
/// rights enumerate every partition's streams and consumers, and an
/// operator must be able to read them.
pub const MAX_PARTITIONS: u16 = 64;

/// One partition of a service split into [`Partition::count`] of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partition {
    index: u16,
    count: u16,
}

/// A partition that cannot be: an index outside the count, or a count
/// outside `1..=MAX_PARTITIONS`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partition {index} of {count}: {reason}")]
pub struct PartitionError {
    /// The index asked for.
    pub index: u32,
    /// The count asked for.
    pub count: u32,
    /// Why it cannot be.
    pub reason: &'static str,
}

impl Partition {
    /// The whole of the work: one partition of one.
    pub const SOLE: Partition = Partition { index: 0, count: 1 };

    /// Partition `index` of `count`.
    pub fn new(index: u32, count: u32) -> Result<Self, PartitionError> {
        let error = |reason| PartitionError {
            index,
            count,
            reason,
        };
        if count == 0 || count > u32::from(MAX_PARTITIONS) {
            return Err(error("the count must be 1 to 64"));
        }
        if index >= count {
            return Err(error("the index must be below the count"));
        }
        // Both fit: count <= MAX_PARTITIONS and index < count.
        let narrow = |n: u32| u16::try_from(n).unwrap_or(MAX_PARTITIONS);
        Ok(Partition {
            index: narrow(index),
            count: narrow(count),
        })
    }

    /// This partition's index, `0..count`.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// How many partitions the service is split into.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// Every partition of a service split into `count` (none if `count`
    /// is not a valid count).
    pub fn all(count: u16) -> impl Iterator<Item = Partition> {
        let count = if (1..=MAX_PARTITIONS).contains(&count) {
            count
        } else {
            0
        };
        (0..count).map(move |index| Partition { index, count })
    }

    /// The name `service`'s instance of this partition goes by on the bus,
    /// in its log and on disk: the service's own for partition 0,
    /// `<service>-p<index>` for the others.
    pub fn bus_name(&self, service: &str) -> String {
        bus_name(service, self.index)
    }

    /// The partition of `count` that owns `key` (a station id): a stable
    /// hash (FNV-1a, 64 bits), the same in every process and every
    /// release, so every instance agrees on the owner without asking.
    pub fn owning(key: &str, count: u16) -> Partition {
        let count = count.clamp(1, MAX_PARTITIONS);
        let index = fnv1a(key.as_bytes()) % u64::from(count);
        Partition {
            // Below count, which is a u16.
            index: u16::try_from(index).unwrap_or(0),
            count,
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.index, self.count)
    }
}

/// The bus name of partition `index` of `service`: see [`Partition::bus_name`].
pub fn bus_name(service: &str, index: u16) -> String {
    if index == 0 {
        service.to_string()
    } else {
        format!("{service}-p{index}")
    }
}

/// A new case id of `kind` (`ticket`, `incident`) opened by `partition`:
/// `<kind>-<unique>` in partition 0 (the ids an unsplit service has always
/// given), `<kind>-p<k>-<unique>` in partition k. A case stays with the
/// partition that opened it until it closes, so its id says, for ever,
/// which instance answers for it ([`Partition::of_case`]).
pub fn case_id(kind: &str, partition: Partition, unique: &str) -> String {
    if partition.index == 0 {
        format!("{kind}-{unique}")
    } else {
        format!("{kind}-p{}-{unique}", partition.index)
    }
}

impl Partition {
    /// The partition of `count` that opened the case `id` names (see
    /// [`case_id`]): 0 for an id without a partition mark (every id an
    /// unsplit service gave), `None` for a mark at or over `count` (an id
    /// from a larger installation, or forged).
    pub fn of_case(id: &str, count: u16) -> Option<Partition> {
        let count = count.clamp(1, MAX_PARTITIONS);
        let index = case_partition_mark(id).unwrap_or(0);
        (index < count).then_some(Partition { index, count })
    }
}

/// The `k` of an id `<kind>-p<k>-<rest>`, if it carries one. A unique
/// part is a UUID (hex digits), so it never starts `p<digits>-`.
fn case_partition_mark(id: &str) -> Option<u16> {
    let (_, rest) = id.split_once('-')?;
    let (mark, _) = rest.split_once('-')?;
    let digits = mark.strip_prefix('p')?;
    if digits.is_empty() || digits.len() > 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// FNV-1a over `bytes`: small, fixed by its published constants, and
/// spread well enough over short ids.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_id_names_the_partition_that_opened_it() {
        let second = Partition::new(1, 2).expect("1 of 2");
        let unique = "0192f3c4-7d1e-7abc-8def-0123456789ab";
        let ticket = case_id("ticket", second, unique);
        assert_eq!(ticket, format!("ticket-p1-{unique}"));
        assert_eq!(Partition::of_case(&ticket, 2), Some(second));
        let first = case_id("incident", Partition::new(0, 2).expect("0 of 2"), unique);
        assert_eq!(first, format!("incident-{unique}"));
        assert_eq!(Partition::of_case(&first, 2).map(|p| p.index()), Some(0));
        // An id from before partitions, or from partition 0, is partition 0's.
        assert_eq!(
            Partition::of_case("ticket-1", 4).map(|p| p.index()),
            Some(0)
        );
        // A mark at or over the count is no partition of this installation.
        assert_eq!(Partition::of_case(&ticket, 1), None);
        assert_eq!(
            Partition::of_case("ticket-p63-x", 64).map(|p| p.index()),
            Some(63)
        );
        // Anything else is no mark: partition 0 answers (NOT_FOUND there).
        assert_eq!(
            Partition::of_case("ticket-p064-x", 64).map(|p| p.index()),
            Some(0)
        );
        assert_eq!(
            Partition::of_case("ticket-pa-x", 2).map(|p| p.index()),
            Some(0)
        );
    }

    #[test]
    fn partition_zero_keeps_the_service_name_and_the_others_carry_their_index() {
        assert_eq!(Partition::SOLE.bus_name("intake"), "intake");
        let second = Partition::new(1, 2).expect("1 of 2");
        assert_eq!(second.bus_name("intake"), "intake-p1");
        assert_eq!(
            Partition::new(0, 2).expect("0 of 2").bus_name("routing"),
            "routing"
        );
    }

    #[test]
    fn a_consumer_in_a_partition_reads_that_partition_of_its_source() {
        let config = crate::ConsumerConfig::new("routing-from-intake", "intake").filtered(vec![
            crate::subjects::event_type_filter("intake", "lineguard.intake.v1.TicketReported"),
        ]);
        let second = Partition::new(1, 2).expect("1 of 2");
        let moved = config
            .clone()
            .in_partition(second, "routing-p1-from-intake-p1".into());
        assert_eq!(moved.source_service, "intake-p1");
        assert_eq!(moved.name, "routing-p1-from-intake-p1");
        assert_eq!(
            moved.filter_subjects,
            vec!["lineguard.intake-p1.TicketReported.*".to_string()]
        );
        // Partition 0 reads the source as an unsplit service does.
        let first = config.in_partition(Partition::SOLE, "routing-from-intake".into());
        assert_eq!(first.source_service, "intake");
        assert_eq!(
            first.filter_subjects,
            vec!["lineguard.intake.TicketReported.*".to_string()]
        );
    }

    #[test]
    fn impossible_partitions_are_refused_with_the_reason() {
        assert!(Partition::new(2, 2).is_err());
        assert!(Partition::new(0, 0).is_err());
        let too_many = Partition::new(0, 65).expect_err("65 partitions");
        assert!(too_many.to_string().contains("1 to 64"), "{too_many}");
        assert_eq!(Partition::all(3).count(), 3);
        assert_eq!(Partition::all(0).count(), 0);
    }

    #[test]
    fn a_station_has_one_owner_stable_across_releases() {
        // Known FNV-1a values: the hash must never change, or stations
        // would move between partitions on an upgrade.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        for count in 1..=8 {
            let owner = Partition::owning("st-chengguan", count);
            assert!(owner.index() < count);
            assert_eq!(owner, Partition::owning("st-chengguan", count));
        }
        assert_eq!(Partition::owning("st-chengguan", 1), Partition::SOLE);
        // Spread: the demo county's four stations over two partitions are
        // not all in one.
        let stations = ["st-chengguan", "st-dongpo", "st-xihe", "st-shanyang"];
        let in_first = stations
            .iter()
            .filter(|s| Partition::owning(s, 2).index() == 0)
            .count();
        assert!(in_first > 0 && in_first < stations.len(), "{in_first}");
    }
}
