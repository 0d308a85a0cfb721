//! A replay as a timeline: each step with what happened, how long after
//! the one before, who held the ticket afterwards; the periods each line of
//! defense and each crew held it; and every warning and breach. Rendered as
//! text, JSON, or a self-contained HTML page with an SVG picture.

use lineguard_protos::dispatch::v1::{
    ClockAlerted, CrewArrived, OrderAcknowledged, OrderAssigned, OrderReturned, OrderWithdrawn,
    PowerRestored, WorkCompleted,
};
use lineguard_protos::eventlog::v1::EventEnvelope;
use lineguard_protos::feedback::v1::{
    FollowUpOverdue, FollowUpRecorded, FollowUpScheduled, TicketReopened,
};
use lineguard_protos::intake::v1::{
    Channel, CustomerDataErased, IncidentOpened, TicketJoinedIncident, TicketKind, TicketReported,
    TicketUrged,
};
use lineguard_protos::routing::v1::{
    ClockBreached, ClockWarned, TicketAccepted, TicketAnswered, TicketReturned, TicketRouted,
    TicketRoutingClosed,
};
use prost_types::Timestamp;
use serde::Serialize;

use crate::replay::{Replayed, decode, recorded_nanos, short_type};

/// A clock's warning or breach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    pub clock: String,
    pub percent: u32,
    pub breached: bool,
}

/// One event of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub n: usize,
    pub at: String,
    #[serde(skip)]
    pub at_nanos: i128,
    /// The log (service) the event is in.
    pub service: String,
    pub event: String,
    /// The event's own id, and the id of the event that caused it (empty
    /// for a command from outside): a client follows causes by these.
    pub event_id: String,
    pub causation_id: String,
    pub correlation_id: String,
    /// Where the event is in `service`'s log: its global position, and its
    /// stream with the version within it.
    pub position: u64,
    pub stream_id: String,
    pub stream_version: u64,
    pub actor: String,
    pub what: String,
    pub since_previous_seconds: f64,
    /// Who held the case after this step.
    pub line: u32,
    pub holder: String,
    pub crew: String,
    pub alert: Option<Alert>,
}

/// A span during which one line (or crew) held the case.
#[derive(Debug, Clone, Serialize)]
pub struct Holding {
    /// "line 1", "line 2", "line 3" or "crew <id>".
    pub lane: String,
    pub who: String,
    pub from: String,
    pub to: String,
    #[serde(skip)]
    pub from_nanos: i128,
    #[serde(skip)]
    pub to_nanos: i128,
    pub seconds: f64,
}

/// A whole replay, laid out.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub kind: &'static str,
    pub id: String,
    pub correlation_ids: Vec<String>,
    pub events: usize,
    pub total_seconds: f64,
    pub warnings: usize,
    pub breaches: usize,
    pub holdings: Vec<Holding>,
    pub steps: Vec<Step>,
}

/// RFC 3339 of nanoseconds since the epoch.
pub fn rfc3339(nanos: i128) -> String {
    Timestamp {
        seconds: nanos.div_euclid(1_000_000_000) as i64,
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
    .to_string()
}

/// `1h 02m 03s`, `4m 05s`, `12.3s`.
pub fn human(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let total = s.round() as u64;
    let (h, m, sec) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m {sec:02}s")
    } else {
        format!("{m}m {sec:02}s")
    }
}

fn name<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

