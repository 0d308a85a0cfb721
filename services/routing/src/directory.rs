//! The directory: companies → stations → districts → managers, desks, crews,
//! and customer accounts → districts.
//!
//! It lives in routing's log as events (`CompanyDefined`, …,
//! `AccountsAssigned`) and is read from the projection. At start-up a file
//! (`deploy/directory.toml` and the accounts CSV it names) is compared with
//! the projection and only the differences are appended, so restarting with
//! the same file writes nothing.

use std::collections::HashSet;
use std::path::Path;

use lineguard_eventlog::{EventLog, ExpectedVersion, NewEvent, Transaction};
use lineguard_protos::routing::v1::{
    AccountAssignment, AccountsAssigned, AreaClass, Company, CompanyDefined, Crew, CrewDefined,
    District, DistrictDefined, Manager, ManagerDefined, Station, StationDefined,
};
use prost::Message;
use serde::Deserialize;

use crate::projection::{
    account_key, company_key, crew_key, district_accounts_prefix, district_key, manager_key,
    station_crews_prefix, station_key,
};

/// The stream holding every directory event.
pub const DIRECTORY_STREAM: &str = "directory";
/// Accounts per `AccountsAssigned` event (about 60 KiB of payload).
pub const ACCOUNTS_PER_EVENT: usize = 2_000;
/// Longest id in the directory.
pub const MAX_ID_CHARS: usize = 64;
/// Longest name.
pub const MAX_NAME_CHARS: usize = 128;
/// Most members or districts of one crew.
pub const MAX_CREW_LIST: usize = 256;
/// Stations read at most to find whose duty desk an id is.
pub const MAX_STATIONS_SCANNED: usize = 10_000;

/// Why a directory file or entry was refused; names the entry and field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DirectoryError(pub String);

fn err(text: impl Into<String>) -> DirectoryError {
    DirectoryError(text.into())
}

