//! The mutation pipeline shared by single requests and batches.
//!
//! reserve keys (in-flight) → added latency → maybe drop before commit →
//! one transaction (per op: forced conflict through the store's hooks,
//! dependency, replay / refuse / apply + store) → maybe drop after commit →
//! results, with the store's refusals as problem documents.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use guardian_protocol::{
    problem_type, validate_entity_id, validate_entity_type, MutationKind, PROBLEM_CONTENT_TYPE,
};
use serde_json::Value;

use crate::conn::ConnInfo;
use crate::faults::DropPoint;
use crate::limits::{Phase, RequestPhase};
use crate::problem::{store_failure, ApiError};
use crate::state::AppState;
use crate::store::{
    canonical, fingerprint, fingerprint_data, Applied, MutationInput, Precondition, Refusal,
};

/// The answer to one mutation as a single request would get it: the
/// response it took effect with, or a problem.
pub(crate) type OpResponse = Result<Applied, ApiError>;

/// One op of a request: ready for the store, or already answered.
#[derive(Debug)]
pub(crate) enum Slot {
    Ready(MutationInput),
    Done(OpResponse),
    /// Handed to the store; its result comes back in order.
    Sent,
}

/// Why a mutation request produced no results.
#[derive(Debug)]
pub(crate) enum Interrupted {
    /// Fault injection cut the connection; the response is never delivered.
    Dropped,
    /// The store failed (see [`store_failure`]).
    Store(ApiError),
}

impl IntoResponse for Interrupted {
    fn into_response(self) -> Response {
        match self {
            // Nobody will read this: the connection is already cut.
            Self::Dropped => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            Self::Store(e) => e.into_response(),
        }
    }
}

/// Per-request handles the pipeline needs: the connection (to cut it) and
/// the request's phase (to stop the timeout from cutting a started commit).
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestCtx {
    pub(crate) conn: Option<ConnInfo>,
    pub(crate) phase: Option<RequestPhase>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestCtx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self {
            conn: parts
                .extensions
                .get::<ConnectInfo<ConnInfo>>()
                .map(|c| c.0.clone()),
            phase: parts.extensions.get::<RequestPhase>().cloned(),
        })
    }
}

/// Builds a validated store input (or a 400 result) from request parts.
pub(crate) fn prepare(
    key: &str,
    kind: MutationKind,
    entity_type: &str,
    id: &str,
    data: Option<Value>,
    if_match: Option<Precondition>,
) -> Result<MutationInput, ApiError> {
    validate_key(key)?;
    validate_entity_type(entity_type).map_err(|e| ApiError::bad_request(e.to_string()))?;
    validate_entity_id(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let data = match kind {
        MutationKind::Delete => Value::Null,
        MutationKind::Create | MutationKind::Update => match data {
            Some(d @ Value::Object(_)) if guardian_protocol::within_data_depth(&d) => d,
            Some(Value::Object(_)) => {
                return Err(ApiError::bad_request(format!(
                    "data nests deeper than {} levels",
                    guardian_protocol::MAX_DATA_DEPTH
                )))
            }
            Some(_) => return Err(ApiError::bad_request("data must be a JSON object")),
            None => {
                return Err(ApiError::bad_request(format!(
                    "{} needs data",
                    kind.as_str()
                )))
            }
        },
    };
    let data_json = canonical(&data);
    Ok(MutationInput {
        key: key.to_owned(),
        fingerprint: fingerprint(kind, entity_type, id, &fingerprint_data(&data, &data_json)),
        kind,
        entity_type: entity_type.to_owned(),
        id: id.to_owned(),
        data,
        data_json,
        if_match,
        dependency: None,
    })
}

pub(crate) fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(missing_key());
    }
    if key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(
            "an idempotency key is 1 to 255 visible ASCII characters",
        ));
    }
    Ok(())
}

pub(crate) fn missing_key() -> ApiError {
    ApiError::new(
        problem_type::IDEMPOTENCY_MISSING,
        400,
        "Idempotency key missing",
        "every mutation needs an Idempotency-Key header (batch: an idempotency_key per op)",
    )
}

/// The one value of header `name`, if given. Given twice, it is refused:
/// which line counts would be up to the proxies on the way (RFC 9110 §5.3
/// makes two lines one comma-joined value, which these headers do not take).
fn single_header<'h>(
    headers: &'h HeaderMap,
    name: &str,
) -> Result<Option<&'h axum::http::HeaderValue>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::bad_request(format!(
            "the {name} header is given more than once"
        )));
    }
    Ok(first)
}

