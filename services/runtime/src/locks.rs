//! Striped async locks: decisions about one thing (a customer: is this a
//! repeat call? a work order: may this crew act on it now?) are made one at
//! a time, while unrelated ones proceed in parallel. A fixed number of
//! stripes bounds the memory whatever the number of keys.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard, OwnedMutexGuard};

/// A fixed set of mutexes, picked by hashing a key.
pub struct StripedLocks {
    stripes: Vec<Arc<Mutex<()>>>,
}

impl StripedLocks {
    /// `count` stripes (at least one).
    pub fn new(count: usize) -> Self {
        StripedLocks {
            stripes: (0..count.max(1))
                .map(|_| Arc::new(Mutex::new(())))
                .collect(),
        }
    }

    /// Locks the stripes of every key, in stripe order so that two callers
    /// can never wait on each other.
    pub async fn lock(&self, keys: &[String]) -> Vec<MutexGuard<'_, ()>> {
        let mut guards = Vec::with_capacity(keys.len());
        for index in self.indexes(keys) {
            guards.push(self.stripes[index].lock().await);
        }
        guards
    }

    /// As [`StripedLocks::lock`], with guards that own their stripe, so they
    /// can be handed on (e.g. held until a consumer's commit lands).
    pub async fn lock_owned(&self, keys: &[String]) -> Vec<OwnedMutexGuard<()>> {
        let mut guards = Vec::with_capacity(keys.len());
        for index in self.indexes(keys) {
            guards.push(self.stripes[index].clone().lock_owned().await);
        }
        guards
    }

    fn indexes(&self, keys: &[String]) -> Vec<usize> {
        let mut indexes: Vec<usize> = keys
            .iter()
            .map(|key| {
                let mut hasher = DefaultHasher::new();
                key.hash(&mut hasher);
                (hasher.finish() % self.stripes.len() as u64) as usize
            })
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        indexes
    }
}
