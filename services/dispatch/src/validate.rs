//! Field-level checks of crew actions; every error names its field.

use lineguard_protos::dispatch::v1::{ActionHeader, crew_action::Action};
use tonic::Status;

use crate::orders::{MAX_ACTION_ID, MAX_PARTS, MAX_TEXT_CHARS};

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid {field}: {reason}"))
}

/// An id as the log accepts it: `[A-Za-z0-9_-]`, 1 to 64 characters.
pub fn id(field: &str, value: &str) -> Result<(), Status> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            "must be 1 to 64 characters of letters, digits, '-' and '_'",
        ))
    }
}

fn text(field: &str, value: &str, required: bool) -> Result<(), Status> {
    if required && value.trim().is_empty() {
        return Err(invalid(field, "is required"));
    }
    let n = value.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(invalid(
            field,
            format!("{n} characters, over the limit of {MAX_TEXT_CHARS}"),
        ));
    }
    if value.chars().any(|c| c.is_control() && c != '\n') {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

/// The header every action carries: crew, order, action id, device time.
pub fn header(header: Option<&ActionHeader>) -> Result<&ActionHeader, Status> {
    let h = header.ok_or_else(|| invalid("header", "is required"))?;
    id("header.crew_id", &h.crew_id)?;
    id("header.order_id", &h.order_id)?;
    if h.action_id.is_empty()
        || h.action_id.len() > MAX_ACTION_ID
        || !h.action_id.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(invalid(
            "header.action_id",
            format!("must be 1 to {MAX_ACTION_ID} printable ASCII characters"),
        ));
    }
    if h.device_time.is_none() {
        return Err(invalid("header.device_time", "is required"));
    }
    Ok(h)
}

/// Checks an action and returns its header.
pub fn action(action: &Action) -> Result<&ActionHeader, Status> {
    match action {
        Action::Acknowledge(a) => header(a.header.as_ref()),
        Action::Depart(a) => header(a.header.as_ref()),
        Action::Arrive(a) => {
            if let Some(p) = &a.position
                && (!(-90.0..=90.0).contains(&p.latitude)
                    || !(-180.0..=180.0).contains(&p.longitude))
            {
                return Err(invalid(
                    "position",
                    "latitude must be within ±90 and longitude ±180",
                ));
            }
            header(a.header.as_ref())
        }
        Action::UpdateEtr(a) => {
            if a.estimated_restoration.is_none() {
                return Err(invalid("estimated_restoration", "is required"));
            }
            header(a.header.as_ref())
        }
        Action::Restore(a) => header(a.header.as_ref()),
        Action::Complete(a) => {
            text("cause", &a.cause, true)?;
            text("result", &a.result, true)?;
            text("notes", &a.notes, false)?;
            if a.parts_used.len() > MAX_PARTS {
                return Err(invalid("parts_used", format!("at most {MAX_PARTS} parts")));
            }
            for (i, part) in a.parts_used.iter().enumerate() {
                text(&format!("parts_used[{i}]"), part, true)?;
            }
            header(a.header.as_ref())
        }
        Action::ReturnOrder(a) => {
            match a.reason.as_str() {
                "wrong_district" => id("correct_district_id", &a.correct_district_id)?,
                "customer_side_fault" | "not_ours" => {}
                other => {
                    return Err(invalid(
                        "reason",
                        format!("{other:?} is not wrong_district, customer_side_fault or not_ours"),
                    ));
                }
            }
            text("note", &a.note, false)?;
            header(a.header.as_ref())
        }
        Action::AddNote(a) => {
            text("text", &a.text, true)?;
            header(a.header.as_ref())
        }
    }
}
