//! Retry scheduling: exponential backoff with full jitter, and `Retry-After`.
//!
//! Sans-IO: [`RetryPolicy::schedule`] takes the attempt count, an optional
//! server `Retry-After`, the wall clock and a random source, and returns the
//! Unix time of the next attempt (or [`RetryDecision::GiveUp`]). The engine
//! stores that time and the attempt count on the op, so backoff survives a
//! restart.
//!
//! Full jitter (a delay drawn uniformly from `[0, min(cap, base * factor^n)]`)
//! spreads the retries of many clients after a shared outage instead of
//! having them return in lockstep.
//!
//! ```
//! use std::time::Duration;
//! use guardian_sync::retry::{parse_retry_after, RetryDecision, RetryPolicy};
//!
//! let policy = RetryPolicy::default();
//! let now = 1_700_000_000_000; // Unix ms
//! let retry_after = parse_retry_after("120", now);
//! // After the first attempt failed with `Retry-After: 120`:
//! let decision = policy.schedule(1, retry_after, now, &mut rand::rng());
//! assert_eq!(decision, RetryDecision::RetryAt(now + 120_000));
//! // Without it, a jittered delay of at most `base` (500 ms):
//! let RetryDecision::RetryAt(at) = policy.schedule(1, None, now, &mut rand::rng()) else {
//!     unreachable!()
//! };
//! assert!(at - now <= 500);
//! assert_eq!(policy.ceiling(3), Duration::from_secs(4));
//! ```

use std::time::{Duration, UNIX_EPOCH};

use rand::Rng;

/// Why a [`RetryPolicy`] could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryPolicyError {
    /// The base delay was zero; backoff would never grow.
    #[error("retry base delay must be greater than zero")]
    ZeroBase,
    /// The growth factor was below 1.0, NaN or infinite.
    #[error("retry factor must be a finite number >= 1.0, got {0}")]
    InvalidFactor(f64),
    /// The cap was below the base delay.
    #[error("retry cap ({cap:?}) must be at least the base delay ({base:?})")]
    CapBelowBase {
        /// The configured base delay.
        base: Duration,
        /// The configured cap.
        cap: Duration,
    },
    /// `max_attempts` was zero; an op must be sent at least once.
    #[error("max_attempts must be at least 1")]
    ZeroAttempts,
}

/// How failed sends are retried: exponential backoff with full jitter.
///
/// Build it with [`RetryPolicy::new`] (validated) or take the
/// [`Default`]: 500 ms base, factor 2.0, 5 min cap, 20 attempts in total,
/// `Retry-After` honoured up to 1 h.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    base: Duration,
    factor: f64,
    cap: Duration,
    max_attempts: u32,
    max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            factor: 2.0,
            cap: Duration::from_secs(5 * 60),
            max_attempts: 20,
            max_retry_after: Duration::from_secs(60 * 60),
        }
    }
}

/// A server's request to wait, from a `Retry-After` header.
///
/// Stored as a delay relative to the moment the header was parsed; an
/// HTTP-date in the past is a zero delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RetryAfter {
    delay: Duration,
}

impl RetryAfter {
    /// A `Retry-After` of the given delay (for transports that learn it
    /// another way than from a header).
    pub fn from_delay(delay: Duration) -> Self {
        Self { delay }
    }

    /// How long the server asked us to wait.
    pub fn delay(&self) -> Duration {
        self.delay
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again no earlier than this wall time (Unix milliseconds).
    RetryAt(i64),
    /// The attempt budget is spent: the op becomes `failed` (kept).
    GiveUp,
}

impl RetryPolicy {
    /// A validated policy.
    ///
    /// `max_attempts` counts every send including the first;
    /// `max_retry_after` caps how far a server's `Retry-After` can push the
    /// next attempt.
    pub fn new(
        base: Duration,
        factor: f64,
        cap: Duration,
        max_attempts: u32,
        max_retry_after: Duration,
    ) -> Result<Self, RetryPolicyError> {
        if base.is_zero() {
            return Err(RetryPolicyError::ZeroBase);
        }
        if !factor.is_finite() || factor < 1.0 {
            return Err(RetryPolicyError::InvalidFactor(factor));
        }
        if cap < base {
            return Err(RetryPolicyError::CapBelowBase { base, cap });
        }
        if max_attempts == 0 {
            return Err(RetryPolicyError::ZeroAttempts);
        }
        Ok(Self {
            base,
            factor,
            cap,
            max_attempts,
            max_retry_after,
        })
    }

