//! `ticketctl status` against the four services as processes: all
//! healthy, every consumer listed with its lag, a crew's phone counted as
//! connected; a service killed -9 makes it say so and exit 1.

mod common;

use std::time::Duration;

use common::*;

/// `ticketctl --json status`: its exit code and its answer.
fn status(endpoints: &lineguard_ticketctl::endpoints::Endpoints) -> (i32, serde_json::Value) {
    let out = ticketctl(endpoints, &["--json", "status"]);
    let answer = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), answer)
}

fn service<'a>(answer: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    answer["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["service"] == name))
        .unwrap_or_else(|| panic!("{name} in {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_every_service_and_exits_non_zero_when_one_is_down() {
    let mut backend = Backend::start_all(&[]).await;
    let endpoints = endpoints(&backend);

    // A crew's phone watches its orders.
    let _watch = backend.watch_crew(CREW).await;
    // Healthy once every consumer exists on JetStream (a consumer is made
    // when its source's stream is; until then status says its lag is
    // unknown, which is a problem only if it lasts).
    let (code, answer) = eventually("status to say healthy", || {
        let endpoints = endpoints.clone();
        async move {
            let (code, answer) = status(&endpoints);
            (code == 0).then_some((code, answer))
        }
    })
    .await;
    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["healthy"], true, "{answer}");
    for name in ["intake", "routing", "dispatch", "feedback"] {
        let s = service(&answer, name);
        assert_eq!(s["health"], "SERVING", "{s}");
        assert_eq!(s["bus"], "SERVING", "{s}");
        assert!(s["head_position"].as_u64().is_some(), "{s}");
        let consumers = s["consumers"].as_array().expect("consumers");
        assert!(!consumers.is_empty(), "{name} has consumers: {s}");
        for c in consumers {
            assert_eq!(c["caught_up"], true, "{c}");
            assert_eq!(c["bus_error"], "", "{c}");
            assert_eq!(c["dead_letters"], 0, "{c}");
        }
    }
    let routing = service(&answer, "routing");
    assert!(
        routing["head_position"].as_u64().is_some_and(|h| h > 0),
        "the directory is in routing's log: {routing}"
    );
    let from_intake = routing["consumers"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["consumer"] == "routing-from-intake"))
        .expect("routing's consumer of intake");
    assert_eq!(from_intake["stream"], "LINEGUARD_INTAKE");
    let dispatch = service(&answer, "dispatch");
    assert_eq!(dispatch["crews_connected"], 1, "{dispatch}");
    assert_eq!(dispatch["watches"], 1, "{dispatch}");

    // The text form says the same.
    let text = ticketctl(&endpoints, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    eprintln!("{text}");
    assert!(text.contains("routing-from-intake"), "{text}");
    assert!(text.contains("crews connected 1"), "{text}");
    assert!(text.trim_end().ends_with("healthy"), "{text}");

    // Routing dies: status says so, and exits 1, within its deadlines.
    backend.routing.kill9().expect("kill routing");
    let started = std::time::Instant::now();
    let (code, answer) = status(&endpoints);
    assert_eq!(code, 1, "{answer}");
    assert_eq!(answer["healthy"], false);
    assert_eq!(service(&answer, "routing")["health"], "UNREACHABLE");
    assert_eq!(service(&answer, "intake")["health"], "SERVING");
    let problems = answer["problems"].to_string();
    assert!(problems.contains("routing: UNREACHABLE"), "{problems}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "status answered in {:?}",
        started.elapsed()
    );
}
