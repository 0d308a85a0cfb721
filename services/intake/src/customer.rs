//! Recognising a repeat caller without keeping anything that gives their
//! phone number away.
//!
//! A report names its customer by account number, or, without one, by the
//! caller's phone. The phone must never be a key (keys and logs are read by
//! operators), and a plain hash of it is no better: there are only about
//! 10^11 mobile numbers, so every one can be tried. The key is therefore an
//! HMAC-SHA-256 of the phone under a secret only intake holds
//! ([`CustomerDigest`]); it is recorded in the report's event
//! (`TicketReported.customer_key`), so the views rebuild from the log
//! without the secret, and erasing the phone later leaves the key
//! meaningless to anyone without the secret.

use std::io::Write as _;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a generated secret.
pub const SECRET_BYTES: usize = 32;
/// Fewest bytes a given secret may have.
pub const MIN_SECRET_BYTES: usize = 16;
/// Most bytes read from a secret file.
const MAX_SECRET_FILE_BYTES: u64 = 4_096;
/// Bytes of the HMAC kept in a key (128 bits: no collisions in practice).
const KEY_BYTES: usize = 16;

/// The keyed digest that turns a phone number into a customer key.
#[derive(Clone)]
pub struct CustomerDigest {
    secret: Vec<u8>,
}

impl std::fmt::Debug for CustomerDigest {
    /// Never shows the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CustomerDigest(..)")
    }
}

/// Why the secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("customer digest secret {path}: {reason}")]
    File { path: String, reason: String },
}

impl CustomerDigest {
    /// A digest under `secret` (at least [`MIN_SECRET_BYTES`]).
    pub fn new(secret: Vec<u8>) -> Result<CustomerDigest, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "a secret of {} bytes is too short (at least {MIN_SECRET_BYTES})",
                secret.len()
            ));
        }
        Ok(CustomerDigest { secret })
    }

    /// The secret in `path`, made (random, readable by the owner only) the
    /// first time; the same file gives the same keys across restarts.
    pub fn load_or_create(path: &Path) -> Result<CustomerDigest, SecretError> {
        let fail = |reason: String| SecretError::File {
            path: path.display().to_string(),
            reason,
        };
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
            }
            let mut secret = [0u8; SECRET_BYTES];
            getrandom::fill(&mut secret).map_err(|e| fail(e.to_string()))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(|e| fail(e.to_string()))?;
            file.write_all(&secret)
                .and_then(|()| file.sync_all())
                .map_err(|e| fail(e.to_string()))?;
            tracing::info!(path = %path.display(), "customer digest secret created");
        }
        let size = std::fs::metadata(path)
            .map_err(|e| fail(e.to_string()))?
            .len();
        if size > MAX_SECRET_FILE_BYTES {
            return Err(fail(format!(
                "{size} bytes: not a secret file (at most {MAX_SECRET_FILE_BYTES})"
            )));
        }
        let secret = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        CustomerDigest::new(secret).map_err(fail)
    }

    /// Who a report is from, for spotting repeat calls: the account when
    /// there is one, else the keyed digest of the phone (digits only, a
    /// leading '+' ignored); `None` when the report names neither.
    pub fn key(&self, account_number: &str, phone: &str) -> Option<String> {
        if !account_number.is_empty() {
            return Some(format!("acct-{account_number}"));
        }
        if phone.is_empty() {
            return None;
        }
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .expect("HMAC takes a key of any length");
        mac.update(phone.trim_start_matches('+').as_bytes());
        let digest = mac.finalize().into_bytes();
        let hex: String = digest[..KEY_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Some(format!("caller-{hex}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn a_phone_key_is_keyed_stable_and_not_a_plain_hash() {
        let a = CustomerDigest::new(vec![1; 32]).expect("secret");
        let b = CustomerDigest::new(vec![2; 32]).expect("secret");
        let phone = "13800138000";
        let key = a.key("", phone).expect("key");
        assert_eq!(a.key("", "+13800138000"), Some(key.clone()), "'+' ignored");
        assert_ne!(
            b.key("", phone),
            Some(key.clone()),
            "another secret, another key"
        );
        let plain: String = sha2::Sha256::digest(phone.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            !plain.contains(&key["caller-".len()..]),
            "not the plain hash"
        );
        assert!(!key.contains(phone));
        assert_eq!(
            a.key("3100000003", phone).as_deref(),
            Some("acct-3100000003")
        );
        assert_eq!(a.key("", ""), None);
        assert!(
            CustomerDigest::new(vec![0; 8]).is_err(),
            "short secrets refused"
        );
        assert_eq!(format!("{a:?}"), "CustomerDigest(..)", "never printed");
    }

    #[test]
    fn the_secret_file_is_made_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets").join("customer-digest.key");
        let first = CustomerDigest::load_or_create(&path).expect("created");
        let again = CustomerDigest::load_or_create(&path).expect("read");
        assert_eq!(first.key("", "13900000000"), again.key("", "13900000000"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by the owner only");
        }
        std::fs::write(&path, b"short").expect("write");
        assert!(CustomerDigest::load_or_create(&path).is_err());
    }
}