    /// The first retry's maximum delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// Growth factor of the maximum delay per retry.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// Upper bound of any backoff delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// Total sends allowed per op, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Upper bound applied to a server's `Retry-After`.
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// The furthest ahead this policy ever schedules an attempt: the larger
    /// of the backoff cap and the `Retry-After` cap.
    pub fn horizon(&self) -> Duration {
        self.cap.max(self.max_retry_after)
    }

    /// The largest delay retry number `retry` (0-based) may draw:
    /// `min(cap, base * factor^retry)`, computed without overflow.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let cap = saturating_nanos(self.cap);
        // f64 keeps this overflow-free: a huge exponent gives +inf, and the
        // `min` with the cap (a finite u64) brings it back in range.
        let grown = saturating_nanos(self.base) as f64 * self.factor.powf(f64::from(retry));
        if grown.is_nan() || grown >= cap as f64 {
            Duration::from_nanos(cap)
        } else {
            // In range: 0 <= grown < cap <= u64::MAX, so the cast is exact enough.
            Duration::from_nanos(grown as u64)
        }
    }

    /// A full-jitter delay for retry number `retry` (0-based: the delay
    /// after the first failure is `next_delay(0, ..)`), uniform in
    /// `[0, ceiling(retry)]`.
    pub fn next_delay<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let ceiling = saturating_nanos(self.ceiling(retry));
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }

    /// Decides when to try again after a retryable failure.
    ///
    /// `attempts_so_far` is the number of sends already made (the outbox
    /// increments it before each send, so it is at least 1 here). Once it
    /// reaches `max_attempts` the answer is [`RetryDecision::GiveUp`].
    /// Otherwise the delay is the jittered backoff, but never shorter than
    /// the server's `Retry-After` (itself capped at `max_retry_after`), so
    /// no attempt happens before the time the server stated.
    pub fn schedule<R: Rng + ?Sized>(
        &self,
        attempts_so_far: u32,
        retry_after: Option<RetryAfter>,
        now_millis: i64,
        rng: &mut R,
    ) -> RetryDecision {
        if attempts_so_far >= self.max_attempts {
            return RetryDecision::GiveUp;
        }
        let backoff = self.next_delay(attempts_so_far.saturating_sub(1), rng);
        let server = retry_after.map_or(Duration::ZERO, |ra| ra.delay.min(self.max_retry_after));
        let delay = backoff.max(server);
        RetryDecision::RetryAt(now_millis.saturating_add(ceil_millis(delay)))
    }
}

/// When a stored op is due, read against the current wall clock `now`
/// (all Unix ms), so that a wall-clock step never parks it:
///
/// - never attempted (`attempts == 0`): due at once;
/// - written under a clock ahead of `now` (`updated_at > now`): its delay
///   is measured again from `now` (the step back is taken out), so it waits
///   no longer than the delay it was given;
/// - never further ahead than `horizon` (the policy's
///   [`RetryPolicy::horizon`]).
///
/// A time already due is returned unchanged. Never earlier than `now` unless
/// `next_attempt_at` is, so no backoff or `Retry-After` is cut short by more
/// than the clock step.
pub fn clamp_due(
    next_attempt_at: i64,
    attempts: u32,
    updated_at: i64,
    now: i64,
    horizon: Duration,
) -> i64 {
    if next_attempt_at <= now {
        return next_attempt_at;
    }
    if attempts == 0 {
        return now;
    }
    let mut due = next_attempt_at.min(now.saturating_add(ceil_millis(horizon)));
    if updated_at > now {
        due = due.min(
            next_attempt_at
                .saturating_sub(updated_at.saturating_sub(now))
                .max(now),
        );
    }
    due
}

