//! Customer data sealed with a key of its own per customer, so that it can
//! be erased (crypto-shredding).
//!
//! A caller's name and phone, the address and the description are sealed
//! (AES-256-GCM) with their customer's data key before they enter intake's
//! log ([`seal`]); every copy downstream (the bus, the consumers' parked
//! copies, feedback's observed copy, dispatch's orders) carries only the
//! sealed bytes. Data keys are kept in a [`KeyStore`], each wrapped by the
//! master key. Erasing a customer destroys their data key: every copy, in
//! every log and on the bus, becomes unreadable at once, while the events
//! stay as written (the logs are append-only).
//!
//! [`LocalKeyStore`] keeps the wrapped keys in a RocksDB of their own beside
//! intake's log, the master key in a file (or the environment). A KMS fits
//! behind the same trait: it would hold the master key and wrap and unwrap.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use lineguard_protos::intake::v1::{Contact, SealedContact};
use prost::Message;

/// Bytes of a key (AES-256).
pub const KEY_BYTES: usize = 32;
/// Bytes of a GCM nonce.
pub const NONCE_BYTES: usize = 12;
/// Most bytes of a sealed contact's ciphertext opened (a contact is at most
/// a few kilobytes: intake bounds every field).
pub const MAX_SEALED_BYTES: usize = 64 * 1024;
/// Most bytes read from a master key file.
const MAX_KEY_FILE_BYTES: u64 = 1_024;

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The master key could not be had.
    #[error("master key {source_name}: {reason}")]
    MasterKey { source_name: String, reason: String },
    /// The key store could not be read or written.
    #[error("key store: {0}")]
    Store(String),
    /// The customer's data key is gone (erased) or never existed.
    #[error("the data key of customer {0} does not exist (erased)")]
    NoKey(String),
    /// The sealed bytes do not open with the key (corrupt, or another
    /// customer's contact).
    #[error("sealed contact of customer {0} does not open: {1}")]
    Corrupt(String, String),
}

/// A customer's data key. Never logged, never written unwrapped.
#[derive(Clone)]
pub struct DataKey(Key<Aes256Gcm>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    fn random() -> Result<DataKey, SealError> {
        let mut bytes = [0u8; KEY_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| SealError::Store(e.to_string()))?;
        Ok(DataKey(Key::<Aes256Gcm>::from(bytes)))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0)
    }
}

/// Where customers' data keys are kept. One interface, so that a KMS can
/// replace the local store.
pub trait KeyStore: Send + Sync + 'static {
    /// The customer's data key, made (and kept durably) the first time.
    fn data_key(&self, customer_key: &str) -> Result<DataKey, SealError>;
    /// The customer's data key, if it exists.
    fn existing_key(&self, customer_key: &str) -> Result<Option<DataKey>, SealError>;
    /// Destroys the customer's data key for good; true if there was one.
    fn destroy(&self, customer_key: &str) -> Result<bool, SealError>;
}

/// A replicated place that holds every wrapped data key beside the local
/// store (with `--log-copy`; [`crate::key_copy`]), so that a lost disk
/// loses no customer's key: a new key is in it before anything is sealed
/// with it, a destroyed key is purged from it, and a local store that
/// starts empty is filled from it. The calls block.
pub trait KeyReplica: Send + Sync + 'static {
    /// Holds these wrapped keys (customer key, wrapped key) durably.
    fn put_all(&self, keys: &[(String, Vec<u8>)]) -> Result<(), SealError>;
    /// Purges the customer's key, every revision of it.
    fn destroy(&self, customer_key: &str) -> Result<(), SealError>;
    /// Calls `each` with every wrapped key it holds.
    fn for_each(
        &self,
        each: &mut dyn FnMut(String, Vec<u8>) -> Result<(), SealError>,
    ) -> Result<(), SealError>;
}

fn random_nonce() -> Result<[u8; NONCE_BYTES], SealError> {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(|e| SealError::Store(e.to_string()))?;
    Ok(nonce)
}

/// Seals `contact` for `customer_key` with a fresh nonce; the customer key
/// is the associated data.
pub fn seal(
    store: &dyn KeyStore,
    customer_key: &str,
    contact: &Contact,
) -> Result<SealedContact, SealError> {
    let key = store.data_key(customer_key)?;
    let nonce = random_nonce()?;
    let ciphertext = key
        .cipher()
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &contact.encode_to_vec(),
                aad: customer_key.as_bytes(),
            },
        )
        .map_err(|e| SealError::Corrupt(customer_key.to_string(), e.to_string()))?;
    Ok(SealedContact {
        customer_key: customer_key.to_string(),
        nonce: nonce.to_vec().into(),
        ciphertext: ciphertext.into(),
    })
}

