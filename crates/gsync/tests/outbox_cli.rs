//! `gsync` outbox commands, run as a real process on a real file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// `gsync --outbox <outbox> <args>`, free of this process's settings for
/// it, with no input.
fn command(outbox: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gsync"));
    c.arg("--outbox")
        .arg(outbox)
        .args(args)
        .env_remove("GSYNC_OUTBOX")
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .env("GSYNC_TOKEN", "t")
        .stdin(Stdio::null());
    c
}

fn gsync(outbox: &Path, args: &[&str]) -> Output {
    command(outbox, args).output().unwrap()
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

/// Exit status and stderr; asserts no panic and no colour codes.
fn failed(outbox: &Path, args: &[&str]) -> (i32, String) {
    let out = gsync(outbox, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{args:?}: {err}"
    );
    assert!(!err.contains('\u{1b}'), "{args:?}: colour codes: {err:?}");
    (out.status.code().unwrap_or(-1), err)
}

fn fails(outbox: &Path, args: &[&str], code: i32) -> String {
    let (status, err) = failed(outbox, args);
    assert_eq!(status, code, "{args:?}: {err}");
    err
}

/// A port where nothing listens.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
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
    // Values refused once parsed are usage errors too: exit 2 with a clear
    // line, and nothing is stored.
    let err = fails(&db, &["enqueue", "create", "Device", "d1", "{}"], 2);
    assert!(err.contains("invalid entity type"), "{err}");
    let err = fails(&db, &["enqueue", "create", "device", "d1", "[1]"], 2);
    assert!(err.contains("must be a JSON object"), "{err}");
    let err = fails(&db, &["enqueue", "create", "device", "d1", "{oops"], 2);
    assert!(err.contains("not valid JSON"), "{err}");
    fails(&db, &["enqueue", "delete", "device", "d1", "{}"], 2);
    // Ids that could not route (dot segments) are refused the same way.
    for id in [".", ".."] {
        let err = fails(&db, &["enqueue", "update", "device", id, "{}"], 2);
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

/// Writes `ops` (a JSON array) to a file next to the outbox.
fn txn_file(dir: &Path, name: &str, ops: &Value) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(ops).unwrap()).unwrap();
    path
}

/// Issue 20: `enqueue --txn` stores a file's ops as one transaction, and
/// `ops` shows it (`txn` in JSON, short id and position in the table).
#[test]
fn enqueue_txn_stores_one_transaction_and_ops_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    let file = txn_file(
        dir.path(),
        "scene.json",
        &serde_json::json!([
            {"op": "create", "type": "order", "id": "o1", "data": {"total": 3}},
            {"op": "update", "type": "line", "id": "l1", "data": {"order": "o1"}, "base_version": 2},
            {"op": "delete", "type": "line", "id": "l0"},
        ]),
    );
    let done = json(&db, &["enqueue", "--txn", file.to_str().unwrap()]);
    let txn_id = done["txn_id"].as_str().unwrap().to_owned();
    let op_ids: Vec<&str> = done["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["op_id"].as_str().unwrap())
        .collect();
    assert_eq!(op_ids.len(), 3, "{done}");
    let ops = json(&db, &["ops"]);
    let ops = ops.as_array().unwrap();
    assert_eq!(ops.len(), 3);
    for (op, id) in ops.iter().zip(&op_ids) {
        assert_eq!(op["op_id"], *id);
        assert_eq!(op["txn"]["id"], txn_id.as_str());
        assert_eq!(op["txn"]["size"], 3);
    }
    assert_eq!(ops[1]["base_version"], 2);
    assert_eq!(ops[2]["kind"], "delete");
    let short = &txn_id.replace('-', "")[..8];
    let table = ok(&db, &["ops"]);
    for (i, id) in op_ids.iter().enumerate() {
        let line = table.lines().find(|l| l.contains(id)).unwrap();
        assert!(line.contains(&format!("{short} {}/3", i + 1)), "{table}");
    }
    // A page that cuts the transaction does not guess positions.
    let page = ok(&db, &["ops", "--limit", "2"]);
    assert!(page.contains(&format!("{short} ?/3")), "{page}");
    // Plain output: the transaction id, then the op ids in file order.
    let file = txn_file(
        dir.path(),
        "one.json",
        &serde_json::json!([{"op": "create", "type": "device", "id": "d9", "data": {}}]),
    );
    let text = ok(&db, &["enqueue", "--txn", file.to_str().unwrap()]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("txn "), "{text}");
    assert_eq!(json(&db, &["status"])["pending"], 4);
}

