//! The C ABI of guardian-sync, for apps in Dart/Flutter (`dart:ffi`),
//! Swift, Kotlin, C and C++. The header is `include/guardian_sync.h`,
//! generated from this file by cbindgen (a test checks it is current).
//!
//! # Rules of the boundary
//!
//! - A `GsEngine*` is an opaque handle from [`gs_engine_open`], valid until
//!   [`gs_engine_close`] returns `GS_STATUS_OK`. Every call on it is safe
//!   from any thread, concurrently; `gs_engine_close` must be the last one.
//! - Every call returns a [`GsStatus`]: `GS_STATUS_OK` (0), a positive
//!   non-error outcome (`GS_STATUS_TIMEOUT`), or a negative error whose
//!   message [`gs_last_error_message`] returns on the same thread.
//! - Text in is NUL-terminated UTF-8, borrowed for the call only. Text out
//!   (`char **out_…`) is a NUL-terminated UTF-8 string owned by the caller,
//!   to be released with [`gs_string_free`] (never with `free`).
//! - No panic crosses the boundary: one is caught and reported as
//!   `GS_STATUS_PANIC`.
//! - Calls block the calling thread (an enqueue until its commit is
//!   durable): never call from a thread that must not block (a UI thread).
//!
//! The safe core, [`Engine`], is also the Rust API the Python binding uses.

mod config;
mod error;
mod handle;

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

pub use config::{Config, FilterJson, OpJson};
pub use error::{FfiError, GsStatus};
pub use handle::{Engine, EventCallback, TokenCallback};

/// An open engine (opaque).
#[derive(Debug)]
pub struct GsEngine {
    inner: Engine,
}

/// Receives one event as JSON. Called on the engine's event thread (not the
/// thread that registered it); `event_json` is borrowed for the call only.
/// It may call any `gs_` function except `gs_engine_set_event_callback` and
/// `gs_engine_close` (those return `GS_STATUS_WRONG_THREAD` there).
pub type GsEventCallback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, event_json: *const c_char)>;

/// Supplies a bearer token: writes it NUL-terminated into `buf` (of
/// `buf_len` bytes) and returns its length without the NUL, or a negative
/// value if no token can be had. A return of `buf_len` or more means "my
/// token is that long": the call is repeated once with a buffer big enough.
/// `refresh` is true after the server refused the previous token. Called on
/// one of the engine's blocking threads; it may block.
pub type GsTokenCallback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        refresh: bool,
        buf: *mut c_char,
        buf_len: usize,
    ) -> i64,
>;

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_last_error(message: &str) {
    // A message with a NUL inside is cut there rather than lost.
    let bytes: Vec<u8> = message.bytes().take_while(|b| *b != 0).collect();
    let c = CString::new(bytes).ok();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn invalid(message: impl Into<String>) -> FfiError {
    FfiError::new(GsStatus::InvalidArgument, message)
}

/// Runs `f` with panics caught: a panic (a bug in the engine) becomes a
/// [`GsStatus::Panic`] error, so it never unwinds into the caller's
/// language (C, or Python, where PyO3 would raise a `BaseException`).
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T, FfiError>) -> Result<T, FfiError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".to_owned());
        Err(FfiError::new(
            GsStatus::Panic,
            format!("internal error (a bug): panic: {what}"),
        ))
    })
}

/// Runs one call: clears the thread's last error, catches panics, and turns
/// an error into its code and message.
fn guard(f: impl FnOnce() -> Result<GsStatus, FfiError>) -> GsStatus {
    LAST_ERROR.with(|e| *e.borrow_mut() = None);
    match catch_panic(f) {
        Ok(status) => status,
        Err(e) => {
            set_last_error(&e.message);
            e.code
        }
    }
}

/// Borrows a NUL-terminated UTF-8 argument.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string valid for `'a`.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, FfiError> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-null, and the caller guarantees a NUL-terminated string
    // that outlives the call.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

/// Borrows the engine behind a handle.
///
/// # Safety
/// `p` is null or a handle from `gs_engine_open` not yet closed.
unsafe fn engine<'a>(p: *const GsEngine) -> Result<&'a Engine, FfiError> {
    if p.is_null() {
        return Err(invalid("engine is NULL"));
    }
    // SAFETY: the caller guarantees a live handle; the engine is Sync, so a
    // shared reference may be used from this thread.
    Ok(unsafe { &(*p).inner })
}

