//! Telemetry export: the runner reports a compact health snapshot
//! ([`TelemetrySnapshot`]) to the backend's `POST /v1/telemetry`.
//!
//! Best effort and bounded. The exporter is its own task: it never holds
//! the drain, a send has a short timeout, one snapshot at most is in
//! flight, and a failed send is dropped (the next one supersedes it). A
//! snapshot holds counts, states, timings and the last few dead-letter
//! reasons (cut to [`MAX_REASON`](guardian_protocol::telemetry::MAX_REASON)
//! characters), never a payload.
//!
//! When to send is decided by [`ExportDecider`], a pure function of the
//! last send, what changed and the time: a changed state is sent at most
//! every `min_interval`, an unchanged one every `keepalive`, so the
//! backend can tell a quiet device from a silent one. A breaker change is
//! sent sooner, at most every `breaker_interval`, so a dashboard shows a
//! trip while it matters and a flapping breaker still cannot flood the
//! backend.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use guardian_protocol::telemetry::{
    truncate_reason, BreakerStateName, QueueDepth, TelemetrySnapshot, MAX_REASONS,
};

use crate::transport::TokenProvider;

/// Telemetry export settings (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Labels sent with every snapshot (app name, version, platform...);
    /// the backend refuses more than 16, or long ones.
    pub labels: BTreeMap<String, String>,
    /// Least time between two snapshots.
    pub min_interval: Duration,
    /// A snapshot is sent at least this often, changed or not.
    pub keepalive: Duration,
    /// Time allowed for one send.
    pub timeout: Duration,
    /// Least time between two snapshots when the breaker changed state
    /// (the smaller of this and `min_interval` applies).
    pub breaker_interval: Duration,
    /// Base URL of the backend that collects telemetry, when it is not the
    /// sync server (a monitoring instance that outlives the sync server's
    /// outages); `None` sends to the sync server.
    pub endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    /// No labels, at most one snapshot every 5 s (every 250 ms for a
    /// breaker change), one at least every 60 s, 5 s per send, to the sync
    /// server.
    fn default() -> Self {
        Self {
            labels: BTreeMap::new(),
            min_interval: Duration::from_secs(5),
            keepalive: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
            breaker_interval: Duration::from_millis(250),
            endpoint: None,
        }
    }
}

/// The shortest `min_interval`, `keepalive` and `breaker_interval` taken:
/// shorter ones would let a runner send to a failing backend back to back.
pub const MIN_TELEMETRY_INTERVAL: Duration = Duration::from_millis(50);

/// A [`TelemetryConfig`] the engine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryConfigError {
    /// An interval below [`MIN_TELEMETRY_INTERVAL`].
    #[error("telemetry {name} of {value:?} is below the least of {MIN_TELEMETRY_INTERVAL:?}")]
    IntervalTooShort {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: Duration,
    },
    /// A zero send timeout (every send would fail).
    #[error("the telemetry send timeout must be above zero")]
    ZeroTimeout,
}

impl TelemetryConfig {
    /// Checks the settings; the engine's builder refuses what fails.
    pub fn validate(&self) -> Result<(), TelemetryConfigError> {
        for (name, value) in [
            ("min_interval", self.min_interval),
            ("keepalive", self.keepalive),
            ("breaker_interval", self.breaker_interval),
        ] {
            if value < MIN_TELEMETRY_INTERVAL {
                return Err(TelemetryConfigError::IntervalTooShort { name, value });
            }
        }
        if self.timeout.is_zero() {
            return Err(TelemetryConfigError::ZeroTimeout);
        }
        Ok(())
    }

    /// Least time between the last send and a snapshot whose breaker state
    /// differs from it.
    #[must_use]
    pub fn breaker_change_interval(&self) -> Duration {
        self.breaker_interval.min(self.min_interval)
    }
}

