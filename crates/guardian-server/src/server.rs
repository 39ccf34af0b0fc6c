//! Binding, running and stopping the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{BindError, ServerBuilder};
use crate::conn::{ConnInfo, KillableListener};
use crate::faults::{FaultInjector, Faults, FaultsError};
use crate::inflight::InFlight;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::state::{AppState, Shared};
use crate::store::{AppliedMutation, PurgeReport, Store, StoreError, StoreOptions};

/// Stops a running server from anywhere (cheap to clone).
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Asks the server to stop: no new connections, open requests finish,
    /// realtime sessions are closed.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// A server listening on a socket. Dropping it asks it to shut down.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    state: AppState,
    shutdown: ShutdownHandle,
    task: Option<JoinHandle<std::io::Result<()>>>,
    purger: JoinHandle<()>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ServerBuilder {
    /// Opens the database, binds `addr` (port 0 picks a free port) and starts
    /// serving on the current tokio runtime.
    pub async fn bind(self, addr: impl ToSocketAddrs) -> Result<RunningServer, BindError> {
        self.validate()?;
        let config = Arc::new(self.config);
        let opts = StoreOptions {
            storage: config.storage.clone(),
            synchronous: config.synchronous,
            idempotency_retention_ms: millis(config.idempotency_retention),
            feed_retention_ms: millis(config.feed_retention),
            require_if_match: config.require_if_match,
            clock: Arc::clone(&config.clock),
        };
        let store = tokio::task::spawn_blocking(move || Store::open(opts))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        // What expired while the server was down goes before it serves, so
        // the first purge does not race the first requests (with an injected
        // clock it ran whenever its task was first scheduled).
        log_purge(store.purge_expired().await);
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let webhook = match &config.alert_webhook {
            Some(url) => Some(
                crate::fleet::webhook::Webhook::start(url.clone(), shutdown_rx.clone())
                    .map_err(|e| BindError::Config(format!("alert webhook client: {e}")))?,
            ),
            None => None,
        };
        let state = AppState::new(Shared {
            fleet: Arc::new(crate::fleet::Fleet::new(
                config.fleet_limits,
                config.alert_rules,
            )),
            webhook,
            dashboard_session: crate::routes::dashboard::session_secret(
                config.admin_token.as_deref(),
            ),
            store,
            faults: Arc::new(FaultInjector::new(config.faults.clone())),
            inflight: InFlight::new(),
            metrics: Arc::new(Metrics::default()),
            rate: Arc::new(RateLimiter::new(config.rate_limit)),
            concurrency: Arc::new(Semaphore::new(config.concurrency_limit)),
            shutdown: shutdown_rx.clone(),
            kick: Arc::new(watch::Sender::new(0)),
            config,
        });
        let app =
            crate::routes::router(state.clone()).into_make_service_with_connect_info::<ConnInfo>();
        let mut stop = shutdown_rx.clone();
        let task = tokio::spawn(async move {
            axum::serve(KillableListener(listener), app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
        let purger = tokio::spawn(purge_loop(state.clone(), shutdown_rx.clone()));
        tokio::spawn(crate::fleet::tick_loop(state.clone(), shutdown_rx));
        tracing::info!(%local, "guardian-server listening");
        Ok(RunningServer {
            addr: local,
            state,
            shutdown: ShutdownHandle(Arc::new(shutdown_tx)),
            task: Some(task),
            purger,
        })
    }
}

fn log_purge(result: Result<PurgeReport, StoreError>) {
    match result {
        Ok(r) if r != PurgeReport::default() => tracing::debug!(
            idempotency = r.idempotency_records,
            changes = r.changes,
            "purged expired records"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "purge failed"),
    }
}

/// Purges every `purge_interval`, the first one an interval after start
/// (`bind` purged at start).
async fn purge_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let period = state.config.purge_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = tick.tick() => log_purge(state.store.purge_expired().await),
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, the base URL of the protocol.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://<addr>/v1/realtime`.
    pub fn realtime_url(&self) -> String {
        format!("ws://{}/v1/realtime", self.addr)
    }

    /// A handle that stops the server.
    pub fn handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Stops the server and waits until it no longer serves.
    pub async fn shutdown(mut self) {
        self.shutdown.shutdown();
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "server ended with an error"),
                Err(e) => tracing::warn!(error = %e, "server task failed"),
            }
        }
    }

    /// Every mutation that took effect, in order of application.
    pub async fn applied_log(&self) -> Result<Vec<AppliedMutation>, StoreError> {
        self.state.store.applied_log().await
    }

    /// The current fault settings.
    pub fn faults(&self) -> Faults {
        self.state.faults.get()
    }

    /// Replaces the fault settings at run time (reseeding the generator).
    pub fn set_faults(&self, faults: Faults) -> Result<(), FaultsError> {
        faults.validate()?;
        self.state.faults.set(faults);
        Ok(())
    }

    /// Deletes expired idempotency records and feed entries now.
    pub async fn purge_expired(&self) -> Result<PurgeReport, StoreError> {
        self.state.store.purge_expired().await
    }

    /// Closes every realtime session (clients should reconnect and resume).
    pub fn disconnect_realtime(&self) {
        self.state.kick.send_modify(|n| *n += 1);
    }

    /// Number of idempotency keys being processed right now.
    pub fn in_flight(&self) -> usize {
        self.state.inflight.len()
    }

    /// Waits until at least `n` idempotency keys are in flight (for tests of
    /// concurrent retries, together with the latency fault).
    pub async fn wait_in_flight(&self, n: usize) {
        let mut rx = self.state.inflight.watch();
        let _ = rx.wait_for(|count| *count >= n).await;
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        self.state.metrics.render()
    }

    /// Requests answered on `route`, the matched pattern as `/metrics`
    /// labels it (e.g. `/v1/batch`, `/v1/entities/{type}`), any method or
    /// status: for tests and benches that count round trips.
    pub fn requests_on(&self, route: &str) -> u64 {
        self.state.metrics.requests_on(route)
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        self.purger.abort();
    }
}