/// Checks an out-pointer before any work is done.
fn out_ptr<T>(p: *mut T, what: &str) -> Result<(), FfiError> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    Ok(())
}

/// Stores a string for the caller (to be freed with `gs_string_free`).
///
/// # Safety
/// `out` is non-null and points to writable storage for a pointer.
unsafe fn give(out: *mut *mut c_char, s: String) -> Result<(), FfiError> {
    let c = CString::new(s).map_err(|_| invalid("result contains a NUL byte"))?;
    // SAFETY: the caller checked `out` with `out_ptr` and guarantees it
    // points to writable storage for a pointer.
    unsafe { out.write(c.into_raw()) };
    Ok(())
}

/// Opens (or creates) the outbox and builds an engine from a JSON
/// configuration; the runner is not started. On success `*out_engine`
/// holds a handle to release with [`gs_engine_close`].
///
/// The configuration is an object: `outbox_path` and `server_url` are
/// required; `token`, `retry` (`base_ms`, `factor`, `cap_ms`,
/// `max_attempts`, `max_retry_after_ms`), `breaker` (`failure_threshold`,
/// `window_ms`, `cooldown_ms`, `trial_wait_ms`), `lock`
/// (`heartbeat_interval_ms`, `stale_after_ms`), `batch` (`max_ops`,
/// `max_bytes`; batching is on by default, `max_ops` 0 sends one request
/// per op), `concurrency`, `synchronous` (`full`, `normal`, `off`),
/// `connect_timeout_ms`, `request_timeout_ms`, `owner_id`,
/// `worker_threads` and `stall_after_ms` are optional. Unknown keys are
/// refused, and so is a `token` `gs_engine_set_token` would refuse.
///
/// # Safety
/// `config_json` is a NUL-terminated string; `out_engine` points to
/// writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_open(
    config_json: *const c_char,
    out_engine: *mut *mut GsEngine,
) -> GsStatus {
    guard(|| {
        out_ptr(out_engine, "out_engine")?;
        // SAFETY: forwarded from this function's contract.
        let text = unsafe { text(config_json, "config_json") }?;
        let inner = Engine::open(&Config::parse(text)?)?;
        let handle = Box::into_raw(Box::new(GsEngine { inner }));
        // SAFETY: checked non-null above; the caller guarantees it is writable.
        unsafe { out_engine.write(handle) };
        Ok(GsStatus::Ok)
    })
}

/// Stops the runner and the event thread, closes the outbox, shuts the
/// engine's runtime down and frees the handle. `NULL` is accepted. After
/// `GS_STATUS_OK` the handle is gone; on `GS_STATUS_WRONG_THREAD` (called
/// from the event or the token callback) it is still open. Waits for a
/// running event or token callback to return.
///
/// # Safety
/// `engine` is null or an open handle, and no other call on it is running
/// or will start.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_close(engine: *mut GsEngine) -> GsStatus {
    guard(|| {
        if engine.is_null() {
            return Ok(GsStatus::Ok);
        }
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { self::engine(engine) }?;
        if e.on_event_thread() || e.in_token_callback() {
            return Err(FfiError::new(
                GsStatus::WrongThread,
                "the engine cannot be closed from inside one of its callbacks",
            ));
        }
        // Callbacks may still call in until this returns: the engine is
        // freed only after, when nothing can reach it any more.
        e.shutdown();
        // SAFETY: the handle came from `Box::into_raw` in `gs_engine_open`
        // and the caller guarantees nothing else uses it any more.
        drop(unsafe { Box::from_raw(engine) });
        Ok(GsStatus::Ok)
    })
}

