//! The contender's staleness judgement, as a pure state machine.

use std::time::Duration;

/// What a contender read from the lock row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockView<'a> {
    /// Current holder, `None` when the lock is free.
    pub owner: Option<&'a str>,
    /// Current epoch (fencing token).
    pub epoch: u64,
    /// Current heartbeat counter.
    pub heartbeat: u64,
}

/// The contender's verdict on the lock row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// Nobody holds it: acquire (expecting this epoch and heartbeat).
    Free {
        /// Epoch seen.
        epoch: u64,
        /// Heartbeat seen.
        heartbeat: u64,
    },
    /// We hold it already (same owner id): re-acquire bumps the epoch.
    Ours {
        /// Epoch seen.
        epoch: u64,
        /// Heartbeat seen.
        heartbeat: u64,
    },
    /// Another runner holds it and is alive as far as we can tell.
    Held {
        /// How much longer its counter may stand still before we take over.
        stale_in: Duration,
    },
    /// The holder is dead or hung: take over with a compare-and-swap on
    /// exactly this epoch and heartbeat (so a beat in between wins).
    Stale {
        /// Epoch seen.
        epoch: u64,
        /// Heartbeat seen.
        heartbeat: u64,
    },
}

/// Tracks how long the holder's heartbeat counter has stood still, on the
/// contender's monotonic clock.
#[derive(Debug, Clone)]
pub struct StalenessObserver {
    stale_after: Duration,
    /// (owner, epoch, heartbeat) last seen, and when it was first seen.
    seen: Option<(String, u64, u64, Duration)>,
}

impl StalenessObserver {
    /// An observer that calls a holder stale after `stale_after` without a beat.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            stale_after,
            seen: None,
        }
    }

    /// Judges the row read at monotonic time `now`. `holder_process_dead` is
    /// true when we obtained the OS lock file, which the holder would keep
    /// while alive.
    pub fn judge(
        &mut self,
        me: &str,
        row: LockView<'_>,
        holder_process_dead: bool,
        now: Duration,
    ) -> Judgement {
        let LockView {
            owner,
            epoch,
            heartbeat,
        } = row;
        let Some(owner) = owner else {
            self.seen = None;
            return Judgement::Free { epoch, heartbeat };
        };
        if owner == me {
            self.seen = None;
            return Judgement::Ours { epoch, heartbeat };
        }
        if holder_process_dead {
            return Judgement::Stale { epoch, heartbeat };
        }
        let first_seen = match &self.seen {
            Some((o, e, h, at)) if o == owner && *e == epoch && *h == heartbeat => *at,
            // Anything moved (a beat, a new holder, a new epoch): restart the watch.
            _ => {
                self.seen = Some((owner.to_owned(), epoch, heartbeat, now));
                now
            }
        };
        let still = now.saturating_sub(first_seen);
        if still >= self.stale_after {
            Judgement::Stale { epoch, heartbeat }
        } else {
            Judgement::Held {
                stale_in: self.stale_after - still,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn row(owner: Option<&str>, epoch: u64, heartbeat: u64) -> LockView<'_> {
        LockView {
            owner,
            epoch,
            heartbeat,
        }
    }

    #[test]
    fn free_and_ours() {
        let mut o = StalenessObserver::new(S(120));
        assert_eq!(
            o.judge("me", row(None, 3, 9), false, S(0)),
            Judgement::Free {
                epoch: 3,
                heartbeat: 9
            }
        );
        assert_eq!(
            o.judge("me", row(Some("me"), 3, 9), false, S(0)),
            Judgement::Ours {
                epoch: 3,
                heartbeat: 9
            }
        );
    }

    #[test]
    fn a_beating_holder_is_never_stale() {
        let mut o = StalenessObserver::new(S(120));
        for i in 0..100 {
            let j = o.judge("me", row(Some("a"), 1, i), false, S(i * 100));
            assert!(matches!(j, Judgement::Held { .. }), "{i}: {j:?}");
        }
    }

    #[test]
    fn a_silent_holder_becomes_stale_after_the_threshold() {
        let mut o = StalenessObserver::new(S(120));
        assert_eq!(
            o.judge("me", row(Some("a"), 1, 5), false, S(1000)),
            Judgement::Held { stale_in: S(120) }
        );
        assert_eq!(
            o.judge("me", row(Some("a"), 1, 5), false, S(1119)),
            Judgement::Held { stale_in: S(1) }
        );
        assert_eq!(
            o.judge("me", row(Some("a"), 1, 5), false, S(1120)),
            Judgement::Stale {
                epoch: 1,
                heartbeat: 5
            }
        );
    }

    #[test]
    fn the_watch_restarts_when_anything_moves() {
        let mut o = StalenessObserver::new(S(10));
        o.judge("me", row(Some("a"), 1, 5), false, S(0));
        // New holder at a new epoch: not stale just because time passed.
        assert!(matches!(
            o.judge("me", row(Some("b"), 2, 0), false, S(11)),
            Judgement::Held { .. }
        ));
        assert!(matches!(
            o.judge("me", row(Some("b"), 2, 0), false, S(21)),
            Judgement::Stale { .. }
        ));
    }

    #[test]
    fn a_dead_process_is_taken_over_at_once() {
        let mut o = StalenessObserver::new(S(120));
        assert_eq!(
            o.judge("me", row(Some("a"), 4, 2), true, S(0)),
            Judgement::Stale {
                epoch: 4,
                heartbeat: 2
            }
        );
    }

    #[test]
    fn config_validation() {
        assert!(crate::lock::LockConfig::new(S(10), S(120)).is_ok());
        assert!(crate::lock::LockConfig::new(S(10), S(15)).is_err());
        assert!(crate::lock::LockConfig::new(S(0), S(15)).is_err());
    }
}
