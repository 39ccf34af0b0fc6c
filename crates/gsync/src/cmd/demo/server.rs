//! The reference server the devices talk to, with its faults and its
//! offline window.
//!
//! Going offline is real: the server is shut down and its port refuses
//! connections; coming back binds a new server on the same port over the
//! same database file, so everything committed before the outage (entities,
//! stored idempotent responses, the applied log) is still there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use guardian_server::{
    AlertRules, AppliedMutation, Faults, RetryAfter, RetryAfterForm, RunningServer, ServerBuilder,
};

/// The tenant every device belongs to.
pub(crate) const TENANT: &str = "demo";

/// Cap of the forced-conflict rate (see [`faults`]).
pub(crate) const MAX_CONFLICT_RATE: f64 = 0.1;

/// The demo's server: online or offline, always on the same address.
#[derive(Debug)]
pub(crate) struct DemoServer {
    running: Option<RunningServer>,
    addr: SocketAddr,
    db: PathBuf,
    token: String,
    faults: Faults,
}

/// The faults of a demo run at `rate`: failures (503 and 429 with
/// Retry-After), forced conflicts from a concurrent writer, and connections
/// dropped before and after commit.
///
/// Forced conflicts are capped at 10 %: the reconciler retries an op at most
/// 5 times, and an op that meets a forced conflict 6 times in a row fails
/// permanently (kept as `failed`, which fails the verdict); at 10 % that is
/// a one-in-a-million event per conditional op.
pub(crate) fn faults(rate: f64, seed: u64, form: RetryAfterForm) -> Faults {
    Faults {
        failure_rate: rate,
        failure_statuses: vec![503, 429],
        retry_after: Some(RetryAfter { seconds: 1, form }),
        conflict_rate: (rate * 2.0).min(MAX_CONFLICT_RATE),
        drop_after_commit_rate: rate,
        drop_before_commit_rate: rate / 2.0,
        seed: Some(seed),
        ..Faults::default()
    }
}

fn builder(db: &Path, token: &str, faults: Faults) -> ServerBuilder {
    ServerBuilder::new()
        .token(TENANT, token)
        .database(db)
        // A stuck request must not outlive the demo.
        .request_timeout(Duration::from_secs(10))
        .faults(faults)
}

/// The dashboard's server (`--dashboard`): collects the runners' telemetry
/// and serves `/dashboard`. It is apart from [`DemoServer`] and never goes
/// offline, so the page stays live through the outage and shows the
/// breaker trips it causes, as a monitoring instance would in production.
#[derive(Debug)]
pub(crate) struct Monitor {
    running: RunningServer,
    admin: String,
}

impl Monitor {
    /// Starts an in-memory server on a free loopback port that accepts the
    /// devices' `token` and shows the dashboard to `admin`.
    pub(crate) async fn start(token: &str, admin: String) -> anyhow::Result<Self> {
        let running = ServerBuilder::new()
            .token(TENANT, token)
            .in_memory()
            .admin_token(admin.clone())
            // Thresholds the demo's chaos crosses, so its alerts show.
            .alert_rules(AlertRules {
                breaker_open_for: Some(Duration::from_secs(1)),
                stalled_for: Some(Duration::from_secs(20)),
                dead_letters_above: Some(0),
                fleet_health_below: Some(60),
            })
            .bind("127.0.0.1:0")
            .await
            .context("cannot start the dashboard's server")?;
        Ok(Self { running, admin })
    }

    /// Where runners send telemetry.
    pub(crate) fn url(&self) -> String {
        self.running.url()
    }

    /// The dashboard's address with its one-time token.
    pub(crate) fn dashboard_url(&self) -> String {
        format!("{}/dashboard?token={}", self.running.url(), self.admin)
    }

    pub(crate) async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

impl DemoServer {
    /// Starts the server on a free loopback port.
    pub(crate) async fn start(db: PathBuf, token: String, faults: Faults) -> anyhow::Result<Self> {
        let running = builder(&db, &token, faults.clone())
            .bind("127.0.0.1:0")
            .await
            .context("cannot start the reference server")?;
        Ok(Self {
            addr: running.addr(),
            running: Some(running),
            db,
            token,
            faults,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn online(&self) -> bool {
        self.running.is_some()
    }

    /// Stops serving: from now on connections are refused.
    pub(crate) async fn go_offline(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Serves again on the same port and database, with `faults`.
    pub(crate) async fn come_back(&mut self, faults: Faults) -> anyhow::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        self.faults = faults;
        let mut last = None;
        // The port was ours a moment ago; a few tries cover a slow release.
        for _ in 0..50 {
            match builder(&self.db, &self.token, self.faults.clone())
                .bind(self.addr)
                .await
            {
                Ok(running) => {
                    self.running = Some(running);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(anyhow::anyhow!(
            "cannot restart the reference server on {}: {}",
            self.addr,
            last.map_or_else(String::new, |e| e.to_string())
        ))
    }

    /// Adds `ms` of latency to every request (0: back to the run's faults).
    pub(crate) fn set_latency(&self, ms: u64) -> anyhow::Result<()> {
        if let Some(running) = &self.running {
            running.set_faults(Faults {
                latency_ms: ms,
                ..self.faults.clone()
            })?;
        }
        Ok(())
    }

    /// Turns faults off (for the final read of the entities).
    pub(crate) fn calm(&self) -> anyhow::Result<()> {
        if let Some(running) = &self.running {
            running.set_faults(Faults::default())?;
        }
        Ok(())
    }

    /// Every mutation the server applied, in order.
    pub(crate) async fn applied_log(&self) -> anyhow::Result<Vec<AppliedMutation>> {
        let running = self.running.as_ref().context("the server is not running")?;
        Ok(running.applied_log().await?)
    }

    /// Stops the server for good.
    pub(crate) async fn shutdown(mut self) {
        self.go_offline().await;
    }
}
