//! [`SyncEngine`]: drains the outbox to the backend.
//!
//! One engine per outbox per process. Whichever runner holds the processing
//! lock drains; every write it makes is fenced by the lock's epoch. The drain
//! loop claims ready ops (per-entity heads only, so one entity's ops go out
//! strictly in order), sends them concurrently up to a limit or in one batch,
//! and records each outcome: ack (with version chaining), reconciled retry,
//! backoff, or permanent failure.

mod drain;
mod export;
mod once;
mod run;
mod task;

pub use crate::core::drain::{BatchConfig, DrainReport};
pub use crate::core::events::{ConflictOutcome, SyncEvent};
pub use once::{OnceReport, OnceStop, LOCK_ATTEMPT_MIN};
pub use run::{RunReport, RUNNER_STATUS_KEY};

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{broadcast, Notify};

use crate::breaker::{BreakerConfig, BreakerConfigError, CircuitBreaker};
use crate::clock::{SharedClock, SystemClock};
use crate::core::clock_watch::ScheduleGuard;
use crate::lock::{LockConfig, LockError};
use crate::op::NewOp;
use crate::optimistic::OptimisticStore;
use crate::outbox::{EnqueueError, Enqueued, OpenError, Outbox, OutboxError, OutboxOptions};
use crate::reconcile::{ReconcilePolicies, Reconciler};
use crate::retry::RetryPolicy;
use crate::telemetry::export::{Sender as TelemetrySender, TelemetryConfig};
use crate::telemetry::{Counter, SyncMetrics};
use crate::transport::{
    HttpTransport, HttpTransportConfig, TokenProvider, Transport, TransportBuildError,
};

/// Why an engine could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Neither a transport nor a server URL with a token provider was given.
    #[error("no transport: give a server URL and a token provider, or a transport")]
    NoTransport,
    /// Neither an outbox nor an outbox path was given.
    #[error("no outbox: give an outbox path or an opened outbox")]
    NoOutbox,
    /// The outbox could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The HTTP transport could not be built.
    #[error(transparent)]
    Transport(#[from] TransportBuildError),
    /// The breaker configuration is invalid.
    #[error(transparent)]
    Breaker(#[from] BreakerConfigError),
    /// The telemetry configuration is invalid.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::export::TelemetryConfigError),
    /// Concurrency must be at least 1.
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
}

/// Why a drain or run stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Another runner holds the processing lock (drain_once only).
    #[error("another runner holds the processing lock")]
    LockHeld,
    /// We lost the processing lock mid-drain; nothing more was written.
    #[error("lost the processing lock to another runner; stopped")]
    LockLost,
    /// The outbox failed.
    #[error(transparent)]
    Outbox(OutboxError),
}

impl From<OutboxError> for EngineError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::LockLost => Self::LockLost,
            other => Self::Outbox(other),
        }
    }
}

impl From<LockError> for EngineError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Lost => Self::LockLost,
            LockError::Outbox(o) => o.into(),
        }
    }
}

/// Whether the engine sends ops in batches.
#[derive(Debug, Clone, Copy)]
enum Batching {
    /// On with the default size when the transport batches natively.
    Auto,
    On(BatchConfig),
    Off,
}

/// Builder of a [`SyncEngine`].
#[derive(Debug)]
pub struct SyncEngineBuilder {
    outbox_path: Option<PathBuf>,
    outbox: Option<Outbox>,
    outbox_options: Option<OutboxOptions>,
    server: Option<HttpTransportConfig>,
    tokens: Option<Arc<dyn TokenProvider>>,
    transport: Option<Arc<dyn Transport>>,
    retry: RetryPolicy,
    breaker: BreakerConfig,
    lock: LockConfig,
    concurrency: usize,
    batch: Batching,
    policies: ReconcilePolicies,
    max_reconciliations: u32,
    clock: Option<SharedClock>,
    metrics: Option<Arc<SyncMetrics>>,
    stall_after: Duration,
    owner_id: Option<String>,
    telemetry: Option<TelemetryConfig>,
}

impl Default for SyncEngineBuilder {
    fn default() -> Self {
        Self {
            outbox_path: None,
            outbox: None,
            outbox_options: None,
            server: None,
            tokens: None,
            transport: None,
            retry: RetryPolicy::default(),
            breaker: BreakerConfig::default(),
            lock: LockConfig::default(),
            concurrency: 8,
            batch: Batching::Auto,
            policies: ReconcilePolicies::default(),
            max_reconciliations: 5,
            clock: None,
            metrics: None,
            stall_after: Duration::from_secs(300),
            owner_id: None,
            telemetry: Some(TelemetryConfig::default()),
        }
    }
}

