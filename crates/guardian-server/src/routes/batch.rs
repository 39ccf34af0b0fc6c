//! `POST /v1/batch`: many mutations, each with its own idempotency key.
//!
//! Ops are applied in order in one transaction; each gets the result it would
//! have had as a single request (status, body, replayed). One op's refusal
//! does not stop the others, except ops that depend on it: an op with
//! `depends_on` is applied only if that earlier op of the same entity
//! succeeded (2xx, fresh or replayed), else it gets 424
//! `batch:dependency-failed` and its key is not recorded; with
//! `if_match_chained` its precondition is the version that op left the
//! entity at. If the transaction itself fails, the whole request is a 500
//! and nothing was applied.

use axum::extract::{Extension, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use guardian_protocol::{BatchOp, BatchRequest, BatchResponse, MutationKind, Problem};

use super::mutate::{execute, prepare, status_and_body, OpResponse, RequestCtx, Slot};
use crate::auth::Tenant;
use crate::problem::{ApiError, ApiJson};
use crate::state::AppState;
use crate::store::{write_results, Dependency, Precondition};

/// Applies a batch of mutations.
///
/// Ops apply in order in one transaction; each result is what the op would
/// have had as a single request. An op may name an earlier op of the same
/// entity in `depends_on`: it is applied only if that op succeeded (any 2xx,
/// fresh or replayed); otherwise its result is 424
/// `urn:guardian:batch:dependency-failed`, nothing is applied or recorded
/// for it, and its key stays new (send it again after its predecessor). With
/// `if_match_chained` its precondition is the version its `depends_on` op
/// left the entity at (none after a delete). A `depends_on` that is not an
/// earlier op of the same entity, or `if_match_chained` without `depends_on`
/// or with `if_match`, is a 400 result for that op. The idempotency
/// fingerprint ignores preconditions, so a key replays whether it comes back
/// chained, with `if_match`, or as a single request with `If-Match`.
#[utoipa::path(
    post,
    path = "/v1/batch",
    tag = "batch",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "One result per op, in op order; each op's status is what it would have had alone (400 for a malformed op or dependency; 424 `batch:dependency-failed` when its `depends_on` op did not succeed)", body = BatchResponse),
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
    let mut ops = body.ops;
    let mut slots = Vec::with_capacity(ops.len());
    for i in 0..ops.len() {
        let slot = match dependency(&ops, i) {
            Err(e) => Slot::Done(Err(e)),
            Ok(dependency) => {
                let op = &mut ops[i];
                let data = if op.op == MutationKind::Delete {
                    None
                } else {
                    op.data.take()
                };
                match prepare(
                    &op.idempotency_key,
                    op.op,
                    &op.entity_type,
                    &op.id,
                    data,
                    op.if_match.map(Precondition::Version),
                ) {
                    Ok(mut input) => {
                        input.dependency = dependency;
                        Slot::Ready(input)
                    }
                    Err(e) => Slot::Done(Err(e)),
                }
            }
        };
        slots.push(slot);
    }
    // What remains of the ops (keys, types, ids) is copied into the slots.
    drop(ops);
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

/// Checks op `i`'s `depends_on` / `if_match_chained` against the batch (or
/// transaction): the
/// op it names must come earlier and be on the same entity; chaining needs a
/// dependency and excludes an explicit `if_match`.
pub(crate) fn dependency(ops: &[BatchOp], i: usize) -> Result<Option<Dependency>, ApiError> {
    let op = &ops[i];
    let Some(on) = op.depends_on else {
        if op.if_match_chained {
            return Err(ApiError::bad_request(
                "if_match_chained needs depends_on (the op whose version to chain on)",
            ));
        }
        return Ok(None);
    };
    if op.if_match_chained && op.if_match.is_some() {
        return Err(ApiError::bad_request(
            "if_match_chained and if_match exclude each other",
        ));
    }
    let earlier = usize::try_from(on)
        .ok()
        .filter(|&d| d < i)
        .and_then(|d| ops.get(d).map(|e| (d, e)));
    let Some((d, earlier)) = earlier else {
        return Err(ApiError::bad_request(format!(
            "depends_on must name an earlier op of this batch; op {i} names {on}"
        )));
    };
    if earlier.entity_type != op.entity_type || earlier.id != op.id {
        return Err(ApiError::bad_request(format!(
            "depends_on must name an op on the same entity; op {i} is on {}/{}, op {on} on {}/{}",
            op.entity_type, op.id, earlier.entity_type, earlier.id
        )));
    }
    Ok(Some(Dependency {
        on: d,
        batch_index: on,
        chained: op.if_match_chained,
    }))
}

/// The [`BatchResponse`] document as `Json(BatchResponse)` would print it
/// (no whitespace, fields in declaration order), with each result's body
/// spliced in as the JSON text it already is instead of being re-serialized.
fn response_json(results: &[OpResponse]) -> String {
    let parts: Vec<_> = results.iter().map(status_and_body).collect();
    let mut out = String::with_capacity(
        16 + parts
            .iter()
            .map(|(_, body, _)| body.len() + 40)
            .sum::<usize>(),
    );
    out.push_str("{\"results\":");
    write_results(
        &mut out,
        parts.iter().map(|(s, body, r)| (*s, body.as_ref(), *r)),
    );
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Applied, Refusal};
    use guardian_protocol::BatchResult;
    use serde_json::json;

    #[test]
    fn response_json_is_what_serde_prints() {
        let applied = |status: u16, body: &serde_json::Value, replayed: bool| {
            Ok(Applied {
                status,
                body: body.to_string(),
                replayed,
                version: None,
            })
        };
        let entity = json!({"data": {"a": [1, 2.5, "x\"y"]}, "deleted": false, "id": "d1", "type": "t", "updated_at": "2024-01-01T00:00:00.000Z", "version": 3});
        let refused = ApiError::from(Refusal::Exists {
            entity: "t/d1".into(),
            current: None,
        });
        let results: Vec<OpResponse> = vec![
            applied(201, &entity, false),
            applied(204, &json!(null), true),
            Err(refused.clone()),
        ];
        let want = serde_json::to_string(&BatchResponse {
            results: vec![
                BatchResult {
                    status: 201,
                    body: entity,
                    replayed: false,
                },
                BatchResult {
                    status: 204,
                    body: json!(null),
                    replayed: true,
                },
                BatchResult {
                    status: 409,
                    body: serde_json::to_value(&refused.problem).unwrap(),
                    replayed: false,
                },
            ],
        })
        .unwrap();
        assert_eq!(response_json(&results), want);
        assert_eq!(response_json(&[]), r#"{"results":[]}"#);
    }
}
