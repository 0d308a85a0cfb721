//! `ticketctl backup` and `restore`: routing backed up while a storm runs
//! through it; the backup, restored into a new directory, holds exactly
//! the checkpoint's head and projections; routing's machine then loses its
//! disk, the backup is restored into its new data directory, and routing
//! comes back from it, catches up from its log's copy on JetStream to where
//! it stood (the same head and digest) and serves: everything adds up.

mod common;

use std::time::Duration;

use lineguard_harness::{FourServices, NatsServer};
use lineguard_ticketctl::backup::{STORE, backup, read_backup, restore};
use lineguard_ticketctl::simulate::{StormConfig, storm};

/// Calls in the storm, and their rate (per second).
const CALLS: usize = 120;
const RATE: f64 = 30.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_mid_storm_restores_and_catches_up() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut services = FourServices::start(
        dir.path(),
        &nats.url(),
        &["--log-copy".to_string()],
        |name| common::storm_backend_flags(name, &[]),
    )
    .expect("start");
    services
        .wait_healthy(Duration::from_secs(90))
        .await
        .expect("healthy");
    let clients = common::admin_clients(&services);

    let config = StormConfig {
        tickets: CALLS,
        seed: 31,
        late_share: 0.1,
        return_share: 0.03,
        dissatisfied_share: 0.05,
        ..common::storm_at_rate(RATE)
    };
    let driver = tokio::spawn({
        let clients = clients.clone();
        async move { storm(&clients, &config, &indicatif::ProgressBar::hidden()).await }
    });
    // A third of the way in, a backup of routing while it works.
    tokio::time::sleep(Duration::from_secs_f64(CALLS as f64 / RATE / 3.0)).await;
    let backups = tempfile::tempdir().expect("backups");
    let taken = backups.path().join("routing");
    let manifest = backup(&clients, "routing", &taken).await.expect("backup");
    assert_eq!(manifest.service, "routing");
    assert!(manifest.head_position > 0, "{manifest:?}");
    assert!(!manifest.files.is_empty());
    assert_eq!(read_backup(&taken).expect("a whole backup"), manifest);
    // A second backup into the same directory is refused (never mixed).
    assert!(backup(&clients, "routing", &taken).await.is_err());

    let report = driver.await.expect("driver").expect("storm");
    common::assert_storm_clean(&report, CALLS);
    common::quiet(
        &services.all(),
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await;
    let before = common::log_state(&clients, "routing").await;
    assert!(
        before.0 > manifest.head_position,
        "the storm went on after the backup"
    );

    // Restored anywhere, the backup holds the checkpoint: its head and its
    // projections, file for file.
    let elsewhere = tempfile::tempdir().expect("elsewhere");
    restore(&taken, elsewhere.path()).expect("restore elsewhere");
    let restored = lineguard_eventlog::stored_state(&elsewhere.path().join(STORE))
        .expect("the restored store opens");
    assert_eq!(
        (restored.head_position, restored.projection_digest.clone()),
        (manifest.head_position, manifest.projection_digest.clone()),
        "the restored store is the checkpoint"
    );
    assert!(
        restore(&taken, elsewhere.path()).is_err(),
        "never restored over a store"
    );

    // Routing's disk is lost; the backup goes into its new data directory
    // and it comes back from it, then from its copy to where it stood.
    services
        .routing
        .kill9_and_lose_disk()
        .expect("lose routing's disk");
    restore(&taken, services.routing.data_dir()).expect("restore routing");
    services.routing.restart().expect("restart routing");
    services
        .routing
        .wait_healthy(Duration::from_secs(120))
        .await
        .expect("routing healthy");
    assert_eq!(
        common::log_state(&clients, "routing").await,
        before,
        "the same events and projections as before the loss"
    );
    let routing_log = services.routing.log();
    assert!(
        routing_log
            .lines()
            .any(|l| l.contains("applied the log's copy to the store")
                && l.contains("rebuilt=false")),
        "brought forward from the copy, not rebuilt from it:\n{routing_log}"
    );
    // Written to a file, the logs carry no terminal colour codes.
    for process in services.all() {
        assert!(
            !process.log().contains('\u{1b}'),
            "a colour code in a log file"
        );
    }
    common::assert_everything_adds_up(
        &services,
        &clients,
        report.new_tickets + report.joined_incidents,
    )
    .await;
}
