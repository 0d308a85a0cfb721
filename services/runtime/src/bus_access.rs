//! Who may do what on NATS, and how a process connects to it.
//!
//! With credentials, NATS is as closed as gRPC: every connection is TLS and
//! presents a client certificate from the installation's CA; the server maps
//! the certificate's subject (`CN=<role>:<id>`, `verify_and_map`) to a NATS
//! user, and each service's user may only
//!
//! - publish on its own subjects (`lineguard.<service>.>`, and dispatch's
//!   crew mirror `lineguard.crew.>`), and manage its own streams;
//! - read the streams it consumes, through its own durable consumers
//!   (`<service>-from-<source>`): fetch, ack, info;
//! - append to, read and compact its own log's copy
//!   (`lineguard_copy.<service>`, stream `LINEGUARD_COPY_<SERVICE>`), and
//!   no other's;
//! - receive replies on its own inbox prefix (`_INBOX_<service>`), so no
//!   service reads another's replies.
//!
//! A service that publishes a forged event on another service's subject is
//! refused by NATS itself; one that puts a foreign envelope on its own
//! subject is dead-lettered by the consumer (`lineguard_bus::consumer`
//! checks that the envelope's source is the stream's service).
//!
//! [`BUS_RIGHTS`] is the one table of what each service publishes and
//! consumes. [`nats_server_security`] turns it into the NATS server's `tls`
//! and `authorization` blocks (`ticketctl credentials nats-config`), and the
//! host refuses at start-up a consumer or a stream the table does not give
//! the service, so the table cannot drift from the code.

use std::path::Path;

use crate::credentials::CredentialsDir;

/// What one service may do on the bus.
#[derive(Debug, Clone, Copy)]
pub struct BusRights {
    /// The service (`intake`, …), its NATS user `CN=service:<service>`.
    pub service: &'static str,
    /// The streams it publishes to (its own, and any mirror).
    pub publishes: &'static [&'static str],
    /// The services whose streams it consumes.
    pub consumes: &'static [&'static str],
    /// Whether it keeps its data keys in a key-value bucket, off its disk
    /// (with `--log-copy`; intake's sealed customer data): one bucket per
    /// partition, [`lineguard_bus::copy::key_bucket_name`].
    pub keeps_keys: bool,
}

/// Every service's rights on the bus.
pub const BUS_RIGHTS: [BusRights; 4] = [
    BusRights {
        service: "intake",
        publishes: &["intake"],
        consumes: &["routing", "dispatch"],
        keeps_keys: true,
    },
    BusRights {
        service: "routing",
        publishes: &["routing"],
        consumes: &["intake", "dispatch", "feedback"],
        keeps_keys: false,
    },
    BusRights {
        service: "dispatch",
        publishes: &["dispatch", "crew"],
        consumes: &["routing", "intake"],
        keeps_keys: false,
    },
    BusRights {
        service: "feedback",
        publishes: &["feedback"],
        consumes: &["intake", "routing", "dispatch"],
        keeps_keys: false,
    },
];

/// The rights of `service`, if it is one of Lineguard's.
pub fn rights_of(service: &str) -> Option<&'static BusRights> {
    BUS_RIGHTS.iter().find(|r| r.service == service)
}

/// The durable consumer `service` reads `source`'s stream with.
pub fn consumer_name(service: &str, source: &str) -> String {
    format!("{service}-from-{source}")
}

/// The inbox prefix of `service`'s connection: replies to its requests
/// come there, and only it may subscribe to them.
pub fn inbox_prefix(service: &str) -> String {
    format!("_INBOX_{service}")
}

/// The NATS user a certificate for `role:id` maps to.
pub fn nats_user(role: &str, id: &str) -> String {
    format!("CN={role}:{id}")
}

