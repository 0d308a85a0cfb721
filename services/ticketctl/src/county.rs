//! `generate county`: a seeded county of any size, as the two files
//! routing loads (`--directory`): a directory TOML (one company, its
//! stations, districts, managers and crews) and its accounts CSV. The same
//! seed and sizes give the same files, byte for byte.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::simulate::Dice;

/// The sizes of a generated county.
#[derive(Debug, Clone, clap::Args)]
pub struct CountyConfig {
    /// Power supply stations.
    #[arg(long, default_value_t = 5)]
    pub stations: usize,
    /// Transformer districts, spread over the stations.
    #[arg(long, default_value_t = 200)]
    pub districts: usize,
    /// District managers, spread over the stations (each owns several districts).
    #[arg(long, default_value_t = 50)]
    pub managers: usize,
    /// Field crews, spread over the stations.
    #[arg(long, default_value_t = 20)]
    pub crews: usize,
    /// Customer accounts, spread over the districts.
    #[arg(long, default_value_t = 100_000)]
    pub accounts: usize,
    /// Seed of the choices (area classes, household counts, accounts).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Most of anything one generated county holds.
pub const MAX_STATIONS: usize = 1_000;
pub const MAX_DISTRICTS: usize = 100_000;
pub const MAX_ACCOUNTS: usize = 10_000_000;

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generated {
    pub directory: PathBuf,
    pub accounts: PathBuf,
    pub stations: usize,
    pub districts: usize,
    pub managers: usize,
    pub crews: usize,
    pub account_count: usize,
}

impl CountyConfig {
    fn check(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Usage(what.to_string()));
        if self.stations == 0 || self.stations > MAX_STATIONS {
            return bad("--stations: 1 to 1000");
        }
        if self.districts < self.stations || self.districts > MAX_DISTRICTS {
            return bad("--districts: at least one per station, at most 100000");
        }
        if self.managers < self.stations || self.managers > self.districts {
            return bad("--managers: at least one per station, at most one per district");
        }
        if self.crews < self.stations || self.crews > self.districts {
            return bad("--crews: at least one per station, at most one per district");
        }
        if self.accounts < self.districts || self.accounts > MAX_ACCOUNTS {
            return bad("--accounts: at least one per district, at most 10000000");
        }
        Ok(())
    }
}

/// The `i`-th of `n` items shared out over `groups` groups: its group.
fn group_of(i: usize, n: usize, groups: usize) -> usize {
    i * groups / n
}

/// Station `s`'s share of `n` items: the range of their indexes.
fn share(s: usize, n: usize, groups: usize) -> std::ops::Range<usize> {
    let start = (0..n).find(|&i| group_of(i, n, groups) == s).unwrap_or(n);
    let end = (start..n)
        .find(|&i| group_of(i, n, groups) != s)
        .unwrap_or(n);
    start..end
}

/// District `d`'s id.
pub fn district_id(d: usize) -> String {
    format!("d-{:05}", d + 1)
}