fn at(t: &Option<Timestamp>) -> String {
    t.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// One line saying what an event did. Never a customer's name or phone.
pub fn describe(e: &EventEnvelope) -> String {
    if let Some(r) = decode::<TicketReported>(e) {
        let channel = Channel::try_from(r.channel).map_or("?".into(), name);
        let kind = TicketKind::try_from(r.kind).map_or("?".into(), name);
        return format!("{kind} reported by {channel}, district {}", r.district_id);
    }
    if let Some(u) = decode::<TicketUrged>(e) {
        return format!("{} urged (urge {})", u.ticket_id, u.urge_count);
    }
    if let Some(o) = decode::<IncidentOpened>(e) {
        return format!(
            "incident opened in {}, led by {}",
            o.district_id, o.lead_ticket_id
        );
    }
    if let Some(j) = decode::<TicketJoinedIncident>(e) {
        return format!(
            "{} joined the incident ({} calls)",
            j.ticket_id, j.ticket_count
        );
    }
    if let Some(r) = decode::<TicketRouted>(e) {
        let crew = if r.crew_id.is_empty() {
            String::new()
        } else {
            format!(", crew {}", r.crew_id)
        };
        let detail = if r.reason_detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason_detail)
        };
        return format!(
            "hop {}: to {} on line {}{crew}: {:?}{detail}",
            r.hop,
            r.assignee_id,
            r.line,
            r.reason()
        );
    }
    if let Some(a) = decode::<TicketAccepted>(e) {
        let when = if a.on_time { "on time" } else { "late" };
        return format!("accepted by {} ({when})", a.assignee_id);
    }
    if let Some(r) = decode::<TicketReturned>(e) {
        return format!("returned by {}: {:?}", r.assignee_id, r.reason());
    }
    if let Some(a) = decode::<TicketAnswered>(e) {
        return format!("answered by {}: {}", a.assignee_id, a.outcome);
    }
    if let Some(c) = decode::<TicketRoutingClosed>(e) {
        return format!("closed: {}", c.reason);
    }
    if let Some(w) = decode::<ClockWarned>(e) {
        return format!(
            "{} clock {}% used (due {})",
            w.clock,
            w.percent,
            at(&w.due_at)
        );
    }
    if let Some(b) = decode::<ClockBreached>(e) {
        return format!(
            "{} clock BREACHED on line {} (due {})",
            b.clock,
            b.line,
            at(&b.due_at)
        );
    }
    if let Some(a) = decode::<OrderAssigned>(e) {
        return format!(
            "order to {} (hop {}, {} tickets)",
            a.crew_id,
            a.hop,
            a.tickets.len()
        );
    }
    if let Some(w) = decode::<OrderWithdrawn>(e) {
        return format!("order withdrawn from {}: {}", w.crew_id, w.reason);
    }
    if let Some(a) = decode::<OrderAcknowledged>(e) {
        return format!("{} acknowledged", a.crew_id);
    }
    if let Some(a) = decode::<CrewArrived>(e) {
        let when = if a.on_time { "on time" } else { "late" };
        return format!("{} arrived ({when})", a.crew_id);
    }
    if let Some(r) = decode::<PowerRestored>(e) {
        let when = if r.on_time { "on time" } else { "late" };
        return format!("{} restored power ({when})", r.crew_id);
    }
    if let Some(c) = decode::<WorkCompleted>(e) {
        return format!("{} completed: {} / {}", c.crew_id, c.cause, c.result);
    }
    if let Some(r) = decode::<OrderReturned>(e) {
        return format!("{} returned the order: {}", r.crew_id, r.reason);
    }
    if let Some(a) = decode::<ClockAlerted>(e) {
        return if a.breached {
            format!("{} clock BREACHED ({})", a.clock, a.crew_id)
        } else {
            format!("{} clock {}% used ({})", a.clock, a.percent, a.crew_id)
        };
    }
    if let Some(f) = decode::<FollowUpScheduled>(e) {
        return format!("follow-up of {} due by {}", f.ticket_id, at(&f.due_at));
    }
    if let Some(f) = decode::<FollowUpOverdue>(e) {
        return format!("follow-up of {} OVERDUE", f.ticket_id);
    }
    if let Some(f) = decode::<FollowUpRecorded>(e) {
        let verdict = if f.satisfied {
            "satisfied"
        } else {
            "dissatisfied"
        };
        return format!("follow-up of {}: {verdict}, score {}", f.ticket_id, f.score);
    }
    if let Some(r) = decode::<TicketReopened>(e) {
        return format!("{} reopened: {}", r.ticket_id, r.reason);
    }
    if let Some(x) = decode::<CustomerDataErased>(e) {
        return format!(
            "customer data of {} ERASED by {}: {}",
            x.ticket_id, x.erased_by, x.reason
        );
    }
    short_type(e).to_string()
}

fn alert_of(e: &EventEnvelope) -> Option<Alert> {
    if let Some(w) = decode::<ClockWarned>(e) {
        return Some(Alert {
            clock: w.clock,
            percent: w.percent,
            breached: false,
        });
    }
    if let Some(b) = decode::<ClockBreached>(e) {
        return Some(Alert {
            clock: b.clock,
            percent: 100,
            breached: true,
        });
    }
    if let Some(a) = decode::<ClockAlerted>(e) {
        return Some(Alert {
            clock: a.clock,
            percent: a.percent,
            breached: a.breached,
        });
    }
    if decode::<FollowUpOverdue>(e).is_some() {
        return Some(Alert {
            clock: "follow-up".into(),
            percent: 100,
            breached: true,
        });
    }
    None
}

fn lane_of_line(line: u32) -> String {
    format!("line {line}")
}

