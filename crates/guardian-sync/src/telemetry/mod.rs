//! Telemetry: counters, a latency histogram, queue depth, success rate and a
//! network health score, cheap enough to leave on.
//!
//! [`SyncMetrics`] is `Send + Sync`; share it in an `Arc`. Counters are
//! atomics; latency goes into an `hdrhistogram` behind an uncontended
//! mutex. Every record is also forwarded to the [`metrics`] facade
//! (`gsync_*` names, see [`Counter::metric_name`]), so an app that installs
//! a Prometheus or other recorder gets them for free; without a recorder
//! the facade costs a few nanoseconds.
//!
//! The health score formula is documented in [`health`].

pub mod export;
pub mod health;
pub mod summary;

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::breaker::{BreakerState, BreakerTransition};
use health::{breaker_code, breaker_name, AtomicEwma};

pub use export::TelemetryConfig;
pub use health::{health_score, HealthConfig};
pub use summary::{LatencySummary, MetricsSummary, OperationCounts};

/// The counters [`SyncMetrics`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Counter {
    /// An op was written to the outbox.
    Enqueued,
    /// An op was coalesced at enqueue.
    Coalesced,
    /// A request (or one op of a batch) was sent.
    Sent,
    /// A send was acknowledged.
    Succeeded,
    /// An op moved to `failed`.
    Failed,
    /// A send failed retryably and was rescheduled.
    Retried,
    /// A conflict was settled by the reconciler.
    ConflictsResolved,
    /// The circuit breaker opened.
    BreakerTrips,
    /// The realtime client reconnected (attempt).
    RealtimeReconnects,
    /// A realtime change message arrived.
    MessagesReceived,
    /// The stall watchdog fired.
    Stalls,
    /// A batch op was not applied because its predecessor in the batch was
    /// not, and went back to the queue (not an attempt).
    Deferred,
}

impl Counter {
    /// Every counter, in summary order.
    pub const ALL: [Counter; 12] = [
        Counter::Enqueued,
        Counter::Coalesced,
        Counter::Sent,
        Counter::Succeeded,
        Counter::Failed,
        Counter::Retried,
        Counter::ConflictsResolved,
        Counter::BreakerTrips,
        Counter::RealtimeReconnects,
        Counter::MessagesReceived,
        Counter::Stalls,
        Counter::Deferred,
    ];

