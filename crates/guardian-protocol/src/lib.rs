//! Wire protocol v1 of guardian-sync.
//!
//! These types are the contract between the engine (`guardian-sync`) and any
//! backend, including the reference one (`guardian-server`). Both sides
//! serialize exactly these structs, so a field renamed here is a protocol
//! change: bump [`PROTOCOL_VERSION`] and keep the old shape readable.

#![warn(missing_docs)]

mod fingerprint;
mod number;
mod problem;
pub mod telemetry;
mod validate;

pub use fingerprint::{
    ChangeFingerprint, FingerprintError, CHANGE_FINGERPRINT_LEN, SINCE_FINGERPRINT_PARAM,
};
pub use number::{canonical_number, json_eq, numbers_are_canonical};
pub use problem::{problem_type, Problem, PROBLEM_CONTENT_TYPE};
pub use validate::{
    is_bearer_token, validate_entity_id, validate_entity_type, within_data_depth, ValidationError,
    MAX_DATA_DEPTH,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of the wire protocol described by this crate.
pub const PROTOCOL_VERSION: u32 = 1;

/// The reference server's default limit on a request body, in bytes: the
/// largest entity data it then accepts, and so (one change per realtime
/// message) about the largest realtime message it sends.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// Bytes of entity data a feed page holds before it ends: the change that
/// crosses the bound is the page's last, so a page's data stays under this
/// plus one entity. Realtime backlogs page the same way.
pub const FEED_PAGE_DATA_BYTES: usize = 4 << 20;

/// HTTP header names used by the protocol (lower case, as `http` wants them).
pub mod header {
    /// Carries the client-chosen idempotency key of a mutation.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// Set to `true` on a response replayed from the idempotency store.
    pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
}

/// An entity as the server stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Entity {
    /// Entity type, `[a-z][a-z0-9_]{0,63}`.
    #[serde(rename = "type")]
    pub entity_type: String,
    /// Entity id, `[A-Za-z0-9._-]{1,128}` other than `.` and `..`.
    pub id: String,
    /// Server version: 1 on create, +1 on every change (a delete included).
    pub version: u64,
    /// The entity's data, a JSON object (`null` once deleted).
    pub data: Value,
    /// Time of the last change, RFC 3339 in UTC.
    pub updated_at: String,
    /// True once the entity has been deleted (a tombstone).
    pub deleted: bool,
}

/// Body of `POST /v1/entities/{type}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateRequest {
    /// Client-chosen id of the new entity.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,128}$")]
    pub id: String,
    /// Initial data, a JSON object.
    #[schema(value_type = Object)]
    pub data: Value,
}

/// Body of `PUT /v1/entities/{type}/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpdateRequest {
    /// New data, a JSON object that replaces the old one.
    #[schema(value_type = Object)]
    pub data: Value,
}

/// Kind of a mutation, in batches and in the change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MutationKind {
    /// Create a new entity.
    Create,
    /// Replace the data of an existing entity.
    Update,
    /// Delete an entity (leaves a tombstone).
    Delete,
}

impl MutationKind {
    /// The lower-case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }
}

/// One op of a `POST /v1/batch` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchOp {
    /// What to do.
    pub op: MutationKind,
    /// Entity type.
    #[serde(rename = "type")]
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// Data for create and update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Expected current version (as `If-Match` on a single request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_match: Option<u64>,
    /// This op's own idempotency key.
    pub idempotency_key: String,
    /// Index of an earlier op of this batch, on the same entity, that must
    /// succeed (a 2xx result, fresh or replayed) before this op is applied.
    /// If it did not, this op is not applied, its key is not recorded, and
    /// its result is 424 [`problem_type::DEPENDENCY_FAILED`]: the client
    /// sends it again later, after its predecessor. This lets one batch
    /// carry several consecutive ops of one entity without a refused op
    /// being overtaken by its successors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<u32>,
    /// Version chaining inside a batch: the precondition is the version the
    /// `depends_on` op left the entity at, as if this op had been sent alone
    /// with that `If-Match` after its predecessor's response (none when the
    /// predecessor was a delete). Requires `depends_on`; excludes `if_match`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub if_match_chained: bool,
}

/// Body of `POST /v1/batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchRequest {
    /// Ops, applied in order.
    pub ops: Vec<BatchOp>,
}

/// Result of one batch op, at the same index as the op.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchResult {
    /// The HTTP status the op would have had as a single request.
    pub status: u16,
    /// The body it would have had (an entity, a problem, or null for 204).
    #[serde(default)]
    pub body: Value,
    /// True when replayed from the idempotency store.
    #[serde(default)]
    pub replayed: bool,
}

/// Body of a `POST /v1/batch` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchResponse {
    /// One result per op, in op order.
    pub results: Vec<BatchResult>,
}

/// Body of `POST /v1/transactions`: ops on one or several entities that
/// take effect together or not at all.
///
/// The ops are applied in order in one database transaction. If every op
/// succeeds (2xx, fresh or replayed) the transaction commits, each op's key
/// and the transaction's key are recorded, and a retry with the same
/// `transaction_key` and the same ops replays the whole response. If one op
/// is refused, nothing is applied or recorded: the response says which op
/// and why, and every key stays new.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TransactionRequest {
    /// The transaction's own idempotency key: 1 to 255 visible ASCII
    /// characters, in the same per-tenant namespace as op keys, and other
    /// than every op's `idempotency_key` (400 otherwise).
    #[schema(pattern = r"^[!-~]{1,255}$")]
    pub transaction_key: String,
    /// The ops, in order: at least one, and at most as many as the server
    /// accepts in a batch (413 beyond). `depends_on` and `if_match_chained`
    /// work as in a batch; a `depends_on` is always met once the
    /// transaction commits.
    #[schema(min_items = 1)]
    pub ops: Vec<BatchOp>,
}