/// Opens a sealed contact: [`SealError::NoKey`] once the customer is erased.
pub fn open(store: &dyn KeyStore, sealed: &SealedContact) -> Result<Contact, SealError> {
    let customer = sealed.customer_key.as_str();
    let corrupt = |reason: &str| SealError::Corrupt(customer.to_string(), reason.to_string());
    if sealed.nonce.len() != NONCE_BYTES {
        return Err(corrupt("nonce is not 12 bytes"));
    }
    if sealed.ciphertext.len() > MAX_SEALED_BYTES {
        return Err(corrupt("ciphertext over the limit"));
    }
    let key = store
        .existing_key(customer)?
        .ok_or_else(|| SealError::NoKey(customer.to_string()))?;
    let plain = key
        .cipher()
        .decrypt(
            Nonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: customer.as_bytes(),
            },
        )
        .map_err(|e| corrupt(&e.to_string()))?;
    Contact::decode(plain.as_slice()).map_err(|e| corrupt(&e.to_string()))
}

/// The key that wraps every data key at rest.
#[derive(Clone)]
pub struct MasterKey(Key<Aes256Gcm>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

fn parse_hex_key(text: &str) -> Result<[u8; KEY_BYTES], String> {
    let text = text.trim();
    if text.len() != KEY_BYTES * 2 {
        return Err(format!(
            "expected {} hex digits, found {} characters",
            KEY_BYTES * 2,
            text.len()
        ));
    }
    let mut key = [0u8; KEY_BYTES];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| "not hexadecimal".to_string())?;
    }
    Ok(key)
}

impl MasterKey {
    /// A master key given as 64 hex digits (e.g. the environment).
    pub fn from_hex(source_name: &str, text: &str) -> Result<MasterKey, SealError> {
        let key = parse_hex_key(text).map_err(|reason| SealError::MasterKey {
            source_name: source_name.to_string(),
            reason,
        })?;
        Ok(MasterKey(Key::<Aes256Gcm>::from(key)))
    }

    /// The master key in `path` (64 hex digits), made (random, readable by
    /// the owner only) the first time: for development and tests; an
    /// installation provisions its own and keeps it apart from the data.
    pub fn load_or_create(path: &Path) -> Result<MasterKey, SealError> {
        let fail = |reason: String| SealError::MasterKey {
            source_name: path.display().to_string(),
            reason,
        };
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
            }
            let mut key = [0u8; KEY_BYTES];
            getrandom::fill(&mut key).map_err(|e| fail(e.to_string()))?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(path) {
                Ok(mut file) => {
                    file.write_all(hex.as_bytes())
                        .and_then(|()| file.sync_all())
                        .map_err(|e| fail(e.to_string()))?;
                }
                // Another process made it first: theirs stands.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        let size = std::fs::metadata(path)
            .map_err(|e| fail(e.to_string()))?
            .len();
        if size > MAX_KEY_FILE_BYTES {
            return Err(fail(format!("{size} bytes: not a key file")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        MasterKey::from_hex(&path.display().to_string(), &text)
    }

    fn wrap(&self, customer_key: &str, key: &DataKey) -> Result<Vec<u8>, SealError> {
        let nonce = random_nonce()?;
        let mut wrapped = nonce.to_vec();
        let sealed = Aes256Gcm::new(&self.0)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key.0.as_slice(),
                    aad: customer_key.as_bytes(),
                },
            )
            .map_err(|e| SealError::Store(e.to_string()))?;
        wrapped.extend_from_slice(&sealed);
        Ok(wrapped)
    }

    fn unwrap_key(&self, customer_key: &str, wrapped: &[u8]) -> Result<DataKey, SealError> {
        if wrapped.len() <= NONCE_BYTES {
            return Err(SealError::Store(format!(
                "wrapped key of {customer_key} is too short"
            )));
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_BYTES);
        let plain = Aes256Gcm::new(&self.0)
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: customer_key.as_bytes(),
                },
            )
            .map_err(|_| {
                SealError::Store(format!(
                    "the data key of {customer_key} does not unwrap: another master key?"
                ))
            })?;
        let bytes: [u8; KEY_BYTES] = plain.as_slice().try_into().map_err(|_| {
            SealError::Store(format!("the data key of {customer_key} is not 32 bytes"))
        })?;
        Ok(DataKey(Key::<Aes256Gcm>::from(bytes)))
    }
}