/// Writes `county.toml` and `county-accounts.csv` into `dir`.
pub fn generate(config: &CountyConfig, dir: &Path) -> Result<Generated, Error> {
    config.check()?;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Usage(format!("cannot create {}: {e}", dir.display())))?;
    let mut dice = Dice::new(config.seed);
    let mut toml = String::with_capacity(256 * config.districts);
    let _ = writeln!(
        toml,
        "# A generated county (ticketctl generate county --seed {}): {} stations, \
         {} districts, {} managers, {} crews, {} accounts.\n\naccounts_file = \"county-accounts.csv\"\n",
        config.seed,
        config.stations,
        config.districts,
        config.managers,
        config.crews,
        config.accounts
    );
    let _ = writeln!(
        toml,
        "[[companies]]\ncompany_id = \"co-gen\"\nname = \"Generated County Power Supply Company\"\nsupervisor_desk_id = \"desk-co-gen\"\nsupervision_phone = \"0900-5595598\"\n"
    );
    for s in 0..config.stations {
        let _ = writeln!(
            toml,
            "[[stations]]\nstation_id = \"st-{:03}\"\ncompany_id = \"co-gen\"\nname = \"Station {}\"\nduty_desk_id = \"desk-st-{:03}\"\nduty_phone = \"0900-52{:05}\"\n",
            s + 1,
            s + 1,
            s + 1,
            s + 1
        );
    }
    for m in 0..config.managers {
        let s = group_of(m, config.managers, config.stations);
        let _ = writeln!(
            toml,
            "[[managers]]\nmanager_id = \"m-{:04}\"\nstation_id = \"st-{:03}\"\nname = \"Manager {}\"\nphone = \"139-{:08}\"\n",
            m + 1,
            s + 1,
            m + 1,
            m + 1
        );
    }
    for d in 0..config.districts {
        let s = group_of(d, config.districts, config.stations);
        let districts = share(s, config.districts, config.stations);
        let managers = share(s, config.managers, config.stations);
        // The station's districts shared out over its managers.
        let m =
            managers.start + (d - districts.start) * managers.len().max(1) / districts.len().max(1);
        let area = match dice.below(100) {
            0..=39 => "urban",
            40..=84 => "rural",
            _ => "remote",
        };
        let households = 50 + dice.below(450);
        let _ = writeln!(
            toml,
            "[[districts]]\ndistrict_id = \"{}\"\nstation_id = \"st-{:03}\"\nname = \"Transformer {}\"\narea_class = \"{area}\"\nhouseholds = {households}\nmanager_id = \"m-{:04}\"\n",
            district_id(d),
            s + 1,
            d + 1,
            m + 1
        );
    }
    for c in 0..config.crews {
        let s = group_of(c, config.crews, config.stations);
        let districts = share(s, config.districts, config.stations);
        let crews = share(s, config.crews, config.stations);
        // The station's districts shared out over its crews.
        let k = c - crews.start;
        let served: Vec<String> = districts
            .clone()
            .filter(|d| (d - districts.start) * crews.len() / districts.len().max(1) == k)
            .map(|d| format!("\"{}\"", district_id(d)))
            .collect();
        let _ = writeln!(
            toml,
            "[[crews]]\ncrew_id = \"crew-{:03}\"\nstation_id = \"st-{:03}\"\nmembers = [\"Crew {} A\", \"Crew {} B\"]\ndistrict_ids = [{}]\n",
            c + 1,
            s + 1,
            c + 1,
            c + 1,
            served.join(", ")
        );
    }
    let mut csv = String::with_capacity(30 * config.accounts);
    csv.push_str("account_number,district_id\n");
    for a in 0..config.accounts {
        // Every district has at least one account; the rest fall anywhere.
        let d = if a < config.districts {
            a
        } else {
            dice.below(config.districts)
        };
        let _ = writeln!(csv, "41{:08},{}", a + 1, district_id(d));
    }
    let directory = dir.join("county.toml");
    let accounts = dir.join("county-accounts.csv");
    std::fs::write(&directory, toml)
        .map_err(|e| Error::Usage(format!("cannot write {}: {e}", directory.display())))?;
    std::fs::write(&accounts, csv)
        .map_err(|e| Error::Usage(format!("cannot write {}: {e}", accounts.display())))?;
    Ok(Generated {
        directory,
        accounts,
        stations: config.stations,
        districts: config.districts,
        managers: config.managers,
        crews: config.crews,
        account_count: config.accounts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_district_has_a_manager_a_crew_and_an_account_of_its_station() {
        let config = CountyConfig {
            stations: 3,
            districts: 20,
            managers: 7,
            crews: 5,
            accounts: 200,
            seed: 1,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let g = generate(&config, dir.path()).expect("generate");
        let text = std::fs::read_to_string(&g.directory).expect("read");
        let parsed: toml::Value = toml::from_str(&text).expect("toml");
        let districts = parsed["districts"].as_array().expect("districts");
        assert_eq!(districts.len(), 20);
        let crews = parsed["crews"].as_array().expect("crews");
        let served: usize = crews
            .iter()
            .map(|c| c["district_ids"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(served, 20, "every district served by exactly one crew");
        for c in crews {
            assert!(!c["district_ids"].as_array().expect("list").is_empty());
        }
        let managers: std::collections::HashSet<&str> = districts
            .iter()
            .filter_map(|d| d["manager_id"].as_str())
            .collect();
        assert_eq!(managers.len(), 7, "every manager owns a district");
        let accounts = std::fs::read_to_string(&g.accounts).expect("read");
        assert_eq!(accounts.lines().count(), 201);
        // The same seed, the same county.
        let again = tempfile::tempdir().expect("tempdir");
        let g2 = generate(&config, again.path()).expect("generate");
        assert_eq!(
            std::fs::read(&g2.directory).ok(),
            std::fs::read(&g.directory).ok()
        );
        assert!(generate(&CountyConfig { crews: 2, ..config }, again.path()).is_err());
    }
}
