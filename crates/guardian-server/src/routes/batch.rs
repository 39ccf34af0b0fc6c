//! `POST /v1/batch`: many mutations, each with its own idempotency key.
//!
//! Ops are applied in order in one transaction; each gets the result it would
//! have had as a single request (status, body, replayed). One op's refusal
//! does not stop the others. If the transaction itself fails, the whole
//! request is a 500 and nothing was applied.

use axum::extract::{Extension, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use guardian_protocol::{BatchRequest, BatchResponse, MutationKind, Problem};

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
        Ok(results) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            response_json(&results),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// The [`BatchResponse`] document as `Json(BatchResponse)` would print it
/// (no whitespace, fields in declaration order), with each result's body
/// spliced in as the JSON text it already is instead of being re-serialized.
fn response_json(results: &[OpResult]) -> String {
    let mut out =
        String::with_capacity(16 + results.iter().map(|r| r.body.len() + 40).sum::<usize>());
    out.push_str("{\"results\":[");
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"status\":");
        out.push_str(&r.status.to_string());
        out.push_str(",\"body\":");
        out.push_str(&r.body);
        out.push_str(if r.replayed {
            ",\"replayed\":true}"
        } else {
            ",\"replayed\":false}"
        });
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use guardian_protocol::BatchResult;
    use serde_json::json;

    #[test]
    fn response_json_is_what_serde_prints() {
        let bodies = [
            json!({"data": {"a": [1, 2.5, "x\"y"]}, "deleted": false, "id": "d1", "type": "t", "updated_at": "2024-01-01T00:00:00.000Z", "version": 3}),
            json!(null),
            json!({"status": 409, "title": "Entity exists", "type": "urn:guardian:conflict:exists"}),
        ];
        let results: Vec<OpResult> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| OpResult {
                status: [201, 204, 409][i],
                body: b.to_string(),
                replayed: i == 1,
                version: None,
                in_flight: false,
            })
            .collect();
        let want = serde_json::to_string(&BatchResponse {
            results: results
                .iter()
                .zip(&bodies)
                .map(|(r, b)| BatchResult {
                    status: r.status,
                    body: b.clone(),
                    replayed: r.replayed,
                })
                .collect(),
        })
        .unwrap();
        assert_eq!(response_json(&results), want);
        assert_eq!(response_json(&[]), r#"{"results":[]}"#);
    }
}
