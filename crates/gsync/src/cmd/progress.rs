//! The progress line of `gsync run` on a terminal.
//!
//! [`Progress`] is plain state fed by engine events and by what a ticker
//! samples from the engine (breaker cooldown, token refused, next due op);
//! [`Progress::line`] renders it for a given instant, so the countdown, the
//! rate and the ETA are tested without a terminal or a clock. All instants
//! are durations since the run started, on one monotonic timeline.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Width of the bar itself, in characters.
const BAR: usize = 24;
/// The rate is measured over this much recent time.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Failure reasons shown by name; the rest are counted as "other".
const REASONS_SHOWN: usize = 3;

/// Why the runner is not sending right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// Sending (or nothing to say).
    No,
    /// The circuit breaker is open until this instant.
    Breaker { until: Duration },
    /// The next op is due at this instant (backoff or Retry-After).
    Backoff { until: Duration },
    /// The server refused the token.
    Auth,
}

/// What the progress line shows.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    total: u64,
    succeeded: u64,
    failed: u64,
    /// Failed attempts (retried or final) by short reason.
    failures: BTreeMap<String, u64>,
    /// (instant, ops done) samples for the rate, oldest first.
    samples: VecDeque<(Duration, u64)>,
    waiting: Waiting,
}

impl Progress {
    /// A line for `total` ops to send.
    pub(crate) fn new(total: u64) -> Self {
        Self {
            total,
            succeeded: 0,
            failed: 0,
            failures: BTreeMap::new(),
            samples: VecDeque::new(),
            waiting: Waiting::No,
        }
    }

    /// An op was applied.
    pub(crate) fn succeeded(&mut self) {
        self.succeeded += 1;
    }

    /// An op failed for good.
    pub(crate) fn failed(&mut self, reason: &str) {
        self.failed += 1;
        self.attempt_failed(reason);
    }

    /// An attempt failed and will be retried.
    pub(crate) fn attempt_failed(&mut self, reason: &str) {
        *self.failures.entry(short_reason(reason)).or_insert(0) += 1;
    }

    /// What the runner waits for, as sampled at a tick.
    pub(crate) fn set_waiting(&mut self, waiting: Waiting) {
        self.waiting = waiting;
    }

    fn done(&self) -> u64 {
        self.succeeded + self.failed
    }