/// Wrapped data keys in a RocksDB of their own (`<data dir>/keys`).
///
/// A new customer's key must be durable before anything sealed with it
/// is, so each is written with an fsync. Written one at a time, that fsync
/// would cap new customers at one a disk flush for the whole service (in a
/// storm nearly every caller is new); instead the keys wanted at once are
/// written together, one fsync for all ([`KeyMaking`]), and a second
/// report of a customer whose key is being made waits for that key rather
/// than making another.
pub struct LocalKeyStore {
    db: rocksdb::DB,
    master: MasterKey,
    /// Where every key is also kept, off this disk (`None`: this disk only).
    replica: Option<Arc<dyn KeyReplica>>,
    making: Mutex<KeyMaking>,
    /// Wakes the callers waiting for their batch.
    written: Condvar,
    /// Held while keys are written or destroyed: a destroy never runs
    /// between a batch's write and its callers' return.
    writing: Mutex<()>,
}

/// Keys being made: those waiting for the next write, those in the write
/// under way, and how far the writes have come.
#[derive(Default)]
struct KeyMaking {
    /// Keys for the next batch (customer key → data key and wrapped form).
    queued: HashMap<String, (DataKey, Vec<u8>)>,
    /// Keys of the batch being written.
    in_write: HashMap<String, DataKey>,
    /// Number of the batch the queued keys will go in.
    next_batch: u64,
    /// Batches written (or failed: their keys are then not in the store)
    /// so far: batch `n` is done once this exceeds `n`. While no batch is
    /// being written it equals `next_batch`.
    batches_done: u64,
    /// A batch is being written by one of the callers.
    leader: bool,
}

/// Most keys written in one batch.
const MAX_KEYS_PER_BATCH: usize = 4_096;

impl std::fmt::Debug for LocalKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalKeyStore(..)")
    }
}

fn store_error(e: impl std::fmt::Display) -> SealError {
    SealError::Store(e.to_string())
}

fn poisoned<T>(_: T) -> SealError {
    SealError::Store("key store lock poisoned".into())
}

impl LocalKeyStore {
    /// Opens (or creates) the store at `path`, wrapping with `master`.
    pub fn open(path: &Path, master: MasterKey) -> Result<LocalKeyStore, SealError> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        // One small file set: keys are 60 bytes each; a small memtable
        // (a million customers' keys are 60 MB in all).
        options.set_keep_log_file_num(2);
        options.set_write_buffer_size(4 * 1024 * 1024);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&rocksdb::Cache::new_lru_cache(8 * 1024 * 1024));
        table.set_cache_index_and_filter_blocks(true);
        options.set_block_based_table_factory(&table);
        let db = rocksdb::DB::open(&options, path).map_err(store_error)?;
        Ok(LocalKeyStore {
            db,
            master,
            replica: None,
            making: Mutex::new(KeyMaking::default()),
            written: Condvar::new(),
            writing: Mutex::new(()),
        })
    }

    /// Opens the store at `path` with every key also kept in `replica`: a
    /// store that holds no key yet (a new disk, or one that replaced a lost
    /// one) is first filled with every key the replica holds.
    pub fn open_replicated(
        path: &Path,
        master: MasterKey,
        replica: Arc<dyn KeyReplica>,
    ) -> Result<LocalKeyStore, SealError> {
        let mut store = LocalKeyStore::open(path, master)?;
        let mut first = store.db.raw_iterator();
        first.seek_to_first();
        let empty = !first.valid();
        first.status().map_err(store_error)?;
        drop(first);
        if empty {
            let mut batch = rocksdb::WriteBatch::default();
            replica.for_each(&mut |customer, wrapped| {
                batch.put(customer.as_bytes(), wrapped);
                Ok(())
            })?;
            let keys = batch.len();
            store
                .db
                .write_opt(batch, &Self::durable())
                .map_err(store_error)?;
            if keys > 0 {
                tracing::warn!(keys, "the key store was empty: filled from its replica");
            }
        }
        store.replica = Some(replica);
        Ok(store)
    }

    fn durable() -> rocksdb::WriteOptions {
        let mut write = rocksdb::WriteOptions::default();
        write.set_sync(true);
        write
    }

    /// Writes the queued keys in one fsynced batch (the caller leads this
    /// batch), then wakes everyone waiting for it.
    fn write_queued(
        &self,
        mut making: std::sync::MutexGuard<'_, KeyMaking>,
    ) -> Result<(), SealError> {
        let batch_number = making.next_batch;
        making.next_batch += 1;
        making.leader = true;
        let queued = std::mem::take(&mut making.queued);
        let mut batch = rocksdb::WriteBatch::default();
        let mut replicated = Vec::with_capacity(queued.len());
        for (customer, (key, wrapped)) in queued {
            batch.put(customer.as_bytes(), &wrapped);
            if self.replica.is_some() {
                replicated.push((customer.clone(), wrapped));
            }
            making.in_write.insert(customer, key);
        }
        drop(making);
        // Whatever the write does, the state below is restored: a failed
        // batch's callers find their keys missing from the store. The
        // replica first: a key this disk holds is always held off it too.
        let written = self.writing.lock().map_err(poisoned).and_then(|_writing| {
            if let Some(replica) = &self.replica {
                replica.put_all(&replicated)?;
            }
            self.db
                .write_opt(batch, &Self::durable())
                .map_err(store_error)
        });
        let mut making = self.making.lock().map_err(poisoned)?;
        making.in_write.clear();
        making.batches_done = batch_number + 1;
        making.leader = false;
        drop(making);
        self.written.notify_all();
        written
    }
}