/// An id as the log and the bus accept it.
pub fn check_id(field: &str, value: &str) -> Result<(), DirectoryError> {
    if value.is_empty() || value.len() > MAX_ID_CHARS {
        return Err(err(format!(
            "{field}: must be 1 to {MAX_ID_CHARS} characters"
        )));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err(format!(
            "{field}: {value:?} may hold only letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

fn check_name(field: &str, value: &str) -> Result<(), DirectoryError> {
    if value.chars().count() > MAX_NAME_CHARS || value.chars().any(char::is_control) {
        return Err(err(format!(
            "{field}: at most {MAX_NAME_CHARS} printable characters"
        )));
    }
    Ok(())
}

/// Reads directory entries from routing's projections.
#[derive(Clone)]
pub struct DirectoryReader {
    log: EventLog,
}

impl DirectoryReader {
    pub fn new(log: EventLog) -> Self {
        DirectoryReader { log }
    }

    fn get<M: Message + Default>(&self, key: &[u8]) -> Result<Option<M>, DirectoryError> {
        match self
            .log
            .projection_get(key)
            .map_err(|e| err(e.to_string()))?
        {
            Some(bytes) => M::decode(bytes.as_slice())
                .map(Some)
                .map_err(|e| err(format!("undecodable directory entry: {e}"))),
            None => Ok(None),
        }
    }

    pub fn company(&self, id: &str) -> Result<Option<Company>, DirectoryError> {
        self.get(&company_key(id))
    }
    pub fn station(&self, id: &str) -> Result<Option<Station>, DirectoryError> {
        self.get(&station_key(id))
    }
    pub fn district(&self, id: &str) -> Result<Option<District>, DirectoryError> {
        self.get(&district_key(id))
    }
    pub fn manager(&self, id: &str) -> Result<Option<Manager>, DirectoryError> {
        self.get(&manager_key(id))
    }
    pub fn crew(&self, id: &str) -> Result<Option<Crew>, DirectoryError> {
        self.get(&crew_key(id))
    }

    /// The district an account is in.
    pub fn account_district(&self, account: &str) -> Result<Option<String>, DirectoryError> {
        Ok(self
            .log
            .projection_get(&account_key(account))
            .map_err(|e| err(e.to_string()))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Up to `limit` of a district's accounts in order, after `after`.
    pub fn district_accounts(
        &self,
        district: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, DirectoryError> {
        let prefix = district_accounts_prefix(district);
        let start = after.map(|a| {
            let mut key = prefix.clone();
            key.extend_from_slice(a.as_bytes());
            key
        });
        let keys = self
            .log
            .projection_scan(&prefix, start.as_deref(), limit)
            .map_err(|e| err(e.to_string()))?;
        Ok(keys
            .into_iter()
            .map(|(key, _)| String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            .collect())
    }

    /// The station of an assignee: a manager's station, or the station
    /// whose duty desk it is (read from at most [`MAX_STATIONS_SCANNED`]
    /// stations).
    pub fn station_of(&self, assignee: &str) -> Result<Option<String>, DirectoryError> {
        if let Some(manager) = self.manager(assignee)? {
            return Ok(Some(manager.station_id));
        }
        let prefix = station_key("");
        let stations = self
            .log
            .projection_scan(&prefix, None, MAX_STATIONS_SCANNED)
            .map_err(|e| err(e.to_string()))?;
        for (_, value) in stations {
            let station = Station::decode(value.as_slice())
                .map_err(|e| err(format!("undecodable directory entry: {e}")))?;
            if station.duty_desk_id == assignee {
                return Ok(Some(station.station_id));
            }
        }
        Ok(None)
    }

    /// A station's crews, in id order (at most [`MAX_CREW_LIST`]).
    pub fn station_crews(&self, station: &str) -> Result<Vec<Crew>, DirectoryError> {
        let prefix = station_crews_prefix(station);
        let keys = self
            .log
            .projection_scan(&prefix, None, MAX_CREW_LIST)
            .map_err(|e| err(e.to_string()))?;
        let mut crews = Vec::with_capacity(keys.len());
        for (key, _) in keys {
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if let Some(crew) = self.crew(&id)? {
                crews.push(crew);
            }
        }
        Ok(crews)
    }
}

// ---- The file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryFile {
    /// CSV of `account_number,district_id`, relative to the directory file.
    accounts_file: Option<String>,
    #[serde(default)]
    companies: Vec<CompanyFile>,
    #[serde(default)]
    stations: Vec<StationFile>,
    #[serde(default)]
    districts: Vec<DistrictFile>,
    #[serde(default)]
    managers: Vec<ManagerFile>,
    #[serde(default)]
    crews: Vec<CrewFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompanyFile {
    company_id: String,
    name: String,
    supervisor_desk_id: String,
    #[serde(default)]
    supervision_phone: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StationFile {
    station_id: String,
    company_id: String,
    name: String,
    duty_desk_id: String,
    #[serde(default)]
    duty_phone: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DistrictFile {
    district_id: String,
    station_id: String,
    name: String,
    area_class: String,
    households: u32,
    manager_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManagerFile {
    manager_id: String,
    station_id: String,
    name: String,
    #[serde(default)]
    phone: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CrewFile {
    crew_id: String,
    station_id: String,
    #[serde(default)]
    members: Vec<String>,
    #[serde(default)]
    district_ids: Vec<String>,
}

/// A whole directory, as a file gives it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Directory {
    pub companies: Vec<Company>,
    pub stations: Vec<Station>,
    pub districts: Vec<District>,
    pub managers: Vec<Manager>,
    pub crews: Vec<Crew>,
    pub accounts: Vec<AccountAssignment>,
}

/// Parses an area class name.
pub fn area_class(name: &str) -> Option<AreaClass> {
    match name {
        "urban" => Some(AreaClass::Urban),
        "rural" => Some(AreaClass::Rural),
        "remote" => Some(AreaClass::Remote),
        _ => None,
    }
}

impl Directory {
    /// Reads a directory file and its accounts CSV, and checks that every
    /// reference resolves.
    pub fn load(path: &Path) -> Result<Directory, DirectoryError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let file: DirectoryFile =
            toml::from_str(&text).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let mut dir = Directory {
            companies: file
                .companies
                .into_iter()
                .map(|c| Company {
                    company_id: c.company_id,
                    name: c.name,
                    supervisor_desk_id: c.supervisor_desk_id,
                    supervision_phone: c.supervision_phone,
                })
                .collect(),
            stations: file
                .stations
                .into_iter()
                .map(|s| Station {
                    station_id: s.station_id,
                    company_id: s.company_id,
                    name: s.name,
                    duty_desk_id: s.duty_desk_id,
                    duty_phone: s.duty_phone,
                })
                .collect(),
            districts: Vec::new(),
            managers: file
                .managers
                .into_iter()
                .map(|m| Manager {
                    manager_id: m.manager_id,
                    station_id: m.station_id,
                    name: m.name,
                    phone: m.phone,
                })
                .collect(),
            crews: file
                .crews
                .into_iter()
                .map(|c| Crew {
                    crew_id: c.crew_id,
                    station_id: c.station_id,
                    members: c.members,
                    district_ids: c.district_ids,
                })
                .collect(),
            accounts: Vec::new(),
        };
        for d in file.districts {
            let area = area_class(&d.area_class).ok_or_else(|| {
                err(format!(
                    "district {}: area_class {:?} is not urban, rural or remote",
                    d.district_id, d.area_class
                ))
            })?;
            dir.districts.push(District {
                district_id: d.district_id,
                station_id: d.station_id,
                name: d.name,
                area_class: area as i32,
                households: d.households,
                manager_id: d.manager_id,
            });
        }
        if let Some(accounts) = file.accounts_file {
            let csv = path.parent().unwrap_or(Path::new(".")).join(accounts);
            dir.accounts = read_accounts(&csv)?;
        }
        dir.check()?;
        Ok(dir)
    }

    /// Checks ids, names and that every reference resolves within the file.
    pub fn check(&self) -> Result<(), DirectoryError> {
        let companies: HashSet<&str> = self
            .companies
            .iter()
            .map(|c| c.company_id.as_str())
            .collect();
        let stations: HashSet<&str> = self
            .stations
            .iter()
            .map(|s| s.station_id.as_str())
            .collect();
        let districts: HashSet<&str> = self
            .districts
            .iter()
            .map(|d| d.district_id.as_str())
            .collect();
        let managers: HashSet<&str> = self
            .managers
            .iter()
            .map(|m| m.manager_id.as_str())
            .collect();
        for c in &self.companies {
            check_company(c)?;
        }
        for s in &self.stations {
            check_station(s)?;
            if !companies.contains(s.company_id.as_str()) {
                return Err(err(format!(
                    "station {}: company {} is not in the directory",
                    s.station_id, s.company_id
                )));
            }
        }
        for m in &self.managers {
            check_manager(m)?;
            if !stations.contains(m.station_id.as_str()) {
                return Err(err(format!(
                    "manager {}: station {} is not in the directory",
                    m.manager_id, m.station_id
                )));
            }
        }
        for d in &self.districts {
            check_district(d)?;
            if !stations.contains(d.station_id.as_str()) {
                return Err(err(format!(
                    "district {}: station {} is not in the directory",
                    d.district_id, d.station_id
                )));
            }
            if !managers.contains(d.manager_id.as_str()) {
                return Err(err(format!(
                    "district {}: manager {} is not in the directory",
                    d.district_id, d.manager_id
                )));
            }
        }
        for c in &self.crews {
            check_crew(c)?;
            if !stations.contains(c.station_id.as_str()) {
                return Err(err(format!(
                    "crew {}: station {} is not in the directory",
                    c.crew_id, c.station_id
                )));
            }
            if let Some(d) = c
                .district_ids
                .iter()
                .find(|d| !districts.contains(d.as_str()))
            {
                return Err(err(format!(
                    "crew {}: district {d} is not in the directory",
                    c.crew_id
                )));
            }
        }
        for a in &self.accounts {
            if !districts.contains(a.district_id.as_str()) {
                return Err(err(format!(
                    "account {}: district {} is not in the directory",
                    a.account_number, a.district_id
                )));
            }
        }
        Ok(())
    }
}

pub fn check_company(c: &Company) -> Result<(), DirectoryError> {
    check_id("company_id", &c.company_id)?;
    check_id("supervisor_desk_id", &c.supervisor_desk_id)?;
    check_phone("supervision_phone", &c.supervision_phone)?;
    check_name("name", &c.name)
}

/// Longest public phone number, in characters.
pub const MAX_PHONE_CHARS: usize = 24;

/// A public contact number: empty, or 3 to 24 characters of digits and
/// '-' with an optional leading '+', holding at least 3 digits.
pub fn check_phone(field: &str, phone: &str) -> Result<(), DirectoryError> {
    if phone.is_empty() {
        return Ok(());
    }
    let body = phone.strip_prefix('+').unwrap_or(phone);
    let digits = body.bytes().filter(u8::is_ascii_digit).count();
    if phone.len() > MAX_PHONE_CHARS
        || digits < 3
        || !body.bytes().all(|b| b.is_ascii_digit() || b == b'-')
    {
        return Err(err(format!(
            "{field}: {phone:?} is not a phone number (digits and '-', an optional leading '+', at most {MAX_PHONE_CHARS})"
        )));
    }
    Ok(())
}

pub fn check_station(s: &Station) -> Result<(), DirectoryError> {
    check_id("station_id", &s.station_id)?;
    check_id("company_id", &s.company_id)?;
    check_id("duty_desk_id", &s.duty_desk_id)?;
    check_phone("duty_phone", &s.duty_phone)?;
    check_name("name", &s.name)
}

pub fn check_district(d: &District) -> Result<(), DirectoryError> {
    check_id("district_id", &d.district_id)?;
    check_id("station_id", &d.station_id)?;
    check_id("manager_id", &d.manager_id)?;
    check_name("name", &d.name)?;
    if d.area_class() == AreaClass::Unspecified {
        return Err(err("area_class: is required (urban, rural or remote)"));
    }
    Ok(())
}

pub fn check_manager(m: &Manager) -> Result<(), DirectoryError> {
    check_id("manager_id", &m.manager_id)?;
    check_id("station_id", &m.station_id)?;
    check_phone("phone", &m.phone)?;
    check_name("name", &m.name)
}

pub fn check_crew(c: &Crew) -> Result<(), DirectoryError> {
    check_id("crew_id", &c.crew_id)?;
    check_id("station_id", &c.station_id)?;
    if c.members.len() > MAX_CREW_LIST || c.district_ids.len() > MAX_CREW_LIST {
        return Err(err(format!(
            "members, district_ids: at most {MAX_CREW_LIST} each"
        )));
    }
    for (i, m) in c.members.iter().enumerate() {
        check_name(&format!("members[{i}]"), m)?;
    }
    for (i, d) in c.district_ids.iter().enumerate() {
        check_id(&format!("district_ids[{i}]"), d)?;
    }
    Ok(())
}

/// Reads `account_number,district_id` lines; `#` starts a comment line, and
/// a first line `account_number,district_id` is a header.
pub fn read_accounts(path: &Path) -> Result<Vec<AccountAssignment>, DirectoryError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let mut accounts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (n == 0 && line.starts_with("account")) {
            continue;
        }
        let (account, district) = line.split_once(',').ok_or_else(|| {
            err(format!(
                "{}:{}: expected account_number,district_id",
                path.display(),
                n + 1
            ))
        })?;
        let at = |field: &str| format!("{}:{}: {field}", path.display(), n + 1);
        check_id(&at("account_number"), account.trim())?;
        check_id(&at("district_id"), district.trim())?;
        accounts.push(AccountAssignment {
            account_number: account.trim().to_string(),
            district_id: district.trim().to_string(),
        });
    }
    Ok(accounts)
}

/// The events that bring the stored directory to `dir`: one per changed
/// entry, and the changed accounts in chunks.
pub fn changes(
    reader: &DirectoryReader,
    dir: &Directory,
    actor: &lineguard_eventlog::Actor,
) -> Result<Vec<NewEvent>, DirectoryError> {
    let mut events = Vec::new();
    let mut add = |changed: bool, event: NewEvent| {
        if changed {
            events.push(event);
        }
    };
    for c in &dir.companies {
        let changed = reader.company(&c.company_id)?.as_ref() != Some(c);
        add(
            changed,
            NewEvent::new(
                &CompanyDefined {
                    company: Some(c.clone()),
                },
                DIRECTORY_STREAM,
                actor.clone(),
            ),
        );
    }
    for s in &dir.stations {
        let changed = reader.station(&s.station_id)?.as_ref() != Some(s);
        add(
            changed,
            NewEvent::new(
                &StationDefined {
                    station: Some(s.clone()),
                },
                DIRECTORY_STREAM,
                actor.clone(),
            ),
        );
    }
    for m in &dir.managers {
        let changed = reader.manager(&m.manager_id)?.as_ref() != Some(m);
        add(
            changed,
            NewEvent::new(
                &ManagerDefined {
                    manager: Some(m.clone()),
                },
                DIRECTORY_STREAM,
                actor.clone(),
            ),
        );
    }
    for d in &dir.districts {
        let changed = reader.district(&d.district_id)?.as_ref() != Some(d);
        add(
            changed,
            NewEvent::new(
                &DistrictDefined {
                    district: Some(d.clone()),
                },
                DIRECTORY_STREAM,
                actor.clone(),
            ),
        );
    }
    for c in &dir.crews {
        let changed = reader.crew(&c.crew_id)?.as_ref() != Some(c);
        add(
            changed,
            NewEvent::new(
                &CrewDefined {
                    crew: Some(c.clone()),
                },
                DIRECTORY_STREAM,
                actor.clone(),
            ),
        );
    }
    let mut changed_accounts = Vec::new();
    for a in &dir.accounts {
        if reader.account_district(&a.account_number)?.as_deref() != Some(a.district_id.as_str()) {
            changed_accounts.push(a.clone());
        }
    }
    for chunk in changed_accounts.chunks(ACCOUNTS_PER_EVENT) {
        let assigned = AccountsAssigned {
            accounts: chunk.to_vec(),
            source: "file".into(),
        };
        events.push(NewEvent::new(&assigned, DIRECTORY_STREAM, actor.clone()));
    }
    Ok(events)
}

/// Commits directory events in bounded batches (the log's per-commit limits).
pub async fn commit_in_batches(
    log: &EventLog,
    events: Vec<NewEvent>,
) -> Result<u64, DirectoryError> {
    const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;
    const MAX_BATCH_EVENTS: usize = 500;
    let total = events.len() as u64;
    let mut batch = Vec::new();
    let mut bytes = 0;
    for event in events {
        if !batch.is_empty()
            && (bytes + event.payload.len() > MAX_BATCH_BYTES || batch.len() == MAX_BATCH_EVENTS)
        {
            commit(log, std::mem::take(&mut batch)).await?;
            bytes = 0;
        }
        bytes += event.payload.len();
        batch.push(event);
    }
    if !batch.is_empty() {
        commit(log, batch).await?;
    }
    Ok(total)
}

async fn commit(log: &EventLog, events: Vec<NewEvent>) -> Result<(), DirectoryError> {
    log.commit(Transaction::append(
        DIRECTORY_STREAM,
        ExpectedVersion::Any,
        events,
    ))
    .await
    .map(|_| ())
    .map_err(|e| err(format!("directory commit failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_directory_loads_and_every_reference_resolves() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/directory.toml");
        let dir = Directory::load(&path).expect("demo directory");
        assert_eq!(dir.companies.len(), 1);
        assert!(dir.stations.len() >= 3, "several stations");
        assert!(dir.districts.len() >= 24, "dozens of districts");
        assert!(dir.accounts.len() >= 2_000, "thousands of accounts");
        assert!(dir.crews.len() >= dir.stations.len());
    }

    #[test]
    fn a_dangling_reference_is_named() {
        let mut dir = Directory {
            companies: vec![Company {
                company_id: "co-1".into(),
                name: "Co".into(),
                supervisor_desk_id: "desk-co-1".into(),
                supervision_phone: String::new(),
            }],
            ..Directory::default()
        };
        dir.stations.push(Station {
            station_id: "st-1".into(),
            company_id: "co-9".into(),
            name: "St".into(),
            duty_desk_id: "desk-st-1".into(),
            duty_phone: String::new(),
        });
        let e = dir.check().unwrap_err().to_string();
        assert!(e.contains("station st-1") && e.contains("co-9"), "{e}");
    }
}
