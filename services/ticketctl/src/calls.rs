//! Who calls, and about what: the storm's calls drawn over a directory's
//! accounts, with the correlation a storm really has.
//!
//! A typhoon does not make calls uniformly: a fault on a feeder darkens the
//! districts it feeds (one to three neighbouring districts of one station),
//! and their customers call over the following minutes, interleaved with the
//! calls of other outages under way and with the usual background (single
//! faults, complaints, inquiries, requests). Outage sizes are heavy-tailed:
//! most feeder faults bring a handful of calls, a few bring a hundred. A
//! customer already waiting calls again (an urge on their open ticket).
//!
//! [`CallPlanner`] draws that from a seed, in memory proportional to the
//! accounts (each a number and a district index): picking a call is a few
//! array lookups, so a province of a million accounts is drawn as fast as
//! the demo county.

use std::collections::HashMap;

use lineguard_protos::intake::v1::TicketKind;
use serde::Deserialize;

use crate::Error;
use crate::simulate::Dice;

/// Districts one feeder fault darkens at most.
const MAX_FEEDER_DISTRICTS: usize = 3;
/// Calls one outage brings at most.
const MAX_OUTAGE_CALLS: usize = 150;
/// Outages under way at once at most (a new one waits for room).
const MAX_ACTIVE_OUTAGES: usize = 256;
/// Share of calls made by customers of an outage under way, when there is
/// one.
const OUTAGE_CALL_SHARE: f64 = 0.5;
/// Share of background fault calls that are the first of a feeder outage.
const OUTAGE_START_SHARE: f64 = 0.05;
/// Share of background calls that are an earlier caller calling again.
const REPEAT_CALL_SHARE: f64 = 0.08;
/// Earlier callers remembered for calling again (the most recent ones).
const MAX_REMEMBERED_CALLERS: usize = 100_000;

/// A directory's accounts, indexed by district.
#[derive(Debug, Clone)]
pub struct Accounts {
    numbers: Vec<String>,
    district_of: Vec<u32>,
    districts: Vec<String>,
    by_district: Vec<Vec<u32>>,
    /// Each district's station (an index into `stations`), if the
    /// directory file named it.
    station_of: Vec<Option<u32>>,
}

impl Accounts {
    /// Reads the accounts CSV (`account_number,district_id` per line after a
    /// header) and, for feeders, takes the directory's districts' stations
    /// (districts the file does not list form feeders of their own).
    pub fn read(accounts_csv: &str, directory: &StormDirectory) -> Result<Accounts, Error> {
        let text = std::fs::read_to_string(accounts_csv)
            .map_err(|e| Error::Usage(format!("cannot read accounts {accounts_csv}: {e}")))?;
        Accounts::parse(&text, &directory.district_stations())
            .map_err(|e| Error::Usage(format!("accounts {accounts_csv}: {e}")))
    }

    /// Builds the index from the CSV's text and the districts' stations in
    /// the directory's order.
    fn parse(csv: &str, district_stations: &[(String, String)]) -> Result<Accounts, String> {
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut districts: Vec<String> = Vec::new();
        let mut station_of: Vec<Option<u32>> = Vec::new();
        let mut station_index: HashMap<&str, u32> = HashMap::new();
        // The directory's order first: neighbours in the file are
        // neighbours on a feeder.
        for (district, station) in district_stations {
            if index.contains_key(district) {
                continue;
            }
            let next_station = station_index.len() as u32;
            let s = *station_index
                .entry(station.as_str())
                .or_insert(next_station);
            index.insert(district.clone(), districts.len() as u32);
            districts.push(district.clone());
            station_of.push(Some(s));
        }
        let mut numbers = Vec::new();
        let mut district_of = Vec::new();
        for (n, line) in csv.lines().enumerate().skip(1) {
            let Some((account, district)) = line.split_once(',') else {
                if line.trim().is_empty() {
                    continue;
                }
                return Err(format!(
                    "line {}: expected account_number,district_id",
                    n + 1
                ));
            };
            let district = district.trim();
            let d = match index.get(district) {
                Some(d) => *d,
                None => {
                    let d = districts.len() as u32;
                    index.insert(district.to_string(), d);
                    districts.push(district.to_string());
                    station_of.push(None);
                    d
                }
            };
            numbers.push(account.trim().to_string());
            district_of.push(d);
        }
        if numbers.is_empty() {
            return Err("no accounts".into());
        }
        let mut by_district = vec![Vec::new(); districts.len()];
        for (a, d) in district_of.iter().enumerate() {
            by_district[*d as usize].push(a as u32);
        }
        Ok(Accounts {
            numbers,
            district_of,
            districts,
            by_district,
            station_of,
        })
    }

