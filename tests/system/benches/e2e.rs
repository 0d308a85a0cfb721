//! End to end, from a customer's call to the crew's phone, on a generated
//! province: the figures the speed issue asks for, in one run.
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo bench --workspace --bench e2e
//! ```
//!
//! It generates a province (`ticketctl generate province`: 100 stations,
//! 5,000 districts, 1,000,000 accounts, 300 crews), starts a private
//! `nats-server` with `sync_interval: always` and the four release service
//! binaries with TLS and authentication (as deployed), each durable, and then:
//!
//! 1. **100 calls/s** for a minute: `ReportTicket` and call → crew
//!    percentiles; from the streams' counters, what a call costs the bus
//!    (messages per stream, their size, the consumers that read each).
//! 2. **The bus's own limit**: the same messages per call, of the same
//!    sizes, published as the outbox relay publishes them (atomic batches
//!    of its run, `lineguard_bus::publish`) to streams of the same kind on
//!    the same server and pulled
//!    and acked by as many durable consumers as read each stream, all at
//!    once: calls/s the bus alone could carry.
//! 3. **Sustained**: a burst of calls (20,000 at 2,000/s), timed from the
//!    first call until the last order reached its crew: calls/s from call
//!    to crew with everything durable, and its ratio to the bus's limit.
//! 4. **1,000 calls/s for ten minutes**: percentiles, and every process's
//!    resident memory sampled each second (peak, and at a minute, half-way
//!    and the end, to see whether it stays flat).
//!
//! The storm is `ticketctl simulate storm`'s (feeder outages, repeat
//! callers, desk work, crews that acknowledge, travel, repair and complete;
//! here no slow crews, returns or reopens). Each order is timed from the
//! call that caused it. Percentiles count the orders that reached a crew
//! before the run ended; the count beside them says how many. The first
//! two storms run until every ticket is closed and followed up (so every
//! order has reached its crew and the bus counters hold a whole ticket's
//! life); the long one stops a minute after its last call.
//!
//! Sizes from the environment: `LINEGUARD_E2E_SIZE=county` (a 5,000-account
//! county, for a quick look), `LINEGUARD_E2E_PARTITIONS` (1: every service
//! in P partitions, the storm driven through partition 0's instances, which
//! forward what another partition owns), `LINEGUARD_E2E_MINUTES` (10),
//! `LINEGUARD_E2E_LOW_SECONDS` (60), `LINEGUARD_E2E_BURST_CALLS` (20,000),
//! `LINEGUARD_E2E_HIGH_RATE` (1,000); `LINEGUARD_E2E_KEEP=1` keeps the
//! run's data directory (the services' stores and logs) instead of
//! removing it. The service binaries are the release
//! ones beside this benchmark (`cargo build --release --workspace --bins`
//! builds them; `cargo bench` alone builds only the packages' benchmarks).

