//! A careless app on the C ABI: settings at the edge of their types
//! (`u64::MAX` milliseconds, factors near `f64::MAX`), outbox paths that are
//! not outboxes, and op JSON with extreme numbers and nesting. Every call
//! runs under a bound, so a hang fails the test instead of stalling it, and
//! a panic caught at the boundary (`GS_STATUS_PANIC`) is a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::undocumented_unsafe_blocks,
    clippy::multiple_unsafe_ops_per_block
)]

mod common;

use std::ffi::CString;
use std::path::Path;
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use guardian_sync_ffi::{
    gs_engine_enqueue, gs_engine_next_event, gs_engine_open, gs_engine_ops, gs_engine_start,
    gs_engine_status, gs_engine_stop, GsStatus,
};
use serde_json::{json, Value};

use common::{bounded, close, dead_url, last_error, take, H};

/// Opens with `config`; the status and the handle (NULL unless OK).
fn try_open(config: &str) -> (GsStatus, H, Option<String>) {
    let c = CString::new(config).unwrap();
    let mut e = null_mut();
    let st = unsafe { gs_engine_open(c.as_ptr(), &mut e) };
    (st, H(e), last_error())
}

/// Every setting that takes a duration or a count, at the top of its type:
/// open accepts it or refuses it with a message, and an engine that opened
/// enqueues, runs against a dead server (scheduling a retry with those
/// settings), reports its status, stops and closes, without a panic.
#[test]
fn settings_at_the_edge_of_their_types_never_panic() {
    let max = u64::MAX;
    let cases: Vec<(&str, Value)> = vec![
        (
            "retry at u64::MAX",
            json!({"retry": {"base_ms": max, "cap_ms": max, "max_retry_after_ms": max}}),
        ),
        (
            "retry factor near f64::MAX",
            json!({"retry": {"base_ms": 1, "factor": 1.0e308, "cap_ms": max}}),
        ),
        (
            "max attempts at u32::MAX",
            json!({"retry": {"max_attempts": u32::MAX}}),
        ),
        (
            "breaker at u64::MAX",
            json!({"breaker": {"failure_threshold": 1, "window_ms": max, "cooldown_ms": max, "trial_wait_ms": max}}),
        ),
        (
            "breaker threshold 0",
            json!({"breaker": {"failure_threshold": 0}}),
        ),
        (
            "timeouts at u64::MAX",
            json!({"connect_timeout_ms": max, "request_timeout_ms": max}),
        ),
        (
            "timeouts 0",
            json!({"connect_timeout_ms": 0, "request_timeout_ms": 0}),
        ),
        ("stall at u64::MAX", json!({"stall_after_ms": max})),
        ("stall 0", json!({"stall_after_ms": 0})),
        (
            "lock at u64::MAX",
            json!({"lock": {"heartbeat_interval_ms": max - 1, "stale_after_ms": max}}),
        ),
        (
            "lock 0",
            json!({"lock": {"heartbeat_interval_ms": 0, "stale_after_ms": 0}}),
        ),
        (
            "batch bytes at usize::MAX",
            json!({"batch": {"max_bytes": usize::MAX}}),
        ),
        ("batch 0", json!({"batch": {"max_ops": 0, "max_bytes": 0}})),
        (
            "concurrency at usize::MAX",
            json!({"concurrency": usize::MAX}),
        ),
        ("worker threads 0", json!({"worker_threads": 0})),
    ];
    let url = dead_url();
    // Each case on a thread of its own: a case waits up to 2 s for events.
    let threads: Vec<_> = cases
        .into_iter()
        .map(|(name, extra)| {
            let url = url.clone();
            std::thread::spawn(move || edge_case(name, &extra, &url))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn edge_case(name: &'static str, extra: &Value, url: &str) {
    {
        let dir = tempfile::tempdir().unwrap();
        let mut config = json!({
            "outbox_path": dir.path().join("o.db"),
            "server_url": url,
            "token": "t",
            "synchronous": "off",
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        let text = config.to_string();
        let (st, h, msg) = bounded(name, Duration::from_secs(10), move || try_open(&text));
        assert_ne!(st, GsStatus::Panic, "{name}: {msg:?}");
        if st != GsStatus::Ok {
            assert!(h.0.is_null(), "{name}");
            assert!(msg.is_some_and(|m| !m.is_empty()), "{name}: no message");
            return;
        }
        let what = name.to_owned();
        let statuses = bounded(name, Duration::from_secs(30), move || {
            let op = CString::new(
                json!({"kind": "create", "entity_type": "note", "entity_id": "n1",
                       "payload": {"t": 1}})
                .to_string(),
            )
            .unwrap();
            let mut id = null_mut();
            let enq = unsafe { gs_engine_enqueue(h.p(), op.as_ptr(), &mut id) };
            if enq == GsStatus::Ok {
                take(id);
            }
            let start = unsafe { gs_engine_start(h.p()) };
            // Events until the send failed: the retry is scheduled with the
            // extreme settings. The deadline only bounds a runner that never
            // sends (the call's own bound is longer); the loop ends at the event.
            let until = Instant::now() + Duration::from_secs(20);
            let mut events = Vec::new();
            while Instant::now() < until {
                let mut ev = null_mut();
                let st = unsafe { gs_engine_next_event(h.p(), 100, &mut ev) };
                if st == GsStatus::Ok {
                    let e: Value = serde_json::from_str(&take(ev)).unwrap();
                    let done = e["event"] == "op_retried" || e["event"] == "op_failed";
                    events.push(e);
                    if done {
                        break;
                    }
                } else if st != GsStatus::Timeout {
                    events.push(json!({"status": format!("{st:?}")}));
                    break;
                }
            }
            let mut s = null_mut();
            let status = unsafe { gs_engine_status(h.p(), &mut s) };
            if status == GsStatus::Ok {
                take(s);
            }
            let mut o = null_mut();
            let ops = unsafe { gs_engine_ops(h.p(), std::ptr::null(), &mut o) };
            let listed: Value = if ops == GsStatus::Ok {
                serde_json::from_str(&take(o)).unwrap()
            } else {
                Value::Null
            };
            let stop = unsafe { gs_engine_stop(h.p(), 2000) };
            (enq, start, status, ops, stop, events, listed, what)
        });
        let (enq, start, status, ops, stop, events, listed, what) = statuses;
        for (call, st) in [
            ("enqueue", enq),
            ("start", start),
            ("status", status),
            ("ops", ops),
            ("stop", stop),
        ] {
            assert_ne!(st, GsStatus::Panic, "{what}: {call}");
        }
        assert_eq!(enq, GsStatus::Ok, "{what}");
        assert!(
            !events.iter().any(|e| e.get("status").is_some()),
            "{what}: {events:?}"
        );
        // The runner is alive: its failed send was scheduled for a retry.
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "op_retried" || e["event"] == "op_failed"),
            "{what}: the runner sent nothing: {events:?}"
        );
        // The op is kept (pending or failed), never lost.
        assert_eq!(listed.as_array().map(Vec::len), Some(1), "{what}: {listed}");
        close(h);
    }
}

/// A batch size the configuration accepts (`max_ops` at `usize::MAX`)
/// must either be refused at open or work: it overflows the runner's
/// claim window (`max_units * per_unit + ahead`), the runner's task panics
/// (debug builds; release builds wrap), and the op is never sent while
/// every call still answers OK.
#[test]
fn a_huge_batch_size_is_refused_or_works() {
    edge_case(
        "batch ops at usize::MAX",
        &json!({"batch": {"max_ops": usize::MAX}}),
        &dead_url(),
    );
}

/// Numbers the app wrote are stored and handed back exactly (big
/// integers, huge exponents, negative zero), and JSON nested deeper than
/// the parser takes is refused with a message, storing nothing.
#[test]
fn extreme_numbers_are_kept_exactly_and_deep_nesting_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = json!({
        "outbox_path": dir.path().join("o.db"),
        "server_url": dead_url(),
        "token": "t",
        "synchronous": "off",
    })
    .to_string();
    let (st, h, msg) = try_open(&config);
    assert_eq!(st, GsStatus::Ok, "{msg:?}");
    let payload = r#"{"big":18446744073709551616,"neg":-9223372036854775809,"exp":1e400,"tiny":1e-400,"z":-0,"f":0.1000000000000000055511151231257827}"#;
    let op =
        format!(r#"{{"kind":"create","entity_type":"note","entity_id":"n1","payload":{payload}}}"#);
    let c = CString::new(op).unwrap();
    let mut id = null_mut();
    let st = unsafe { gs_engine_enqueue(h.p(), c.as_ptr(), &mut id) };
    assert_eq!(st, GsStatus::Ok, "{:?}", last_error());
    take(id);
    let deep = format!(
        r#"{{"kind":"create","entity_type":"note","entity_id":"n2","payload":{}1{}}}"#,
        r#"{"d":"#.repeat(100_000),
        "}".repeat(100_000)
    );
    let c = CString::new(deep).unwrap();
    let (st, no_id, msg) = bounded("deep", Duration::from_secs(10), move || {
        let mut id = null_mut();
        let st = unsafe { gs_engine_enqueue(h.p(), c.as_ptr(), &mut id) };
        (st, id.is_null(), last_error())
    });
    // Well-formed but past the depth limit: the same refusal at any depth.
    assert_eq!(st, GsStatus::InvalidOp, "{msg:?}");
    assert!(no_id && msg.is_some());
    let mut o = null_mut();
    assert_eq!(
        unsafe { gs_engine_ops(h.p(), std::ptr::null(), &mut o) },
        GsStatus::Ok
    );
    let text = take(o);
    let ops: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(ops.as_array().unwrap().len(), 1, "{text}");
    for n in [
        "18446744073709551616",
        "-9223372036854775809",
        "1e+400",
        "1e-400",
        "-0",
        "0.1000000000000000055511151231257827",
    ] {
        assert!(text.contains(n), "{n} not kept exactly: {text}");
    }
    close(h);
}

/// Outbox paths that are not outboxes (a FIFO, `/dev/null`, a symlink to
/// another app's file): refused with `GS_STATUS_OPEN`, never a hang (a
/// FIFO opened for reading waits for a writer), the file left as it was.
#[test]
fn open_refuses_special_and_foreign_paths() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"keep me\n").unwrap();
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&text, &link).unwrap();
    let url = dead_url();
    for path in [fifo.as_path(), Path::new("/dev/null"), link.as_path()] {
        let config = json!({"outbox_path": path, "server_url": url, "token": "t"}).to_string();
        let (st, h, msg) = bounded("open", Duration::from_secs(10), move || try_open(&config));
        assert_eq!(st, GsStatus::Open, "{}: {msg:?}", path.display());
        assert!(h.0.is_null());
        assert!(msg.is_some_and(|m| m.contains("not a guardian outbox")));
    }
    assert_eq!(std::fs::read(&text).unwrap(), b"keep me\n");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["fifo", "link.db", "notes.txt"]);
}