/// Lays a replay out.
pub fn build(replayed: &Replayed) -> Timeline {
    let events = &replayed.events;
    let first = events.first().map_or(0, recorded_nanos);
    let last = events.last().map_or(0, recorded_nanos);
    let mut steps = Vec::with_capacity(events.len());
    let mut holdings: Vec<Holding> = Vec::new();
    // Open spans: the line's and the crew's.
    let mut line_span: Option<(u32, String, i128)> = None;
    let mut crew_span: Option<(String, i128)> = None;
    let (mut line, mut holder, mut crew) = (0, String::new(), String::new());
    let mut previous = first;
    let close_line = |span: &mut Option<(u32, String, i128)>, to: i128, out: &mut Vec<Holding>| {
        if let Some((line, who, from)) = span.take() {
            out.push(Holding {
                lane: lane_of_line(line),
                who,
                from: rfc3339(from),
                to: rfc3339(to),
                from_nanos: from,
                to_nanos: to,
                seconds: (to - from) as f64 / 1e9,
            });
        }
    };
    let close_crew = |span: &mut Option<(String, i128)>, to: i128, out: &mut Vec<Holding>| {
        if let Some((who, from)) = span.take() {
            out.push(Holding {
                lane: format!("crew {who}"),
                who,
                from: rfc3339(from),
                to: rfc3339(to),
                from_nanos: from,
                to_nanos: to,
                seconds: (to - from) as f64 / 1e9,
            });
        }
    };
    for (i, e) in events.iter().enumerate() {
        let t = recorded_nanos(e);
        if let Some(r) = decode::<TicketRouted>(e) {
            close_line(&mut line_span, t, &mut holdings);
            line = r.line;
            holder = r.assignee_id.clone();
            crew = r.crew_id.clone();
            line_span = Some((r.line, r.assignee_id, t));
        } else if decode::<TicketAnswered>(e).is_some()
            || decode::<TicketRoutingClosed>(e).is_some()
        {
            close_line(&mut line_span, t, &mut holdings);
        } else if let Some(a) = decode::<OrderAssigned>(e) {
            close_crew(&mut crew_span, t, &mut holdings);
            crew = a.crew_id.clone();
            crew_span = Some((a.crew_id, t));
        } else if decode::<WorkCompleted>(e).is_some() {
            close_crew(&mut crew_span, t, &mut holdings);
            close_line(&mut line_span, t, &mut holdings);
        } else if decode::<OrderWithdrawn>(e).is_some() || decode::<OrderReturned>(e).is_some() {
            close_crew(&mut crew_span, t, &mut holdings);
        }
        steps.push(Step {
            n: i + 1,
            at: rfc3339(t),
            at_nanos: t,
            service: e.source.clone(),
            event: short_type(e).to_string(),
            event_id: e.event_id.clone(),
            causation_id: e.causation_id.clone(),
            correlation_id: e.correlation_id.clone(),
            position: e.global_position,
            stream_id: e.stream_id.clone(),
            stream_version: e.stream_version,
            actor: e.actor.as_ref().map(|a| a.id.clone()).unwrap_or_default(),
            what: describe(e),
            since_previous_seconds: (t - previous) as f64 / 1e9,
            line,
            holder: holder.clone(),
            crew: crew.clone(),
            alert: alert_of(e),
        });
        previous = t;
    }
    close_line(&mut line_span, last, &mut holdings);
    close_crew(&mut crew_span, last, &mut holdings);
    holdings.sort_by_key(|h| h.from_nanos);
    let alerts = steps.iter().filter_map(|s| s.alert.as_ref());
    let breaches = alerts.clone().filter(|a| a.breached).count();
    Timeline {
        kind: replayed.kind,
        id: replayed.id.clone(),
        correlation_ids: replayed.correlation_ids.clone(),
        events: events.len(),
        total_seconds: (last - first) as f64 / 1e9,
        warnings: alerts.count() - breaches,
        breaches,
        holdings,
        steps,
    }
}

