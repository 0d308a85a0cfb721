//! Who may call what: the access policy (`deploy/access.toml`), in one place
//! for every service.
//!
//! A role is allowed a list of RPCs, each `package.Service/Method` or
//! `package.Service/*`; everything else is denied, with the role and the
//! RPC named. Health and reflection are open to every caller (a load
//! balancer and a gRPC client built from reflection must reach them before
//! they hold credentials). Scoping finer than an RPC (a crew's own orders,
//! a desk's own station) belongs to the service, which checks it against
//! the caller's principal.
//!
//! The policy is checked against the API itself when loaded: every rule
//! must name a service and method that exist (a typo would otherwise deny
//! silently, or worse, a renamed RPC would fall out of a role unnoticed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

/// Longest policy file read.
pub const MAX_POLICY_BYTES: u64 = 64 * 1024;
/// Most roles a policy declares.
pub const MAX_ROLES: usize = 64;

/// Services every caller reaches, credentials or not.
pub const OPEN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// A role's name, as the policy and a caller's credentials give it.
pub type Role = String;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: String,
    roles: BTreeMap<String, RoleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    allow: Vec<String>,
}

/// What a role may call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Grants {
    /// `package.Service` → every method.
    services: BTreeSet<String>,
    /// `package.Service/Method`.
    methods: BTreeSet<String>,
}

/// The access policy: every role and its RPCs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// The file's `version`, recorded with decisions.
    pub version: String,
    roles: BTreeMap<Role, Grants>,
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("access policy: {0}")]
pub struct PolicyError(pub String);

/// Why a call is refused: the role may not call the RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {role} may not call {rpc}")]
pub struct Denied {
    /// The caller's role.
    pub role: String,
    /// `package.Service/Method`.
    pub rpc: String,
}

/// Every RPC of an API, `package.Service/Method`, read from its encoded
/// `FileDescriptorSet`s.
pub fn rpcs_of(descriptor_sets: &[&[u8]]) -> Result<BTreeSet<String>, PolicyError> {
    use prost::Message;
    let mut rpcs = BTreeSet::new();
    for bytes in descriptor_sets {
        let set = prost_types::FileDescriptorSet::decode(*bytes)
            .map_err(|e| PolicyError(format!("undecodable descriptor set: {e}")))?;
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                for method in service.method {
                    rpcs.insert(format!(
                        "{package}.{name}/{}",
                        method.name.unwrap_or_default()
                    ));
                }
            }
        }
    }
    Ok(rpcs)
}

