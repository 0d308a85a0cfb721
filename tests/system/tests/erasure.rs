//! Customer data is sealed per customer and erasable (crypto-shredding):
//! the caller's name, phone, address and description are in no data dir,
//! no process log and no NATS store file, ever; a crew is answered them,
//! opened by intake; after `EraseCustomer` nobody can open them, the views
//! say so, and the ticket still replays and verifies.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use lineguard_protos::dispatch::v1::{GetWorkOrderRequest, crew_event};
use lineguard_protos::intake::v1::{Caller, Channel, EraseCustomerRequest, TicketKind};
use lineguard_ticketctl::endpoints::{Clients, Endpoints};
use lineguard_ticketctl::{replay, timeline, verify};

const NAME: &str = "Zhao Mingyue-Erasable";
const PHONE: &str = "13987654321";
const ADDRESS: &str = "No. 41 Lotus Pond Lane";
const DESCRIPTION: &str = "Transformer humming near the lotus pond";

/// Every file under `dir` that holds `needle`, with the needle.
fn files_holding(dir: &Path, needles: &[&str], found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_holding(&path, needles, found);
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        for needle in needles {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                found.push(format!("{} holds {needle:?}", path.display()));
            }
        }
    }
}

fn customer_data_on_disk(backend: &Backend) -> Vec<String> {
    let mut found = Vec::new();
    let needles = [NAME, PHONE, ADDRESS, DESCRIPTION];
    let dispatch = backend.dispatch.as_ref().expect("dispatch");
    let feedback = backend.feedback.as_ref().expect("feedback");
    for process in [&backend.intake, &backend.routing, dispatch, feedback] {
        files_holding(process.data_dir(), &needles, &mut found);
    }
    files_holding(&backend.nats.store_dir(), &needles, &mut found);
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_customer_is_unreadable_everywhere_and_their_ticket_still_replays() {
    let backend = Backend::start_all(&[]).await;
    let dispatch_process = backend.dispatch.as_ref().expect("dispatch");
    let mut dispatch = backend.dispatch().await;
    let mut watch = backend.watch_crew(CREW).await;

    let account = accounts_in("d-chengguan-02", 1).remove(0);
    let mut request = report(
        "erasable-1",
        Channel::Hotline95598,
        TicketKind::FaultRepair,
        &account,
    );
    request.address = ADDRESS.into();
    request.description = DESCRIPTION.into();
    request.caller = Some(Caller {
        name: NAME.into(),
        phone: PHONE.into(),
    });
    let mut intake = backend.intake().await;
    let reported = intake
        .report_ticket(request)
        .await
        .expect("report")
        .into_inner();

    // The crew gets the contact, opened for it.
    let first = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("an order in time")
        .expect("stream open")
        .expect("event");
    let Some(crew_event::Body::OrderAssigned(order)) = &first.body else {
        panic!("an order first: {first:?}");
    };
    let covered = &order.tickets[0];
    assert_eq!(covered.ticket_id, reported.ticket_id);
    assert_eq!(
        (
            covered.caller_name.as_str(),
            covered.callback_phone.as_str(),
            covered.address.as_str()
        ),
        (NAME, PHONE, ADDRESS)
    );
    let order_id = order.order_id.clone();
    let ticket = backend.ticket(&reported.ticket_id).await;
    assert_eq!(
        ticket.caller.as_ref().map(|c| c.phone.as_str()),
        Some(PHONE)
    );
    assert_eq!(ticket.description, DESCRIPTION);
    assert!(
        ticket.sealed_contact.is_none(),
        "sealed bytes are not answered"
    );

    // Every service has seen the report (feedback keeps a copy of it).
    let endpoints = Endpoints {
        intake: backend.intake.endpoint(),
        routing: backend.routing.endpoint(),
        dispatch: dispatch_process.endpoint(),
        feedback: backend.feedback.as_ref().expect("feedback").endpoint(),
        credentials: Some(lineguard_harness::test_credentials().path.clone()),
        principal: "admin:dev".into(),
    };
    let clients = Clients::new(&endpoints).expect("clients");
    let feedback = backend.feedback.as_ref().expect("feedback");
    eventually("feedback to keep its copy of the report", || async {
        (!correlated(feedback, &reported.ticket_id).await.is_empty()).then_some(())
    })
    .await;
    let leaks = customer_data_on_disk(&backend);
    assert!(
        leaks.is_empty(),
        "customer data in plain text on disk: {leaks:?}"
    );

    // Erased: nobody can open it any more.
    let erased = intake
        .erase_customer(EraseCustomerRequest {
            account_number: account.clone(),
            phone: String::new(),
            reason: "the customer asked (PIPL art. 47)".into(),
        })
        .await
        .expect("erase")
        .into_inner();
    assert_eq!(erased.erased_customer_keys, vec![format!("acct-{account}")]);
    assert_eq!(erased.tickets, 1);
    let ticket = backend.ticket(&reported.ticket_id).await;
    assert!(ticket.customer_data_erased);
    assert!(ticket.caller.is_none() && ticket.address.is_empty() && ticket.description.is_empty());
    assert_eq!(
        ticket.status,
        reported.status.max(ticket.status),
        "the ticket itself stays"
    );
    let work_order = dispatch
        .get_work_order(GetWorkOrderRequest {
            order_id: order_id.clone(),
        })
        .await
        .expect("work order")
        .into_inner();
    let covered = &work_order.tickets[0];
    assert!(covered.customer_data_erased, "{covered:?}");
    assert!(covered.callback_phone.is_empty() && covered.address.is_empty());

    // Erasing again destroys nothing more.
    let again = intake
        .erase_customer(EraseCustomerRequest {
            account_number: account.clone(),
            phone: String::new(),
            reason: "asked twice".into(),
        })
        .await
        .expect("erase again")
        .into_inner();
    assert!(again.erased_customer_keys.is_empty() && again.tickets == 0);

    // The ticket still replays, shows the erasure, and verifies.
    let replayed = replay::ticket(&clients, &reported.ticket_id)
        .await
        .expect("replay");
    let laid_out = timeline::render_text(&timeline::build(&replayed));
    assert!(
        laid_out.contains("ERASED by admin-dev"),
        "the replay shows the erasure:\n{laid_out}"
    );
    for needle in [NAME, PHONE, ADDRESS, DESCRIPTION] {
        assert!(!laid_out.contains(needle));
    }
    let checked = verify::verify(&clients, &indicatif::ProgressBar::hidden())
        .await
        .expect("verify");
    assert!(checked.is_clean(), "{:?}", checked.mismatches);

    let leaks = customer_data_on_disk(&backend);
    assert!(leaks.is_empty(), "customer data on disk: {leaks:?}");
}
