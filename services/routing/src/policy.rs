//! The time-limit policy: a versioned TOML file (see `deploy/policy.toml`)
//! giving, per ticket kind and area class, the acceptance, arrival,
//! restoration, contact and answer limits and the warning points.
//!
//! A version is adopted once (a `PolicyAdopted` event holding the file's
//! text) and never changes: the same version with other content is refused.
//! New tickets are held to the newest adopted version; a ticket keeps the
//! version it was first routed under for its whole life.

use std::collections::BTreeMap;

use lineguard_protos::intake::v1::{ServiceRequestType, TicketKind};
use lineguard_protos::routing::v1::{AreaClass, ClockLimit, Deadline};
use lineguard_runtime::calendar::Calendar;
use prost_types::Timestamp;
use serde::Deserialize;

/// Clock names, as recorded in events.
pub const ACCEPTANCE: &str = "acceptance";
pub const ARRIVAL: &str = "arrival";
pub const RESTORATION: &str = "restoration";
pub const CONTACT: &str = "contact";
pub const ANSWER: &str = "answer";

/// Longest policy file accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
#[error("policy: {0}")]
pub struct PolicyError(pub String);

/// A length of time a clock allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Seconds(u64),
    /// Working days of the service's calendar (`deploy/calendar.toml`:
    /// weekdays in local time, less public holidays, plus make-up days).
    WorkingDays(u32),
}

impl Span {
    /// Parses `90s`, `5m`, `3h`, `2d` (calendar days) or `4wd` (working days).
    pub fn parse(text: &str) -> Result<Span, String> {
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?} has no unit (s, m, h, d or wd)"))?;
        let (number, unit) = text.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} does not start with a number"))?;
        if n == 0 {
            return Err(format!("{text:?} is zero"));
        }
        let seconds = match unit {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3_600,
            "d" => n * 86_400,
            "wd" => {
                return u32::try_from(n)
                    .ok()
                    .filter(|d| *d <= 365)
                    .map(Span::WorkingDays)
                    .ok_or_else(|| format!("{text:?} is over 365 working days"));
            }
            _ => return Err(format!("{text:?} has an unknown unit (s, m, h, d or wd)")),
        };
        if seconds > 366 * 86_400 {
            return Err(format!("{text:?} is over a year"));
        }
        Ok(Span::Seconds(seconds))
    }

    /// `start` plus this span; working days as `calendar` counts them.
    pub fn after(self, start: &Timestamp, calendar: &Calendar) -> Timestamp {
        match self {
            Span::Seconds(s) => Timestamp {
                seconds: start.seconds + s as i64,
                nanos: start.nanos,
            },
            Span::WorkingDays(days) => calendar.add_working_days(start, days),
        }
    }

    fn to_limit(self, clock: &str, starts_at: &str) -> ClockLimit {
        let (seconds, working_days) = match self {
            Span::Seconds(s) => (s, 0),
            Span::WorkingDays(d) => (0, d),
        };
        ClockLimit {
            clock: clock.to_string(),
            seconds,
            working_days,
            starts_at: starts_at.to_string(),
        }
    }
}

/// A limit that may differ by area class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByArea {
    pub urban: Span,
    pub rural: Span,
    pub remote: Span,
}

impl ByArea {
    /// The limit for `area` (an unknown class is held to the urban limit,
    /// the strictest).
    pub fn get(&self, area: AreaClass) -> Span {
        match area {
            AreaClass::Rural => self.rural,
            AreaClass::Remote => self.remote,
            AreaClass::Urban | AreaClass::Unspecified => self.urban,
        }
    }
}

/// The limits of one kind of ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindLimits {
    /// Needs a crew on site (fault repair, surge-damage visit, …).
    pub field_work: bool,
    pub acceptance: ByArea,
    pub arrival: Option<ByArea>,
    pub restoration: Option<ByArea>,
    pub contact: Option<ByArea>,
    pub answer: Option<ByArea>,
}

/// One version of the time-limit policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub version: String,
    /// Warning points, percent of each clock, ascending, each in 1..=99.
    pub warn_at_percent: Vec<u32>,
    kinds: BTreeMap<&'static str, KindLimits>,
}

