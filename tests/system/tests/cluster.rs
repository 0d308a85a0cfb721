//! The backend on a three-node JetStream cluster: every stream kept on
//! three nodes (`--stream-replicas 3`), every log copied to it
//! (`--log-copy`), every service told all three nodes. A storm runs
//! through two partitions of every service while one node is killed -9
//! and later restarted, and one service instance is killed -9 and
//! restarted: no call fails for it, no ticket is lost or made twice,
//! every order reaches its crew once, each partition adds up and replay
//! equals the live view. A service whose disk is lost, mid-storm or at
//! rest, comes back from its copy.

mod common;

use std::time::Duration;

use common::deploy;
use lineguard_bus::Partition;
use lineguard_harness::{FourServices, NatsCluster};
use lineguard_protos::intake::v1::GetTicketRequest;
use lineguard_ticketctl::endpoints::Clients;
use lineguard_ticketctl::simulate::{StormConfig, storm};

/// Calls in the storm, and their rate (per second).
const CALLS: usize = 400;
const RATE: f64 = 40.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_one_node_of_three_and_an_instance_loses_nothing_and_stops_nothing() {
    const PARTITIONS: u16 = 2;
    let mut cluster = NatsCluster::start(3).await.expect("three-node cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut partitions, clients) = start_backend(&cluster, dir.path(), &[], PARTITIONS).await;

    // Every service's stream, in each partition, is kept on all three nodes.
    let jetstream = cluster.jetstream().await.expect("jetstream");
    for partition in 0..PARTITIONS {
        for service in lineguard_harness::SERVICE_NAMES {
            let name = lineguard_bus::subjects::stream_name(&lineguard_bus::partition::bus_name(
                service, partition,
            ));
            let mut stream = jetstream.get_stream(&name).await.expect("stream");
            let info = stream.info().await.expect("stream info");
            assert_eq!(info.config.num_replicas, 3, "{name}");
            let cluster_info = info.cluster.as_ref().expect("cluster info");
            assert_eq!(
                cluster_info.replicas.len(),
                2,
                "{name}: a leader and two replicas"
            );
        }
    }

    // Driven through partition 0's instances: the other partition's work
    // is forwarded to it.
    let config = StormConfig {
        tickets: CALLS,
        seed: 16,
        late_share: 0.1,
        return_share: 0.03,
        dissatisfied_share: 0.05,
        ..common::storm_at_rate(RATE)
    };
    let driver = tokio::spawn({
        let clients = clients[0].clone();
        async move { storm(&clients, &config, &indicatif::ProgressBar::hidden()).await }
    });

    // A third of the way in, the node holding the meta leadership or not,
    // node 2 dies without warning; it is away for a while, then back on
    // its store, and catches up from its peers. Meanwhile partition 1's
    // routing dies without warning and comes back on its own disk.
    let call_seconds = CALLS as f64 / RATE;
    tokio::time::sleep(Duration::from_secs_f64(call_seconds / 3.0)).await;
    cluster.node(1).kill().expect("kill node 2");
    partitions[1].routing.kill9().expect("kill routing-p1");
    tokio::time::sleep(Duration::from_secs_f64(call_seconds / 6.0)).await;
    partitions[1].routing.restart().expect("restart routing-p1");
    tokio::time::sleep(Duration::from_secs_f64(call_seconds / 6.0)).await;
    cluster.node(1).restart().expect("restart node 2");

    let report = driver.await.expect("driver").expect("storm");
    eprintln!("{}", serde_json::to_string(&report).expect("json"));
    common::assert_storm_clean(&report, CALLS);
    cluster
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("node 2 back in the cluster");
    partitions[1]
        .routing
        .wait_healthy(Duration::from_secs(90))
        .await
        .expect("routing-p1 back");

    // Every ticket in one partition, none twice; each partition adds up.
    let tickets = lineguard_ticketctl::verify::all_tickets(&clients[0])
        .await
        .expect("list every ticket");
    assert_eq!(tickets.len(), report.new_tickets + report.joined_incidents);
    let ids: std::collections::BTreeSet<_> = tickets.iter().map(|t| &t.ticket_id).collect();
    assert_eq!(ids.len(), tickets.len(), "no ticket twice");
    for (index, (services, clients)) in partitions.iter().zip(&clients).enumerate() {
        let partition = Partition::new(u32::try_from(index).expect("index"), PARTITIONS.into())
            .expect("partition");
        let own = tickets
            .iter()
            .filter(|t| Partition::of_case(&t.ticket_id, PARTITIONS) == Some(partition))
            .count();
        assert!(own > 0, "partition {index} took calls");
        common::assert_partition_adds_up(services, clients, Some(partition), own).await;
    }
}

/// deploy/nats-cluster/nats.conf, with the security.conf its comment says
/// how to make, is a configuration nats-server accepts (`-t`: checked,
/// not run).
#[test]
fn the_deployed_cluster_configuration_is_one_nats_server_accepts() {
    use lineguard_runtime::bus_access::{ClusterNode, nats_cluster_block, nats_server_security};
    let dir = tempfile::tempdir().expect("tempdir");
    let credentials = lineguard_harness::test_credentials();
    let node = ClusterNode {
        cluster: "lineguard".into(),
        listen: "0.0.0.0:6222".into(),
        routes: (1..=3)
            .map(|i| format!("nats-route://nats-{i}:6222"))
            .collect(),
    };
    let security = format!(
        "{}{}",
        nats_server_security(credentials, &[("admin", "dev")], 1).expect("security"),
        nats_cluster_block(credentials, &node).expect("cluster block")
    );
    std::fs::write(dir.path().join("security.conf"), security).expect("security.conf");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, deploy_text("nats-cluster/nats.conf")).expect("nats.conf");
    let out = std::process::Command::new(lineguard_harness::nats_server_binary().expect("bin"))
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .expect("nats-server -t");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file under deploy/, its text.
fn deploy_text(name: &str) -> String {
    std::fs::read_to_string(deploy(name)).expect("deploy file")
}

/// With `--log-copy`, a service whose machine loses its disk comes back
/// from the copy on the cluster: routing loses its disk mid-storm and
/// intake after it, and each comes back with the same events, the same
/// projections and its customers' keys, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_that_loses_its_disk_comes_back_from_its_copy() {
    let cluster = NatsCluster::start(3).await.expect("three-node cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    // Intake's secrets come from outside its disk, as in production.
    let secrets = dir.path().join("secrets");
    let intake_flags = [
        "--master-key-file".to_string(),
        secrets.join("master.key").display().to_string(),
        "--customer-digest-key-file".to_string(),
        secrets.join("customer-digest.key").display().to_string(),
    ];
    let (mut all, mut clients) = start_backend(&cluster, dir.path(), &intake_flags, 1).await;
    let (mut services, clients) = (all.remove(0), clients.remove(0));
    let config = StormConfig {
        tickets: COPY_CALLS,
        seed: 17,
        late_share: 0.1,
        return_share: 0.03,
        dissatisfied_share: 0.05,
        ..common::storm_at_rate(RATE)
    };
    let driver = tokio::spawn({
        let clients = clients.clone();
        async move { storm(&clients, &config, &indicatif::ProgressBar::hidden()).await }
    });
    // A third of the way in, routing's machine dies with its disk; a new
    // one starts on an empty data directory.
    tokio::time::sleep(Duration::from_secs_f64(COPY_CALLS as f64 / RATE / 3.0)).await;
    services
        .routing
        .kill9_and_lose_disk()
        .expect("lose routing's disk");
    services.routing.restart().expect("restart routing");
    let report = driver.await.expect("driver").expect("storm");
    eprintln!("{}", serde_json::to_string(&report).expect("json"));
    common::assert_storm_clean(&report, COPY_CALLS);
    services
        .wait_healthy(Duration::from_secs(120))
        .await
        .expect("healthy after routing's loss");
    common::quiet(
        &services.all(),
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await;

    // Intake's disk next, at rest: it must come back as it was.
    let before = common::log_state(&clients, "intake").await;
    let ticket = report.ticket_ids.first().expect("a ticket").clone();
    let view_before = clients
        .intake()
        .get_ticket(GetTicketRequest {
            ticket_id: ticket.clone(),
        })
        .await
        .expect("ticket")
        .into_inner();
    services
        .intake
        .kill9_and_lose_disk()
        .expect("lose intake's disk");
    services.intake.restart().expect("restart intake");
    services
        .intake
        .wait_healthy(Duration::from_secs(120))
        .await
        .expect("intake healthy");
    assert_eq!(
        common::log_state(&clients, "intake").await,
        before,
        "the same events and projections"
    );
    let view_after = clients
        .intake()
        .get_ticket(GetTicketRequest { ticket_id: ticket })
        .await
        .expect("ticket after")
        .into_inner();
    assert!(
        view_after
            .ticket
            .as_ref()
            .and_then(|t| t.caller.as_ref())
            .is_some_and(|c| !c.phone.is_empty()),
        "the customer's key came back: the contact opens"
    );
    assert_eq!(view_after, view_before);

    // It serves: more calls, and everything still adds up.
    let more = StormConfig {
        tickets: 40,
        seed: 18,
        ..common::storm_at_rate(RATE)
    };
    let report_more = storm(&clients, &more, &indicatif::ProgressBar::hidden())
        .await
        .expect("storm after");
    assert_eq!(report_more.calls, 40, "{:?}", report_more.errors);
    common::assert_everything_adds_up(
        &services,
        &clients,
        report.new_tickets
            + report.joined_incidents
            + report_more.new_tickets
            + report_more.joined_incidents,
    )
    .await;
}

/// `partitions` partitions of the four services on `cluster`, every stream
/// R3, every log copied (`--log-copy`), intake with `intake_flags` too;
/// once all are healthy, and clients for each partition as an
/// administrator.
async fn start_backend(
    cluster: &NatsCluster,
    dir: &std::path::Path,
    intake_flags: &[String],
    partitions: u16,
) -> (Vec<FourServices>, Vec<Clients>) {
    let common: Vec<String> = ["--stream-replicas", "3", "--log-copy"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let all = FourServices::start_partitions(
        dir,
        &cluster.urls(),
        &common,
        |name| common::storm_backend_flags(name, intake_flags),
        partitions,
    )
    .expect("start services");
    for services in &all {
        services
            .wait_healthy(Duration::from_secs(90))
            .await
            .expect("healthy");
    }
    let clients = all.iter().map(common::admin_clients).collect();
    (all, clients)
}

/// Calls in the lost-disk storm.
const COPY_CALLS: usize = 240;