/// The `Idempotency-Key` header, or a 400 problem.
pub(crate) fn key_header(headers: &HeaderMap) -> Result<String, ApiError> {
    match single_header(headers, guardian_protocol::header::IDEMPOTENCY_KEY)? {
        None => Err(missing_key()),
        Some(v) => {
            let key = v
                .to_str()
                .map_err(|_| ApiError::bad_request("the Idempotency-Key header is not ASCII"))?
                .trim()
                .to_owned();
            validate_key(&key)?;
            Ok(key)
        }
    }
}

/// Parses `If-Match`: `"3"`, `3` or `*`.
pub(crate) fn if_match_header(headers: &HeaderMap) -> Result<Option<Precondition>, ApiError> {
    let Some(v) = single_header(headers, header::IF_MATCH.as_str())? else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("If-Match must be a quoted version such as \"3\", or *");
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s == "*" {
        return Ok(Some(Precondition::Any));
    }
    let inner = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(s);
    // Digits only: `parse` would also take a sign.
    if inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    inner
        .parse::<u64>()
        .map(|n| Some(Precondition::Version(n)))
        .map_err(|_| bad())
}

/// Runs the pipeline for `slots` on behalf of `tenant`.
pub(crate) async fn execute(
    state: &AppState,
    tenant: &Arc<str>,
    ctx: &RequestCtx,
    mut slots: Vec<Slot>,
) -> Result<Vec<OpResponse>, Interrupted> {
    let keys: Vec<&str> = slots
        .iter()
        .filter_map(|s| match s {
            Slot::Ready(i) => Some(i.key.as_str()),
            Slot::Done(_) | Slot::Sent => None,
        })
        .collect();
    let (reservation, busy) = state.inflight.reserve(tenant, keys);
    let mut busy = busy.into_iter();
    // Entities with an op held back as in flight: later ops of the same
    // entity in this request are held back too, so per-entity order holds.
    let mut held: Vec<(String, String)> = Vec::new();
    for i in 0..slots.len() {
        let (earlier, rest) = slots.split_at_mut(i);
        if let Some(Slot::Ready(input)) = rest.first_mut() {
            let own_busy = busy.next() == Some(true);
            // A dependency already answered here (refused before the store,
            // or held back as in flight) is resolved now; one on an op that
            // goes to the store is resolved there, from that op's result.
            if let Some(dep) = input.dependency {
                if let Some(Slot::Done(r)) = earlier.get(dep.on) {
                    match dep.resolve(r.as_ref().ok(), input.if_match) {
                        Ok(precondition) => {
                            input.if_match = precondition;
                            input.dependency = None;
                        }
                        Err(failed) => {
                            slots[i] = Slot::Done(Err(failed.into()));
                            continue;
                        }
                    }
                }
            }
            let refusal = if own_busy {
                held.push((input.entity_type.clone(), input.id.clone()));
                Refusal::InFlight {
                    key: input.key.clone(),
                }
            } else if held
                .iter()
                .any(|(t, id)| *t == input.entity_type && *id == input.id)
            {
                Refusal::EarlierInFlight {
                    entity: format!("{}/{}", input.entity_type, input.id),
                }
            } else {
                continue;
            };
            slots[i] = Slot::Done(Err(refusal.into()));
        }
    }
    if !slots.iter().any(|s| matches!(s, Slot::Ready(_))) {
        // Nothing to apply (all refused or in flight): answer at once.
        drop(reservation);
        return Ok(slots
            .into_iter()
            .filter_map(|s| match s {
                Slot::Done(r) => Some(r),
                Slot::Ready(_) | Slot::Sent => None,
            })
            .collect());
    }
    let drop_point = before_commit(state, ctx).await?;
    let mut inputs = Vec::with_capacity(slots.len());
    // Batch index → index in `inputs`, for remapping dependencies (only
    // built when some op has one).
    let remap = slots
        .iter()
        .any(|s| matches!(s, Slot::Ready(i) if i.dependency.is_some()));
    let mut positions: Vec<usize> = Vec::with_capacity(if remap { slots.len() } else { 0 });
    for slot in &mut slots {
        if remap {
            positions.push(inputs.len());
        }
        if let Slot::Ready(_) = slot {
            let Slot::Ready(mut input) = std::mem::replace(slot, Slot::Sent) else {
                continue;
            };
            if let Some(dep) = &mut input.dependency {
                // Still a dependency: the earlier op was Ready, so it is in
                // `inputs` already (it came first).
                dep.on = positions.get(dep.on).copied().unwrap_or(usize::MAX);
            }
            inputs.push(input);
        }
    }
    let mut applied = if inputs.is_empty() {
        Vec::new()
    } else {
        state
            .store
            .apply(Arc::clone(tenant), inputs)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "mutation failed");
                Interrupted::Store(store_failure(&e))
            })?
    }
    .into_iter();
    drop(reservation);
    let results: Vec<OpResponse> = slots
        .into_iter()
        .map(|slot| match slot {
            Slot::Done(r) => r,
            Slot::Ready(_) | Slot::Sent => match applied.next() {
                Some(outcome) => outcome.map_err(ApiError::from),
                None => Err(ApiError::internal("missing result")),
            },
        })
        .collect();
    let replays = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|a| a.replayed))
        .count();
    let conflicts = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|e| e.status() == 409))
        .count();
    let fresh = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|a| !a.replayed))
        .count();
    state.metrics.replays(replays as u64);
    state.metrics.conflicts(conflicts as u64);
    state.metrics.applied(fresh as u64);
    after_commit(state, ctx, drop_point)?;
    Ok(results)
}

