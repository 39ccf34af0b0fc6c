//! Binding, running and stopping the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tower::ServiceExt as _;

use crate::budget::Budget;
use crate::config::{BindError, ServerBuilder};
use crate::conn::{killable, ConnLimits};
use crate::faults::{FaultInjector, Faults, FaultsError};
use crate::inflight::InFlight;
use crate::limits::{AuthLockout, RateLimiter};
use crate::metrics::Metrics;
use crate::state::{AppState, Shared};
use crate::store::{AppliedMutation, PurgeReport, Store, StoreError, StoreHooks, StoreOptions};

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
        let faults = Arc::new(FaultInjector::new(config.faults.clone()));
        let opts = StoreOptions {
            storage: config.storage.clone(),
            synchronous: config.synchronous,
            idempotency_retention_ms: millis(config.idempotency_retention),
            feed_retention_ms: millis(config.feed_retention),
            require_if_match: config.require_if_match,
            applied_log: config.applied_log,
            request_timeout: config.request_timeout,
            clock: Arc::clone(&config.clock),
            hooks: Arc::clone(&faults) as Arc<dyn StoreHooks>,
        };
        let store = Store::open(opts).await?;
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
            admin_digest: config.admin_token.as_deref().map(crate::auth::digest),
            dashboard_session: crate::routes::dashboard::session_secret(
                config.admin_token.as_deref(),
            ),
            tenants: crate::auth::tenants_by_digest(&config.tokens),
            store,
            faults,
            inflight: InFlight::new(),
            metrics: Arc::new(Metrics::new()),
            rate: Arc::new(RateLimiter::new(config.rate_limit)),
            lockout: AuthLockout::default(),
            concurrency: Arc::new(Semaphore::new(config.concurrency_limit)),
            body_budget: Budget::new(
                config.body_budget,
                config.tenant_share(config.body_budget, config.body_limit),
            ),
            answer_budget: Budget::new(
                config.answer_budget,
                config.tenant_share(
                    config.answer_budget,
                    crate::config::largest_page(config.body_limit),
                ),
            ),
            shutdown: shutdown_rx.clone(),
            kick: Arc::new(watch::Sender::new(0)),
            config,
        });
        let app = crate::routes::router(state.clone());
        let limits = ConnLimits::new(
            state
                .config
                .max_connections
                .unwrap_or_else(default_max_connections),
            state.config.max_connections_per_peer,
            state.config.trusted_proxies.clone(),
        );
        let task = tokio::spawn(serve(
            listener,
            app,
            limits,
            Timeouts {
                header_read: state.config.header_read_timeout,
                write_stall: state.config.request_timeout + state.config.ws_idle_timeout,
            },
            shutdown_rx.clone(),
        ));
        let purger = tokio::spawn(purge_loop(state.clone(), shutdown_rx.clone()));
        tokio::spawn(fleet_tick_loop(state.clone(), shutdown_rx));
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

/// The total connection cap when none is configured: three quarters of the
/// process's open-file limit (the rest is left to the database, the
/// listener and the runtime), between 16 and 4096.
fn default_max_connections() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    usize::try_from(soft / 4 * 3)
        .unwrap_or(usize::MAX)
        .clamp(16, 4096)
}

/// How long a connection may keep the server waiting.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// For a request's headers.
    header_read: Duration,
    /// For a peer to take any byte of what is written to it: the request
    /// and realtime idle timeouts together, so that a realtime session's
    /// own send bound ends it first.
    write_stall: Duration,
}

/// The accept loop: one task per connection, within the caps, each served
/// by hyper with the header-read timeout and writes bounded, until
/// shutdown; then it waits for the open connections to finish their
/// requests.
async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // Each connection task holds a receiver; `closed` resolves when all ended.
    let (done_tx, done_rx) = watch::channel(());
    loop {
        let permit = tokio::select! {
            permit = limits.reserve() => match permit {
                Some(p) => p,
                None => break,
            },
            () = stopped(&mut stop) => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let Some(slot) = limits.admit(permit, remote.ip()) else {
            // Closed at once (dropping the stream): the peer holds its share.
            tracing::debug!(peer = %remote.ip(), "connection refused: too many open from this peer");
            continue;
        };
        let (io, info) = killable(stream, remote, slot, timeouts.write_stall);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(info.clone()));
            app.clone().oneshot(req)
        });
        let mut stop = stop.clone();
        let done = done_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.header_read);
            let conn = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::trace!(error = %e, "connection ended with an error");
            }
            drop(done);
        });
    }
    drop(listener);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// Resolves once shutdown is asked for (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// An accept error never stops the loop. Out of descriptors (`EMFILE`,
/// `ENFILE`) or memory, it pauses briefly so that open connections can
/// end; a connection that failed before it was accepted is just skipped.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed; retrying shortly");
    tokio::time::sleep(Duration::from_millis(100)).await;
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

    /// Waits until exactly `n` realtime sessions are open (for tests of
    /// how sessions end).
    pub async fn wait_realtime_sessions(&self, n: usize) {
        let mut rx = self.state.metrics.ws_sessions();
        let _ = rx.wait_for(|count| *count == n).await;
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

/// Once a second: closes a point of the fleet's series and re-evaluates
/// the alerts (time-based rules fire without a new snapshot).
async fn fleet_tick_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let period = std::time::Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = state.config.clock.now_millis();
                state.fleet.tick(now, state.metrics.requests_total());
                crate::fleet::evaluate_alerts(&state.fleet, state.webhook.as_ref(), now);
            }
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
