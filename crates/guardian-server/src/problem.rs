//! RFC 9457 problem responses and the JSON body extractor.
//!
//! Every error the server answers is an [`ApiError`]: a [`Problem`] plus
//! optional headers, rendered as `application/problem+json`. The domain's
//! refusals ([`Refusal`], [`FeedRefusal`]) become problems here and only
//! here. The [`ApiJson`] extractor replaces axum's `Json` so that oversized
//! and malformed bodies get problem documents too, not plain text.

use std::sync::Arc;

use crate::budget::{Budget, Hold};
use axum::body::Body;
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use guardian_protocol::{problem_type, Entity, Problem, PROBLEM_CONTENT_TYPE};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::store::{FeedRefusal, Refusal, StoreError};

/// An error response: a problem document and extra headers.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    /// Boxed: errors travel in `Result`s and should stay small.
    pub(crate) problem: Box<Problem>,
    pub(crate) headers: Vec<(HeaderName, String)>,
}

impl ApiError {
    pub(crate) fn new(
        problem_type: &str,
        status: u16,
        title: &str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            problem: Box::new(Problem::new(problem_type, title, status).with_detail(detail)),
            headers: Vec::new(),
        }
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(problem_type::BAD_REQUEST, 400, "Bad request", detail)
    }

    pub(crate) fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(problem_type::UNAUTHORIZED, 401, "Unauthorized", detail)
            .with_header(header::WWW_AUTHENTICATE, "Bearer")
    }

    pub(crate) fn not_found(detail: impl Into<String>) -> Self {
        Self::new(problem_type::NOT_FOUND, 404, "Not found", detail)
    }

    pub(crate) fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            problem_type::PAYLOAD_TOO_LARGE,
            413,
            "Payload too large",
            detail,
        )
    }

    pub(crate) fn internal(detail: impl Into<String>) -> Self {
        Self::new(problem_type::INTERNAL, 500, "Internal server error", detail)
    }

    /// 503 `unavailable` with `Retry-After: 1`: a budget is full for now.
    pub(crate) fn busy(detail: impl Into<String>) -> Self {
        Self::new(
            problem_type::UNAVAILABLE,
            503,
            "Service unavailable",
            detail,
        )
        .with_header(header::RETRY_AFTER, "1")
    }

    /// 410 `cursor-expired`, carrying the feed's latest cursor (`head`)
    /// where the client rejoins after refetching its state.
    pub(crate) fn cursor_expired(detail: impl Into<String>, head: u64) -> Self {
        let mut e = Self::new(problem_type::CURSOR_EXPIRED, 410, "Cursor expired", detail);
        e.problem
            .extensions
            .insert(problem_type::FEED_HEAD.to_owned(), head.into());
        e
    }

    pub(crate) fn with_current(mut self, current: Entity) -> Self {
        self.problem.current = Some(current);
        self
    }

    pub(crate) fn with_header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn status(&self) -> u16 {
        self.problem.status
    }

    /// The problem document as JSON text with object keys sorted (as
    /// `serde_json::Value` prints them), the form mutation results carry.
    pub(crate) fn body_json(&self) -> String {
        serde_json::to_value(&self.problem)
            .unwrap_or(Value::Null)
            .to_string()
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let detail = refusal.to_string();
        let (problem_type, status, title, current) = match refusal {
            Refusal::PreconditionRequired => (
                problem_type::PRECONDITION_REQUIRED,
                428,
                "Precondition required",
                None,
            ),
            Refusal::Exists { current, .. } => {
                (problem_type::CONFLICT_EXISTS, 409, "Entity exists", current)
            }
            Refusal::NotFound { .. } => (problem_type::NOT_FOUND, 404, "Not found", None),
            Refusal::Gone { current, .. } => (problem_type::GONE, 410, "Gone", current),
            Refusal::VersionConflict { current, .. } => (
                problem_type::CONFLICT_VERSION,
                409,
                "Version conflict",
                current,
            ),
            Refusal::KeyReused { .. } => (
                problem_type::IDEMPOTENCY_MISMATCH,
                422,
                "Idempotency key reused",
                None,
            ),
            Refusal::DependencyFailed { .. } => (
                problem_type::DEPENDENCY_FAILED,
                424,
                "Dependency failed",
                None,
            ),
            Refusal::InFlight { .. } | Refusal::EarlierInFlight { .. } => (
                problem_type::IDEMPOTENCY_IN_FLIGHT,
                409,
                "Request in flight",
                None,
            ),
        };
        let e = Self::new(problem_type, status, title, detail);
        match current {
            Some(c) => e.with_current(*c),
            None => e,
        }
    }
}

/// The answer to a mutation the store failed. Only a commit whose outcome
/// is unknown may have been applied; every other failure rolled back.
pub(crate) fn store_failure(e: &StoreError) -> ApiError {
    match e {
        StoreError::OutcomeUnknown(_) => outcome_unknown(
            problem_type::UNAVAILABLE,
            "the database connection was lost during the commit",
        ),
        _ => ApiError::internal("the database failed; nothing was applied"),
    }
}