    /// How many accounts.
    pub fn len(&self) -> usize {
        self.numbers.len()
    }

    /// Whether there are none (never, once read).
    pub fn is_empty(&self) -> bool {
        self.numbers.is_empty()
    }

    /// Account `a`'s number.
    pub fn number(&self, a: usize) -> &str {
        &self.numbers[a]
    }

    /// Account `a`'s district id.
    pub fn district(&self, a: usize) -> &str {
        &self.districts[self.district_of[a] as usize]
    }

    /// The districts a fault on the feeder of district `d` darkens: `d` and
    /// up to `extra` next districts of the same station (in the directory's
    /// order) that have accounts.
    fn feeder(&self, d: usize, extra: usize) -> Vec<u32> {
        let mut fed = vec![d as u32];
        let Some(station) = self.station_of[d] else {
            return fed;
        };
        for next in d + 1..self.districts.len() {
            if fed.len() > extra || self.station_of[next] != Some(station) {
                break;
            }
            if !self.by_district[next].is_empty() {
                fed.push(next as u32);
            }
        }
        fed
    }
}

/// One call to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedCall {
    /// The caller's account (an index into [`Accounts`]).
    pub account: usize,
    /// What the call is about.
    pub kind: TicketKind,
    /// Whether it is a customer of a feeder outage under way.
    pub outage: bool,
}

/// An outage under way: the districts it darkened and the calls still to
/// come from them.
#[derive(Debug, Clone)]
struct Outage {
    districts: Vec<u32>,
    calls_left: usize,
}

/// Draws a storm's calls, one after another, from a seed.
#[derive(Debug)]
pub struct CallPlanner<'a> {
    accounts: &'a Accounts,
    dice: Dice,
    active: Vec<Outage>,
    callers: std::collections::VecDeque<usize>,
}