impl SyncEngineBuilder {
    /// The outbox file to open (created if missing).
    #[must_use]
    pub fn outbox_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.outbox_path = Some(path.into());
        self
    }

    /// Options for opening the outbox file.
    #[must_use]
    pub fn outbox_options(mut self, options: OutboxOptions) -> Self {
        self.outbox_options = Some(options);
        self
    }

    /// An outbox the app already opened (shared with its own enqueuers).
    #[must_use]
    pub fn outbox(mut self, outbox: Outbox) -> Self {
        self.outbox = Some(outbox);
        self
    }

    /// The backend's base URL, for the default HTTP transport.
    #[must_use]
    pub fn server(mut self, base_url: impl Into<String>) -> Self {
        self.server = Some(HttpTransportConfig::new(base_url));
        self
    }

    /// Full HTTP transport settings (timeouts, response limit).
    #[must_use]
    pub fn http(mut self, config: HttpTransportConfig) -> Self {
        self.server = Some(config);
        self
    }

    /// Where bearer tokens come from.
    #[must_use]
    pub fn token_provider(mut self, tokens: Arc<dyn TokenProvider>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// A custom transport instead of the HTTP one.
    #[must_use]
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Backoff and attempt budget.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Circuit breaker tuning.
    #[must_use]
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// Processing lock timing.
    #[must_use]
    pub fn lock(mut self, lock: LockConfig) -> Self {
        self.lock = lock;
        self
    }

    /// Most requests in flight at once (ops of distinct entities).
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Send ready ops in batches of this size. Batching is on by default
    /// ([`BatchConfig::default`]) when the transport has a batch route of
    /// its own ([`Transport::native_batch`]), as the HTTP transport does.
    #[must_use]
    pub fn batching(mut self, batch: BatchConfig) -> Self {
        self.batch = Batching::On(batch);
        self
    }

    /// One request per op, even where the transport could batch them.
    #[must_use]
    pub fn no_batching(mut self) -> Self {
        self.batch = Batching::Off;
        self
    }

    /// Conflict policies per entity type.
    #[must_use]
    pub fn reconcile(mut self, policies: ReconcilePolicies) -> Self {
        self.policies = policies;
        self
    }

    /// Most reconciliations of one op before it fails.
    #[must_use]
    pub fn max_reconciliations(mut self, n: u32) -> Self {
        self.max_reconciliations = n;
        self
    }

    /// The clock (tests inject a manual one).
    #[must_use]
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// A metrics registry shared with the app.
    #[must_use]
    pub fn metrics(mut self, metrics: Arc<SyncMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// How long queued ops may sit without progress (breaker closed) before
    /// a [`SyncEvent::Stalled`] is raised.
    #[must_use]
    pub fn stall_after(mut self, d: Duration) -> Self {
        self.stall_after = d;
        self
    }

    /// This runner's lock owner id (default: a random UUID).
    #[must_use]
    pub fn owner_id(mut self, id: impl Into<String>) -> Self {
        self.owner_id = Some(id.into());
        self
    }

    /// Telemetry export settings. Export is on by default when the engine
    /// talks to a backend over HTTP ([`server`](Self::server) or
    /// [`http`](Self::http) with a token provider); a custom
    /// [`transport`](Self::transport) has no telemetry route.
    #[must_use]
    pub fn telemetry(mut self, config: TelemetryConfig) -> Self {
        self.telemetry = Some(config);
        self
    }

    /// Turns telemetry export off.
    #[must_use]
    pub fn no_telemetry(mut self) -> Self {
        self.telemetry = None;
        self
    }

    /// Opens the outbox if needed and builds the engine.
    pub async fn build(self) -> Result<SyncEngine, BuildError> {
        if self.concurrency == 0 {
            return Err(BuildError::ZeroConcurrency);
        }
        if let Some(t) = &self.telemetry {
            t.validate()?;
        }
        let clock = self.clock.unwrap_or_else(SystemClock::shared);
        let mut telemetry = None;
        let transport: Arc<dyn Transport> = match (self.transport, self.server, self.tokens) {
            (Some(t), _, _) => t,
            (None, Some(config), Some(tokens)) => {
                let transport = Arc::new(HttpTransport::new(&config, tokens.clone())?);
                if let Some(t) = self.telemetry {
                    let url = t.endpoint.as_deref().unwrap_or(&config.base_url);
                    match TelemetrySender::new(url, tokens, t.timeout) {
                        Ok(sender) => telemetry = Some((t, sender)),
                        Err(e) => tracing::warn!("telemetry export off: {e}"),
                    }
                }
                transport
            }
            _ => return Err(BuildError::NoTransport),
        };
        let breaker = CircuitBreaker::new(self.breaker)?;
        // Opened last: a configuration refused above creates no file.
        let outbox = match (self.outbox, self.outbox_path) {
            (Some(o), _) => o,
            (None, Some(path)) => {
                let mut options = self.outbox_options.unwrap_or_default();
                options.clock = clock.clone();
                Outbox::open(&path, options).await?.0
            }
            (None, None) => return Err(BuildError::NoOutbox),
        };
        let batch = match self.batch {
            Batching::On(b) => Some(b),
            Batching::Auto if transport.native_batch() => Some(BatchConfig::default()),
            Batching::Auto | Batching::Off => None,
        };
        let (events, _) = broadcast::channel(1024);
        Ok(SyncEngine {
            inner: Arc::new(Inner {
                outbox,
                transport,
                retry: self.retry,
                breaker: Mutex::new(breaker),
                lock: self.lock,
                concurrency: self.concurrency,
                batch,
                reconciler: Reconciler::new(self.policies, self.max_reconciliations),
                clock,
                metrics: self.metrics.unwrap_or_default(),
                events,
                optimistic: OptimisticStore::new(),
                wake: Notify::new(),
                auth_paused: AtomicBool::new(false),
                stall_after: self.stall_after,
                schedule: Mutex::new(ScheduleGuard::new(
                    Duration::from_secs(2),
                    self.lock.heartbeat_interval,
                )),
                telemetry,
                export: export::ExportFeed::default(),
                owner_id: self
                    .owner_id
                    .unwrap_or_else(|| format!("runner-{}", uuid::Uuid::now_v7())),
            }),
        })
    }
}

/// The sync engine: enqueue from anywhere, drain from one runner.
#[derive(Debug, Clone)]
pub struct SyncEngine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    outbox: Outbox,
    transport: Arc<dyn Transport>,
    retry: RetryPolicy,
    breaker: Mutex<CircuitBreaker>,
    lock: LockConfig,
    concurrency: usize,
    batch: Option<BatchConfig>,
    reconciler: Reconciler,
    clock: SharedClock,
    metrics: Arc<SyncMetrics>,
    events: broadcast::Sender<SyncEvent>,
    optimistic: OptimisticStore,
    /// Woken by `enqueue` and `resume` so an idle runner drains at once.
    wake: Notify,
    auth_paused: AtomicBool,
    stall_after: Duration,
    owner_id: String,
    /// Telemetry export, when on.
    telemetry: Option<(TelemetryConfig, TelemetrySender)>,
    /// What the export task hears of.
    export: export::ExportFeed,
    /// Keeps stored backoffs their length across wall-clock steps.
    schedule: Mutex<ScheduleGuard>,
}

