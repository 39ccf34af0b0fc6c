//! Helpers the C ABI tests share: a handle that crosses threads, the last
//! error, strings the library returns, and calls under a bound.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks
)]

use std::ffi::{c_char, CStr};
use std::net::TcpListener;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use guardian_sync_ffi::{
    gs_engine_close, gs_last_error_message, gs_string_free, GsEngine, GsStatus,
};

/// An engine handle that may cross threads (the ABI allows it).
#[derive(Clone, Copy, Debug)]
pub struct H(pub *mut GsEngine);

// SAFETY: every gs_ call is documented as safe from any thread.
unsafe impl Send for H {}
// SAFETY: as above.
unsafe impl Sync for H {}

impl H {
    /// The raw handle (a method, so closures capture the `Send` wrapper).
    pub fn p(self) -> *mut GsEngine {
        self.0
    }
}

/// The calling thread's last error message.
pub fn last_error() -> Option<String> {
    let p = gs_last_error_message();
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Copies a string the library returned and frees it with `gs_string_free`.
pub fn take(p: *mut c_char) -> String {
    assert!(
        !p.is_null(),
        "the library returned NULL where a string was due"
    );
    let s = unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned();
    unsafe { gs_string_free(p) };
    s
}

/// Runs `f` on a thread of its own and fails the test if it does not return
/// within `limit` (a deadlock) or panics.
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => panic!("{what}: no return within {limit:?} (deadlock)"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: the thread panicked"),
    }
}

/// A URL where nothing listens: a port that was free a moment ago.
pub fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

pub fn close(h: H) {
    let st = bounded("close", Duration::from_secs(15), move || unsafe {
        gs_engine_close(h.p())
    });
    assert_eq!(st, GsStatus::Ok);
}
