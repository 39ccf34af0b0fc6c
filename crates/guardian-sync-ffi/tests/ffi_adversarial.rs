//! Adversarial use of the C ABI, as a careless or hostile app would call it:
//! callbacks that call back in or block, null and malformed arguments,
//! lifecycle misuse the rules allow, and concurrent writers. Every call
//! that could deadlock runs on a spawned thread with a bounded wait, so a
//! deadlock fails the test instead of hanging it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::undocumented_unsafe_blocks,
    clippy::multiple_unsafe_ops_per_block
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use guardian_server::{Faults, RunningServer, ServerBuilder};
use guardian_sync_ffi::{
    gs_engine_cancel, gs_engine_close, gs_engine_discard, gs_engine_enqueue, gs_engine_next_event,
    gs_engine_open, gs_engine_ops, gs_engine_retry, gs_engine_retry_all,
    gs_engine_set_event_callback, gs_engine_set_token, gs_engine_set_token_callback,
    gs_engine_start, gs_engine_status, gs_engine_stop, gs_engine_transaction, gs_string_free,
    GsEngine, GsStatus,
};
use serde_json::{json, Value};

use common::{bounded, close, dead_url, last_error, take, H};

const TOKEN: &str = "adversarial-secret";
/// Bound on a call that must not block for long (a deadlock fails the test).
const BOUND: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

fn config(path: &Path, url: &str, token: Option<&str>) -> String {
    json!({
        "outbox_path": path,
        "server_url": url,
        "token": token,
        "retry": {"base_ms": 20, "cap_ms": 100, "max_attempts": 1000},
        "lock": {"heartbeat_interval_ms": 500, "stale_after_ms": 2000},
        "synchronous": "normal",
        "connect_timeout_ms": 1000,
        "request_timeout_ms": 5000,
    })
    .to_string()
}

fn open(config: &str) -> H {
    let c = CString::new(config).unwrap();
    let mut e = null_mut();
    let st = unsafe { gs_engine_open(c.as_ptr(), &mut e) };
    assert_eq!(st, GsStatus::Ok, "open: {:?}", last_error());
    assert!(!e.is_null());
    H(e)
}

fn create_op(id: &str) -> String {
    json!({"kind": "create", "entity_type": "note", "entity_id": id, "payload": {"title": id}})
        .to_string()
}

fn enqueue(h: H, op: &str) -> String {
    let c = CString::new(op).unwrap();
    let mut id = null_mut();
    let st = unsafe { gs_engine_enqueue(h.p(), c.as_ptr(), &mut id) };
    assert_eq!(st, GsStatus::Ok, "enqueue {op}: {:?}", last_error());
    take(id)
}

fn status(h: H) -> Value {
    let mut s = null_mut();
    let st = unsafe { gs_engine_status(h.p(), &mut s) };
    assert_eq!(st, GsStatus::Ok, "status: {:?}", last_error());
    serde_json::from_str(&take(s)).unwrap()
}

/// Every op in the outbox, paged through `after_seq`.
fn all_ops(h: H) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0i64;
    loop {
        let filter = CString::new(json!({"limit": 37, "after_seq": after}).to_string()).unwrap();
        let mut s = null_mut();
        let st = unsafe { gs_engine_ops(h.p(), filter.as_ptr(), &mut s) };
        assert_eq!(st, GsStatus::Ok, "ops: {:?}", last_error());
        let page: Vec<Value> = serde_json::from_str(&take(s)).unwrap();
        let Some(last) = page.last() else {
            return out;
        };
        after = last["seq"].as_i64().unwrap();
        out.extend(page);
    }
}

fn op_ids(ops: &[Value]) -> BTreeSet<String> {
    ops.iter()
        .map(|o| o["op_id"].as_str().unwrap().to_owned())
        .collect()
}

/// One `gs_engine_next_event` call: its status and the event, if any.
fn next_event(h: H, timeout_ms: u32) -> (GsStatus, Option<Value>) {
    let mut s = null_mut();
    let st = unsafe { gs_engine_next_event(h.p(), timeout_ms, &mut s) };
    let ev = (!s.is_null()).then(|| serde_json::from_str(&take(s)).unwrap());
    (st, ev)
}

/// Reads events until `done` has seen what it waits for (bounded).
fn wait_events(h: H, what: &str, mut done: impl FnMut(&Value) -> bool + Send + 'static) {
    let what_owned = what.to_owned();
    bounded(what, Duration::from_secs(15), move || {
        let deadline = Instant::now() + Duration::from_secs(12);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let (GsStatus::Ok, Some(ev)) = next_event(h, 100) {
                let finished = done(&ev);
                seen.push(ev);
                if finished {
                    return;
                }
            }
        }
        panic!("{what_owned}: not seen; events were {seen:?}");
    });
}

/// Waits for `op_succeeded` of every id in `ids`.
fn wait_succeeded(h: H, ids: &[String]) {
    let mut left: BTreeSet<String> = ids.iter().cloned().collect();
    wait_events(h, "op_succeeded for every op", move |ev| {
        if ev["event"] == "op_succeeded" {
            left.remove(ev["op_id"].as_str().unwrap_or_default());
        }
        left.is_empty()
    });
}

/// The reference server on 127.0.0.1, on a runtime of its own.
struct Server {
    rt: tokio::runtime::Runtime,
    server: Option<RunningServer>,
}

impl Server {
    fn start(faults: Faults) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let server = rt
            .block_on(
                ServerBuilder::new()
                    .token("tenant", TOKEN)
                    .in_memory()
                    .faults(faults)
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        Self {
            rt,
            server: Some(server),
        }
    }

    fn get(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }

