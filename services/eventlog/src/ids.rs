//! Validation of the ids the log stores and publishes.
//!
//! Ids become RocksDB key prefixes and NATS subject tokens, so they are kept to
//! `[A-Za-z0-9_-]`: no separator (`.`, NUL), no wildcard (`*`, `>`), no space.

use crate::error::{Error, Result};

/// Checks that `value` is a non-empty id of at most `max_len` safe characters.
pub fn validate_id(field: &str, value: &str, max_len: usize) -> Result<()> {
    validate_id_at(|| field.to_owned(), value, max_len)
}

/// [`validate_id`] with the field's name built only if the id is invalid:
/// for hot paths that check many ids with composed names.
pub fn validate_id_at(field: impl FnOnce() -> String, value: &str, max_len: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field(), "must not be empty"));
    }
    if value.len() > max_len {
        return Err(Error::limit(
            format!("{} length", field()),
            value.len(),
            max_len,
        ));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    // Bytes first (the common, valid case); characters only to name a bad one.
    if !value.bytes().all(allowed)
        && let Some(bad) = value.chars().find(|c| !(c.is_ascii() && allowed(*c as u8)))
    {
        return Err(Error::invalid(
            field(),
            format!("character {bad:?} not allowed (only A-Z, a-z, 0-9, '-' and '_')"),
        ));
    }
    Ok(())
}

/// Like [`validate_id`], but an empty value is allowed.
pub fn validate_optional_id(
    field: impl FnOnce() -> String,
    value: &str,
    max_len: usize,
) -> Result<()> {
    if value.is_empty() {
        Ok(())
    } else {
        validate_id_at(field, value, max_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_typical_ids() {
        validate_id(
            "stream_id",
            "ticket-0192f3c4-7d1e-7abc-8def-0123456789ab",
            128,
        )
        .expect("valid");
        validate_id("actor.id", "mgr_017", 128).expect("valid");
    }

    #[test]
    fn rejects_separators_wildcards_and_length() {
        for bad in ["a.b", "a*", "a>", "a b", "a\0b", "日本"] {
            let err = validate_id("stream_id", bad, 128).expect_err(bad);
            assert!(err.to_string().contains("stream_id"), "{err}");
        }
        let err = validate_id("stream_id", &"a".repeat(129), 128).expect_err("too long");
        assert!(matches!(
            err,
            Error::LimitExceeded {
                limit: 128,
                actual: 129,
                ..
            }
        ));
        assert!(validate_id("stream_id", "", 128).is_err());
        validate_optional_id(|| "causation_id".into(), "", 128).expect("empty allowed");
    }
}