impl KeyStore for LocalKeyStore {
    fn data_key(&self, customer_key: &str) -> Result<DataKey, SealError> {
        if let Some(key) = self.existing_key(customer_key)? {
            return Ok(key);
        }
        let mut making = self.making.lock().map_err(poisoned)?;
        loop {
            // Being made already (by a report of the same customer at
            // once)? In the write under way, or queued for the next.
            if let Some(key) = making.in_write.get(customer_key) {
                let (key, batch) = (key.clone(), making.batches_done);
                return self.wait_for(making, customer_key, batch, key);
            }
            if let Some((key, _)) = making.queued.get(customer_key) {
                let (key, batch) = (key.clone(), making.next_batch);
                return self.wait_for(making, customer_key, batch, key);
            }
            // Written since the look above: a second key would orphan what
            // the first sealed.
            if let Some(key) = self.existing_key(customer_key)? {
                return Ok(key);
            }
            if making.queued.len() < MAX_KEYS_PER_BATCH {
                let key = DataKey::random()?;
                let wrapped = self.master.wrap(customer_key, &key)?;
                making
                    .queued
                    .insert(customer_key.to_string(), (key.clone(), wrapped));
                let batch = making.next_batch;
                return self.wait_for(making, customer_key, batch, key);
            }
            // The next batch is full: write it (or wait for the write
            // under way) before queueing.
            making = if making.leader {
                self.written.wait(making).map_err(poisoned)?
            } else {
                self.write_queued(making)?;
                self.making.lock().map_err(poisoned)?
            };
        }
    }

    fn existing_key(&self, customer_key: &str) -> Result<Option<DataKey>, SealError> {
        match self.db.get(customer_key.as_bytes()).map_err(store_error)? {
            Some(wrapped) => Ok(Some(self.master.unwrap_key(customer_key, &wrapped)?)),
            None => Ok(None),
        }
    }

    /// Deletes the key, then flushes and compacts the store so that the
    /// wrapped key leaves every file (a tombstone alone would leave it in
    /// the write-ahead log and the table files until some later compaction).
    fn destroy(&self, customer_key: &str) -> Result<bool, SealError> {
        let _writing = self.writing.lock().map_err(poisoned)?;
        // The replica first: a key left there would come back with a lost
        // disk; one left here is destroyed by the erasure's retry.
        if let Some(replica) = &self.replica {
            replica.destroy(customer_key)?;
        }
        let existed = self
            .db
            .get(customer_key.as_bytes())
            .map_err(store_error)?
            .is_some();
        self.db
            .delete_opt(customer_key.as_bytes(), &Self::durable())
            .map_err(store_error)?;
        self.db.flush().map_err(store_error)?;
        let mut compact = rocksdb::CompactOptions::default();
        compact.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db
            .compact_range_opt(None::<&[u8]>, None::<&[u8]>, &compact);
        Ok(existed)
    }
}