/// A bad `--txn` file is refused whole: one line, exit 2 (1 when it cannot
/// be read), nothing stored.
#[test]
fn enqueue_txn_refuses_a_bad_file_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    let before = ok(&db, &["enqueue", "create", "device", "d0", "{}"]);
    let good = serde_json::json!({"op": "create", "type": "device", "id": "d1", "data": {}});
    let many: Vec<Value> = (0..101)
        .map(|i| serde_json::json!({"op": "create", "type": "device", "id": format!("m{i}"), "data": {}}))
        .collect();
    let bad_json = dir.path().join("bad.json");
    std::fs::write(&bad_json, "[{\"op\": ").unwrap();
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (dir.path().join("missing.json"), "cannot read"),
        (bad_json, "is not valid JSON"),
        (
            txn_file(dir.path(), "obj.json", &good),
            "must hold a JSON array",
        ),
        (
            txn_file(dir.path(), "empty.json", &serde_json::json!([])),
            "holds 0 ops; a transaction has 1 to 100",
        ),
        (
            txn_file(dir.path(), "many.json", &Value::Array(many)),
            "holds 101 ops",
        ),
        (
            txn_file(
                dir.path(),
                "id.json",
                &serde_json::json!([good, {"op": "update", "type": "device", "id": "..", "data": {}}]),
            ),
            "op 2: invalid entity id",
        ),
        (
            txn_file(
                dir.path(),
                "kind.json",
                &serde_json::json!([good, {"op": "upsert", "type": "device", "id": "d2"}]),
            ),
            "op 2 is not a valid op",
        ),
        (
            txn_file(
                dir.path(),
                "payload.json",
                &serde_json::json!([good, {"op": "create", "type": "device", "id": "d2", "data": [1]}]),
            ),
            "must be a JSON object",
        ),
    ];
    for (file, expected) in &cases {
        // A file that cannot be read is a failure; one that says the wrong
        // thing is a usage error, as the same op given as arguments is.
        let code = if *expected == "cannot read" { 1 } else { 2 };
        let err = fails(&db, &["enqueue", "--txn", file.to_str().unwrap()], code);
        assert!(err.contains(expected), "{}: {err}", file.display());
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let ops = json(&db, &["ops"]);
    let ids: Vec<&str> = ops
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["op_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [before.trim()]);
    // A bad file never creates an outbox either.
    let fresh = dir.path().join("fresh.db");
    fails(
        &fresh,
        &["enqueue", "--txn", cases[4].0.to_str().unwrap()],
        2,
    );
    assert!(!fresh.exists());
    // --txn takes no op on the command line (a usage error).
    let one = txn_file(dir.path(), "one.json", &serde_json::json!([good]));
    fails(
        &db,
        &[
            "enqueue",
            "--txn",
            one.to_str().unwrap(),
            "create",
            "device",
            "d3",
            "{}",
        ],
        2,
    );
}

/// `--depends-on` (and `depends_on` in a `--txn` file) are stored and shown.
#[test]
fn depends_on_is_stored_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    let parent = ok(&db, &["enqueue", "create", "folder", "f1", "{}"]);
    let parent = parent.trim();
    let other = ok(&db, &["enqueue", "create", "folder", "f2", "{}"]);
    let other = other.trim();
    let child = json(
        &db,
        &[
            "enqueue",
            "create",
            "note",
            "n1",
            "{}",
            "--depends-on",
            parent,
            "--depends-on",
            other,
        ],
    );
    let file = txn_file(
        dir.path(),
        "t.json",
        &serde_json::json!([
            {"op": "create", "type": "note", "id": "n2", "data": {}, "depends_on": [parent]},
            {"op": "create", "type": "note", "id": "n3", "data": {}},
        ]),
    );
    json(&db, &["enqueue", "--txn", file.to_str().unwrap()]);
    let ops = json(&db, &["ops"]);
    let by_id = |id: &str| {
        ops.as_array()
            .unwrap()
            .iter()
            .find(|o| o["entity_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id("n1")["op_id"], child["op_id"]);
    assert_eq!(
        by_id("n1")["depends_on"],
        serde_json::json!([parent, other])
    );
    assert_eq!(by_id("n2")["depends_on"], serde_json::json!([parent]));
    assert!(by_id("f1").get("depends_on").is_none());
    let table = ok(&db, &["ops"]);
    assert!(
        table.contains(&format!("└ depends on {parent}, {other}")),
        "{table}"
    );
    let err = fails(
        &db,
        &["enqueue", "create", "note", "n4", "{}", "--depends-on", "x"],
        2,
    );
    assert!(err.contains("--depends-on"), "{err}");
}

/// A failed transaction is retried, discarded and cancelled whole from the
/// command line, whichever of its ops is named, and the output says so.
#[test]
fn retry_discard_cancel_act_on_the_whole_transaction() {
    use guardian_sync::outbox::{Outbox, OutboxOptions};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    let lone = ok(&db, &["enqueue", "create", "device", "lone", "{}"]);
    let file = txn_file(
        dir.path(),
        "t.json",
        &serde_json::json!([
            {"op": "create", "type": "device", "id": "a", "data": {}},
            {"op": "create", "type": "device", "id": "b", "data": {}},
            {"op": "create", "type": "device", "id": "c", "data": {}},
        ]),
    );
    let done = json(&db, &["enqueue", "--txn", file.to_str().unwrap()]);
    let txn_id = done["txn_id"].as_str().unwrap().to_owned();
    let ids: Vec<String> = done["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["op_id"].as_str().unwrap().to_owned())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // As a runner does when the server refuses the transaction: all its
    // ops fail in one commit.
    let fail_txn = || {
        rt.block_on(async {
            let (outbox, _) = Outbox::open(&db, OutboxOptions::default()).await.unwrap();
            let fence = outbox.lock_acquire("test", None).await.unwrap().unwrap();
            let claimed = outbox
                .fenced(&fence)
                .claim_ready(10, i64::MAX / 2)
                .await
                .unwrap();
            let failures: Vec<_> = claimed
                .iter()
                .filter(|op| op.txn.is_some())
                .map(|op| (op.op_id, "server answered 422".to_owned()))
                .collect();
            assert_eq!(failures.len(), 3, "{claimed:?}");
            outbox.fenced(&fence).fail_many(failures).await.unwrap();
            let lone = claimed.iter().filter(|op| op.txn.is_none());
            let lone: Vec<_> = lone.map(|op| op.op_id).collect();
            outbox.fenced(&fence).release_claimed(lone).await.unwrap();
            outbox.fenced(&fence).lock_release().await.unwrap();
            outbox.close().await;
        });
    };
    fail_txn();
    assert_eq!(json(&db, &["status"])["failed"], 3);
    assert_eq!(json(&db, &["retry", &ids[1]])["retried"], 3);
    let pending = json(&db, &["ops", "--state", "pending"]);
    assert_eq!(pending.as_array().unwrap().len(), 4, "{pending}");
    fail_txn();
    let text = ok(&db, &["discard", &ids[2]]);
    assert!(
        text.contains(&format!("its transaction {txn_id} (3 ops)")),
        "{text}"
    );
    let ops = json(&db, &["ops"]);
    let left: Vec<&str> = ops
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["op_id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [lone.trim()]);
    let file = txn_file(
        dir.path(),
        "u.json",
        &serde_json::json!([
            {"op": "create", "type": "device", "id": "x", "data": {}},
            {"op": "create", "type": "device", "id": "y", "data": {}},
        ]),
    );
    let done = json(&db, &["enqueue", "--txn", file.to_str().unwrap()]);
    let text = ok(&db, &["cancel", done["ops"][0]["op_id"].as_str().unwrap()]);
    assert!(text.contains("(2 ops)"), "{text}");
    assert_eq!(json(&db, &["status"])["pending"], 1);
}

/// Special files as the outbox: one line, exit 1, nothing created beside
/// them, never a wait (a FIFO opened for reading waits for a writer).
#[test]
fn special_files_as_the_outbox_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for path in [fifo.as_path(), Path::new("/dev/null")] {
        for args in [
            &["status"][..],
            &["check"],
            &["check", "--repair"],
            &["enqueue", "create", "thing", "a", "{}"],
        ] {
            let (code, err) = failed(path, args);
            assert_eq!(code, 1, "{} {args:?}: {err}", path.display());
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(err.contains("not a guardian outbox"), "{err}");
        }
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "files created beside the FIFO");
    assert!(!Path::new("/dev/null-wal").exists());
}

/// `--json` promises one JSON object on stderr for an error; a usage
/// mistake (a bad value, an unknown flag, a number out of range, no
/// command at all) is an error like any other, and without `--json` it is
/// one line.
#[test]
fn usage_errors_are_one_line_and_json_under_json() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    for args in [
        &["ops", "--state", "weird"][..],
        &["ops", "--limit", "-1"],
        &["ops", "--limit", "18446744073709551616"],
        &["status", "--no-such-flag"],
        &[],
    ] {
        let (code, err) = failed(&db, args);
        assert_eq!(code, 2, "{args:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let (code, err) = failed(&db, &with_json);
        assert_eq!(code, 2, "{args:?}");
        let v: Value = serde_json::from_str(err.trim_end())
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {err}"));
        assert_eq!(v["error"]["exit_code"], 2, "{v}");
    }
    assert!(!db.exists(), "a usage error created the outbox");
}

/// `run --batch` at the top of its type must be refused or work; it
/// overflows the runner's claim window and panics (exit 101, a panic
/// message on stderr).
#[test]
fn a_huge_batch_size_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let out = gsync(&db, &["enqueue", "create", "thing", "a", "{}"]);
    assert!(out.status.success());
    let url = dead_url();
    let (code, err) = failed(
        &db,
        &[
            "run",
            "--server",
            &url,
            "--once",
            "--max-wait",
            "1s",
            "--batch",
            "18446744073709551615",
        ],
    );
    assert!(code == 2 || code == 3, "exit {code}: {err}");
    // `run` logs a line per event off a terminal; the error is the last.
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("gsync: "), "{err}");
}

/// Numbers at the edge of what the flags take (`--limit 0`, `--limit`
/// at `u64::MAX`, `--concurrency` at `u64::MAX`): an answer or a one-line
/// error, never a panic.
#[test]
fn edge_numbers_in_flags_are_answered_or_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let out = gsync(&db, &["enqueue", "create", "thing", "a", "{}"]);
    assert!(out.status.success());
    for args in [
        &["ops", "--limit", "0"][..],
        &["ops", "--limit", "18446744073709551615"],
        &["--json", "ops", "--limit", "18446744073709551615"],
    ] {
        let (code, err) = failed(&db, args);
        assert!(code == 0 || code == 1, "{args:?}: exit {code}: {err}");
        if code == 1 {
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
    }
    let url = dead_url();
    let (code, err) = failed(
        &db,
        &[
            "run",
            "--server",
            &url,
            "--once",
            "--max-wait",
            "1s",
            "--concurrency",
            "18446744073709551615",
        ],
    );
    assert_eq!(code, 3, "{err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("gsync: 1 op(s) remain"), "{err}");
}

/// A salvage without room for what it writes (a file size limit stands in
/// for a full disk: the work copy, the fresh file's set-up or its inserts
/// fail) is undone: one line says nothing was changed, the damaged file
/// is back in place byte for byte and nothing else is left. It used to
/// leave an empty or partial outbox in the file's place, which a later
/// repair called "ok". With room, the repair saves every op.
#[test]
fn a_salvage_without_room_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let pad = "a".repeat(2000);
    for i in 0..20 {
        ok(
            &path,
            &[
                "enqueue",
                "create",
                "c",
                &format!("c{i}"),
                &format!("{{\"v\":\"{pad}\"}}"),
            ],
        );
    }
    let damaged = damage_first_byte(&path);
    // KiB: too little for the fresh file's set-up, then room for the work
    // copy but not for every insert.
    for limit in ["64", "200", "400"] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#"trap "" XFSZ; ulimit -f "$1"; exec "$0" --outbox "$2" check --repair"#)
            .arg(env!("CARGO_BIN_EXE_gsync"))
            .arg(limit)
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "limit {limit}: {err}");
        assert_eq!(err.lines().count(), 1, "limit {limit}: {err}");
        assert!(err.contains("nothing was changed"), "limit {limit}: {err}");
        assert!(
            std::fs::read(&path).unwrap() == damaged,
            "limit {limit}: the file changed"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "o.db" && n != "o.db.lock" && n != "o.db.writers")
            .collect();
        assert!(names.is_empty(), "limit {limit}: left {names:?}");
    }
    ok(&path, &["check", "--repair"]);
    assert_eq!(json(&path, &["ops"]).as_array().unwrap().len(), 20);
}

