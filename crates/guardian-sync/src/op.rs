//! Operations in the outbox: what the app asks for ([`NewOp`]) and what the
//! outbox keeps ([`PendingOp`]).
//!
//! An op is one CREATE, UPDATE or DELETE of one entity. Its idempotency key is
//! created before the op is first stored and never changes while the op can
//! still be re-sent, so a retry can never take effect twice on the server.

use guardian_protocol::MutationKind;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Identity of an op in the outbox: a UUID that names the op's position in
/// its outbox file (version 8, see `outbox::op_ids`), or, for an op stored
/// before schema 6 or by another tool, any UUID.
pub type OpId = Uuid;

/// What an op does to its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    /// Create the entity with the payload as its data.
    Create,
    /// Replace the entity's data with the payload (a full PUT).
    Update,
    /// Delete the entity.
    Delete,
}

impl OpKind {
    /// The lower-case name used on disk and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }

    /// The op kind that performs a wire mutation kind.
    pub fn from_mutation(kind: MutationKind) -> Self {
        match kind {
            MutationKind::Create => Self::Create,
            MutationKind::Update => Self::Update,
            MutationKind::Delete => Self::Delete,
        }
    }

    /// Parses the on-disk name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "create" => Some(Self::Create),
            "update" => Some(Self::Update),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }

    /// The wire-protocol mutation kind.
    pub fn mutation(self) -> MutationKind {
        match self {
            Self::Create => MutationKind::Create,
            Self::Update => MutationKind::Update,
            Self::Delete => MutationKind::Delete,
        }
    }
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an op is in its life.
///
/// Its names are the same everywhere: on disk, in JSON and on the command
/// line (`pending`, `in_flight`, `failed`); `in-flight`, the spelling of
/// earlier command lines, is still accepted on input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    /// Waiting to be sent (possibly again, after `next_attempt_at`).
    Pending,
    /// Claimed by the runner; a request may be on the wire.
    #[serde(alias = "in-flight")]
    InFlight,
    /// Permanently failed; kept in the dead-letter list until retried or discarded.
    Failed,
}

impl OpState {
    /// The name used on disk (`pending`, `in_flight`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InFlight => "in_flight",
            Self::Failed => "failed",
        }
    }

    /// Parses the on-disk name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "in_flight" => Some(Self::InFlight),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

impl std::fmt::Display for OpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An op the app wants to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOp {
    /// What to do.
    pub kind: OpKind,
    /// Entity type, `[a-z][a-z0-9_]{0,63}`.
    pub entity_type: String,
    /// Entity id, `[A-Za-z0-9._-]{1,128}` other than `.` and `..`.
    pub entity_id: String,
    /// The entity's new data (a JSON object) for create/update; `Null` for delete.
    pub payload: Value,
    /// The entity state this change was made from (for a 3-way merge on conflict).
    pub base: Option<Value>,
    /// The server version this change was made against (sent as `If-Match`).
    pub base_version: Option<u64>,
    /// Optimistic-update transaction token travelling with the op.
    pub txn_token: Option<String>,
    /// Payload format version; `None` means the outbox's current version.
    pub envelope_version: Option<u32>,
    /// Ops this one waits for: it is sent only once each of them is
    /// acknowledged (or gone), and fails when one of them fails.
    pub depends_on: Vec<OpId>,
}

impl NewOp {
    fn new(kind: OpKind, entity_type: impl Into<String>, entity_id: impl Into<String>) -> Self {
        Self {
            kind,
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            payload: Value::Null,
            base: None,
            base_version: None,
            txn_token: None,
            envelope_version: None,
            depends_on: Vec::new(),
        }
    }

    /// A CREATE of `entity_type/entity_id` with `payload` as its data.
    pub fn create(
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        payload: Value,
    ) -> Self {
        Self {
            payload,
            ..Self::new(OpKind::Create, entity_type, entity_id)
        }
    }

    /// An UPDATE replacing the data of `entity_type/entity_id` with `payload`.
    pub fn update(
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        payload: Value,
    ) -> Self {
        Self {
            payload,
            ..Self::new(OpKind::Update, entity_type, entity_id)
        }
    }