    /// The name exported through the `metrics` facade.
    pub fn metric_name(self) -> &'static str {
        match self {
            Counter::Enqueued => "gsync_ops_enqueued_total",
            Counter::Coalesced => "gsync_ops_coalesced_total",
            Counter::Sent => "gsync_ops_sent_total",
            Counter::Succeeded => "gsync_ops_succeeded_total",
            Counter::Failed => "gsync_ops_failed_total",
            Counter::Retried => "gsync_ops_retried_total",
            Counter::ConflictsResolved => "gsync_conflicts_resolved_total",
            Counter::BreakerTrips => "gsync_breaker_trips_total",
            Counter::RealtimeReconnects => "gsync_realtime_reconnects_total",
            Counter::MessagesReceived => "gsync_realtime_messages_total",
            Counter::Stalls => "gsync_stalls_total",
            Counter::Deferred => "gsync_ops_deferred_total",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Facade name of the latency histogram (seconds).
pub const LATENCY_METRIC: &str = "gsync_request_latency_seconds";
/// Facade name of the queue depth gauge.
pub const QUEUE_DEPTH_METRIC: &str = "gsync_queue_depth";
/// Facade name of the breaker state gauge (0 closed, 1 open, 2 half-open).
pub const BREAKER_STATE_METRIC: &str = "gsync_breaker_state";
/// Facade name of the health score gauge (set when the score is computed).
pub const HEALTH_SCORE_METRIC: &str = "gsync_health_score";

/// Largest latency the histogram resolves (1 h, in microseconds); longer
/// samples count as 1 h.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// The engine's telemetry. See the module docs.
#[derive(Debug)]
pub struct SyncMetrics {
    counters: [AtomicU64; Counter::ALL.len()],
    queue_depth: AtomicU64,
    breaker: AtomicU8,
    /// Microseconds.
    latency: Mutex<Histogram<u64>>,
    recent_success: AtomicEwma,
    /// Microseconds.
    recent_latency: AtomicEwma,
    health: HealthConfig,
}

impl Default for SyncMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SyncMetrics {
    /// Empty metrics with the default [`HealthConfig`].
    pub fn new() -> Self {
        Self::with_health_config(HealthConfig::default())
    }

    /// Empty metrics scoring health with `health`.
    pub fn with_health_config(health: HealthConfig) -> Self {
        Self {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            queue_depth: AtomicU64::new(0),
            breaker: AtomicU8::new(0),
            latency: Mutex::new(new_histogram()),
            recent_success: AtomicEwma::new(),
            recent_latency: AtomicEwma::new(),
            health,
        }
    }

    /// The health configuration in use.
    pub fn health_config(&self) -> &HealthConfig {
        &self.health
    }

    /// Adds one to a counter.
    pub fn incr(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Adds `n` to a counter. `Succeeded`, `Retried` and `Failed` also feed
    /// the recent success rate used by the health score.
    pub fn add(&self, counter: Counter, n: u64) {
        if n == 0 {
            return;
        }
        self.counters[counter.index()].fetch_add(n, Ordering::Relaxed);
        metrics::counter!(counter.metric_name()).increment(n);
        let outcome = match counter {
            Counter::Succeeded => 1.0,
            Counter::Retried | Counter::Failed => 0.0,
            _ => return,
        };
        let alpha = self.health.effective_alpha();
        // n outcomes at once weigh as n single observations would.
        let weight = if n == 1 {
            alpha
        } else {
            1.0 - (1.0 - alpha).powi(i32::try_from(n).unwrap_or(i32::MAX))
        };
        self.recent_success.observe(outcome, weight);
    }

    /// A counter's value.
    pub fn get(&self, counter: Counter) -> u64 {
        self.counters[counter.index()].load(Ordering::Relaxed)
    }

    /// Records one request's latency (any outcome).
    pub fn record_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(us.min(MAX_LATENCY_US));
        self.recent_latency
            .observe(us as f64, self.health.effective_alpha());
        metrics::histogram!(LATENCY_METRIC).record(latency.as_secs_f64());
    }

    /// Sets the queue depth gauge (ops pending or in flight).
    pub fn set_queue_depth(&self, depth: u64) {
        self.queue_depth.store(depth, Ordering::Relaxed);
        metrics::gauge!(QUEUE_DEPTH_METRIC).set(depth as f64);
    }

    /// The last reported queue depth.
    pub fn queue_depth(&self) -> u64 {
        self.queue_depth.load(Ordering::Relaxed)
    }

    /// Sets the breaker state the health score sees.
    pub fn set_breaker_state(&self, state: &BreakerState) {
        let code = breaker_code(state);
        self.breaker.store(code, Ordering::Relaxed);
        metrics::gauge!(BREAKER_STATE_METRIC).set(f64::from(code));
    }

    /// Records a breaker state change: updates the state and counts a trip
    /// when the breaker opens (an extension of an open period is no trip).
    pub fn record_breaker_transition(&self, transition: &BreakerTransition) {
        self.set_breaker_state(&transition.to);
        let opened = matches!(transition.to, BreakerState::Open { .. })
            && !matches!(transition.from, BreakerState::Open { .. });
        if opened {
            self.incr(Counter::BreakerTrips);
        }
    }

    /// `succeeded / (succeeded + retried + failed)` since start, 1.0 before
    /// any outcome.
    pub fn success_rate(&self) -> f64 {
        let ok = self.get(Counter::Succeeded);
        let total = ok + self.get(Counter::Retried) + self.get(Counter::Failed);
        if total == 0 {
            1.0
        } else {
            ok as f64 / total as f64
        }
    }

    /// The exponentially weighted recent success rate, `None` before any
    /// outcome.
    pub fn recent_success_rate(&self) -> Option<f64> {
        self.recent_success.get()
    }

    /// The exponentially weighted recent latency, `None` before any sample.
    pub fn recent_latency(&self) -> Option<Duration> {
        self.recent_latency
            .get()
            .map(|us| Duration::from_secs_f64((us / 1e6).clamp(0.0, 1e12)))
    }

    /// The network health score, 0–100 (formula in [`health`]); also sets
    /// the facade gauge.
    pub fn health_score(&self) -> u8 {
        let score = health_score(
            self.recent_success_rate(),
            self.recent_latency(),
            self.health.latency_target,
            &self.breaker_state_for_health(),
        );
        metrics::gauge!(HEALTH_SCORE_METRIC).set(f64::from(score));
        score
    }

    fn breaker_state_for_health(&self) -> BreakerState {
        match self.breaker.load(Ordering::Relaxed) {
            1 => BreakerState::Open {
                until: Duration::ZERO,
            },
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Latency figures since start.
    pub fn latency_summary(&self) -> LatencySummary {
        let h = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            avg_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }

    /// A serializable snapshot of everything.
    pub fn summary(&self) -> MetricsSummary {
        let c = |k| self.get(k);
        MetricsSummary {
            operations: OperationCounts {
                enqueued: c(Counter::Enqueued),
                coalesced: c(Counter::Coalesced),
                sent: c(Counter::Sent),
                succeeded: c(Counter::Succeeded),
                failed: c(Counter::Failed),
                retried: c(Counter::Retried),
                conflicts_resolved: c(Counter::ConflictsResolved),
                breaker_trips: c(Counter::BreakerTrips),
                realtime_reconnects: c(Counter::RealtimeReconnects),
                messages_received: c(Counter::MessagesReceived),
                stalls: c(Counter::Stalls),
            },
            latency: self.latency_summary(),
            queue_depth: self.queue_depth(),
            success_rate: self.success_rate(),
            health_score: self.health_score(),
            breaker_state: breaker_name(self.breaker.load(Ordering::Relaxed)).to_owned(),
        }
    }

    /// Prints the readable report of [`summary`](Self::summary) to stdout
    /// (for command-line tools).
    pub fn print_summary(&self) {
        println!("{}", self.summary());
    }
}

impl fmt::Display for SyncMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.summary(), f)
    }
}

/// 1 µs to 1 h at 3 significant digits (0.1 % error).
fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that satisfy hdrhistogram's rules
    // (low >= 1, high >= 2 * low, sigfig <= 5), so creation cannot fail;
    // a unit test pins that.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn is_send_sync() {
        assert_send_sync::<SyncMetrics>();
    }

    #[test]
    fn counter_indexes_match_all() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }

    #[test]
    fn counters_count() {
        let m = SyncMetrics::new();
        m.incr(Counter::Enqueued);
        m.add(Counter::Enqueued, 4);
        m.add(Counter::Sent, 0);
        assert_eq!(m.get(Counter::Enqueued), 5);
        assert_eq!(m.get(Counter::Sent), 0);
        assert_eq!(m.recent_success_rate(), None);
    }

    /// Relative error of hdrhistogram at 3 significant digits.
    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= expected * 0.002 + 0.001
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let m = SyncMetrics::new();
        for i in 1..=1000u64 {
            m.record_latency(Duration::from_millis(i));
        }
        let l = m.latency_summary();
        assert_eq!(l.count, 1000);
        assert!(close(l.avg_ms, 500.5), "{l:?}");
        assert!(close(l.p50_ms, 500.0), "{l:?}");
        assert!(close(l.p95_ms, 950.0), "{l:?}");
        assert!(close(l.p99_ms, 990.0), "{l:?}");
        assert!(close(l.max_ms, 1000.0), "{l:?}");
    }

    #[test]
    fn percentiles_of_a_skewed_distribution() {
        // 90 fast requests at 10 ms, 10 slow ones at 2 s.
        let m = SyncMetrics::new();
        for _ in 0..90 {
            m.record_latency(Duration::from_millis(10));
        }
        for _ in 0..10 {
            m.record_latency(Duration::from_secs(2));
        }
        let l = m.latency_summary();
        assert!(close(l.p50_ms, 10.0), "{l:?}");
        assert!(close(l.p95_ms, 2000.0), "{l:?}");
        assert!(close(l.p99_ms, 2000.0), "{l:?}");
        assert!(close(l.avg_ms, 209.0), "{l:?}");
    }

    #[test]
    fn empty_and_extreme_latencies() {
        let m = SyncMetrics::new();
        assert_eq!(m.latency_summary(), LatencySummary::default());
        m.record_latency(Duration::ZERO);
        m.record_latency(Duration::MAX);
        let l = m.latency_summary();
        assert_eq!(l.count, 2);
        assert!(close(l.max_ms, 3_600_000.0), "{l:?}");
    }

    #[test]
    fn success_rate_counts_outcomes() {
        let m = SyncMetrics::new();
        assert_eq!(m.success_rate(), 1.0);
        m.add(Counter::Succeeded, 6);
        m.add(Counter::Retried, 3);
        m.incr(Counter::Failed);
        assert!((m.success_rate() - 0.6).abs() < 1e-9);
    }

    #[test]
    fn health_all_good() {
        let m = SyncMetrics::new();
        for _ in 0..50 {
            m.incr(Counter::Succeeded);
            m.record_latency(Duration::from_millis(40));
        }
        assert_eq!(m.health_score(), 100);
    }

    #[test]
    fn health_during_an_outage_and_recovery() {
        let m = SyncMetrics::new();
        for _ in 0..20 {
            m.incr(Counter::Succeeded);
        }
        // A storm of retryable failures drags the success part to ~0.
        for _ in 0..60 {
            m.incr(Counter::Retried);
        }
        let during = m.health_score();
        assert!((30..=32).contains(&during), "{during}");
        // The breaker opens: capped low.
        m.record_breaker_transition(&BreakerTransition {
            from: BreakerState::Closed,
            to: BreakerState::Open {
                until: Duration::from_secs(60),
            },
            at: Duration::ZERO,
        });
        assert_eq!(m.get(Counter::BreakerTrips), 1);
        assert!(m.health_score() <= health::OPEN_CAP);
        m.record_breaker_transition(&BreakerTransition {
            from: BreakerState::Open {
                until: Duration::from_secs(60),
            },
            to: BreakerState::HalfOpen,
            at: Duration::from_secs(60),
        });
        assert!(m.health_score() <= health::HALF_OPEN_CAP);
        m.record_breaker_transition(&BreakerTransition {
            from: BreakerState::HalfOpen,
            to: BreakerState::Closed,
            at: Duration::from_secs(61),
        });
        // Recovery: 60 successes bring it back near 100.
        for _ in 0..60 {
            m.incr(Counter::Succeeded);
        }
        assert!(m.health_score() >= 98, "{}", m.health_score());
        assert_eq!(m.get(Counter::BreakerTrips), 1);
    }

    #[test]
    fn health_with_slow_responses() {
        let m = SyncMetrics::new();
        for _ in 0..100 {
            m.incr(Counter::Succeeded);
            m.record_latency(Duration::from_secs(1));
        }
        // Latency at twice the 500 ms target: 70 + 30 * 0.5.
        assert_eq!(m.health_score(), 85);
        let strict = SyncMetrics::with_health_config(HealthConfig {
            latency_target: Duration::from_millis(250),
            ..HealthConfig::default()
        });
        for _ in 0..100 {
            strict.incr(Counter::Succeeded);
            strict.record_latency(Duration::from_secs(1));
        }
        assert_eq!(strict.health_score(), 78);
    }

    #[test]
    fn batched_outcomes_weigh_like_single_ones() {
        let a = SyncMetrics::new();
        let b = SyncMetrics::new();
        a.incr(Counter::Succeeded);
        b.incr(Counter::Succeeded);
        a.add(Counter::Retried, 7);
        for _ in 0..7 {
            b.incr(Counter::Retried);
        }
        let (ra, rb) = (
            a.recent_success_rate().unwrap(),
            b.recent_success_rate().unwrap(),
        );
        assert!((ra - rb).abs() < 1e-9, "{ra} {rb}");
    }

    #[test]
    fn extending_an_open_period_is_not_a_trip() {
        let m = SyncMetrics::new();
        let open = |s| BreakerState::Open {
            until: Duration::from_secs(s),
        };
        m.record_breaker_transition(&BreakerTransition {
            from: open(10),
            to: open(20),
            at: Duration::ZERO,
        });
        assert_eq!(m.get(Counter::BreakerTrips), 0);
        assert_eq!(m.summary().breaker_state, "open");
    }

    #[test]
    fn display_is_readable() {
        let m = SyncMetrics::new();
        m.add(Counter::Enqueued, 3);
        m.set_queue_depth(2);
        let text = m.to_string();
        assert!(text.contains("enqueued 3"), "{text}");
        assert!(text.contains("queue depth 2"), "{text}");
        assert!(
            text.contains("health      100/100 (breaker closed)"),
            "{text}"
        );
    }
}
