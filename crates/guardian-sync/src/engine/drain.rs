//! One drain step: claim ready ops, send them, record every outcome.

use std::time::Duration;

use futures::future::join_all;
use guardian_protocol::Entity;
use serde_json::Value;

use crate::breaker::Admission;
use crate::op::{Ack, Fence, OpKind, PendingOp, Reconciled};
use crate::reconcile::{ConflictInput, Resolution};
use crate::retry::{parse_retry_after, RetryDecision};
use crate::telemetry::Counter;
use crate::transport::{Fetched, OpRequest, Outcome};

use super::run::DrainReport;
use super::{EngineError, Inner, SyncEvent};

/// What a step did.
#[derive(Debug)]
pub(super) enum Step {
    /// Ops were sent and their outcomes recorded.
    Progressed(DrainReport),
    /// Nothing is ready now.
    Idle,
    /// The breaker is open: no request may be sent for this long.
    BreakerOpen,
    /// Authentication is required; waiting for [`super::SyncEngine::resume`].
    AuthPaused,
}

impl Inner {
    pub(super) async fn step(&self, fence: &Fence) -> Result<Step, EngineError> {
        if self.auth_paused.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(Step::AuthPaused);
        }
        let admission = self.breaker().allow_request(self.clock.monotonic());
        self.publish_breaker();
        let limit = match admission {
            // Ops stay pending (not failed) while the breaker is open; the
            // run loop sleeps until the cooldown ends.
            Admission::Rejected { .. } => return Ok(Step::BreakerOpen),
            Admission::Trial => 1,
            Admission::Allowed => self.batch.map_or(self.concurrency, |b| b.max_ops.max(1)),
        };
        self.rebase_after_clock_step(fence).await?;
        let ops = self
            .outbox
            .claim_ready(fence, limit, self.clock.now_millis())
            .await?;
        if ops.is_empty() {
            return Ok(Step::Idle);
        }
        let reports = match self.batch {
            Some(batch) if ops.len() > 1 => {
                let mut reports = Vec::new();
                for chunk in chunk_by_bytes(&ops, batch.max_bytes) {
                    reports.extend(self.send_batch(fence, chunk).await);
                }
                reports
            }
            _ => join_all(ops.iter().map(|op| self.process(fence, op))).await,
        };
        let mut total = DrainReport::default();
        let mut lost = false;
        for r in reports {
            match r {
                Ok(r) => total.add(&r),
                Err(EngineError::LockLost) => lost = true,
                Err(e) => return Err(e),
            }
        }
        if lost {
            return Err(EngineError::LockLost);
        }
        self.deliver_outcomes().await?;
        Ok(Step::Progressed(total))
    }

    /// Keeps stored backoffs their length across wall-clock steps.
    async fn rebase_after_clock_step(&self, fence: &Fence) -> Result<(), EngineError> {
        let step = self
            .clock_watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .observe(self.clock.now_millis(), self.clock.monotonic());
        if let Some(step) = step {
            // Ops not yet due in the old timeline move by the step. After a
            // step back, ops that were already due would look due far in the
            // future: they move too (anything due after the new "now").
            let after = step.old_now.saturating_add(step.delta_ms.min(0));
            let moved = self
                .outbox
                .rebase_schedule(fence, after, step.old_now, step.delta_ms)
                .await?;
            tracing::warn!(
                delta_ms = step.delta_ms,
                moved,
                "wall clock stepped; re-based the schedule of pending ops"
            );
        }
        Ok(())
    }

    fn request(op: &PendingOp) -> OpRequest {
        OpRequest {
            kind: op.kind.mutation(),
            entity_type: op.entity_type.clone(),
            entity_id: op.entity_id.clone(),
            payload: op.payload.clone(),
            if_match: op.base_version,
            idempotency_key: op.idempotency_key.to_string(),
        }
    }

    async fn process(&self, fence: &Fence, op: &PendingOp) -> Result<DrainReport, EngineError> {
        let request = Self::request(op);
        let started = self.clock.monotonic();
        self.metrics.incr(Counter::Sent);
        let outcome = self.transport.send(&request).await;
        let latency = self.clock.monotonic().saturating_sub(started);
        self.handle(fence, op, outcome, latency).await
    }

    async fn send_batch(
        &self,
        fence: &Fence,
        ops: &[PendingOp],
    ) -> Vec<Result<DrainReport, EngineError>> {
        let requests: Vec<OpRequest> = ops.iter().map(Self::request).collect();
        let started = self.clock.monotonic();
        for _ in ops {
            self.metrics.incr(Counter::Sent);
        }
        let outcomes = self.transport.send_batch(&requests).await;
        let latency = self.clock.monotonic().saturating_sub(started);
        // Concurrently, so the outbox's group commit records the whole
        // batch's outcomes in one transaction instead of one fsync each.
        join_all(
            ops.iter()
                .zip(outcomes)
                .map(|(op, outcome)| self.handle(fence, op, outcome, latency)),
        )
        .await
    }

    /// Records one outcome (DESIGN §4).
    async fn handle(
        &self,
        fence: &Fence,
        op: &PendingOp,
        outcome: Outcome,
        latency: Duration,
    ) -> Result<DrainReport, EngineError> {
        let mut report = DrainReport {
            sent: 1,
            ..DrainReport::default()
        };
        let now_mono = self.clock.monotonic();
        match outcome {
            Outcome::Applied { entity, replayed } => {
                self.breaker().record_success(now_mono);
                self.publish_breaker();
                self.metrics.incr(Counter::Succeeded);
                self.metrics.record_latency(latency);
                self.ack(fence, op, entity.as_ref(), replayed).await?;
                report.succeeded = 1;
            }
            Outcome::AlreadyGone => {
                self.breaker().record_success(now_mono);
                self.publish_breaker();
                self.metrics.incr(Counter::Succeeded);
                self.metrics.record_latency(latency);
                self.ack(fence, op, None, false).await?;
                report.succeeded = 1;
            }
            Outcome::Conflict { problem } => {
                // A conflict says the server is healthy.
                self.breaker().record_success(now_mono);
                self.publish_breaker();
                self.metrics.record_latency(latency);
                let current = match problem.current {
                    Some(e) => Fetched::Present(e),
                    None => match self.transport.fetch(&op.entity_type, &op.entity_id).await {
                        Ok(f) => f,
                        Err(failure) => {
                            // Could not learn the server state: retry the
                            // same request later (it was not applied).
                            return self
                                .retry_or_fail(
                                    fence,
                                    op,
                                    failure_detail(&failure),
                                    None,
                                    &mut report,
                                )
                                .await;
                        }
                    },
                };
                self.reconcile(fence, op, current, &mut report).await?;
            }
            Outcome::Retryable {
                retry_after,
                detail,
                counts_for_breaker,
                ..
            } => {
                let now = self.clock.now_millis();
                let retry_after = retry_after.and_then(|v| parse_retry_after(&v, now));
                if counts_for_breaker {
                    self.breaker()
                        .record_failure(now_mono, retry_after.map(|r| r.delay()));
                    self.publish_breaker();
                }
                self.retry_or_fail(fence, op, detail, retry_after, &mut report)
                    .await?;
            }
            Outcome::AuthRequired => {
                self.auth_paused
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                self.outbox
                    .retry_later(
                        fence,
                        op.op_id,
                        self.clock.now_millis(),
                        "authentication required",
                    )
                    .await?;
                self.emit(SyncEvent::AuthRequired);
            }
            Outcome::Permanent { detail, .. } => {
                self.breaker().record_success(now_mono);
                self.publish_breaker();
                self.fail(fence, op, &detail).await?;
                report.failed = 1;
            }
        }
        Ok(report)
    }

    async fn ack(
        &self,
        fence: &Fence,
        op: &PendingOp,
        entity: Option<&Entity>,
        replayed: bool,
    ) -> Result<(), EngineError> {
        let version = entity.map(|e| e.version);
        self.outbox
            .ack(
                fence,
                op.op_id,
                Ack {
                    version,
                    data: entity.map(|e| e.data.clone()),
                },
            )
            .await?;
        self.emit(SyncEvent::OpSucceeded {
            op_id: op.op_id,
            entity_type: op.entity_type.clone(),
            entity_id: op.entity_id.clone(),
            version,
            replayed,
        });
        Ok(())
    }

    async fn fail(&self, fence: &Fence, op: &PendingOp, error: &str) -> Result<(), EngineError> {
        self.outbox.fail(fence, op.op_id, error).await?;
        self.metrics.incr(Counter::Failed);
        tracing::info!(op = %op.op_id, entity_type = %op.entity_type, "op failed permanently: {error}");
        self.emit(SyncEvent::OpFailed {
            op_id: op.op_id,
            entity_type: op.entity_type.clone(),
            entity_id: op.entity_id.clone(),
            error: error.to_owned(),
        });
        Ok(())
    }

    async fn retry_or_fail(
        &self,
        fence: &Fence,
        op: &PendingOp,
        detail: String,
        retry_after: Option<crate::retry::RetryAfter>,
        report: &mut DrainReport,
    ) -> Result<DrainReport, EngineError> {
        let now = self.clock.now_millis();
        match self
            .retry
            .schedule(op.attempts, retry_after, now, &mut rand::rng())
        {
            RetryDecision::RetryAt(at) => {
                self.outbox
                    .retry_later(fence, op.op_id, at, &detail)
                    .await?;
                self.metrics.incr(Counter::Retried);
                report.retried += 1;
                self.emit(SyncEvent::OpRetried {
                    op_id: op.op_id,
                    attempts: op.attempts,
                    next_attempt_at: at,
                    reason: detail,
                });
            }
            RetryDecision::GiveUp => {
                let error = format!("gave up after {} attempts: {detail}", op.attempts);
                self.fail(fence, op, &error).await?;
                report.failed += 1;
            }
        }
        Ok(*report)
    }

    async fn reconcile(
        &self,
        fence: &Fence,
        op: &PendingOp,
        current: Fetched,
        report: &mut DrainReport,
    ) -> Result<(), EngineError> {
        // A tombstone (deleted flag, or a 410 without a body) is not the same
        // as "absent": a CREATE or UPDATE against it must not loop.
        let tombstone;
        let entity = match &current {
            Fetched::Present(e) => Some(e),
            Fetched::Absent => None,
            Fetched::Deleted => {
                tombstone = Entity {
                    entity_type: op.entity_type.clone(),
                    id: op.entity_id.clone(),
                    version: 0,
                    data: Value::Null,
                    updated_at: String::new(),
                    deleted: true,
                };
                Some(&tombstone)
            }
        };
        let resolution = self.reconciler.decide(&ConflictInput {
            kind: op.kind.mutation(),
            entity_type: &op.entity_type,
            payload: &op.payload,
            base: op.base.as_ref(),
            current: entity,
            reconciliations: op.reconciliations,
        });
        let remote = entity.map_or(Value::Null, |e| e.data.clone());
        let event = |resolved: Value, resolution: &str| SyncEvent::Conflict {
            op_id: op.op_id,
            entity_type: op.entity_type.clone(),
            entity_id: op.entity_id.clone(),
            local: op.payload.clone(),
            remote: remote.clone(),
            resolved,
            resolution: resolution.to_owned(),
        };
        match resolution {
            Resolution::Retry {
                send_as,
                payload,
                if_match,
                base,
                conflicts,
            } => {
                let detail = format!(
                    "conflict at version {}; merged ({} field conflict(s)), retrying{}",
                    if_match.map_or_else(|| "?".to_owned(), |v| v.to_string()),
                    conflicts.len(),
                    if send_as == op.kind.mutation() {
                        String::new()
                    } else {
                        format!(" as {}", send_as.as_str())
                    },
                );
                self.outbox
                    .reconciled(
                        fence,
                        op.op_id,
                        Reconciled {
                            kind: Some(OpKind::from_mutation(send_as)),
                            payload: payload.clone(),
                            base,
                            base_version: if_match,
                            detail,
                        },
                    )
                    .await?;
                self.metrics.incr(Counter::ConflictsResolved);
                report.conflicts_resolved += 1;
                self.emit(event(payload, "retry"));
            }
            Resolution::Succeeded { version, data, .. } => {
                self.metrics.incr(Counter::ConflictsResolved);
                self.outbox
                    .ack(fence, op.op_id, Ack { version, data })
                    .await?;
                report.succeeded += 1;
                self.emit(event(Value::Null, "succeeded"));
                self.emit(SyncEvent::OpSucceeded {
                    op_id: op.op_id,
                    entity_type: op.entity_type.clone(),
                    entity_id: op.entity_id.clone(),
                    version,
                    replayed: false,
                });
            }
            Resolution::Fail {
                reason,
                local,
                remote,
            } => {
                // Both versions are kept in the error for the app.
                let error = serde_json::json!({
                    "conflict": reason,
                    "local": local,
                    "remote": remote,
                })
                .to_string();
                self.fail(fence, op, &error).await?;
                report.failed += 1;
                self.emit(event(Value::Null, "failed"));
            }
        }
        Ok(())
    }

    /// Publishes queued breaker transitions as events and metrics.
    pub(super) fn publish_breaker(&self) {
        let transitions = self.breaker().take_transitions();
        for t in transitions {
            self.metrics.record_breaker_transition(&t);
            tracing::info!("circuit breaker {} -> {}", t.from.name(), t.to.name());
            self.emit(SyncEvent::Breaker {
                from: t.from.name().to_owned(),
                to: t.to.name().to_owned(),
            });
        }
    }

    /// Publishes settled optimistic outcomes (live, and those left undelivered
    /// by an earlier process), runs registered handlers, marks them delivered.
    pub(super) async fn deliver_outcomes(&self) -> Result<(), EngineError> {
        loop {
            let records = self.outbox.undelivered_outcomes(256).await?;
            if records.is_empty() {
                return Ok(());
            }
            let ids: Vec<i64> = records.iter().map(|r| r.id).collect();
            for r in records {
                let (succeeded, error) = match &r.outcome {
                    crate::op::TxnOutcome::Succeeded => (true, None),
                    crate::op::TxnOutcome::Failed { error } => (false, Some(error.clone())),
                    crate::op::TxnOutcome::Pending => continue,
                };
                if succeeded {
                    self.optimistic.commit(&r.token);
                } else {
                    self.optimistic
                        .rollback(&r.token, error.as_deref().unwrap_or("failed"));
                }
                self.emit(SyncEvent::TxnSettled {
                    token: r.token,
                    succeeded,
                    error,
                });
            }
            self.outbox.mark_outcomes_delivered(ids).await?;
        }
    }
}

fn failure_detail(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Retryable { detail, .. } | Outcome::Permanent { detail, .. } => {
            format!("fetching the current entity failed: {detail}")
        }
        Outcome::AuthRequired => "fetching the current entity needs authentication".into(),
        other => format!("fetching the current entity failed: {other:?}"),
    }
}

/// Splits claimed ops into batches of at most `max_bytes` of payload.
fn chunk_by_bytes(ops: &[PendingOp], max_bytes: usize) -> Vec<&[PendingOp]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, op) in ops.iter().enumerate() {
        let size = op.payload.to_string().len() + 200;
        if i > start && bytes + size > max_bytes {
            chunks.push(&ops[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < ops.len() {
        chunks.push(&ops[start..]);
    }
    chunks
}
