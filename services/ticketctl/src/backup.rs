//! `backup SERVICE DIR` and `restore DIR DATA_DIR`: a service's whole store
//! taken online and put back.
//!
//! A backup is the log's RocksDB checkpoint, taken by the service while it
//! serves (`EventLog/Backup`, administrators only) and streamed here file by
//! file: `DIR/eventlog/` holds the store, `DIR/MANIFEST.json` the service,
//! the head position, the projection digest and each file's size and
//! SHA-256, all read from the checkpoint itself. Every file is checked
//! against the manifest before the backup is called done; a backup cut
//! short leaves no manifest and is refused by `restore`.
//!
//! `restore` checks the files again and copies the store into an empty
//! data directory (`DATA_DIR/eventlog`), where the service then opens it:
//! the same events and projections (the manifest's digest) as when the
//! backup was taken. It then catches up: with `--log-copy` the records
//! written after the checkpoint are read from the log's copy on JetStream,
//! so it stands exactly where the lost instance stood; without a copy it
//! stands at the checkpoint, and its consumers take up from the bus.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use lineguard_protos::eventlog::v1::{BackupManifest, BackupRequest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::endpoints::Clients;

/// The manifest's file name in a backup directory.
pub const MANIFEST: &str = "MANIFEST.json";
/// The store's directory in a backup directory and in a data directory.
pub const STORE: &str = "eventlog";
/// Largest file a backup may hold (a RocksDB table file is tens of MiB).
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// What a backup holds, as written to `MANIFEST.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The instance's name (`routing`, `routing-p1`).
    pub service: String,
    /// The last event's position in the backup.
    pub head_position: u64,
    /// The backup's projection digest.
    pub projection_digest: String,
    /// When the checkpoint was taken (RFC 3339).
    pub taken_at: String,
    /// Each file, its size and SHA-256.
    pub files: Vec<ManifestFile>,
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Its name in `eventlog/`.
    pub name: String,
    /// Its size.
    pub size_bytes: u64,
    /// Hex SHA-256 of its bytes.
    pub sha256: String,
}

impl From<BackupManifest> for Manifest {
    fn from(m: BackupManifest) -> Manifest {
        Manifest {
            service: m.service,
            head_position: m.head_position,
            projection_digest: m.projection_digest,
            taken_at: m
                .taken_at
                .map(|t| crate::timeline::rfc3339(lineguard_eventlog::timers::nanos(&t)))
                .unwrap_or_default(),
            files: m
                .files
                .into_iter()
                .map(|f| ManifestFile {
                    name: f.name,
                    size_bytes: f.size_bytes,
                    sha256: f.sha256,
                })
                .collect(),
        }
    }
}

/// A file name a backup may hold: a plain name, never a path.
fn safe_name(name: &str) -> Result<&str, Error> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0']);
    if plain {
        Ok(name)
    } else {
        Err(Error::Usage(format!(
            "backup: a file named {name:?} is not a plain file name"
        )))
    }
}

/// Takes a backup of `service` (its instance as `clients` reach it) into
/// `dir`, which must not exist or be empty.
pub async fn backup(clients: &Clients, service: &str, dir: &Path) -> Result<Manifest, Error> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        return Err(Error::Usage(format!(
            "{} is not empty: a backup goes into a new directory",
            dir.display()
        )));
    }
    let store = dir.join(STORE);
    std::fs::create_dir_all(&store)?;
    let mut stream = clients
        .log(service)?
        .backup(BackupRequest {})
        .await
        .map_err(Error::service(service))?
        .into_inner();
    let mut manifest = None;
    let mut open: Option<(String, std::fs::File)> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Error::service(service))?;
        if let Some(m) = chunk.manifest {
            manifest = Some(m);
            break;
        }
        let name = safe_name(&chunk.file)?.to_string();
        if open.as_ref().is_none_or(|(current, _)| *current != name) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(store.join(&name))?;
            open = Some((name.clone(), file));
        }
        if let Some((_, file)) = open.as_mut() {
            use std::io::{Seek, SeekFrom, Write};
            if chunk.offset.saturating_add(chunk.data.len() as u64) > MAX_FILE_BYTES {
                return Err(Error::TooBig(format!(
                    "backup: {name} is larger than {MAX_FILE_BYTES} bytes"
                )));
            }
            file.seek(SeekFrom::Start(chunk.offset))?;
            file.write_all(&chunk.data)?;
        }
    }
    drop(open);
    let manifest: Manifest = manifest
        .ok_or_else(|| Error::Usage(format!("{service}: the backup ended before its manifest")))?
        .into();
    check_files(&store, &manifest)?;
    for file in &manifest.files {
        std::fs::File::open(store.join(&file.name))?.sync_all()?;
    }
    // The manifest last: a directory without one is a backup cut short.
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::Usage(format!("manifest: {e}")))?;
    let written = dir.join(MANIFEST);
    std::fs::write(&written, text)?;
    std::fs::File::open(&written)?.sync_all()?;
    Ok(manifest)
}

