//! Request limits: the phase the request timeout respects, the per-tenant
//! rate and the admin-token lockout. The middleware that applies them is in
//! `routes/middleware.rs`; the body limit is `problem::read_body`'s, used
//! by that middleware and by the JSON extractor.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter as Gcra};

use crate::config::RateLimit;

/// Where a request is, for the request timeout: its body still arriving
/// (the timeout answers 408 and closes the connection), waiting for a slot
/// or being handled (503 `timeout`: retry, nothing applied), or in its
/// transaction. The mutation pipeline marks the last just before its
/// transaction starts; from then on a `timeout` answer would be a lie, so
/// the request is given more time and then answered "outcome unknown" (see
/// `routes::middleware::deadline`).
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestPhase(Arc<AtomicU8>);

/// The phases of [`RequestPhase`], in the order a request passes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    ReadingBody = 0,
    Handling = 1,
    Committing = 2,
}

impl RequestPhase {
    /// Moves the request on to `phase` (never back).
    pub(crate) fn reach(&self, phase: Phase) {
        self.0.fetch_max(phase as u8, Ordering::SeqCst);
    }

    pub(crate) fn get(&self) -> Phase {
        match self.0.load(Ordering::SeqCst) {
            0 => Phase::ReadingBody,
            1 => Phase::Handling,
            _ => Phase::Committing,
        }
    }
}

/// Failed admin-token attempts per client address: after
/// [`LOCKOUT_FAILURES`] within [`LOCKOUT_WINDOW_MS`], the address is refused
/// without a check until the window ends, so the admin token (often chosen
/// by a person) cannot be guessed at line rate. Success costs nothing, so
/// tools that use the right token are never slowed.
#[derive(Debug, Default)]
pub(crate) struct AuthLockout {
    strikes: std::sync::Mutex<HashMap<IpAddr, Strikes>>,
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    count: u32,
    /// When the window of these strikes began (server clock, ms).
    since: i64,
}

pub(crate) const LOCKOUT_FAILURES: u32 = 10;
pub(crate) const LOCKOUT_WINDOW_MS: i64 = 60_000;
/// Addresses tracked at most; beyond, the oldest window is forgotten.
const LOCKOUT_TRACKED: usize = 4096;

impl Strikes {
    /// Whether the window is still open at `now`. A window that begins
    /// after `now` (the wall clock stepped back) is over: else a step back
    /// of an hour would lock an address out for that hour.
    fn current(&self, now: i64) -> bool {
        (self.since..self.since.saturating_add(LOCKOUT_WINDOW_MS)).contains(&now)
    }
}