    /// Records how far the run is at `now` (called on every tick), keeping
    /// the samples of the rate window and the last one before it (so that a
    /// run idle for a whole window measures 0 ops/s, not nothing).
    pub(crate) fn sample(&mut self, now: Duration) {
        self.samples.push_back((now, self.done()));
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| now.saturating_sub(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Ops per second over the rate window, once there is a span to measure.
    fn rate(&self, now: Duration) -> Option<f64> {
        let (t0, d0) = *self.samples.front()?;
        let span = now.saturating_sub(t0).as_secs_f64();
        if span < 0.5 {
            return None;
        }
        Some(self.done().saturating_sub(d0) as f64 / span)
    }

    /// The line at `now`.
    pub(crate) fn line(&self, now: Duration) -> String {
        let done = self.done().min(self.total);
        // An empty run is complete.
        let filled = done
            .saturating_mul(BAR as u64)
            .checked_div(self.total)
            .map_or(BAR, |f| usize::try_from(f).unwrap_or(BAR));
        let mut line = format!(
            "[{}] [{}{}] {}/{}",
            clock(now),
            "#".repeat(filled),
            "-".repeat(BAR - filled.min(BAR)),
            done,
            self.total
        );
        let left = self.total.saturating_sub(done);
        match self.rate(now) {
            Some(rate) if rate > 0.0 => {
                line.push_str(&format!("  {rate:.1} ops/s"));
                if left > 0 {
                    let eta = Duration::from_secs_f64((left as f64 / rate).min(1e7));
                    line.push_str(&format!("  ETA {}", short(eta)));
                }
            }
            Some(_) => line.push_str("  0 ops/s"),
            None => {}
        }
        match self.waiting {
            Waiting::No => {}
            Waiting::Breaker { until } => line.push_str(&format!(
                "  | breaker open, trial in {}",
                short(until.saturating_sub(now))
            )),
            Waiting::Backoff { until } => line.push_str(&format!(
                "  | backoff, next attempt in {}",
                short(until.saturating_sub(now))
            )),
            Waiting::Auth => line.push_str("  | token refused, ops stay queued"),
        }
        let failures: u64 = self.failures.values().sum();
        if failures > 0 {
            let mut by_count: Vec<(&String, &u64)> = self.failures.iter().collect();
            by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let mut parts: Vec<String> = by_count
                .iter()
                .take(REASONS_SHOWN)
                .map(|(reason, n)| format!("{reason} x{n}"))
                .collect();
            let other: u64 = by_count.iter().skip(REASONS_SHOWN).map(|(_, n)| **n).sum();
            if other > 0 {
                parts.push(format!("other x{other}"));
            }
            line.push_str(&format!(
                "  | {failures} failed attempt{}: {}",
                if failures == 1 { "" } else { "s" },
                parts.join(", ")
            ));
        }
        if self.failed > 0 {
            line.push_str(&format!("  | {} op(s) failed for good", self.failed));
        }
        line
    }
}

/// A failure reason short enough for the line: its last cause, which is the
/// specific one ("Connection refused (os error 111)", "server answered 503").
/// A refusal keeps its status ("404: not found").
pub(crate) fn short_reason(reason: &str) -> String {
    if reason.starts_with("timed out") {
        return "timed out".to_owned();
    }
    let reason = super::out::flat(reason);
    let reason = reason.as_str();
    let last = reason.rsplit(": ").next().unwrap_or(reason).trim();
    let status = reason
        .split_whitespace()
        .next()
        .filter(|w| w.len() == 3 && w.bytes().all(|b| b.is_ascii_digit()))
        .filter(|w| !last.contains(*w));
    let last = match status {
        Some(status) => format!("{status}: {last}"),
        None => last.to_owned(),
    };
    let mut out: String = last.chars().take(40).collect();
    if last.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// `[hh:mm:ss]` of the elapsed time.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// A countdown: whole seconds, rounded up so it reaches 0 only when due.
fn short(d: Duration) -> String {
    let secs = d.as_millis().div_ceil(1000);
    let secs = u64::try_from(secs).unwrap_or(u64::MAX);
    if secs >= 3600 {
        format!("{}h {:02}m", secs / 3600, secs / 60 % 60)
    } else if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn the_countdown_moves_with_time_alone() {
        let mut p = Progress::new(3000);
        for _ in 0..65 {
            p.succeeded();
        }
        p.set_waiting(Waiting::Breaker { until: s(70) });
        let at_10 = p.line(s(10));
        let at_11 = p.line(s(11));
        assert!(at_10.contains("breaker open, trial in 1m 00s"), "{at_10}");
        assert!(at_11.contains("breaker open, trial in 59s"), "{at_11}");
        assert!(at_10.starts_with("[00:00:10]"), "{at_10}");
        assert!(at_11.starts_with("[00:00:11]"), "{at_11}");
        assert!(at_10.contains("65/3000"), "{at_10}");
        // Past the cooldown the countdown stays at zero until a tick says
        // otherwise.
        assert!(p.line(s(80)).contains("trial in 0s"));
    }

    #[test]
    fn rate_and_eta_come_from_the_recent_window() {
        let mut p = Progress::new(100);
        p.sample(s(0));
        for _ in 0..20 {
            p.succeeded();
        }
        p.sample(s(4));
        let line = p.line(s(4));
        // 20 ops in 4 s: 5 ops/s, 80 left: 16 s.
        assert!(line.contains("5.0 ops/s"), "{line}");
        assert!(line.contains("ETA 16s"), "{line}");
        assert!(line.contains("[####----"), "{line}");
        // Samples older than the window are dropped: after 20 idle seconds
        // the rate is 0 and no ETA is promised.
        p.sample(s(24));
        let idle = p.line(s(24));
        assert!(idle.contains("0 ops/s"), "{idle}");
        assert!(!idle.contains("ETA"), "{idle}");
    }

    #[test]
    fn failures_are_counted_by_reason() {
        let mut p = Progress::new(10);
        for _ in 0..3 {
            p.attempt_failed("server answered 503");
        }
        p.attempt_failed(
            "error sending request for url (http://127.0.0.1:1/v1/x): client error (Connect): \
             tcp connect error: Connection refused (os error 111)",
        );
        p.failed("404 about:blank: not found");
        let line = p.line(s(1));
        assert!(
            line.contains(
                "5 failed attempts: server answered 503 x3, 404: not found x1, \
                 Connection refused (os error 111) x1"
            ),
            "{line}"
        );
        assert!(line.contains("1 op(s) failed for good"), "{line}");
    }

    #[test]
    fn backoff_and_auth_say_why_nothing_is_sent() {
        let mut p = Progress::new(5);
        p.set_waiting(Waiting::Backoff { until: s(12) });
        assert!(p.line(s(2)).contains("backoff, next attempt in 10s"));
        p.set_waiting(Waiting::Auth);
        assert!(p.line(s(2)).contains("token refused"));
        p.set_waiting(Waiting::No);
        assert!(!p.line(s(2)).contains('|'));
    }
}