/// Every file of `manifest` in `store`, its size and SHA-256 as listed,
/// and no other file.
fn check_files(store: &Path, manifest: &Manifest) -> Result<(), Error> {
    let mut present: Vec<String> = std::fs::read_dir(store)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    let mut listed: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
    listed.sort();
    if present != listed {
        return Err(Error::Usage(format!(
            "backup: the files {present:?} are not the manifest's {listed:?}"
        )));
    }
    for file in &manifest.files {
        let path = store.join(safe_name(&file.name)?);
        let mut reader = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut reader, &mut hasher)?;
        let sha256 = format!("{:x}", hasher.finalize());
        if size != file.size_bytes || sha256 != file.sha256 {
            return Err(Error::Usage(format!(
                "backup: {} is {size} bytes, SHA-256 {sha256}; the manifest says {} bytes, {}",
                file.name, file.size_bytes, file.sha256
            )));
        }
    }
    Ok(())
}

/// Reads and checks the backup in `dir`.
pub fn read_backup(dir: &Path) -> Result<Manifest, Error> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).map_err(|e| {
        Error::Usage(format!(
            "{}: no {MANIFEST} ({e}): not a whole backup",
            dir.display()
        ))
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::Usage(format!("{}: {e}", dir.join(MANIFEST).display())))?;
    check_files(&dir.join(STORE), &manifest)?;
    Ok(manifest)
}

/// Restores the backup in `dir` into `data_dir` (its `eventlog/` must not
/// exist or be empty), for the service to open there. Returns the
/// backup's manifest.
pub fn restore(dir: &Path, data_dir: &Path) -> Result<Manifest, Error> {
    let manifest = read_backup(dir)?;
    let target: PathBuf = data_dir.join(STORE);
    if target.exists() && std::fs::read_dir(&target)?.next().is_some() {
        return Err(Error::Usage(format!(
            "{} is not empty: restore into a new data directory (or move the old one away)",
            target.display()
        )));
    }
    std::fs::create_dir_all(&target)?;
    for file in &manifest.files {
        let name = safe_name(&file.name)?;
        std::fs::copy(dir.join(STORE).join(name), target.join(name))?;
        std::fs::File::open(target.join(name))?.sync_all()?;
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_with_a_changed_or_missing_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join(STORE);
        std::fs::create_dir_all(&store).expect("store");
        std::fs::write(store.join("000001.sst"), b"table").expect("file");
        let manifest = Manifest {
            service: "routing".into(),
            head_position: 7,
            projection_digest: "d".into(),
            taken_at: String::new(),
            files: vec![ManifestFile {
                name: "000001.sst".into(),
                size_bytes: 5,
                sha256: format!("{:x}", Sha256::digest(b"table")),
            }],
        };
        assert!(read_backup(dir.path()).is_err(), "no manifest: cut short");
        std::fs::write(
            dir.path().join(MANIFEST),
            serde_json::to_string(&manifest).expect("json"),
        )
        .expect("manifest");
        assert_eq!(read_backup(dir.path()).expect("whole"), manifest);
        let data = tempfile::tempdir().expect("data");
        restore(dir.path(), data.path()).expect("restored");
        assert_eq!(
            std::fs::read(data.path().join(STORE).join("000001.sst")).expect("copied"),
            b"table"
        );
        assert!(
            restore(dir.path(), data.path()).is_err(),
            "never over a store"
        );
        std::fs::write(store.join("000001.sst"), b"tablE").expect("damage");
        assert!(read_backup(dir.path()).is_err(), "a changed byte is found");
        assert!(safe_name("../etc/passwd").is_err());
        assert!(safe_name("..").is_err());
    }
}