impl AuthLockout {
    fn strikes(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Strikes>> {
        // Plain counters, each update complete under the lock.
        self.strikes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long `ip` stays locked out, if it is.
    pub(crate) fn locked(&self, ip: IpAddr, now: i64) -> Option<Duration> {
        let s = *self.strikes().get(&ip)?;
        let ends = s.since.saturating_add(LOCKOUT_WINDOW_MS);
        (s.count >= LOCKOUT_FAILURES && s.current(now))
            .then(|| Duration::from_millis(u64::try_from(ends - now).unwrap_or(0)))
    }

    /// Records a failed attempt from `ip`.
    pub(crate) fn failed(&self, ip: IpAddr, now: i64) {
        let mut strikes = self.strikes();
        if !strikes.contains_key(&ip) && strikes.len() >= LOCKOUT_TRACKED {
            strikes.retain(|_, s| s.current(now));
            if strikes.len() >= LOCKOUT_TRACKED {
                if let Some(oldest) = strikes.iter().min_by_key(|(_, s)| s.since).map(|(k, _)| *k) {
                    strikes.remove(&oldest);
                }
            }
        }
        let s = strikes.entry(ip).or_insert(Strikes {
            count: 0,
            since: now,
        });
        if !s.current(now) {
            *s = Strikes {
                count: 0,
                since: now,
            };
        }
        s.count = s.count.saturating_add(1);
    }
}

/// One GCRA state per tenant.
type PerTenant<C> =
    Gcra<Arc<str>, HashMapStateStore<Arc<str>>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The per-tenant rate limit: `burst` requests at once, refilled at
/// `per_second` (GCRA, which answers as a token bucket does).
pub(crate) struct RateLimiter<C: Clock = DefaultClock> {
    limiter: Option<PerTenant<C>>,
    clock: C,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("enabled", &self.limiter.is_some())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    pub(crate) fn new(limit: Option<RateLimit>) -> Self {
        Self::with_clock(limit, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    fn with_clock(limit: Option<RateLimit>, clock: C) -> Self {
        Self {
            limiter: limit.map(|l| Gcra::hashmap_with_clock(quota(l), clock.clone())),
            clock,
        }
    }

    /// Takes a request's share for `tenant`, or says how long until one is
    /// available.
    pub(crate) fn check(&self, tenant: &Arc<str>) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(tenant)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// The longest refill period kept (a rate below one request a century is
/// taken as one a century).
const MAX_PERIOD: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `limit` as a GCRA quota. The builder checked that the rate is positive
/// and finite and the burst at least one.
fn quota(limit: RateLimit) -> Quota {
    let period = Duration::try_from_secs_f64(1.0 / limit.per_second)
        .unwrap_or(MAX_PERIOD)
        .clamp(Duration::from_nanos(1), MAX_PERIOD);
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn an_address_is_locked_out_after_its_failures_until_the_window_ends() {
        let l = AuthLockout::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        for i in 0..LOCKOUT_FAILURES {
            assert_eq!(l.locked(ip, 1_000), None, "after {i} failures");
            l.failed(ip, 1_000 + i64::from(i));
        }
        assert_eq!(l.locked(ip, 1_000), Some(Duration::from_secs(60)));
        assert_eq!(l.locked(ip, 60_999), Some(Duration::from_millis(1)));
        assert_eq!(l.locked(ip, 61_000), None);
        assert_eq!(l.locked(other, 1_000), None, "per address");
        l.failed(ip, 61_000);
        assert_eq!(l.locked(ip, 61_000), None, "a new window starts at one");
    }

    #[test]
    fn a_clock_stepped_back_ends_a_lockout_instead_of_stretching_it() {
        let l = AuthLockout::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..LOCKOUT_FAILURES {
            l.failed(ip, 3_600_000);
        }
        assert!(l.locked(ip, 3_600_000).is_some());
        assert_eq!(l.locked(ip, 0), None, "an hour back");
        l.failed(ip, 0);
        assert_eq!(l.locked(ip, 0), None, "a new window starts at one");
    }

    #[test]
    fn the_lockout_tracks_a_bounded_number_of_addresses() {
        let l = AuthLockout::default();
        for i in 0..(LOCKOUT_TRACKED as u32 + 100) {
            l.failed(IpAddr::from(i.to_be_bytes()), i64::from(i));
        }
        assert_eq!(l.strikes().len(), LOCKOUT_TRACKED);
    }

    #[test]
    fn bucket_refills_at_the_rate() {
        let clock = FakeRelativeClock::default();
        let r = RateLimiter::with_clock(
            Some(RateLimit {
                per_second: 2.0,
                burst: 2,
            }),
            clock.clone(),
        );
        let t: Arc<str> = Arc::from("t");
        assert!(r.check(&t).is_ok());
        assert!(r.check(&t).is_ok());
        let wait = r.check(&t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        clock.advance(Duration::from_millis(500));
        assert!(r.check(&t).is_ok());
        let other: Arc<str> = Arc::from("u");
        assert!(r.check(&other).is_ok(), "buckets are per tenant");
    }

    #[test]
    fn extreme_rates_make_a_quota() {
        for per_second in [1e-300, 1e-9, 0.01, 1e9, 1e300] {
            let q = quota(RateLimit {
                per_second,
                burst: 1,
            });
            assert!(q.replenish_interval() >= Duration::from_nanos(1));
        }
    }
}