    /// A DELETE of `entity_type/entity_id`.
    pub fn delete(entity_type: impl Into<String>, entity_id: impl Into<String>) -> Self {
        Self::new(OpKind::Delete, entity_type, entity_id)
    }

    /// Records the state and server version the change was made from.
    #[must_use]
    pub fn with_base(mut self, base: Value, version: u64) -> Self {
        self.base = Some(base);
        self.base_version = Some(version);
        self
    }

    /// Records only the server version the change was made against.
    #[must_use]
    pub fn with_base_version(mut self, version: u64) -> Self {
        self.base_version = Some(version);
        self
    }

    /// Attaches an optimistic-update transaction token.
    #[must_use]
    pub fn with_txn_token(mut self, token: impl Into<String>) -> Self {
        self.txn_token = Some(token.into());
        self
    }

    /// Makes the op wait for `op_id` (see [`NewOp::depends_on`]).
    #[must_use]
    pub fn with_dependency(mut self, op_id: OpId) -> Self {
        if !self.depends_on.contains(&op_id) {
            self.depends_on.push(op_id);
        }
        self
    }

    /// Sets the payload format version (default: the outbox's current one).
    #[must_use]
    pub fn with_envelope_version(mut self, version: u32) -> Self {
        self.envelope_version = Some(version);
        self
    }
}

/// The history event of a `retry` that put back an op that had been sent:
/// its attempt count starts again from zero, but its key may be applied, so
/// it never again counts as never attempted (see [`PendingOp::never_attempted`]).
pub const RETRIED_AFTER_SEND: &str = "retried";

/// The history event of a `retry` that put back an op that was never sent.
pub const REQUEUED: &str = "requeued";

/// One event in an op's life kept for inspection (conflicts, reconciliations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When it happened (Unix ms).
    pub at: i64,
    /// What happened, e.g. `conflict`, `reconciled`, `upcast`.
    pub event: String,
    /// Human-readable detail.
    pub detail: String,
    /// The idempotency key the op had before this event, if it changed.
    pub old_idempotency_key: Option<Uuid>,
    /// On an op's first reconciliation: the payload as the app wrote it,
    /// i.e. the app's view of the entity after this op. The entity's next
    /// op was made from that view, which version chaining needs to know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_payload: Option<Value>,
}

/// True when the history shows a `retry` of an op that had been sent: its
/// attempt count was reset, yet its key may be applied by the server.
pub(crate) fn sent_before_retry(history: &[HistoryEntry]) -> bool {
    history.iter().any(|h| h.event == RETRIED_AFTER_SEND)
}

/// An op's atomic transaction: its id and how many ops it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TxnRef {
    /// The transaction's id, also its idempotency key on the wire.
    pub id: Uuid,
    /// Its number of ops (fixed at enqueue: coalescing never adds or
    /// removes one).
    pub size: u32,
}

/// An op as stored in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingOp {
    /// FIFO position (monotonically increasing, never reused).
    pub seq: i64,
    /// Identity of the op.
    pub op_id: OpId,
    /// Sent as `Idempotency-Key`; changes only when a reconciled retry makes a new request.
    pub idempotency_key: Uuid,
    /// What to do.
    pub kind: OpKind,
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// New data (object) for create/update; `Null` for delete.
    pub payload: Value,
    /// The entity state the change was made from.
    pub base: Option<Value>,
    /// Server version to send as `If-Match`.
    pub base_version: Option<u64>,
    /// True while the op waits for its predecessor's ack to learn its `base_version`.
    pub chained: bool,
    /// Optimistic transaction tokens settled by this op (several after coalescing).
    pub txn_tokens: Vec<String>,
    /// Payload format version.
    pub envelope_version: u32,
    /// Life-cycle state.
    pub state: OpState,
    /// Sends started (incremented durably before each send).
    pub attempts: u32,
    /// Earliest time of the next send (Unix ms).
    pub next_attempt_at: i64,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// When the op was enqueued (Unix ms).
    pub created_at: i64,
    /// Last change of the row (Unix ms).
    pub updated_at: i64,
    /// How many later ops were merged into this one.
    pub coalesced_count: u32,
    /// How many conflicts were reconciled for this op.
    pub reconciliations: u32,
    /// Conflicts and reconciliations, oldest first.
    pub history: Vec<HistoryEntry>,
    /// The atomic transaction the op belongs to: its ops are sent, applied,
    /// retried, failed and discarded together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<TxnRef>,
    /// Ops it waits for (see [`NewOp::depends_on`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<OpId>,
}

