//! The `lineguard.eventlog.v1.EventLog` gRPC service over one [`EventLog`].

use std::pin::Pin;

use futures::{Stream, StreamExt};
use lineguard_protos::eventlog::v1::{
    self as pb, BackupChunk, BackupFile, BackupManifest, BackupRequest, GetLogInfoRequest,
    GetLogInfoResponse, GetProjectionDigestRequest, ProjectionDigest, ReadAllRequest,
    ReadAllResponse, ReadCorrelationRequest, ReadCorrelationResponse, ReadStreamRequest,
    ReadStreamResponse, RebuildProjectionsRequest, RebuildProjectionsResponse, SubscribeRequest,
    SubscribeResponse,
    event_log_server::{EventLog as EventLogApi, EventLogServer},
};
use tonic::{Request, Response, Status};

use crate::log::{AllFilter, EventLog, ReadDirection};

/// Serves reads of one log.
#[derive(Debug, Clone)]
pub struct EventLogService {
    log: EventLog,
    /// One backup at a time: each holds a checkpoint's worth of disk.
    backups: std::sync::Arc<tokio::sync::Semaphore>,
    /// Whole-log pages read at once ([`CONCURRENT_PAGE_READS`]).
    page_reads: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Whole-log pages (`ReadAll`) a log reads at once; the rest wait their
/// turn. Each holds up to [`crate::Limits::max_read_page_bytes`] while it
/// is read and answered.
pub const CONCURRENT_PAGE_READS: usize = 4;

/// Most type names one `ReadAll` may filter on.
pub const MAX_TYPE_NAMES: usize = 64;

/// Longest type name one `ReadAll` may filter on.
const MAX_TYPE_NAME_LEN: usize = 128;

impl EventLogService {
    /// The tonic server for `log`.
    pub fn server(log: EventLog) -> EventLogServer<EventLogService> {
        EventLogServer::new(EventLogService {
            log,
            backups: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
            page_reads: std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT_PAGE_READS)),
        })
    }
}

/// Largest piece of a file one backup message carries.
pub const BACKUP_CHUNK_BYTES: usize = 1024 * 1024;

/// The prefix of a checkpoint's directory beside the log while a backup
/// streams it (removed after; one left by a process that died mid-backup
/// is removed by the next backup).
const BACKUP_DIR_PREFIX: &str = ".backup-";

/// Removes checkpoints earlier backups left in `parent`.
fn remove_stale_backups(parent: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(BACKUP_DIR_PREFIX)
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), error = %e, "a stale backup checkpoint could not be removed");
        }
    }
}

/// Streams the checkpoint in `dir` to `send`, file by file in chunks, each
/// file's SHA-256 taken as it is read, then its manifest; removes `dir`.
/// Stops early when the receiver is gone (the client went away).
fn stream_checkpoint(
    dir: &std::path::Path,
    mut manifest: BackupManifest,
    send: &tokio::sync::mpsc::Sender<Result<BackupChunk, Status>>,
) -> Result<(), Status> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let io = |what: &str, e: std::io::Error| Status::internal(format!("backup: {what}: {e}"));
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io("listing the checkpoint", e))? {
        let entry = entry.map_err(|e| io("listing the checkpoint", e))?;
        if entry
            .file_type()
            .map_err(|e| io("a checkpoint entry", e))?
            .is_file()
        {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    for name in names {
        let mut file =
            std::fs::File::open(dir.join(&name)).map_err(|e| io(&format!("opening {name}"), e))?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        let mut buffer = vec![0u8; BACKUP_CHUNK_BYTES];
        loop {
            let read = file
                .read(&mut buffer)
                .map_err(|e| io(&format!("reading {name}"), e))?;
            if read == 0 && offset > 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            let chunk = BackupChunk {
                file: name.clone(),
                offset,
                data: buffer[..read].to_vec().into(),
                manifest: None,
            };
            if send.blocking_send(Ok(chunk)).is_err() {
                return Ok(()); // the client went away
            }
            offset += read as u64;
            if read == 0 {
                break; // an empty file: sent as one empty chunk
            }
        }
        manifest.files.push(BackupFile {
            name,
            size_bytes: offset,
            sha256: format!("{:x}", hasher.finalize()),
        });
    }
    let _ = send.blocking_send(Ok(BackupChunk {
        manifest: Some(manifest),
        ..BackupChunk::default()
    }));
    Ok(())
}

/// Runs `work` (RocksDB reads, a scan) on tokio's blocking pool, so a slow
/// read never holds one of the async runtime's few worker threads while
/// other calls wait for it. Every gRPC handler that reads more than a key
/// or two goes through here.
pub async fn blocking<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Status>
where
    T: Send + 'static,
    E: Into<Status> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(format!("read task failed: {e}")))?
        .map_err(Into::into)
}

