//! Request limits: timeout, concurrency and per-tenant rate.
//!
//! The body limit lives in the JSON extractor ([`crate::problem::ApiJson`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use guardian_protocol::problem_type;
use tokio::time::Instant;

use crate::auth::Tenant;
use crate::config::RateLimit;
use crate::problem::ApiError;
use crate::state::AppState;

/// Set by the mutation pipeline just before its transaction starts; from then
/// on the request timeout no longer cuts the request, so a timeout answer
/// (a 5xx) always means nothing was applied.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommitStarted(Arc<AtomicBool>);

impl CommitStarted {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Middleware: waits for a concurrency slot, then runs the request under the
/// request timeout (503 `timeout` problem when it expires before commit).
pub(crate) async fn timeout_and_concurrency(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = CommitStarted::default();
    req.extensions_mut().insert(started.clone());
    let limit = state.config.request_timeout;
    let work = async {
        let Ok(_permit) = state.concurrency.acquire().await else {
            return ApiError::internal("the server is shutting down").into_response();
        };
        next.run(req).await
    };
    tokio::pin!(work);
    tokio::select! {
        resp = &mut work => resp,
        () = tokio::time::sleep(limit) => {
            if started.is_set() {
                work.await
            } else {
                ApiError::new(
                    problem_type::TIMEOUT,
                    503,
                    "Request timeout",
                    format!("the request took longer than {} ms; nothing was applied", limit.as_millis()),
                )
                .with_header(header::RETRY_AFTER, "1")
                .into_response()
            }
        }
    }
}

/// Per-tenant token buckets.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: Option<RateLimit>,
    buckets: Mutex<HashMap<Arc<str>, (f64, Instant)>>,
}

impl RateLimiter {
    pub(crate) fn new(limit: Option<RateLimit>) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `tenant`, or says how long until one is available.
    pub(crate) fn check(&self, tenant: &Arc<str>, now: Instant) -> Result<(), Duration> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let burst = f64::from(limit.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, at) = buckets.entry(Arc::clone(tenant)).or_insert((burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * limit.per_second;
        *tokens = (*tokens + refill).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / limit.per_second))
        }
    }
}

/// Middleware (after authentication): 429 with `Retry-After` when the
/// tenant's bucket is empty.
pub(crate) async fn rate_limit(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(Tenant(tenant)) = req.extensions().get::<Tenant>() {
        if let Err(wait) = state.rate.check(tenant, Instant::now()) {
            state.metrics.rate_limited();
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return ApiError::new(
                problem_type::RATE_LIMITED,
                429,
                "Too many requests",
                format!("rate limit exceeded; retry in {secs} s"),
            )
            .with_header(header::RETRY_AFTER, secs.max(1).to_string())
            .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_the_rate() {
        let r = RateLimiter::new(Some(RateLimit {
            per_second: 2.0,
            burst: 2,
        }));
        let t: Arc<str> = Arc::from("t");
        let t0 = Instant::now();
        assert!(r.check(&t, t0).is_ok());
        assert!(r.check(&t, t0).is_ok());
        let wait = r.check(&t, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(r.check(&t, t0 + Duration::from_millis(500)).is_ok());
        let other: Arc<str> = Arc::from("u");
        assert!(r.check(&other, t0).is_ok(), "buckets are per tenant");
    }
}
