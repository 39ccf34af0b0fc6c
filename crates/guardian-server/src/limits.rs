//! Request limits: the commit flag the request timeout respects, and the
//! per-tenant rate. The middleware that applies them is in
//! `routes/middleware.rs`; the body limit lives in the JSON extractor
//! ([`crate::problem::ApiJson`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RateLimit;

/// Set by the mutation pipeline just before its transaction starts; from then
/// on the request timeout no longer cuts the request, so a timeout answer
/// (a 5xx) always means nothing was applied.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommitStarted(Arc<AtomicBool>);

impl CommitStarted {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
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
