//! Projections: read models derived from the log by a [`Projector`].
//!
//! The writer applies the projector to every event it appends and puts the
//! resulting updates in the same write batch as the events, so a projection
//! is never ahead of or behind the log. Because the projector is the only
//! thing that writes projections, dropping them and replaying the log through
//! it rebuilds exactly the same state ([`EventLog::rebuild_projections`](crate::EventLog::rebuild_projections)).

use std::collections::BTreeMap;

use lineguard_protos::eventlog::v1::EventEnvelope;
use rocksdb::DB;

use crate::codec::{CF_PROJECTIONS, seal, unseal};
use crate::error::{Error, Result};

/// Derives projection state from events. Must be deterministic: the same
/// events in the same order give the same state.
pub trait Projector: Send + Sync + 'static {
    /// Stable name, stored with the projections.
    fn name(&self) -> &'static str;
    /// Bump when `apply` changes meaning: the log then rebuilds at open.
    fn version(&self) -> u32;
    /// Applies one committed event. An error rolls back the whole commit the
    /// event belongs to.
    fn apply(&self, event: &EventEnvelope, view: &mut ProjectionView<'_>) -> Result<(), String>;
}

/// The projector of a log that keeps no projections.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProjections;

impl Projector for NoProjections {
    fn name(&self) -> &'static str {
        "none"
    }
    fn version(&self) -> u32 {
        1
    }
    fn apply(&self, _: &EventEnvelope, _: &mut ProjectionView<'_>) -> Result<(), String> {
        Ok(())
    }
}

/// Reads of projection state: the stored projections
/// ([`EventLog`](crate::EventLog)), or the writer's view while it decides or
/// applies ([`ProjectionView`]). A decision written against this trait
/// runs the same wherever it is made.
pub trait ProjectionRead {
    /// The current value under `key`.
    fn projection(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// The value at `key` decoded as `M` (an error names the key).
    fn projection_message<M: prost::Message + Default>(&self, key: &[u8]) -> Result<Option<M>>
    where
        Self: Sized,
    {
        match self.projection(key)? {
            Some(bytes) => M::decode(bytes.as_slice())
                .map(Some)
                .map_err(|e| Error::Corrupted {
                    column: CF_PROJECTIONS,
                    location: String::from_utf8_lossy(key).into_owned(),
                    reason: format!("undecodable view: {e}"),
                }),
            None => Ok(None),
        }
    }
}

impl ProjectionRead for ProjectionView<'_> {
    fn projection(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get(key)
    }
}

impl ProjectionRead for crate::EventLog {
    fn projection(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.projection_get(key)
    }
}

/// Pending projection writes: `Some(value)` to put, `None` to delete.
pub(crate) type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// The projector's window on projection state while it applies an event: its
/// own writes so far, over the writes of earlier commits in the same group,
/// over what is stored.
pub struct ProjectionView<'a> {
    db: &'a DB,
    committed_in_group: &'a Overlay,
    pub(crate) writes: Overlay,
}

impl<'a> ProjectionView<'a> {
    pub(crate) fn new(db: &'a DB, committed_in_group: &'a Overlay) -> Self {
        ProjectionView {
            db,
            committed_in_group,
            writes: Overlay::new(),
        }
    }

    /// The current value under `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(pending) = self
            .writes
            .get(key)
            .or_else(|| self.committed_in_group.get(key))
        {
            return Ok(pending.clone());
        }
        read_projection(self.db, key)
    }

    /// The value at `key` decoded as `M` (an error names the key when it
    /// does not decode): what every projector reads its views with.
    pub fn get_message<M: prost::Message + Default>(
        &self,
        key: &[u8],
    ) -> std::result::Result<Option<M>, String> {
        match self.get(key).map_err(|e| e.to_string())? {
            Some(bytes) => M::decode(bytes.as_slice())
                .map(Some)
                .map_err(|e| format!("undecodable view at {}: {e}", String::from_utf8_lossy(key))),
            None => Ok(None),
        }
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.insert(key.into(), Some(value.into()));
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.writes.insert(key.into(), None);
    }
}

/// Reads one stored projection value, checking its frame.
pub(crate) fn read_projection(db: &DB, key: &[u8]) -> Result<Option<Vec<u8>>> {
    let cf = crate::log::cf(db, CF_PROJECTIONS)?;
    match db.get_pinned_cf(&cf, key)? {
        None => Ok(None),
        Some(value) => {
            let body = unseal(CF_PROJECTIONS, key, &value, || format!("key {key:02x?}"))?;
            Ok(Some(body.to_vec()))
        }
    }
}

/// Adds an overlay's writes to a batch.
pub(crate) fn write_overlay(
    db: &DB,
    batch: &mut rocksdb::WriteBatch,
    overlay: &Overlay,
) -> Result<()> {
    let cf = crate::log::cf(db, CF_PROJECTIONS)?;
    for (key, value) in overlay {
        match value {
            Some(value) => batch.put_cf(&cf, key, seal(key, value)),
            None => batch.delete_cf(&cf, key),
        }
    }
    Ok(())
}

/// Applies the projector to one event, turning its error into the log's.
pub(crate) fn apply(
    projector: &dyn Projector,
    event: &EventEnvelope,
    view: &mut ProjectionView<'_>,
) -> Result<()> {
    projector
        .apply(event, view)
        .map_err(|reason| Error::Projection {
            projector: projector.name(),
            event_type: event.event_type.clone(),
            position: event.global_position,
            reason,
        })
}