/// The subjects `rights.service` may publish to, when every service is
/// split into `partitions` (1: not split): each partition's instance
/// connects as the service's one user, so the user may act for every
/// partition's streams, copy and consumers (each instance still touches
/// only its own: see [`lineguard_bus::partition`]).
pub fn publish_subjects(rights: &BusRights, partitions: u16) -> Vec<String> {
    use lineguard_bus::subjects::{service_subjects, stream_name};
    let mut subjects = vec!["$JS.API.INFO".to_string()];
    for partition in lineguard_bus::Partition::all(partitions) {
        let own = partition.bus_name(rights.service);
        // The service's own stream is partitioned; a mirror (dispatch's
        // crew subjects) is one stream every partition publishes to.
        let mirrors = rights
            .publishes
            .iter()
            .filter(|p| **p != rights.service && partition.index() == 0)
            .map(|p| p.to_string());
        for published in std::iter::once(own.clone()).chain(mirrors) {
            let stream = stream_name(&published);
            subjects.push(service_subjects(&published));
            for verb in ["INFO", "CREATE", "UPDATE"] {
                subjects.push(format!("$JS.API.STREAM.{verb}.{stream}"));
            }
        }
        // The log's copy (`--log-copy`): appended, read back, never deleted.
        let copy_stream = lineguard_bus::copy::copy_stream_name(&own);
        subjects.push(lineguard_bus::copy::copy_subject(&own));
        // PURGE: a compaction drops what came before its snapshot.
        for verb in ["INFO", "CREATE", "UPDATE", "MSG.GET", "PURGE"] {
            subjects.push(format!("$JS.API.STREAM.{verb}.{copy_stream}"));
        }
        if rights.keeps_keys {
            // Put and purge are publishes on the bucket's subjects; reading
            // it back walks its stream.
            let bucket = lineguard_bus::copy::key_bucket_name(&own);
            subjects.push(format!("$KV.{bucket}.>"));
            for verb in ["INFO", "CREATE", "UPDATE", "MSG.GET"] {
                subjects.push(format!("$JS.API.STREAM.{verb}.KV_{bucket}"));
            }
        }
        for source in rights.consumes {
            let source = partition.bus_name(source);
            let stream = stream_name(&source);
            let consumer = consumer_name(&own, &source);
            subjects.push(format!("$JS.API.STREAM.INFO.{stream}"));
            subjects.push(format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"));
            // async-nats names the consumer's single filter in the subject.
            subjects.push(format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}"));
            subjects.push(format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>"));
            subjects.push(format!(
                "$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}"
            ));
            subjects.push(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"));
            subjects.push(format!("$JS.ACK.{stream}.{consumer}.>"));
        }
    }
    subjects
}

/// The subjects `rights.service` may subscribe to: its own inbox.
pub fn subscribe_subjects(rights: &BusRights) -> Vec<String> {
    vec![format!("{}.>", inbox_prefix(rights.service))]
}

/// The NATS server's certificate in a credentials directory (`nats-local`).
pub const NATS_SERVER_PRINCIPAL: (&str, &str) = ("nats", "local");

/// A security failure of the bus set-up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BusAccessError(pub String);

fn quoted(path: &Path) -> Result<String, BusAccessError> {
    let text = path.display().to_string();
    if text.contains('"') || text.contains('\\') || text.contains('\n') {
        return Err(BusAccessError(format!(
            "{text}: a path with quotes, backslashes or newlines cannot go into the NATS configuration"
        )));
    }
    Ok(format!("\"{text}\""))
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A `tls` block, indented by `indent`, presenting the NATS server's
/// certificate from `credentials` and requiring the peer's, mapped to a
/// user (`verify_and_map`); `why` is its comment. Paths are absolute: NATS
/// resolves relative ones against its own working directory.
fn tls_block(
    credentials: &CredentialsDir,
    indent: &str,
    why: &str,
) -> Result<String, BusAccessError> {
    let absolute = std::fs::canonicalize(&credentials.path)
        .map_err(|e| BusAccessError(format!("{}: {e}", credentials.path.display())))?;
    let credentials = CredentialsDir::new(absolute);
    let (role, id) = NATS_SERVER_PRINCIPAL;
    let (cert, key) = credentials.principal(role, id);
    let mut text = format!("{indent}tls {{\n");
    text.push_str(&format!("{indent}  cert_file: {}\n", quoted(&cert)?));
    text.push_str(&format!("{indent}  key_file: {}\n", quoted(&key)?));
    text.push_str(&format!(
        "{indent}  ca_file: {}\n",
        quoted(&credentials.ca())?
    ));
    text.push_str(&format!("{indent}  # {why}\n"));
    text.push_str(&format!("{indent}  verify_and_map: true\n"));
    text.push_str(&format!("{indent}  timeout: 5\n"));
    text.push_str(&format!("{indent}}}\n"));
    Ok(text)
}

/// The `tls` and `authorization` blocks of a NATS server configuration for
/// `credentials`: TLS with the server certificate `nats-local`, client
/// certificates required and mapped to users; one user per service with
/// [`BUS_RIGHTS`] (for every service split into `partitions`); each of
/// `operators` (`role:id` certificates, e.g. `admin:dev`) with every
/// right, for stream maintenance.
pub fn nats_server_security(
    credentials: &CredentialsDir,
    operators: &[(&str, &str)],
    partitions: u16,
) -> Result<String, BusAccessError> {
    let mut text = String::new();
    text.push_str("# Made by lineguard_runtime::bus_access (ticketctl credentials nats-config).\n");
    text.push_str(&tls_block(
        credentials,
        "",
        "A client certificate is required; its subject is the user.",
    )?);
    text.push_str(&nats_authorization_block(operators, partitions));
    Ok(text)
}

/// The `authorization` block alone: one user per service with
/// [`BUS_RIGHTS`] (for every service split into `partitions`), each of
/// `operators` with every right. For a server whose
/// TLS is configured elsewhere (the NATS Helm chart's values, see
/// `deploy/k8s/nats-values.yaml`), which includes this block.
pub fn nats_authorization_block(operators: &[(&str, &str)], partitions: u16) -> String {
    let mut text = String::from("authorization {\n  users = [\n");
    for rights in &BUS_RIGHTS {
        text.push_str(&format!(
            "    {{ user: \"{}\", permissions: {{ publish: {{ allow: {} }}, subscribe: {{ allow: {} }} }} }}\n",
            nats_user("service", rights.service),
            list(&publish_subjects(rights, partitions)),
            list(&subscribe_subjects(rights)),
        ));
    }
    for (role, id) in operators {
        text.push_str(&format!("    {{ user: \"{}\" }}\n", nats_user(role, id)));
    }
    text.push_str("  ]\n}\n");
    text
}

/// One node's place in a NATS cluster: what [`nats_cluster_block`] writes.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// The cluster's name, the same on every node.
    pub cluster: String,
    /// Where this node listens for its peers' route connections
    /// (`host:port`).
    pub listen: String,
    /// Its peers' route URLs (`nats-route://host:port`); its own, if
    /// listed, is ignored, so every node may be given the same list.
    pub routes: Vec<String>,
}

/// The `cluster` block of one node of a NATS cluster secured as
/// [`nats_server_security`] secures clients: routes over mutual TLS with
/// the server certificate, and a route is accepted only from a
/// certificate that maps to the NATS server's own principal, so a
/// service's certificate (issued by the same CA) cannot join the cluster.
pub fn nats_cluster_block(
    credentials: &CredentialsDir,
    node: &ClusterNode,
) -> Result<String, BusAccessError> {
    let (role, id) = NATS_SERVER_PRINCIPAL;
    let plain = |what: &str, text: &str| {
        if text.is_empty() || text.contains(['"', '\\', '\n', ' ', ',']) {
            Err(BusAccessError(format!(
                "cluster {what} {text:?}: empty, or holds a quote, backslash, space, comma or newline"
            )))
        } else {
            Ok(format!("\"{text}\""))
        }
    };
    let routes = node
        .routes
        .iter()
        .map(|route| plain("route", route))
        .collect::<Result<Vec<_>, _>>()?;
    let mut text = String::new();
    text.push_str("# Made by lineguard_runtime::bus_access (ticketctl credentials nats-config).\n");
    text.push_str("cluster {\n");
    text.push_str(&format!("  name: {}\n", plain("name", &node.cluster)?));
    text.push_str(&format!("  listen: {}\n", plain("listen", &node.listen)?));
    text.push_str(&format!("  routes: [{}]\n", routes.join(", ")));
    text.push_str(&tls_block(
        credentials,
        "  ",
        "Only a certificate mapped to the route user below may join.",
    )?);
    text.push_str(&format!(
        "  authorization {{ user: \"{}\" }}\n",
        nats_user(role, id)
    ));
    text.push_str("}\n");
    Ok(text)
}

/// The servers of a `--nats-url`: one URL, or a cluster's nodes separated
/// by commas.
pub fn server_list(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// How a process connects to NATS: with `credentials`, over TLS as the
/// principal `role:id` (its certificate in the directory), with replies on
/// `inbox` (a service's own prefix, see [`inbox_prefix`]); without, plain.
pub fn connect_options(
    name: &str,
    credentials: Option<&CredentialsDir>,
    principal: (&str, &str),
    inbox: Option<String>,
) -> async_nats::ConnectOptions {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect();
    if let Some(inbox) = inbox {
        options = options.custom_inbox_prefix(inbox);
    }
    match credentials {
        Some(dir) => {
            let (cert, key) = dir.principal(principal.0, principal.1);
            options
                .require_tls(true)
                .add_root_certificates(dir.ca())
                .add_client_certificate(cert, key)
        }
        None => options,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nats_url_list_names_each_node_once_trimmed() {
        assert_eq!(
            server_list("nats://a:4222, nats://b:4222,,nats://c:4222 "),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
        assert_eq!(
            server_list("nats://127.0.0.1:4222"),
            ["nats://127.0.0.1:4222"]
        );
    }

    #[test]
    fn a_cluster_block_admits_only_the_nats_server_certificate_as_a_route() {
        let dir = tempfile::tempdir().expect("tempdir");
        let credentials = CredentialsDir::new(dir.path());
        let node = ClusterNode {
            cluster: "lineguard".into(),
            listen: "0.0.0.0:6222".into(),
            routes: vec![
                "nats-route://nats-1:6222".into(),
                "nats-route://nats-2:6222".into(),
            ],
        };
        let block = nats_cluster_block(&credentials, &node).expect("block");
        assert!(block.contains("listen: \"0.0.0.0:6222\""), "{block}");
        assert!(
            block.contains("routes: [\"nats-route://nats-1:6222\", \"nats-route://nats-2:6222\"]"),
            "{block}"
        );
        assert!(block.contains("verify_and_map: true"), "{block}");
        assert!(
            block.contains(&format!("user: \"{}\"", nats_user("nats", "local"))),
            "{block}"
        );
        for bad in ["nats-route://a\"b:1", "", "nats-route://a:1 x"] {
            let node = ClusterNode {
                routes: vec![bad.into()],
                ..node.clone()
            };
            assert!(nats_cluster_block(&credentials, &node).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_service_has_rights_and_consumes_only_other_services() {
        for service in crate::credentials::SERVICES {
            let rights = rights_of(service).expect("rights");
            assert!(rights.publishes.contains(&service));
            for source in rights.consumes {
                assert_ne!(*source, service);
                assert!(rights_of(source).is_some(), "{source} is a service");
            }
        }
    }

    #[test]
    fn a_service_may_publish_only_on_its_own_subjects() {
        let rights = rights_of("intake").expect("intake");
        let subjects = publish_subjects(rights, 1);
        assert!(subjects.contains(&"lineguard.intake.>".to_string()));
        assert!(
            subjects
                .iter()
                .all(|s| !s.starts_with("lineguard.") || s == "lineguard.intake.>")
        );
        assert!(subjects.iter().all(|s| !s.contains("DELETE")));
        assert!(
            subjects
                .iter()
                .all(|s| !s.contains("STREAM.UPDATE.LINEGUARD_ROUTING"))
        );
        assert!(subjects.contains(&"lineguard_copy.intake".to_string()));
        assert!(
            subjects
                .iter()
                .all(|s| !s.contains("COPY_") || s.ends_with("LINEGUARD_COPY_INTAKE"))
        );
        assert_eq!(subscribe_subjects(rights), vec!["_INBOX_intake.>"]);
    }

    #[test]
    fn split_in_two_a_service_may_act_for_both_partitions_and_no_other_service() {
        let rights = rights_of("routing").expect("routing");
        let subjects = publish_subjects(rights, 2);
        for own in ["lineguard.routing.>", "lineguard.routing-p1.>"] {
            assert!(subjects.contains(&own.to_string()), "{own}");
        }
        assert!(
            subjects
                .iter()
                .all(|s| !s.starts_with("lineguard.") || s.starts_with("lineguard.routing"))
        );
        // Partition 1 reads partition 1 of intake, through its own consumer.
        assert!(subjects.contains(
            &"$JS.API.CONSUMER.MSG.NEXT.LINEGUARD_INTAKE-P1.routing-p1-from-intake-p1".to_string()
        ));
        assert!(
            !subjects
                .iter()
                .any(|s| s.contains("routing-from-intake-p1"))
        );
        assert!(subjects.contains(&"lineguard_copy.routing-p1".to_string()));
        // Dispatch's crew subjects are one stream, whatever the partitions.
        let dispatch = publish_subjects(rights_of("dispatch").expect("dispatch"), 2);
        let crew = dispatch.iter().filter(|s| *s == "lineguard.crew.>").count();
        assert_eq!(crew, 1);
        let keys = publish_subjects(rights_of("intake").expect("intake"), 2);
        assert!(keys.contains(&"$KV.LINEGUARD_KEYS_INTAKE-P1.>".to_string()));
    }
}