impl PendingOp {
    /// True if the op is part of an atomic transaction or waits for other
    /// ops: its readiness is decided by the outbox's gate, not by the head
    /// rule alone.
    pub fn is_gated(&self) -> bool {
        self.txn.is_some() || !self.depends_on.is_empty()
    }

    /// True if no send was ever started: the op may still be coalesced, edited or cancelled.
    pub fn never_attempted(&self) -> bool {
        self.attempts == 0 && self.state == OpState::Pending && !sent_before_retry(&self.history)
    }

    /// About what the op adds to a request body: its payload's JSON length
    /// plus a fixed allowance for the envelope (kind, type, id, key,
    /// `If-Match`). Used to keep batches under their byte limit.
    pub fn wire_size(&self) -> usize {
        /// Counts bytes instead of storing them.
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        // Writing a `Value` into a sink that cannot fail cannot fail.
        let _ = serde_json::to_writer(&mut count, &self.payload);
        count.0 + 200
    }
}

/// Proof of holding the processing lock: every runner write is conditioned on it.
///
/// Only taking the lock makes one ([`crate::outbox::Outbox::lock_acquire`],
/// [`crate::lock::ProcessingLock`]): its fields are private and it cannot
/// be deserialized, so no code can forge another holder's fence.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    owner: String,
    epoch: u64,
}

impl Fence {
    /// Made by the lock row when the lock is taken.
    pub(crate) fn new(owner: String, epoch: u64) -> Self {
        Self { owner, epoch }
    }

    /// The lock holder's owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The lock epoch taken by this holder (a fencing token).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// What the server said when it accepted an op.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ack {
    /// The entity's new server version, if known; becomes the next chained op's `If-Match`.
    pub version: Option<u64>,
    /// The entity's new server data, if known; becomes the next chained op's base.
    pub data: Option<Value>,
}

/// A reconciled retry of an op after a conflict: a new request with a new key.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconciled {
    /// Send as another kind from now on (a conflicted CREATE of an entity
    /// that exists retries as an UPDATE); `None` keeps the kind.
    pub kind: Option<OpKind>,
    /// The merged payload to send.
    pub payload: Value,
    /// The new base (usually the server's current data).
    pub base: Option<Value>,
    /// The new `If-Match` version (usually the server's current version).
    pub base_version: Option<u64>,
    /// What was reconciled, kept in the op's history.
    pub detail: String,
}

/// The outcome of an optimistic-update transaction token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum TxnOutcome {
    /// Some op carrying the token has not been settled yet.
    Pending,
    /// Every op carrying the token was applied (or coalesced away).
    Succeeded,
    /// An op carrying the token failed permanently (or was cancelled).
    Failed {
        /// Why.
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_round_trip() {
        for k in [OpKind::Create, OpKind::Update, OpKind::Delete] {
            assert_eq!(OpKind::parse(k.as_str()), Some(k));
            assert_eq!(k.mutation().as_str(), k.as_str());
        }
        for s in [OpState::Pending, OpState::InFlight, OpState::Failed] {
            assert_eq!(OpState::parse(s.as_str()), Some(s));
        }
        assert_eq!(OpKind::parse("upsert"), None);
        assert_eq!(OpState::parse(""), None);
    }

    #[test]
    fn builders_fill_fields() {
        let op = NewOp::update("device", "d1", json!({"on": true}))
            .with_base(json!({"on": false}), 3)
            .with_txn_token("t1");
        assert_eq!(op.kind, OpKind::Update);
        assert_eq!(op.base_version, Some(3));
        assert_eq!(op.txn_token.as_deref(), Some("t1"));
        let d = NewOp::delete("device", "d1").with_base_version(4);
        assert_eq!(d.payload, Value::Null);
        assert_eq!(d.base_version, Some(4));
        assert_eq!(d.base, None);
    }
}
