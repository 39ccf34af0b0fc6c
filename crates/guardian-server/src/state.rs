//! Shared state of the request handlers.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRef;
use tokio::sync::{watch, Semaphore};

use crate::auth::Digest;
use crate::budget::Budget;
use crate::config::ServerConfig;
use crate::faults::FaultInjector;
use crate::fleet::webhook::Webhook;
use crate::fleet::Fleet;
use crate::inflight::InFlight;
use crate::limits::{AuthLockout, RateLimiter};
use crate::metrics::Metrics;
use crate::problem::BodyLimit;
use crate::store::Store;

/// Everything a handler may touch; cheap to clone: one reference count
/// (each middleware layer and extractor clones it per request).
#[derive(Debug, Clone)]
pub(crate) struct AppState(Arc<Shared>);

impl AppState {
    pub(crate) fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The state behind [`AppState`].
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Arc<ServerConfig>,
    /// The tenants by their tokens' digests (`auth::tenants_by_digest`).
    pub(crate) tenants: HashMap<Digest, Arc<str>>,
    pub(crate) store: Store,
    pub(crate) faults: Arc<FaultInjector>,
    pub(crate) inflight: Arc<InFlight>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rate: Arc<RateLimiter>,
    /// Addresses that failed the admin token too often.
    pub(crate) lockout: AuthLockout,
    pub(crate) concurrency: Arc<Semaphore>,
    /// Bytes of request bodies that may be held at once.
    pub(crate) body_budget: Budget,
    /// Bytes of feed pages and large answers held at once (see
    /// `ServerBuilder::answer_budget`).
    pub(crate) answer_budget: Budget,
    /// Becomes true when the server shuts down.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Bumped to close every realtime session (admin route, tests).
    pub(crate) kick: Arc<watch::Sender<u64>>,
    /// Devices' telemetry, the dashboard's data and the alerts.
    pub(crate) fleet: Arc<Fleet>,
    /// Where alert events go, when configured.
    pub(crate) webhook: Option<Webhook>,
    /// The admin token's digest (`auth::secret_eq`), when there is one.
    pub(crate) admin_digest: Option<Digest>,
    /// Secret of the dashboard's session cookie (derived from the admin token).
    pub(crate) dashboard_session: String,
}

impl FromRef<AppState> for BodyLimit {
    fn from_ref(state: &AppState) -> Self {
        BodyLimit(state.config.body_limit)
    }
}
