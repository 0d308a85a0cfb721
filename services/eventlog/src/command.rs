//! Idempotent commands as a gRPC service answers them: the first request
//! with a key is carried out and its answer kept with the key; a retry with
//! the same request gets that answer back and writes nothing; the same key
//! with another request is `ALREADY_EXISTS`.

use bytes::Bytes;
use prost::Message;
use tonic::Status;

use crate::error::Error;
use crate::log::{Decided, EventLog};
use crate::projection::ProjectionView;
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

/// Decides an idempotent command where it commits ([`EventLog::decide`]):
/// `decide` reads the projections as every commit before it leaves them
/// and returns the transaction and the answer. The first request with
/// `key` is carried out and its answer kept; a retry of the same request
/// (`fingerprint`, the encoded request) gets that answer back and writes
/// nothing, even when both were decided in one group; another request
/// with the key is `ALREADY_EXISTS`.
pub async fn decide_idempotent<R>(
    log: &EventLog,
    key: String,
    fingerprint: Vec<u8>,
    decide: impl FnOnce(&ProjectionView<'_>) -> Result<(Transaction, R), Status> + Send + 'static,
) -> Result<R, Status>
where
    R: Message + Default + Send + 'static,
{
    let decided = log
        .decide(move |view| {
            let (txn, answer) = decide(view)?;
            let response = Bytes::from(answer.encode_to_vec());
            let idempotency = Idempotency::new(key, &fingerprint, response);
            Ok((txn.idempotent(idempotency), answer))
        })
        .await;
    match decided {
        Ok((CommitOutcome::Committed(_), answer)) => Ok(answer),
        Ok((CommitOutcome::Duplicate { response, .. }, _)) => decode_answer(response.as_ref()),
        Ok((CommitOutcome::AlreadyProcessed, _)) => {
            Err(Status::internal("unexpected inbox outcome"))
        }
        Err(Decided::Declined(status)) => Err(status),
        Err(Decided::Log(err)) => Err(commit_status(err)),
    }
}
