//! The middleware of the routes: authentication, limits and metrics. Each
//! reads the shared state and answers refusals with problem documents; the
//! types they use (tenants, rate limiter, counters) know nothing of HTTP
//! state.

use std::sync::Arc;

use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use guardian_protocol::problem_type;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tower_http::LatencyUnit;
use tracing::{Level, Span};

use crate::auth::{bearer, digest, Tenant};
use crate::budget::{Budget, Hold};
use crate::conn::ConnInfo;
use crate::limits::{Phase, RequestPhase};
use crate::problem::{outcome_unknown, read_body, ApiError};
use crate::state::AppState;

/// Middleware: resolves the tenant or answers 401.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let tenant = match bearer(req.headers()) {
        None => {
            return ApiError::unauthorized("send Authorization: Bearer <token>").into_response()
        }
        Some(token) => match state.tenants.get(&digest(token)) {
            Some(tenant) => Arc::clone(tenant),
            None => return ApiError::unauthorized("unknown bearer token").into_response(),
        },
    };
    req.extensions_mut().insert(Tenant(tenant));
    next.run(req).await
}

/// Middleware (outermost but metrics): runs the request under the request
/// timeout, counted from its head's arrival. On expiry the answer depends on
/// the request's [`Phase`]: 408 and a closed connection while its body is
/// still arriving; 503 `timeout` (retry, nothing applied) while it waits
/// for a slot or is handled. A transaction already running gets the
/// timeout once more to finish; after that the answer is 503 `timeout`,
/// outcome unknown, while the transaction goes on in the store's own task
/// (it is never cut short between its commit and what follows).
pub(crate) async fn deadline(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let phase = RequestPhase::default();
    req.extensions_mut().insert(phase.clone());
    let limit = state.config.request_timeout;
    let work = next.run(req);
    tokio::pin!(work);
    tokio::select! {
        resp = &mut work => resp,
        () = tokio::time::sleep(limit) => match phase.get() {
            Phase::ReadingBody => ApiError::new(
                problem_type::TIMEOUT,
                408,
                "Request timeout",
                format!("the body did not arrive within {} ms; nothing was applied", limit.as_millis()),
            )
            .with_header(header::CONNECTION, "close")
            .into_response(),
            Phase::Handling => ApiError::new(
                problem_type::TIMEOUT,
                503,
                "Request timeout",
                format!("the request took longer than {} ms; nothing was applied", limit.as_millis()),
            )
            .with_header(header::RETRY_AFTER, "1")
            .into_response(),
            Phase::Committing => match tokio::time::timeout(limit, work).await {
                Ok(resp) => resp,
                Err(_) => outcome_unknown(
                    problem_type::TIMEOUT,
                    &format!(
                        "the request's transaction did not finish within {} ms",
                        limit.saturating_mul(2).as_millis()
                    ),
                )
                .into_response(),
            },
        }
    }
}

/// 429 `rate-limited` with `Retry-After`: `wait` rounded up to whole
/// seconds, at least 1.
fn too_many(why: &str, wait: std::time::Duration) -> Response {
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    ApiError::new(
        problem_type::RATE_LIMITED,
        429,
        "Too many requests",
        format!("{why}; retry in {secs} s"),
    )
    .with_header(header::RETRY_AFTER, secs.to_string())
    .into_response()
}

/// Middleware (after authentication): admits a request in three steps.
/// 1. The tenant's rate limit: 429 with `Retry-After` when its bucket is
///    empty.
/// 2. The whole body is read, within the body budget, which it holds
///    until the request is answered. It comes before the slot so that a
///    client sending its body slowly holds only its own connection, never
///    one of the slots every tenant shares.
/// 3. A concurrency slot, held while the request is handled.
/// 4. A large answer to a read holds its size of the answer budget until
///    it is sent ([`hold_answer`]).
pub(crate) async fn admit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let tenant = req.extensions().get::<Tenant>().map(|t| Arc::clone(&t.0));
    if let Some(tenant) = &tenant {
        if let Err(wait) = state.rate.check(tenant) {
            state.metrics.rate_limited();
            return too_many("rate limit exceeded", wait);
        }
    }
    let (parts, body) = req.into_parts();
    let (body, _held) = if body.size_hint().exact() == Some(0) {
        (body, None)
    } else {
        let budget = Some((&state.body_budget, tenant.as_ref()));
        match read_body(&parts.headers, body, state.config.body_limit, budget).await {
            Ok((bytes, held)) => (Body::from(bytes), held),
            Err(e) => return e.into_response(),
        }
    };
    if let Some(phase) = parts.extensions.get::<RequestPhase>() {
        phase.reach(Phase::Handling);
    }
    let Ok(permit) = state.concurrency.acquire().await else {
        return ApiError::internal("the server is shutting down").into_response();
    };
    let read = parts.method == axum::http::Method::GET;
    let resp = next.run(Request::from_parts(parts, body)).await;
    drop(permit);
    // A mutation's answer is not held: refusing it after the write, or
    // making a write wait for readers' memory, would let stalled readers
    // keep writes out.
    if read && resp.extensions().get::<Held>().is_none() {
        hold_answer(resp, &state.answer_budget, tenant.as_ref())
    } else {
        resp
    }
}