/// Every file in `dir` but the given names.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    names.sort();
    names
}

/// A damaged outbox of `txns` × 100 ops of 1 KiB at `path`; its bytes.
fn damaged_outbox(path: &Path, txns: usize) -> Vec<u8> {
    let dir = path.parent().unwrap();
    let pad = "b".repeat(1000);
    for t in 0..txns {
        let ops: Vec<Value> = (0..100)
            .map(|i| serde_json::json!({"op": "create", "type": "c", "id": format!("c{t}-{i}"), "data": {"v": pad}}))
            .collect();
        let file = txn_file(dir, "ops.json", &Value::Array(ops));
        ok(path, &["enqueue", "--txn", file.to_str().unwrap()]);
        std::fs::remove_file(file).unwrap();
    }
    damage_first_byte(path)
}

/// Checkpoints the outbox at `path` into its file and breaks the file's
/// first byte (SQLite's magic); the damaged bytes.
fn damage_first_byte(path: &Path) -> Vec<u8> {
    rusqlite::Connection::open(path)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let mut damaged = std::fs::read(path).unwrap();
    damaged[0] = b'X';
    std::fs::write(path, &damaged).unwrap();
    damaged
}

/// A `gsync run` on `path` against a port where nothing listens (so it
/// keeps the outbox open, retrying), returned once it holds the lock.
fn holding_runner(path: &Path) -> std::process::Child {
    use std::io::BufRead;
    let mut runner = command(path, &["run", "--server", &dead_url(), "--token", "t"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = runner.stderr.take().unwrap();
    let (locked_tx, locked) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("lock") && line.contains("acquired") {
                let _ = locked_tx.send(());
            }
        }
    });
    locked
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the runner took the lock");
    runner
}

