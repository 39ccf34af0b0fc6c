//! The serializable telemetry snapshot and its human-readable form.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Counter values at the time of the snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationCounts {
    /// Ops written to the outbox.
    pub enqueued: u64,
    /// Ops merged into or removed with an earlier op at enqueue.
    pub coalesced: u64,
    /// Requests sent (a batch counts each op in it).
    pub sent: u64,
    /// Sends acknowledged by the server.
    pub succeeded: u64,
    /// Ops moved to `failed` (permanent failure or attempts exhausted).
    pub failed: u64,
    /// Sends that failed retryably and were rescheduled.
    pub retried: u64,
    /// Conflicts settled by the reconciler.
    pub conflicts_resolved: u64,
    /// Times the circuit breaker opened.
    pub breaker_trips: u64,
    /// Realtime reconnect attempts.
    pub realtime_reconnects: u64,
    /// Realtime change messages received.
    pub messages_received: u64,
    /// Times the stall watchdog fired.
    pub stalls: u64,
}

/// Request latency figures, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Mean.
    pub avg_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

/// A snapshot of [`SyncMetrics`](super::SyncMetrics). The JSON shape is
/// stable (scripts read it through `gsync ... --json`); add fields, never
/// rename them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsSummary {
    /// Counters.
    pub operations: OperationCounts,
    /// Request latency.
    pub latency: LatencySummary,
    /// Ops waiting in the outbox (last reported).
    pub queue_depth: u64,
    /// `succeeded / (succeeded + retried + failed)` since start; 1.0 before
    /// any outcome.
    pub success_rate: f64,
    /// Network health, 0–100 (formula in [`health`](super::health)).
    pub health_score: u8,
    /// Circuit breaker state: `closed`, `open` or `half_open`.
    pub breaker_state: String,
}

impl fmt::Display for MetricsSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.operations;
        let l = &self.latency;
        writeln!(f, "sync telemetry")?;
        writeln!(
            f,
            "  operations  enqueued {}  coalesced {}  sent {}  succeeded {}  retried {}  failed {}",
            o.enqueued, o.coalesced, o.sent, o.succeeded, o.retried, o.failed
        )?;
        writeln!(
            f,
            "              conflicts resolved {}  breaker trips {}  stalls {}",
            o.conflicts_resolved, o.breaker_trips, o.stalls
        )?;
        writeln!(
            f,
            "  realtime    reconnects {}  messages {}",
            o.realtime_reconnects, o.messages_received
        )?;
        writeln!(
            f,
            "  latency     n {}  avg {:.1} ms  p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            l.count, l.avg_ms, l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
        )?;
        writeln!(f, "  queue depth {}", self.queue_depth)?;
        writeln!(f, "  success     {:.1} %", self.success_rate * 100.0)?;
        write!(
            f,
            "  health      {}/100 (breaker {})",
            self.health_score, self.breaker_state
        )
    }
}
