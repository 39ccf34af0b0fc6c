//! `GET /v1/changes?since=&since_fingerprint=&limit=`: pages through the
//! tenant's change feed.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use guardian_protocol::{ChangeFingerprint, ChangesPage, Problem, SINCE_FINGERPRINT_PARAM};

use crate::auth::Tenant;
use crate::problem::ApiError;
use crate::state::AppState;

/// Default and largest page size.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// Parses an optional unsigned query parameter.
pub(crate) fn param(
    query: &Result<Query<HashMap<String, String>>, QueryRejection>,
    name: &str,
) -> Result<Option<u64>, ApiError> {
    let q = query
        .as_ref()
        .map_err(|e| ApiError::bad_request(format!("bad query string: {e}")))?;
    q.get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("{name} must be a non-negative integer, got {v:?}"))
            })
        })
        .transpose()
}

/// Parses `since_fingerprint`, the change the client holds at `since`:
/// without `since` it names nothing, so it is refused rather than ignored.
pub(crate) fn since_fingerprint(
    query: &Result<Query<HashMap<String, String>>, QueryRejection>,
    since: Option<u64>,
) -> Result<Option<ChangeFingerprint>, ApiError> {
    let q = query
        .as_ref()
        .map_err(|e| ApiError::bad_request(format!("bad query string: {e}")))?;
    let Some(raw) = q.get(SINCE_FINGERPRINT_PARAM) else {
        return Ok(None);
    };
    if since.is_none() {
        return Err(ApiError::bad_request(format!(
            "{SINCE_FINGERPRINT_PARAM} names the change at since, so it needs since"
        )));
    }
    ChangeFingerprint::parse(raw)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("{SINCE_FINGERPRINT_PARAM}: {e}")))
}

/// The permits a feed page reserves from the answer budget: its largest
/// size ([`crate::config::largest_page`]), within the budget.
pub(crate) fn page_permits(state: &AppState) -> u32 {
    let most = crate::config::largest_page(state.config.body_limit).min(state.answer_budget.most());
    u32::try_from(most).unwrap_or(u32::MAX)
}

/// Reads changes after a cursor.
#[utoipa::path(
    get,
    path = "/v1/changes",
    tag = "changes",
    params(
        ("since" = Option<u64>, Query, description = "Return changes after this cursor (default 0)", minimum = 0),
        ("since_fingerprint" = Option<String>, Query, description = "The fingerprint of the change the client holds at `since` (16 lower-case hex digits: the first 8 bytes of SHA-256 over the change's type, id and version, each text prefixed by its byte length as a big-endian u64, the version as a big-endian u64). If the retained feed's change at `since` is another one, or missing, the answer is 410 `cursor-expired`. Needs `since`; not compared when `since` is at the front of the retained feed", min_length = 16, max_length = 16, pattern = "^[0-9a-f]{16}$"),
        ("limit" = Option<u64>, Query, description = "Page size (default 100); above 1000 a page holds 1000. A page also ends with the change whose data takes it past 4 MiB", minimum = 1),
    ),
    responses(
        (status = 200, description = "A page of changes; pass `next` as `since` for the next page. `head` is the feed's latest cursor", body = ChangesPage),
        (status = 400, description = "Bad parameters", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`cursor-expired`: `since` is older than the retained feed (or ahead of it), or the change at `since` is not the one `since_fingerprint` names; resync, then follow the feed from the problem's `head` member (its latest cursor)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn changes(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let parsed = param(&query, "since").and_then(|since| {
        let holds = since_fingerprint(&query, since)?;
        Ok((since, holds, param(&query, "limit")?))
    });
    let (since, holds, limit) = match parsed {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let limit = limit.map_or(DEFAULT_LIMIT, |l| usize::try_from(l).unwrap_or(MAX_LIMIT));
    if limit == 0 {
        return ApiError::bad_request("limit must be at least 1").into_response();
    }
    // A page is built whole in memory (its rows, then its JSON) before a
    // byte of it is sent: its largest size is reserved first, or the read
    // is refused at once (waiting would hold a concurrency slot that
    // writes need).
    let Some(reserved) = state
        .answer_budget
        .try_take(Some(&tenant.0), page_permits(&state))
    else {
        return ApiError::busy("the server holds as many feed pages as it may; retry")
            .into_response();
    };
    match state
        .store
        .changes(tenant.0, since.unwrap_or(0), holds, limit.min(MAX_LIMIT))
        .await
    {
        Ok(Ok(page)) => super::middleware::hold_reserved(Json(page).into_response(), reserved),
        Ok(Err(refusal)) => ApiError::from(&refusal).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "feed read failed");
            ApiError::internal("the database failed").into_response()
        }
    }
}
