//! The working calendar every clock counts working days by.
//!
//! Published service commitments count some limits in working days (a
//! complaint's answer in 4, a report's in 9). A working day is Monday to
//! Friday in the utility's local time, except public holidays, plus the
//! make-up working days (调休) that the State Council moves onto weekends
//! around them. Both change every year, so they are configuration:
//! `deploy/calendar.toml`, read by every service that runs a clock, through
//! this one module.
//!
//! ```toml
//! version = "cn-2026"
//! utc_offset_hours = 8
//! holidays = ["2026-01-01", "2026-01-02"]
//! make_up_working_days = ["2026-01-04"]
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use prost_types::Timestamp;
use serde::Deserialize;

/// Largest calendar file read.
pub const MAX_CALENDAR_BYTES: usize = 64 * 1024;
/// Most dates (holidays and make-up days together) a calendar lists.
pub const MAX_DATES: usize = 2_000;
/// Most working days one span may count.
pub const MAX_WORKING_DAYS: u32 = 366;

const DAY_SECONDS: i64 = 86_400;

/// Why a calendar file was refused.
#[derive(Debug, thiserror::Error)]
#[error("calendar: {0}")]
pub struct CalendarError(pub String);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalendarFile {
    version: String,
    utc_offset_hours: i32,
    #[serde(default)]
    holidays: Vec<String>,
    #[serde(default)]
    make_up_working_days: Vec<String>,
}

/// Working days: weekdays in local time, less holidays, plus make-up days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    /// Names the file's contents (kept with what it decided, for replays).
    pub version: String,
    utc_offset_seconds: i64,
    /// Local days (since 1970-01-01) that are not worked though weekdays.
    holidays: BTreeSet<i64>,
    /// Local days that are worked though weekends.
    make_up_days: BTreeSet<i64>,
}

