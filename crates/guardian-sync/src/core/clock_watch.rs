//! Detects wall-clock steps from the drift between wall and monotonic time.
//!
//! `next_attempt_at` is stored as wall time (it must survive restarts), so a
//! step of the wall clock would stretch or shrink every stored backoff by the
//! size of the step. The runner watches `wall - monotonic`; when it moves by
//! more than a tolerance, the schedule is re-based by the same amount.

use std::time::Duration;

/// A detected step of the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockStep {
    /// "Now" in the old timeline (where stored times were computed).
    pub old_now: i64,
    /// Signed size of the step in milliseconds (negative: back in time).
    pub delta_ms: i64,
}

/// Tracks `wall - monotonic` between observations.
#[derive(Debug, Clone)]
pub struct ClockWatch {
    offset: Option<i64>,
    tolerance_ms: i64,
}

impl ClockWatch {
    /// Steps smaller than `tolerance` (NTP slewing, scheduling jitter) are ignored.
    pub fn new(tolerance: Duration) -> Self {
        Self {
            offset: None,
            tolerance_ms: i64::try_from(tolerance.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// The step since the last observation, if one was larger than the tolerance.
    pub fn observe(&mut self, wall_ms: i64, mono: Duration) -> Option<ClockStep> {
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

/// What to do to the stored schedule before a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulePlan {
    /// The wall clock stepped: move the backoffs of ops due after
    /// `rebase_after` (Unix ms) by the step.
    pub rebase: Option<(i64, ClockStep)>,
    /// Clamp stored times further ahead than the retry policy's horizon.
    pub clamp: bool,
}

/// Keeps stored backoffs their length across wall-clock steps: a step seen
/// by this runner re-bases the schedule by its size; then stored times
/// further ahead than they may wait (written by any process before a step
/// back, seen or not) are clamped, at the start of each session, after a
/// step, and at most once an interval otherwise (it reads every head in
/// backoff). Both use one reading of the clock, and the re-base goes first,
/// so no step is taken out twice.
#[derive(Debug, Clone)]
pub struct ScheduleGuard {
    watch: ClockWatch,
    /// When (monotonic) the schedule was last clamped; `None` at the start
    /// of a session.
    clamped_at: Option<Duration>,
    interval: Duration,
}

impl ScheduleGuard {
    /// Steps larger than `tolerance` re-base; clamps at most every `interval`.
    pub fn new(tolerance: Duration, interval: Duration) -> Self {
        Self {
            watch: ClockWatch::new(tolerance),
            clamped_at: None,
            interval,
        }
    }

    /// A new lock session: ops written while another process held the lock
    /// may lie ahead of this clock, so the next plan clamps.
    pub fn new_session(&mut self) {
        self.clamped_at = None;
    }

    /// What to do now, the clocks reading `now_ms` and `mono`.
    pub fn plan(&mut self, now_ms: i64, mono: Duration) -> SchedulePlan {
        if crate::core::mutant::active(crate::core::mutant::Mutant::ParkOnFutureClock) {
            return SchedulePlan {
                rebase: None,
                clamp: false,
            };
        }
        let step = self.watch.observe(now_ms, mono);
        let clamp = step.is_some()
            || self
                .clamped_at
                .is_none_or(|at| mono.saturating_sub(at) >= self.interval);
        if clamp {
            self.clamped_at = Some(mono);
        }
        SchedulePlan {
            // Ops not yet due in the old timeline move by the step. After a
            // step back, ops that were already due would look due far in the
            // future: they move too (anything due after the new "now").
            rebase: step.map(|step| (step.old_now.saturating_add(step.delta_ms.min(0)), step)),
            clamp,
        }
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