/// The policy key of a kind (and a service request's sub-type).
pub fn kind_key(kind: TicketKind, sub_type: ServiceRequestType) -> &'static str {
    match kind {
        TicketKind::FaultRepair => "fault_repair",
        TicketKind::Complaint => "complaint",
        TicketKind::Report => "report",
        TicketKind::Inquiry => "inquiry",
        TicketKind::Praise => "praise",
        TicketKind::Suggestion => "suggestion",
        TicketKind::ServiceRequest | TicketKind::Unspecified => match sub_type {
            ServiceRequestType::Reconnection => "service_request_reconnection",
            ServiceRequestType::SurgeDamage => "service_request_surge_damage",
            ServiceRequestType::MeterFault => "service_request_meter_fault",
            ServiceRequestType::Other | ServiceRequestType::Unspecified => "service_request_other",
        },
    }
}

/// Every key a policy file must define.
pub const KIND_KEYS: [&str; 10] = [
    "fault_repair",
    "complaint",
    "report",
    "inquiry",
    "praise",
    "suggestion",
    "service_request_reconnection",
    "service_request_surge_damage",
    "service_request_meter_fault",
    "service_request_other",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: String,
    warn_at_percent: Vec<u32>,
    kinds: BTreeMap<String, KindFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KindFile {
    #[serde(default)]
    field_work: bool,
    acceptance: LimitFile,
    arrival: Option<LimitFile>,
    restoration: Option<LimitFile>,
    contact: Option<LimitFile>,
    answer: Option<LimitFile>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LimitFile {
    Same(String),
    ByArea {
        urban: String,
        rural: String,
        remote: String,
    },
}

impl LimitFile {
    fn parse(&self, at: &str) -> Result<ByArea, PolicyError> {
        let span = |text: &str, area: &str| {
            Span::parse(text).map_err(|e| PolicyError(format!("{at}{area}: {e}")))
        };
        Ok(match self {
            LimitFile::Same(text) => {
                let s = span(text, "")?;
                ByArea {
                    urban: s,
                    rural: s,
                    remote: s,
                }
            }
            LimitFile::ByArea {
                urban,
                rural,
                remote,
            } => ByArea {
                urban: span(urban, ".urban")?,
                rural: span(rural, ".rural")?,
                remote: span(remote, ".remote")?,
            },
        })
    }
}

impl Policy {
    /// Parses and checks a policy file's text.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError(format!(
                "{} bytes, over the limit of {MAX_POLICY_BYTES}",
                text.len()
            )));
        }
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError(e.to_string()))?;
        let version_ok = !file.version.is_empty()
            && file.version.len() <= 64
            && file
                .version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !version_ok {
            return Err(PolicyError(
                "version must be 1 to 64 characters of [A-Za-z0-9._-]".into(),
            ));
        }
        let ascending = file.warn_at_percent.windows(2).all(|w| w[0] < w[1]);
        if !ascending || file.warn_at_percent.iter().any(|p| !(1..=99).contains(p)) {
            return Err(PolicyError(
                "warn_at_percent must ascend, each between 1 and 99".into(),
            ));
        }
        if let Some(unknown) = file.kinds.keys().find(|k| !KIND_KEYS.contains(&k.as_str())) {
            return Err(PolicyError(format!(
                "unknown kind {unknown:?} (known: {})",
                KIND_KEYS.join(", ")
            )));
        }
        let mut kinds = BTreeMap::new();
        for key in KIND_KEYS {
            let k = file
                .kinds
                .get(key)
                .ok_or_else(|| PolicyError(format!("kinds.{key} is missing")))?;
            let at = |clock: &str| format!("kinds.{key}.{clock}");
            let optional = |limit: &Option<LimitFile>, clock: &str| {
                limit.as_ref().map(|l| l.parse(&at(clock))).transpose()
            };
            let limits = KindLimits {
                field_work: k.field_work,
                acceptance: k.acceptance.parse(&at(ACCEPTANCE))?,
                arrival: optional(&k.arrival, ARRIVAL)?,
                restoration: optional(&k.restoration, RESTORATION)?,
                contact: optional(&k.contact, CONTACT)?,
                answer: optional(&k.answer, ANSWER)?,
            };
            if limits.field_work && (limits.arrival.is_none() || limits.restoration.is_none()) {
                return Err(PolicyError(format!(
                    "kinds.{key}: field work needs arrival and restoration limits"
                )));
            }
            if !limits.field_work && limits.answer.is_none() {
                return Err(PolicyError(format!(
                    "kinds.{key}: desk work needs an answer limit"
                )));
            }
            kinds.insert(key, limits);
        }
        Ok(Policy {
            version: file.version,
            warn_at_percent: file.warn_at_percent,
            kinds,
        })
    }

    /// The limits of a kind of ticket.
    pub fn limits(&self, kind: TicketKind, sub_type: ServiceRequestType) -> &KindLimits {
        // Parsing guarantees every key is present.
        let key = kind_key(kind, sub_type);
        match self.kinds.get(key) {
            Some(limits) => limits,
            None => unreachable!("policy {} lacks {key}, which parse requires", self.version),
        }
    }

    /// The deadlines of a ticket reported at `reported_at`, first routed at
    /// `routed_at`, and the limits whose start comes later (restoration runs
    /// from arrival).
    pub fn clocks(
        &self,
        kind: TicketKind,
        sub_type: ServiceRequestType,
        area: AreaClass,
        reported_at: &Timestamp,
        routed_at: &Timestamp,
        calendar: &Calendar,
    ) -> (Vec<Deadline>, Vec<ClockLimit>) {
        let limits = self.limits(kind, sub_type);
        let mut deadlines = Vec::new();
        let mut clock_limits = Vec::new();
        let acceptance = limits.acceptance.get(area);
        deadlines.push(deadline(ACCEPTANCE, acceptance.after(routed_at, calendar)));
        clock_limits.push(acceptance.to_limit(ACCEPTANCE, "routed"));
        for (clock, limit) in [
            (ARRIVAL, limits.arrival),
            (CONTACT, limits.contact),
            (ANSWER, limits.answer),
        ] {
            if let Some(limit) = limit {
                let span = limit.get(area);
                deadlines.push(deadline(clock, span.after(reported_at, calendar)));
                clock_limits.push(span.to_limit(clock, "reported"));
            }
        }
        if let Some(restoration) = limits.restoration {
            clock_limits.push(restoration.get(area).to_limit(RESTORATION, "arrival"));
        }
        (deadlines, clock_limits)
    }
}