/// The system tests' shared helpers (clients of a running backend).
#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lineguard_harness::{FourServices, NatsServer, SERVICE_NAMES, deploy_file, workspace_binary};
use lineguard_ticketctl::county::{CountyConfig, generate};
use lineguard_ticketctl::endpoints::Clients;
use lineguard_ticketctl::simulate::{Percentiles, StormConfig, StormReport, storm};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let minutes: u64 = env_or("LINEGUARD_E2E_MINUTES", 10);
    let low_seconds: u64 = env_or("LINEGUARD_E2E_LOW_SECONDS", 60);
    let burst_calls: usize = env_or("LINEGUARD_E2E_BURST_CALLS", 20_000);
    let high_rate: f64 = env_or("LINEGUARD_E2E_HIGH_RATE", 1_000.0);
    let size: String = env_or("LINEGUARD_E2E_SIZE", "province".to_string());
    let partitions: u16 = env_or("LINEGUARD_E2E_PARTITIONS", 1);
    let keep_data = env_or("LINEGUARD_E2E_KEEP", 0u8) == 1;
    let county = match size.as_str() {
        "county" => CountyConfig {
            companies: 1,
            stations: 4,
            districts: 36,
            managers: 12,
            crews: 8,
            accounts: 5_000,
            seed: 7,
        },
        _ => CountyConfig::province(7),
    };
    for name in SERVICE_NAMES {
        let binary = workspace_binary(&format!("lineguard-{name}"));
        assert!(
            binary.is_file(),
            "{} is not built: run `cargo build --release --workspace --bins` first",
            binary.display()
        );
    }

    let dir = tempfile::Builder::new()
        .prefix("lineguard-e2e-")
        .tempdir()
        .expect("tempdir");
    let generated = generate(&county, dir.path()).expect("generate");
    println!(
        "e2e: {partitions} partition(s); {} companies, {} stations, {} districts, {} managers, {} crews, {} accounts",
        county.companies,
        county.stations,
        county.districts,
        county.managers,
        county.crews,
        county.accounts
    );
    let nats = NatsServer::start_with_config(
        "jetstream { sync_interval: always, max_file_store: 64GB }\nmax_payload: 1MB",
    )
    .expect("nats");
    let directory_file = generated.directory.display().to_string();
    let (policy, rules, calendar) = (
        deploy_file("policy.toml"),
        deploy_file("feedback.toml"),
        deploy_file("calendar.toml"),
    );
    let common = vec!["--calendar".to_string(), calendar];
    let started = Instant::now();
    let all = FourServices::start_partitions(
        dir.path(),
        &nats.url(),
        &common,
        |name| match name {
            "routing" => vec![
                "--policy".into(),
                policy.clone(),
                "--directory".into(),
                directory_file.clone(),
            ],
            "feedback" => vec!["--rules".into(), rules.clone()],
            _ => vec![],
        },
        partitions,
    )
    .expect("start services");
    for services in &all {
        services
            .wait_healthy(Duration::from_secs(30 * 60))
            .await
            .expect("healthy");
    }
    // Every process, by its bus name (`intake`, `intake-p1`).
    let processes: Vec<(String, &lineguard_harness::ServiceProcess)> = all
        .iter()
        .enumerate()
        .flat_map(|(k, services)| {
            let k = u16::try_from(k).expect("partition index");
            SERVICE_NAMES
                .iter()
                .zip(services.all())
                .map(move |(name, p)| (lineguard_bus::partition::bus_name(name, k), p))
        })
        .collect();
    let services = &all[0];
    println!(
        "e2e: backend up, directory loaded, in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let clients = common::admin_clients(services);
    let jetstream = nats.jetstream().await.expect("jetstream");
    // Until done: every ticket closed and followed up (so every order has
    // reached its crew), at most `settle`.
    // The call centre's agents: fewer than intake takes at once, so a call
    // past them is shed (or, for the burst, waits for an agent) at the call
    // centre, not refused by intake.
    let storm_config = |tickets: usize, rate: f64, seed: u64, until_done: bool| StormConfig {
        tickets,
        rate,
        seed,
        accounts: generated.accounts.display().to_string(),
        directory: directory_file.clone(),
        slow_share: 0.0,
        slow_ack: Duration::from_secs(6),
        late_share: 0.15,
        return_share: 0.0,
        dissatisfied_share: 0.0,
        settle: Duration::from_secs(if until_done { 900 } else { 60 }),
        clock_start: None,
        clock_anchor: None,
        clock_speed: 1,
        phone_skew_minutes: 0,
        until_done,
        offline_share: 0.0,
        max_in_flight: 1_000,
        queue_calls: false,
        waves_of: 0,
    };

    // 1. 100 calls/s, and what a call costs the bus.
    let before = stream_counters(&jetstream).await;
    let low = run_storm(
        &clients,
        storm_config((100 * low_seconds) as usize, 100.0, 1, true),
    )
    .await;
    let after = stream_counters(&jetstream).await;
    let costs = per_call_costs(&jetstream, &before, &after, low.calls).await;
    print_storm("100 calls/s", &low);
    for cost in &costs {
        println!(
            "bus: {:<20} {:>6.2} messages a call, {:>5.0} bytes each, read by {} consumer(s)",
            cost.stream, cost.messages_per_call, cost.bytes_per_message, cost.consumers
        );
    }

    // 2. The bus alone, the same messages.
    let raw_calls = burst_calls.max(1_000);
    let raw_seconds = bus_limit(&jetstream, &costs, raw_calls).await;
    let bus_calls_per_second = raw_calls as f64 / raw_seconds;
    let published: f64 = costs.iter().map(|c| c.messages_per_call).sum();
    let consumed: f64 = costs
        .iter()
        .map(|c| c.messages_per_call * c.consumers as f64)
        .sum();
    println!(
        "bus limit: {bus_calls_per_second:.0} calls/s ({:.0} publishes/s and {:.0} consumes/s: {published:.1} and {consumed:.1} a call, {raw_calls} calls in {raw_seconds:.1} s)",
        bus_calls_per_second * published,
        bus_calls_per_second * consumed,
    );

    // 3. Sustained: a burst, timed until the last order reached its crew.
    let burst = run_storm(
        &clients,
        StormConfig {
            queue_calls: true,
            // The figure is the last order's time: five minutes after the
            // last call is long past it, whether or not every follow-up
            // has been made by then.
            settle: Duration::from_secs(300),
            ..storm_config(burst_calls, 2_000.0, 2, true)
        },
    )
    .await;
    let sustained = burst.calls as f64 / burst.last_order_seconds.max(1e-9);
    print_storm("burst", &burst);
    println!(
        "sustained, call to crew: {sustained:.0} calls/s ({} calls, last order after {:.1} s) = {:.2}x the bus limit (target 0.5x)",
        burst.calls,
        burst.last_order_seconds,
        sustained / bus_calls_per_second
    );

    // 4. 1,000 calls/s for ten minutes, every process's memory sampled.
    let mut pids: Vec<(String, u32)> = processes
        .iter()
        .filter_map(|(name, p)| p.pid().map(|pid| (name.clone(), pid)))
        .collect();
    if let Some(pid) = nats.pid() {
        pids.push(("nats-server".into(), pid));
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(sample_memory(pids, stopped));
    let high_calls = (high_rate * (minutes * 60) as f64) as usize;
    let high = run_storm(&clients, storm_config(high_calls, high_rate, 3, false)).await;
    let _ = stop.send(true);
    let samples = sampler.await.expect("sampler");
    print_storm(&format!("{high_rate:.0} calls/s"), &high);
    println!("memory over the {high_rate:.0} calls/s run (resident, MB; target < 200 and flat):");
    for (name, pid, series) in &samples {
        let at = |fraction: f64| {
            let i = ((series.len() as f64 * fraction) as usize).min(series.len().saturating_sub(1));
            series.get(i).map_or(0.0, |(_, kb)| *kb as f64 / 1024.0)
        };
        let peak = series.iter().map(|(_, kb)| *kb).max().unwrap_or(0) as f64 / 1024.0;
        let hwm = peak_resident_kb(*pid).unwrap_or(0) as f64 / 1024.0;
        println!(
            "  {name:<12} peak {peak:>6.0} (high-water {hwm:>6.0})  at 10% {:>6.0}  50% {:>6.0}  end {:>6.0}",
            at(0.1),
            at(0.5),
            at(1.0),
        );
    }
    // Where each service's memory was, as it reports it every minute
    // (`runtime::memory`): the kernel's count, the heap's, the store's.
    println!("memory as the services report it (MiB; the last three reports):");
    for (name, process) in &processes {
        let log = process.log();
        let reports: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("lineguard::memory"))
            .collect();
        for line in reports.iter().rev().take(3).rev() {
            let fields: Vec<&str> = line
                .split_whitespace()
                .filter(|w| w.contains("_mib="))
                .collect();
            println!("  {name:<12} {}", fields.join(" "));
        }
    }
    // What the consumers' reconciling applied from a source's log rather
    // than from the bus (`bus::catchup`): after a gap the bus showed, or
    // not delivered by the bus within a sweep. The second is work done
    // twice (the bus's copy comes later and is recognised).
    println!(
        "events applied from a source's log instead of the bus (after a gap / not yet delivered):"
    );
    for (name, process) in &processes {
        let log = process.log();
        let applied = |what: &str| -> u64 {
            log.lines()
                .filter(|line| line.contains(what))
                .filter_map(|line| {
                    line.split_whitespace()
                        .find_map(|word| word.strip_prefix("applied="))
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .sum()
        };
        println!(
            "  {name:<12} {} / {}",
            applied("after a gap in the bus"),
            applied("the bus had not delivered")
        );
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    if keep_data {
        // The services' data and logs, to explain a figure afterwards.
        let kept = dir.keep();
        println!(
            "e2e done in {elapsed_s:.0} s; data in {} (kept)",
            kept.display()
        );
    } else {
        println!(
            "e2e done in {elapsed_s:.0} s; data in {} (removed)",
            dir.path().display()
        );
    }
}

async fn run_storm(clients: &Clients, config: StormConfig) -> StormReport {
    storm(clients, &config, &indicatif::ProgressBar::hidden())
        .await
        .expect("storm")
}

fn print_storm(what: &str, r: &StormReport) {
    let p = |p: &Percentiles| {
        format!(
            "n={} p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.0} ms",
            p.count, p.p50, p.p90, p.p99, p.max
        )
    };
    println!(
        "{what}: {} calls in {:.1} s ({:.0}/s; {} shed, every agent busy; {} refused by intake and retried), {} orders to crews ({} twice), errors {:?}",
        r.calls,
        r.seconds,
        r.calls_per_second,
        r.calls_shed,
        r.refused_by_backend,
        r.orders_received,
        r.orders_received_twice,
        r.errors
    );
    println!("  ReportTicket:          {}", p(&r.report_latency_ms));
    println!("  call -> crew:          {}", p(&r.report_to_crew_ms));
    if let Some(left) = r.not_done {
        println!(
            "  not done after the settle time: {} tickets held, {} follow-ups open",
            left.held_tickets, left.open_follow_ups
        );
    }
}

/// Each stream's last sequence and bytes.
async fn stream_counters(
    jetstream: &async_nats::jetstream::Context,
) -> HashMap<String, (u64, u64)> {
    let mut counters = HashMap::new();
    let mut names = jetstream.stream_names();
    while let Some(Ok(name)) = names.next().await {
        if name.starts_with("RAW_") {
            continue;
        }
        if let Ok(mut stream) = jetstream.get_stream(&name).await
            && let Ok(info) = stream.info().await
        {
            counters.insert(name, (info.state.last_sequence, info.state.bytes));
        }
    }
    counters
}

/// What one call cost one stream.
#[derive(Debug, Clone)]
struct StreamCost {
    stream: String,
    messages_per_call: f64,
    bytes_per_message: f64,
    consumers: usize,
}

async fn per_call_costs(
    jetstream: &async_nats::jetstream::Context,
    before: &HashMap<String, (u64, u64)>,
    after: &HashMap<String, (u64, u64)>,
    calls: usize,
) -> Vec<StreamCost> {
    let mut costs = Vec::new();
    let mut streams: Vec<&String> = after.keys().collect();
    streams.sort();
    for stream in streams {
        let (last, bytes) = after[stream];
        let (last_before, bytes_before) = before.get(stream).copied().unwrap_or((0, 0));
        let messages = last.saturating_sub(last_before);
        if messages == 0 {
            continue;
        }
        let mut consumers = 0;
        if let Ok(s) = jetstream.get_stream(stream).await {
            let mut names = s.consumer_names();
            while let Some(Ok(_)) = names.next().await {
                consumers += 1;
            }
        }
        costs.push(StreamCost {
            stream: stream.clone(),
            messages_per_call: messages as f64 / calls.max(1) as f64,
            bytes_per_message: bytes.saturating_sub(bytes_before) as f64 / messages as f64,
            consumers,
        });
    }
    costs
}

/// Publishes `calls` calls' worth of each stream's messages, as the relay
/// does (atomic batches of its run, one in flight a stream), to a stream of
/// the same kind, while as many durable pull consumers as read it pull and
/// ack them; the seconds until every consumer has acked all.
async fn bus_limit(
    jetstream: &async_nats::jetstream::Context,
    costs: &[StreamCost],
    calls: usize,
) -> f64 {
    use async_nats::jetstream::{consumer::pull, stream};
    // Messages a batch (the relay's run).
    let run = lineguard_bus::RelayConfig::default().batch;
    let mut tasks = Vec::new();
    let mut plans = Vec::new();
    for (i, cost) in costs.iter().enumerate() {
        let name = format!("RAW_{i}");
        let subject = format!("raw.{i}");
        let messages = (cost.messages_per_call * calls as f64).round() as u64;
        let stream = jetstream
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{subject}.>")],
                storage: stream::StorageType::File,
                allow_atomic_publish: true,
                ..stream::Config::default()
            })
            .await
            .expect("raw stream");
        let mut consumers = Vec::new();
        for c in 0..cost.consumers {
            consumers.push(
                stream
                    .create_consumer(pull::Config {
                        durable_name: Some(format!("raw-{c}")),
                        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                        max_ack_pending: 1_000,
                        ..pull::Config::default()
                    })
                    .await
                    .expect("raw consumer"),
            );
        }
        plans.push((
            subject,
            messages,
            cost.bytes_per_message as usize,
            consumers,
        ));
    }
    let started = Instant::now();
    for (subject, messages, bytes, consumers) in plans {
        let js = jetstream.clone();
        tasks.push(tokio::spawn(async move {
            let payload = bytes::Bytes::from(vec![b'x'; bytes.max(1)]);
            let all: Vec<u64> = (0..messages).collect();
            for chunk in all.chunks(run) {
                let batch: Vec<_> = chunk
                    .iter()
                    .map(|n| lineguard_bus::publish::Outgoing {
                        subject: format!("{subject}.{n}"),
                        payload: payload.clone(),
                        message_id: format!("{subject}-{n}"),
                        trace_parent: String::new(),
                    })
                    .collect();
                lineguard_bus::publish::publish_atomically(&js, &batch)
                    .await
                    .expect("batch");
            }
        }));
        for consumer in consumers {
            tasks.push(tokio::spawn(async move {
                let mut seen = 0u64;
                while seen < messages {
                    let mut batch = consumer
                        .batch()
                        .max_messages(64)
                        .expires(Duration::from_secs(2))
                        .messages()
                        .await
                        .expect("pull");
                    while let Some(Ok(message)) = batch.next().await {
                        message.ack().await.expect("ack");
                        seen += 1;
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("bus limit task");
    }
    started.elapsed().as_secs_f64()
}

/// One process's resident memory over a run: its name, its id, and
/// (seconds, KiB) pairs.
type MemorySeries = (String, u32, Vec<(u64, u64)>);

/// Samples every process's resident memory once a second until `stop`.
async fn sample_memory(
    pids: Vec<(String, u32)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<MemorySeries> {
    let started = Instant::now();
    let mut series: Vec<MemorySeries> = pids
        .into_iter()
        .map(|(name, pid)| (name, pid, Vec::new()))
        .collect();
    loop {
        for (_, pid, samples) in series.iter_mut() {
            if let Some(kb) = status_kb(*pid, "VmRSS:") {
                samples.push((started.elapsed().as_secs(), kb));
            }
        }
        tokio::select! {
            _ = stop.changed() => return series,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The process's peak resident memory so far (`VmHWM`), KiB.
fn peak_resident_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:")
}

/// A `/proc/<pid>/status` field in KiB.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
