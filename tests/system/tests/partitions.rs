//! Every service split in two (`--partitions 2`), every instance told
//! where every other is: each partition's four instances have their own
//! logs and data directories, their own streams, subjects and durable
//! consumers on the bus, and consume only their own partition of each
//! source. A storm driven through partition 0's instances alone reaches
//! the partition owning each call's station (calls, desks' answers,
//! crews' watches and actions, follow-ups are forwarded there), each
//! partition adds up on its own, any instance answers for any ticket, and
//! a listing at either instance gathers both partitions. The same storm,
//! in waves (so that it does not depend on timing), on one partition
//! gives every station and the company the same scorecard figures.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;

use lineguard_bus::Partition;
use lineguard_harness::{FourServices, MAX_TEST_PARTITIONS, NatsServer, SERVICE_NAMES};
use lineguard_protos::eventlog::v1::ReadAllRequest;
use lineguard_protos::feedback::v1::{
    GetScorecardRequest, Level, Period, RecordPraiseRequest, Scorecard, Subject,
};
use lineguard_protos::intake::v1::{
    GetTicketRequest, ListTicketsRequest, TicketReported, UnsealContactsRequest,
};
use lineguard_protos::routing::v1::{Availability, GetAvailabilityRequest, SetAvailabilityRequest};
use lineguard_ticketctl::endpoints::Clients;
use lineguard_ticketctl::simulate::{StormConfig, storm};

/// The demo county's company and stations.
const COMPANY: &str = "co-lixian";
const STATIONS: [&str; 4] = ["st-chengguan", "st-dongpo", "st-xihe", "st-shanyang"];

/// A day either side of now: the whole storm.
fn around_now() -> Period {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let at = |seconds: u64| prost_types::Timestamp {
        seconds: i64::try_from(seconds).expect("seconds"),
        nanos: 0,
    };
    Period {
        from: Some(at(now - 86_400)),
        to: Some(at(now + 86_400)),
    }
}

/// The company's and each station's scorecard, as `clients`' feedback gives them.
async fn scorecards(clients: &Clients, period: Period) -> Vec<Scorecard> {
    let mut subjects = vec![(Level::Company, COMPANY)];
    subjects.extend(STATIONS.iter().map(|s| (Level::Station, *s)));
    let mut cards = Vec::new();
    for (level, id) in subjects {
        let card = clients
            .feedback()
            .get_scorecard(GetScorecardRequest {
                subject: Some(Subject {
                    level: level as i32,
                    id: id.into(),
                }),
                period: Some(period),
            })
            .await
            .expect("a scorecard")
            .into_inner();
        cards.push(card);
    }
    cards
}

/// A scorecard's figures that a storm in waves decides whatever the
/// machine's speed: all but the waiting times (how long each customer
/// waited for an owner, in wall-clock seconds of this run).
fn decided_figures(card: &Scorecard) -> Scorecard {
    Scorecard {
        average_waiting_seconds: 0.0,
        waiting_by_channel: Vec::new(),
        ..card.clone()
    }
}

/// Calls in the storm, and how many go in each wave (`--waves-of`).
const CALLS: usize = 160;
const WAVE: usize = 40;