/// Durably records an op: returns once it is committed to the outbox file
/// (a crash after that cannot lose it), and wakes the runner. The op is a
/// JSON object: `kind` (`create`, `update`, `delete`), `entity_type`,
/// `entity_id`, `payload` (an object; absent for a delete), and optionally
/// `base`, `base_version` and `txn_token`. If `out_op_id` is not NULL it
/// receives the id of the op that carries the change (free it with
/// [`gs_string_free`]). On an error nothing was stored, except after
/// `GS_STATUS_OUTCOME_UNKNOWN`.
///
/// # Safety
/// `engine` is an open handle; `op_json` is a NUL-terminated string;
/// `out_op_id` is NULL or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_enqueue(
    engine: *const GsEngine,
    op_json: *const c_char,
    out_op_id: *mut *mut c_char,
) -> GsStatus {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { self::engine(engine) }?;
        // SAFETY: forwarded from this function's contract.
        let op = unsafe { text(op_json, "op_json") }?;
        let done = e.enqueue(op)?;
        if !out_op_id.is_null() {
            // SAFETY: non-null, and the caller guarantees it is writable.
            unsafe { give(out_op_id, done.op_id.to_string()) }?;
        }
        Ok(GsStatus::Ok)
    })
}

/// Durably records several ops as one atomic transaction: all of them are
/// committed to the outbox file together (or, on an error, none), sent as
/// one unit once every earlier op of each of their entities is
/// acknowledged, and applied by the server all or none. `ops_json` is a
/// JSON array of ops as [`gs_engine_enqueue`] takes them (1 to 100; each
/// may also name op ids it waits for in `depends_on`). If `out_json` is not
/// NULL it receives `{"txn_id": "…", "op_ids": ["…", …]}` (free it with
/// [`gs_string_free`]). Events report `transaction_committed` or
/// `transaction_failed`.
///
/// # Safety
/// `engine` is an open handle; `ops_json` is a NUL-terminated string;
/// `out_json` is NULL or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_transaction(
    engine: *const GsEngine,
    ops_json: *const c_char,
    out_json: *mut *mut c_char,
) -> GsStatus {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { self::engine(engine) }?;
        // SAFETY: forwarded from this function's contract.
        let ops = unsafe { text(ops_json, "ops_json") }?;
        let done = e.transaction(ops)?;
        if !out_json.is_null() {
            let json = serde_json::json!({
                "txn_id": done.txn_id.to_string(),
                "op_ids": done.ops.iter().map(|o| o.op_id.to_string()).collect::<Vec<_>>(),
            });
            // SAFETY: non-null, and the caller guarantees it is writable.
            unsafe { give(out_json, json.to_string()) }?;
        }
        Ok(GsStatus::Ok)
    })
}

/// Starts the background runner on the engine's own runtime: it waits for
/// the processing lock, drains, sleeps until the next op is due or a new one
/// is enqueued, and repeats until [`gs_engine_stop`] or
/// [`gs_engine_close`]. `GS_STATUS_ALREADY_RUNNING` if it runs.
///
/// # Safety
/// `engine` is an open handle.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_start(engine: *const GsEngine) -> GsStatus {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        unsafe { self::engine(engine) }?.start()?;
        Ok(GsStatus::Ok)
    })
}

/// Stops the runner, waiting up to `timeout_ms` for it to release the lock
/// (requests in flight are abandoned; their ops are re-sent with the same
/// idempotency key later; answers already received are recorded and their
/// events published first). A runner still busy then is aborted and
/// `GS_STATUS_STOP_TIMEOUT` returned. Stopping a stopped runner is OK.
///
/// # Safety
/// `engine` is an open handle.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_stop(engine: *const GsEngine, timeout_ms: u32) -> GsStatus {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { self::engine(engine) }?;
        e.stop(Duration::from_millis(u64::from(timeout_ms)))?;
        Ok(GsStatus::Ok)
    })
}

