//! Detects wall-clock steps from the drift between wall and monotonic time.
//!
//! `next_attempt_at` is stored as wall time (it must survive restarts), so a
//! step of the wall clock would stretch or shrink every stored backoff by the
//! size of the step. The runner watches `wall - monotonic`; when it moves by
//! more than a tolerance, the schedule is re-based by the same amount.

use std::time::Duration;

/// A detected step of the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ClockStep {
    /// "Now" in the old timeline (where stored times were computed).
    pub(super) old_now: i64,
    /// Signed size of the step in milliseconds (negative: back in time).
    pub(super) delta_ms: i64,
}

/// Tracks `wall - monotonic` between observations.
#[derive(Debug, Clone)]
pub(super) struct ClockWatch {
    offset: Option<i64>,
    tolerance_ms: i64,
}

impl ClockWatch {
    /// Steps smaller than `tolerance` (NTP slewing, scheduling jitter) are ignored.
    pub(super) fn new(tolerance: Duration) -> Self {
        Self {
            offset: None,
            tolerance_ms: i64::try_from(tolerance.as_millis()).unwrap_or(i64::MAX),
        }
    }

    pub(super) fn observe(&mut self, wall_ms: i64, mono: Duration) -> Option<ClockStep> {
        let mono_ms = i64::try_from(mono.as_millis()).unwrap_or(i64::MAX);
        let offset = wall_ms.saturating_sub(mono_ms);
        let previous = self.offset.replace(offset)?;
        let delta_ms = offset.saturating_sub(previous);
        (delta_ms.abs() > self.tolerance_ms).then(|| ClockStep {
            old_now: previous.saturating_add(mono_ms),
            delta_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn steady_clocks_report_nothing() {
        let mut w = ClockWatch::new(MS(1000));
        assert_eq!(w.observe(10_000, MS(0)), None);
        assert_eq!(w.observe(15_000, MS(5_000)), None);
        // Small drift is not a step.
        assert_eq!(w.observe(20_400, MS(10_000)), None);
    }

    #[test]
    fn steps_back_and_forward_are_measured_in_the_old_timeline() {
        let mut w = ClockWatch::new(MS(1000));
        w.observe(1_000_000, MS(0));
        // 10 s later the wall clock reads 2 h earlier than it should.
        let step = w.observe(1_010_000 - 7_200_000, MS(10_000)).unwrap();
        assert_eq!(
            step,
            ClockStep {
                old_now: 1_010_000,
                delta_ms: -7_200_000
            }
        );
        // The new timeline is the reference from now on.
        assert_eq!(w.observe(1_020_000 - 7_200_000, MS(20_000)), None);
        let step = w.observe(1_030_000 + 3_600_000, MS(30_000)).unwrap();
        assert_eq!(
            step,
            ClockStep {
                old_now: 1_030_000 - 7_200_000,
                delta_ms: 10_800_000
            }
        );
    }
}