/// Every ticket `intake` lists, gathering a page of `page_size` at a time.
async fn listed(clients: &Clients, page_size: u32) -> Vec<String> {
    let mut intake = clients.intake();
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = intake
            .list_tickets(ListTicketsRequest {
                page_size,
                page_token: token,
                ..ListTicketsRequest::default()
            })
            .await
            .expect("list tickets")
            .into_inner();
        ids.extend(page.tickets.into_iter().map(|t| t.ticket_id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_partitions_answer_any_call_at_any_instance_and_each_adds_up() {
    const PARTITIONS: u16 = 2;
    const { assert!(PARTITIONS <= MAX_TEST_PARTITIONS) };
    // The demo county's stations fall in both partitions, so both work.
    let owners: BTreeSet<u16> = STATIONS
        .iter()
        .map(|s| Partition::owning(s, PARTITIONS).index())
        .collect();
    assert_eq!(owners.len(), 2, "the demo's stations split over both");

    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let partitions = FourServices::start_partitions(
        dir.path(),
        &nats.url(),
        &[],
        |name| common::storm_backend_flags(name, &[]),
        PARTITIONS,
    )
    .expect("start the partitions");
    for services in &partitions {
        services
            .wait_healthy(Duration::from_secs(90))
            .await
            .expect("healthy");
    }
    let clients: Vec<_> = partitions.iter().map(common::admin_clients).collect();

    // The whole storm through partition 0's four instances, in waves: each
    // call meets the same backend state as it would on one partition, so
    // the two runs can be compared figure for figure.
    let config = StormConfig {
        tickets: CALLS,
        seed: 20,
        late_share: 0.1,
        return_share: 0.05,
        dissatisfied_share: 0.1,
        waves_of: WAVE,
        phone_skew_minutes: 0,
        ..common::storm_at_rate(1_000.0)
    };
    let report = storm(&clients[0], &config, &indicatif::ProgressBar::hidden())
        .await
        .expect("storm");
    common::assert_storm_clean(&report, CALLS);
    let tickets = report.new_tickets + report.joined_incidents;

    // A listing at either instance gathers both partitions, whatever the
    // page size, each ticket once.
    let everything = listed(&clients[0], 1_000).await;
    assert_eq!(everything.len(), tickets, "every ticket listed once");
    assert_eq!(
        everything.iter().collect::<BTreeSet<_>>().len(),
        tickets,
        "no ticket listed twice"
    );
    let by_seven = listed(&clients[1], 7).await;
    assert_eq!(
        by_seven.iter().collect::<BTreeSet<_>>(),
        everything.iter().collect::<BTreeSet<_>>(),
        "pages of 7 at partition 1 list the same tickets"
    );
    assert_eq!(by_seven.len(), tickets);

    // Each ticket was opened by the partition owning its station, and any
    // instance answers for it.
    let mut per_partition = vec![0usize; usize::from(PARTITIONS)];
    for ticket_id in &everything {
        let opened_by = Partition::of_case(ticket_id, PARTITIONS).expect("a partition");
        per_partition[usize::from(opened_by.index())] += 1;
        let mut views = Vec::new();
        for clients in &clients {
            let view = clients
                .intake()
                .get_ticket(GetTicketRequest {
                    ticket_id: ticket_id.clone(),
                })
                .await
                .expect("any instance answers")
                .into_inner()
                .ticket
                .expect("a view");
            views.push(view);
        }
        assert_eq!(views[0], views[1], "{ticket_id}: one view, whoever asks");
        let station = &views[0].station_id;
        if !station.is_empty() {
            assert_eq!(
                Partition::owning(station, PARTITIONS),
                opened_by,
                "{ticket_id} of {station} opened by the partition owning it"
            );
        }
    }
    assert!(
        per_partition.iter().all(|n| *n > 0),
        "both partitions took calls: {per_partition:?}"
    );

    // Each partition adds up on its own: its tickets, and only those,
    // worked to their end through its four logs.
    for (index, (services, clients)) in partitions.iter().zip(&clients).enumerate() {
        let partition = Partition::new(u32::try_from(index).expect("index"), PARTITIONS.into())
            .expect("partition");
        common::assert_partition_adds_up(services, clients, Some(partition), per_partition[index])
            .await;
    }

    // Scorecards sum every partition's counts: the same at either
    // instance; the company's tickets are every ticket; the stations'
    // add up to the company's, each station's being the tickets routed to it.
    let period = around_now();
    let cards = scorecards(&clients[0], period).await;
    assert_eq!(
        cards,
        scorecards(&clients[1], period).await,
        "one answer at either instance"
    );
    assert_eq!(
        cards[0].tickets_handled as usize, tickets,
        "the company's: every ticket"
    );
    let stations_sum: u64 = cards[1..].iter().map(|c| c.tickets_handled).sum();
    assert_eq!(stations_sum, cards[0].tickets_handled);
    for card in &cards[1..] {
        let station = &card.subject.as_ref().expect("subject").id;
        let mut routed_there = 0;
        let mut intake = clients[0].intake();
        let mut token = String::new();
        loop {
            let page = intake
                .list_tickets(ListTicketsRequest {
                    station_id: station.clone(),
                    page_size: 1_000,
                    page_token: token,
                    ..ListTicketsRequest::default()
                })
                .await
                .expect("list a station's tickets")
                .into_inner();
            routed_there += page.tickets.len();
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(card.tickets_handled as usize, routed_there, "{station}");
    }

    // The company's desk, kept in every partition, is set in every one
    // whichever instance is asked; a crew's availability goes to its
    // station's partition.
    let desk = "desk-co-lixian";
    clients[1]
        .routing()
        .set_availability(SetAvailabilityRequest {
            assignee_id: desk.into(),
            availability: Availability::OffDuty as i32,
            note: "night shift handed over".into(),
            ..SetAvailabilityRequest::default()
        })
        .await
        .expect("set the company desk off duty");
    for clients in &clients {
        let view = clients
            .routing()
            .get_availability(GetAvailabilityRequest {
                assignee_id: desk.into(),
            })
            .await
            .expect("the desk's availability")
            .into_inner();
        assert_eq!(view.availability(), Availability::OffDuty, "{view:?}");
    }

    // A retried praise meets its first answer whichever instance it is
    // sent to: one record, one id.
    let praise = RecordPraiseRequest {
        idempotency_key: "praise-retried-1".into(),
        credited_to: Some(Subject {
            level: Level::Station as i32,
            id: "st-xihe".into(),
        }),
        channel: lineguard_protos::intake::v1::Channel::Wechat as i32,
        text: "thank you".into(),
        ..RecordPraiseRequest::default()
    };
    let mut ids = BTreeSet::new();
    for clients in clients.iter().chain(clients.iter()) {
        let answer = clients
            .feedback()
            .record_praise(praise.clone())
            .await
            .expect("praise")
            .into_inner();
        ids.insert(answer.praise_id);
    }
    assert_eq!(ids.len(), 1, "one praise, whoever was asked: {ids:?}");

    // A contact is sealed with a key only the partition that took the
    // report holds; any instance opens it (asking the others).
    let reported = clients[1]
        .log("intake")
        .expect("log client")
        .read_all(ReadAllRequest {
            from_position: 1,
            max_count: 200,
            ..Default::default()
        })
        .await
        .expect("partition 1's intake log")
        .into_inner()
        .events
        .into_iter()
        .find(|e| e.event_type == "lineguard.intake.v1.TicketReported")
        .expect("a report in partition 1");
    let sealed = <TicketReported as prost::Message>::decode(reported.payload.as_ref())
        .expect("a report")
        .contact
        .expect("its sealed contact");
    let opened = clients[0]
        .intake()
        .unseal_contacts(UnsealContactsRequest {
            contacts: vec![sealed],
        })
        .await
        .expect("open at partition 0")
        .into_inner()
        .contacts;
    assert_eq!(opened.len(), 1);
    assert!(!opened[0].erased, "partition 1's key opened it");
    assert!(opened[0].contact.is_some());

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
                    ..Default::default()
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

    drop(partitions);

    // The same seeded storm on one partition: every station's and the
    // company's scorecard figures are the same.
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsServer::start().expect("nats");
    let whole = FourServices::start(dir.path(), &nats.url(), &[], |name| {
        common::storm_backend_flags(name, &[])
    })
    .expect("start one partition");
    whole
        .wait_healthy(Duration::from_secs(90))
        .await
        .expect("healthy");
    let whole_clients = common::admin_clients(&whole);
    let whole_report = storm(&whole_clients, &config, &indicatif::ProgressBar::hidden())
        .await
        .expect("storm on one partition");
    common::assert_storm_clean(&whole_report, CALLS);
    common::assert_everything_adds_up(
        &whole,
        &whole_clients,
        whole_report.new_tickets + whole_report.joined_incidents,
    )
    .await;
    let whole_cards = scorecards(&whole_clients, period).await;
    assert_eq!(
        (
            whole_report.new_tickets,
            whole_report.joined_incidents,
            whole_report.urges
        ),
        (report.new_tickets, report.joined_incidents, report.urges),
        "the same calls became the same tickets"
    );
    assert!(
        report.urges > 0
            && report.joined_incidents > 0
            && report.returned > 0
            && report.reopened > 0,
        "the storm urges, joins incidents, returns and reopens: {report:?}"
    );
    for (one, two) in whole_cards.iter().zip(&cards) {
        assert_eq!(
            decided_figures(one),
            decided_figures(two),
            "one partition and two score the same storm the same"
        );
    }
}
