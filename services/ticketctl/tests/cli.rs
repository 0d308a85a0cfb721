//! The CLI's surface: `--help` on every command, `--json` everywhere, and a
//! clear error (exit 2) for bad input, before any service is called.

use std::process::Command;

fn ticketctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ticketctl"))
        .args(args)
        // Nothing listens here: a command that got as far as calling a
        // service would fail to connect, not hang.
        .args(["--intake", "http://127.0.0.1:9"])
        .output()
        .expect("run ticketctl")
}

#[test]
fn every_command_has_help_and_json() {
    for path in [
        vec![],
        vec!["replay"],
        vec!["replay", "ticket"],
        vec!["replay", "incident"],
        vec!["tail"],
        vec!["rebuild"],
        vec!["verify"],
        vec!["timeline"],
        vec!["timeline", "incident"],
        vec!["timeline", "ticket"],
        vec!["simulate"],
        vec!["simulate", "storm"],
    ] {
        let mut args = path.clone();
        args.push("--help");
        let out = ticketctl(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{path:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("--json"), "{path:?} lists --json:\n{text}");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = ticketctl(&["replay", "ticket", "t-1", "--as-of", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid instant") || err.contains("intake"),
        "{err}"
    );
    let out = ticketctl(&["rebuild", "everything"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown service everything"));
    let out = ticketctl(&["tail", "--service", "billing"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--service billing"));
}
