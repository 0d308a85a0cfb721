//! Feedback's rules, from a TOML file (`deploy/feedback.toml`): how soon a
//! follow-up call is due, how close two complaints of one account must be to
//! make a repeat, and the rule that turns figures into service stars.
//!
//! A follow-up's due time is written into its `FollowUpScheduled` event, so
//! a changed limit applies to tickets resolved from then on. Repeats and
//! stars are judged when a scorecard is asked for, under the rules in force.

use std::collections::BTreeMap;
use std::time::Duration;

use lineguard_protos::feedback::v1::Scorecard;
use lineguard_protos::intake::v1::TicketKind;
use lineguard_runtime::parse_duration;
use serde::Deserialize;

/// Why the rules file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("invalid feedback rules: {0}")]
    Invalid(String),
}

/// Most star rules a file may hold.
pub const MAX_STAR_RULES: usize = 16;

/// One line of the star rule: the stars given when every condition holds. A
/// rate with nothing to judge (no case reached, no follow-up made) holds.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StarRule {
    pub stars: u32,
    /// On-time acceptance, arrival and restoration, each at least this (percent).
    pub min_on_time_percent: Option<f64>,
    pub min_satisfaction_percent: Option<f64>,
    pub min_first_time_fix_percent: Option<f64>,
    pub max_complaints_escalated_past_station: Option<u64>,
    pub max_complaints_per_1000_households: Option<f64>,
    pub max_average_hops: Option<f64>,
}

impl StarRule {
    /// The first condition `card` fails, described; `None` if all hold.
    pub fn unmet(&self, card: &Scorecard) -> Option<String> {
        let rate = |r: &Option<lineguard_protos::feedback::v1::Rate>| {
            r.as_ref().filter(|r| r.total > 0).map(|r| r.percent)
        };
        if let Some(min) = self.min_on_time_percent {
            for (name, r) in [
                ("on-time acceptance", &card.on_time_acceptance),
                ("on-time arrival", &card.on_time_arrival),
                ("on-time restoration", &card.on_time_restoration),
            ] {
                if let Some(p) = rate(r)
                    && p < min
                {
                    return Some(format!("{name} {p:.1}% < {min}%"));
                }
            }
        }
        if let (Some(min), Some(p)) = (
            self.min_satisfaction_percent,
            rate(&card.follow_up_satisfaction),
        ) && p < min
        {
            return Some(format!("satisfaction {p:.1}% < {min}%"));
        }
        if let (Some(min), Some(p)) = (self.min_first_time_fix_percent, rate(&card.first_time_fix))
            && p < min
        {
            return Some(format!("first-time fix {p:.1}% < {min}%"));
        }
        if let Some(max) = self.max_complaints_escalated_past_station
            && card.complaints_escalated_past_station > max
        {
            return Some(format!(
                "{} complaints escalated past the station > {max}",
                card.complaints_escalated_past_station
            ));
        }
        if let Some(max) = self.max_complaints_per_1000_households
            && card.complaints_per_1000_households > max
        {
            return Some(format!(
                "{:.2} complaints per 1,000 households > {max}",
                card.complaints_per_1000_households
            ));
        }
        if let Some(max) = self.max_average_hops
            && card.cases > 0
            && card.average_hops > max
        {
            return Some(format!("average hops {:.2} > {max}", card.average_hops));
        }
        None
    }
}

/// Feedback's rules, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    follow_up_within: Duration,
    follow_up_by_kind: BTreeMap<i32, Duration>,
    /// Two complaints of one account this close make the second a repeat.
    pub repeat_complaint_within: Duration,
    /// Best first.
    pub stars: Vec<StarRule>,
}

impl Default for Rules {
    /// 24 h to follow up, 30 days for repeats, and the five-star rule of
    /// `deploy/feedback.toml`.
    fn default() -> Self {
        Rules::parse(DEFAULT_RULES).unwrap_or(Rules {
            follow_up_within: Duration::from_secs(86_400),
            follow_up_by_kind: BTreeMap::new(),
            repeat_complaint_within: Duration::from_secs(30 * 86_400),
            stars: Vec::new(),
        })
    }
}