/// The timeline as text: a line per step, then where the time went.
pub fn render_text(t: &Timeline) -> String {
    let mut out = format!(
        "{} {}: {} events over {}, {} warnings, {} breaches\n",
        t.kind,
        t.id,
        t.events,
        human(t.total_seconds),
        t.warnings,
        t.breaches
    );
    for s in &t.steps {
        let holder = if s.holder.is_empty() {
            "-".to_string()
        } else {
            format!("L{} {}", s.line, s.holder)
        };
        let mark = match &s.alert {
            Some(a) if a.breached => "!! ",
            Some(_) => "!  ",
            None => "   ",
        };
        out.push_str(&format!(
            "{:>4} {} {:>10} {:<8} {:<28} {:<24} {mark}{}\n",
            s.n,
            s.at,
            format!("+{}", human(s.since_previous_seconds)),
            s.service,
            s.event,
            holder,
            s.what
        ));
    }
    out.push_str("where the time went:\n");
    for h in &t.holdings {
        out.push_str(&format!(
            "  {:<24} {:<24} {:>12}  {} → {}\n",
            h.lane,
            h.who,
            human(h.seconds),
            h.from,
            h.to
        ));
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML page: an SVG with a lane per line of defense and
/// per crew, a bar per holding, each breach marked; then the steps as a
/// table. Black on white, so it prints.
pub fn render_html(t: &Timeline) -> String {
    let mut lanes: Vec<String> = (1..=3).map(lane_of_line).collect();
    for h in &t.holdings {
        if !lanes.contains(&h.lane) {
            lanes.push(h.lane.clone());
        }
    }
    let first = t.steps.first().map_or(0, |s| s.at_nanos);
    let span = (t.steps.last().map_or(0, |s| s.at_nanos) - first).max(1) as f64;
    let (left, width, lane_h, top) = (150.0, 900.0, 44.0, 30.0);
    let x = |n: i128| left + (n - first) as f64 / span * width;
    let height = top + lane_h * lanes.len() as f64 + 40.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n",
        left + width + 20.0
    );
    svg.push_str(&format!(
        "<text x=\"{left}\" y=\"18\">{} → {} ({})</text>\n",
        escape(&t.steps.first().map(|s| s.at.clone()).unwrap_or_default()),
        escape(&t.steps.last().map(|s| s.at.clone()).unwrap_or_default()),
        human(t.total_seconds)
    ));
    for (i, lane) in lanes.iter().enumerate() {
        let y = top + lane_h * i as f64;
        let label = match lane.as_str() {
            "line 1" => "Line 1: district manager".to_string(),
            "line 2" => "Line 2: station".to_string(),
            "line 3" => "Line 3: company".to_string(),
            other => format!("Crew {}", other.trim_start_matches("crew ")),
        };
        svg.push_str(&format!(
            "<g class=\"lane\" data-lane=\"{}\"><line x1=\"{left}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" \
             stroke=\"#999\" stroke-dasharray=\"2,3\"/><text x=\"4\" y=\"{}\">{}</text></g>\n",
            escape(lane),
            left + width,
            y + lane_h,
            y + lane_h,
            y + lane_h / 2.0 + 4.0,
            escape(&label)
        ));
    }
    let lane_y =
        |lane: &str| top + lane_h * lanes.iter().position(|l| l == lane).unwrap_or(0) as f64;
    for h in &t.holdings {
        let (x0, x1) = (x(h.from_nanos), x(h.to_nanos).max(x(h.from_nanos) + 2.0));
        let y = lane_y(&h.lane) + 8.0;
        svg.push_str(&format!(
            "<g class=\"holding\"><rect x=\"{x0:.1}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" \
             fill=\"#dde\" stroke=\"#000\"/><text x=\"{:.1}\" y=\"{}\">{} {}</text>\
             <title>{} held it {} ({} → {})</title></g>\n",
            x1 - x0,
            lane_h - 16.0,
            x0 + 3.0,
            y + 17.0,
            escape(&h.who),
            human(h.seconds),
            escape(&h.who),
            human(h.seconds),
            escape(&h.from),
            escape(&h.to)
        ));
    }
    for s in &t.steps {
        let Some(alert) = &s.alert else { continue };
        let lane = if s.service == "dispatch" && !s.crew.is_empty() {
            format!("crew {}", s.crew)
        } else {
            lane_of_line(s.line.max(1))
        };
        let (cx, y) = (x(s.at_nanos), lane_y(&lane));
        let (class, colour, mark) = if alert.breached {
            ("breach", "#c00", "✕")
        } else {
            ("warning", "#c80", "!")
        };
        svg.push_str(&format!(
            "<g class=\"{class}\"><line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{y}\" y2=\"{}\" \
             stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{}\" fill=\"{colour}\">\
             {mark} {} {}</text><title>{}</title></g>\n",
            y + lane_h,
            cx + 2.0,
            y + 10.0,
            escape(&alert.clock),
            if alert.breached {
                "breach".to_string()
            } else {
                format!("{}%", alert.percent)
            },
            escape(&s.what)
        ));
    }
    svg.push_str("</svg>\n");
    let mut rows = String::new();
    for s in &t.steps {
        let class = match &s.alert {
            Some(a) if a.breached => " class=\"breach\"",
            Some(_) => " class=\"warning\"",
            None => "",
        };
        rows.push_str(&format!(
            "<tr{class}><td>{}</td><td>{}</td><td>+{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            s.n,
            escape(&s.at),
            human(s.since_previous_seconds),
            escape(&s.service),
            escape(&s.event),
            escape(&if s.holder.is_empty() { String::new() } else { format!("L{} {}", s.line, s.holder) }),
            escape(&s.what)
        ));
    }
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{kind} {id}</title>\n\
         <style>body{{font-family:sans-serif;color:#000;background:#fff;margin:16px}}\
         table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #999;padding:2px 6px;text-align:left}}\
         tr.breach td{{font-weight:bold;color:#c00}}tr.warning td{{color:#a60}}\
         @media print{{svg{{max-width:100%;height:auto}}}}</style></head><body>\n\
         <h1>{kind} {id}</h1><p>{events} events, {total}, {warnings} warnings, {breaches} breaches.</p>\n\
         {svg}<table><tr><th>#</th><th>at</th><th>after</th><th>service</th><th>event</th><th>holder</th><th>what</th></tr>\n\
         {rows}</table></body></html>\n",
        kind = t.kind,
        id = escape(&t.id),
        events = t.events,
        total = human(t.total_seconds),
        warnings = t.warnings,
        breaches = t.breaches,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lineguard_protos::routing::v1::RouteReason;
    use prost::{Message, Name};

    fn at<M: Message + Name>(m: &M, source: &str, seconds: i64, n: u64) -> EventEnvelope {
        EventEnvelope {
            event_id: format!("e{n}"),
            global_position: n,
            source: source.into(),
            correlation_id: "incident-1".into(),
            recorded_at: Some(Timestamp { seconds, nanos: 0 }),
            event_type: M::full_name(),
            payload: m.encode_to_vec().into(),
            ..EventEnvelope::default()
        }
    }

    #[test]
    fn holdings_alerts_and_renderings() {
        let routed = |hop: u32, line: u32, who: &str, reason: RouteReason| TicketRouted {
            hop,
            line,
            assignee_id: who.into(),
            crew_id: "crew-1".into(),
            reason: reason as i32,
            ..TicketRouted::default()
        };
        let events = vec![
            at(&TicketReported::default(), "intake", 1_000, 1),
            at(
                &routed(1, 1, "m-1", RouteReason::DistrictOwner),
                "routing",
                1_001,
                2,
            ),
            at(
                &OrderAssigned {
                    crew_id: "crew-1".into(),
                    ..OrderAssigned::default()
                },
                "dispatch",
                1_002,
                3,
            ),
            at(
                &ClockBreached {
                    clock: "acceptance".into(),
                    line: 1,
                    ..ClockBreached::default()
                },
                "routing",
                1_301,
                4,
            ),
            at(
                &routed(2, 2, "desk-1", RouteReason::Escalated),
                "routing",
                1_301,
                5,
            ),
            at(
                &WorkCompleted {
                    crew_id: "crew-1".into(),
                    ..WorkCompleted::default()
                },
                "dispatch",
                4_901,
                6,
            ),
        ];
        let t = build(&Replayed {
            kind: "incident",
            id: "incident-1".into(),
            correlation_ids: vec!["incident-1".into()],
            events,
        });
        assert_eq!((t.events, t.breaches, t.warnings), (6, 1, 0));
        assert!((t.total_seconds - 3_901.0).abs() < 1e-9);
        let spans: Vec<(&str, &str, f64)> = t
            .holdings
            .iter()
            .map(|h| (h.lane.as_str(), h.who.as_str(), h.seconds))
            .collect();
        assert_eq!(
            spans,
            vec![
                ("line 1", "m-1", 300.0),
                ("crew crew-1", "crew-1", 3_899.0),
                ("line 2", "desk-1", 3_600.0)
            ]
        );
        let step = &t.steps[4];
        assert_eq!((step.line, step.holder.as_str()), (2, "desk-1"));
        assert!((step.since_previous_seconds - 0.0).abs() < 1e-9);
        let text = render_text(&t);
        assert!(text.contains("acceptance clock BREACHED"), "{text}");
        assert!(text.contains("where the time went"), "{text}");
        let html = render_html(&t);
        for lane in [
            "Line 1: district manager",
            "Line 2: station",
            "Line 3: company",
            "Crew crew-1",
        ] {
            assert!(html.contains(lane), "{lane}");
        }
        assert!(html.contains("class=\"breach\""));
        assert_eq!(human(3_661.0), "1h 01m 01s");
        assert_eq!(human(65.0), "1m 05s");
    }
}
