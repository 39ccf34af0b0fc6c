//! The network health score (0–100) and what it is computed from.
//!
//! ```text
//! success   = EWMA of send outcomes (1 = succeeded, 0 = retried or failed),
//!             alpha 0.1 (about the last 20 outcomes); 1.0 before any outcome
//! latency   = 1                         if EWMA latency <= target
//!             target / EWMA latency     otherwise (2x the target -> 0.5)
//!             1.0 before any sample
//! raw       = 70 * success + 30 * latency
//! score     = min(raw, 20) when the breaker is open,
//!             min(raw, 50) when it is half-open,
//!             raw          when it is closed;   rounded to an integer
//! ```
//!
//! Recent (exponentially weighted) figures are used rather than the
//! all-time histogram so that the score recovers once the network does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::breaker::BreakerState;

/// Points of the score given by the success rate.
pub const SUCCESS_POINTS: f64 = 70.0;
/// Points of the score given by latency.
pub const LATENCY_POINTS: f64 = 30.0;
/// Highest score while the breaker is open.
pub const OPEN_CAP: u8 = 20;
/// Highest score while the breaker is half-open.
pub const HALF_OPEN_CAP: u8 = 50;

/// Tuning of the health score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// Latency at or below which the latency component is perfect.
    pub latency_target: Duration,
    /// EWMA smoothing factor in (0, 1]: weight of the newest observation.
    pub alpha: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            latency_target: Duration::from_millis(500),
            alpha: 0.1,
        }
    }
}

impl HealthConfig {
    /// `alpha` clamped into (0, 1]; NaN falls back to the default.
    pub(crate) fn effective_alpha(&self) -> f64 {
        if self.alpha.is_nan() {
            0.1
        } else {
            self.alpha.clamp(f64::MIN_POSITIVE, 1.0)
        }
    }
}

/// Breaker state encoded for an atomic.
pub(crate) fn breaker_code(state: &BreakerState) -> u8 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::Open { .. } => 1,
        BreakerState::HalfOpen => 2,
    }
}

/// Name of an encoded breaker state.
pub(crate) fn breaker_name(code: u8) -> &'static str {
    match code {
        1 => "open",
        2 => "half_open",
        _ => "closed",
    }
}

/// An exponentially weighted moving average in an atomic (f64 bits).
/// `NaN` bits mean "no sample yet".
#[derive(Debug)]
pub(crate) struct AtomicEwma(AtomicU64);

impl AtomicEwma {
    pub(crate) fn new() -> Self {
        Self(AtomicU64::new(f64::NAN.to_bits()))
    }

    pub(crate) fn observe(&self, value: f64, alpha: f64) {
        // fetch_update retries on contention; the closure never returns None.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                let new = if old.is_nan() {
                    value
                } else {
                    old + alpha * (value - old)
                };
                Some(new.to_bits())
            });
    }

    pub(crate) fn get(&self) -> Option<f64> {
        let v = f64::from_bits(self.0.load(Ordering::Relaxed));
        (!v.is_nan()).then_some(v)
    }
}

/// The score from its inputs; see the module docs for the formula.
pub fn health_score(
    recent_success: Option<f64>,
    recent_latency: Option<Duration>,
    latency_target: Duration,
    breaker: &BreakerState,
) -> u8 {
    let success = match recent_success {
        None => 1.0,
        Some(s) if s.is_nan() => 0.0,
        Some(s) => s.clamp(0.0, 1.0),
    };
    let latency = match recent_latency {
        Some(l) if l > latency_target && !l.is_zero() => {
            (latency_target.as_secs_f64() / l.as_secs_f64()).clamp(0.0, 1.0)
        }
        _ => 1.0,
    };
    let raw = SUCCESS_POINTS * success + LATENCY_POINTS * latency;
    // raw is within [0, 100] by construction, so the cast cannot truncate.
    let raw = raw.round().clamp(0.0, 100.0) as u8;
    match breaker {
        BreakerState::Closed => raw,
        BreakerState::Open { .. } => raw.min(OPEN_CAP),
        BreakerState::HalfOpen => raw.min(HALF_OPEN_CAP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(500);

    #[test]
    fn perfect_and_unknown_are_100() {
        assert_eq!(health_score(None, None, T, &BreakerState::Closed), 100);
        assert_eq!(
            health_score(
                Some(1.0),
                Some(Duration::from_millis(20)),
                T,
                &BreakerState::Closed
            ),
            100
        );
    }

    #[test]
    fn formula_points() {
        let closed = BreakerState::Closed;
        assert_eq!(health_score(Some(0.5), None, T, &closed), 65);
        assert_eq!(health_score(Some(0.0), None, T, &closed), 30);
        assert_eq!(health_score(Some(1.0), Some(T * 2), T, &closed), 85);
        assert_eq!(health_score(Some(1.0), Some(T * 4), T, &closed), 78);
        assert_eq!(health_score(Some(0.0), Some(T * 1000), T, &closed), 0);
    }

    #[test]
    fn breaker_caps_the_score() {
        let open = BreakerState::Open {
            until: Duration::from_secs(1),
        };
        assert_eq!(health_score(Some(1.0), None, T, &open), OPEN_CAP);
        assert_eq!(health_score(Some(0.0), Some(T * 1000), T, &open), 0);
        assert_eq!(
            health_score(Some(1.0), None, T, &BreakerState::HalfOpen),
            HALF_OPEN_CAP
        );
    }

    #[test]
    fn out_of_range_inputs_are_clamped() {
        let closed = BreakerState::Closed;
        assert_eq!(health_score(Some(7.0), None, T, &closed), 100);
        assert_eq!(health_score(Some(-1.0), None, T, &closed), 30);
        assert_eq!(health_score(Some(f64::NAN), None, T, &closed), 30);
        assert_eq!(
            health_score(None, Some(Duration::MAX), Duration::ZERO, &closed),
            70
        );
    }

    #[test]
    fn ewma_starts_at_first_sample_and_converges() {
        let e = AtomicEwma::new();
        assert_eq!(e.get(), None);
        e.observe(1.0, 0.1);
        assert_eq!(e.get(), Some(1.0));
        for _ in 0..100 {
            e.observe(0.0, 0.1);
        }
        assert!(e.get().unwrap() < 0.001);
    }
}
