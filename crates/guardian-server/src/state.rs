//! Shared state of the request handlers.

use std::sync::Arc;

use tokio::sync::{watch, Semaphore};

use crate::config::ServerConfig;
use crate::faults::FaultInjector;
use crate::inflight::InFlight;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::store::Store;

/// Everything a handler may touch; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) store: Store,
    pub(crate) faults: Arc<FaultInjector>,
    pub(crate) inflight: Arc<InFlight>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rate: Arc<RateLimiter>,
    pub(crate) concurrency: Arc<Semaphore>,
    /// Becomes true when the server shuts down.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Bumped to close every realtime session (admin route, tests).
    pub(crate) kick: Arc<watch::Sender<u64>>,
}