/// The faults of a mutation request before its transaction: the added
/// latency (the keys are reserved by now), then maybe a connection cut
/// before the commit. Returns where the connection is to be cut, if
/// anywhere.
pub(crate) async fn before_commit(
    state: &AppState,
    ctx: &RequestCtx,
) -> Result<DropPoint, Interrupted> {
    let latency = state.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let drop_point = state.faults.drop_point();
    if drop_point == DropPoint::BeforeCommit {
        if let Some(conn) = &ctx.conn {
            tracing::debug!("fault: dropping the connection before commit");
            state.metrics.dropped_connection();
            conn.kill();
            return Err(Interrupted::Dropped);
        }
    }
    if let Some(phase) = &ctx.phase {
        phase.reach(Phase::Committing);
    }
    Ok(drop_point)
}

/// The fault of a mutation request after its commit: maybe a connection
/// cut, so the client never hears of what was applied.
pub(crate) fn after_commit(
    state: &AppState,
    ctx: &RequestCtx,
    drop_point: DropPoint,
) -> Result<(), Interrupted> {
    if drop_point == DropPoint::AfterCommit {
        if let Some(conn) = &ctx.conn {
            tracing::debug!("fault: dropping the connection after commit");
            state.metrics.dropped_connection();
            conn.kill();
            return Err(Interrupted::Dropped);
        }
    }
    Ok(())
}

/// The status, body (JSON text) and replay flag of a mutation's answer, as
/// a single response or a batch result carries them. A problem is printed
/// with its keys sorted, as the store prints what it keeps.
pub(crate) fn status_and_body(r: &OpResponse) -> (u16, std::borrow::Cow<'_, str>, bool) {
    match r {
        Ok(a) => (a.status, std::borrow::Cow::Borrowed(&a.body), a.replayed),
        Err(e) => (e.status(), std::borrow::Cow::Owned(e.body_json()), false),
    }
}

/// The HTTP response of a single mutation (or a GET of an entity).
pub(crate) fn op_response(r: OpResponse) -> Response {
    let (status, body, replayed, version, problem) = match r {
        Ok(a) => (a.status, a.body, a.replayed, a.version, None),
        Err(e) => (
            e.status(),
            e.body_json(),
            false,
            None,
            Some(e.problem.problem_type),
        ),
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = if status == StatusCode::NO_CONTENT {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(body))
    };
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    if let Some(problem_type) = problem {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        if problem_type == problem_type::IDEMPOTENCY_IN_FLIGHT {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
    } else if status != StatusCode::NO_CONTENT {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(v) = version {
            if let Ok(etag) = HeaderValue::from_str(&format!("\"{v}\"")) {
                headers.insert(header::ETAG, etag);
            }
        }
    }
    if replayed {
        headers.insert(
            guardian_protocol::header::IDEMPOTENT_REPLAYED,
            HeaderValue::from_static("true"),
        );
    }
    resp
}
