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
        "transactions_half_applied",
        "transactions_unapplied",
        "left_in_outboxes",
        "failed",
    ] {
        assert_eq!(v[key], 0, "{key}\n{ctx}");
    }
    // Every action was enqueued, a scene as 3 to 5 ops: more ops than
    // actions.
    assert!(v["ops_enqueued"].as_u64().unwrap() > 80, "{ctx}");
    // Scenes ran, and the applied log shows each of them whole.
    assert!(v["transactions"].as_u64().unwrap() > 0, "{ctx}");
    assert_eq!(v["transactions_whole"], v["transactions"], "{ctx}");
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

/// Found while building the demo's shared-entity scenario (issue 7): an
/// update chained on a predecessor that was merged on a conflict is sent
/// with the predecessor's acknowledged version as `If-Match` but with its
/// own payload, which was made from the device's pre-merge view; the server
/// accepts it and the remote field the merge had kept is overwritten.
///
/// Device view {a:0,b:0} at v1. Another writer sets b=1 (v2). The device
/// enqueues A = {a:1,b:0} (base v1), A's first send fails (503), then the
/// device enqueues B = {a:2,b:0} (chained: A was attempted, so no
/// coalescing). A → 409 → merged {a:1,b:1} → applied v3; B gets If-Match 3,
/// base {a:1,b:1} and is applied as {a:2,b:0}: b=1 is lost.
#[test]
fn chained_update_after_a_merged_conflict_keeps_remote_fields() {
    use std::sync::Arc;

    use guardian_protocol::MutationKind;
    use guardian_server::{Faults, RetryAfter, RetryAfterForm, ServerBuilder};
    use guardian_sync::engine::SyncEngine;
    use guardian_sync::op::NewOp;
    use guardian_sync::outbox::{Outbox, OutboxOptions};
    use guardian_sync::retry::RetryPolicy;
    use guardian_sync::transport::{
        Fetched, HttpTransport, HttpTransportConfig, OpRequest, Outcome, StaticToken, Transport,
    };
    use serde_json::json;
    use std::time::Duration;

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerBuilder::new()
            .token("t", "tok")
            .bind("127.0.0.1:0")
            .await
            .unwrap();
        let http = HttpTransport::new(
            &HttpTransportConfig::new(server.url()),
            Arc::new(StaticToken::new("tok")),
        )
        .unwrap();
        let send = |kind, key: &str, data: serde_json::Value, if_match| {
            OpRequest::new(kind, "board", "b1", data, if_match, key)
        };
        let r = http
            .send(&send(
                MutationKind::Create,
                "k1",
                json!({"a": 0, "b": 0}),
                None,
            ))
            .await;
        assert!(matches!(r, Outcome::Applied { .. }), "{r:?}");
        let r = http
            .send(&send(
                MutationKind::Update,
                "k2",
                json!({"a": 0, "b": 1}),
                Some(1),
            ))
            .await;
        assert!(matches!(r, Outcome::Applied { .. }), "{r:?}");

        let (outbox, _) = Outbox::open(dir.path().join("o.db"), OutboxOptions::default())
            .await
            .unwrap();
        let engine = SyncEngine::builder()
            .outbox(outbox.clone())
            .server(server.url())
            .token_provider(Arc::new(StaticToken::new("tok")))
            .retry(
                RetryPolicy::new(
                    Duration::from_millis(10),
                    2.0,
                    Duration::from_millis(20),
                    20,
                    Duration::from_secs(1),
                )
                .unwrap(),
            )
            .build()
            .await
            .unwrap();
        engine
            .enqueue(
                NewOp::update("board", "b1", json!({"a": 1, "b": 0}))
                    .with_base(json!({"a": 0, "b": 0}), 1),
            )
            .await
            .unwrap();
        // The first send fails with a 503 whose Retry-After (1 s) keeps the
        // op pending past this drain, so the next update chains on it (a
        // jittered backoff alone may expire within the drain on a slow
        // machine, and the op would be applied before the update exists).
        server
            .set_faults(Faults {
                fail_next: 1,
                retry_after: Some(RetryAfter {
                    seconds: 1,
                    form: RetryAfterForm::Seconds,
                }),
                ..Faults::default()
            })
            .unwrap();
        engine.drain_once().await.unwrap();
        let stats = outbox.stats().await.unwrap();
        assert_eq!(
            (stats.pending, stats.in_flight),
            (1, 0),
            "the first update must still be queued"
        );
        engine
            .enqueue(NewOp::update("board", "b1", json!({"a": 2, "b": 0})))
            .await
            .unwrap();
        engine.run_until_empty().await.unwrap();
        let Ok(Fetched::Present(e)) = http.fetch("board", "b1").await else {
            panic!("board missing");
        };
        assert_eq!(
            e.data,
            json!({"a": 2, "b": 1}),
            "the other writer's b=1 was overwritten"
        );
    });
}

/// `demo --dashboard` prints the dashboard's URL at once and the page's
/// data lists the demo's runners while the demo runs.
#[test]
fn the_dashboard_serves_the_demos_devices() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let mut child = Command::new(env!("CARGO_BIN_EXE_gsync"))
        .args([
            "demo",
            "--dashboard",
            "--devices",
            "2",
            "--ops",
            "40",
            "--seed",
            "3",
        ])
        .env_remove("GSYNC_OUTBOX")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gsync demo runs");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut url = None;
    let mut seen = String::new();
    for _ in 0..20 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if let Some(u) = line.trim().strip_prefix("dashboard: ") {
            url = Some(u.to_owned());
            break;
        }
    }
    let url = url.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("no dashboard URL on stderr:\n{seen}")
    });
    // Keep draining stderr so the demo never blocks on a full pipe.
    let drain = std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let (base, token) = url.split_once("/dashboard?token=").expect("URL shape");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Value::Null;
    let runners = loop {
        // The server may be in its offline window: errors are retried.
        let got = rt.block_on(async {
            let r = http
                .get(format!("{base}/dashboard/state"))
                .bearer_auth(token)
                .send()
                .await
                .ok()?;
            r.json::<Value>().await.ok()
        });
        if let Some(v) = got {
            let n = v["devices"].as_array().map_or(0, Vec::len);
            last = v;
            if n >= 2 {
                break n;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the dashboard never listed the demo's runners: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(runners >= 2);
    assert!(last["devices"][0]["tenant"] == "demo", "{last}");
    let status = child.wait().unwrap();
    let _ = drain.join();
    assert!(status.success(), "demo failed: {status}");
}