/// Waits up to `timeout_ms` for the next event. On `GS_STATUS_OK`
/// `*out_event_json` holds it as a JSON object whose `event` member names
/// it (free it with [`gs_string_free`]); on `GS_STATUS_TIMEOUT` it is set to
/// NULL. Events are those published since the engine was opened; a reader
/// more than 1024 events behind gets `{"event":"lagged","missed":N}` in
/// place of those it missed. Concurrent callers share one queue. A wait
/// under way when the engine starts to close ends with `GS_STATUS_CLOSED`.
///
/// # Safety
/// `engine` is an open handle; `out_event_json` points to writable storage
/// for a pointer.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_next_event(
    engine: *const GsEngine,
    timeout_ms: u32,
    out_event_json: *mut *mut c_char,
) -> GsStatus {
    guard(|| {
        out_ptr(out_event_json, "out_event_json")?;
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { self::engine(engine) }?;
        // SAFETY: checked non-null above; the caller guarantees it is writable.
        unsafe { out_event_json.write(std::ptr::null_mut()) };
        match e.next_event(Duration::from_millis(u64::from(timeout_ms)))? {
            Some(json) => {
                // SAFETY: as above.
                unsafe { give(out_event_json, json) }?;
                Ok(GsStatus::Ok)
            }
            None => Ok(GsStatus::Timeout),
        }
    })
}

/// A `*mut c_void` the app declared usable from any thread.
struct UserData(*mut c_void);

// SAFETY: the registering functions document that `user_data` is used from
// the engine's threads; the app promises it may be.
unsafe impl Send for UserData {}
// SAFETY: as for `Send`; the engine only passes the pointer back.
unsafe impl Sync for UserData {}

impl UserData {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(&self) -> *mut c_void {
        self.0
    }
}

/// Calls `callback(user_data, event_json)` for every event from now on, on a
/// thread of the engine's (one at a time, in order), replacing any earlier
/// callback; a NULL `callback` removes it. Waits for a running callback to
/// return before replacing it. `user_data` is passed back untouched and
/// must be usable from that thread until the callback is replaced or the
/// engine closed. Events are also still queued for
/// [`gs_engine_next_event`]. From inside the event or the token callback it
/// returns `GS_STATUS_WRONG_THREAD`; once a close has begun, `GS_STATUS_CLOSED`.
///
/// # Safety
/// `engine` is an open handle; `callback` is NULL or a function that is
/// safe to call with `user_data` and a borrowed string from another thread.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_set_event_callback(
    engine: *const GsEngine,
    callback: GsEventCallback,
    user_data: *mut c_void,
) -> GsStatus {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { self::engine(engine) }?;
        let callback: Option<EventCallback> = callback.map(|cb| {
            let ud = UserData(user_data);
            Box::new(move |json: &str| {
                // JSON text never holds a NUL byte (serde escapes it).
                if let Ok(c) = CString::new(json) {
                    // SAFETY: the caller guarantees `cb` may be called with
                    // `user_data` from this thread; the string lives for
                    // the call.
                    unsafe { cb(ud.get(), c.as_ptr()) };
                }
            }) as EventCallback
        });
        e.set_event_callback(callback)?;
        Ok(GsStatus::Ok)
    })
}

/// Queue depth and engine state: `pending`, `in_flight`, `failed`,
/// `oldest_created_at` and `next_attempt_at` (Unix ms or null), `running`,
/// `breaker` (`closed`, `open`, `half_open`), `owner_id`, and
/// `runner_error` (why the runner stopped by itself, or null). Free
/// `*out_status_json` with [`gs_string_free`].
///
/// # Safety
/// `engine` is an open handle; `out_status_json` points to writable storage
/// for a pointer.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_status(
    engine: *const GsEngine,
    out_status_json: *mut *mut c_char,
) -> GsStatus {
    guard(|| {
        out_ptr(out_status_json, "out_status_json")?;
        // SAFETY: forwarded from this function's contract.
        let json = unsafe { self::engine(engine) }?.status()?;
        // SAFETY: checked non-null above; the caller guarantees it is writable.
        unsafe { give(out_status_json, json) }?;
        Ok(GsStatus::Ok)
    })
}