impl LocalKeyStore {
    /// Waits until batch `batch` (which holds `customer_key`'s new key) is
    /// written, leading the write when none is under way; `key` once it is
    /// durable.
    fn wait_for<'a>(
        &'a self,
        mut making: std::sync::MutexGuard<'a, KeyMaking>,
        customer_key: &str,
        batch: u64,
        key: DataKey,
    ) -> Result<DataKey, SealError> {
        while making.batches_done <= batch {
            making = if making.leader {
                self.written.wait(making).map_err(poisoned)?
            } else {
                // Our key is queued for the next batch: lead it.
                self.write_queued(making)?;
                self.making.lock().map_err(poisoned)?
            };
        }
        drop(making);
        // Whether the batch's write landed: the key is in the store.
        match self.db.get(customer_key.as_bytes()).map_err(store_error)? {
            Some(_) => Ok(key),
            None => Err(SealError::Store(
                "writing a new data key failed; nothing was sealed with it".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact() -> Contact {
        Contact {
            caller_name: "Wang Fang".into(),
            caller_phone: "13912345678".into(),
            address: "No. 8 Riverside Road".into(),
            description: "sparks at the pole".into(),
        }
    }

    fn store(dir: &Path) -> LocalKeyStore {
        let master = MasterKey::load_or_create(&dir.join("master.key")).expect("master");
        LocalKeyStore::open(&dir.join("keys"), master).expect("store")
    }

    #[test]
    fn a_sealed_contact_opens_until_its_customer_is_erased() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let sealed = seal(&store, "acct-1", &contact()).expect("seal");
        assert!(
            !sealed.ciphertext.windows(11).any(|w| w == b"13912345678"),
            "the phone is not in the sealed bytes"
        );
        assert_eq!(open(&store, &sealed).expect("open"), contact());
        // Another customer's sealed contact cannot be passed off as this one's.
        let other = seal(&store, "acct-2", &contact()).expect("seal");
        let swapped = SealedContact {
            customer_key: "acct-1".into(),
            ..other
        };
        assert!(matches!(
            open(&store, &swapped),
            Err(SealError::Corrupt(..))
        ));
        assert!(store.destroy("acct-1").expect("destroy"));
        assert!(matches!(open(&store, &sealed), Err(SealError::NoKey(_))));
        assert!(!store.destroy("acct-1").expect("destroy again"));
    }

    #[test]
    fn keys_survive_a_restart_and_need_their_master_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sealed = {
            let store = store(dir.path());
            seal(&store, "acct-1", &contact()).expect("seal")
        };
        let reopened = store(dir.path());
        assert_eq!(open(&reopened, &sealed).expect("open"), contact());
        drop(reopened);
        let wrong = MasterKey::from_hex("test", &"ab".repeat(KEY_BYTES)).expect("hex");
        let with_wrong = LocalKeyStore::open(&dir.path().join("keys"), wrong).expect("store");
        assert!(matches!(
            open(&with_wrong, &sealed),
            Err(SealError::Store(_))
        ));
    }

    #[test]
    fn keys_made_at_once_are_one_key_a_customer_and_all_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(store(dir.path()));
        // 32 threads, 8 customers, each asked for 4 times at once: one
        // key a customer, whichever thread made it, and in the store.
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let customer = format!("acct-{}", i % 8);
                    let key = store.data_key(&customer).expect("data key");
                    (customer, key.0.to_vec())
                })
            })
            .collect();
        let mut keys: HashMap<String, Vec<u8>> = HashMap::new();
        for thread in threads {
            let (customer, key) = thread.join().expect("thread");
            let first = keys.entry(customer.clone()).or_insert_with(|| key.clone());
            assert_eq!(*first, key, "{customer} got two keys");
        }
        assert_eq!(keys.len(), 8);
        drop(store);
        let reopened = self::store(dir.path());
        for (customer, key) in keys {
            let stored = reopened
                .existing_key(&customer)
                .expect("read")
                .expect("durable");
            assert_eq!(stored.0.to_vec(), key);
        }
    }

    #[test]
    fn a_master_key_must_be_64_hex_digits() {
        assert!(MasterKey::from_hex("env", "abc").is_err());
        assert!(MasterKey::from_hex("env", &"zz".repeat(KEY_BYTES)).is_err());
        assert!(MasterKey::from_hex("env", &"0f".repeat(KEY_BYTES)).is_ok());
    }
}
