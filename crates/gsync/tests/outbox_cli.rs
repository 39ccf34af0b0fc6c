//! `gsync` outbox commands, run as a real process on a real file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn gsync(outbox: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gsync"))
        .arg("--outbox")
        .arg(outbox)
        .args(args)
        .env_remove("GSYNC_OUTBOX")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn ok(outbox: &Path, args: &[&str]) -> String {
    let out = gsync(outbox, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(outbox: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(outbox, &all)).unwrap()
}

fn fails(outbox: &Path, args: &[&str], code: i32) -> String {
    let out = gsync(outbox, args);
    assert_eq!(out.status.code(), Some(code), "{args:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
    err
}

#[test]
fn enqueue_status_ops_cancel_check() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    // Read commands never create a file.
    let err = fails(&db, &["status"], 1);
    assert!(err.starts_with("gsync: no outbox at"), "{err}");
    assert_eq!(err.lines().count(), 1);
    let created = json(
        &db,
        &["enqueue", "create", "device", "d1", r#"{"on":true}"#],
    );
    assert!(created["coalesced"].is_null());
    let merged = json(
        &db,
        &["enqueue", "update", "device", "d1", r#"{"on":false}"#],
    );
    assert_eq!(merged["op_id"], created["op_id"]);
    assert_eq!(merged["coalesced"]["how"], "merged_into");
    let upd = ok(
        &db,
        &[
            "enqueue",
            "update",
            "device",
            "d2",
            r#"{"on":1}"#,
            "--base",
            r#"{"on":0}"#,
            "--base-version",
            "4",
        ],
    );
    let d2 = upd.trim().to_owned();
    let status = json(&db, &["status"]);
    assert_eq!(status["pending"], 2);
    assert_eq!(status["failed"], 0);
    assert!(status["lock"].is_null() && status["runner"].is_null());
    let human = ok(&db, &["status", "--metrics"]);
    assert!(human.contains("pending:      2"), "{human}");
    assert!(human.contains("lock:         never taken"), "{human}");
    let ops = json(&db, &["ops"]);
    assert_eq!(ops.as_array().unwrap().len(), 2);
    assert_eq!(ops[0]["coalesced_count"], 1);
    assert_eq!(ops[0]["payload"]["on"], false);
    assert_eq!(ops[1]["base_version"], 4);
    assert_eq!(ops[1]["base"]["on"], 0);
    let table = ok(&db, &["ops", "--state", "pending", "--limit", "10"]);
    assert!(
        table.contains("device/d1") && table.contains("COAL"),
        "{table}"
    );
    assert!(ok(&db, &["ops", "--state", "failed"]).contains("(no ops)"));
    let cancelled = ok(&db, &["cancel", &d2]);
    assert!(cancelled.starts_with("cancelled "), "{cancelled}");
    assert_eq!(json(&db, &["status"])["pending"], 1);
    assert_eq!(ok(&db, &["check"]).trim(), "ok");
    // Not failed: discard and retry refuse, one line, exit 1.
    let id = created["op_id"].as_str().unwrap();
    let err = fails(&db, &["discard", id], 1);
    assert!(err.contains("is pending, this needs it failed"), "{err}");
    assert_eq!(err.lines().count(), 1);
    fails(&db, &["retry", id], 1);
    assert_eq!(json(&db, &["retry", "--all-failed"])["retried"], 0);
}

#[test]
fn bad_input_and_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    // Usage errors exit 2.
    fails(&db, &["enqueue", "upsert", "device", "d1", "{}"], 2);
    fails(&db, &["ops", "--state", "weird"], 2);
    fails(&db, &["retry"], 2);
    fails(&db, &["cancel", "not-a-uuid"], 2);
    // Refused input exits 1 with a clear line and stores nothing.
    let err = fails(&db, &["enqueue", "create", "Device", "d1", "{}"], 1);
    assert!(err.contains("invalid entity type"), "{err}");
    let err = fails(&db, &["enqueue", "create", "device", "d1", "[1]"], 1);
    assert!(err.contains("must be a JSON object"), "{err}");
    let err = fails(&db, &["enqueue", "create", "device", "d1", "{oops"], 1);
    assert!(err.contains("not valid JSON"), "{err}");
    fails(&db, &["enqueue", "delete", "device", "d1", "{}"], 1);
    // Ids that could not route (dot segments) are refused the same way.
    for id in [".", ".."] {
        let err = fails(&db, &["enqueue", "update", "device", id, "{}"], 1);
        assert!(err.contains("invalid entity id"), "{err}");
    }
    assert_eq!(json(&db, &["status"])["pending"], 0);
}

/// `retry` makes a failed op new again (attempts 0, no error), and `ops`
/// takes the state names its JSON prints (`in_flight`), and the older
/// `in-flight` too.
#[test]
fn retry_resets_and_state_names_match_json() {
    use guardian_sync::outbox::{Outbox, OutboxOptions};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    let a = ok(&db, &["enqueue", "create", "device", "a", "{}"]);
    let b = ok(&db, &["enqueue", "create", "device", "b", "{}"]);
    let (a, b) = (a.trim().to_owned(), b.trim().to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (outbox, _) = Outbox::open(&db, OutboxOptions::default()).await.unwrap();
        let fence = outbox.lock_acquire("test", None).await.unwrap().unwrap();
        let now = i64::MAX / 2;
        outbox.fenced(&fence).claim_ready(10, now).await.unwrap();
        outbox
            .fenced(&fence)
            .fail(a.parse().unwrap(), "gave up after 1 attempts: 503")
            .await
            .unwrap();
        outbox.close().await;
    });
    for name in ["in_flight", "in-flight"] {
        let ops = json(&db, &["ops", "--state", name]);
        let ids: Vec<&str> = ops
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["op_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [b.as_str()], "--state {name}");
        assert_eq!(ops[0]["state"], "in_flight");
    }
    let table = ok(&db, &["ops", "--state", "in_flight"]);
    assert!(table.contains(" in_flight "), "{table}");
    ok(&db, &["retry", &a]);
    let ops = json(&db, &["ops", "--state", "pending"]);
    let op = &ops.as_array().unwrap()[0];
    assert_eq!(op["op_id"], a.as_str());
    assert_eq!(op["attempts"], 0);
    assert!(op["last_error"].is_null(), "{op}");
    assert_eq!(op["history"][0]["event"], "retried");
}

/// Issue 15 point 9: ops enqueued while the wall clock was 2 h ahead are
/// shown due now by `status` and `ops`, as a runner will send them, not
/// "in 1h 59m".
#[test]
fn status_and_ops_show_ops_written_under_a_clock_ahead_as_due() {
    use guardian_sync::clock::ManualClock;
    use guardian_sync::op::NewOp;
    use guardian_sync::outbox::{Outbox, OutboxOptions};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ahead = ManualClock::new(now + 7_200_000);
        let (outbox, _) = Outbox::open(&db, OutboxOptions::default().clock(ahead))
            .await
            .unwrap();
        outbox
            .enqueue(NewOp::create("device", "a", serde_json::json!({})))
            .await
            .unwrap();
        outbox.close().await;
    });
    let text = ok(&db, &["status"]);
    assert!(text.contains("next attempt: now"), "{text}");
    let status = json(&db, &["status"]);
    let next = status["next_attempt_at"].as_i64().unwrap();
    assert!(next < now + 60_000, "{status}");
    let table = ok(&db, &["ops"]);
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains(" now ")),
        "{table}"
    );
}