    fn url(&self) -> String {
        self.get().url()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

/// Runs a call that must leave its out-pointer NULL (it was refused).
fn no_out(call: impl FnOnce(*mut *mut c_char) -> GsStatus) -> GsStatus {
    let mut out = null_mut();
    let st = call(&mut out);
    assert!(out.is_null(), "a refused call set its out-pointer");
    st
}

/// Status and message of a call, read on the calling thread.
type Outcome = (&'static str, GsStatus, Option<String>);

fn outcome(what: &'static str, st: GsStatus) -> Outcome {
    (what, st, last_error())
}

// ------------------------------------------------- re-entrant callbacks

/// What the re-entrant event callback reports.
enum Reported {
    /// The outcomes of its calls and the id of the op it enqueued.
    Reentry(Vec<Outcome>, String),
    /// A later event, forwarded.
    Event(String),
}

struct ReentryCtx {
    engine: H,
    calls: AtomicUsize,
    first_done: AtomicBool,
    tx: Mutex<Sender<Reported>>,
}

unsafe extern "C" fn other_event_cb(_: *mut c_void, _: *const c_char) {}

/// On its first event, calls back into the engine with everything the rules
/// allow (and the two calls they forbid); then forwards every event.
unsafe extern "C" fn reentrant_event_cb(ud: *mut c_void, json: *const c_char) {
    let ctx = unsafe { &*ud.cast::<ReentryCtx>() };
    ctx.calls.fetch_add(1, Ordering::SeqCst);
    let event = unsafe { CStr::from_ptr(json) }
        .to_string_lossy()
        .into_owned();
    if ctx.first_done.swap(true, Ordering::SeqCst) {
        if let Ok(tx) = ctx.tx.lock() {
            let _ = tx.send(Reported::Event(event));
        }
        return;
    }
    let e = ctx.engine.p();
    let mut r = Vec::new();
    let mut out = null_mut();
    r.push(outcome("status", unsafe { gs_engine_status(e, &mut out) }));
    unsafe { gs_string_free(out) };
    let mut out = null_mut();
    r.push(outcome("ops", unsafe {
        gs_engine_ops(e, null(), &mut out)
    }));
    unsafe { gs_string_free(out) };
    let op = CString::new(create_op("from-callback")).unwrap_or_default();
    let mut id = null_mut();
    r.push(outcome("enqueue", unsafe {
        gs_engine_enqueue(e, op.as_ptr(), &mut id)
    }));
    let op_id = if id.is_null() {
        String::new()
    } else {
        let s = unsafe { CStr::from_ptr(id) }.to_string_lossy().into_owned();
        unsafe { gs_string_free(id) };
        s
    };
    let txn = CString::new(format!("[{}]", create_op("txn-from-callback"))).unwrap_or_default();
    let mut out = null_mut();
    r.push(outcome("transaction", unsafe {
        gs_engine_transaction(e, txn.as_ptr(), &mut out)
    }));
    unsafe { gs_string_free(out) };
    let mut out = null_mut();
    r.push(outcome("next_event(0)", unsafe {
        gs_engine_next_event(e, 0, &mut out)
    }));
    unsafe { gs_string_free(out) };
    r.push(outcome("set_event_callback(other)", unsafe {
        gs_engine_set_event_callback(e, Some(other_event_cb), null_mut())
    }));
    r.push(outcome("set_event_callback(NULL)", unsafe {
        gs_engine_set_event_callback(e, None, null_mut())
    }));
    r.push(outcome("close", unsafe { gs_engine_close(e) }));
    r.push(outcome("stop", unsafe { gs_engine_stop(e, 5000) }));
    r.push(outcome("start", unsafe { gs_engine_start(e) }));
    let token = CString::new(TOKEN).unwrap_or_default();
    r.push(outcome("set_token", unsafe {
        gs_engine_set_token(e, token.as_ptr())
    }));
    let mut n = 0u64;
    r.push(outcome("retry_all", unsafe {
        gs_engine_retry_all(e, &mut n)
    }));
    if let Ok(tx) = ctx.tx.lock() {
        let _ = tx.send(Reported::Reentry(r, op_id));
    }
}

/// An event callback may call every function back on its own engine
/// (stop and start included) without deadlock; replacing or clearing itself
/// and closing from there return `GS_STATUS_WRONG_THREAD` and leave it
/// registered; once cleared it is never called again.
#[test]
fn event_callback_reentry_never_deadlocks() {
    let server = Server::start(Faults::default());
    let dir = tempfile::tempdir().unwrap();
    let h = open(&config(
        &dir.path().join("o.db"),
        &server.url(),
        Some(TOKEN),
    ));
    let (tx, rx) = mpsc::channel();
    let ctx = Box::into_raw(Box::new(ReentryCtx {
        engine: h,
        calls: AtomicUsize::new(0),
        first_done: AtomicBool::new(false),
        tx: Mutex::new(tx),
    }));
    let st = unsafe { gs_engine_set_event_callback(h.p(), Some(reentrant_event_cb), ctx.cast()) };
    assert_eq!(st, GsStatus::Ok);
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);

    // The first event (lock_acquired) triggers the re-entrant calls.
    let (results, op_id) = loop {
        match rx
            .recv_timeout(BOUND)
            .expect("re-entrant callback deadlocked")
        {
            Reported::Reentry(r, id) => break (r, id),
            Reported::Event(_) => continue,
        }
    };
    let status_of: BTreeMap<&str, (GsStatus, Option<String>)> = results
        .iter()
        .map(|(w, st, m)| (*w, (*st, m.clone())))
        .collect();
    for call in [
        "status",
        "ops",
        "enqueue",
        "transaction",
        "stop",
        "start",
        "set_token",
        "retry_all",
    ] {
        assert_eq!(
            status_of[call].0,
            GsStatus::Ok,
            "{call} from the callback: {results:?}"
        );
        assert_eq!(status_of[call].1, None, "{call}: message after success");
    }
    assert!(matches!(
        status_of["next_event(0)"].0,
        GsStatus::Ok | GsStatus::Timeout
    ));
    for call in [
        "set_event_callback(other)",
        "set_event_callback(NULL)",
        "close",
    ] {
        let (st, msg) = &status_of[call];
        assert_eq!(*st, GsStatus::WrongThread, "{call} from the callback");
        assert!(
            msg.as_deref().is_some_and(|m| m.contains("callback")),
            "{call}: {msg:?}"
        );
    }
    assert!(!op_id.is_empty());

    // Still registered (the refused replace/clear changed nothing): it sees
    // the runner it restarted take the lock, and the op and the transaction
    // it enqueued succeed, whatever point of their drain its stop hit.
    let (mut restarted, mut op_ok, mut txn_ok, mut seen) = (false, false, false, Vec::new());
    let deadline = Instant::now() + BOUND;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Reported::Event(ev)) => {
                let v: Value = serde_json::from_str(&ev).unwrap();
                restarted |= v["event"] == "lock_acquired";
                op_ok |= v["event"] == "op_succeeded" && v["op_id"] == op_id.as_str();
                txn_ok |= v["event"] == "transaction_committed";
                seen.push(ev);
            }
            Ok(Reported::Reentry(..)) => panic!("a second re-entry report"),
            Err(_) => {}
        }
        let s = status(h);
        let drained = s["pending"] == 0 && s["in_flight"] == 0 && s["failed"] == 0;
        if restarted && drained && op_ok && txn_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not restarted, drained and told of both: {s}; events {seen:?}"
        );
    }

    // Clearing from the app's thread works, and then it is never called.
    let st = bounded("clear the callback", BOUND, move || unsafe {
        gs_engine_set_event_callback(h.p(), None, null_mut())
    });
    assert_eq!(st, GsStatus::Ok);
    let calls = unsafe { &*ctx }.calls.load(Ordering::SeqCst);
    assert_eq!(unsafe { gs_engine_stop(h.p(), 5000) }, GsStatus::Ok);
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
    wait_events(h, "lock_acquired after clearing", |ev| {
        ev["event"] == "lock_acquired"
    });
    assert_eq!(unsafe { &*ctx }.calls.load(Ordering::SeqCst), calls);
    let s = status(h);
    assert_eq!(s["pending"], 0, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    close(h);
    drop(unsafe { Box::from_raw(ctx) });
}

struct BlockingCtx {
    entered: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
    calls: AtomicUsize,
}

/// Blocks (its first call) until the test releases it.
unsafe extern "C" fn blocking_event_cb(ud: *mut c_void, _: *const c_char) {
    let ctx = unsafe { &*ud.cast::<BlockingCtx>() };
    if ctx.calls.fetch_add(1, Ordering::SeqCst) == 0 {
        if let Ok(tx) = ctx.entered.lock() {
            let _ = tx.send(());
        }
        if let Ok(rx) = ctx.release.lock() {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }
    }
}

/// An event callback that blocks holds up nothing but its own thread: every
/// other call works meanwhile, and clearing it waits for it to return.
#[test]
fn blocked_event_callback_blocks_no_other_call() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&config(&dir.path().join("o.db"), &dead_url(), Some(TOKEN)));
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let ctx = Box::into_raw(Box::new(BlockingCtx {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
        calls: AtomicUsize::new(0),
    }));
    let st = unsafe { gs_engine_set_event_callback(h.p(), Some(blocking_event_cb), ctx.cast()) };
    assert_eq!(st, GsStatus::Ok);
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
    entered
        .recv_timeout(BOUND)
        .expect("no event reached the callback");

    let id = bounded("calls while the callback blocks", BOUND, move || {
        let id = enqueue(h, &create_op("while-blocked"));
        assert_eq!(status(h)["running"], true);
        assert!(op_ids(&all_ops(h)).contains(&id));
        // The event the callback holds is also queued for next_event.
        let (st, ev) = next_event(h, 0);
        assert_eq!(st, GsStatus::Ok);
        assert_eq!(ev.unwrap()["event"], "lock_acquired");
        assert_eq!(unsafe { gs_engine_stop(h.p(), 5000) }, GsStatus::Ok);
        assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
        let token = CString::new("other").unwrap();
        assert_eq!(
            unsafe { gs_engine_set_token(h.p(), token.as_ptr()) },
            GsStatus::Ok
        );
        id
    });

    // Clearing waits for the running callback.
    let (cleared_tx, cleared) = mpsc::channel();
    std::thread::spawn(move || {
        let st = unsafe { gs_engine_set_event_callback(h.p(), None, null_mut()) };
        let _ = cleared_tx.send(st);
    });
    assert!(
        cleared.try_recv().is_err(),
        "cleared while the callback ran"
    );
    release.send(()).unwrap();
    assert_eq!(
        cleared.recv_timeout(BOUND).expect("clear deadlocked"),
        GsStatus::Ok
    );
    assert_eq!(unsafe { gs_engine_stop(h.p(), 5000) }, GsStatus::Ok);
    assert!(op_ids(&all_ops(h)).contains(&id));
    close(h);
    drop(unsafe { Box::from_raw(ctx) });
}