/// The parts of a snapshot whose change is worth a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// Ops by state.
    pub queue: QueueDepth,
    /// Breaker state.
    pub breaker: BreakerStateName,
    /// Health score in steps of 10 (a jitter of a point is no change).
    pub health_step: u8,
    /// Acknowledged ops.
    pub succeeded: u64,
    /// Conflicts.
    pub conflicts: u64,
}

impl Fingerprint {
    /// The fingerprint of `snapshot`.
    pub fn of(snapshot: &TelemetrySnapshot) -> Self {
        Self {
            queue: snapshot.queue,
            breaker: snapshot.breaker,
            health_step: snapshot.health_score / 10,
            succeeded: snapshot.succeeded,
            conflicts: snapshot.conflicts,
        }
    }
}

/// What to do with a fresh snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it now.
    Send,
    /// It changed, but the last send was too recent: look again after this.
    WaitFor(Duration),
    /// Nothing changed: look again after this.
    Idle(Duration),
}

/// Decides when to send; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct ExportDecider {
    last: Option<(Duration, Fingerprint)>,
}

impl ExportDecider {
    /// The decision for a snapshot with fingerprint `fp` at monotonic `now`.
    pub fn decide(&self, fp: &Fingerprint, now: Duration, config: &TelemetryConfig) -> Decision {
        let Some((at, last)) = &self.last else {
            return Decision::Send;
        };
        let since = now.saturating_sub(*at);
        if last == fp {
            return if since >= config.keepalive {
                Decision::Send
            } else {
                Decision::Idle(config.min_interval.min(config.keepalive - since))
            };
        }
        let interval = if last.breaker == fp.breaker {
            config.min_interval
        } else {
            config.breaker_change_interval()
        };
        if since >= interval {
            Decision::Send
        } else {
            Decision::WaitFor(interval - since)
        }
    }

    /// When (monotonic) a snapshot whose breaker changed may go: at once
    /// if nothing was sent yet.
    #[must_use]
    pub fn breaker_send_at(&self, config: &TelemetryConfig) -> Duration {
        self.last.as_ref().map_or(Duration::ZERO, |(at, _)| {
            at.saturating_add(config.breaker_change_interval())
        })
    }

    /// Records a send attempt (successful or not: a failed send is not
    /// retried sooner, so a dead backend costs one request per interval).
    pub fn sent(&mut self, fp: Fingerprint, now: Duration) {
        self.last = Some((now, fp));
    }
}

/// The latest dead-letter reasons, newest last, bounded.
#[derive(Debug, Clone, Default)]
pub(crate) struct RecentFailures(VecDeque<String>);

impl RecentFailures {
    pub(crate) fn push(&mut self, reason: &str) {
        if self.0.len() >= MAX_REASONS {
            self.0.pop_front();
        }
        self.0.push_back(truncate_reason(reason));
    }

    pub(crate) fn to_vec(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

/// Why a send failed (logged at debug, never surfaced).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("no token: {0}")]
    Token(String),
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("backend answered {0}")]
    Status(u16),
}

/// Sends snapshots to one backend.
#[derive(Debug, Clone)]
pub(crate) struct Sender {
    client: reqwest::Client,
    url: reqwest::Url,
    tokens: Arc<dyn TokenProvider>,
}

