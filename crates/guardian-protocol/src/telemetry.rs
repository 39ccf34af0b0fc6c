//! `POST /v1/telemetry`: a device's compact sync-health snapshot.
//!
//! Counts, states and timings only: a snapshot never carries an op's payload
//! or an entity's data. Its size is bounded by [`TelemetrySnapshot::validate`]
//! (the server refuses a larger one with 400), so a misbehaving device cannot
//! grow the backend's memory.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest runner id.
pub const MAX_RUNNER_ID: usize = 128;
/// Most labels per snapshot.
pub const MAX_LABELS: usize = 16;
/// Longest label key.
pub const MAX_LABEL_KEY: usize = 64;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 128;
/// Most dead-letter reasons per snapshot.
pub const MAX_REASONS: usize = 5;
/// Longest dead-letter reason (characters).
pub const MAX_REASON: usize = 200;

/// Ops in the outbox by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueDepth {
    /// Waiting to be sent.
    pub pending: u64,
    /// Claimed by the runner.
    pub in_flight: u64,
    /// In the dead-letter list.
    pub failed: u64,
}

impl QueueDepth {
    /// Ops still to be sent (pending and in flight); a device reports any
    /// counts it likes, so the sum saturates.
    pub fn queued(&self) -> u64 {
        self.pending.saturating_add(self.in_flight)
    }
}

/// The circuit breaker's state, as the device saw it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BreakerStateName {
    /// Requests flow.
    #[default]
    Closed,
    /// Requests are held back.
    Open,
    /// One trial request is allowed.
    HalfOpen,
}

impl BreakerStateName {
    /// The wire name (`closed`, `open`, `half_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Body of `POST /v1/telemetry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TelemetrySnapshot {
    /// The runner's id (its processing-lock owner id), unique per device.
    pub runner_id: String,
    /// Labels the app gives (app name, version, platform...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When the snapshot was taken, device wall clock, Unix ms.
    pub at: i64,
    /// Increases with each snapshot of one runner (restarts from 1).
    pub seq: u64,
    /// Ops by state.
    pub queue: QueueDepth,
    /// Age of the oldest pending or in-flight op, ms.
    #[serde(default)]
    pub oldest_pending_age_ms: Option<u64>,
    /// The latest dead-letter reasons, newest last, at most [`MAX_REASONS`].
    #[serde(default)]
    pub last_failures: Vec<String>,
    /// Breaker state.
    pub breaker: BreakerStateName,
    /// Network health score, 0-100.
    pub health_score: u8,
    /// Median request latency since start, ms (`None` before any request).
    #[serde(default)]
    pub latency_p50_ms: Option<f64>,
    /// 95th percentile request latency since start, ms.
    #[serde(default)]
    pub latency_p95_ms: Option<f64>,
    /// Ops acknowledged since the runner started.
    pub succeeded: u64,
    /// Ops that failed permanently since the runner started.
    pub failed: u64,
    /// Conflicts reconciled since the runner started.
    pub conflicts: u64,
    /// Breaker trips since the runner started.
    pub breaker_trips: u64,
    /// Time of the last acknowledged op, device wall clock, Unix ms.
    #[serde(default)]
    pub last_sync_at: Option<i64>,
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The runner id is empty or too long.
    #[error("runner_id must be 1 to {MAX_RUNNER_ID} bytes of printable ASCII")]
    RunnerId,
    /// Too many labels, or one too long.
    #[error("at most {MAX_LABELS} labels, keys up to {MAX_LABEL_KEY} bytes, values up to {MAX_LABEL_VALUE} bytes")]
    Labels,
    /// Too many reasons, or one too long.
    #[error("at most {MAX_REASONS} last_failures of up to {MAX_REASON} characters")]
    Reasons,
    /// A latency is negative or not finite.
    #[error("latencies must be finite and non-negative")]
    Latency,
    /// The health score is above 100.
    #[error("health_score must be 0 to 100")]
    Health,
}

impl TelemetrySnapshot {
    /// Checks the bounds documented on the fields.
    pub fn validate(&self) -> Result<(), TelemetryError> {
        let id = &self.runner_id;
        if id.is_empty() || id.len() > MAX_RUNNER_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TelemetryError::RunnerId);
        }
        if self.labels.len() > MAX_LABELS
            || self
                .labels
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > MAX_LABEL_KEY || v.len() > MAX_LABEL_VALUE)
        {
            return Err(TelemetryError::Labels);
        }
        if self.last_failures.len() > MAX_REASONS
            || self
                .last_failures
                .iter()
                .any(|r| r.chars().count() > MAX_REASON)
        {
            return Err(TelemetryError::Reasons);
        }
        let bad = |l: Option<f64>| l.is_some_and(|v| !v.is_finite() || v < 0.0);
        if bad(self.latency_p50_ms) || bad(self.latency_p95_ms) {
            return Err(TelemetryError::Latency);
        }
        if self.health_score > 100 {
            return Err(TelemetryError::Health);
        }
        Ok(())
    }
}

/// Cuts `reason` to at most [`MAX_REASON`] characters (on a char boundary).
pub fn truncate_reason(reason: &str) -> String {
    match reason.char_indices().nth(MAX_REASON) {
        Some((i, _)) => reason[..i].to_owned(),
        None => reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> TelemetrySnapshot {
        TelemetrySnapshot {
            runner_id: "phone-1".into(),
            labels: BTreeMap::from([("app".into(), "demo".into())]),
            at: 1,
            seq: 1,
            queue: QueueDepth::default(),
            oldest_pending_age_ms: None,
            last_failures: vec![],
            breaker: BreakerStateName::Closed,
            health_score: 100,
            latency_p50_ms: Some(1.5),
            latency_p95_ms: None,
            succeeded: 0,
            failed: 0,
            conflicts: 0,
            breaker_trips: 0,
            last_sync_at: None,
        }
    }

    #[test]
    fn bounds_are_enforced() {
        assert_eq!(sample().validate(), Ok(()));
        let mut s = sample();
        s.runner_id = "a b".into();
        assert_eq!(s.validate(), Err(TelemetryError::RunnerId));
        let mut s = sample();
        s.runner_id = "x".repeat(MAX_RUNNER_ID + 1);
        assert_eq!(s.validate(), Err(TelemetryError::RunnerId));
        let mut s = sample();
        s.labels = (0..=MAX_LABELS)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert_eq!(s.validate(), Err(TelemetryError::Labels));
        let mut s = sample();
        s.last_failures = vec!["é".repeat(MAX_REASON)];
        assert_eq!(s.validate(), Ok(()));
        s.last_failures = vec!["é".repeat(MAX_REASON + 1)];
        assert_eq!(s.validate(), Err(TelemetryError::Reasons));
        let mut s = sample();
        s.latency_p95_ms = Some(f64::NAN);
        assert_eq!(s.validate(), Err(TelemetryError::Latency));
        let mut s = sample();
        s.health_score = 101;
        assert_eq!(s.validate(), Err(TelemetryError::Health));
    }

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate_reason("abc"), "abc");
        let long = "é".repeat(MAX_REASON + 10);
        assert_eq!(truncate_reason(&long).chars().count(), MAX_REASON);
    }
}