#[tonic::async_trait]
impl EventLogApi for EventLogService {
    async fn read_stream(
        &self,
        request: Request<ReadStreamRequest>,
    ) -> Result<Response<ReadStreamResponse>, Status> {
        let req = request.into_inner();
        let direction = match pb::ReadDirection::try_from(req.direction) {
            Ok(pb::ReadDirection::Unspecified | pb::ReadDirection::Forward) => {
                ReadDirection::Forward
            }
            Ok(pb::ReadDirection::Backward) => ReadDirection::Backward,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "invalid direction: unknown value {}",
                    req.direction
                )));
            }
        };
        let log = self.log.clone();
        let slice = blocking(move || {
            log.read_stream(
                &req.stream_id,
                req.from_version,
                direction,
                req.max_count as usize,
            )
        })
        .await?;
        Ok(Response::new(ReadStreamResponse {
            events: slice.events,
            stream_version: slice.stream_version,
            next_version: slice.next_version.unwrap_or(0),
        }))
    }

    async fn read_all(
        &self,
        request: Request<ReadAllRequest>,
    ) -> Result<Response<ReadAllResponse>, Status> {
        let req = request.into_inner();
        let filter = AllFilter {
            type_names: req.type_names,
            without_payloads: req.without_payloads,
        };
        if let Some(name) = filter
            .type_names
            .iter()
            .find(|name| name.is_empty() || name.len() > MAX_TYPE_NAME_LEN)
        {
            return Err(Status::invalid_argument(format!(
                "type_names: {:?} must be 1 to {MAX_TYPE_NAME_LEN} bytes",
                name
            )));
        }
        if filter.type_names.len() > MAX_TYPE_NAMES {
            return Err(Status::invalid_argument(format!(
                "type_names: {} names, at most {MAX_TYPE_NAMES}",
                filter.type_names.len()
            )));
        }
        let log = self.log.clone();
        let head = log.head();
        // Pages are read a few at a time: peers catching up all at once
        // (after a restart, or lagging at a sweep) queue here instead of
        // each holding a page in memory at once.
        let _permit = self
            .page_reads
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the log is closing"))?;
        let page =
            blocking(move || log.read_all_page(req.from_position, req.max_count as usize, &filter))
                .await?;
        Ok(Response::new(ReadAllResponse {
            events: page.events,
            next_position: page.next_position,
            head_position: head,
        }))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let subscription = self.log.subscribe(request.into_inner().from_position)?;
        let stream = subscription.map(|item| {
            item.map(|event| SubscribeResponse { event: Some(event) })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_log_info(
        &self,
        _: Request<GetLogInfoRequest>,
    ) -> Result<Response<GetLogInfoResponse>, Status> {
        Ok(Response::new(GetLogInfoResponse {
            service: self.log.service().to_owned(),
            head_position: self.log.head(),
            outbox_backlog: self.log.outbox_backlog(),
        }))
    }

    async fn read_correlation(
        &self,
        request: Request<ReadCorrelationRequest>,
    ) -> Result<Response<ReadCorrelationResponse>, Status> {
        let req = request.into_inner();
        let log = self.log.clone();
        let (events, next) = blocking(move || {
            log.read_correlation(
                &req.correlation_id,
                req.from_position,
                req.max_count as usize,
            )
        })
        .await?;
        Ok(Response::new(ReadCorrelationResponse {
            events,
            next_position: next.unwrap_or(0),
        }))
    }

    async fn get_projection_digest(
        &self,
        _: Request<GetProjectionDigestRequest>,
    ) -> Result<Response<ProjectionDigest>, Status> {
        let log = self.log.clone();
        let head = log.head();
        let digest = blocking(move || log.projection_digest()).await?;
        Ok(Response::new(ProjectionDigest {
            service: self.log.service().to_owned(),
            digest,
            head_position: head,
        }))
    }

    type BackupStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;

    async fn backup(
        &self,
        _: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let permit = self.backups.clone().try_acquire_owned().map_err(|_| {
            Status::failed_precondition("a backup of this log is running: one at a time")
        })?;
        let log = self.log.clone();
        let parent = log
            .path()
            .parent()
            .map(std::path::Path::to_path_buf)
            .ok_or_else(|| Status::internal("the log's store has no parent directory"))?;
        let dir = parent.join(format!("{BACKUP_DIR_PREFIX}{}", uuid::Uuid::now_v7()));
        let taken = {
            let (parent, dir) = (parent.clone(), dir.clone());
            blocking(move || {
                remove_stale_backups(&parent);
                log.checkpoint(&dir)
            })
            .await?
        };
        let manifest = BackupManifest {
            service: self.log.service().to_owned(),
            head_position: taken.head_position,
            projection_digest: taken.projection_digest,
            files: Vec::new(),
            taken_at: Some(crate::clock::now()),
        };
        tracing::info!(service = %self.log.service(), head_position = manifest.head_position,
            "backup checkpoint taken; streaming it");
        let (send, receive) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            if let Err(status) = stream_checkpoint(&dir, manifest, &send) {
                let _ = send.blocking_send(Err(status));
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "the backup checkpoint could not be removed");
            }
            drop(permit);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receive),
        )))
    }

    async fn rebuild_projections(
        &self,
        _: Request<RebuildProjectionsRequest>,
    ) -> Result<Response<RebuildProjectionsResponse>, Status> {
        let rebuilt = self
            .log
            .rebuild_projections_checked()
            .await
            .map_err(Status::from)?;
        tracing::info!(service = %self.log.service(), replayed = rebuilt.events_replayed,
            same = rebuilt.digest_before == rebuilt.digest_after, "projections rebuilt from the log");
        Ok(Response::new(RebuildProjectionsResponse {
            service: self.log.service().to_owned(),
            digest_before: rebuilt.digest_before,
            digest_after: rebuilt.digest_after,
            events_replayed: rebuilt.events_replayed,
            head_position: self.log.head(),
        }))
    }
}