impl<'a> CallPlanner<'a> {
    /// A planner over `accounts`; the same seed, the same calls.
    pub fn new(accounts: &'a Accounts, seed: u64) -> CallPlanner<'a> {
        CallPlanner {
            accounts,
            dice: Dice::new(seed),
            active: Vec::new(),
            callers: std::collections::VecDeque::new(),
        }
    }

    /// The next call.
    pub fn next_call(&mut self) -> PlannedCall {
        let call = if !self.active.is_empty() && self.dice.chance(OUTAGE_CALL_SHARE) {
            self.outage_call()
        } else if !self.callers.is_empty() && self.dice.chance(REPEAT_CALL_SHARE) {
            PlannedCall {
                account: self.callers[self.dice.below(self.callers.len())],
                kind: TicketKind::FaultRepair,
                outage: false,
            }
        } else {
            self.background_call()
        };
        if self.callers.len() == MAX_REMEMBERED_CALLERS {
            self.callers.pop_front();
        }
        self.callers.push_back(call.account);
        call
    }

    /// A call from a customer of one of the outages under way.
    fn outage_call(&mut self) -> PlannedCall {
        let o = self.dice.below(self.active.len());
        let outage = &mut self.active[o];
        let d = outage.districts[self.dice.below(outage.districts.len())] as usize;
        let in_district = &self.accounts.by_district[d];
        let account = in_district[self.dice.below(in_district.len())] as usize;
        outage.calls_left -= 1;
        if outage.calls_left == 0 {
            self.active.swap_remove(o);
        }
        PlannedCall {
            account,
            kind: TicketKind::FaultRepair,
            outage: true,
        }
    }

    /// A call from anywhere: every kind of ticket, faults the most; some
    /// faults are the first call of a feeder outage.
    fn background_call(&mut self) -> PlannedCall {
        let account = self.dice.below(self.accounts.len());
        let kind = match self.dice.below(100) {
            0..=69 => TicketKind::FaultRepair,
            70..=78 => TicketKind::Complaint,
            79..=86 => TicketKind::Inquiry,
            87..=92 => TicketKind::ServiceRequest,
            93..=96 => TicketKind::Report,
            97..=98 => TicketKind::Praise,
            _ => TicketKind::Suggestion,
        };
        let starts_outage = kind == TicketKind::FaultRepair
            && self.active.len() < MAX_ACTIVE_OUTAGES
            && self.dice.chance(OUTAGE_START_SHARE);
        if starts_outage {
            let d = self.accounts.district_of[account] as usize;
            let extra = self.dice.below(MAX_FEEDER_DISTRICTS);
            let districts = self.accounts.feeder(d, extra);
            // Heavy-tailed: half the outages bring 8 calls or fewer, one in
            // ten about 50, a few the most.
            let u = self.dice.unit().max(0.02);
            let calls = (3.0 + 5.0 * (1.0 / u - 1.0)).min(MAX_OUTAGE_CALLS as f64) as usize;
            self.active.push(Outage {
                districts,
                calls_left: calls.max(1),
            });
        }
        PlannedCall {
            account,
            kind,
            outage: starts_outage,
        }
    }
}

/// What a storm needs of a directory file, read once: its districts'
/// stations (the feeders of [`Accounts`]) and its crews (the phones).
#[derive(Debug, Deserialize)]
pub struct StormDirectory {
    #[serde(default)]
    districts: Vec<DistrictEntry>,
    #[serde(default)]
    crews: Vec<CrewEntry>,
}

#[derive(Debug, Deserialize)]
struct DistrictEntry {
    district_id: String,
    station_id: String,
}

#[derive(Debug, Deserialize)]
struct CrewEntry {
    crew_id: String,
}

impl StormDirectory {
    /// Reads the directory file at `path`.
    pub fn read(path: &str) -> Result<StormDirectory, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Usage(format!("cannot read directory {path}: {e}")))?;
        toml::from_str(&text).map_err(|e| Error::Usage(format!("directory {path}: {e}")))
    }

    /// The crews' ids, in the file's order.
    pub fn crews(&self) -> Vec<String> {
        self.crews.iter().map(|c| c.crew_id.clone()).collect()
    }

    /// The districts and their stations, in the file's order.
    fn district_stations(&self) -> Vec<(String, String)> {
        self.districts
            .iter()
            .map(|d| (d.district_id.clone(), d.station_id.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::county::{CountyConfig, generate};

    fn province_like() -> (tempfile::TempDir, Accounts) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CountyConfig {
            companies: 2,
            stations: 10,
            districts: 500,
            managers: 100,
            crews: 30,
            accounts: 50_000,
            seed: 5,
        };
        let g = generate(&config, dir.path()).expect("generate");
        let directory =
            StormDirectory::read(&g.directory.display().to_string()).expect("directory");
        let accounts =
            Accounts::read(&g.accounts.display().to_string(), &directory).expect("accounts");
        (dir, accounts)
    }

    #[test]
    fn outage_calls_come_from_one_stations_neighbouring_districts() {
        let (_dir, accounts) = province_like();
        assert_eq!(accounts.len(), 50_000);
        let mut planner = CallPlanner::new(&accounts, 9);
        let calls: Vec<PlannedCall> = (0..20_000).map(|_| planner.next_call()).collect();
        let outage_calls = calls.iter().filter(|c| c.outage).count();
        // About half of the calls once outages are under way; never all.
        assert!(
            (4_000..16_000).contains(&outage_calls),
            "{outage_calls} outage calls"
        );
        assert!(
            calls
                .iter()
                .all(|c| !c.outage || c.kind == TicketKind::FaultRepair)
        );
        // Every outage's calls stay inside its feeder: at most three
        // neighbouring districts, all of one station.
        for outage in &planner.active {
            assert!(outage.districts.len() <= MAX_FEEDER_DISTRICTS);
            let stations: std::collections::HashSet<_> = outage
                .districts
                .iter()
                .map(|d| accounts.station_of[*d as usize])
                .collect();
            assert_eq!(stations.len(), 1, "one station's feeder");
        }
        // Correlated: the outage calls fall in far fewer districts than as
        // many calls spread uniformly would.
        let districts: std::collections::HashSet<&str> = calls
            .iter()
            .filter(|c| c.outage)
            .map(|c| accounts.district(c.account))
            .collect();
        assert!(
            districts.len() * 4 < outage_calls,
            "{} districts for {outage_calls} outage calls",
            districts.len()
        );
        // Heavy-tailed: some outage brought many more calls than the median.
        let mut sizes: HashMap<&str, usize> = HashMap::new();
        for c in calls.iter().filter(|c| c.outage) {
            *sizes.entry(accounts.district(c.account)).or_default() += 1;
        }
        let biggest = sizes.values().copied().max().unwrap_or(0);
        assert!(biggest >= 40, "biggest district's outage calls: {biggest}");
    }

    #[test]
    fn the_same_seed_draws_the_same_calls() {
        let (_dir, accounts) = province_like();
        let draw = |seed| {
            let mut planner = CallPlanner::new(&accounts, seed);
            (0..2_000).map(|_| planner.next_call()).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn a_malformed_accounts_line_is_named() {
        let err = Accounts::parse("account_number,district_id\n123\n", &[]).expect_err("bad");
        assert!(err.contains("line 2"), "{err}");
        assert!(Accounts::parse("account_number,district_id\n", &[]).is_err());
    }
}
