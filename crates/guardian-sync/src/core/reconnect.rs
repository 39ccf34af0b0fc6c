//! When to try the WebSocket again (sans-IO).
//!
//! The first `max_attempts` failed connections back off exponentially with
//! full jitter ([`RetryPolicy::next_delay`], the same schedule the outbox
//! uses); after that the service never gives up but *probes* at a slow fixed
//! interval, and keeps polling the feed meanwhile. A session that was of
//! use resets the schedule ([`FeedCommand::ResetBackoff`]); one that broke
//! the protocol before delivering anything does not.
//!
//! [`FeedCommand::ResetBackoff`]: crate::core::feed::FeedCommand::ResetBackoff

use std::time::Duration;

use rand::Rng;

use crate::retry::RetryPolicy;

/// Which part of the schedule a delay came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Exponential backoff, retry number `n` (0-based).
    Backoff(u32),
    /// Attempts exhausted: slow probes.
    Probe,
}

/// Reconnect schedule state.
#[derive(Debug, Clone)]
pub(crate) struct Reconnect {
    policy: RetryPolicy,
    max_attempts: u32,
    probe_interval: Duration,
    failures: u32,
}

impl Reconnect {
    pub(crate) fn new(policy: RetryPolicy, max_attempts: u32, probe_interval: Duration) -> Self {
        Self {
            policy,
            max_attempts,
            probe_interval,
            failures: 0,
        }
    }

    /// A connection was established: the next loss starts from the first delay.
    pub(crate) fn connected(&mut self) {
        self.failures = 0;
    }

    /// The delay before the next attempt, after a loss or a failed attempt.
    pub(crate) fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> (Duration, Phase) {
        let n = self.failures;
        self.failures = self.failures.saturating_add(1);
        if n < self.max_attempts {
            (self.policy.next_delay(n, rng), Phase::Backoff(n))
        } else {
            (self.probe_interval, Phase::Probe)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn schedule() -> Reconnect {
        let policy = RetryPolicy::new(
            Duration::from_millis(100),
            2.0,
            Duration::from_secs(1),
            u32::MAX,
            Duration::ZERO,
        )
        .unwrap();
        Reconnect::new(policy, 4, Duration::from_secs(60))
    }

    #[test]
    fn backs_off_within_ceiling_then_probes_forever() {
        let mut r = schedule();
        let mut rng = StdRng::seed_from_u64(7);
        for n in 0..4 {
            let (d, phase) = r.next_delay(&mut rng);
            assert_eq!(phase, Phase::Backoff(n));
            assert!(d <= Duration::from_millis(100 << n).min(Duration::from_secs(1)));
        }
        for _ in 0..100 {
            assert_eq!(
                r.next_delay(&mut rng),
                (Duration::from_secs(60), Phase::Probe)
            );
        }
    }

    #[test]
    fn a_connection_resets_the_schedule() {
        let mut r = schedule();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..10 {
            r.next_delay(&mut rng);
        }
        r.connected();
        assert_eq!(r.next_delay(&mut rng).1, Phase::Backoff(0));
    }
}
