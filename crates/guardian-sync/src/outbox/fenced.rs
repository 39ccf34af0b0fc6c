//! The fenced runner API: what only the holder of the processing lock may
//! do to the outbox.
//!
//! [`Outbox`] is the app's API (enqueue, list, cancel, retry failed ops);
//! [`Fenced`] is the runner's, and only a [`Fence`] makes one, which only
//! taking the lock gives. Every write here first checks, in its own
//! transaction, that the fence still holds the lock: a runner that lost it
//! writes nothing.

use std::time::Duration;

use rusqlite::Connection;
use uuid::Uuid;

use super::error::OutboxError;
use super::writer::{Ctx, Unheard};
use super::{lock_row, runner, Outbox};
use crate::op::{Ack, Fence, OpId, PendingOp, Reconciled};

/// The outbox as the holder of `fence` sees it: claim, acknowledge, retry,
/// fail, reconcile, release, and keep the lock alive.
pub struct Fenced<'a> {
    outbox: &'a Outbox,
    fence: &'a Fence,
    unheard: Option<Unheard>,
}

impl std::fmt::Debug for Fenced<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fenced")
            .field("fence", self.fence)
            .field("unheard", &self.unheard.is_some())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// The runner's API under `fence` (from [`Outbox::lock_acquire`] or a
    /// [`crate::lock::ProcessingLock`]).
    pub fn fenced<'a>(&'a self, fence: &'a Fence) -> Fenced<'a> {
        Fenced {
            outbox: self,
            fence,
            unheard: None,
        }
    }
}

