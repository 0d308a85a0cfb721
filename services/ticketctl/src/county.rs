//! `generate county` and `generate province`: a seeded directory of any
//! size, as the two files routing loads (`--directory`): a directory TOML
//! (companies, their stations, districts, managers and crews) and its
//! accounts CSV. The same seed and sizes give the same files, byte for byte.
//!
//! A province is a county scaled up ([`CountyConfig::province`]): ten
//! companies (one per prefecture), 100 stations, 5,000 districts, 1,500
//! managers, three crews a station and 1,000,000 accounts, the size the
//! speed benchmarks run at.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::simulate::Dice;

/// The sizes of a generated county.
#[derive(Debug, Clone, clap::Args)]
pub struct CountyConfig {
    /// Power supply companies, each with its own supervision desk; the
    /// stations are shared out over them.
    #[arg(long, default_value_t = 1)]
    pub companies: usize,
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
pub const MAX_COMPANIES: usize = 100;
/// Most stations.
pub const MAX_STATIONS: usize = 1_000;
/// Most districts.
pub const MAX_DISTRICTS: usize = 100_000;
/// Most accounts.
pub const MAX_ACCOUNTS: usize = 10_000_000;

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generated {
    pub directory: PathBuf,
    pub companies: usize,
    pub accounts: PathBuf,
    pub stations: usize,
    pub districts: usize,
    pub managers: usize,
    pub crews: usize,
    pub account_count: usize,
}

impl CountyConfig {
    /// A province: ten companies, 100 stations, 5,000 districts (50 a
    /// station), 1,500 managers, 300 crews (three a station) and 1,000,000
    /// accounts (200 a district on average).
    pub fn province(seed: u64) -> CountyConfig {
        CountyConfig {
            companies: 10,
            stations: 100,
            districts: 5_000,
            managers: 1_500,
            crews: 300,
            accounts: 1_000_000,
            seed,
        }
    }

    fn check(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Usage(what.to_string()));
        if self.companies == 0 || self.companies > MAX_COMPANIES {
            return bad("--companies: 1 to 100");
        }
        if self.stations < self.companies {
            return bad("--stations: at least one per company");
        }
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

/// Company `c`'s id: `co-gen` when there is one (a county), else
/// `co-gen-01`, `co-gen-02`, ….
fn company_id(c: usize, companies: usize) -> String {
    if companies == 1 {
        "co-gen".to_string()
    } else {
        format!("co-gen-{:02}", c + 1)
    }
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
        "# Generated (ticketctl generate, --seed {}): {} companies, {} stations, \
         {} districts, {} managers, {} crews, {} accounts.\n\naccounts_file = \"county-accounts.csv\"\n",
        config.seed,
        config.companies,
        config.stations,
        config.districts,
        config.managers,
        config.crews,
        config.accounts
    );
    for c in 0..config.companies {
        let _ = writeln!(
            toml,
            "[[companies]]\ncompany_id = \"{}\"\nname = \"Generated Power Supply Company {}\"\nsupervisor_desk_id = \"desk-{}\"\nsupervision_phone = \"0900-55{:05}\"\n",
            company_id(c, config.companies),
            c + 1,
            company_id(c, config.companies),
            95598 + c
        );
    }
    for s in 0..config.stations {
        let c = group_of(s, config.stations, config.companies);
        let _ = writeln!(
            toml,
            "[[stations]]\nstation_id = \"st-{:03}\"\ncompany_id = \"{}\"\nname = \"Station {}\"\nduty_desk_id = \"desk-st-{:03}\"\nduty_phone = \"0900-52{:05}\"\n",
            s + 1,
            company_id(c, config.companies),
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
        companies: config.companies,
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
            companies: 1,
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

    #[test]
    fn a_province_shares_its_stations_out_over_its_companies() {
        let config = CountyConfig {
            companies: 3,
            stations: 7,
            districts: 30,
            managers: 10,
            crews: 8,
            accounts: 300,
            seed: 3,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let g = generate(&config, dir.path()).expect("generate");
        let parsed: toml::Value =
            toml::from_str(&std::fs::read_to_string(&g.directory).expect("read")).expect("toml");
        let companies: Vec<&str> = parsed["companies"]
            .as_array()
            .expect("companies")
            .iter()
            .filter_map(|c| c["company_id"].as_str())
            .collect();
        assert_eq!(companies, ["co-gen-01", "co-gen-02", "co-gen-03"]);
        let mut stations_of = std::collections::BTreeMap::<&str, usize>::new();
        for s in parsed["stations"].as_array().expect("stations") {
            let company = s["company_id"].as_str().expect("company_id");
            assert!(companies.contains(&company), "{company} is defined");
            *stations_of.entry(company).or_default() += 1;
        }
        assert_eq!(stations_of.values().copied().collect::<Vec<_>>(), [3, 2, 2]);
        // The province preset is within every limit, and fewer stations
        // than companies is refused.
        assert!(CountyConfig::province(1).check().is_ok());
        assert!(
            generate(
                &CountyConfig {
                    companies: 8,
                    ..config
                },
                dir.path()
            )
            .is_err()
        );
    }
}