/// Answers this large or larger hold their size of the answer budget
/// until they are sent.
const HELD_ANSWER_BYTES: u64 = 64 * 1024;

/// Holds a large answer's bytes in the answer budget until its body is
/// dropped (sent, or its connection gone): a client that never reads
/// would otherwise pin its answers for the write-stall bound, however many
/// connections it opens. An answer the budget cannot hold is dropped for a
/// 503 with `Retry-After`.
fn hold_answer(resp: Response, budget: &Budget, tenant: Option<&Arc<str>>) -> Response {
    let Some(size) = resp
        .body()
        .size_hint()
        .exact()
        .filter(|&n| n >= HELD_ANSWER_BYTES)
    else {
        return resp;
    };
    let held = u32::try_from(size)
        .ok()
        .and_then(|n| budget.try_take(tenant, n));
    match held {
        Some(permit) => hold_reserved(resp, permit),
        None => ApiError::busy("the server holds as many unsent answers as it may; retry")
            .into_response(),
    }
}

/// Marks an answer whose body already holds its budget.
#[derive(Debug, Clone, Copy)]
struct Held;

/// An answer and a permit taken for it (a feed page's reservation, or its
/// own size): it keeps what its body needs of the permit until it is
/// sent, and gives the rest back now. Handing a reservation over, instead
/// of releasing it and taking the answer's size again, means an answer
/// already built is never refused.
pub(crate) fn hold_reserved(resp: Response, mut reserved: Hold) -> Response {
    let size = resp
        .body()
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok());
    let kept = match size {
        Some(n) if n < reserved.len() => reserved.split(n),
        _ => Some(reserved),
    };
    let (mut parts, body) = resp.into_parts();
    parts.extensions.insert(Held);
    let body = match kept {
        Some(permit) => Body::new(HeldBody::new(body, permit)),
        None => body,
    };
    Response::from_parts(parts, body)
}

/// An answer's body and the budget it holds, given back when it is dropped.
/// The body is handed to hyper a slice at a time: hyper takes the next
/// slice only once its write buffer has room, so the body, and with it the
/// budget, lasts until the answer is nearly sent. Handed over whole, it
/// was dropped at once while its bytes still waited in hyper's buffer for
/// a client that does not read.
struct HeldBody {
    body: Body,
    /// What the inner body gave and is not yet handed on.
    pending: bytes::Bytes,
    _hold: Hold,
}

/// The largest slice of a held answer handed to hyper at once.
const HELD_SLICE: usize = 64 * 1024;

impl HeldBody {
    fn new(body: Body, hold: Hold) -> Self {
        Self {
            body,
            pending: bytes::Bytes::new(),
            _hold: hold,
        }
    }
}

impl HttpBody for HeldBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(HELD_SLICE);
                let slice = self.pending.split_to(n);
                return Poll::Ready(Some(Ok(hyper::body::Frame::data(slice))));
            }
            match std::pin::Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.pending = data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.body.size_hint();
        let pending = u64::try_from(self.pending.len()).unwrap_or(u64::MAX);
        match inner.exact() {
            Some(n) => hyper::body::SizeHint::with_exact(n.saturating_add(pending)),
            None => {
                let mut hint = hyper::body::SizeHint::new();
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(pending));
                }
                hint.set_lower(inner.lower().saturating_add(pending));
                hint
            }
        }
    }
}

/// Middleware of the admin and dashboard routes: an address that failed the
/// admin token too often is answered 429 without a check
/// ([`crate::limits::AuthLockout`]). A 401 counts as a failure when the
/// request presented something to check (a header, a cookie, a query), not
/// when a browser merely opened the page.
pub(crate) async fn admin_lockout(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let ip = req.extensions().get::<ConnectInfo<ConnInfo>>().map(|c| {
        state
            .config
            .trusted_proxies
            .client(c.0.remote.ip(), req.headers())
    });
    let now = state.config.clock.now_millis();
    if let Some(wait) = ip.and_then(|ip| state.lockout.locked(ip, now)) {
        return too_many("too many wrong admin tokens from this address", wait);
    }
    let presented = req.headers().contains_key(header::AUTHORIZATION)
        || req.headers().contains_key(header::COOKIE)
        || req.uri().query().is_some();
    let resp = next.run(req).await;
    if resp.status() == StatusCode::UNAUTHORIZED && presented {
        if let Some(ip) = ip {
            state.lockout.failed(ip, now);
        }
    }
    resp
}