impl Fenced<'_> {
    /// Runs `hook` if the write that follows commits after its caller
    /// stopped waiting for it (its future dropped once the outbox's writer
    /// had begun it): whatever the caller would have done on success (a
    /// runner publishing the events of the acks it wrote) is then the
    /// hook's to do. It runs at most once, on the writer thread or where
    /// the future is dropped, and must not block.
    #[must_use]
    pub fn if_unheard(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.unheard = Some(Box::new(hook));
        self
    }

    /// Runs `f` in the writer's next group commit, fenced by the caller.
    async fn call<T, F>(self, f: F) -> Result<T, OutboxError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Ctx) -> Result<T, OutboxError> + Send + 'static,
    {
        self.outbox
            .inner
            .writer
            .call_unheard(f, self.unheard, None)
            .await
    }

    /// Claims up to `limit` ready ops (due by `now_ms`, head of their
    /// entity), marking them in flight with `attempts += 1` before returning.
    pub async fn claim_ready(
        self,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<PendingOp>, OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, ctx| runner::claim(conn, ctx, &fence, limit, now_ms))
            .await
    }

    /// The server applied the op: delete it, record its tokens' success and
    /// pass `ack.version`/`ack.data` to the entity's next chained op.
    pub async fn ack(self, op_id: OpId, ack: Ack) -> Result<(), OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, ctx| runner::ack(conn, ctx, &fence, op_id, &ack))
            .await
    }

    /// After a wall-clock step of `delta_ms` detected by the runner, moves
    /// every pending op due after `after_ms` and scheduled at or before
    /// `scheduled_by_ms` (both in the old timeline) by the step, so stored
    /// backoffs keep their length; retries already scheduled on the new
    /// clock stay. Fenced. Returns how many moved.
    pub async fn rebase_schedule(
        self,
        after_ms: i64,
        scheduled_by_ms: i64,
        delta_ms: i64,
    ) -> Result<u64, OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, _ctx| {
            runner::rebase_schedule(conn, &fence, after_ms, scheduled_by_ms, delta_ms)
        })
        .await
    }

    /// A retryable failure: back to pending, due at `next_attempt_at` (Unix ms).
    pub async fn retry_later(
        self,
        op_id: OpId,
        next_attempt_at: i64,
        error: &str,
    ) -> Result<(), OutboxError> {
        let fence = self.fence.clone();
        let error = error.to_owned();
        self.call(move |conn, ctx| {
            runner::retry_later(conn, ctx, &fence, op_id, next_attempt_at, &error)
        })
        .await
    }

    /// [`retry_later`](Self::retry_later) for several ops in one commit
    /// (a transaction's: they are pending again together).
    pub async fn retry_later_many(
        self,
        op_ids: Vec<OpId>,
        next_attempt_at: i64,
        error: &str,
    ) -> Result<(), OutboxError> {
        let fence = self.fence.clone();
        let error = error.to_owned();
        self.call(move |conn, ctx| {
            runner::retry_later_many(conn, ctx, &fence, &op_ids, next_attempt_at, &error)
        })
        .await
    }

    /// [`fail`](Self::fail) for several ops, each with its error, in one
    /// commit (a transaction's: it is dead-lettered as one).
    pub async fn fail_many(self, failures: Vec<(OpId, String)>) -> Result<(), OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, ctx| runner::fail_many(conn, ctx, &fence, &failures))
            .await
    }

    /// [`reconciled`](Self::reconciled) for an op of a transaction, whose
    /// `others` go back to pending in the same commit, those in `rebased`
    /// with a new payload and key (their edits moved onto the merge);
    /// returns the op's new key.
    pub async fn reconciled_in_txn(
        self,
        op_id: OpId,
        r: Reconciled,
        others: Vec<OpId>,
        rebased: Vec<(OpId, serde_json::Value)>,
    ) -> Result<Uuid, OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, ctx| {
            runner::reconciled_in_txn(conn, ctx, &fence, op_id, &r, &others, &rebased)
        })
        .await
    }

    /// A permanent failure: the op moves to the dead-letter list (kept).
    pub async fn fail(self, op_id: OpId, error: &str) -> Result<(), OutboxError> {
        let fence = self.fence.clone();
        let error = error.to_owned();
        self.call(move |conn, ctx| runner::fail(conn, ctx, &fence, op_id, &error))
            .await
    }

    /// A conflict was reconciled: store the new request (new idempotency key,
    /// returned) before it is sent; the old key goes to the op's history.
    pub async fn reconciled(self, op_id: OpId, r: Reconciled) -> Result<Uuid, OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, ctx| runner::reconciled(conn, ctx, &fence, op_id, &r))
            .await
    }

    /// Proves the holder is alive (heartbeat + 1); `LockLost` if it is not the holder.
    pub async fn lock_heartbeat(self) -> Result<(), OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, ctx| lock_row::heartbeat(conn, &fence, ctx.now()))
            .await
    }

    /// Frees the lock if `fence` still holds it.
    pub async fn lock_release(self) -> Result<(), OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, _| lock_row::release(conn, &fence))
            .await
    }

    /// Records several acks in one writer job (a batch's successes): the
    /// same effect as [`Self::ack`] for each, all or none.
    pub async fn ack_many(self, acks: Vec<(OpId, Ack)>) -> Result<(), OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, ctx| runner::ack_many(conn, ctx, &fence, &acks))
            .await
    }

    /// [`Self::ack_many`] (unless `acks` is empty), then a claim as `shape`
    /// says, in one transaction (one commit): the claim sees the entity
    /// heads the acks made. Any error refuses both.
    pub async fn ack_then_claim(
        self,
        acks: Vec<(OpId, Ack)>,
        limit: usize,
        now_ms: i64,
        shape: runner::ClaimShape,
    ) -> Result<Vec<Vec<PendingOp>>, OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, ctx| {
            runner::ack_then_claim(conn, ctx, &fence, &acks, limit, now_ms, shape)
        })
        .await
    }

    /// Claims ready ops with, behind each, its entity's next pending and due
    /// ops: one chain per entity, to be sent in one batch with dependencies
    /// (each op applied only if the one before it was). `limit` bounds all
    /// ops together; a chain has at most `max_chain` ops and
    /// `max_chain_bytes` (its head alone may be larger). A chain stops at an
    /// op not pending or not yet due, and before a chained op whose
    /// predecessor was reconciled (it must see the merge's result first).
    /// Fenced and durable like [`Self::claim_ready`].
    pub async fn claim_ready_chains(
        self,
        limit: usize,
        now_ms: i64,
        max_chain: usize,
        max_chain_bytes: usize,
    ) -> Result<Vec<Vec<PendingOp>>, OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, ctx| {
            runner::claim_chains(conn, ctx, &fence, limit, now_ms, max_chain, max_chain_bytes)
        })
        .await
    }

    /// Brings ready ops whose stored `next_attempt_at` lies further ahead
    /// than they may wait back to when they are due (see
    /// [`crate::retry::clamp_due`]; `horizon` is the retry policy's
    /// [`crate::retry::RetryPolicy::horizon`]), after a step back of the
    /// wall clock, whoever wrote them. Fenced. Returns how many moved.
    pub async fn clamp_schedule(self, now_ms: i64, horizon: Duration) -> Result<u64, OutboxError> {
        let fence = self.fence.clone();
        self.call(move |conn, _| runner::clamp_schedule(conn, &fence, now_ms, horizon))
            .await
    }

    /// Returns claimed but never-sent ops to the queue as if never claimed
    /// (pending, `attempts` restored). Fenced like every runner write.
    pub async fn release_claimed(self, op_ids: Vec<OpId>) -> Result<(), OutboxError> {
        if op_ids.is_empty() {
            return Ok(());
        }
        let fence = self.fence.clone();
        self.call(move |conn, ctx| runner::release(conn, ctx, &fence, &op_ids))
            .await
    }
}
