//! What routing does before it serves: adopt the policy file's version and
//! bring the stored directory in line with the directory file.

use std::path::Path;

use lineguard_eventlog::{ActorKind, ExpectedVersion, NewEvent, Transaction, actor};
use lineguard_protos::routing::v1::PolicyAdopted;

use crate::directory::{Directory, changes, commit_in_batches};
use crate::policy::Policy;
use crate::router::{Router, RouterError, now};

/// The stream of adopted policies.
pub const POLICY_STREAM: &str = "policy";

/// Adopts the policy in `text` unless its version already is; refuses a
/// known version whose text differs (a version is never edited). Returns
/// the version.
pub async fn adopt_policy(router: &Router, text: &str) -> Result<String, RouterError> {
    let policy = Policy::parse(text)?;
    if let Some(adopted) = router.adopted_policy(&policy.version)? {
        if adopted.source_text != text {
            return Err(RouterError::Precondition(format!(
                "policy version {} was adopted with other content; a version never changes, so raise `version` in the file",
                policy.version
            )));
        }
        if router.current_policy_version()?.as_deref() != Some(policy.version.as_str()) {
            tracing::warn!(version = %policy.version,
                "the policy file holds an older version than the newest adopted one; new tickets keep the newest");
        }
        return Ok(policy.version);
    }
    let adopted = PolicyAdopted {
        version: policy.version.clone(),
        source_text: text.to_string(),
        adopted_at: Some(now()),
    };
    router
        .log()
        .commit(Transaction::append(
            POLICY_STREAM,
            ExpectedVersion::Any,
            vec![NewEvent::new(
                &adopted,
                POLICY_STREAM,
                actor(ActorKind::System, "routing"),
            )],
        ))
        .await?;
    tracing::info!(version = %policy.version, "policy adopted");
    Ok(policy.version)
}

/// Reads a policy file and adopts it.
pub async fn adopt_policy_file(router: &Router, path: &Path) -> Result<String, RouterError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RouterError::Precondition(format!("policy file {}: {e}", path.display())))?;
    adopt_policy(router, &text).await
}

/// Records the differences between the directory file and the stored
/// directory. Returns the number of events written.
pub async fn load_directory_file(router: &Router, path: &Path) -> Result<u64, RouterError> {
    let dir = Directory::load(path)?;
    let events = changes(
        router.directory(),
        &dir,
        &actor(ActorKind::System, "directory-file"),
    )?;
    let written = commit_in_batches(router.log(), events).await?;
    tracing::info!(file = %path.display(), companies = dir.companies.len(), stations = dir.stations.len(),
        districts = dir.districts.len(), crews = dir.crews.len(), accounts = dir.accounts.len(),
        events = written, "directory loaded");
    Ok(written)
}
