//! The engine's side of telemetry export: gathers a snapshot from the
//! runner's state and hands it to [`crate::telemetry::export`], which
//! decides when and sends. Runs as its own task while a runner holds the
//! lock; see that module for the guarantees.

use std::sync::Arc;
use std::time::Duration;

use guardian_protocol::telemetry::{BreakerStateName, QueueDepth, TelemetrySnapshot};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::breaker::BreakerState;
use crate::telemetry::export::{Decision, ExportDecider, Fingerprint, RecentFailures};
use crate::telemetry::Counter;

use super::{Inner, SyncEvent};

fn breaker_name(state: &BreakerState) -> BreakerStateName {
    match state {
        BreakerState::Closed => BreakerStateName::Closed,
        BreakerState::Open { .. } => BreakerStateName::Open,
        BreakerState::HalfOpen => BreakerStateName::HalfOpen,
    }
}

impl Inner {
    async fn telemetry_snapshot(
        &self,
        seq: u64,
        failures: &RecentFailures,
        last_sync_at: Option<i64>,
    ) -> TelemetrySnapshot {
        let now = self.clock.now_millis();
        // A failed count is best effort too: zeros rather than no snapshot.
        let stats = self.outbox.stats().await.unwrap_or_default();
        let latency = self.metrics.latency_summary();
        let has_latency = latency.count > 0;
        let breaker = breaker_name(&self.breaker().state());
        let labels = self
            .telemetry
            .as_ref()
            .map(|(c, _)| c.labels.clone())
            .unwrap_or_default();
        TelemetrySnapshot {
            runner_id: self.owner_id.clone(),
            labels,
            at: now,
            seq,
            queue: QueueDepth {
                pending: stats.pending,
                in_flight: stats.in_flight,
                failed: stats.failed,
            },
            oldest_pending_age_ms: stats
                .oldest_created_at
                .map(|t| u64::try_from(now.saturating_sub(t)).unwrap_or(0)),
            last_failures: failures.to_vec(),
            breaker,
            health_score: self.metrics.health_score().min(100),
            latency_p50_ms: has_latency.then_some(latency.p50_ms),
            latency_p95_ms: has_latency.then_some(latency.p95_ms),
            succeeded: self.metrics.get(Counter::Succeeded),
            failed: self.metrics.get(Counter::Failed),
            conflicts: self.metrics.get(Counter::ConflictsResolved),
            breaker_trips: self.metrics.get(Counter::BreakerTrips),
            last_sync_at,
        }
    }
}

/// Exports snapshots until the event channel closes or the task is aborted.
pub(super) async fn export_loop(inner: Arc<Inner>, mut events: broadcast::Receiver<SyncEvent>) {
    let Some((config, sender)) = inner.telemetry.clone() else {
        return;
    };
    let mut decider = ExportDecider::default();
    let mut failures = RecentFailures::default();
    let mut last_sync_at = None;
    let mut seq = 0u64;
    // The next look at the state, and the earliest a change may be sent.
    let mut wake_at = inner.clock.monotonic();
    let mut earliest_send = wake_at;
    loop {
        let wait = wake_at.saturating_sub(inner.clock.monotonic());
        tokio::select! {
            event = events.recv() => {
                // The earliest a look at the state may send what the event
                // changed; a breaker change may go sooner than the rest.
                let send_at = match event {
                    Ok(SyncEvent::OpSucceeded { .. }) => {
                        last_sync_at = Some(inner.clock.now_millis());
                        None
                    }
                    Ok(SyncEvent::OpFailed { error, .. }) => {
                        failures.push(&error);
                        Some(earliest_send)
                    }
                    Ok(SyncEvent::Breaker { .. }) => Some(decider.breaker_send_at(&config)),
                    Ok(SyncEvent::Stalled { .. }) => Some(earliest_send),
                    Ok(_) | Err(RecvError::Lagged(_)) => None,
                    Err(RecvError::Closed) => return,
                };
                if let Some(at) = send_at {
                    wake_at = wake_at.min(at.max(inner.clock.monotonic()));
                }
                continue;
            }
            () = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
        }
        let now = inner.clock.monotonic();
        if now < wake_at {
            continue;
        }
        let snapshot = inner
            .telemetry_snapshot(seq + 1, &failures, last_sync_at)
            .await;
        let fp = Fingerprint::of(&snapshot);
        match decider.decide(&fp, now, &config) {
            Decision::Send => {
                seq += 1;
                decider.sent(fp, now);
                earliest_send = now + config.min_interval;
                wake_at = earliest_send;
                if let Err(e) = sender.send(&snapshot).await {
                    tracing::debug!("telemetry not sent: {e}");
                }
            }
            Decision::WaitFor(d) | Decision::Idle(d) => wake_at = now + d,
        }
    }
}
