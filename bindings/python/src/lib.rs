//! Native half of the `guardian_sync` Python package: a thin layer over the
//! safe core of `guardian-sync-ffi`. The package's Python half
//! (`python/guardian_sync/__init__.py`) adds the typed exceptions, the
//! context manager and the event iterators. Every blocking call releases the
//! GIL.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use guardian_sync_ffi::{Config, Engine, FfiError, GsStatus, TokenCallback};
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    _guardian_sync,
    NativeError,
    PyException,
    "An engine call failed: args are (code, message)."
);

fn err(e: FfiError) -> PyErr {
    NativeError::new_err((e.code as i32, e.message))
}

/// Long waits are cut into slices of this: Python acts on Ctrl-C only
/// between them.
const WAIT_SLICE: Duration = Duration::from_millis(100);

fn seconds(s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| PyValueError::new_err(format!("invalid timeout {s}: expected seconds >= 0")))
}

/// An open engine; `close` (or dropping it) stops the runner and closes the outbox.
#[pyclass(frozen, module = "guardian_sync._guardian_sync")]
struct NativeEngine {
    inner: Mutex<Option<Arc<Engine>>>,
}

impl NativeEngine {
    fn slot(&self) -> MutexGuard<'_, Option<Arc<Engine>>> {
        // The slot is replaced whole; a panic cannot leave it half-updated.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self) -> PyResult<Arc<Engine>> {
        self.slot()
            .clone()
            .ok_or_else(|| err(FfiError::new(GsStatus::Closed, "the engine is closed")))
    }

    /// Runs `f` on the engine with the GIL released, and drops this call's
    /// handle there too: if a concurrent `close` took the slot's handle,
    /// this one is the last, and closing waits for a running token
    /// callback, which needs the GIL.
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Engine) -> Result<T, FfiError> + Send,
    ) -> PyResult<T> {
        let e = self.get()?;
        py.allow_threads(move || {
            let r = guardian_sync_ffi::catch_panic(|| f(&e));
            drop(e);
            r
        })
        .map_err(err)
    }
}

impl Drop for NativeEngine {
    fn drop(&mut self) {
        let engine = self
            .inner
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(engine) = engine {
            // Collected without `close`: the GIL is held here, and closing
            // may wait for a token callback that needs it.
            Python::with_gil(|py| py.allow_threads(move || drop(engine)));
        }
    }
}

#[pymethods]
impl NativeEngine {
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Self> {
        let config = Config::parse(config_json).map_err(err)?;
        let engine = py
            .allow_threads(|| guardian_sync_ffi::catch_panic(|| Engine::open(&config)))
            .map_err(err)?;
        Ok(Self {
            inner: Mutex::new(Some(Arc::new(engine))),
        })
    }

    fn enqueue(&self, py: Python<'_>, op_json: &str) -> PyResult<String> {
        let done = self.call(py, |e| e.enqueue(op_json))?;
        Ok(done.op_id.to_string())
    }

    fn transaction(&self, py: Python<'_>, ops_json: &str) -> PyResult<(String, Vec<String>)> {
        let done = self.call(py, |e| e.transaction(ops_json))?;
        Ok((
            done.txn_id.to_string(),
            done.ops.iter().map(|o| o.op_id.to_string()).collect(),
        ))
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, Engine::start)
    }

    fn stop(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let d = seconds(timeout)?;
        self.call(py, |e| e.stop(d))
    }

    fn running(&self, py: Python<'_>) -> PyResult<bool> {
        self.call(py, |e| Ok(e.running()))
    }

    fn next_event(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<String>> {
        let d = seconds(timeout)?;
        let deadline = std::time::Instant::now().checked_add(d);
        loop {
            let left = deadline.map_or(WAIT_SLICE, |t| {
                t.saturating_duration_since(std::time::Instant::now())
            });
            let wait = left.min(WAIT_SLICE);
            if let Some(event) = self.call(py, |e| e.next_event(wait))? {
                return Ok(Some(event));
            }
            py.check_signals()?;
            if deadline.is_some() && left <= WAIT_SLICE {
                return Ok(None);
            }
        }
    }

    fn status(&self, py: Python<'_>) -> PyResult<String> {
        self.call(py, Engine::status)
    }

    fn ops(&self, py: Python<'_>, filter_json: &str) -> PyResult<String> {
        self.call(py, |e| e.ops(filter_json))
    }

    fn retry(&self, py: Python<'_>, op_id: &str) -> PyResult<()> {
        self.call(py, |e| e.retry(op_id))
    }

    fn retry_all(&self, py: Python<'_>) -> PyResult<u64> {
        self.call(py, Engine::retry_all)
    }

    fn discard(&self, py: Python<'_>, op_id: &str) -> PyResult<()> {
        self.call(py, |e| e.discard(op_id))
    }

    fn cancel(&self, py: Python<'_>, op_id: &str) -> PyResult<()> {
        self.call(py, |e| e.cancel(op_id))
    }

    fn set_token(&self, py: Python<'_>, token: &str) -> PyResult<()> {
        self.call(py, |e| e.set_token(token))
    }

    /// `callback(refresh: bool) -> str`, called on an engine thread with the GIL held.
    #[pyo3(signature = (callback))]
    fn set_token_callback(&self, py: Python<'_>, callback: Option<PyObject>) -> PyResult<()> {
        let callback = callback.map(|cb| {
            Arc::new(move |refresh: bool| {
                Python::with_gil(|py| {
                    cb.call1(py, (refresh,))
                        .and_then(|t| t.extract::<String>(py))
                        .map_err(|e| format!("the token callback failed: {e}"))
                })
            }) as TokenCallback
        });
        // Waits for a running call of the old callback, which needs the GIL.
        self.call(py, move |e| e.set_token_callback(callback))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let engine = {
            let mut slot = self.slot();
            if slot.as_ref().is_some_and(|e| e.in_token_callback()) {
                // Closing waits for the token callback: it would wait here
                // for itself.
                return Err(err(FfiError::new(
                    GsStatus::WrongThread,
                    "the engine cannot be closed from inside its token callback",
                )));
            }
            slot.take()
        };
        let Some(engine) = engine else {
            return Ok(());
        };
        // Shut down through the shared handle, so that a call under way on
        // another thread (which holds a handle of its own) cannot keep the
        // engine open; it returns CLOSED or finishes. Shutting down waits
        // for a running token callback, which may hang and needs the GIL:
        // it runs on a thread of its own while this one waits with the GIL
        // released, in slices, so that Ctrl-C ends the wait (the engine
        // then finishes closing in the background).
        let (done, closed) = std::sync::mpsc::channel::<()>();
        let fallback = Arc::clone(&engine);
        let spawned = std::thread::Builder::new()
            .name("gsync-close".into())
            .spawn(move || {
                engine.shutdown();
                drop(engine);
                let _ = done.send(());
            });
        if spawned.is_err() {
            // No thread to spare: close here, as long as it takes.
            py.allow_threads(move || {
                fallback.shutdown();
                drop(fallback);
            });
            return Ok(());
        }
        py.allow_threads(move || drop(fallback));
        let mut closed = closed;
        loop {
            // The receiver goes to the GIL-free side and back (it is not Sync).
            let (r, back) = py.allow_threads(move || (closed.recv_timeout(WAIT_SLICE), closed));
            closed = back;
            match r {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => py.check_signals()?,
                Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }
}

#[pymodule]
fn _guardian_sync(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeEngine>()?;
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