impl Inner {
    fn breaker(&self) -> MutexGuard<'_, CircuitBreaker> {
        // The breaker is plain data updated atomically under the lock; a
        // panic elsewhere cannot leave it inconsistent.
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: SyncEvent) {
        if self.telemetry.is_some() {
            self.export.note(&event, || self.clock.now_millis());
        }
        // No subscriber is fine.
        let _ = self.events.send(event);
    }
}

impl SyncEngine {
    /// A builder with defaults.
    pub fn builder() -> SyncEngineBuilder {
        SyncEngineBuilder::default()
    }

    /// Durably records an op; returns once it is committed. Wakes the runner.
    pub async fn enqueue(&self, op: NewOp) -> Result<Enqueued, EnqueueError> {
        let enqueued = self.inner.outbox.enqueue(op).await?;
        Ok(self.enqueued(enqueued))
    }

    /// [`enqueue`](Self::enqueue) for a thread that may block (an FFI
    /// binding's worker thread, a sync app's); see
    /// [`Outbox::enqueue_blocking`]. Never call it on an async executor's
    /// thread.
    pub fn enqueue_blocking(&self, op: NewOp) -> Result<Enqueued, EnqueueError> {
        let enqueued = self.inner.outbox.enqueue_blocking(op)?;
        Ok(self.enqueued(enqueued))
    }

