//! The engine's side of telemetry export: gathers a snapshot from the
//! runner's state and hands it to [`crate::telemetry::export`], which
//! decides when and sends. Runs as its own task while a runner holds the
//! lock; see that module for the guarantees.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use guardian_protocol::telemetry::{BreakerStateName, QueueDepth, TelemetrySnapshot};
use tokio::sync::Notify;

use crate::breaker::BreakerState;
use crate::telemetry::export::{Decision, ExportDecider, Fingerprint, RecentFailures};
use crate::telemetry::Counter;

use super::{Inner, SyncEvent};

/// What the export task hears of, noted as events are emitted without
/// waking it for each: a drain emits an event per applied op, and waking a
/// task per op was a measurable part of the drain's CPU per op. An applied
/// op only moves `last_sync_at`; the events that may make a snapshot due (a
/// failure, a breaker change, a stall) wake the task.
#[derive(Debug)]
pub(super) struct ExportFeed {
    /// Unix ms of the last applied op; `i64::MIN` until one is.
    last_sync_at: AtomicI64,
    notes: Mutex<Notes>,
    changed: Notify,
}

impl Default for ExportFeed {
    fn default() -> Self {
        Self {
            last_sync_at: AtomicI64::new(i64::MIN),
            notes: Mutex::default(),
            changed: Notify::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Notes {
    failures: RecentFailures,
    /// Seen since the task last looked.
    failed_or_stalled: bool,
    breaker: bool,
}

impl ExportFeed {
    /// Notes `event`; `now_ms` reads the time it was emitted at.
    pub(super) fn note(&self, event: &SyncEvent, now_ms: impl FnOnce() -> i64) {
        match event {
            SyncEvent::OpSucceeded { .. } => {
                self.last_sync_at.store(now_ms(), Ordering::Relaxed);
                return;
            }
            SyncEvent::OpFailed { error, .. } => {
                let mut notes = self.notes();
                notes.failures.push(error);
                notes.failed_or_stalled = true;
            }
            SyncEvent::Breaker { .. } => self.notes().breaker = true,
            SyncEvent::Stalled { .. } => self.notes().failed_or_stalled = true,
            _ => return,
        }
        self.changed.notify_one();
    }

    fn notes(&self) -> std::sync::MutexGuard<'_, Notes> {
        // Plain data, each update complete under the lock.
        self.notes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was noted since the last call: (a failure or stall, a breaker
    /// change).
    fn take(&self) -> (bool, bool) {
        let mut notes = self.notes();
        let seen = (notes.failed_or_stalled, notes.breaker);
        notes.failed_or_stalled = false;
        notes.breaker = false;
        seen
    }

    fn last_sync_at(&self) -> Option<i64> {
        Some(self.last_sync_at.load(Ordering::Relaxed)).filter(|&t| t != i64::MIN)
    }
}

fn breaker_name(state: &BreakerState) -> BreakerStateName {
    match state {
        BreakerState::Closed => BreakerStateName::Closed,
        BreakerState::Open { .. } => BreakerStateName::Open,
        BreakerState::HalfOpen => BreakerStateName::HalfOpen,
    }
}

impl Inner {
    async fn telemetry_snapshot(&self, seq: u64) -> TelemetrySnapshot {
        // A failed count is best effort too: zeros rather than no snapshot.
        // Read before the rest, which is all read after this one wait: the
        // drain may ack ops meanwhile, and a snapshot read on both sides of
        // it showed ops succeeded with no last sync.
        let stats = self.outbox.stats().await.unwrap_or_default();
        let (last_failures, last_sync_at) = (
            self.export.notes().failures.to_vec(),
            self.export.last_sync_at(),
        );
        let now = self.clock.now_millis();
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
            last_failures,
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

/// Exports snapshots until the task is aborted (when the runner lets the
/// lock go).
pub(super) async fn export_loop(inner: Arc<Inner>) {
    let Some((config, sender)) = inner.telemetry.clone() else {
        return;
    };
    let mut decider = ExportDecider::default();
    let mut seq = 0u64;
    // The next look at the state, and the earliest a change may be sent.
    let mut wake_at = inner.clock.monotonic();
    let mut earliest_send = wake_at;
    loop {
        let wait = wake_at.saturating_sub(inner.clock.monotonic());
        tokio::select! {
            () = inner.export.changed.notified() => {
                // The earliest a look at the state may send what changed; a
                // breaker change may go sooner than the rest.
                let (failed_or_stalled, breaker) = inner.export.take();
                let now = inner.clock.monotonic();
                if failed_or_stalled {
                    wake_at = wake_at.min(earliest_send.max(now));
                }
                if breaker {
                    wake_at = wake_at.min(decider.breaker_send_at(&config).max(now));
                }
                continue;
            }
            () = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
        }
        let now = inner.clock.monotonic();
        if now < wake_at {
            continue;
        }
        let snapshot = inner.telemetry_snapshot(seq + 1).await;
        let fp = Fingerprint::of(&snapshot);
        match decider.decide(&fp, now, &config) {
            Decision::Send => {
                seq += 1;
                decider.sent(fp, now);
                earliest_send = now.saturating_add(config.min_interval);
                wake_at = earliest_send;
                if let Err(e) = sender.send(&snapshot).await {
                    tracing::debug!("telemetry not sent: {e}");
                }
            }
            Decision::WaitFor(d) | Decision::Idle(d) => wake_at = now.saturating_add(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;
    use uuid::Uuid;

    use super::*;

    /// An applied op moves `last_sync_at` without waking the export task;
    /// a failure or a stall wakes it, and a failure's reason is kept.
    #[test]
    fn only_events_that_may_make_a_snapshot_due_wake_the_task() {
        let feed = ExportFeed::default();
        assert_eq!(feed.last_sync_at(), None);
        let applied = SyncEvent::OpSucceeded {
            op_id: Uuid::now_v7(),
            entity_type: "device".into(),
            entity_id: "d1".into(),
            version: Some(1),
            replayed: false,
        };
        for at in [10, 20] {
            feed.note(&applied, || at);
        }
        assert_eq!(feed.last_sync_at(), Some(20));
        assert!(feed.changed.notified().now_or_never().is_none());
        assert_eq!(feed.take(), (false, false));
        let failed = SyncEvent::OpFailed {
            op_id: Uuid::now_v7(),
            entity_type: "device".into(),
            entity_id: "d1".into(),
            error: "422 invalid".into(),
        };
        feed.note(&failed, || 30);
        assert!(feed.changed.notified().now_or_never().is_some());
        assert_eq!(feed.take(), (true, false));
        assert_eq!(feed.take(), (false, false), "taken once");
        assert_eq!(feed.notes().failures.to_vec(), ["422 invalid"]);
        feed.note(
            &SyncEvent::Stalled {
                stalled_for_ms: 1,
                pending: 1,
            },
            || 40,
        );
        assert!(feed.changed.notified().now_or_never().is_some());
        assert_eq!(feed.take(), (true, false));
        assert_eq!(feed.last_sync_at(), Some(20));
    }
}
