//! What the engine tells the app.

use serde::Serialize;
use serde_json::Value;

use crate::breaker::BreakerPhase;
use crate::op::OpId;

/// How a conflict was settled, in [`SyncEvent::Conflict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictOutcome {
    /// Merged; the op goes out again as a new request.
    Retry,
    /// Nothing more to send: the server already has what the op wanted.
    Succeeded,
    /// Could not be settled: the op failed, both sides kept.
    Failed,
}

impl std::fmt::Display for ConflictOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Retry => "retry",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        })
    }
}

/// Something the engine did or saw, published on [`crate::engine::SyncEngine::events`].
///
/// Events are for the app's UI and logs; they are not durable (the outbox
/// is). A slow subscriber misses events rather than slowing the drain.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SyncEvent {
    /// An op was applied by the server (or was already applied: `replayed`).
    OpSucceeded {
        /// The op.
        op_id: OpId,
        /// Entity type.
        entity_type: String,
        /// Entity id.
        entity_id: String,
        /// Server version after the change, when known.
        version: Option<u64>,
        /// The server replayed its stored response for this op's key.
        replayed: bool,
    },
    /// Every op of an atomic transaction was applied, in one commit.
    TransactionCommitted {
        /// The transaction.
        txn_id: uuid::Uuid,
        /// Its number of ops.
        ops: usize,
        /// The server replayed its stored response (an earlier attempt had
        /// committed it).
        replayed: bool,
    },
    /// An atomic transaction failed as one: none of its ops was applied,
    /// and all are kept in the outbox as `failed`.
    TransactionFailed {
        /// The transaction.
        txn_id: uuid::Uuid,
        /// Why (the refused op's reason).
        error: String,
    },
    /// An op failed permanently; it is kept in the outbox as `failed`.
    OpFailed {
        /// The op.
        op_id: OpId,
        /// Entity type.
        entity_type: String,
        /// Entity id.
        entity_id: String,
        /// Why.
        error: String,
    },
    /// An attempt failed transiently; the op will be retried.
    OpRetried {
        /// The op.
        op_id: OpId,
        /// Sends so far.
        attempts: u32,
        /// Next attempt, Unix ms.
        next_attempt_at: i64,
        /// Why the attempt failed.
        reason: String,
    },
    /// A conflict was reconciled (or could not be).
    Conflict {
        /// The op.
        op_id: OpId,
        /// Entity type.
        entity_type: String,
        /// Entity id.
        entity_id: String,
        /// What the op wanted to write.
        local: Value,
        /// What the server had.
        remote: Value,
        /// What will be sent instead, or `null` when the op succeeded or failed.
        resolved: Value,
        /// How it was settled.
        resolution: ConflictOutcome,
    },
    /// The circuit breaker changed state.
    Breaker {
        /// Previous state.
        from: BreakerPhase,
        /// New state.
        to: BreakerPhase,
    },
    /// This runner acquired the processing lock.
    LockAcquired {
        /// Our epoch (fencing token).
        epoch: u64,
        /// Previous owner when we took it over.
        took_over_from: Option<String>,
    },
    /// This runner lost the processing lock and stopped writing.
    LockLost,
    /// Authentication failed after a refresh; the engine pauses until
    /// [`crate::engine::SyncEngine::resume`] is called.
    AuthRequired,
    /// Ops are queued, the breaker is closed, and nothing has progressed for
    /// the configured stall time.
    Stalled {
        /// Milliseconds since the last progress.
        stalled_for_ms: u64,
        /// Ops pending.
        pending: u64,
    },
    /// An optimistic transaction token settled (also re-published after a
    /// restart for tokens whose handlers are gone).
    TxnSettled {
        /// The token.
        token: String,
        /// True when every op carrying it was applied.
        succeeded: bool,
        /// Why it failed.
        error: Option<String>,
    },
}
