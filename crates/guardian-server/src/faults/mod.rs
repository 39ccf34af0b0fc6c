//! Fault injection for tests and the demo.
//!
//! A [`Faults`] value says how the server misbehaves; the [`FaultInjector`]
//! holds it with a (optionally seeded) random generator and answers the
//! questions asked of it: fail this request? add latency? (the tower
//! [`layer::FaultLayer`]) drop the connection before or after the commit?
//! (the mutation pipeline) force a conflict on this op? (the store, through
//! [`StoreHooks`]). Counters such as [`Faults::fail_next`] make single
//! faults deterministic without any randomness.

pub(crate) mod layer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::store::{MutationInput, StoreHooks};

/// How the server misbehaves. Every field defaults to "never".
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Probability (0..=1) that a `/v1` request (not the WebSocket) fails
    /// before anything is done.
    pub failure_rate: f64,
    /// Fail the next N `/v1` requests, whatever the rate.
    pub fail_next: u32,
    /// Status codes to fail with, picked at random (500, 502, 503 or 429).
    /// Empty means 503.
    pub failure_statuses: Vec<u16>,
    /// `Retry-After` sent with injected failures, if any.
    pub retry_after: Option<RetryAfter>,
    /// Latency added to every `/v1` request, in milliseconds. For mutations
    /// it is added after the idempotency key is reserved, so a concurrent
    /// request with the same key sees it in flight.
    pub latency_ms: u64,
    /// Probability that a conditional update or delete meets a concurrent
    /// writer, which bumps the entity's version just before the op applies,
    /// so the client gets a real 409 with `current`.
    pub conflict_rate: f64,
    /// Force a conflict on the next N conditional updates or deletes.
    pub conflict_next: u32,
    /// Probability that a mutation request's connection is closed before its
    /// transaction commits (nothing applied, no response).
    pub drop_before_commit_rate: f64,
    /// Drop the next N mutation requests before commit.
    pub drop_before_commit_next: u32,
    /// Probability that a mutation request's connection is closed after its
    /// transaction commits (applied and stored for replay, but no response).
    pub drop_after_commit_rate: f64,
    /// Drop the next N mutation requests after commit.
    pub drop_after_commit_next: u32,
    /// Seed of the random generator; the same seed gives the same faults for
    /// the same sequence of requests.
    pub seed: Option<u64>,
}

/// A `Retry-After` value and the form it is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetryAfter {
    /// Delay in seconds.
    pub seconds: u64,
    /// Wire form: delay-seconds or an HTTP-date `seconds` from now.
    #[serde(default)]
    pub form: RetryAfterForm,
}

/// The two wire forms of `Retry-After` (RFC 9110 §10.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterForm {
    /// `Retry-After: 3`.
    #[default]
    Seconds,
    /// `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`.
    HttpDate,
}

impl RetryAfter {
    /// The header value, with `now_millis` as the reference for the date form.
    pub fn header_value(&self, now_millis: i64) -> String {
        match self.form {
            RetryAfterForm::Seconds => self.seconds.to_string(),
            RetryAfterForm::HttpDate => {
                // HTTP dates have whole seconds: round up so the client never
                // comes back earlier than asked.
                let at_ms = now_millis.saturating_add(
                    i64::try_from(self.seconds.saturating_mul(1000)).unwrap_or(i64::MAX),
                );
                let at_secs = u64::try_from(at_ms.saturating_add(999) / 1000).unwrap_or(0);
                httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(at_secs))
            }
        }
    }
}

/// A failure to inject instead of handling a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InjectedFailure {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<RetryAfter>,
}

/// Where a mutation request loses its connection, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropPoint {
    None,
    BeforeCommit,
    AfterCommit,
}

/// The live fault settings and their random generator.
#[derive(Debug)]
pub(crate) struct FaultInjector {
    inner: Mutex<(Faults, StdRng)>,
    /// Writes made by the forced-conflict fault so far (their keys).
    conflict_writes: AtomicU64,
}

fn rng_for(faults: &Faults) -> StdRng {
    match faults.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    }
}

