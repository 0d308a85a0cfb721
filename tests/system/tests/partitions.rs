//! Every service split in two (`--partitions 2`): each partition's four
//! instances have their own logs and data directories, their own streams,
//! subjects and durable consumers on the bus, and consume only their own
//! partition of each source. A storm through each partition's instances
//! is worked to its end there, nothing of it reaches the other partition,
//! and each partition adds up on its own.

mod common;

use std::time::Duration;

use futures::StreamExt;

use lineguard_harness::{FourServices, MAX_TEST_PARTITIONS, NatsServer, SERVICE_NAMES};
use lineguard_protos::eventlog::v1::ReadAllRequest;
use lineguard_protos::intake::v1::GetTicketRequest;
use lineguard_ticketctl::simulate::{StormConfig, storm};

/// Calls in each partition's storm, and their rate (per second).
const CALLS: usize = 120;
const RATE: f64 = 30.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_partitions_of_every_service_each_consume_only_their_own_share() {
    const PARTITIONS: u16 = 2;
    const { assert!(PARTITIONS <= MAX_TEST_PARTITIONS) };
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut partitions = Vec::new();
    for partition in 0..PARTITIONS {
        let services = FourServices::start_partition(
            dir.path(),
            &nats.url(),
            &[],
            |name| common::storm_backend_flags(name, &[]),
            partition,
            PARTITIONS,
        )
        .expect("start a partition");
        partitions.push(services);
    }
    for services in &partitions {
        services
            .wait_healthy(Duration::from_secs(90))
            .await
            .expect("healthy");
    }
    let clients: Vec<_> = partitions.iter().map(common::admin_clients).collect();

    // A storm through each partition's instances, at once.
    let storms: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(index, clients)| {
            let clients = clients.clone();
            let config = StormConfig {
                tickets: CALLS,
                seed: 20 + index as u64,
                late_share: 0.1,
                dissatisfied_share: 0.05,
                ..common::storm_at_rate(RATE)
            };
            tokio::spawn(async move {
                storm(&clients, &config, &indicatif::ProgressBar::hidden()).await
            })
        })
        .collect();
    let mut reports = Vec::new();
    for driver in storms {
        let report = driver.await.expect("driver").expect("storm");
        common::assert_storm_clean(&report, CALLS);
        reports.push(report);
    }

    // Each partition adds up on its own: its tickets, and only those,
    // worked to their end through its four logs.
    for ((services, clients), report) in partitions.iter().zip(&clients).zip(&reports) {
        common::assert_everything_adds_up(
            services,
            clients,
            report.new_tickets + report.joined_incidents,
        )
        .await;
    }

    // Nothing of one partition's storm is in the other's intake.
    for (mine, report) in reports.iter().enumerate() {
        let other = &clients[1 - mine];
        for ticket in report.ticket_ids.iter().take(20) {
            let found = other
                .intake()
                .get_ticket(GetTicketRequest {
                    ticket_id: ticket.clone(),
                })
                .await;
            assert_eq!(
                found.map(|_| ()).map_err(|s| s.code()),
                Err(tonic::Code::NotFound),
                "{ticket} of partition {mine} in partition {}",
                1 - mine
            );
        }
    }

    // Each instance's events carry its partition's name as their source,
    // and each partition has its own streams and consumers on the bus.
    let jetstream = nats.jetstream().await.expect("jetstream");
    for (index, clients) in clients.iter().enumerate() {
        let index = u16::try_from(index).expect("index");
        for service in SERVICE_NAMES {
            let name = lineguard_bus::partition::bus_name(service, index);
            let mut log = clients.log(service).expect("log client");
            let events = log
                .read_all(ReadAllRequest {
                    from_position: 1,
                    max_count: 50,
                })
                .await
                .expect("read the log")
                .into_inner()
                .events;
            assert!(!events.is_empty(), "{name} has events");
            assert!(
                events.iter().all(|e| e.source == name),
                "{name}: {:?}",
                events.iter().map(|e| &e.source).collect::<Vec<_>>()
            );
            let mut stream = jetstream
                .get_stream(lineguard_bus::subjects::stream_name(&name))
                .await
                .expect("the partition's stream");
            let info = stream.info().await.expect("stream info");
            assert!(info.state.messages > 0, "{name}'s stream has messages");
            assert_eq!(
                info.config.subjects,
                vec![lineguard_bus::subjects::service_subjects(&name)]
            );
            // Only this partition's instances read this partition's stream.
            let mut consumers = stream.consumer_names();
            let mut readers = 0;
            while let Some(consumer) = consumers.next().await {
                let consumer = consumer.expect("consumer name");
                readers += 1;
                let reader = consumer
                    .split("-from-")
                    .next()
                    .expect("a consumer's reader");
                let reader_partition = match reader.rsplit_once("-p") {
                    Some((_, k)) => k.parse::<u16>().expect("partition index"),
                    None => 0,
                };
                assert_eq!(reader_partition, index, "{consumer} reads {name}'s stream");
            }
            assert!(readers > 0, "{name}'s stream is read");
        }
    }
}
