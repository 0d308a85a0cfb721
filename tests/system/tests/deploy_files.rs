//! The deploy files cannot drift from the code: every flag, environment
//! variable and port the Kubernetes manifests (`deploy/k8s/`) give a
//! service is one its binary has (`--help`), every service is called on
//! the port its own manifest serves, every file they point at is one the
//! image (`deploy/Dockerfile`) holds, and the NATS values keep what
//! Lineguard's durability and security rely on.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use lineguard_harness::{SERVICE_NAMES as SERVICES, deploy_file, workspace_binary};
use lineguard_runtime::bus_access::{NATS_SERVER_PRINCIPAL, nats_user};

/// The text of `name` under deploy/.
fn read(name: &str) -> String {
    let path = deploy_file(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn help_of(binary: &str, subcommand: &[&str]) -> String {
    let output = Command::new(workspace_binary(binary))
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{binary} --help: {e}"));
    assert!(output.status.success(), "{binary} --help failed");
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

/// The long flags (`--name`) in `text`, outside of single-dash tool flags
/// (grpc_health_probe's `-addr=`).
fn long_flags(text: &str) -> Vec<String> {
    let mut flags = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        let after = &rest[at + 2..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        let starts_word = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric();
        if starts_word && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
            flags.push(format!("--{name}"));
        }
        rest = &after[name.len()..];
    }
    flags
}

/// A manifest's environment entries: `- {name: X, value: Y}`, and
/// `- name: X` followed by a `valueFrom:` (the value then is the source's
/// field path, e.g. the pod's ordinal).
fn env_entries(manifest: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let lines: Vec<&str> = manifest.lines().map(str::trim).collect();
    for (at, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("- name: ")
            && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            && lines.get(at + 1) == Some(&"valueFrom:")
        {
            let source = lines.get(at + 2).copied().unwrap_or_default();
            env.insert(name.to_string(), source.to_string());
            continue;
        }
        let Some(body) = line
            .strip_prefix("- {name: ")
            .and_then(|l| l.strip_suffix('}'))
        else {
            continue;
        };
        let Some((name, value)) = body.split_once(", value: ") else {
            continue;
        };
        if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            env.insert(name.to_string(), value.trim_matches('"').to_string());
        }
    }
    env
}

/// Every number following `key` in `text`.
fn numbers_after(text: &str, key: &str) -> Vec<u16> {
    text.match_indices(key)
        .filter_map(|(at, _)| {
            let digits: String = text[at + key.len()..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

struct Manifest {
    service: &'static str,
    text: String,
    env: BTreeMap<String, String>,
    port: u16,
}

fn manifests() -> Vec<Manifest> {
    SERVICES
        .iter()
        .map(|service| {
            let text = read(&format!("k8s/{service}.yaml"));
            let env = env_entries(&text);
            let address = env
                .get("LINEGUARD_GRPC_ADDR")
                .unwrap_or_else(|| panic!("{service}.yaml sets no LINEGUARD_GRPC_ADDR"));
            let port = address
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse().ok())
                .unwrap_or_else(|| panic!("{service}.yaml: LINEGUARD_GRPC_ADDR {address}"));
            Manifest {
                service,
                text,
                env,
                port,
            }
        })
        .collect()
}

#[test]
fn every_flag_and_variable_the_manifests_use_is_one_the_binary_has() {
    for manifest in manifests() {
        let binary = format!("lineguard-{}", manifest.service);
        assert!(
            manifest.text.contains(&format!("command: [{binary}]")),
            "{}.yaml does not run {binary}",
            manifest.service
        );
        let help = help_of(&binary, &[]);
        let flags = long_flags(&manifest.text);
        assert!(
            !flags.is_empty(),
            "{}.yaml passes no flags",
            manifest.service
        );
        for flag in flags {
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{}.yaml uses {flag}, which {binary} --help does not list",
                manifest.service
            );
        }
        // Every `name: LINEGUARD_…` line was read as an entry.
        let named = manifest.text.matches("{name: LINEGUARD_").count()
            + manifest.text.matches("{name: NATS_URL").count()
            + manifest.text.matches("- name: LINEGUARD_").count();
        assert_eq!(
            named,
            manifest.env.len(),
            "{}.yaml: an env entry not of the form `- {{name: X, value: Y}}`",
            manifest.service
        );
        for name in manifest.env.keys() {
            assert!(
                help.contains(&format!("[env: {name}=")),
                "{}.yaml sets {name}, which {binary} does not read",
                manifest.service
            );
        }
    }
}

#[test]
fn every_port_is_the_one_its_service_serves_and_is_called_on() {
    let manifests = manifests();
    let ports: BTreeMap<&str, u16> = manifests.iter().map(|m| (m.service, m.port)).collect();
    for manifest in &manifests {
        let name = manifest.service;
        for (key, found) in [
            (
                "containerPort:",
                numbers_after(&manifest.text, "containerPort:"),
            ),
            ("port:", numbers_after(&manifest.text, "port:")),
            (
                "-addr=127.0.0.1:",
                numbers_after(&manifest.text, "-addr=127.0.0.1:"),
            ),
        ] {
            assert!(!found.is_empty(), "{name}.yaml has no {key}");
            // gRPC's port, and for the pod and the Service the metrics
            // port beside it (+100, LINEGUARD_METRICS_ADDR's).
            let metrics = manifest.port + 100;
            assert!(
                found.iter().all(|port| *port == manifest.port
                    || (*port == metrics && key != "-addr=127.0.0.1:")),
                "{name}.yaml: {key} {found:?}, but it serves on {} (metrics on {metrics})",
                manifest.port
            );
            if key != "-addr=127.0.0.1:" {
                assert!(
                    found.contains(&metrics),
                    "{name}.yaml: no {key} {metrics} for metrics"
                );
            }
        }
        let metrics_addr = manifest
            .env
            .get("LINEGUARD_METRICS_ADDR")
            .expect("LINEGUARD_METRICS_ADDR");
        assert_eq!(
            metrics_addr,
            &format!("0.0.0.0:{}", manifest.port + 100),
            "{name}.yaml: metrics served where the pod's port says"
        );
        assert!(
            manifest.text.contains(&format!("-tls-server-name={name}")),
            "{name}.yaml's readiness probe checks another name"
        );
        let peers = manifest
            .env
            .get("LINEGUARD_PEERS")
            .expect("LINEGUARD_PEERS");
        // Partition k of a service is pod k of its StatefulSet, known to
        // every pod by its bus name (`intake`, `intake-p1`).
        let partitions: u16 = manifest
            .env
            .get("LINEGUARD_PARTITIONS")
            .map_or(1, |p| p.parse().expect("LINEGUARD_PARTITIONS is a number"));
        assert_eq!(
            numbers_after(&manifest.text, "replicas:"),
            vec![partitions],
            "{name}.yaml: one pod per partition"
        );
        if partitions > 1 {
            assert!(
                manifest.env.get("LINEGUARD_PARTITION").is_some_and(
                    |source| source.contains("metadata.labels['apps.kubernetes.io/pod-index']")
                ),
                "{name}.yaml: each pod's partition is its ordinal"
            );
        }
        let mut called = Vec::new();
        for peer in peers.split(',') {
            let (bus_name, url) = peer.split_once('=').expect("SERVICE=URL");
            let (service, partition) = match bus_name.rsplit_once("-p") {
                Some((service, k)) => (service, k.parse::<u16>().expect("partition index")),
                None => (bus_name, 0),
            };
            let expected = format!("https://{service}-{partition}.{service}:{}", ports[service]);
            assert_eq!(
                url, expected,
                "{name}.yaml calls {bus_name} elsewhere than it serves"
            );
            called.push(bus_name.to_string());
        }
        called.sort_unstable();
        // Every instance of every partition, its own service's other
        // partitions too (any pod forwards a call to its owner).
        let mut every: Vec<String> = SERVICES
            .iter()
            .flat_map(|s| (0..partitions).map(move |k| lineguard_bus::partition::bus_name(s, k)))
            .collect();
        every.sort_unstable();
        assert_eq!(called, every, "{name}.yaml must know every instance");
    }
}

#[test]
fn every_file_the_manifests_point_at_is_in_the_image() {
    let dockerfile = read("Dockerfile");
    let kustomization = read("k8s/kustomization.yaml");
    for manifest in manifests() {
        assert!(
            kustomization.contains(&format!("- {}.yaml", manifest.service)),
            "kustomization.yaml leaves out {}.yaml",
            manifest.service
        );
        assert!(
            dockerfile.contains(&format!("target/release/lineguard-{}", manifest.service)),
            "the image lacks lineguard-{}",
            manifest.service
        );
        for (name, value) in &manifest.env {
            let Some(file) = value.strip_prefix("/etc/lineguard/") else {
                continue;
            };
            if file.contains('/') || !file.contains('.') {
                continue; // a mounted secret (credentials, keys/)
            }
            assert!(
                Path::new(&deploy_file(file)).is_file()
                    && dockerfile.contains(&format!("deploy/{file}")),
                "{}.yaml: {name}={value}, a file the image does not copy from deploy/",
                manifest.service
            );
        }
    }
    assert!(
        dockerfile.contains("grpc_health_probe"),
        "the readiness probes need grpc_health_probe in the image"
    );
}

#[test]
fn the_nats_values_keep_durability_replicas_and_the_route_user() {
    let values = read("k8s/nats-values.yaml");
    assert!(
        values.contains("sync_interval: always"),
        "JetStream must fsync before it acks"
    );
    assert_eq!(numbers_after(&values, "replicas:"), vec![3], "three nodes");
    let (role, id) = NATS_SERVER_PRINCIPAL;
    assert!(
        values.contains(&format!("user: \"{}\"", nats_user(role, id))),
        "only the NATS server's certificate may join as a route"
    );
    assert_eq!(
        values.matches("verify_and_map: true").count(),
        2,
        "clients and routes"
    );
    // The authorization block it includes is the one ticketctl makes.
    let included = "lineguard-authorization.conf";
    assert!(values.contains(&format!("$include: {included}")));
    assert!(values.contains("configMap.merge.data.lineguard-authorization\\.conf="));
    let help = help_of("ticketctl", &["credentials", "nats-config"]);
    assert!(help.contains("--authorization-only"));
    // Made for as many partitions as the manifests run.
    let partitions = manifests()[0]
        .env
        .get("LINEGUARD_PARTITIONS")
        .cloned()
        .unwrap_or_else(|| "1".into());
    assert!(
        values.contains(&format!("--authorization-only --partitions {partitions}"))
            || partitions == "1",
        "nats-values.yaml says how to make the block for {partitions} partitions"
    );
    let output = Command::new(workspace_binary("ticketctl"))
        .args([
            "credentials",
            "nats-config",
            "--authorization-only",
            "--partitions",
            &partitions,
        ])
        .output()
        .expect("ticketctl credentials nats-config");
    assert!(output.status.success());
    let block = String::from_utf8(output.stdout).expect("UTF-8");
    assert_eq!(
        block,
        lineguard_runtime::bus_access::nats_authorization_block(
            &[("admin", "dev")],
            partitions.parse().expect("a number")
        )
    );
    for service in SERVICES {
        assert!(
            block.contains(&nats_user("service", service)),
            "{service} has a NATS user"
        );
    }
    // Every service is told about all three nodes and keeps three copies.
    for manifest in manifests() {
        assert_eq!(
            manifest
                .env
                .get("LINEGUARD_STREAM_REPLICAS")
                .map(String::as_str),
            Some("3")
        );
        let urls = manifest.env.get("NATS_URL").expect("NATS_URL");
        assert_eq!(urls.split(',').count(), 3, "{}: {urls}", manifest.service);
    }
}