impl Sender {
    pub(crate) fn new(
        base_url: &str,
        tokens: Arc<dyn TokenProvider>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let mut base = reqwest::Url::parse(base_url).map_err(|e| e.to_string())?;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let url = base.join("v1/telemetry").map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("guardian-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            url,
            tokens,
        })
    }

    pub(crate) async fn send(&self, snapshot: &TelemetrySnapshot) -> Result<(), SendError> {
        let token = self
            .tokens
            .token()
            .await
            .and_then(|t| crate::transport::check_token(&t).map(|()| t))
            .map_err(|e| SendError::Token(e.to_string()))?;
        let resp = self
            .client
            .post(self.url.clone())
            .bearer_auth(token)
            .json(snapshot)
            .send()
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(SendError::Status(resp.status().as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(pending: u64) -> Fingerprint {
        Fingerprint {
            queue: QueueDepth {
                pending,
                in_flight: 0,
                failed: 0,
            },
            breaker: BreakerStateName::Closed,
            health_step: 10,
            succeeded: 0,
            conflicts: 0,
        }
    }

    fn config() -> TelemetryConfig {
        TelemetryConfig {
            min_interval: Duration::from_secs(5),
            keepalive: Duration::from_secs(60),
            ..TelemetryConfig::default()
        }
    }

    #[test]
    fn the_first_snapshot_goes_at_once() {
        let d = ExportDecider::default();
        assert_eq!(d.decide(&fp(0), Duration::ZERO, &config()), Decision::Send);
    }

    #[test]
    fn a_change_waits_for_the_minimum_interval() {
        let mut d = ExportDecider::default();
        let s = Duration::from_secs;
        d.sent(fp(0), s(100));
        assert_eq!(d.decide(&fp(1), s(102), &config()), Decision::WaitFor(s(3)));
        assert_eq!(d.decide(&fp(1), s(105), &config()), Decision::Send);
    }

    #[test]
    fn a_breaker_change_waits_only_for_the_breaker_interval() {
        let mut d = ExportDecider::default();
        let ms = Duration::from_millis;
        assert_eq!(d.breaker_send_at(&config()), Duration::ZERO);
        d.sent(fp(0), ms(100_000));
        let open = Fingerprint {
            breaker: BreakerStateName::Open,
            ..fp(3)
        };
        assert_eq!(d.breaker_send_at(&config()), ms(100_250));
        assert_eq!(
            d.decide(&open, ms(100_100), &config()),
            Decision::WaitFor(ms(150))
        );
        assert_eq!(d.decide(&open, ms(100_250), &config()), Decision::Send);
        // Other changes still wait for the minimum interval.
        assert_eq!(
            d.decide(&fp(3), ms(100_250), &config()),
            Decision::WaitFor(ms(4750))
        );
        // A breaker interval above the minimum interval is capped by it.
        let slow = TelemetryConfig {
            breaker_interval: ms(10_000),
            ..config()
        };
        assert_eq!(d.decide(&open, ms(105_000), &slow), Decision::Send);
    }

    #[test]
    fn no_change_waits_for_the_keepalive() {
        let mut d = ExportDecider::default();
        let s = Duration::from_secs;
        d.sent(fp(0), s(100));
        assert_eq!(d.decide(&fp(0), s(101), &config()), Decision::Idle(s(5)));
        assert_eq!(d.decide(&fp(0), s(158), &config()), Decision::Idle(s(2)));
        assert_eq!(d.decide(&fp(0), s(160), &config()), Decision::Send);
    }

    #[test]
    fn small_health_moves_are_no_change() {
        let snap = |score| TelemetrySnapshot {
            runner_id: "r".into(),
            labels: BTreeMap::new(),
            at: 0,
            seq: 1,
            queue: QueueDepth::default(),
            oldest_pending_age_ms: None,
            last_failures: vec![],
            breaker: BreakerStateName::Closed,
            health_score: score,
            latency_p50_ms: None,
            latency_p95_ms: None,
            succeeded: 0,
            failed: 0,
            conflicts: 0,
            breaker_trips: 0,
            last_sync_at: None,
        };
        assert_eq!(Fingerprint::of(&snap(91)), Fingerprint::of(&snap(99)));
        assert_ne!(Fingerprint::of(&snap(89)), Fingerprint::of(&snap(91)));
    }

    #[test]
    fn recent_failures_are_bounded_and_cut() {
        let mut r = RecentFailures::default();
        for i in 0..(MAX_REASONS + 3) {
            r.push(&format!("{i}:{}", "x".repeat(1000)));
        }
        let v = r.to_vec();
        assert_eq!(v.len(), MAX_REASONS);
        assert!(v[0].starts_with("3:"));
        assert!(v.iter().all(|s| s.chars().count() <= 200));
    }
}
