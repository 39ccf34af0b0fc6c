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
}

#[pymethods]
impl NativeEngine {
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Self> {
        let config = Config::parse(config_json).map_err(err)?;
        let engine = py.allow_threads(|| Engine::open(&config)).map_err(err)?;
        Ok(Self {
            inner: Mutex::new(Some(Arc::new(engine))),
        })
    }

    fn enqueue(&self, py: Python<'_>, op_json: &str) -> PyResult<String> {
        let e = self.get()?;
        let done = py.allow_threads(|| e.enqueue(op_json)).map_err(err)?;
        Ok(done.op_id.to_string())
    }

    fn transaction(&self, py: Python<'_>, ops_json: &str) -> PyResult<(String, Vec<String>)> {
        let e = self.get()?;
        let done = py.allow_threads(|| e.transaction(ops_json)).map_err(err)?;
        Ok((
            done.txn_id.to_string(),
            done.ops.iter().map(|o| o.op_id.to_string()).collect(),
        ))
    }

    fn start(&self) -> PyResult<()> {
        self.get()?.start().map_err(err)
    }

    fn stop(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let e = self.get()?;
        let d = seconds(timeout)?;
        py.allow_threads(|| e.stop(d)).map_err(err)
    }

    fn running(&self) -> PyResult<bool> {
        Ok(self.get()?.running())
    }

    fn next_event(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<String>> {
        let e = self.get()?;
        let d = seconds(timeout)?;
        py.allow_threads(|| e.next_event(d)).map_err(err)
    }

    fn status(&self, py: Python<'_>) -> PyResult<String> {
        let e = self.get()?;
        py.allow_threads(|| e.status()).map_err(err)
    }

    fn ops(&self, py: Python<'_>, filter_json: &str) -> PyResult<String> {
        let e = self.get()?;
        py.allow_threads(|| e.ops(filter_json)).map_err(err)
    }

    fn retry(&self, py: Python<'_>, op_id: &str) -> PyResult<()> {
        let e = self.get()?;
        py.allow_threads(|| e.retry(op_id)).map_err(err)
    }

    fn retry_all(&self, py: Python<'_>) -> PyResult<u64> {
        let e = self.get()?;
        py.allow_threads(|| e.retry_all()).map_err(err)
    }

    fn discard(&self, py: Python<'_>, op_id: &str) -> PyResult<()> {
        let e = self.get()?;
        py.allow_threads(|| e.discard(op_id)).map_err(err)
    }

    fn cancel(&self, py: Python<'_>, op_id: &str) -> PyResult<()> {
        let e = self.get()?;
        py.allow_threads(|| e.cancel(op_id)).map_err(err)
    }

    fn set_token(&self, token: &str) -> PyResult<()> {
        self.get()?.set_token(token).map_err(err)
    }

    /// `callback(refresh: bool) -> str`, called on an engine thread with the GIL held.
    #[pyo3(signature = (callback))]
    fn set_token_callback(&self, py: Python<'_>, callback: Option<PyObject>) -> PyResult<()> {
        let e = self.get()?;
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
        py.allow_threads(|| e.set_token_callback(callback))
            .map_err(err)
    }

    fn close(&self, py: Python<'_>) {
        let engine = self.slot().take();
        // Dropping the last reference stops the runner and joins threads
        // that may need the GIL (a token callback): release it meanwhile.
        py.allow_threads(move || drop(engine));
    }
}

#[pymodule]
fn _guardian_sync(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeEngine>()?;
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