/// Body of a `POST /v1/transactions` response (status 200 whether it
/// committed or not; a failure of the server itself is a problem document).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TransactionResponse {
    /// True when every op took effect in one commit.
    pub committed: bool,
    /// Index of the op whose refusal aborted the transaction (absent when
    /// it committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_op: Option<u32>,
    /// One result per op, in op order. When the transaction aborted, the
    /// refused op has its own result and every other op 424
    /// [`problem_type::TRANSACTION_ABORTED`].
    pub results: Vec<BatchResult>,
    /// True when the whole response was replayed from the idempotency store.
    #[serde(default)]
    pub replayed: bool,
}

/// One entry of the per-tenant change feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Change {
    /// Per-tenant cursor, strictly increasing with no gaps.
    pub cursor: u64,
    /// What happened.
    pub op: MutationKind,
    /// Entity type.
    #[serde(rename = "type")]
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// Entity version after the change.
    pub version: u64,
    /// Entity data after the change, `null` for deletes.
    #[serde(default)]
    pub data: Value,
}

/// Body of a `GET /v1/changes` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangesPage {
    /// Changes after `since`, in cursor order.
    pub changes: Vec<Change>,
    /// Cursor to pass as `since` for the next page.
    pub next: u64,
    /// The tenant's latest cursor when the page was read. A client that
    /// has no cursor, or whose cursor expired, rejoins the feed here after
    /// refetching its state, without a WebSocket (whose `hello` says the
    /// same). Absent from backends that do not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<u64>,
}

/// A frame of the `GET /v1/realtime` WebSocket, server to client.
///
/// DESIGN §10 wrote a change frame as `{"type":"change", ...change}`, but a
/// change has its own `type` member (the entity type), so the change is
/// nested instead: `{"type":"change","change":{...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RealtimeFrame {
    /// First frame: the feed's current cursor at connect time.
    Hello {
        /// Latest cursor of the tenant's feed.
        cursor: u64,
    },
    /// A change, backlog first, then live.
    Change {
        /// The change.
        change: Change,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_have_the_documented_shape() {
        let hello = serde_json::to_value(RealtimeFrame::Hello { cursor: 7 }).unwrap();
        assert_eq!(hello, json!({"type": "hello", "cursor": 7}));
        let frame = RealtimeFrame::Change {
            change: Change {
                cursor: 8,
                op: MutationKind::Delete,
                entity_type: "device".into(),
                id: "d1".into(),
                version: 3,
                data: Value::Null,
            },
        };
        let wire = serde_json::to_value(&frame).unwrap();
        assert_eq!(
            wire,
            json!({"type": "change", "change": {
                "cursor": 8, "op": "delete", "type": "device", "id": "d1", "version": 3, "data": null
            }})
        );
        assert_eq!(
            serde_json::from_value::<RealtimeFrame>(wire).unwrap(),
            frame
        );
    }

    /// Frames are parsed from text; with `arbitrary_precision` a number
    /// buffered by the internally tagged enum must still read as a `u64`,
    /// and change data must keep its numbers' text.
    #[test]
    fn frames_parse_from_text_with_exact_numbers() {
        let hello: RealtimeFrame = serde_json::from_str(r#"{"type":"hello","cursor":7}"#).unwrap();
        assert_eq!(hello, RealtimeFrame::Hello { cursor: 7 });
        let text = r#"{"type":"change","change":{"cursor":8,"op":"update","type":"device","id":"d1","version":18446744073709551615,"data":{"n":12345678901234567890123,"z":-0}}}"#;
        let frame: RealtimeFrame = serde_json::from_str(text).unwrap();
        let RealtimeFrame::Change { change } = &frame else {
            panic!("{frame:?}")
        };
        assert_eq!(change.version, u64::MAX);
        assert_eq!(
            change.data.to_string(),
            r#"{"n":12345678901234567890123,"z":-0}"#
        );
        assert_eq!(serde_json::to_string(&frame).unwrap(), text);
    }

    #[test]
    fn batch_op_omits_absent_fields() {
        let op = BatchOp {
            op: MutationKind::Delete,
            entity_type: "device".into(),
            id: "d1".into(),
            data: None,
            if_match: None,
            idempotency_key: "k".into(),
            depends_on: None,
            if_match_chained: false,
        };
        assert_eq!(
            serde_json::to_value(op).unwrap(),
            json!({"op": "delete", "type": "device", "id": "d1", "idempotency_key": "k"})
        );
    }

    #[test]
    fn batch_op_dependency_fields_round_trip() {
        let wire = json!({"op": "update", "type": "device", "id": "d1", "data": {"on": true},
            "idempotency_key": "k2", "depends_on": 0, "if_match_chained": true});
        let op: BatchOp = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(op.depends_on, Some(0));
        assert!(op.if_match_chained);
        assert_eq!(serde_json::to_value(op).unwrap(), wire);
    }
}