    /// Durably records `ops` as one atomic transaction (see
    /// [`Outbox::enqueue_transaction`]): they are sent as one unit once
    /// every earlier op of each of their entities is acknowledged, and the
    /// server applies all or none. Events report
    /// [`SyncEvent::TransactionCommitted`] or
    /// [`SyncEvent::TransactionFailed`]. Wakes the runner.
    pub async fn transaction(
        &self,
        ops: Vec<NewOp>,
    ) -> Result<crate::outbox::EnqueuedTransaction, EnqueueError> {
        let txn = self.inner.outbox.enqueue_transaction(ops).await?;
        Ok(self.enqueued_transaction(txn))
    }

    /// [`transaction`](Self::transaction) for a thread that may block (an
    /// FFI binding's worker thread, a sync app's). Never call it on an
    /// async executor's thread.
    pub fn transaction_blocking(
        &self,
        ops: Vec<NewOp>,
    ) -> Result<crate::outbox::EnqueuedTransaction, EnqueueError> {
        let txn = self.inner.outbox.enqueue_transaction_blocking(ops)?;
        Ok(self.enqueued_transaction(txn))
    }

    /// Counts a stored transaction's ops and wakes the run loop for them.
    fn enqueued_transaction(
        &self,
        txn: crate::outbox::EnqueuedTransaction,
    ) -> crate::outbox::EnqueuedTransaction {
        self.inner
            .metrics
            .add(Counter::Enqueued, txn.ops.len() as u64);
        self.inner.wake.notify_one();
        txn
    }

    /// [`transaction`](Self::transaction) with an optimistic update: the
    /// registration is kept under a token carried by every op of the
    /// transaction, so its rollback runs once, restoring all the entities,
    /// when the transaction fails, and its success handler once it commits.
    /// Returns the transaction and the token.
    pub async fn transaction_optimistic(
        &self,
        ops: Vec<NewOp>,
        registration: crate::optimistic::Registration,
    ) -> Result<(crate::outbox::EnqueuedTransaction, String), EnqueueError> {
        let token = format!("txn-{}", uuid::Uuid::new_v4());
        let ops = ops
            .into_iter()
            .map(|op| op.with_txn_token(token.clone()))
            .collect();
        self.inner.optimistic.register(token.clone(), registration);
        match self.transaction(ops).await {
            Ok(txn) => Ok((txn, token)),
            Err(e) => {
                // Nothing was stored: the app's change is taken back now.
                self.inner.optimistic.rollback(&token, &e.to_string());
                Err(e)
            }
        }
    }

    /// Counts a stored op and wakes the run loop for it.
    fn enqueued(&self, enqueued: Enqueued) -> Enqueued {
        self.inner.metrics.incr(Counter::Enqueued);
        if enqueued.coalesced.is_some() {
            self.inner.metrics.incr(Counter::Coalesced);
        }
        self.inner.wake.notify_one();
        enqueued
    }

    /// The outbox this engine drains.
    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<SyncEvent> {
        self.inner.events.subscribe()
    }

    /// The metrics this engine records into.
    pub fn metrics(&self) -> &Arc<SyncMetrics> {
        &self.inner.metrics
    }

    /// Optimistic transactions: register tokens here, carry them on ops.
    pub fn optimistic(&self) -> &OptimisticStore {
        &self.inner.optimistic
    }

    /// The circuit breaker's state name (`closed`, `open`, `half_open`).
    pub fn breaker_state(&self) -> &'static str {
        self.inner.breaker().state().name()
    }

    /// How long the open circuit breaker still refuses requests (`None`
    /// unless it is open), on the engine's clock.
    pub fn breaker_retry_in(&self) -> Option<Duration> {
        self.inner
            .breaker()
            .cooldown_remaining(self.inner.clock.monotonic())
    }

    /// True after the server refused the token, until [`Self::resume`].
    pub fn auth_paused(&self) -> bool {
        self.inner
            .auth_paused
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resumes after [`SyncEvent::AuthRequired`], once the app's token
    /// provider can supply a valid token again.
    pub fn resume(&self) {
        self.inner
            .auth_paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// This runner's lock owner id.
    pub fn owner_id(&self) -> &str {
        &self.inner.owner_id
    }
}