impl AccessPolicy {
    /// Parses a policy and checks every rule against `rpcs` (see [`rpcs_of`]).
    pub fn parse(text: &str, rpcs: &BTreeSet<String>) -> Result<AccessPolicy, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError(e.to_string()))?;
        if file.version.trim().is_empty() {
            return Err(PolicyError("version: is required".into()));
        }
        if file.roles.len() > MAX_ROLES {
            return Err(PolicyError(format!(
                "{} roles, over the limit of {MAX_ROLES}",
                file.roles.len()
            )));
        }
        let services: BTreeSet<&str> = rpcs
            .iter()
            .filter_map(|rpc| rpc.split_once('/').map(|(service, _)| service))
            .collect();
        let mut roles = BTreeMap::new();
        for (role, grants_file) in file.roles {
            if role.is_empty() || !role.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                return Err(PolicyError(format!(
                    "role {role:?}: lowercase letters and '_' only"
                )));
            }
            let mut grants = Grants::default();
            for rule in grants_file.allow {
                let Some((service, method)) = rule.split_once('/') else {
                    return Err(PolicyError(format!(
                        "roles.{role}: {rule:?} is not package.Service/Method"
                    )));
                };
                if method == "*" {
                    if !services.contains(service) {
                        return Err(PolicyError(format!(
                            "roles.{role}: no service {service} in the API"
                        )));
                    }
                    grants.services.insert(service.to_string());
                } else {
                    if !rpcs.contains(&rule) {
                        return Err(PolicyError(format!(
                            "roles.{role}: no RPC {rule} in the API"
                        )));
                    }
                    grants.methods.insert(rule);
                }
            }
            roles.insert(role, grants);
        }
        Ok(AccessPolicy {
            version: file.version,
            roles,
        })
    }

    /// Reads and checks a policy file.
    pub fn load(path: &Path, rpcs: &BTreeSet<String>) -> Result<AccessPolicy, PolicyError> {
        let fail = |e: std::io::Error| PolicyError(format!("{}: {e}", path.display()));
        let size = std::fs::metadata(path).map_err(fail)?.len();
        if size > MAX_POLICY_BYTES {
            return Err(PolicyError(format!(
                "{}: {size} bytes, over the limit of {MAX_POLICY_BYTES}",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(fail)?;
        Self::parse(&text, rpcs)
    }

    /// The roles the policy declares.
    pub fn roles(&self) -> impl Iterator<Item = &str> {
        self.roles.keys().map(String::as_str)
    }

    /// Whether `role` may call `path` (an HTTP/2 path, `/package.Service/Method`,
    /// or `package.Service/Method`).
    pub fn check(&self, role: &str, path: &str) -> Result<(), Denied> {
        let rpc = path.strip_prefix('/').unwrap_or(path);
        let service = rpc.split_once('/').map_or(rpc, |(service, _)| service);
        if OPEN_SERVICES.contains(&service) {
            return Ok(());
        }
        let allowed = self
            .roles
            .get(role)
            .is_some_and(|g| g.services.contains(service) || g.methods.contains(rpc));
        if allowed {
            Ok(())
        } else {
            Err(Denied {
                role: role.to_string(),
                rpc: rpc.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> BTreeSet<String> {
        rpcs_of(&[lineguard_protos::FILE_DESCRIPTOR_SET]).expect("rpcs")
    }

    fn deployed() -> AccessPolicy {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/access.toml");
        AccessPolicy::load(&path, &api()).expect("deploy/access.toml")
    }

    /// What each role may do, in words: the table the policy must match.
    fn expected(role: &str, rpc: &str) -> bool {
        let (service, method) = rpc.split_once('/').expect("rpc");
        let reads_log = matches!(
            method,
            "ReadStream"
                | "ReadAll"
                | "Subscribe"
                | "GetLogInfo"
                | "ReadCorrelation"
                | "GetProjectionDigest"
        );
        match role {
            "admin" => true,
            "intake_system" => {
                matches!(
                    rpc,
                    "lineguard.intake.v1.Intake/ReportTicket"
                        | "lineguard.intake.v1.Intake/GetTicket"
                        | "lineguard.intake.v1.Intake/ListTickets"
                        | "lineguard.intake.v1.Intake/CancelTicket"
                        | "lineguard.routing.v1.Routing/WhoServes"
                        | "lineguard.routing.v1.Routing/LookupOwner"
                )
            }
            "desk" => matches!(
                rpc,
                "lineguard.routing.v1.Routing/AcceptTicket"
                    | "lineguard.routing.v1.Routing/ReturnTicket"
                    | "lineguard.routing.v1.Routing/AnswerTicket"
                    | "lineguard.routing.v1.Routing/GetRoute"
                    | "lineguard.routing.v1.Routing/SetAvailability"
                    | "lineguard.routing.v1.Routing/GetAvailability"
                    | "lineguard.routing.v1.Routing/WhoServes"
                    | "lineguard.intake.v1.Intake/GetTicket"
                    | "lineguard.intake.v1.Intake/ListTickets"
            ),
            // Every dispatch RPC about orders is a crew's (scoped to its
            // own crew there); how many crews are connected is not.
            "crew" => service == "lineguard.dispatch.v1.Dispatch" && method != "GetConnections",
            "follow_up_desk" => matches!(
                rpc,
                "lineguard.feedback.v1.Feedback/RecordFollowUp"
                    | "lineguard.feedback.v1.Feedback/ListDueFollowUps"
                    | "lineguard.feedback.v1.Feedback/FileComplaint"
                    | "lineguard.feedback.v1.Feedback/RecordPraise"
                    | "lineguard.intake.v1.Intake/GetTicket"
            ),
            // Reads only: never a write, a rebuild or a retry.
            "operator" => {
                (service == "lineguard.eventlog.v1.EventLog" && reads_log)
                    || matches!(method, "ListParked" | "ListDeadLetters" | "ListConsumers")
                    || matches!(
                        rpc,
                        "lineguard.intake.v1.Intake/GetTicket"
                            | "lineguard.intake.v1.Intake/ListTickets"
                            | "lineguard.routing.v1.Routing/GetRoute"
                            | "lineguard.routing.v1.Routing/GetAvailability"
                            | "lineguard.routing.v1.Routing/GetPolicy"
                            | "lineguard.routing.v1.Routing/VerifyLoads"
                            | "lineguard.routing.v1.Routing/LookupOwner"
                            | "lineguard.routing.v1.Routing/WhoServes"
                            | "lineguard.routing.v1.Routing/ListDistrictAccounts"
                            | "lineguard.dispatch.v1.Dispatch/GetWorkOrder"
                            | "lineguard.dispatch.v1.Dispatch/GetConnections"
                            | "lineguard.feedback.v1.Feedback/ListDueFollowUps"
                            | "lineguard.feedback.v1.Feedback/GetScorecard"
                            | "lineguard.feedback.v1.Feedback/Rankings"
                            | "lineguard.feedback.v1.Feedback/ExportScorecards"
                    )
            }
            "service" => matches!(
                rpc,
                "lineguard.eventlog.v1.EventLog/ReadAll"
                    | "lineguard.eventlog.v1.EventLog/GetLogInfo"
                    // Dispatch opening contacts for crews (intake narrows
                    // it to dispatch).
                    | "lineguard.intake.v1.Intake/UnsealContacts"
                    // A split intake asking which station owns a district.
                    | "lineguard.routing.v1.Routing/LookupOwner"
                    // A split feedback summing scorecard counts.
                    | "lineguard.feedback.v1.Feedback/GetTallies"
            ),
            _ => false,
        }
    }

    #[test]
    fn every_rpc_of_every_service_as_every_role() {
        let policy = deployed();
        let rpcs = api();
        let services: BTreeSet<&str> = rpcs
            .iter()
            .filter_map(|rpc| rpc.split_once('/').map(|(service, _)| service))
            .collect();
        assert_eq!(
            services.into_iter().collect::<Vec<_>>(),
            [
                "lineguard.bus.v1.Consumers",
                "lineguard.dispatch.v1.Dispatch",
                "lineguard.eventlog.v1.EventLog",
                "lineguard.feedback.v1.Feedback",
                "lineguard.intake.v1.Intake",
                "lineguard.routing.v1.Routing",
            ],
            "every service of the API is in the table"
        );
        let mut roles: Vec<&str> = policy.roles().collect();
        roles.push("stranger");
        for role in roles {
            for rpc in &rpcs {
                let path = format!("/{rpc}");
                let decision = policy.check(role, &path);
                assert_eq!(
                    decision.is_ok(),
                    expected(role, rpc),
                    "{role} calling {rpc}: {decision:?}"
                );
                if let Err(denied) = decision {
                    assert_eq!(
                        denied.to_string(),
                        format!("role {role} may not call {rpc}")
                    );
                }
            }
            assert!(
                policy.check(role, "/grpc.health.v1.Health/Check").is_ok(),
                "health is open to {role}"
            );
        }
    }

    #[test]
    fn a_rule_naming_no_real_rpc_is_refused() {
        let rpcs = api();
        for (text, says) in [
            (
                "version = \"1\"\n[roles.crew]\nallow = [\"lineguard.dispatch.v1.Dispatch/Teleport\"]",
                "no RPC",
            ),
            (
                "version = \"1\"\n[roles.crew]\nallow = [\"lineguard.nothing.v1.X/*\"]",
                "no service",
            ),
            ("version = \"1\"\n[roles.Crew]\nallow = []", "lowercase"),
            ("[roles.crew]\nallow = []", "version"),
            (
                "version = \"1\"\n[roles.crew]\nallow = [\"Dispatch\"]",
                "package.Service/Method",
            ),
        ] {
            let error = AccessPolicy::parse(text, &rpcs)
                .expect_err(text)
                .to_string();
            assert!(error.contains(says), "{text}: {error}");
        }
    }
}