/// 503 of problem type `kind` for a mutation that may or may not have
/// been applied (`what` happened): a retry with the same key replays it or applies it once.
pub(crate) fn outcome_unknown(kind: &str, what: &str) -> ApiError {
    ApiError::new(
        kind,
        503,
        "Outcome unknown",
        format!("{what}; whether it was applied is unknown: retry with the same Idempotency-Key"),
    )
    .with_header(header::RETRY_AFTER, "1")
}

impl From<&FeedRefusal> for ApiError {
    fn from(refusal: &FeedRefusal) -> Self {
        match *refusal {
            FeedRefusal::Expired {
                since,
                purged_through,
                last,
            } => Self::cursor_expired(
                format!(
                    "cursor {since} is older than the retained feed (changes through \
                     {purged_through} were purged); resync from scratch"
                ),
                last,
            ),
            FeedRefusal::Ahead { since, last } => Self::cursor_expired(
                format!(
                    "cursor {since} is ahead of this server's feed (latest {last}); the server \
                     lost its data or this is another server: resync from scratch"
                ),
                last,
            ),
            FeedRefusal::Diverged { since, last } => Self::cursor_expired(
                format!(
                    "this server's change at cursor {since} is not the one the client holds \
                     (since_fingerprint): the feed was rewritten, as by a restore from a backup \
                     that then took writes; resync from scratch"
                ),
                last,
            ),
        }
    }
}

/// Renders a problem (possibly replayed from the store) as a response.
pub(crate) fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
    );
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = problem_response(&self.problem);
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().append(name, v);
            }
        }
        resp
    }
}

/// A JSON body, refused with a problem document when too large or malformed.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

/// The largest request body accepted, in bytes (taken from the state).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimit(pub(crate) usize);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T>
where
    BodyLimit: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let BodyLimit(limit) = BodyLimit::from_ref(state);
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| {
                let ct = ct.to_ascii_lowercase();
                ct.starts_with("application/json") || ct.contains("+json")
            });
        if !is_json {
            return Err(ApiError::new(
                problem_type::BAD_REQUEST,
                415,
                "Unsupported media type",
                "the body must be application/json",
            ));
        }
        let (parts, body) = req.into_parts();
        let (bytes, _) = read_body(&parts.headers, body, limit, None).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Reads a whole request body of at most `limit` bytes. A declared length
/// over the limit is refused before any of the body is read (or `100
/// Continue` sent): waiting for a body that will be refused anyway would
/// only hold the connection. `Connection: close` because the unread body
/// cannot be skipped. The pieces are copied into one buffer as they come:
/// kept as a list, a body sent in 1-byte chunks would take some 25 times
/// its size in memory.
///
/// With a `budget` (one permit a byte, shared by all requests), each piece
/// takes its share as it comes, held by the returned permit; a piece the
/// budget cannot cover ends the read with 503 `unavailable`.
pub(crate) async fn read_body(
    headers: &axum::http::HeaderMap,
    body: Body,
    limit: usize,
    budget: Option<(&Budget, Option<&Arc<str>>)>,
) -> Result<(bytes::Bytes, Option<Hold>), ApiError> {
    use futures::StreamExt;
    let too_large = || ApiError::too_large(format!("the body is larger than {limit} bytes"));
    let mut held: Option<Hold> = None;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(too_large().with_header(header::CONNECTION, "close"));
    }
    let mut stream = body.into_data_stream();
    // A body in one piece (the usual case, and every body read a second
    // time) is returned as it is, without a copy.
    let mut first: Option<bytes::Bytes> = None;
    let mut joined = bytes::BytesMut::new();
    let mut len = 0usize;
    while let Some(piece) = stream.next().await {
        let piece =
            piece.map_err(|e| ApiError::bad_request(format!("could not read the body: {e}")))?;
        len = len.saturating_add(piece.len());
        if len > limit {
            return Err(too_large());
        }
        if let Some((budget, tenant)) = budget.filter(|_| !piece.is_empty()) {
            let share = u32::try_from(piece.len()).map_err(|_| too_large())?;
            let Some(permit) = budget.try_take(tenant, share) else {
                return Err(ApiError::busy(
                    "the server holds as many request bodies as it may; nothing was applied",
                )
                .with_header(header::CONNECTION, "close"));
            };
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
        }
        if let Some(f) = first.take() {
            // Sized by what arrived, never by the declared length: a client
            // could declare the limit, send two bytes and so hold memory
            // the budget never saw.
            joined.reserve(len);
            joined.extend_from_slice(&f);
        }
        if joined.is_empty() {
            first = Some(piece);
        } else {
            joined.extend_from_slice(&piece);
        }
    }
    Ok((first.unwrap_or_else(|| joined.freeze()), held))
}

/// Parses a JSON body with a message that says where it went wrong.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "malformed JSON"
            }
            _ => "unexpected JSON shape",
        };
        ApiError::bad_request(format!(
            "{what} at line {} column {}: {e}",
            e.line(),
            e.column()
        ))
    })
}
