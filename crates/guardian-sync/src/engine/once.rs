//! One bounded pass over the outbox: [`SyncEngine::run_once`].
//!
//! A pass sends everything that is due, waits out backoffs, Retry-After,
//! breaker cooldowns and a busy lock only while the wait budget lasts, and
//! says why it stopped. What to do after each drain is decided by
//! [`decide`], a pure function of the pass's state, so that every way a
//! pass ends is tested without a server or a clock.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast;

use super::run::{Attempt, RunReport};
use crate::outbox::OutboxReader;

/// The least time a pass's attempt for the lock may take (waiting for an
/// outbox another connection keeps busy, or behind the outbox's own
/// writes), however little of the budget is left: another process's
/// ordinary write is over well within it, so a pass with no budget still
/// gets its one try. Timed by tokio: under paused time it runs out as soon
/// as the runtime idles, waiting for the writer thread.
pub const LOCK_ATTEMPT_MIN: Duration = Duration::from_secs(1);
use super::{EngineError, SyncEngine, SyncEvent};

/// Why a [`SyncEngine::run_once`] pass stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnceStop {
    /// No op is left pending or in flight (failed ops stay failed).
    Empty,
    /// Ops remain: the next one is due after the wait budget, or it is
    /// blocked behind a failed op of its entity.
    Remaining,
    /// The server refused the token; nothing more is sent with it.
    AuthRefused,
    /// Another runner held the processing lock for the whole wait budget,
    /// or an attempt to take it did not end within the budget (at least
    /// 1 s): another connection kept the outbox busy, or its own writes
    /// were that slow.
    LockHeld,
}

/// What a [`SyncEngine::run_once`] pass did and why it stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OnceReport {
    /// Why the pass stopped.
    pub stop: OnceStop,
    /// What was sent and how it ended; `drain.failed` counts the ops this
    /// pass moved to the failed list.
    pub run: RunReport,
    /// Ops still pending or in flight when the pass stopped.
    pub remaining: u64,
    /// When the next remaining op is due (Unix ms), if any is.
    pub next_attempt_at: Option<i64>,
    /// The last reason an attempt of this pass failed, if one did.
    pub last_error: Option<String>,
    /// The runner holding the lock, when the pass stopped for it.
    pub lock_holder: Option<String>,
    /// Time the pass spent waiting with nothing to send, in milliseconds.
    pub waited_ms: u64,
}

/// The state a pass decides from, after a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PassState {
    /// Some op is pending with a ready head, or in flight.
    pub(super) active: bool,
    /// The server refused the token.
    pub(super) auth_refused: bool,
    /// How long until the next ready op is due (zero when due now); `None`
    /// when no op will ever become due by waiting.
    pub(super) until_due: Option<Duration>,
    /// How long the circuit breaker still refuses requests.
    pub(super) breaker_cooldown: Option<Duration>,
    /// What is left of the wait budget.
    pub(super) budget_left: Duration,
}

/// What a pass does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PassNext {
    /// Stop for this reason.
    Stop(OnceStop),
    /// Sleep this long (within the budget), then drain again.
    Wait(Duration),
}

/// Decides how a pass goes on after a drain.
///
/// A wait that would end after the budget is not started at all: sleeping
/// until the budget runs out would only delay the same answer.
pub(super) fn decide(s: PassState) -> PassNext {
    if !s.active {
        return PassNext::Stop(OnceStop::Empty);
    }
    if s.auth_refused {
        return PassNext::Stop(OnceStop::AuthRefused);
    }
    let Some(until_due) = s.until_due else {
        return PassNext::Stop(OnceStop::Remaining);
    };
    let wait = s.breaker_cooldown.map_or(until_due, |c| c.max(until_due));
    if wait > s.budget_left {
        return PassNext::Stop(OnceStop::Remaining);
    }
    // Never a zero sleep: an op due "now" that the drain did not take (a
    // claim racing the clock) is retried after a millisecond, not in a spin.
    PassNext::Wait(wait.max(Duration::from_millis(1)))
}

