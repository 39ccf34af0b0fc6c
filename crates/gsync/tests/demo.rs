//! `gsync demo` end to end: the real binary, its in-process server with
//! faults and an outage, runner child processes (one SIGKILLed and taken
//! over), and the verdict against the model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use serde_json::Value;

fn demo(args: &[&str]) -> (std::process::ExitStatus, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gsync"))
        .args(["--json", "demo"])
        .args(args)
        .env_remove("GSYNC_OUTBOX")
        .output()
        .expect("gsync demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON verdict on stdout:\n{stdout}\nstderr:\n{stderr}"));
    let json: Value = serde_json::from_str(line).expect("the verdict is JSON");
    (out.status, json["verdict"].clone(), stderr)
}

#[test]
fn demo_passes_its_invariants_under_chaos() {
    let (status, v, stderr) = demo(&["--devices", "2", "--ops", "40", "--seed", "7"]);
    let ctx = format!("verdict: {v:#}\nstderr:\n{stderr}");
    assert!(status.success(), "exit status {status}\n{ctx}");
    assert_eq!(v["passed"], true, "{ctx}");
    for key in [
        "lost",
        "duplicated",
        "unexpected",
        "order_violations",
        "state_mismatches",
        "left_in_outboxes",
        "failed",
    ] {
        assert_eq!(v[key], 0, "{key}\n{ctx}");
    }
    assert_eq!(v["ops_enqueued"], 80, "{ctx}");
    // The chaos really happened: an outage, a killed runner taken over,
    // and the server applied every op the model expects.
    assert!(v["offline_ms"].as_u64().unwrap() > 0, "{ctx}");
    assert_eq!(v["runners_killed"], 1, "{ctx}");
    assert_eq!(v["takeovers"], 1, "{ctx}");
    assert_eq!(v["applied_on_server"], v["ops_expected"], "{ctx}");
    assert!(v["entities_checked"].as_u64().unwrap() > 0, "{ctx}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{ctx}");
}

#[test]
fn bad_options_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_gsync"))
        .args(["demo", "--fault-rate", "0.9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fault-rate"));
}
