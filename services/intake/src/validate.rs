//! Field-level checks of intake requests. Every error names the field and
//! the reason, and becomes `INVALID_ARGUMENT`.

use lineguard_protos::intake::v1::{
    Channel, EraseCustomerRequest, ReportTicketRequest, ServiceRequestType, TicketKind, Urgency,
};
use tonic::Status;

/// Longest free-text fields, in characters.
pub const MAX_ADDRESS_CHARS: usize = 256;
pub const MAX_DESCRIPTION_CHARS: usize = 2_000;
pub const MAX_NAME_CHARS: usize = 64;
pub const MAX_REASON_CHARS: usize = 500;
/// Longest idempotency key and account or district id.
pub const MAX_KEY_CHARS: usize = 128;
pub const MAX_ID_CHARS: usize = 64;

/// `INVALID_ARGUMENT` naming `field`.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid {field}: {reason}"))
}

fn max_chars(field: &str, value: &str, max: usize) -> Result<(), Status> {
    let n = value.chars().count();
    if n > max {
        return Err(invalid(
            field,
            format!("{n} characters, over the limit of {max}"),
        ));
    }
    if value.chars().any(|c| c.is_control() && c != '\n') {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

/// An idempotency key: required, printable, bounded.
pub fn idempotency_key(value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid("idempotency_key", "is required"));
    }
    if value.len() > MAX_KEY_CHARS || !value.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            "idempotency_key",
            format!("must be 1 to {MAX_KEY_CHARS} printable ASCII characters"),
        ));
    }
    Ok(())
}

/// An id as the event log and the bus accept it: `[A-Za-z0-9_-]`, bounded.
pub fn id(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > MAX_ID_CHARS {
        return Err(invalid(
            field,
            format!("must be 1 to {MAX_ID_CHARS} characters"),
        ));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            field,
            "only A-Z, a-z, 0-9, '-' and '_' are allowed",
        ));
    }
    Ok(())
}

/// A caller's phone number: an optional '+', then 7 to 15 digits.
pub fn phone(value: &str) -> Result<(), Status> {
    phone_field("caller.phone", value)
}

fn phone_field(field: &str, value: &str) -> Result<(), Status> {
    let digits = value.strip_prefix('+').unwrap_or(value);
    if !(7..=15).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(invalid(field, "must be an optional '+' and 7 to 15 digits"));
    }
    Ok(())
}

/// Checks an erasure: the customer by account, phone or both, and why.
pub fn erasure(req: &EraseCustomerRequest) -> Result<(), Status> {
    if req.account_number.is_empty() && req.phone.is_empty() {
        return Err(invalid(
            "account_number",
            "an account number or a phone is required",
        ));
    }
    if !req.account_number.is_empty() {
        id("account_number", &req.account_number)?;
    }
    if !req.phone.is_empty() {
        phone_field("phone", &req.phone)?;
    }
    reason(&req.reason)
}

/// Checks a report; on success returns its channel and kind.
pub fn report(req: &ReportTicketRequest) -> Result<(Channel, TicketKind), Status> {
    idempotency_key(&req.idempotency_key)?;
    let channel = match Channel::try_from(req.channel) {
        Ok(Channel::Unspecified) | Err(_) => {
            return Err(invalid(
                "channel",
                format!("unknown channel {}", req.channel),
            ));
        }
        Ok(channel) => channel,
    };
    let kind = match TicketKind::try_from(req.kind) {
        Ok(TicketKind::Unspecified) | Err(_) => {
            return Err(invalid("kind", format!("unknown ticket kind {}", req.kind)));
        }
        Ok(kind) => kind,
    };
    match ServiceRequestType::try_from(req.service_request_type) {
        Err(_) => {
            return Err(invalid(
                "service_request_type",
                format!("unknown type {}", req.service_request_type),
            ));
        }
        Ok(ServiceRequestType::Unspecified) if kind == TicketKind::ServiceRequest => {
            return Err(invalid(
                "service_request_type",
                "is required for a service request",
            ));
        }
        Ok(t) if t != ServiceRequestType::Unspecified && kind != TicketKind::ServiceRequest => {
            return Err(invalid(
                "service_request_type",
                "is only for service requests",
            ));
        }
        Ok(_) => {}
    }
    if Urgency::try_from(req.urgency).is_err() {
        return Err(invalid(
            "urgency",
            format!("unknown urgency {}", req.urgency),
        ));
    }
    if req.account_number.is_empty() && req.district_id.is_empty() {
        return Err(invalid(
            "account_number",
            "an account number or a district_id is required",
        ));
    }
    if !req.account_number.is_empty() {
        id("account_number", &req.account_number)?;
    }
    if !req.district_id.is_empty() {
        id("district_id", &req.district_id)?;
    }
    max_chars("address", &req.address, MAX_ADDRESS_CHARS)?;
    max_chars("description", &req.description, MAX_DESCRIPTION_CHARS)?;
    if let Some(caller) = &req.caller {
        max_chars("caller.name", &caller.name, MAX_NAME_CHARS)?;
        if !caller.phone.is_empty() {
            phone(&caller.phone)?;
        }
    }
    Ok((channel, kind))
}

/// Checks a free-text reason: required and bounded.
pub fn reason(value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(invalid("reason", "is required"));
    }
    max_chars("reason", value, MAX_REASON_CHARS)
}