fn deadline(clock: &str, due_at: Timestamp) -> Deadline {
    Deadline {
        clock: clock.to_string(),
        due_at: Some(due_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYED: &str = include_str!("../../../deploy/policy.toml");

    #[test]
    fn the_deployed_policy_parses_with_the_published_fault_limits() {
        let policy = Policy::parse(DEPLOYED).expect("deploy/policy.toml");
        let fault = policy.limits(TicketKind::FaultRepair, ServiceRequestType::Unspecified);
        assert!(fault.field_work);
        let arrival = fault.arrival.expect("arrival");
        assert_eq!(arrival.get(AreaClass::Urban), Span::Seconds(45 * 60));
        assert_eq!(arrival.get(AreaClass::Rural), Span::Seconds(90 * 60));
        assert_eq!(arrival.get(AreaClass::Remote), Span::Seconds(120 * 60));
        assert_eq!(fault.acceptance.get(AreaClass::Urban), Span::Seconds(300));
        let complaint = policy.limits(TicketKind::Complaint, ServiceRequestType::Unspecified);
        assert_eq!(
            complaint.answer.expect("answer").get(AreaClass::Urban),
            Span::WorkingDays(4)
        );
    }

    #[test]
    fn spans_parse_and_reject_clearly() {
        assert_eq!(Span::parse("45m"), Ok(Span::Seconds(2_700)));
        assert_eq!(Span::parse("3h"), Ok(Span::Seconds(10_800)));
        assert_eq!(Span::parse("4wd"), Ok(Span::WorkingDays(4)));
        assert!(Span::parse("45").unwrap_err().contains("no unit"));
        assert!(Span::parse("0m").unwrap_err().contains("zero"));
        assert!(Span::parse("5y").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn working_days_skip_weekends_in_china_time() {
        // Friday 2026-11-20 10:00 CST = 02:00 UTC.
        let friday = Timestamp {
            seconds: 1_795_140_000,
            nanos: 0,
        };
        let calendar = Calendar::default();
        let due = Span::WorkingDays(1).after(&friday, &calendar);
        // Monday 2026-11-23 10:00 CST.
        assert_eq!(due.seconds - friday.seconds, 3 * 86_400);
        let due = Span::WorkingDays(4).after(&friday, &calendar);
        assert_eq!(due.seconds - friday.seconds, 6 * 86_400, "Thursday");
    }

    #[test]
    fn a_policy_missing_a_kind_or_with_bad_points_is_refused() {
        let without_praise = DEPLOYED.replace("[kinds.praise]", "[kinds.praise_x]");
        let err = Policy::parse(&without_praise).unwrap_err().to_string();
        assert!(err.contains("praise_x"), "{err}");
        let bad_points =
            DEPLOYED.replace("warn_at_percent = [50, 80]", "warn_at_percent = [80, 50]");
        let err = Policy::parse(&bad_points).unwrap_err().to_string();
        assert!(err.contains("ascend"), "{err}");
    }
}
