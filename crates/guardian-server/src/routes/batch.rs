//! `POST /v1/batch`: many mutations, each with its own idempotency key.
//!
//! Ops are applied in order in one transaction; each gets the result it would
//! have had as a single request (status, body, replayed). One op's refusal
//! does not stop the others. If the transaction itself fails, the whole
//! request is a 500 and nothing was applied.

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use guardian_protocol::{BatchRequest, BatchResponse, BatchResult, MutationKind, Problem};

use super::mutate::{execute, prepare, RequestCtx, Slot};
use crate::auth::Tenant;
use crate::problem::{ApiError, ApiJson};
use crate::state::AppState;
use crate::store::{OpResult, Precondition};

/// Applies a batch of mutations.
#[utoipa::path(
    post,
    path = "/v1/batch",
    tag = "batch",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "One result per op, in op order; each op's status is what it would have had alone", body = BatchResponse),
        (status = 400, description = "Malformed JSON or op shape", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too many ops or too many bytes", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn batch(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ctx: RequestCtx,
    ApiJson(body): ApiJson<BatchRequest>,
) -> Response {
    let max = state.config.max_batch_ops;
    if body.ops.len() > max {
        return ApiError::too_large(format!(
            "the batch has {} ops; at most {max} are accepted",
            body.ops.len()
        ))
        .into_response();
    }
    let slots = body
        .ops
        .into_iter()
        .map(|op| {
            let data = if op.op == MutationKind::Delete {
                None
            } else {
                op.data
            };
            match prepare(
                &op.idempotency_key,
                op.op,
                &op.entity_type,
                &op.id,
                data,
                op.if_match.map(Precondition::Version),
            ) {
                Ok(input) => Slot::Ready(input),
                Err(e) => Slot::Done(OpResult::problem(&e)),
            }
        })
        .collect();
    match execute(&state, &tenant.0, &ctx, slots).await {
        Ok(results) => Json(BatchResponse {
            results: results
                .into_iter()
                .map(|r| BatchResult {
                    status: r.status,
                    body: r.body,
                    replayed: r.replayed,
                })
                .collect(),
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}