/// `status` says when the lock's holder has exited without releasing it
/// (killed, or its release failed): the row alone read like a live runner
/// until the stale threshold, though the next runner takes over at once.
#[test]
fn status_says_when_the_lock_holder_has_exited() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    ok(&path, &["enqueue", "create", "c", "a", "{}"]);
    let mut runner = holding_runner(&path);
    let live = ok(&path, &["status"]);
    assert!(
        live.contains("held by") && !live.contains("exited"),
        "{live}"
    );
    assert_eq!(json(&path, &["status"])["lock"]["holder_alive"], true);
    runner.kill().unwrap();
    runner.wait().unwrap();
    let gone = ok(&path, &["status"]);
    assert!(
        gone.contains("its process has exited (nothing holds its lock file)"),
        "{gone}"
    );
    assert_eq!(json(&path, &["status"])["lock"]["holder_alive"], false);
}

/// A salvage is refused while another process has the outbox open, even
/// after someone removed the writers' lock file under it, or before that
/// process locked anything: a repair used to lock a fresh lock file, move
/// the file from under a running `gsync run`, and that runner's next
/// writes went to the moved file (an op was lost).
#[test]
fn a_salvage_never_moves_a_file_open_in_another_process_without_its_lock_file() {
    use std::io::{Seek, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    for i in 0..20 {
        ok(&path, &["enqueue", "create", "c", &format!("c{i}"), "{}"]);
    }
    // The header into the file, so that the byte broken below is its
    // first: left in the WAL, the file could still be empty then.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let mut runner = holding_runner(&path);

    std::fs::remove_file(dir.path().join("o.db.writers")).unwrap();
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(std::io::SeekFrom::Start(0)).unwrap();
    file.write_all(b"X").unwrap();
    drop(file);
    let damaged = std::fs::read(&path).unwrap();
    assert!(
        damaged.len() >= 4096,
        "a whole page, not {} bytes",
        damaged.len()
    );
    let refused_unchanged = || {
        let err = fails(&path, &["check", "--repair"], 1);
        assert!(err.contains("open elsewhere"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            damaged,
            "the file was changed"
        );
    };
    refused_unchanged();
    let moved = others(
        dir.path(),
        &["o.db", "o.db-wal", "o.db-shm", "o.db.lock", "o.db.writers"],
    );
    assert!(moved.is_empty(), "{moved:?}");
    runner.kill().unwrap();
    runner.wait().unwrap();

    // A process with the file open but no lock on it yet (here `sleep`
    // reading it as its input; SQLite locks only at the first statement).
    let mut holder = Command::new("sleep")
        .arg("60")
        .stdin(std::fs::File::open(&path).unwrap())
        .spawn()
        .unwrap();
    refused_unchanged();
    holder.kill().unwrap();
    holder.wait().unwrap();
    ok(&path, &["check", "--repair"]);
    assert_eq!(json(&path, &["ops"]).as_array().unwrap().len(), 20);
}

/// What is not a regular file where SQLite opens a side file of the
/// outbox (a FIFO, a directory, a link) refuses every open at once, in one
/// line that names it, and is left alone. With a FIFO at `-journal` an
/// open used to wait on it for good (whenever the file's first page was
/// still only in the log, SQLite read the schema to identify it).
#[test]
fn an_odd_side_file_is_refused_at_once_and_left_alone() {
    let logs = tempfile::tempdir().unwrap();
    for (suffix, kind) in [
        ("-journal", "a FIFO"),
        ("-wal", "a directory"),
        ("-shm", "a symbolic link"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        ok(&path, &["enqueue", "create", "c", "a", "{}"]);
        let side = dir.path().join(format!("o.db{suffix}"));
        // A clean close may keep its (empty) log and shared memory.
        let _ = std::fs::remove_file(&side);
        match kind {
            "a FIFO" => assert!(Command::new("mkfifo")
                .arg(&side)
                .status()
                .unwrap()
                .success()),
            "a directory" => std::fs::create_dir(&side).unwrap(),
            _ => std::os::unix::fs::symlink("elsewhere", &side).unwrap(),
        }
        for args in [
            &["enqueue", "create", "c", "b", "{}"][..],
            &["check", "--repair"],
            &["status"],
        ] {
            let log = logs.path().join("stderr");
            let mut child = command(&path, args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let pid = child.id();
            let (exited_tx, exited) = std::sync::mpsc::channel();
            std::thread::spawn(move || exited_tx.send(child.wait().unwrap()).unwrap());
            let Ok(status) = exited.recv_timeout(std::time::Duration::from_secs(30)) else {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("{suffix}: {args:?} waited on {kind}");
            };
            let err = std::fs::read_to_string(&log).unwrap();
            assert_eq!(status.code(), Some(1), "{suffix}: {args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains(&format!("o.db{suffix} is {kind}")) && err.contains("move it away"),
                "{err}"
            );
        }
        let t = std::fs::symlink_metadata(&side).unwrap().file_type();
        assert!(!t.is_file(), "{suffix}: replaced by a file");
        let moved = others(
            dir.path(),
            &[
                "o.db",
                "o.db.writers",
                "o.db-wal",
                "o.db-shm",
                "o.db-journal",
            ],
        );
        assert!(moved.is_empty(), "{suffix}: {moved:?}");
    }
}

/// An outbox file with a second name (a hard link) is refused by every
/// command, read-only ones too, and no lock file is made beside the other
/// name. A read through a link made during a salvage used to list the
/// half-filled fresh file as the whole outbox: the salvage's record is
/// named after the first name.
#[test]
fn a_hard_linked_outbox_is_refused_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    ok(&path, &["enqueue", "create", "c", "a", "{}"]);
    let hard = dir.path().join("hard.db");
    std::fs::hard_link(&path, &hard).unwrap();
    for name in [&hard, &path] {
        for args in [
            &["status"][..],
            &["ops"],
            &["check"],
            &["enqueue", "create", "c", "b", "{}"],
        ] {
            let err = fails(name, args, 1);
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.contains("has 2 hard links"), "{args:?}: {err}");
        }
    }
    assert!(!dir.path().join("hard.db.writers").exists());
    std::fs::remove_file(&hard).unwrap();
    assert_eq!(json(&path, &["ops"]).as_array().unwrap().len(), 1);
}

/// A salvage killed (SIGKILL) at any point leaves nothing a later open
/// takes for the outbox: a read-only command says the salvage was
/// interrupted, and the next repair puts the damaged file back and saves
/// every op. It used to leave the fresh file, partly filled, in the
/// outbox's place, and the next repair called it sound.
#[test]
fn a_salvage_killed_at_any_point_loses_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let damaged = damaged_outbox(&path, 15);
    // An uninterrupted repair's length, to spread the kills over it.
    let probe = tempfile::tempdir().unwrap();
    let probe_path = probe.path().join("o.db");
    std::fs::write(&probe_path, &damaged).unwrap();
    let started = std::time::Instant::now();
    ok(&probe_path, &["check", "--repair"]);
    let whole = started.elapsed();
    assert_eq!(
        json(&probe_path, &["ops", "--limit", "5000"])
            .as_array()
            .unwrap()
            .len(),
        1500
    );
    let mut interrupted = 0;
    for k in 1..=12u32 {
        for name in others(dir.path(), &[]) {
            std::fs::remove_file(dir.path().join(name)).unwrap();
        }
        std::fs::write(&path, &damaged).unwrap();
        let mut child = command(&path, &["check", "--repair"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole * k / 13);
        let _ = child.kill();
        child.wait().unwrap();
        let read = gsync(&path, &["--json", "ops", "--limit", "5000"]);
        let err = String::from_utf8_lossy(&read.stderr);
        if read.status.success() {
            let ops: Value = serde_json::from_slice(&read.stdout).unwrap();
            assert_eq!(
                ops.as_array().unwrap().len(),
                1500,
                "kill {k}: a partial outbox"
            );
        } else if err.contains("interrupted") {
            interrupted += 1;
        } else {
            assert!(err.contains("damaged"), "kill {k}: {err}");
        }
        ok(&path, &["check", "--repair"]);
        assert_eq!(
            json(&path, &["ops", "--limit", "5000"])
                .as_array()
                .unwrap()
                .len(),
            1500,
            "kill {k}"
        );
        let left = others(dir.path(), &["o.db", "o.db.lock", "o.db.writers"]);
        assert!(
            left.len() == 1 && left[0].starts_with("o.db.corrupt-"),
            "kill {k}: {left:?}"
        );
    }
    eprintln!("{interrupted} of 12 kills interrupted a salvage");
    assert!(interrupted > 0, "no kill landed inside a salvage");
}

/// A file at the salvage record's name that is not one (a text file, a
/// directory) is never touched: an intact outbox opens and reads as usual,
/// and a damaged one is not salvaged (one line says why; nothing changed).
#[test]
fn a_foreign_file_at_the_salvage_record_name_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let record = dir.path().join("o.db.salvaging");
    ok(&path, &["enqueue", "create", "c", "c1", "{}"]);
    std::fs::write(&record, b"mine\n").unwrap();
    ok(&path, &["enqueue", "create", "c", "c2", "{}"]);
    assert_eq!(json(&path, &["ops"]).as_array().unwrap().len(), 2);
    ok(&path, &["check", "--repair"]);
    assert_eq!(std::fs::read(&record).unwrap(), b"mine\n");
    std::fs::remove_file(&record).unwrap();
    std::fs::create_dir(&record).unwrap();
    std::fs::write(record.join("keep"), b"mine").unwrap();
    let damaged = damage_first_byte(&path);
    let err = fails(&path, &["check", "--repair"], 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(std::fs::read(&path).unwrap() == damaged);
    assert_eq!(
        std::fs::read(dir.path().join("o.db.salvaging/keep")).unwrap(),
        b"mine"
    );
    assert_eq!(
        others(
            dir.path(),
            &["o.db", "o.db.lock", "o.db.writers", "o.db.salvaging"]
        ),
        Vec::<String>::new()
    );
}

/// What sits at the record's name cannot hang or steer an open: a FIFO is
/// not read (it used to block every command for good), and a hand-written
/// record naming a file that is not a moved outbox moves nothing.
#[test]
fn a_fifo_or_a_planted_record_cannot_hang_or_steer_an_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let record = dir.path().join("o.db.salvaging");
    ok(&path, &["enqueue", "create", "c", "c1", "{}"]);
    nix::unistd::mkfifo(&record, nix::sys::stat::Mode::S_IRWXU).unwrap();
    ok(&path, &["enqueue", "create", "c", "c2", "{}"]);
    assert_eq!(json(&path, &["ops"]).as_array().unwrap().len(), 2);
    std::fs::remove_file(&record).unwrap();
    let planted = dir.path().join("o.db.corrupt-123");
    std::fs::write(&planted, b"not an outbox").unwrap();
    std::fs::write(
        &record,
        b"guardian-sync salvage 1\naside o.db.corrupt-123\nfresh 1\n",
    )
    .unwrap();
    let before = std::fs::read(&path).unwrap();
    for args in [&["enqueue", "create", "c", "c3", "{}"][..], &["ops"][..]] {
        let err = fails(&path, args, 1);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("not a moved outbox file"), "{args:?}: {err}");
    }
    assert!(std::fs::read(&path).unwrap() == before);
    assert_eq!(std::fs::read(&planted).unwrap(), b"not an outbox");
}