/// The ops in the outbox, oldest first, as a JSON array of objects (`seq`,
/// `op_id`, `kind`, `entity_type`, `entity_id`, `payload`, `state`
/// (`pending`, `in_flight`, `failed`), `attempts`, `last_error`, ...).
/// `filter_json` is NULL or an object with optional `state`, `limit`
/// (default 100) and `after_seq` (for paging). Free `*out_ops_json` with
/// [`gs_string_free`].
///
/// # Safety
/// `engine` is an open handle; `filter_json` is NULL or a NUL-terminated
/// string; `out_ops_json` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_ops(
    engine: *const GsEngine,
    filter_json: *const c_char,
    out_ops_json: *mut *mut c_char,
) -> GsStatus {
    guard(|| {
        out_ptr(out_ops_json, "out_ops_json")?;
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { self::engine(engine) }?;
        let filter = if filter_json.is_null() {
            ""
        } else {
            // SAFETY: non-null, so a NUL-terminated string by the contract.
            unsafe { text(filter_json, "filter_json") }?
        };
        let json = e.ops(filter)?;
        // SAFETY: checked non-null above; the caller guarantees it is writable.
        unsafe { give(out_ops_json, json) }?;
        Ok(GsStatus::Ok)
    })
}

/// Runs an op-id call: the handle and the id text borrowed, then `f`.
///
/// # Safety
/// As for the public functions that call it.
unsafe fn with_op(
    engine: *const GsEngine,
    op_id: *const c_char,
    f: impl FnOnce(&Engine, &str) -> Result<(), FfiError>,
) -> GsStatus {
    guard(|| {
        // SAFETY: forwarded from the caller's contract.
        let e = unsafe { self::engine(engine) }?;
        // SAFETY: forwarded from the caller's contract.
        let id = unsafe { text(op_id, "op_id") }?;
        f(e, id)?;
        Ok(GsStatus::Ok)
    })
}

/// Puts a failed (dead-letter) op back in the queue, due now, and wakes the
/// runner. `GS_STATUS_WRONG_STATE` if the op is not failed.
///
/// # Safety
/// `engine` is an open handle; `op_id` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_retry(
    engine: *const GsEngine,
    op_id: *const c_char,
) -> GsStatus {
    // SAFETY: forwarded from this function's contract.
    unsafe { with_op(engine, op_id, Engine::retry) }
}

/// Puts every failed op back in the queue; `*out_count` (if not NULL)
/// receives how many.
///
/// # Safety
/// `engine` is an open handle; `out_count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_retry_all(
    engine: *const GsEngine,
    out_count: *mut u64,
) -> GsStatus {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let n = unsafe { self::engine(engine) }?.retry_all()?;
        if !out_count.is_null() {
            // SAFETY: non-null, and the caller guarantees it is writable.
            unsafe { out_count.write(n) };
        }
        Ok(GsStatus::Ok)
    })
}

/// Removes a failed op for good. `GS_STATUS_WRONG_STATE` if it is not failed.
///
/// # Safety
/// `engine` is an open handle; `op_id` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_discard(
    engine: *const GsEngine,
    op_id: *const c_char,
) -> GsStatus {
    // SAFETY: forwarded from this function's contract.
    unsafe { with_op(engine, op_id, Engine::discard) }
}

/// Removes an op that was never attempted (its transaction token fails as
/// `cancelled`). `GS_STATUS_WRONG_STATE` once a send was started.
///
/// # Safety
/// `engine` is an open handle; `op_id` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_cancel(
    engine: *const GsEngine,
    op_id: *const c_char,
) -> GsStatus {
    // SAFETY: forwarded from this function's contract.
    unsafe { with_op(engine, op_id, Engine::cancel) }
}

/// Replaces the bearer token (used from the next request on) and resumes a
/// runner paused by an `auth_required` event. The engine keeps the token in
/// memory only and never logs it. A token that cannot travel as a bearer
/// token (empty, or holding a space, a control character or non-ASCII
/// text) is refused with `GS_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `engine` is an open handle; `token` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_set_token(
    engine: *const GsEngine,
    token: *const c_char,
) -> GsStatus {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { self::engine(engine) }?;
        // SAFETY: forwarded from this function's contract.
        let t = unsafe { text(token, "token") }?;
        e.set_token(t)?;
        Ok(GsStatus::Ok)
    })
}

