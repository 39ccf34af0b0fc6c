//! Injected time.
//!
//! Everything that decides by time (backoff, breaker, lock staleness, op
//! scheduling) reads it from a [`Clock`], so tests drive time by hand with a
//! [`ManualClock`] instead of sleeping.
//!
//! Two readings exist on purpose. *Wall time* (Unix milliseconds) is stored on
//! disk and exchanged with servers (`next_attempt_at`, HTTP dates); it can jump.
//! *Monotonic time* never goes backwards and is only meaningful inside one
//! process; lock staleness and breaker windows use it, so a wall-clock jump
//! causes no false takeover and no premature half-open.

use std::fmt::Debug;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of wall and monotonic time.
pub trait Clock: Send + Sync + Debug {
    /// Wall-clock time in milliseconds since the Unix epoch (may jump).
    fn now_millis(&self) -> i64;
    /// Monotonic time since an arbitrary origin fixed for this clock's life.
    fn monotonic(&self) -> Duration;
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clocks.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A system clock whose monotonic origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// A system clock as a [`SharedClock`].
    pub fn shared() -> SharedClock {
        Arc::new(Self::new())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now_millis(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            // A clock set before 1970: report negative millis rather than panic.
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that only moves when told to; for tests.
///
/// Wall and monotonic time advance together with [`ManualClock::advance`];
/// [`ManualClock::jump_wall`] moves only the wall clock, as an NTP step or a
/// user changing the time would.
#[derive(Debug, Default)]
pub struct ManualClock {
    wall_millis: AtomicI64,
    mono_nanos: AtomicU64,
}

impl ManualClock {
    /// A manual clock at the given wall time (Unix ms), monotonic zero.
    pub fn new(wall_millis: i64) -> Arc<Self> {
        Arc::new(Self {
            wall_millis: AtomicI64::new(wall_millis),
            mono_nanos: AtomicU64::new(0),
        })
    }

    /// Moves both clocks forward.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.wall_millis.fetch_add(ms, Ordering::SeqCst);
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.mono_nanos.fetch_add(ns, Ordering::SeqCst);
    }

    /// Moves only the wall clock, forwards or backwards.
    pub fn jump_wall(&self, by_millis: i64) {
        self.wall_millis.fetch_add(by_millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> i64 {
        self.wall_millis.load(Ordering::SeqCst)
    }

    fn monotonic(&self) -> Duration {
        Duration::from_nanos(self.mono_nanos.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_millis(), 1_000);
        clock.advance(Duration::from_millis(250));
        assert_eq!(clock.now_millis(), 1_250);
        assert_eq!(clock.monotonic(), Duration::from_millis(250));
        clock.jump_wall(-10_000);
        assert_eq!(clock.now_millis(), -8_750);
        assert_eq!(clock.monotonic(), Duration::from_millis(250));
    }

    #[test]
    fn system_clock_is_monotonic() {
        let clock = SystemClock::new();
        let a = clock.monotonic();
        let b = clock.monotonic();
        assert!(b >= a);
        assert!(clock.now_millis() > 1_600_000_000_000);
    }
}