/// The rules used when no file is given.
pub const DEFAULT_RULES: &str = include_str!("../../../deploy/feedback.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    follow_up: FollowUpFile,
    complaints: ComplaintsFile,
    #[serde(default)]
    stars: Vec<StarRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FollowUpFile {
    within: String,
    #[serde(default)]
    kinds: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComplaintsFile {
    repeat_within: String,
}

fn span(field: &str, text: &str) -> Result<Duration, RulesError> {
    let d = parse_duration(text).map_err(|e| RulesError::Invalid(format!("{field}: {e}")))?;
    if d.is_zero() {
        return Err(RulesError::Invalid(format!(
            "{field}: must be more than zero"
        )));
    }
    Ok(d)
}

fn kind_named(name: &str) -> Option<TicketKind> {
    TicketKind::from_str_name(&format!("TICKET_KIND_{}", name.to_ascii_uppercase()))
        .filter(|k| *k != TicketKind::Unspecified)
}

impl Rules {
    /// Parses the rules file's text.
    pub fn parse(text: &str) -> Result<Rules, RulesError> {
        let file: File = toml::from_str(text).map_err(|e| RulesError::Invalid(e.to_string()))?;
        let mut by_kind = BTreeMap::new();
        for (name, within) in &file.follow_up.kinds {
            let kind = kind_named(name).ok_or_else(|| {
                RulesError::Invalid(format!("follow_up.kinds.{name}: no such ticket kind"))
            })?;
            by_kind.insert(
                kind as i32,
                span(&format!("follow_up.kinds.{name}"), within)?,
            );
        }
        if file.stars.len() > MAX_STAR_RULES {
            return Err(RulesError::Invalid(format!(
                "stars: at most {MAX_STAR_RULES} rules"
            )));
        }
        let mut stars = file.stars;
        if let Some(r) = stars.iter().find(|r| r.stars > 5) {
            return Err(RulesError::Invalid(format!(
                "stars: {} stars is more than 5",
                r.stars
            )));
        }
        stars.sort_by_key(|rule| std::cmp::Reverse(rule.stars));
        Ok(Rules {
            follow_up_within: span("follow_up.within", &file.follow_up.within)?,
            follow_up_by_kind: by_kind,
            repeat_complaint_within: span(
                "complaints.repeat_within",
                &file.complaints.repeat_within,
            )?,
            stars,
        })
    }

    /// Reads and parses a rules file.
    pub fn load(path: &str) -> Result<Rules, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|e| RulesError::Read {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        Rules::parse(&text)
    }

    /// With every follow-up due within `within`, whatever the kind (tests).
    pub fn with_follow_up_within(mut self, within: Duration) -> Rules {
        self.follow_up_within = within;
        self.follow_up_by_kind.clear();
        self
    }

    /// How soon after resolution a ticket of `kind` is followed up.
    pub fn follow_up_within(&self, kind: i32) -> Duration {
        self.follow_up_by_kind
            .get(&kind)
            .copied()
            .unwrap_or(self.follow_up_within)
    }

    /// The stars `card` earns, and why not more.
    pub fn stars(&self, card: &Scorecard) -> (u32, String) {
        let mut missed = Vec::new();
        for rule in &self.stars {
            match rule.unmet(card) {
                None => {
                    let why = match missed.first() {
                        None => "every condition of the best rule holds".to_string(),
                        Some(m) => format!("not more: {m}"),
                    };
                    return (rule.stars, why);
                }
                Some(reason) => {
                    missed.push(format!("{} stars need {reason} to improve", rule.stars))
                }
            }
        }
        (
            0,
            missed
                .first()
                .cloned()
                .unwrap_or_else(|| "no star rule".into()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lineguard_protos::feedback::v1::Rate;

    #[test]
    fn the_deployed_rules_parse() {
        let rules = Rules::parse(DEFAULT_RULES).expect("deployed rules");
        assert_eq!(
            rules.follow_up_within(TicketKind::FaultRepair as i32),
            Duration::from_secs(86_400)
        );
        assert_eq!(rules.stars.first().map(|r| r.stars), Some(5));
    }

    #[test]
    fn bad_rules_say_which_field() {
        let text = DEFAULT_RULES.replace("within = \"24h\"", "within = \"soon\"");
        let err = Rules::parse(&text).expect_err("bad span").to_string();
        assert!(err.contains("follow_up.within"), "{err}");
        let text = format!("{DEFAULT_RULES}\n[follow_up.kinds]\nnonsense = \"1h\"\n");
        assert!(Rules::parse(&text).is_err());
    }

    #[test]
    fn stars_take_the_best_rule_that_holds() {
        let rules = Rules::parse(DEFAULT_RULES).expect("rules");
        let rate = |met, total| {
            Some(Rate {
                met,
                total,
                percent: 100.0 * met as f64 / total as f64,
            })
        };
        let perfect = Scorecard {
            on_time_arrival: rate(10, 10),
            follow_up_satisfaction: rate(99, 100),
            ..Scorecard::default()
        };
        assert_eq!(rules.stars(&perfect).0, 5);
        let late = Scorecard {
            on_time_arrival: rate(9, 10),
            ..perfect.clone()
        };
        let (stars, why) = rules.stars(&late);
        assert!(stars < 5, "{why}");
        assert!(why.contains("on-time arrival 90.0%"), "{why}");
    }
}