struct TokenCtx {
    engine: H,
    token: CString,
    calls: AtomicUsize,
    reentered: AtomicBool,
    results: Mutex<Sender<(Vec<Outcome>, String)>>,
    release: Mutex<Receiver<()>>,
}

/// Hands out `token` (growing the buffer as the protocol says); on its first
/// full-size call, calls back into the engine, tries to replace itself
/// (refused: a replacement waits for running calls), reports, and blocks
/// until released.
unsafe extern "C" fn reentrant_token_cb(
    ud: *mut c_void,
    _refresh: bool,
    buf: *mut c_char,
    buf_len: usize,
) -> i64 {
    let ctx = unsafe { &*ud.cast::<TokenCtx>() };
    ctx.calls.fetch_add(1, Ordering::SeqCst);
    let token = ctx.token.as_bytes_with_nul();
    if token.len() > buf_len {
        return i64::try_from(token.len() - 1).unwrap_or(-1);
    }
    if !ctx.reentered.swap(true, Ordering::SeqCst) {
        let e = ctx.engine.p();
        let mut r = Vec::new();
        let mut out = null_mut();
        r.push(outcome("status", unsafe { gs_engine_status(e, &mut out) }));
        unsafe { gs_string_free(out) };
        let mut out = null_mut();
        r.push(outcome("ops", unsafe {
            gs_engine_ops(e, null(), &mut out)
        }));
        unsafe { gs_string_free(out) };
        let t = CString::new(TOKEN).unwrap_or_default();
        r.push(outcome("set_token", unsafe {
            gs_engine_set_token(e, t.as_ptr())
        }));
        let op = CString::new(create_op("from-token-callback")).unwrap_or_default();
        let mut id = null_mut();
        r.push(outcome("enqueue", unsafe {
            gs_engine_enqueue(e, op.as_ptr(), &mut id)
        }));
        let op_id = if id.is_null() {
            String::new()
        } else {
            let s = unsafe { CStr::from_ptr(id) }.to_string_lossy().into_owned();
            unsafe { gs_string_free(id) };
            s
        };
        r.push(outcome("set_token_callback(self)", unsafe {
            gs_engine_set_token_callback(e, Some(reentrant_token_cb), ud)
        }));
        r.push(outcome("set_event_callback", unsafe {
            gs_engine_set_event_callback(e, Some(other_event_cb), null_mut())
        }));
        r.push(outcome("close", unsafe { gs_engine_close(e) }));
        let mut n = 0u64;
        r.push(outcome("retry_all", unsafe {
            gs_engine_retry_all(e, &mut n)
        }));
        if let Ok(tx) = ctx.results.lock() {
            let _ = tx.send((r, op_id));
        }
        if let Ok(rx) = ctx.release.lock() {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }
    }
    unsafe { std::ptr::copy_nonoverlapping(token.as_ptr().cast(), buf, token.len()) };
    i64::try_from(token.len() - 1).unwrap_or(-1)
}

