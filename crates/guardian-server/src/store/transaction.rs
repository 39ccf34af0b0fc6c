//! Atomic transactions (`POST /v1/transactions`): their input, outcome,
//! fingerprint and response text. The rules of applying one are in
//! [`super::apply::apply_transaction`].
//!
//! A transaction's own key is kept in the idempotency store beside its ops'
//! keys, with a fingerprint over every op's key and single-request
//! fingerprint (kind, type, id, data; preconditions and dependencies are
//! ignored, as for a batch op) and the whole response as its body.

use sha2::{Digest, Sha256};

use super::idempotency::json_string;
use super::{Applied, MutationInput, Refusal, StoreError};

/// A validated transaction, ready for the store.
#[derive(Debug, Clone)]
pub(crate) struct TransactionInput {
    pub(crate) key: String,
    pub(crate) fingerprint: [u8; 32],
    /// Every op, in order; a dependency's `on` is its index here.
    pub(crate) ops: Vec<MutationInput>,
}

impl TransactionInput {
    /// A transaction of `ops` under `key`, fingerprinted.
    pub(crate) fn new(key: String, ops: Vec<MutationInput>) -> Self {
        let fingerprint = fingerprint(&ops);
        Self {
            key,
            fingerprint,
            ops,
        }
    }
}

/// What the store did with a transaction.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TransactionOutcome {
    /// Every op took effect in one commit; `body` is the response text
    /// (also kept under the transaction's key).
    Committed { results: Vec<Applied>, body: String },
    /// The key was committed before with the same ops: the first response,
    /// with `replayed: true`.
    Replayed { body: String },
    /// Op `failed_op` was refused; nothing of the transaction was applied
    /// or recorded.
    Aborted { failed_op: usize, refusal: Refusal },
    /// The key was committed before with other ops.
    Mismatch(Refusal),
}

/// The fingerprint of a transaction: `sha256("POST\n/v1/transactions\n"`
/// then, per op, its key as a JSON string, a newline and its single-request
/// fingerprint (32 bytes)`)`. Op fingerprints have a fixed length and keys
/// are quoted, so two different op lists cannot hash the same text.
pub(crate) fn fingerprint(ops: &[MutationInput]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"POST\n/v1/transactions\n");
    for op in ops {
        h.update(json_string(&op.key).as_bytes());
        h.update(b"\n");
        h.update(op.fingerprint);
    }
    h.finalize().into()
}

/// The tail of a stored response, replaced to mark a replay.
const FRESH_TAIL: &str = ",\"replayed\":false}";
const REPLAYED_TAIL: &str = ",\"replayed\":true}";

/// The stored response of a committed transaction as its replay.
pub(crate) fn replay(stored: &str) -> Result<String, StoreError> {
    let Some(head) = stored.strip_suffix(FRESH_TAIL) else {
        return Err(StoreError::Corrupt(
            "a stored transaction response does not end as written".into(),
        ));
    };
    Ok(format!("{head}{REPLAYED_TAIL}"))
}

/// One op's result as a response carries it: status, body (JSON text) and
/// whether the op was replayed.
pub(crate) type ResultParts<'a> = (u16, &'a str, bool);

/// Appends `[{"status":…,"body":…,"replayed":…},…]` to `out`, each body
/// spliced in as the JSON text it is.
pub(crate) fn write_results<'a>(out: &mut String, results: impl Iterator<Item = ResultParts<'a>>) {
    out.push('[');
    for (i, (status, body, replayed)) in results.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"status\":");
        out.push_str(&status.to_string());
        out.push_str(",\"body\":");
        out.push_str(body);
        out.push_str(if replayed {
            ",\"replayed\":true}"
        } else {
            ",\"replayed\":false}"
        });
    }
    out.push(']');
}

