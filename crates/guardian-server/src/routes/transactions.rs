//! `POST /v1/transactions`: ops on one or several entities that take effect
//! together or not at all.
//!
//! The ops are checked as batch ops are (shape, key, type, id, data,
//! `depends_on` / `if_match_chained`), then applied in order in one
//! database transaction, stopping at the first refused op: then nothing is
//! applied or recorded, and the answer (still 200) names that op and its
//! result, every other op being 424 `transaction:aborted`. A malformed op
//! aborts the transaction before anything is looked up. When every op
//! succeeds (2xx, fresh or replayed) the transaction commits, each op's key
//! and the transaction's key are recorded, and a retry with the same
//! `transaction_key` and ops replays the whole response (`replayed: true`,
//! each result as first answered).

use axum::extract::{Extension, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use guardian_protocol::{
    problem_type, MutationKind, Problem, TransactionRequest, TransactionResponse,
};

use super::batch::dependency;
use super::mutate::{after_commit, before_commit, prepare, validate_key, Interrupted, RequestCtx};
use crate::auth::Tenant;
use crate::problem::{store_failure, ApiError, ApiJson};
use crate::state::AppState;
use crate::store::{
    transaction_response_json, Precondition, Refusal, TransactionInput, TransactionOutcome,
};

/// Applies an atomic transaction.
///
/// All ops take effect in one commit, or none does. At the first refused op
/// (404, 409 including `If-Match` conflicts, 410, 422, 428, or a 400 for
/// a malformed op) the transaction aborts: `committed: false`, `failed_op` is
/// that op's index and its result is its own; every other op's result is
/// 424 `urn:guardian:transaction:aborted`. Nothing of an aborted transaction
/// is applied or recorded: every key, the transaction's included, stays
/// new. A committed transaction is recorded under `transaction_key` with a
/// fingerprint over its ops' keys, kinds, types, ids and data (not their
/// preconditions): a retry with the same key and ops replays the whole
/// response with `replayed: true` (and the `Idempotent-Replayed` header);
/// with other ops it is a 422 `idempotency:mismatch` problem. While a
/// request holding the transaction's key or one of its ops' keys is in
/// flight, the answer is a 409 `idempotency:in-flight` problem with
/// `Retry-After`.
#[utoipa::path(
    post,
    path = "/v1/transactions",
    tag = "transactions",
    request_body = TransactionRequest,
    responses(
        (status = 200, description = "Committed (`committed: true`, one result per op) or aborted (`committed: false`, `failed_op` and its own result, every other op 424 `transaction:aborted`); `replayed: true` when the whole response was replayed", body = TransactionResponse),
        (status = 400, description = "Malformed JSON or shape, no ops, a malformed `transaction_key`, or a `transaction_key` that is also an op's key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`idempotency:in-flight`: a request with the transaction's key or one of its ops' keys is being processed; retry after `Retry-After` with the same key", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too many ops or too many bytes", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`idempotency:mismatch`: the `transaction_key` was committed before with other ops", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn transactions(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ctx: RequestCtx,
    ApiJson(body): ApiJson<TransactionRequest>,
) -> Response {
    let TransactionRequest {
        transaction_key: key,
        ops,
    } = body;
    let max = state.config.max_batch_ops;
    if ops.len() > max {
        return ApiError::too_large(format!(
            "the transaction has {} ops; at most {max} are accepted",
            ops.len()
        ))
        .into_response();
    }
    if ops.is_empty() {
        return ApiError::bad_request("a transaction needs at least one op").into_response();
    }
    if key.is_empty() {
        return ApiError::new(
            problem_type::IDEMPOTENCY_MISSING,
            400,
            "Idempotency key missing",
            "a transaction needs a transaction_key",
        )
        .into_response();
    }
    if let Err(e) = validate_key(&key) {
        return e.into_response();
    }
    if ops.iter().any(|op| op.idempotency_key == key) {
        return ApiError::bad_request(
            "the transaction_key must differ from every op's idempotency_key",
        )
        .into_response();
    }
    let n = ops.len();
    let mut ops = ops;
    let mut inputs = Vec::with_capacity(n);
    for i in 0..n {
        let input = dependency(&ops, i).and_then(|dep| {
            let op = &mut ops[i];
            let data = if op.op == MutationKind::Delete {
                None
            } else {
                op.data.take()
            };
            let mut input = prepare(
                &op.idempotency_key,
                op.op,
                &op.entity_type,
                &op.id,
                data,
                op.if_match.map(Precondition::Version),
            )?;
            // Every op goes to the store: its index there is its index here.
            input.dependency = dep;
            Ok(input)
        });
        match input {
            Ok(input) => inputs.push(input),
            Err(e) => return json_response(aborted(i, &e, n), false),
        }
    }
    drop(ops);
    let txn = TransactionInput::new(key, inputs);
    let keys = std::iter::once(txn.key.as_str()).chain(txn.ops.iter().map(|o| o.key.as_str()));
    let (reservation, busy) = state.inflight.reserve(&tenant.0, keys);
    if let Some(held) = busy.iter().position(|b| *b).and_then(|i| {
        std::iter::once(&txn.key)
            .chain(txn.ops.iter().map(|o| &o.key))
            .nth(i)
    }) {
        return ApiError::from(Refusal::InFlight { key: held.clone() })
            .with_header(header::RETRY_AFTER, "1")
            .into_response();
    }
    let drop_point = match before_commit(&state, &ctx).await {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    let n = txn.ops.len();
    let outcome = state
        .store
        .apply_transaction(tenant.0.clone(), txn)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "transaction failed");
            Interrupted::Store(store_failure(&e))
        });
    drop(reservation);
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let metrics = &state.metrics;
    let response = match outcome {
        TransactionOutcome::Committed { results, body } => {
            let replays = results.iter().filter(|a| a.replayed).count() as u64;
            metrics.replays(replays);
            metrics.applied(n as u64 - replays);
            json_response(body, false)
        }
        TransactionOutcome::Replayed { body } => {
            metrics.replays(n as u64);
            json_response(body, true)
        }
        TransactionOutcome::Aborted { failed_op, refusal } => {
            let e = ApiError::from(refusal);
            if e.status() == 409 {
                metrics.conflicts(1);
            }
            json_response(aborted(failed_op, &e, n), false)
        }
        TransactionOutcome::Mismatch(refusal) => ApiError::from(refusal).into_response(),
    };
    if let Err(e) = after_commit(&state, &ctx, drop_point) {
        return e.into_response();
    }
    response
}

/// The response text of a transaction of `n` ops aborted at op `failed`
/// with `error`: that result, and 424 `transaction:aborted` for the others.
fn aborted(failed: usize, error: &ApiError, n: usize) -> String {
    let others = ApiError::new(
        problem_type::TRANSACTION_ABORTED,
        424,
        "Transaction aborted",
        format!(
            "op {failed} of this transaction was refused, so nothing of the transaction was \
             applied and no key was recorded; this op may succeed once the transaction is fixed"
        ),
    )
    .body_json();
    let own = error.body_json();
    transaction_response_json(
        false,
        Some(failed),
        (0..n).map(|i| {
            if i == failed {
                (error.status(), own.as_str(), false)
            } else {
                (424, others.as_str(), false)
            }
        }),
    )
}

/// A 200 response with a transaction's JSON text.
fn json_response(body: String, replayed: bool) -> Response {
    let mut resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    if replayed {
        resp.headers_mut().insert(
            guardian_protocol::header::IDEMPOTENT_REPLAYED,
            HeaderValue::from_static("true"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aborted_response_parses_with_one_own_result() {
        let refused = ApiError::from(Refusal::NotFound {
            entity: "t/x".into(),
        });
        let r: TransactionResponse = serde_json::from_str(&aborted(1, &refused, 3)).unwrap();
        assert!(!r.committed && !r.replayed);
        assert_eq!(r.failed_op, Some(1));
        let statuses: Vec<u16> = r.results.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [424, 404, 424]);
        assert_eq!(
            r.results[0].body["type"],
            guardian_protocol::problem_type::TRANSACTION_ABORTED
        );
        assert_eq!(r.results[1].body["type"], problem_type::NOT_FOUND);
    }
}