/// Remembers the last failure reason seen on the event stream.
fn last_failure(events: &mut broadcast::Receiver<SyncEvent>, last: &mut Option<String>) {
    loop {
        match events.try_recv() {
            Ok(SyncEvent::OpRetried { reason, .. }) => *last = Some(reason),
            Ok(SyncEvent::OpFailed { error, .. }) => *last = Some(error),
            Ok(SyncEvent::AuthRequired) => *last = Some("authentication required".to_owned()),
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    }
}

impl SyncEngine {
    /// Makes one bounded pass: sends everything that is due, waits for ops
    /// in backoff (and for the breaker's cooldown, or a busy lock) only
    /// while `max_wait` lasts, and reports why it stopped.
    ///
    /// `max_wait` bounds the time spent waiting with nothing to send,
    /// measured on the engine's clock; sending is never cut short. A wait
    /// that would outlast what is left of it is not started; an attempt for
    /// the lock on a busy outbox is given up when the budget runs out, but
    /// not before 1 s. The pass stops at once when the server refuses the
    /// token. Unlike
    /// [`run_until_empty`](Self::run_until_empty) it never waits forever.
    pub async fn run_once(&self, max_wait: Duration) -> Result<OnceReport, EngineError> {
        let inner = &self.inner;
        let mut events = inner.events.subscribe();
        let mut report = RunReport::default();
        let mut waited = Duration::ZERO;
        let mut lock = self.new_lock();
        let session = loop {
            // An attempt on a busy outbox gives up when the budget runs
            // out, but never sooner than LOCK_ATTEMPT_MIN after it began.
            let limit = max_wait.saturating_sub(waited).max(LOCK_ATTEMPT_MIN);
            let began = inner.clock.monotonic();
            let attempt = self
                .try_session_until(lock, &mut report, tokio::time::sleep(limit))
                .await?;
            waited += inner.clock.monotonic().saturating_sub(began);
            let (l, retry_in) = match attempt {
                // The budget ran out as a write of the attempt took the
                // lock: the pass goes on with it.
                Attempt::Held(session) | Attempt::Stopped(Some(session)) => break session,
                Attempt::Stopped(None) => return self.lock_held(report, waited).await,
                Attempt::Busy(l, retry_in) => (l, retry_in),
            };
            let left = max_wait.saturating_sub(waited);
            if left.is_zero() {
                return self.lock_held(report, waited).await;
            }
            lock = *l;
            waited += self.sleep(retry_in.min(left)).await;
        };
        let mut last_error = None;
        let result = self
            .pass(
                &session,
                max_wait,
                &mut waited,
                &mut report,
                &mut events,
                &mut last_error,
            )
            .await;
        if !session.lost() {
            session.release().await;
        }
        last_failure(&mut events, &mut last_error);
        let stop = result?;
        // Counting is O(queue), once per pass: it tells "empty" from ops
        // left behind a failed op of their entity, which are not active.
        let stats = inner.outbox.stats().await?;
        let remaining = stats.pending + stats.in_flight;
        let stop = if stop == OnceStop::Empty && remaining > 0 {
            OnceStop::Remaining
        } else {
            stop
        };
        Ok(OnceReport {
            stop,
            run: report,
            remaining,
            next_attempt_at: stats.next_attempt_at.filter(|_| remaining > 0),
            last_error,
            lock_holder: None,
            waited_ms: millis(waited),
        })
    }

    /// The report of a pass that never held the lock. Read through a
    /// read-only view, which never waits for another connection's write:
    /// the outbox's own connection would wait for a busy database again.
    async fn lock_held(&self, run: RunReport, waited: Duration) -> Result<OnceReport, EngineError> {
        let path = self.inner.outbox.path().to_path_buf();
        let viewed = tokio::task::spawn_blocking(move || {
            let view = OutboxReader::open(&path)
                .map_err(|e| tracing::warn!("no read-only view for the report: {e}"))
                .ok()?;
            Some((view.lock_read(), view.stats()))
        })
        .await
        .unwrap_or_else(|e| {
            tracing::warn!("the report's read-only view failed: {e}");
            None
        });
        let (row, stats) = match viewed {
            Some((row, stats)) => (row?, stats?),
            // No view (the path was moved away, say): through the outbox.
            None => (
                self.inner.outbox.lock_read().await?,
                self.inner.outbox.stats().await?,
            ),
        };
        Ok(OnceReport {
            stop: OnceStop::LockHeld,
            run,
            remaining: stats.pending + stats.in_flight,
            next_attempt_at: stats.next_attempt_at,
            last_error: None,
            lock_holder: row.map(|row| row.owner).filter(|owner| !owner.is_empty()),
            waited_ms: millis(waited),
        })
    }

    async fn pass(
        &self,
        session: &super::run::Session,
        max_wait: Duration,
        waited: &mut Duration,
        report: &mut RunReport,
        events: &mut broadcast::Receiver<SyncEvent>,
        last_error: &mut Option<String>,
    ) -> Result<OnceStop, EngineError> {
        let inner = &self.inner;
        loop {
            let drained = self.drain_ready(session).await?;
            report.drain.add(&drained);
            let due = inner.outbox.next_due().await?;
            let now = inner.clock.now_millis();
            let state = PassState {
                active: due.active,
                auth_refused: inner.auth_paused.load(std::sync::atomic::Ordering::SeqCst),
                until_due: due.next_attempt_at.map(|at| {
                    Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0))
                }),
                breaker_cooldown: inner.breaker().cooldown_remaining(inner.clock.monotonic()),
                budget_left: max_wait.saturating_sub(*waited),
            };
            match decide(state) {
                PassNext::Stop(stop) => return Ok(stop),
                PassNext::Wait(d) => {
                    // Read as the pass goes, so the receiver never lags far.
                    last_failure(events, last_error);
                    *waited += tokio::select! {
                        () = inner.wake.notified() => Duration::ZERO,
                        w = self.sleep(d) => w,
                    };
                }
            }
        }
    }

    /// Sleeps `d` and returns how long that was on the engine's clock.
    async fn sleep(&self, d: Duration) -> Duration {
        let started = self.inner.clock.monotonic();
        tokio::time::sleep(d).await;
        // A manual clock may not move while tokio's timer does: count at
        // least what was asked, so the budget always runs out.
        self.inner.clock.monotonic().saturating_sub(started).max(d)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> PassState {
        PassState {
            active: true,
            auth_refused: false,
            until_due: Some(Duration::ZERO),
            breaker_cooldown: None,
            budget_left: Duration::from_secs(30),
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_empty_queue_stops_even_with_auth_refused() {
        let s = PassState {
            active: false,
            auth_refused: true,
            ..state()
        };
        assert_eq!(decide(s), PassNext::Stop(OnceStop::Empty));
    }

    #[test]
    fn a_refused_token_stops_at_once() {
        let s = PassState {
            auth_refused: true,
            ..state()
        };
        assert_eq!(decide(s), PassNext::Stop(OnceStop::AuthRefused));
    }

    #[test]
    fn a_backoff_within_the_budget_is_waited_out() {
        let s = PassState {
            until_due: Some(Duration::from_secs(3)),
            ..state()
        };
        assert_eq!(decide(s), PassNext::Wait(Duration::from_secs(3)));
        // Due now: a short pause, never a spin.
        assert_eq!(decide(state()), PassNext::Wait(MS));
    }

    #[test]
    fn a_backoff_past_the_budget_stops_without_waiting() {
        let s = PassState {
            until_due: Some(Duration::from_secs(31)),
            ..state()
        };
        assert_eq!(decide(s), PassNext::Stop(OnceStop::Remaining));
        let s = PassState {
            budget_left: Duration::ZERO,
            until_due: Some(MS),
            ..state()
        };
        assert_eq!(decide(s), PassNext::Stop(OnceStop::Remaining));
    }

    #[test]
    fn the_breaker_cooldown_counts_as_a_wait() {
        let s = PassState {
            breaker_cooldown: Some(Duration::from_secs(5)),
            until_due: Some(Duration::from_secs(1)),
            ..state()
        };
        assert_eq!(decide(s), PassNext::Wait(Duration::from_secs(5)));
        let s = PassState {
            breaker_cooldown: Some(Duration::from_secs(60)),
            ..state()
        };
        assert_eq!(decide(s), PassNext::Stop(OnceStop::Remaining));
    }

    #[test]
    fn ops_that_never_become_due_stop_the_pass() {
        // In flight elsewhere or blocked: waiting would not help.
        let s = PassState {
            until_due: None,
            ..state()
        };
        assert_eq!(decide(s), PassNext::Stop(OnceStop::Remaining));
    }
}