/// A tmpfs of `size` mounted at `at`, unmounted when dropped.
struct Mounted(std::path::PathBuf);

impl Mounted {
    /// None where this process may not mount (not root, a container).
    fn tmpfs(at: &Path, size: &str) -> Option<Self> {
        let done = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .ok()?;
        done.success().then(|| Self(at.to_path_buf()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// On a full disk SQLite's own words ("disk I/O error … xShmMap", left by
/// an earlier failed open's 3-byte shared-memory file) do not say what is
/// wrong: every outbox command's error line adds that the disk is full.
/// Needs a file system to fill: a 1 MiB tmpfs, where mounting is allowed.
#[test]
fn errors_on_a_full_disk_say_the_disk_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_mounted) = Mounted::tmpfs(dir.path(), "1m") else {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    };
    let path = dir.path().join("o.db");
    for i in 0..5 {
        ok(&path, &["enqueue", "create", "c", &format!("c{i}"), "{}"]);
    }
    let fill_path = dir.path().join("fill");
    {
        use std::io::Write;
        let mut fill = std::fs::File::create(&fill_path).unwrap();
        let block = vec![0u8; 1024];
        while fill.write_all(&block).is_ok() {}
    }
    let err = fails(&path, &["enqueue", "create", "c", "full", "{}"], 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    // "is full" or, with room back by the time it is measured (the failed
    // write's log removed), "was full when it was written".
    assert!(
        err.contains("full") && err.contains("free some space and try again"),
        "{err}"
    );
    // Whether a read fails depends on what the failed open left behind
    // (SQLite's 3-byte shared-memory file): if it fails, it says why.
    let mut hinted = 0;
    for args in [&["status"][..], &["ops"][..]] {
        let (code, err) = failed(&path, args);
        if code != 0 {
            assert_eq!(code, 1, "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.contains("is full: free some space"), "{args:?}: {err}");
            hinted += 1;
        }
    }
    eprintln!("{hinted} of 2 reads failed on the full disk, each with the hint");
    std::fs::remove_file(&fill_path).unwrap();
    assert_eq!(json(&path, &["ops"]).as_array().unwrap().len(), 5);
}

/// Through a symlink, a repair salvages the file the link leads to and
/// keeps the link: it used to move the link aside and leave a regular
/// file in its place, the damaged outbox still where the link had led.
#[test]
fn a_salvage_through_a_symlink_salvages_the_file_and_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("o.db");
    let link = dir.path().join("a.db");
    damaged_outbox(&real, 2);
    std::os::unix::fs::symlink("o.db", &link).unwrap();
    ok(&link, &["check", "--repair"]);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        json(&real, &["ops", "--limit", "500"])
            .as_array()
            .unwrap()
            .len(),
        200
    );
    let moved = others(dir.path(), &["o.db", "a.db", "o.db.lock", "o.db.writers"]);
    assert!(
        moved.len() == 1 && moved[0].starts_with("o.db.corrupt-"),
        "{moved:?}"
    );
}
