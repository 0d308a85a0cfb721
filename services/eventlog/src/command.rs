//! Idempotent commands as a gRPC service answers them: the first request
//! with a key is carried out and its answer kept with the key; a retry with
//! the same request gets that answer back and writes nothing; the same key
//! with another request is `ALREADY_EXISTS`.

use prost::Message;
use tonic::Status;

use crate::error::Error;
use crate::log::EventLog;
use crate::txn::{CommitOutcome, Idempotency, Transaction};

/// The status a caller sees for a failed command commit.
pub fn commit_status(err: Error) -> Status {
    match err {
        Error::IdempotencyConflict { .. } => {
            Status::already_exists("idempotency_key was already used for a different request")
        }
        other => Status::from(other),
    }
}

fn decode_answer<R: Message + Default>(bytes: &[u8]) -> Result<R, Status> {
    R::decode(bytes).map_err(|e| Status::data_loss(format!("undecodable stored answer: {e}")))
}

/// The stored answer to an earlier identical command, if there was one:
/// checked before deciding, so a retry does not decide again.
pub fn earlier_answer<R: Message + Default>(
    log: &EventLog,
    idempotency: &Idempotency,
) -> Result<Option<R>, Status> {
    match log.idempotent_response(idempotency) {
        Ok(Some(bytes)) => decode_answer(bytes.as_ref()).map(Some),
        Ok(None) => Ok(None),
        Err(err) => Err(commit_status(err)),
    }
}

/// Commits `txn` under `idempotency` and returns the command's answer: the
/// one `idempotency` carries, or the original if a concurrent identical
/// command committed first.
pub async fn commit_idempotent<R: Message + Default>(
    log: &EventLog,
    txn: Transaction,
    idempotency: Idempotency,
) -> Result<R, Status> {
    let response = idempotency.response.clone();
    match log.commit(txn.idempotent(idempotency)).await {
        Ok(CommitOutcome::Committed(_)) => decode_answer(response.as_ref()),
        Ok(CommitOutcome::Duplicate { response, .. }) => decode_answer(response.as_ref()),
        Ok(CommitOutcome::AlreadyProcessed) => Err(Status::internal("unexpected inbox outcome")),
        Err(err) => Err(commit_status(err)),
    }
}