/// A token callback may call back into the engine (set_token, enqueue...;
/// replacing a callback or closing is refused) and block, while the app keeps calling; a
/// token of exactly the first buffer's size goes through the grow-once
/// protocol.
#[test]
fn token_callback_reentry_and_blocking_never_deadlock() {
    // 4096 bytes: the first buffer's size, so the callback asks for more.
    let long_token = format!("{TOKEN}{}", "x".repeat(4096 - TOKEN.len()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let srv = rt
        .block_on(
            ServerBuilder::new()
                .token("tenant", long_token.clone())
                .in_memory()
                .bind("127.0.0.1:0"),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let h = open(&config(&dir.path().join("o.db"), &srv.url(), None));
    let (results_tx, results) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let ctx = Box::into_raw(Box::new(TokenCtx {
        engine: h,
        token: CString::new(long_token).unwrap(),
        calls: AtomicUsize::new(0),
        reentered: AtomicBool::new(false),
        results: Mutex::new(results_tx),
        release: Mutex::new(release_rx),
    }));
    let st = unsafe { gs_engine_set_token_callback(h.p(), Some(reentrant_token_cb), ctx.cast()) };
    assert_eq!(st, GsStatus::Ok);
    let first = enqueue(h, &create_op("first"));
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);

    let (r, from_cb) = results
        .recv_timeout(BOUND)
        .expect("token callback deadlocked");
    for (call, st, msg) in &r {
        let refused = ["set_token_callback(self)", "set_event_callback", "close"];
        let want = if refused.contains(call) {
            assert!(msg.is_some(), "{call}: no message");
            GsStatus::WrongThread
        } else {
            GsStatus::Ok
        };
        assert_eq!(*st, want, "{call} from the token callback: {msg:?}");
    }
    // The callback now blocks; the app's calls go on.
    let second = bounded("calls while the token callback blocks", BOUND, move || {
        assert_eq!(status(h)["running"], true);
        let id = enqueue(h, &create_op("second"));
        let t = CString::new(TOKEN).unwrap();
        assert_eq!(
            unsafe { gs_engine_set_token(h.p(), t.as_ptr()) },
            GsStatus::Ok
        );
        assert!(op_ids(&all_ops(h)).contains(&id));
        id
    });
    release.send(()).unwrap();
    wait_succeeded(h, &[first, second, from_cb]);
    // 4096 bytes did not fit the 4096-byte buffer: asked again, bigger.
    assert!(unsafe { &*ctx }.calls.load(Ordering::SeqCst) >= 2);
    assert_eq!(unsafe { gs_engine_stop(h.p(), 5000) }, GsStatus::Ok);
    close(h);
    drop(unsafe { Box::from_raw(ctx) });
    rt.block_on(srv.shutdown());
}

/// What each hostile token callback reports when called.
struct Called(Mutex<Sender<&'static str>>);

fn called(ud: *mut c_void, what: &'static str) {
    let c = unsafe { &*ud.cast::<Called>() };
    if let Ok(tx) = c.0.lock() {
        let _ = tx.send(what);
    }
}

unsafe extern "C" fn no_token(ud: *mut c_void, _: bool, _: *mut c_char, _: usize) -> i64 {
    called(ud, "no_token");
    -1
}

unsafe extern "C" fn huge_token(ud: *mut c_void, _: bool, _: *mut c_char, _: usize) -> i64 {
    called(ud, "huge_token");
    i64::MAX
}

unsafe extern "C" fn lying_token(ud: *mut c_void, _: bool, _: *mut c_char, len: usize) -> i64 {
    called(ud, "lying_token");
    // Always "a bit longer than your buffer".
    i64::try_from(len + 10).unwrap_or(-1)
}

unsafe extern "C" fn not_utf8_token(ud: *mut c_void, _: bool, buf: *mut c_char, len: usize) -> i64 {
    called(ud, "not_utf8_token");
    let bad = [0xffu8, 0xfe, 0x00];
    if len < bad.len() {
        return -1;
    }
    unsafe { std::ptr::copy_nonoverlapping(bad.as_ptr().cast(), buf, bad.len()) };
    2
}

/// Writes the token without a terminating NUL (the length is what counts).
unsafe extern "C" fn unterminated_token(
    ud: *mut c_void,
    _: bool,
    buf: *mut c_char,
    len: usize,
) -> i64 {
    called(ud, "unterminated_token");
    if len < TOKEN.len() {
        return i64::try_from(TOKEN.len()).unwrap_or(-1);
    }
    unsafe { std::ptr::copy_nonoverlapping(TOKEN.as_ptr().cast(), buf, TOKEN.len()) };
    i64::try_from(TOKEN.len()).unwrap_or(-1)
}

/// A token callback that has no token, claims absurd lengths, lies about
/// the length or returns bytes that are not UTF-8 pauses the runner with
/// `auth_required` (no crash, no op lost); a good callback then resumes it.
#[test]
fn hostile_token_callbacks_pause_for_auth_and_lose_nothing() {
    let server = Server::start(Faults::default());
    let dir = tempfile::tempdir().unwrap();
    let h = open(&config(&dir.path().join("o.db"), &server.url(), None));
    let (tx, rx) = mpsc::channel();
    let ud = Box::into_raw(Box::new(Called(Mutex::new(tx))));
    let id = enqueue(h, &create_op("needs-auth"));
    type Cb = unsafe extern "C" fn(*mut c_void, bool, *mut c_char, usize) -> i64;
    let hostile: [(&str, Cb); 4] = [
        ("no_token", no_token),
        ("huge_token", huge_token),
        ("lying_token", lying_token),
        ("not_utf8_token", not_utf8_token),
    ];
    for (i, (name, cb)) in hostile.into_iter().enumerate() {
        let st = unsafe { gs_engine_set_token_callback(h.p(), Some(cb), ud.cast()) };
        assert_eq!(st, GsStatus::Ok);
        if i == 0 {
            assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
        }
        loop {
            let got = rx.recv_timeout(BOUND).expect("token callback never called");
            if got == name {
                break;
            }
        }
        wait_events(h, "auth_required", |ev| ev["event"] == "auth_required");
        let s = status(h);
        assert_eq!(s["running"], true, "{name}: {s}");
        assert_eq!(s["runner_error"], Value::Null, "{name}: {s}");
    }
    assert_eq!(op_ids(&all_ops(h)), BTreeSet::from([id.clone()]));
    let st = unsafe { gs_engine_set_token_callback(h.p(), Some(unterminated_token), ud.cast()) };
    assert_eq!(st, GsStatus::Ok);
    wait_succeeded(h, &[id]);
    assert_eq!(unsafe { gs_engine_stop(h.p(), 5000) }, GsStatus::Ok);
    close(h);
    drop(unsafe { Box::from_raw(ud) });
}

// ------------------------------------------------ null and invalid input

/// A named call and the status it must return.
type Case = (String, GsStatus, Box<dyn Fn() -> GsStatus>);

unsafe extern "C" fn noop_token(_: *mut c_void, _: bool, _: *mut c_char, _: usize) -> i64 {
    -1
}

/// Every function refuses a null handle, null out-pointer, null or
/// non-UTF-8 text, malformed or wrong-shaped JSON and multi-MiB input with
/// the documented negative status and a message on the calling thread, and
/// stores nothing.
#[test]
fn null_and_malformed_arguments_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dead_url();
    let h = open(&config(&dir.path().join("o.db"), &dead, None));
    let e = h.p();
    let bad_utf8: &[u8] = b"{\"kind\":\"\xff\xfe\"}\0";
    let bad = bad_utf8.as_ptr().cast::<c_char>();
    let c = |s: &str| CString::new(s).unwrap();
    let valid_op = c(&create_op("never-stored"));
    let unknown_id = c("01890000-0000-7000-8000-000000000000");
    let mib = 1 << 20;
    let huge_garbage = c(&"x".repeat(6 * mib));
    let deep = c(&"[".repeat(4 * mib));
    let deep_payload = c(&format!(
        r#"{{"kind":"create","entity_type":"note","entity_id":"deep","payload":{{"a":{}1{}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    ));
    let op = |v: Value| c(&v.to_string());
    let big_payload = op(
        json!({"kind": "create", "entity_type": "note", "entity_id": "big",
        "payload": {"blob": "a".repeat(3 * mib)}}),
    );
    let big_id = op(json!({"kind": "create", "entity_type": "note",
        "entity_id": "i".repeat(3 * mib), "payload": {}}));
    let many: Vec<Value> = (0..101)
        .map(|i| serde_json::from_str(&create_op(&format!("t{i}"))).unwrap())
        .collect();
    let txn_101 = op(Value::Array(many));
    let txn_half_bad = c(&format!(
        "[{},{}]",
        create_op("txn-good"),
        json!({"kind": "create", "entity_type": "Bad Type", "entity_id": "x", "payload": {}})
    ));
    let txn_half_garbage = c(&format!("[{}, 42]", create_op("txn-good")));

    use GsStatus::{InvalidArgument as Arg, InvalidOp as Op, NotFound};
    let mut cases: Vec<Case> = Vec::new();
    let mut case = |name: &str, want: GsStatus, f: Box<dyn Fn() -> GsStatus>| {
        cases.push((name.to_owned(), want, f));
    };

    // The calls that take an engine and one text: the op-id ones, then
    // `set_token`.
    type TextFn = unsafe extern "C" fn(*const GsEngine, *const c_char) -> GsStatus;
    let text_fns: [(&str, TextFn); 4] = [
        ("retry", gs_engine_retry),
        ("discard", gs_engine_discard),
        ("cancel", gs_engine_cancel),
        ("set_token", gs_engine_set_token),
    ];

    // A null handle, everywhere.
    let ne: *mut GsEngine = null_mut();
    let vp = valid_op.as_ptr();
    let idp = unknown_id.as_ptr();
    case(
        "enqueue(NULL engine)",
        Arg,
        Box::new(move || unsafe { gs_engine_enqueue(ne, vp, null_mut()) }),
    );
    case(
        "transaction(NULL engine)",
        Arg,
        Box::new(move || unsafe { gs_engine_transaction(ne, vp, null_mut()) }),
    );
    case(
        "start(NULL)",
        Arg,
        Box::new(|| unsafe { gs_engine_start(null()) }),
    );
    case(
        "stop(NULL)",
        Arg,
        Box::new(|| unsafe { gs_engine_stop(null(), 0) }),
    );
    case(
        "next_event(NULL engine)",
        Arg,
        Box::new(|| {
            let mut out = null_mut();
            let st = unsafe { gs_engine_next_event(null(), 0, &mut out) };
            assert!(out.is_null());
            st
        }),
    );
    case(
        "set_event_callback(NULL engine)",
        Arg,
        Box::new(|| unsafe {
            gs_engine_set_event_callback(null(), Some(other_event_cb), null_mut())
        }),
    );
    case(
        "set_event_callback(NULL engine, NULL)",
        Arg,
        Box::new(|| unsafe { gs_engine_set_event_callback(null(), None, null_mut()) }),
    );
    case(
        "status(NULL engine)",
        Arg,
        Box::new(|| {
            let mut out = null_mut();
            let st = unsafe { gs_engine_status(null(), &mut out) };
            assert!(out.is_null());
            st
        }),
    );
    case(
        "ops(NULL engine)",
        Arg,
        Box::new(|| {
            let mut out = null_mut();
            let st = unsafe { gs_engine_ops(null(), null(), &mut out) };
            assert!(out.is_null());
            st
        }),
    );
    for (name, f) in text_fns {
        case(
            &format!("{name}(NULL engine)"),
            Arg,
            Box::new(move || unsafe { f(ne, idp) }),
        );
    }
    case(
        "retry_all(NULL engine)",
        Arg,
        Box::new(|| {
            let mut n = 77u64;
            let st = unsafe { gs_engine_retry_all(null(), &mut n) };
            assert_eq!(n, 77);
            st
        }),
    );
    case(
        "set_token_callback(NULL engine)",
        Arg,
        Box::new(|| unsafe { gs_engine_set_token_callback(null(), Some(noop_token), null_mut()) }),
    );

    // Null out-pointers and null text.
    case(
        "status(NULL out)",
        Arg,
        Box::new(move || unsafe { gs_engine_status(e, null_mut()) }),
    );
    case(
        "ops(NULL out)",
        Arg,
        Box::new(move || unsafe { gs_engine_ops(e, null(), null_mut()) }),
    );
    case(
        "next_event(NULL out)",
        Arg,
        Box::new(move || unsafe { gs_engine_next_event(e, 0, null_mut()) }),
    );
    case(
        "enqueue(NULL op)",
        Arg,
        Box::new(move || no_out(|out| unsafe { gs_engine_enqueue(e, null(), out) })),
    );
    case(
        "transaction(NULL ops)",
        Arg,
        Box::new(move || no_out(|out| unsafe { gs_engine_transaction(e, null(), out) })),
    );
    for (name, f) in text_fns {
        case(
            &format!("{name}(NULL text)"),
            Arg,
            Box::new(move || unsafe { f(e, null()) }),
        );
    }

    // Text that is not UTF-8, in every text argument.
    case(
        "enqueue(bad UTF-8)",
        Arg,
        Box::new(move || unsafe { gs_engine_enqueue(e, bad, null_mut()) }),
    );
    case(
        "transaction(bad UTF-8)",
        Arg,
        Box::new(move || unsafe { gs_engine_transaction(e, bad, null_mut()) }),
    );
    case(
        "ops(bad UTF-8)",
        Arg,
        Box::new(move || no_out(|out| unsafe { gs_engine_ops(e, bad, out) })),
    );
    for (name, f) in text_fns {
        case(
            &format!("{name}(bad UTF-8)"),
            Arg,
            Box::new(move || unsafe { f(e, bad) }),
        );
    }

    // Empty, malformed, wrong-shaped and huge text.
    let texts: Vec<(&str, GsStatus, CString)> = vec![
        ("empty", Arg, c("")),
        ("blank", Arg, c("  \n ")),
        ("null", Arg, c("null")),
        ("number", Arg, c("42")),
        ("array", Arg, c("[]")),
        ("empty object", Arg, c("{}")),
        (
            "truncated",
            Arg,
            c(r#"{"kind":"create","entity_type":"note""#),
        ),
        ("trailing garbage", Arg, c(&format!("{} x", create_op("a")))),
        (
            "two objects",
            Arg,
            c(&format!("{}{}", create_op("a"), create_op("b"))),
        ),
        (
            "unknown kind",
            Arg,
            op(json!({"kind": "explode", "entity_type": "note", "entity_id": "a", "payload": {}})),
        ),
        (
            "kind in capitals",
            Arg,
            op(json!({"kind": "Create", "entity_type": "note", "entity_id": "a", "payload": {}})),
        ),
        (
            "unknown field",
            Arg,
            op(
                json!({"kind": "create", "entity_type": "note", "entity_id": "a", "payload": {}, "paylod": {}}),
            ),
        ),
        (
            "duplicate field",
            Arg,
            c(
                r#"{"kind":"create","kind":"delete","entity_type":"note","entity_id":"a","payload":{}}"#,
            ),
        ),
        (
            "entity_id a number",
            Arg,
            op(json!({"kind": "create", "entity_type": "note", "entity_id": 7, "payload": {}})),
        ),
        (
            "negative base_version",
            Arg,
            op(
                json!({"kind": "update", "entity_type": "note", "entity_id": "a", "payload": {}, "base_version": -1}),
            ),
        ),
        (
            "depends_on not an id",
            Arg,
            op(
                json!({"kind": "create", "entity_type": "note", "entity_id": "a", "payload": {}, "depends_on": ["nope"]}),
            ),
        ),
        ("6 MiB of garbage", Arg, huge_garbage.clone()),
        ("4 MiB of [", Arg, deep.clone()),
        // Well-formed, refused by the outbox's depth limit.
        ("payload nested 10000 deep", Op, deep_payload.clone()),
        (
            "empty entity_type",
            Op,
            op(json!({"kind": "create", "entity_type": "", "entity_id": "a", "payload": {}})),
        ),
        (
            "empty entity_id",
            Op,
            op(json!({"kind": "create", "entity_type": "note", "entity_id": "", "payload": {}})),
        ),
        (
            "bad entity_type",
            Op,
            op(
                json!({"kind": "create", "entity_type": "Bad Type", "entity_id": "a", "payload": {}}),
            ),
        ),
        (
            "payload a number",
            Op,
            op(json!({"kind": "create", "entity_type": "note", "entity_id": "a", "payload": 42})),
        ),
        (
            "payload missing",
            Op,
            op(json!({"kind": "create", "entity_type": "note", "entity_id": "a"})),
        ),
        (
            "delete with payload",
            Op,
            op(
                json!({"kind": "delete", "entity_type": "note", "entity_id": "a", "payload": {"x": 1}}),
            ),
        ),
        (
            "empty txn_token",
            Op,
            op(
                json!({"kind": "create", "entity_type": "note", "entity_id": "a", "payload": {}, "txn_token": ""}),
            ),
        ),
        ("3 MiB payload", Op, big_payload.clone()),
        ("3 MiB entity_id", Op, big_id.clone()),
    ];
    for (name, want, text) in &texts {
        let p = text.as_ptr();
        case(
            &format!("enqueue({name})"),
            *want,
            Box::new(move || no_out(|out| unsafe { gs_engine_enqueue(e, p, out) })),
        );
    }
    let txns: Vec<(&str, GsStatus, CString)> = vec![
        ("empty", Arg, c("")),
        ("an object", Arg, valid_op.clone()),
        ("no ops", Op, c("[]")),
        ("101 ops", Op, txn_101.clone()),
        ("one invalid op", Op, txn_half_bad.clone()),
        ("one op not an object", Arg, txn_half_garbage.clone()),
        ("6 MiB of garbage", Arg, huge_garbage.clone()),
        ("4 MiB of [", Arg, deep.clone()),
        (
            "3 MiB payload",
            Op,
            c(&format!("[{}]", big_payload.to_str().unwrap())),
        ),
    ];
    for (name, want, text) in &txns {
        let p = text.as_ptr();
        case(
            &format!("transaction({name})"),
            *want,
            Box::new(move || no_out(|out| unsafe { gs_engine_transaction(e, p, out) })),
        );
    }
    let filters: Vec<(&str, CString)> = vec![
        ("garbage", c("{nope")),
        ("array", c("[]")),
        ("unknown state", c(r#"{"state":"bogus"}"#)),
        ("negative limit", c(r#"{"limit":-1}"#)),
        ("unknown field", c(r#"{"stat":"failed"}"#)),
        ("6 MiB of garbage", huge_garbage.clone()),
        ("4 MiB of [", deep.clone()),
    ];
    for (name, text) in &filters {
        let p = text.as_ptr();
        case(
            &format!("ops({name})"),
            Arg,
            Box::new(move || no_out(|out| unsafe { gs_engine_ops(e, p, out) })),
        );
    }
    let ids: Vec<(&str, GsStatus, CString)> = vec![
        ("empty", Arg, c("")),
        ("not an id", Arg, c("not-an-id")),
        ("6 MiB of garbage", Arg, huge_garbage.clone()),
        ("unknown", NotFound, unknown_id.clone()),
    ];
    for (name, want, text) in &ids {
        let p = text.as_ptr();
        // The op-id calls only: `set_token` takes any text but a bad token.
        for (f_name, f) in &text_fns[..3] {
            let f = *f;
            case(
                &format!("{f_name}({name})"),
                *want,
                Box::new(move || unsafe { f(e, p) }),
            );
        }
    }

    for (name, want, f) in &cases {
        let st = f();
        let msg = last_error();
        assert_eq!(st, *want, "{name}: message {msg:?}");
        let msg = msg.unwrap_or_else(|| panic!("{name}: no message"));
        assert!(!msg.is_empty(), "{name}: empty message");
        assert!(msg.len() < 4096, "{name}: a {} byte message", msg.len());
    }
    // The message is the calling thread's: another thread has none.
    assert_eq!(unsafe { gs_engine_start(null()) }, Arg);
    assert_eq!(std::thread::spawn(last_error).join().unwrap(), None);
    assert!(last_error().is_some());
    // Nothing was stored, and a successful call clears the message.
    assert!(all_ops(h).is_empty());
    assert_eq!(last_error(), None);
    let s = status(h);
    assert_eq!(
        (s["pending"].as_u64(), s["failed"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    // An empty filter is the default one (documented), not an error.
    let mut out = null_mut();
    let blank = c("   ");
    assert_eq!(
        unsafe { gs_engine_ops(e, blank.as_ptr(), &mut out) },
        GsStatus::Ok
    );
    assert_eq!(take(out), "[]");
    close(h);
}

/// `gs_engine_open` refuses null, malformed and invalid configurations with
/// a message and no handle, and the same file opens fine afterwards.
#[test]
fn open_refuses_bad_configurations_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let dead = dead_url();
    let good: Value = serde_json::from_str(&config(&path, &dead, None)).unwrap();
    let with = |key: &str, v: Value| {
        let mut c = good.clone();
        c[key] = v;
        c.to_string()
    };
    let cases: Vec<(&str, GsStatus, String)> = vec![
        ("empty", GsStatus::InvalidArgument, String::new()),
        ("null", GsStatus::InvalidArgument, "null".into()),
        ("array", GsStatus::InvalidArgument, "[]".into()),
        ("empty object", GsStatus::InvalidArgument, "{}".into()),
        (
            "6 MiB of garbage",
            GsStatus::InvalidArgument,
            "x".repeat(6 << 20),
        ),
        ("4 MiB of [", GsStatus::InvalidArgument, "[".repeat(4 << 20)),
        (
            "unknown key",
            GsStatus::InvalidArgument,
            with("tokn", json!("t")),
        ),
        (
            "path a number",
            GsStatus::InvalidArgument,
            with("outbox_path", json!(1)),
        ),
        (
            "url not a url",
            GsStatus::InvalidArgument,
            with("server_url", json!("not a url")),
        ),
        (
            "negative retry factor",
            GsStatus::InvalidArgument,
            with("retry", json!({"factor": -1.0})),
        ),
        (
            "stale before heartbeat",
            GsStatus::InvalidArgument,
            with(
                "lock",
                json!({"heartbeat_interval_ms": 1000, "stale_after_ms": 10}),
            ),
        ),
        (
            "unknown synchronous",
            GsStatus::InvalidArgument,
            with("synchronous", json!("fast")),
        ),
        (
            "zero concurrency",
            GsStatus::InvalidArgument,
            with("concurrency", json!(0)),
        ),
        (
            "negative timeout",
            GsStatus::InvalidArgument,
            with("connect_timeout_ms", json!(-5)),
        ),
        (
            "missing directory",
            GsStatus::Open,
            with("outbox_path", json!(dir.path().join("no/such/dir/o.db"))),
        ),
        (
            "a directory",
            GsStatus::Open,
            with("outbox_path", json!(dir.path())),
        ),
    ];
    for (name, want, text) in &cases {
        let c = CString::new(text.as_str()).unwrap();
        let mut e = null_mut();
        let st = unsafe { gs_engine_open(c.as_ptr(), &mut e) };
        let msg = last_error();
        assert_eq!(st, *want, "open({name}): {msg:?}");
        assert!(e.is_null(), "open({name}) returned a handle");
        assert!(
            msg.is_some_and(|m| !m.is_empty()),
            "open({name}): no message"
        );
    }
    let bad = b"{\"outbox_path\":\"\xff\"}\0";
    let mut e = null_mut();
    let st = unsafe { gs_engine_open(bad.as_ptr().cast(), &mut e) };
    assert_eq!(st, GsStatus::InvalidArgument);
    assert!(e.is_null() && last_error().is_some_and(|m| m.contains("UTF-8")));
    assert_eq!(
        unsafe { gs_engine_open(null(), &mut e) },
        GsStatus::InvalidArgument
    );
    assert!(e.is_null() && last_error().is_some());
    // A null out-pointer is refused before anything is created.
    let other = dir.path().join("never.db");
    let c = CString::new(config(&other, &dead, None)).unwrap();
    let st = unsafe { gs_engine_open(c.as_ptr(), null_mut()) };
    assert_eq!(st, GsStatus::InvalidArgument);
    assert!(last_error().is_some());
    assert!(!other.exists());
    // None of the failures left the good file unusable.
    let h = open(&good.to_string());
    assert!(all_ops(h).is_empty());
    close(h);
}

// ------------------------------------------------------ lifecycle misuse

/// Start twice, stop without start, stop twice, stop with a zero timeout,
/// and next_event with zero and huge timeouts get the documented answers,
/// and the engine stays usable throughout.
#[test]
fn lifecycle_misuse_gets_documented_answers() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&config(&dir.path().join("o.db"), &dead_url(), None));
    let e = h.p();
    assert_eq!(unsafe { gs_engine_stop(e, 0) }, GsStatus::Ok);
    assert_eq!(unsafe { gs_engine_stop(e, u32::MAX) }, GsStatus::Ok);
    // next_event(0) with nothing published: TIMEOUT and *out set to NULL.
    let mut out = std::ptr::NonNull::<c_char>::dangling().as_ptr();
    assert_eq!(
        unsafe { gs_engine_next_event(e, 0, &mut out) },
        GsStatus::Timeout
    );
    assert!(out.is_null());
    assert_eq!(last_error(), None);

    let id = enqueue(h, &create_op("a"));
    assert_eq!(unsafe { gs_engine_start(e) }, GsStatus::Ok);
    assert_eq!(unsafe { gs_engine_start(e) }, GsStatus::AlreadyRunning);
    assert!(last_error().is_some_and(|m| m.contains("already running")));
    assert_eq!(status(h)["running"], true);
    let st = bounded("stop", BOUND, move || unsafe {
        gs_engine_stop(h.p(), 5000)
    });
    assert_eq!(st, GsStatus::Ok);
    assert_eq!(unsafe { gs_engine_stop(e, 5000) }, GsStatus::Ok);
    let s = status(h);
    assert_eq!(
        (s["running"].clone(), s["runner_error"].clone()),
        (json!(false), Value::Null)
    );

    // A zero timeout may abort the runner; either way it can start again.
    assert_eq!(unsafe { gs_engine_start(e) }, GsStatus::Ok);
    let st = unsafe { gs_engine_stop(e, 0) };
    assert!(matches!(st, GsStatus::Ok | GsStatus::StopTimeout), "{st:?}");
    assert_eq!(unsafe { gs_engine_start(e) }, GsStatus::Ok);
    assert_eq!(status(h)["running"], true);
    // A stop may come before the runner took the lock (it then takes
    // nothing and says nothing): wait until it has tried the op, so that
    // lock_acquired is queued.
    let attempted = id.clone();
    bounded("the op attempted", BOUND, move || loop {
        let ops = all_ops(h);
        if ops
            .iter()
            .any(|op| op["op_id"] == attempted.as_str() && op["attempts"].as_u64() > Some(0))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    });
    assert_eq!(
        bounded("stop", BOUND, move || unsafe {
            gs_engine_stop(h.p(), 5000)
        }),
        GsStatus::Ok
    );

    // Drain the queue with zero timeouts.
    let drained = bounded("drain events", BOUND, move || {
        let mut n = 0;
        while next_event(h, 0).0 == GsStatus::Ok {
            n += 1;
        }
        n
    });
    assert!(drained >= 1, "no lock_acquired event was queued");
    // A reader waiting "forever" is woken by the next event.
    let (got_tx, got) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = got_tx.send(next_event(h, u32::MAX));
    });
    assert!(got.try_recv().is_err());
    assert_eq!(unsafe { gs_engine_start(e) }, GsStatus::Ok);
    let (st, ev) = got
        .recv_timeout(BOUND)
        .expect("next_event(u32::MAX) never woke");
    assert_eq!(st, GsStatus::Ok);
    assert!(ev.unwrap()["event"].is_string());
    assert_eq!(
        bounded("stop", BOUND, move || unsafe {
            gs_engine_stop(h.p(), 5000)
        }),
        GsStatus::Ok
    );
    assert_eq!(op_ids(&all_ops(h)), BTreeSet::from([id]));
    close(h);
}

/// Closing while the runner has a request in flight returns promptly and
/// loses nothing: on reopen every op is still there, and it is then applied
/// exactly once.
#[test]
fn close_during_a_drain_keeps_every_op() {
    let server = Server::start(Faults {
        latency_ms: 1500,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir.path().join("o.db"), &server.url(), Some(TOKEN));
    let h = open(&cfg);
    let ids: Vec<String> = (0..5)
        .map(|i| enqueue(h, &create_op(&format!("g{i}"))))
        .collect();
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
    server
        .rt
        .block_on(async { tokio::time::timeout(BOUND, server.get().wait_in_flight(1)).await })
        .expect("no request reached the server");
    close(h);

    server.get().set_faults(Faults::default()).unwrap();
    let h = open(&cfg);
    let stored = all_ops(h);
    assert_eq!(op_ids(&stored), ids.iter().cloned().collect(), "{stored:?}");
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
    wait_succeeded(h, &ids);
    let s = status(h);
    assert_eq!(
        (
            s["pending"].as_u64(),
            s["in_flight"].as_u64(),
            s["failed"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{s}"
    );
    close(h);
    let log = server.rt.block_on(server.get().applied_log()).unwrap();
    let mut per_entity: BTreeMap<String, usize> = BTreeMap::new();
    for m in &log {
        *per_entity.entry(m.id.clone()).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = (0..5).map(|i| (format!("g{i}"), 1)).collect();
    assert_eq!(per_entity, want);
}

/// Many threads enqueueing (valid and invalid ops, transactions) while
/// another cycles start/stop and another reads status: after close and
/// reopen the outbox holds exactly the acknowledged ops.
#[test]
fn concurrent_enqueues_with_start_stop_cycles_keep_exactly_the_acknowledged_ops() {
    const WRITERS: usize = 6;
    const PER_WRITER: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir.path().join("o.db"), &dead_url(), None);
    let h = open(&cfg);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(WRITERS + 2));
    let (a, d, cy, b) = (acked.clone(), done.clone(), cycles.clone(), barrier.clone());
    bounded("concurrent writers", Duration::from_secs(30), move || {
        std::thread::scope(|s| {
            let writers: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let (a, b) = (a.clone(), b.clone());
                    s.spawn(move || {
                        b.wait();
                        for j in 0..PER_WRITER {
                            let id = enqueue(h, &create_op(&format!("w{w}-{j}")));
                            a.lock().unwrap().insert(id);
                            if j % 3 == 0 {
                                let bad = CString::new(
                                    json!({"kind": "create", "entity_type": "Bad Type",
                                        "entity_id": format!("bad{w}-{j}"), "payload": {}})
                                    .to_string(),
                                )
                                .unwrap();
                                let mut out = null_mut();
                                let st =
                                    unsafe { gs_engine_enqueue(h.p(), bad.as_ptr(), &mut out) };
                                assert_eq!(st, GsStatus::InvalidOp);
                                assert!(out.is_null() && last_error().is_some());
                            }
                            if j % 10 == 0 {
                                let txn = CString::new(format!(
                                    "[{},{}]",
                                    create_op(&format!("tx{w}-{j}-a")),
                                    create_op(&format!("tx{w}-{j}-b"))
                                ))
                                .unwrap();
                                let mut out = null_mut();
                                let st =
                                    unsafe { gs_engine_transaction(h.p(), txn.as_ptr(), &mut out) };
                                assert_eq!(st, GsStatus::Ok, "{:?}", last_error());
                                let v: Value = serde_json::from_str(&take(out)).unwrap();
                                let mut a = a.lock().unwrap();
                                for id in v["op_ids"].as_array().unwrap() {
                                    a.insert(id.as_str().unwrap().to_owned());
                                }
                            }
                        }
                    })
                })
                .collect();
            let (d2, cy2, b2) = (d.clone(), cy.clone(), b.clone());
            s.spawn(move || {
                b2.wait();
                while !d2.load(Ordering::SeqCst) || cy2.load(Ordering::SeqCst) < 5 {
                    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
                    assert_eq!(unsafe { gs_engine_stop(h.p(), 5000) }, GsStatus::Ok);
                    cy2.fetch_add(1, Ordering::SeqCst);
                }
            });
            let d3 = d.clone();
            s.spawn(move || {
                b.wait();
                while !d3.load(Ordering::SeqCst) {
                    let _ = status(h);
                    let mut out = null_mut();
                    let f = CString::new(r#"{"limit":5}"#).unwrap();
                    assert_eq!(
                        unsafe { gs_engine_ops(h.p(), f.as_ptr(), &mut out) },
                        GsStatus::Ok
                    );
                    take(out);
                    let _ = next_event(h, 0);
                }
            });
            for w in writers {
                w.join().unwrap();
            }
            d.store(true, Ordering::SeqCst);
        });
    });
    assert!(cycles.load(Ordering::SeqCst) >= 5);
    // Leave the runner going: close has to stop it.
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
    close(h);

    let acked = acked.lock().unwrap().clone();
    assert_eq!(
        acked.len(),
        WRITERS * (PER_WRITER + 2 * PER_WRITER.div_ceil(10))
    );
    let h = open(&cfg);
    let stored = all_ops(h);
    assert_eq!(stored.len(), acked.len());
    assert_eq!(op_ids(&stored), acked);
    assert!(stored
        .iter()
        .all(|o| !o["entity_id"].as_str().unwrap().starts_with("bad")));
    close(h);
}

/// Every string handed out through an out-pointer (op id, transaction,
/// status, ops, event) is released by `gs_string_free`, which also accepts
/// NULL.
#[test]
fn every_out_string_is_released_by_gs_string_free() {
    unsafe { gs_string_free(null_mut()) };
    let dir = tempfile::tempdir().unwrap();
    let h = open(&config(&dir.path().join("o.db"), &dead_url(), None));
    for i in 0..50 {
        let op = CString::new(create_op(&format!("s{i}"))).unwrap();
        let mut id = null_mut();
        assert_eq!(
            unsafe { gs_engine_enqueue(h.p(), op.as_ptr(), &mut id) },
            GsStatus::Ok
        );
        assert_eq!(take(id).len(), 36);
        let txn = CString::new(format!("[{}]", create_op(&format!("st{i}")))).unwrap();
        let mut out = null_mut();
        assert_eq!(
            unsafe { gs_engine_transaction(h.p(), txn.as_ptr(), &mut out) },
            GsStatus::Ok
        );
        assert!(take(out).contains("txn_id"));
        let _ = status(h);
        let _ = all_ops(h);
    }
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
    wait_events(h, "an event", |_| true);
    assert_eq!(
        bounded("stop", BOUND, move || unsafe {
            gs_engine_stop(h.p(), 5000)
        }),
        GsStatus::Ok
    );
    assert_eq!(all_ops(h).len(), 100);
    close(h);
}

// ------------------------------------- callbacks replaced or closed mid-call

struct ClearRaceCtx {
    engine: H,
    entered: Mutex<Sender<()>>,
    go: Mutex<Receiver<()>>,
    result: Mutex<Sender<Outcome>>,
    first: AtomicBool,
    use_close: bool,
}

/// On its first event: reports, waits to be let go, then tries to clear
/// itself or close the engine (both refused from inside the callback).
unsafe extern "C" fn clear_race_cb(ud: *mut c_void, _: *const c_char) {
    let ctx = unsafe { &*ud.cast::<ClearRaceCtx>() };
    if ctx.first.swap(true, Ordering::SeqCst) {
        return;
    }
    if let Ok(tx) = ctx.entered.lock() {
        let _ = tx.send(());
    }
    if let Ok(rx) = ctx.go.lock() {
        let _ = rx.recv_timeout(BOUND);
    }
    let o = if ctx.use_close {
        outcome("close", unsafe { gs_engine_close(ctx.engine.p()) })
    } else {
        outcome("set_event_callback(NULL)", unsafe {
            gs_engine_set_event_callback(ctx.engine.p(), None, null_mut())
        })
    };
    if let Ok(tx) = ctx.result.lock() {
        let _ = tx.send(o);
    }
}

fn clear_while_the_callback_calls_in(use_close: bool) {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&config(&dir.path().join("o.db"), &dead_url(), None));
    let (entered_tx, entered) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let (result_tx, result) = mpsc::channel();
    let ctx = Box::into_raw(Box::new(ClearRaceCtx {
        engine: h,
        entered: Mutex::new(entered_tx),
        go: Mutex::new(go_rx),
        result: Mutex::new(result_tx),
        first: AtomicBool::new(false),
        use_close,
    }));
    let st = unsafe { gs_engine_set_event_callback(h.p(), Some(clear_race_cb), ctx.cast()) };
    assert_eq!(st, GsStatus::Ok);
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
    entered.recv_timeout(BOUND).unwrap();
    // The app clears the callback (waiting for it to return) while the
    // callback calls the setter or close.
    let (cleared_tx, cleared) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = cleared_tx.send(unsafe { gs_engine_set_event_callback(h.p(), None, null_mut()) });
    });
    go.send(()).unwrap();
    let from_callback = result
        .recv_timeout(BOUND)
        .expect("the callback's call deadlocked");
    assert_eq!(from_callback.1, GsStatus::WrongThread, "{from_callback:?}");
    assert!(from_callback.2.is_some());
    assert_eq!(
        cleared
            .recv_timeout(BOUND)
            .expect("the app's clear deadlocked"),
        GsStatus::Ok
    );
    close(h);
    drop(unsafe { Box::from_raw(ctx) });
}

/// The app clearing the event callback while that callback tries to clear
/// itself deadlocks neither: the callback's call is refused.
#[test]
fn clearing_the_callback_while_it_calls_the_setter_never_deadlocks() {
    clear_while_the_callback_calls_in(false);
}

/// The app clearing the event callback while that callback tries to close
/// the engine deadlocks neither: the close is refused, the engine stays open.
#[test]
fn clearing_the_callback_while_it_calls_close_never_deadlocks() {
    clear_while_the_callback_calls_in(true);
}

/// A reader waiting long in `next_event` does not hold up another reader's
/// short wait: `next_event(0)` returns at once every time.
#[test]
fn a_long_next_event_holds_up_no_other_reader() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&config(&dir.path().join("o.db"), &dead_url(), None));
    let (long_tx, long) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = long_tx.send(next_event(h, 60_000));
    });
    // Many short reads: the long reader is waiting during most of them.
    let statuses = bounded("short next_event calls", BOUND, move || {
        (0..500).map(|_| next_event(h, 0).0).collect::<Vec<_>>()
    });
    assert!(
        statuses.iter().all(|s| *s == GsStatus::Timeout),
        "{statuses:?}"
    );
    // An event ends the long wait.
    let id = enqueue(h, &create_op("wake"));
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
    let (st, _) = long.recv_timeout(BOUND).expect("the long reader is woken");
    assert_eq!(st, GsStatus::Ok);
    assert!(!id.is_empty());
    close(h);
}

struct SlowTokenCtx {
    entered: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
    /// How long the callback waits to be released before it returns anyway.
    hold: Duration,
    /// Set by the app once the replacement or the close returned.
    returned: AtomicBool,
    used_after: AtomicBool,
}

/// Blocks on its first call until released (or `hold` passes), then reads
/// its data: a use after the app was told it could free it is recorded.
unsafe extern "C" fn slow_token(ud: *mut c_void, _: bool, buf: *mut c_char, len: usize) -> i64 {
    let ctx = unsafe { &*ud.cast::<SlowTokenCtx>() };
    if let Ok(tx) = ctx.entered.lock() {
        let _ = tx.send(());
    }
    if let Ok(rx) = ctx.release.lock() {
        let _ = rx.recv_timeout(ctx.hold);
    }
    if ctx.returned.load(Ordering::SeqCst) {
        ctx.used_after.store(true, Ordering::SeqCst);
    }
    if len <= TOKEN.len() {
        return -1;
    }
    unsafe { std::ptr::copy_nonoverlapping(TOKEN.as_ptr().cast(), buf, TOKEN.len()) };
    i64::try_from(TOKEN.len()).unwrap_or(-1)
}

/// Starts a drain whose token callback is `slow_token` and waits until the
/// callback is running; the app's `leave` (replace, or close: it returns
/// true) then runs on a thread that releases the callback only after
/// `leave` returned.
fn leave_a_running_token_callback(hold: Duration, leave: fn(H) -> bool) {
    let server = Server::start(Faults::default());
    let dir = tempfile::tempdir().unwrap();
    let h = open(&config(&dir.path().join("o.db"), &server.url(), None));
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let ctx = Box::into_raw(Box::new(SlowTokenCtx {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
        hold,
        returned: AtomicBool::new(false),
        used_after: AtomicBool::new(false),
    }));
    let st = unsafe { gs_engine_set_token_callback(h.p(), Some(slow_token), ctx.cast()) };
    assert_eq!(st, GsStatus::Ok);
    enqueue(h, &create_op("a"));
    assert_eq!(unsafe { gs_engine_start(h.p()) }, GsStatus::Ok);
    entered.recv_timeout(BOUND).unwrap();
    let shared = ctx as usize;
    let closed = bounded("leaving the token callback", BOUND + hold, move || {
        let closed = leave(h);
        // SAFETY: the context is freed only after this thread returned.
        let ctx = unsafe { &*(shared as *const SlowTokenCtx) };
        ctx.returned.store(true, Ordering::SeqCst);
        let _ = release.send(());
        closed
    });
    if !closed {
        close(h);
    }
    let used = unsafe { &*ctx }.used_after.load(Ordering::SeqCst);
    drop(unsafe { Box::from_raw(ctx) });
    assert!(
        !used,
        "the token callback ran on after the app was told it had stopped"
    );
}

/// `gs_engine_set_token_callback` returns only once the callback it
/// replaces has returned: the app may free that callback's data then.
#[test]
fn replacing_the_token_callback_waits_for_its_running_call() {
    // The callback gives up waiting after `hold`: without the wait in the
    // replacement, the release (sent after it returns) comes first.
    leave_a_running_token_callback(Duration::from_secs(2), |h| {
        let st = unsafe { gs_engine_set_token_callback(h.p(), None, null_mut()) };
        assert_eq!(st, GsStatus::Ok);
        false
    });
}

/// `gs_engine_close` returns only once a running token callback returned,
/// even past the runtime's own shutdown bound (5 s).
#[test]
fn closing_waits_for_a_running_token_callback() {
    leave_a_running_token_callback(Duration::from_secs(6), |h| {
        close(h);
        true
    });
}

/// A token no request could carry as a bearer token (empty, a line break,
/// a control character, a space or tab, non-ASCII text) is refused at once,
/// by `set_token` and in the configuration at open, with a message that does
/// not quote it, instead of failing every send later as if the network were
/// down or the server had refused it.
#[test]
fn a_token_no_header_can_carry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let bad_tokens = [
        "",
        "abc\r\nX-Evil: 1",
        "bell\u{7}",
        "tab\tbed",
        "Evil x",
        "Évil",
    ];
    for bad in bad_tokens {
        let c = CString::new(config(&path, &dead_url(), Some(bad))).unwrap();
        let mut e = null_mut();
        let st = unsafe { gs_engine_open(c.as_ptr(), &mut e) };
        assert_eq!(st, GsStatus::InvalidArgument, "open with {bad:?}");
        assert!(e.is_null());
        let msg = last_error().expect("a message");
        assert!(!msg.contains("Evil") && !msg.contains("bell"), "{msg}");
    }
    assert!(!path.exists(), "a refused configuration created the outbox");
    let h = open(&config(&path, &dead_url(), None));
    for bad in bad_tokens {
        let t = CString::new(bad).unwrap();
        let (what, st, msg) = outcome("set_token", unsafe {
            gs_engine_set_token(h.p(), t.as_ptr())
        });
        assert_eq!(st, GsStatus::InvalidArgument, "{what} {bad:?}");
        let msg = msg.expect("a message");
        assert!(!msg.contains("Evil") && !msg.contains("bell"), "{msg}");
    }
    let t = CString::new(TOKEN).unwrap();
    assert_eq!(
        unsafe { gs_engine_set_token(h.p(), t.as_ptr()) },
        GsStatus::Ok
    );
    close(h);
}