impl FaultInjector {
    pub(crate) fn new(faults: Faults) -> Self {
        let rng = rng_for(&faults);
        Self {
            inner: Mutex::new((faults, rng)),
            conflict_writes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Faults, StdRng)> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the settings (and reseeds the generator).
    pub(crate) fn set(&self, faults: Faults) {
        let rng = rng_for(&faults);
        *self.lock() = (faults, rng);
    }

    pub(crate) fn get(&self) -> Faults {
        self.lock().0.clone()
    }

    /// Should this request fail before anything happens?
    pub(crate) fn request_failure(&self) -> Option<InjectedFailure> {
        let mut guard = self.lock();
        let (faults, rng) = &mut *guard;
        let fire = take_next(&mut faults.fail_next) || roll(rng, faults.failure_rate);
        if !fire {
            return None;
        }
        let status = if faults.failure_statuses.is_empty() {
            503
        } else {
            faults.failure_statuses[rng.random_range(0..faults.failure_statuses.len())]
        };
        Some(InjectedFailure {
            status,
            retry_after: faults.retry_after,
        })
    }

    pub(crate) fn latency(&self) -> Duration {
        Duration::from_millis(self.lock().0.latency_ms)
    }

    /// Should this conditional op meet a concurrent writer?
    pub(crate) fn force_conflict(&self) -> bool {
        let mut guard = self.lock();
        let (faults, rng) = &mut *guard;
        take_next(&mut faults.conflict_next) || roll(rng, faults.conflict_rate)
    }

    /// Where (if anywhere) this mutation request loses its connection.
    pub(crate) fn drop_point(&self) -> DropPoint {
        let mut guard = self.lock();
        let (faults, rng) = &mut *guard;
        if take_next(&mut faults.drop_before_commit_next)
            || roll(rng, faults.drop_before_commit_rate)
        {
            DropPoint::BeforeCommit
        } else if take_next(&mut faults.drop_after_commit_next)
            || roll(rng, faults.drop_after_commit_rate)
        {
            DropPoint::AfterCommit
        } else {
            DropPoint::None
        }
    }
}

/// The forced-conflict fault, as the store sees it: a concurrent writer
/// bumps the entity of a conditional op just before it is decided, so the
/// client gets a real 409 with `current`.
impl StoreHooks for FaultInjector {
    fn concurrent_write(&self, _input: &MutationInput) -> bool {
        self.force_conflict()
    }

    /// `fault:conflict:N`, N counting this server instance's such writes
    /// (not a client's key; unique per instance only).
    fn concurrent_write_key(&self) -> String {
        let n = self.conflict_writes.fetch_add(1, Ordering::Relaxed);
        format!("fault:conflict:{n}")
    }
}

fn take_next(counter: &mut u32) -> bool {
    if *counter > 0 {
        *counter -= 1;
        true
    } else {
        false
    }
}

fn roll(rng: &mut StdRng, rate: f64) -> bool {
    rate > 0.0 && rng.random::<f64>() < rate
}

/// Why a [`Faults`] value was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultsError {
    /// A rate is outside 0..=1.
    #[error("{name} must be between 0 and 1, got {value}")]
    Rate {
        /// The field.
        name: &'static str,
        /// The value given.
        value: f64,
    },
    /// A failure status other than 500, 502, 503 or 429.
    #[error("failure status {0} is not one of 500, 502, 503, 429")]
    Status(u16),
}

impl Faults {
    /// Checks rates and statuses.
    pub fn validate(&self) -> Result<(), FaultsError> {
        for (name, value) in [
            ("failure_rate", self.failure_rate),
            ("conflict_rate", self.conflict_rate),
            ("drop_before_commit_rate", self.drop_before_commit_rate),
            ("drop_after_commit_rate", self.drop_after_commit_rate),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(FaultsError::Rate { name, value });
            }
        }
        if let Some(s) = self
            .failure_statuses
            .iter()
            .find(|s| !matches!(s, 500 | 502 | 503 | 429))
        {
            return Err(FaultsError::Status(*s));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_counters_fire_exactly_n_times() {
        let f = FaultInjector::new(Faults {
            fail_next: 2,
            drop_after_commit_next: 1,
            ..Faults::default()
        });
        assert!(f.request_failure().is_some());
        assert!(f.request_failure().is_some());
        assert!(f.request_failure().is_none());
        assert_eq!(f.drop_point(), DropPoint::AfterCommit);
        assert_eq!(f.drop_point(), DropPoint::None);
    }

    #[test]
    fn forced_conflicts_name_their_writes_in_order() {
        let f = FaultInjector::new(Faults {
            conflict_next: 1,
            ..Faults::default()
        });
        assert_eq!(f.concurrent_write_key(), "fault:conflict:0");
        assert_eq!(f.concurrent_write_key(), "fault:conflict:1");
    }

    #[test]
    fn seeded_faults_repeat() {
        let faults = Faults {
            failure_rate: 0.5,
            failure_statuses: vec![500, 502, 503, 429],
            seed: Some(7),
            ..Faults::default()
        };
        let a = FaultInjector::new(faults.clone());
        let b = FaultInjector::new(faults);
        let run = |f: &FaultInjector| (0..64).map(|_| f.request_failure()).collect::<Vec<_>>();
        assert_eq!(run(&a), run(&b));
    }

    #[test]
    fn retry_after_forms() {
        let s = RetryAfter {
            seconds: 3,
            form: RetryAfterForm::Seconds,
        };
        assert_eq!(s.header_value(0), "3");
        let d = RetryAfter {
            seconds: 3,
            form: RetryAfterForm::HttpDate,
        };
        assert_eq!(d.header_value(500), "Thu, 01 Jan 1970 00:00:04 GMT");
    }

    #[test]
    fn validation() {
        assert!(Faults::default().validate().is_ok());
        let bad = Faults {
            failure_rate: 1.5,
            ..Faults::default()
        };
        assert!(bad.validate().is_err());
        let bad = Faults {
            failure_statuses: vec![404],
            ..Faults::default()
        };
        assert!(bad.validate().is_err());
    }
}
