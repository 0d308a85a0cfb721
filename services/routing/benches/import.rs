//! Bulk import of customer accounts through `ImportAccounts` (client
//! streaming, over a real gRPC connection, into routing's RocksDB log):
//! 1,000,000 new accounts, then the same million again (all unchanged).
//!
//! `cargo bench --workspace --bench import` (set `IMPORT_ACCOUNTS` to change
//! the count).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lineguard_eventlog::{EventLog, LogConfig};
use lineguard_protos::routing::v1::{
    AccountAssignment, ImportAccountsRequest, routing_client::RoutingClient,
};
use lineguard_routing::api::{MAX_ACCOUNTS_PER_MESSAGE, RoutingService};
use lineguard_routing::projection::RoutingProjector;
use lineguard_routing::router::{Router, RoutingConfig};
use lineguard_routing::startup::{adopt_policy_file, load_directory_file};

fn messages(
    total: usize,
    districts: &[String],
) -> impl Iterator<Item = ImportAccountsRequest> + Send + 'static {
    let districts = districts.to_vec();
    (0..total.div_ceil(MAX_ACCOUNTS_PER_MESSAGE)).map(move |m| ImportAccountsRequest {
        accounts: (m * MAX_ACCOUNTS_PER_MESSAGE..((m + 1) * MAX_ACCOUNTS_PER_MESSAGE).min(total))
            .map(|i| AccountAssignment {
                account_number: format!("5{i:010}"),
                district_id: districts[i % districts.len()].clone(),
            })
            .collect(),
    })
}

#[tokio::main]
async fn main() {
    let total: usize = std::env::var("IMPORT_ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open(
        LogConfig::new(dir.path().join("log"), "routing")
            .with_event_types(lineguard_routing::event_types())
            .with_projector(Arc::new(RoutingProjector)),
    )
    .expect("open log");
    let router = Router::new(log, RoutingConfig::default());
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    adopt_policy_file(&router, &deploy.join("policy.toml"))
        .await
        .expect("policy");
    load_directory_file(&router, &deploy.join("directory.toml"))
        .await
        .expect("directory");
    let districts: Vec<String> = router
        .log()
        .projection_scan(b"district/", None, 1_000)
        .expect("districts")
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k["district/".len()..]).into_owned())
        .collect();

    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(RoutingService::new(router.clone()).server());
    let channel = lineguard_harness::serve_in_process(routes.routes())
        .await
        .expect("serve");
    let mut client = RoutingClient::new(channel)
        .max_encoding_message_size(64 * 1024 * 1024)
        .max_decoding_message_size(64 * 1024 * 1024);

    println!(
        "import: {total} accounts over {} districts, {MAX_ACCOUNTS_PER_MESSAGE} per message",
        districts.len()
    );
    for (label, expect_changed) in [("new", total as u64), ("unchanged", 0)] {
        let started = Instant::now();
        let response = client
            .import_accounts(tokio_stream::iter(messages(total, &districts)))
            .await
            .expect("import")
            .into_inner();
        let elapsed = started.elapsed();
        assert_eq!(response.received, total as u64);
        assert_eq!(response.changed, expect_changed);
        println!(
            "import {label:>9}: {total} accounts in {:.2} s = {:.0} accounts/s (changed {})",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64(),
            response.changed
        );
    }
    let size = dir_size(&dir.path().join("log"));
    println!(
        "log on disk after both imports: {:.1} MiB",
        size as f64 / (1024.0 * 1024.0)
    );
    router.log().close().await.expect("close");
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}
