//! The first line, findable: the directory holds every line's public
//! number, `WhoServes` tells the app, WeChat and web back ends whom a
//! customer should call now (the manager, or the station with the reason),
//! and `ticketctl sheet` prints a district's meter-box labels.

mod common;

use common::*;
use lineguard_harness::workspace_binary;
use lineguard_protos::routing::v1::{
    AssigneeRole, Availability, ListDistrictAccountsRequest, SetAvailabilityRequest,
    WhoServesRequest,
};
use tonic::Code;

const DISTRICT: &str = "d-chengguan-02";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_finds_the_first_line_and_every_meter_box_says_it() {
    let backend = Backend::start().await;
    let mut routing = backend.routing().await;
    let account = accounts_in(DISTRICT, 1)[0].clone();

    // The manager serves: their name and number, and every line's number.
    let who = eventually("routing to know the account", || {
        let mut routing = routing.clone();
        let account = account.clone();
        async move {
            routing
                .who_serves(WhoServesRequest {
                    account_number: account,
                    ..WhoServesRequest::default()
                })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    assert_eq!(who.district_id, DISTRICT);
    let serving = who.serving.clone().expect("someone serves");
    let manager = who.manager.clone().expect("the district's manager");
    assert_eq!(serving, manager, "the manager serves");
    assert_eq!(serving.role(), AssigneeRole::DistrictManager);
    assert!(serving.phone.starts_with("139-3900-"), "{serving:?}");
    assert!(!serving.name.is_empty());
    assert!(who.reason.is_empty());
    let station = who.station.clone().expect("the station");
    assert!(station.phone.starts_with("0939-52100"), "{station:?}");
    assert_eq!(
        who.company.as_ref().map(|c| c.phone.as_str()),
        Some("0939-5595598")
    );

    // The manager goes on leave: the station's number, and why.
    routing
        .set_availability(SetAvailabilityRequest {
            assignee_id: manager.id.clone(),
            availability: Availability::OnLeave as i32,
            note: "annual leave".into(),
            ..SetAvailabilityRequest::default()
        })
        .await
        .expect("leave");
    let who = routing
        .who_serves(WhoServesRequest {
            district_id: DISTRICT.into(),
            ..WhoServesRequest::default()
        })
        .await
        .expect("who serves")
        .into_inner();
    assert_eq!(who.serving, Some(station.clone()), "the station serves now");
    assert!(who.reason.contains("on leave"), "{}", who.reason);
    assert_eq!(
        who.manager,
        Some(manager),
        "the manager's number is still given"
    );

    // Bad input names its field; an unknown account says so.
    let bad = routing
        .who_serves(WhoServesRequest::default())
        .await
        .expect_err("neither given");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("account_number"), "{bad:?}");
    let unknown = routing
        .who_serves(WhoServesRequest {
            account_number: "0000000000".into(),
            ..WhoServesRequest::default()
        })
        .await
        .expect_err("unknown account");
    assert_eq!(unknown.code(), Code::NotFound);

    // The district's accounts, page by page: exactly the directory's.
    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = routing
            .list_district_accounts(ListDistrictAccountsRequest {
                district_id: DISTRICT.into(),
                page_size: 50,
                page_token,
            })
            .await
            .expect("page")
            .into_inner();
        listed.extend(page.account_numbers);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let csv = std::fs::read_to_string(deploy("demo-accounts.csv")).expect("accounts");
    let mut expected: Vec<String> = csv
        .lines()
        .filter_map(|l| l.strip_suffix(&format!(",{DISTRICT}")))
        .map(str::to_string)
        .collect();
    expected.sort();
    assert!(expected.len() > 50, "more than one page");
    assert_eq!(listed, expected);

    // The printable sheet: a label per account, the numbers on each.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(workspace_binary("ticketctl"))
        .arg("--credentials")
        .arg(&lineguard_harness::test_credentials().path)
        .args([
            "--routing",
            &backend.routing.endpoint(),
            "sheet",
            DISTRICT,
            "--out",
        ])
        .arg(dir.path())
        .output()
        .expect("ticketctl sheet");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut labels = 0;
    for entry in std::fs::read_dir(dir.path()).expect("pages") {
        let page = std::fs::read_to_string(entry.expect("page").path()).expect("read");
        labels += page.matches("class=\"label\"").count();
        assert!(page.contains(&station.phone));
        assert!(page.contains("0939-5595598"));
    }
    assert_eq!(labels, expected.len(), "one label per account");
}