/// Largest token a token callback may return.
const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// Asks a C token callback, growing the buffer once if the token is longer.
fn call_token_callback(
    cb: unsafe extern "C" fn(*mut c_void, bool, *mut c_char, usize) -> i64,
    ud: &UserData,
    refresh: bool,
) -> Result<String, String> {
    let mut len = 4096;
    for _ in 0..2 {
        let mut buf = vec![0u8; len];
        // SAFETY: the registrant guarantees `cb` is safe to call with
        // `user_data` from this thread; `buf` is writable for `len` bytes.
        let n = unsafe { cb(ud.get(), refresh, buf.as_mut_ptr().cast(), len) };
        let n = usize::try_from(n).map_err(|_| "the token callback has no token".to_owned())?;
        if n < len {
            buf.truncate(n);
            return String::from_utf8(buf)
                .map_err(|_| "the token callback returned text that is not UTF-8".to_owned());
        }
        if n >= MAX_TOKEN_BYTES {
            break;
        }
        len = n + 1;
    }
    Err("the token callback returned a token that is too long".to_owned())
}

/// Takes bearer tokens from `callback` from now on (see
/// [`GsTokenCallback`]); NULL goes back to the token set with
/// [`gs_engine_set_token`]. Also resumes a runner paused by
/// `auth_required`. `user_data` is passed back untouched and must be usable
/// from the engine's threads until the callback is replaced or the engine
/// closed: both return only once no call of the callback is running, and
/// both return `GS_STATUS_WRONG_THREAD` from inside the callback.
///
/// # Safety
/// `engine` is an open handle; `callback` is NULL or a function that is safe
/// to call with `user_data` and a writable buffer from another thread.
#[no_mangle]
pub unsafe extern "C" fn gs_engine_set_token_callback(
    engine: *const GsEngine,
    callback: GsTokenCallback,
    user_data: *mut c_void,
) -> GsStatus {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { self::engine(engine) }?;
        let callback: Option<TokenCallback> = callback.map(|cb| {
            let ud = UserData(user_data);
            Arc::new(move |refresh: bool| call_token_callback(cb, &ud, refresh)) as TokenCallback
        });
        e.set_token_callback(callback)?;
        Ok(GsStatus::Ok)
    })
}

/// The message of the last error on this thread, or NULL if the last call
/// succeeded. Owned by the library: valid until the next `gs_` call on this
/// thread; do not free it.
#[no_mangle]
pub extern "C" fn gs_last_error_message() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}

/// Frees a string returned through a `char **out_…` parameter. NULL is
/// accepted.
///
/// # Safety
/// `s` is NULL or a string this library returned and that was not freed yet.
#[no_mangle]
pub unsafe extern "C" fn gs_string_free(s: *mut c_char) {
    if s.is_null() {
        return;
    }
    // Freeing cannot panic; no guard needed.
    // SAFETY: `s` came from `CString::into_raw` in this library and the
    // caller guarantees it was not freed before.
    drop(unsafe { CString::from_raw(s) });
}

const VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => c"unknown",
    };

/// The library's version (static; do not free).
#[no_mangle]
pub extern "C" fn gs_version() -> *const c_char {
    VERSION.as_ptr()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn last_error() -> Option<String> {
        let p = gs_last_error_message();
        // SAFETY: non-null pointers from gs_last_error_message point to a
        // NUL-terminated string valid until the next call on this thread.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    #[test]
    fn a_panic_becomes_a_code_and_a_message() {
        let status = guard(|| panic!("boom at the boundary"));
        assert_eq!(status, GsStatus::Panic);
        assert!(last_error().unwrap().contains("boom at the boundary"));
        // The next successful call clears the message.
        assert_eq!(guard(|| Ok(GsStatus::Ok)), GsStatus::Ok);
        assert_eq!(last_error(), None);
    }

    #[test]
    fn invalid_utf8_and_nulls_are_refused() {
        let bad = [0xffu8, 0xfe, 0];
        let mut e: *mut GsEngine = std::ptr::null_mut();
        // SAFETY: a NUL-terminated (if not UTF-8) string and a writable out-pointer.
        let status = unsafe { gs_engine_open(bad.as_ptr().cast(), &mut e) };
        assert_eq!(status, GsStatus::InvalidArgument);
        assert!(e.is_null());
        assert!(last_error().unwrap().contains("UTF-8"));
        // SAFETY: NULL handles are checked before use.
        let status = unsafe { gs_engine_status(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(status, GsStatus::InvalidArgument);
    }
}
