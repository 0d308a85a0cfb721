//! Intake's data keys kept off its disk: a JetStream key-value bucket
//! (`LINEGUARD_KEYS_INTAKE`, history 1, `--stream-replicas` copies) beside
//! the local key store, with `--log-copy` ([`KeyReplica`]).
//!
//! Only wrapped keys travel (sealed by the master key, which never leaves
//! intake's secret). Erasing a customer purges their key from the bucket:
//! a purge removes every revision, so no copy of the key is left there
//! for a restored disk to bring back.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use lineguard_bus::copy::wait_on;

use crate::sealing::{KeyReplica, SealError};

/// Puts sent at once when a batch of new keys is replicated.
const PUTS_IN_FLIGHT: usize = 256;

/// Most bytes of a wrapped key (a nonce, 32 bytes and a tag: 60).
const MAX_WRAPPED_BYTES: i32 = 256;

/// Creates the bucket named `bucket` (the instance's:
/// [`lineguard_bus::copy::key_bucket_name`]), or brings its replicas to
/// `replicas`.
pub async fn ensure_key_bucket(
    jetstream: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, SealError> {
    jetstream
        .create_or_update_key_value(kv::Config {
            bucket: bucket.to_string(),
            description: "intake's wrapped data keys (lineguard --log-copy)".into(),
            history: 1,
            max_value_size: MAX_WRAPPED_BYTES,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..kv::Config::default()
        })
        .await
        .map_err(|e| SealError::Store(format!("key bucket {bucket}: {e}")))
}

/// The key bucket, called from the key store's threads.
pub struct JetStreamKeyReplica {
    jetstream: jetstream::Context,
    bucket: kv::Store,
    runtime: tokio::runtime::Handle,
}

impl JetStreamKeyReplica {
    /// The replica in `bucket` ([`ensure_key_bucket`]); its NATS work runs
    /// on `runtime` (multi-threaded).
    pub fn new(
        jetstream: jetstream::Context,
        bucket: kv::Store,
        runtime: tokio::runtime::Handle,
    ) -> JetStreamKeyReplica {
        JetStreamKeyReplica {
            jetstream,
            bucket,
            runtime,
        }
    }
}

fn replica_error(what: &str, e: impl std::fmt::Display) -> SealError {
    SealError::Store(format!("key bucket, {what}: {e}"))
}

/// A customer key as a bucket key: the same text when it is one a bucket
/// takes (intake's keys are `acct-…` and `caller-<hex>`).
fn bucket_key(customer_key: &str) -> Result<&str, SealError> {
    let valid = !customer_key.is_empty()
        && customer_key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b));
    if valid {
        Ok(customer_key)
    } else {
        Err(SealError::Store(format!(
            "customer key {customer_key:?} cannot name a key in a bucket"
        )))
    }
}

impl KeyReplica for JetStreamKeyReplica {
    fn put_all(&self, keys: &[(String, Vec<u8>)]) -> Result<(), SealError> {
        wait_on(&self.runtime, async {
            let puts = keys.iter().map(|(customer, wrapped)| async move {
                let key = bucket_key(customer)?;
                // Retried while NATS is away: the callers wait for their key.
                let mut pause = Duration::from_millis(50);
                for attempt in 0.. {
                    match self
                        .bucket
                        .put(key, Bytes::copy_from_slice(wrapped))
                        .await
                    {
                        Ok(_) => return Ok(()),
                        Err(e) if attempt < 20 => {
                            tracing::warn!(error = %e, "a new data key is not replicated yet; retrying");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(2));
                        }
                        Err(e) => return Err(replica_error("put", e)),
                    }
                }
                Ok(())
            });
            futures::stream::iter(puts)
                .buffer_unordered(PUTS_IN_FLIGHT)
                .collect::<Vec<Result<(), SealError>>>()
                .await
                .into_iter()
                .collect()
        })
    }

    fn destroy(&self, customer_key: &str) -> Result<(), SealError> {
        let key = bucket_key(customer_key)?;
        wait_on(&self.runtime, self.bucket.purge(key)).map_err(|e| replica_error("purge", e))
    }

    fn for_each(
        &self,
        each: &mut dyn FnMut(String, Vec<u8>) -> Result<(), SealError>,
    ) -> Result<(), SealError> {
        wait_on(&self.runtime, async {
            // The bucket's stream, message by message: after purges it holds
            // each live key once and a marker for each purged one.
            let stream_name = format!("KV_{}", self.bucket.name);
            let mut stream = self
                .jetstream
                .get_stream(&stream_name)
                .await
                .map_err(|e| replica_error("reading", e))?;
            let state = stream
                .info()
                .await
                .map_err(|e| replica_error("reading", e))?
                .state
                .clone();
            if state.messages == 0 {
                return Ok(());
            }
            let prefix = format!("$KV.{}.", self.bucket.name);
            let mut live = std::collections::BTreeMap::new();
            for sequence in state.first_sequence..=state.last_sequence {
                let message = match stream.get_raw_message(sequence).await {
                    Ok(message) => message,
                    // Removed by a purge's rollup: a gap, not an error.
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        continue;
                    }
                    Err(e) => return Err(replica_error("reading", e)),
                };
                let Some(customer) = message.subject.strip_prefix(prefix.as_str()) else {
                    continue;
                };
                let operation = message
                    .headers
                    .get("KV-Operation")
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                if operation.is_empty() {
                    live.insert(customer.to_string(), message.payload.to_vec());
                } else {
                    live.remove(customer);
                }
            }
            for (customer, wrapped) in live {
                each(customer, wrapped)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_a_bucket_takes_are_replicated() {
        assert_eq!(bucket_key("acct-42").ok(), Some("acct-42"));
        assert_eq!(bucket_key("caller-0af3").ok(), Some("caller-0af3"));
        for bad in ["", "a b", "a.b", "a*", "a>", "ключ"] {
            assert!(bucket_key(bad).is_err(), "{bad:?}");
        }
    }
}
