//! Publishing a run of messages to one JetStream stream as one atomic batch
//! (ADR-50, nats-server 2.12 and later): the stream stores all of them, in
//! order, or none. What the relay gains is durability at a batch's cost:
//! under `sync_interval: always` the server syncs its store once for the
//! whole batch rather than once a message (nats-server 2.15), so a relay
//! with a backlog publishes many times faster at the same durability.
//!
//! Every message still carries its `Nats-Msg-Id`, and JetStream refuses a
//! whole batch that holds an id it already has (a relay that published
//! and crashed before clearing its outbox). The caller then publishes that
//! run one message at a time, where each duplicate is acknowledged and
//! dropped on its own: [`BatchError::Duplicate`] says so.

use async_nats::header::{
    HeaderMap, NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
    NATS_MESSAGE_ID,
};
use async_nats::jetstream::{self, ErrorCode, message::PublishMessage};
use bytes::Bytes;

/// The most messages one batch may hold: nats-server's default
/// `jetstream.limits.batch.max_msgs`.
pub const MAX_ATOMIC_BATCH_MESSAGES: usize = 1_000;

/// The NATS header carrying an event's W3C trace context.
pub const TRACE_PARENT_HEADER: &str = "traceparent";

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Where it goes (its stream is the one capturing the subject).
    pub subject: String,
    /// The message's bytes.
    pub payload: Bytes,
    /// `Nats-Msg-Id`: JetStream drops a second message with this id within
    /// the stream's duplicate window.
    pub message_id: String,
    /// The W3C trace context to carry as a header (empty: none).
    pub trace_parent: String,
}

impl Outgoing {
    /// The message as a single JetStream publish (no batch).
    pub fn single(&self) -> PublishMessage {
        let mut publish = PublishMessage::build()
            .payload(self.payload.clone())
            .message_id(&self.message_id);
        if !self.trace_parent.is_empty() {
            publish = publish.header(TRACE_PARENT_HEADER, self.trace_parent.as_str());
        }
        publish
    }
}

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The batch holds a message id the stream already has: nothing of it
    /// was stored. Publish its messages one by one instead.
    #[error("the batch holds a message the stream already has")]
    Duplicate,
    /// The stream does not take atomic batches (its `allow_atomic` is off,
    /// or the server predates them): nothing of it was stored.
    #[error("the stream refuses atomic batches: {0}")]
    Unsupported(String),
    /// Anything else (NATS unreachable, a timeout, a full stream): the
    /// outcome may be unknown; publish it again (ids de-duplicate).
    #[error("{0}")]
    Failed(String),
}

/// JetStream's answers that mean the stream cannot take a batch at all.
const UNSUPPORTED: [ErrorCode; 3] = [
    ErrorCode::ATOMIC_PUBLISH_DISABLED,
    ErrorCode::ATOMIC_PUBLISH_UNSUPPORTED_HEADER,
    ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH,
];

/// Publishes `messages` (1 to [`MAX_ATOMIC_BATCH_MESSAGES`], all to one
/// stream) as one atomic batch and waits for its commit: on `Ok` every one
/// of them is stored, in order. A single message goes as a plain publish.
///
/// All but the last go out without a reply subject (the server answers
/// only the commit); they travel on the same connection as the commit, so
/// they reach the server before it. A batch cut short by a lost connection
/// never commits, and the server discards it after its batch timeout.
pub async fn publish_atomically(
    jetstream: &jetstream::Context,
    messages: &[Outgoing],
) -> Result<(), BatchError> {
    assert!(
        !messages.is_empty() && messages.len() <= MAX_ATOMIC_BATCH_MESSAGES,
        "a batch holds 1 to {MAX_ATOMIC_BATCH_MESSAGES} messages, not {}",
        messages.len()
    );
    if let [single] = messages {
        // One message is stored whole or not at all by itself; a duplicate
        // of it is acknowledged as one.
        return async {
            jetstream
                .send_publish(single.subject.clone(), single.single())
                .await?
                .await
        }
        .await
        .map(drop)
        .map_err(|e| BatchError::Failed(e.to_string()));
    }
    // Unique among the server's batches in flight (a v7 id: time and
    // random bits), within the 64 characters a batch id may have.
    let batch_id = uuid::Uuid::now_v7().simple().to_string();
    let client = jetstream.client();
    let (last, first) = messages.split_last().expect("a batch is not empty");
    for (i, message) in first.iter().enumerate() {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, message.message_id.as_str());
        headers.insert(NATS_BATCH_ID, batch_id.as_str());
        headers.insert(NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
        if !message.trace_parent.is_empty() {
            headers.insert(TRACE_PARENT_HEADER, message.trace_parent.as_str());
        }
        client
            .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
            .await
            .map_err(|e| BatchError::Failed(e.to_string()))?;
    }
    let commit = last
        .single()
        .header(NATS_BATCH_ID, batch_id.as_str())
        .header(NATS_BATCH_SEQUENCE, messages.len().to_string().as_str())
        .header(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
    let acked = async {
        jetstream
            .send_publish(last.subject.clone(), commit)
            .await?
            .await
    };
    match acked.await {
        Ok(ack) if ack.batch_size == Some(messages.len() as u64) => Ok(()),
        // A server that predates atomic batches stores each message alone
        // and answers the last one as a single publish: the ids make a
        // second publish of the run harmless.
        Ok(ack) => Err(BatchError::Unsupported(format!(
            "the commit was answered as {:?} messages of a batch of {}",
            ack.batch_size,
            messages.len()
        ))),
        Err(e) => {
            let code = std::error::Error::source(&e)
                .and_then(|source| source.downcast_ref::<jetstream::Error>())
                .map(jetstream::Error::error_code);
            Err(match code {
                Some(ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE) => BatchError::Duplicate,
                Some(code) if UNSUPPORTED.contains(&code) => BatchError::Unsupported(e.to_string()),
                _ => BatchError::Failed(e.to_string()),
            })
        }
    }
}