impl Default for Calendar {
    /// Monday to Friday in China Standard Time (UTC+8), no holidays.
    fn default() -> Self {
        Calendar {
            version: "weekdays-utc+8".to_string(),
            utc_offset_seconds: 8 * 3_600,
            holidays: BTreeSet::new(),
            make_up_days: BTreeSet::new(),
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Parses `YYYY-MM-DD` into days since 1970-01-01.
pub fn parse_date(text: &str) -> Result<i64, String> {
    let parts: Vec<&str> = text.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(format!("{text:?} is not YYYY-MM-DD"));
    };
    let (Ok(year), Ok(month), Ok(day)) = (y.parse::<i64>(), m.parse::<u32>(), d.parse::<u32>())
    else {
        return Err(format!("{text:?} is not YYYY-MM-DD"));
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(format!("{text:?} is not YYYY-MM-DD"));
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(format!("{text:?} is not a date"));
    }
    Ok(days_from_civil(year, month, day))
}

impl Calendar {
    /// Reads and checks a calendar file.
    pub fn load(path: &Path) -> Result<Calendar, CalendarError> {
        let text =
            std::fs::read(path).map_err(|e| CalendarError(format!("{}: {e}", path.display())))?;
        if text.len() > MAX_CALENDAR_BYTES {
            return Err(CalendarError(format!(
                "{} is {} bytes, over the limit of {MAX_CALENDAR_BYTES}",
                path.display(),
                text.len()
            )));
        }
        let text = String::from_utf8(text)
            .map_err(|_| CalendarError(format!("{} is not UTF-8", path.display())))?;
        Calendar::parse(&text)
    }

    /// Parses and checks a calendar's text.
    pub fn parse(text: &str) -> Result<Calendar, CalendarError> {
        let file: CalendarFile = toml::from_str(text).map_err(|e| CalendarError(e.to_string()))?;
        if file.version.is_empty() || file.version.len() > 64 {
            return Err(CalendarError("version: 1 to 64 characters".into()));
        }
        if !(-12..=14).contains(&file.utc_offset_hours) {
            return Err(CalendarError(format!(
                "utc_offset_hours: {} is not within -12..=14",
                file.utc_offset_hours
            )));
        }
        if file.holidays.len() + file.make_up_working_days.len() > MAX_DATES {
            return Err(CalendarError(format!("more than {MAX_DATES} dates listed")));
        }
        let dates = |field: &str, list: &[String]| -> Result<BTreeSet<i64>, CalendarError> {
            list.iter()
                .map(|d| parse_date(d).map_err(|e| CalendarError(format!("{field}: {e}"))))
                .collect()
        };
        let holidays = dates("holidays", &file.holidays)?;
        let make_up_days = dates("make_up_working_days", &file.make_up_working_days)?;
        if let Some(both) = holidays.intersection(&make_up_days).next() {
            return Err(CalendarError(format!(
                "day {both} (days since 1970-01-01) is both a holiday and a make-up working day"
            )));
        }
        Ok(Calendar {
            version: file.version,
            utc_offset_seconds: i64::from(file.utc_offset_hours) * 3_600,
            holidays,
            make_up_days,
        })
    }

    /// The local day (days since 1970-01-01) of an instant.
    pub fn local_day(&self, at: &Timestamp) -> i64 {
        (at.seconds + self.utc_offset_seconds).div_euclid(DAY_SECONDS)
    }

    /// Whether a local day is worked.
    pub fn is_working_day(&self, local_day: i64) -> bool {
        if self.holidays.contains(&local_day) {
            return false;
        }
        if self.make_up_days.contains(&local_day) {
            return true;
        }
        // 1970-01-01 was a Thursday: day 0 is weekday 4 (0 = Sunday).
        let weekday = (local_day + 4).rem_euclid(7);
        weekday != 0 && weekday != 6
    }

    /// `start` plus `days` working days: the same local time of day on the
    /// `days`-th working day after `start`'s day (at most
    /// [`MAX_WORKING_DAYS`]).
    pub fn add_working_days(&self, start: &Timestamp, days: u32) -> Timestamp {
        let days = days.min(MAX_WORKING_DAYS);
        let mut local = start.seconds + self.utc_offset_seconds;
        let mut left = days;
        // A year holds far more working days than the limit: this ends.
        while left > 0 {
            local += DAY_SECONDS;
            if self.is_working_day(local.div_euclid(DAY_SECONDS)) {
                left -= 1;
            }
        }
        Timestamp {
            seconds: local - self.utc_offset_seconds,
            nanos: start.nanos,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYED: &str = include_str!("../../../deploy/calendar.toml");

    /// 10:00 China time on a local date.
    fn cst_ten(date: &str) -> Timestamp {
        let day = parse_date(date).expect("date");
        Timestamp {
            seconds: day * DAY_SECONDS + 10 * 3_600 - 8 * 3_600,
            nanos: 0,
        }
    }

    #[test]
    fn dates_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_date("1970-01-01"), Ok(0));
        assert_eq!(parse_date("2026-11-30"), Ok(20_787));
        assert_eq!(parse_date("2024-02-29"), Ok(19_782));
        for bad in [
            "2026-02-29",
            "2026-13-01",
            "2026-1-01",
            "26-01-01",
            "x",
            "2026-04-31",
        ] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn weekdays_alone_skip_weekends_in_local_time() {
        let cal = Calendar::default();
        // Friday 2026-11-20 10:00 CST: one working day on is Monday.
        let friday = cst_ten("2026-11-20");
        assert_eq!(cal.add_working_days(&friday, 1), cst_ten("2026-11-23"));
        assert_eq!(cal.add_working_days(&friday, 4), cst_ten("2026-11-26"));
        assert_eq!(cal.add_working_days(&friday, 0), friday);
    }

    #[test]
    fn the_deployed_calendar_skips_holidays_and_works_make_up_days() {
        let cal = Calendar::parse(DEPLOYED).expect("deployed calendar");
        // National Day 2026: 1-7 October off, Saturday 10 October worked.
        assert!(!cal.is_working_day(parse_date("2026-10-01").expect("date")));
        assert!(cal.is_working_day(parse_date("2026-10-10").expect("date")));
        // Answer limit of 4 working days from Wednesday 30 September:
        // 8, 9 (Friday) and 10 (make-up Saturday) October, then Monday 12th.
        let due = cal.add_working_days(&cst_ten("2026-09-30"), 4);
        assert_eq!(due, cst_ten("2026-10-12"));
        // New Year 2026: 1-3 January off; Sunday 4 January worked.
        let due = cal.add_working_days(&cst_ten("2025-12-31"), 1);
        assert_eq!(due, cst_ten("2026-01-04"));
    }

    #[test]
    fn a_bad_calendar_names_what_is_wrong() {
        let err =
            Calendar::parse("version = \"x\"\nutc_offset_hours = 8\nholidays = [\"2026-02-30\"]")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("holidays") && err.contains("2026-02-30"),
            "{err}"
        );
        let err = Calendar::parse(
            "version = \"x\"\nutc_offset_hours = 8\nholidays = [\"2026-10-10\"]\nmake_up_working_days = [\"2026-10-10\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("both"), "{err}");
        assert!(Calendar::parse("version = \"x\"\nutc_offset_hours = 30").is_err());
    }
}