/// The `TransactionResponse` document as serde prints it (no whitespace,
/// fields in declaration order, `failed_op` only when present), fresh
/// (`replayed: false`).
pub(crate) fn response_json<'a>(
    committed: bool,
    failed_op: Option<usize>,
    results: impl ExactSizeIterator<Item = ResultParts<'a>> + Clone,
) -> String {
    let size: usize = results.clone().map(|(_, b, _)| b.len() + 40).sum();
    let mut out = String::with_capacity(size + 64);
    out.push_str(if committed {
        "{\"committed\":true"
    } else {
        "{\"committed\":false"
    });
    if let Some(i) = failed_op {
        out.push_str(",\"failed_op\":");
        out.push_str(&i.to_string());
    }
    out.push_str(",\"results\":");
    write_results(&mut out, results);
    out.push_str(FRESH_TAIL);
    out
}

/// The response of a committed transaction.
pub(crate) fn committed_json(results: &[Applied]) -> String {
    response_json(
        true,
        None,
        results
            .iter()
            .map(|a| (a.status, a.body.as_str(), a.replayed)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{canonical, fingerprint as op_fingerprint};
    use guardian_protocol::{BatchResult, MutationKind, TransactionResponse};
    use serde_json::json;

    fn op(key: &str, id: &str, n: i64) -> MutationInput {
        let data = json!({"n": n});
        let data_json = canonical(&data);
        MutationInput {
            key: key.into(),
            fingerprint: op_fingerprint(MutationKind::Create, "t", id, &data_json),
            kind: MutationKind::Create,
            entity_type: "t".into(),
            id: id.into(),
            data,
            data_json,
            if_match: None,
            dependency: None,
        }
    }

    #[test]
    fn fingerprint_covers_keys_order_and_ops_but_not_preconditions() {
        let base = fingerprint(&[op("a", "x", 1), op("b", "y", 2)]);
        assert_ne!(base, fingerprint(&[op("b", "y", 2), op("a", "x", 1)]));
        assert_ne!(base, fingerprint(&[op("a", "x", 1), op("c", "y", 2)]));
        assert_ne!(base, fingerprint(&[op("a", "x", 1), op("b", "y", 3)]));
        assert_ne!(base, fingerprint(&[op("a", "x", 1)]));
        let mut conditional = op("b", "y", 2);
        conditional.if_match = Some(crate::store::Precondition::Version(4));
        assert_eq!(base, fingerprint(&[op("a", "x", 1), conditional]));
    }

    #[test]
    fn response_json_is_what_serde_prints_and_replays_flip_one_flag() {
        let entity = json!({"data": {"a": [1, "x\"y"]}, "deleted": false, "id": "d1", "type": "t", "updated_at": "2024-01-01T00:00:00.000Z", "version": 3});
        let results = [
            Applied {
                status: 201,
                body: entity.to_string(),
                replayed: false,
                version: Some(3),
            },
            Applied {
                status: 204,
                body: "null".into(),
                replayed: true,
                version: None,
            },
        ];
        let text = committed_json(&results);
        let mut want = TransactionResponse {
            committed: true,
            failed_op: None,
            results: vec![
                BatchResult {
                    status: 201,
                    body: entity.clone(),
                    replayed: false,
                },
                BatchResult {
                    status: 204,
                    body: json!(null),
                    replayed: true,
                },
            ],
            replayed: false,
        };
        assert_eq!(text, serde_json::to_string(&want).unwrap());
        let replayed = replay(&text).unwrap();
        want.replayed = true;
        assert_eq!(replayed, serde_json::to_string(&want).unwrap());

        let aborted = response_json(false, Some(1), [(409, "{\"a\":1}", false)].into_iter());
        let want = TransactionResponse {
            committed: false,
            failed_op: Some(1),
            results: vec![BatchResult {
                status: 409,
                body: json!({"a": 1}),
                replayed: false,
            }],
            replayed: false,
        };
        assert_eq!(aborted, serde_json::to_string(&want).unwrap());
    }
}