/// Parses a `Retry-After` header value (RFC 9110 §10.2.3).
///
/// Accepts delay-seconds (`"120"`) and an HTTP-date in any of the three
/// forms RFC 9110 requires recipients to accept. `now_millis` turns a date
/// into a delay; a date in the past means "now" (zero delay). Garbage,
/// signs, fractions, empty values and numbers too large for a `u64` give
/// `None`: the caller then falls back to plain backoff.
pub fn parse_retry_after(value: &str, now_millis: i64) -> Option<RetryAfter> {
    let value = value.trim_matches(|c| c == ' ' || c == '\t');
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = value.parse().ok()?;
        return Some(RetryAfter::from_delay(Duration::from_secs(secs)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at_millis = i64::try_from(at.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()?;
    let delay_millis = u64::try_from(at_millis.saturating_sub(now_millis)).unwrap_or(0);
    Some(RetryAfter::from_delay(Duration::from_millis(delay_millis)))
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Milliseconds, rounded up so a stored time is never before the delay ends.
fn ceil_millis(d: Duration) -> i64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn default_policy_is_valid() {
        let d = RetryPolicy::default();
        let v = RetryPolicy::new(
            d.base(),
            d.factor(),
            d.cap(),
            d.max_attempts(),
            d.max_retry_after(),
        );
        assert_eq!(v, Ok(d));
    }

    #[test]
    fn constructor_rejects_bad_input() {
        let s = Duration::from_secs(1);
        let h = Duration::from_secs(3600);
        assert_eq!(
            RetryPolicy::new(Duration::ZERO, 2.0, s, 3, h),
            Err(RetryPolicyError::ZeroBase)
        );
        assert!(matches!(
            RetryPolicy::new(s, 0.5, s, 3, h),
            Err(RetryPolicyError::InvalidFactor(_))
        ));
        assert!(matches!(
            RetryPolicy::new(s, f64::NAN, s, 3, h),
            Err(RetryPolicyError::InvalidFactor(_))
        ));
        assert!(matches!(
            RetryPolicy::new(s, f64::INFINITY, s, 3, h),
            Err(RetryPolicyError::InvalidFactor(_))
        ));
        assert!(matches!(
            RetryPolicy::new(s, 2.0, Duration::from_millis(10), 3, h),
            Err(RetryPolicyError::CapBelowBase { .. })
        ));
        assert_eq!(
            RetryPolicy::new(s, 2.0, s, 0, h),
            Err(RetryPolicyError::ZeroAttempts)
        );
    }

    #[test]
    fn ceiling_grows_exponentially_then_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(0), Duration::from_millis(500));
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(3), Duration::from_secs(4));
        assert_eq!(p.ceiling(9), Duration::from_secs(256));
        assert_eq!(p.ceiling(10), Duration::from_secs(300));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_ceiling_and_spreads() {
        let p = RetryPolicy::default();
        let mut r = rng();
        let delays: Vec<Duration> = (0..200).map(|_| p.next_delay(4, &mut r)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(8)));
        let below_half = delays
            .iter()
            .filter(|d| **d < Duration::from_secs(4))
            .count();
        // Uniform over [0, 8 s]: roughly half below 4 s.
        assert!((60..140).contains(&below_half), "{below_half}");
    }

    #[test]
    fn same_seed_same_schedule() {
        let p = RetryPolicy::default();
        let a = p.schedule(3, None, 1_000, &mut rng());
        let b = p.schedule(3, None, 1_000, &mut rng());
        assert_eq!(a, b);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let p = RetryPolicy::new(
            Duration::from_millis(100),
            2.0,
            Duration::from_secs(1),
            3,
            Duration::from_secs(60),
        )
        .unwrap();
        let mut r = rng();
        assert!(matches!(
            p.schedule(1, None, 0, &mut r),
            RetryDecision::RetryAt(_)
        ));
        assert!(matches!(
            p.schedule(2, None, 0, &mut r),
            RetryDecision::RetryAt(_)
        ));
        assert_eq!(p.schedule(3, None, 0, &mut r), RetryDecision::GiveUp);
        assert_eq!(p.schedule(u32::MAX, None, 0, &mut r), RetryDecision::GiveUp);
    }

    #[test]
    fn retry_after_is_the_earliest_next_attempt() {
        let p = RetryPolicy::default();
        let ra = RetryAfter::from_delay(Duration::from_secs(120));
        for seed in 0..50 {
            let d = p.schedule(1, Some(ra), 10_000, &mut StdRng::seed_from_u64(seed));
            // First retry's backoff is at most 500 ms, so the server's 120 s rules.
            assert_eq!(d, RetryDecision::RetryAt(130_000));
        }
    }

    #[test]
    fn retry_after_far_in_the_future_is_capped() {
        let p = RetryPolicy::default();
        let ra = RetryAfter::from_delay(Duration::from_secs(10 * 24 * 3600));
        let d = p.schedule(1, Some(ra), 0, &mut rng());
        assert_eq!(d, RetryDecision::RetryAt(3_600_000));
    }

    #[test]
    fn longer_backoff_wins_over_short_retry_after() {
        let p = RetryPolicy::new(
            Duration::from_secs(100),
            1.0,
            Duration::from_secs(100),
            5,
            Duration::from_secs(3600),
        )
        .unwrap();
        let ra = RetryAfter::from_delay(Duration::from_secs(1));
        let RetryDecision::RetryAt(at) = p.schedule(1, Some(ra), 0, &mut rng()) else {
            panic!("expected a retry");
        };
        assert!((1_000..=100_000).contains(&at), "{at}");
    }

    #[test]
    fn clamp_due_takes_clock_steps_out_of_stored_times() {
        const H: i64 = 3_600_000;
        let h = Duration::from_millis(H as u64);
        let now = 1_000_000_000;
        // Due already: unchanged.
        assert_eq!(clamp_due(now - 5, 3, now - 9, now, h), now - 5);
        // Never attempted, stored 2 h ahead (enqueued under a clock 2 h ahead).
        assert_eq!(clamp_due(now + 2 * H, 0, now + 2 * H, now, h), now);
        // A backoff of 10 s given under a clock 2 h ahead: 10 s from now.
        assert_eq!(
            clamp_due(now + 2 * H + 10_000, 4, now + 2 * H, now, h),
            now + 10_000
        );
        // A backoff given on this clock keeps its length.
        assert_eq!(
            clamp_due(now + 10_000, 4, now - 1_000, now, h),
            now + 10_000
        );
        // Never further than the horizon, whatever the row says.
        assert_eq!(clamp_due(now + 5 * H, 4, now - 1_000, now, h), now + H);
        assert_eq!(clamp_due(i64::MAX, 4, i64::MIN, now, h), now + H);
        // Its delay is measured again from now: none.
        assert_eq!(clamp_due(i64::MAX, 4, i64::MAX, now, h), now);
        assert_eq!(clamp_due(i64::MAX, 4, i64::MAX, i64::MIN, h), i64::MIN + H);
        let p = RetryPolicy::default();
        assert_eq!(p.horizon(), p.max_retry_after().max(p.cap()));
    }

    #[test]
    fn parses_delay_seconds() {
        assert_eq!(
            parse_retry_after("120", 0),
            Some(RetryAfter::from_delay(Duration::from_secs(120)))
        );
        assert_eq!(
            parse_retry_after(" 0\t", 0),
            Some(RetryAfter::from_delay(Duration::ZERO))
        );
        assert_eq!(
            parse_retry_after("18446744073709551615", 0),
            Some(RetryAfter::from_delay(Duration::from_secs(u64::MAX)))
        );
    }

    #[test]
    fn parses_all_three_http_date_forms() {
        // Sun, 06 Nov 1994 08:49:37 GMT = 784111777 s.
        let now = 784_111_777_000 - 30_000;
        let expected = Some(RetryAfter::from_delay(Duration::from_secs(30)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            expected
        );
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now),
            expected
        );
        assert_eq!(parse_retry_after("Sun Nov  6 08:49:37 1994", now), expected);
    }

    #[test]
    fn a_date_in_the_past_means_now() {
        let now = 784_111_777_000 + 5_000;
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(RetryAfter::from_delay(Duration::ZERO))
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "   ",
            "-5",
            "+5",
            "1.5",
            "1e3",
            "soon",
            "99999999999999999999999",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "\u{0}",
            "١٢",
        ] {
            assert_eq!(parse_retry_after(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn extreme_now_does_not_overflow() {
        let p = RetryPolicy::default();
        let ra = Some(RetryAfter::from_delay(Duration::from_secs(u64::MAX)));
        assert_eq!(
            p.schedule(1, ra, i64::MAX, &mut rng()),
            RetryDecision::RetryAt(i64::MAX)
        );
        assert!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", i64::MIN).is_some());
        assert!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", i64::MAX).is_some());
    }
}