/// The metrics label of a request's method: any method the client makes up
/// would otherwise become a counter series of its own, kept for good.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts every request by method, matched route and status.
pub(crate) async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    state
        .metrics
        .request(method, &route, resp.status().as_u16());
    resp
}

/// The span of one request in the access log: its method and path, never
/// its query, headers or body (tokens travel in the `Authorization` header
/// and in the dashboard's `?token=`).
fn request_span(req: &axum::http::Request<Body>) -> Span {
    tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
}

/// The access log's layer: request spans by [`request_span`], no event per
/// request, body chunk or end of stream.
pub(crate) type AccessLog = TraceLayer<
    SharedClassifier<ServerErrorsAsFailures>,
    fn(&axum::http::Request<Body>) -> Span,
    (),
    DefaultOnResponse,
    (),
    (),
    DefaultOnFailure,
>;

/// The access log (tower-http's `TraceLayer`): one event at DEBUG per
/// response, with its status and latency, in the request's span
/// (`RUST_LOG=tower_http=debug` shows it). DEBUG because a busy server's
/// log would otherwise be mostly this; server errors too (injected faults
/// make many).
pub(crate) fn access_log() -> AccessLog {
    TraceLayer::new_for_http()
        .make_span_with(request_span as fn(&axum::http::Request<Body>) -> Span)
        .on_request(())
        .on_response(
            DefaultOnResponse::new()
                .level(Level::DEBUG)
                .latency_unit(LatencyUnit::Micros),
        )
        .on_body_chunk(())
        .on_eos(())
        .on_failure(DefaultOnFailure::new().level(Level::DEBUG))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(len: usize) -> Response {
        Response::new(Body::from(vec![b'x'; len]))
    }

    #[tokio::test]
    async fn a_large_answer_holds_the_budget_until_its_body_is_dropped() {
        let budget = Budget::new(300 * 1024, 300 * 1024);
        let hold_answer = |resp| hold_answer(resp, &budget, None);
        // Small answers hold nothing.
        let small = hold_answer(answer(1000));
        assert_eq!(budget.available(), 300 * 1024);
        let first = hold_answer(answer(200 * 1024));
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.body().size_hint().exact(), Some(200 * 1024));
        assert_eq!(budget.available(), 100 * 1024);
        // No room for a second: refused, and its bytes are not kept.
        let second = hold_answer(answer(200 * 1024));
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(second.headers()[header::RETRY_AFTER], "1");
        assert_eq!(budget.available(), 100 * 1024);
        // Handed on a slice at a time, it holds its share until the last.
        let mut stream = first.into_body().into_data_stream();
        let mut sent = 0;
        while let Some(slice) = futures::StreamExt::next(&mut stream).await {
            let slice = slice.unwrap();
            assert!(slice.len() <= HELD_SLICE);
            sent += slice.len();
            if sent < 200 * 1024 {
                assert_eq!(budget.available(), 100 * 1024, "released at {sent}");
            }
        }
        assert_eq!(sent, 200 * 1024);
        drop(stream);
        assert_eq!(budget.available(), 300 * 1024);
        // Dropped unsent (the connection gone), the same.
        let third = hold_answer(answer(250 * 1024));
        assert_eq!(budget.available(), 50 * 1024);
        drop(third);
        assert_eq!(budget.available(), 300 * 1024);
        drop(small);
    }

    #[tokio::test]
    async fn a_reserved_answer_keeps_what_it_needs_and_is_never_refused() {
        let budget = Budget::new(300 * 1024, 300 * 1024);
        let reserved = budget.try_take(None, 250 * 1024).unwrap();
        let other = budget.try_take(None, 50 * 1024).unwrap();
        // The budget is full, yet the reserved answer goes out, keeping
        // only its own size.
        let resp = hold_reserved(answer(100 * 1024), reserved);
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.extensions().get::<Held>().is_some());
        assert_eq!(budget.available(), 150 * 1024);
        drop(other);
        drop(resp);
        assert_eq!(budget.available(), 300 * 1024);
    }
}
