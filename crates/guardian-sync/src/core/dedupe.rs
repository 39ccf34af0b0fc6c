//! Exactly-once, in-order delivery by cursor (sans-IO).
//!
//! The feed's cursors increase by one per change with no gaps (DESIGN §10).
//! Whatever path a change arrives on (WebSocket backlog, live frame, a poll
//! page) it is delivered only if its cursor is above the last delivered one,
//! so the overlap after a WebSocket ↔ polling switch is dropped here. Judging
//! never moves the cursor: what to do with a change that skips ahead is the
//! feed machine's decision, and only what it delivers is recorded.

/// What an arriving change is, relative to the last delivered cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The next change (or the first, without a baseline).
    Next,
    /// Above the next cursor: the changes from `expected` up to this one
    /// never arrived.
    Gap {
        /// The cursor that was expected.
        expected: u64,
    },
    /// Already delivered (cursor at or below the last one): drop it.
    Duplicate,
}

/// The last delivered cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Dedupe {
    last: Option<u64>,
}

impl Dedupe {
    /// Resumes after `last` (`None`: the first change is taken as is).
    pub(super) fn new(last: Option<u64>) -> Self {
        Self { last }
    }

    /// The last delivered cursor.
    pub(super) fn last(&self) -> Option<u64> {
        self.last
    }

    /// Judges a change with `cursor`, without recording it.
    pub(super) fn judge(&self, cursor: u64) -> Verdict {
        match self.last {
            Some(last) if cursor <= last => Verdict::Duplicate,
            // `cursor > last`, so `last + 1` cannot overflow.
            Some(last) if cursor != last + 1 => Verdict::Gap { expected: last + 1 },
            _ => Verdict::Next,
        }
    }

    /// Records `cursor` as the last delivered: a change, a baseline, or a
    /// resync (which may move it backwards).
    pub(super) fn record(&mut self, cursor: u64) {
        self.last = Some(cursor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_replays_and_reports_gaps_without_moving() {
        let mut d = Dedupe::new(Some(3));
        assert_eq!(d.judge(2), Verdict::Duplicate);
        assert_eq!(d.judge(3), Verdict::Duplicate);
        assert_eq!(d.judge(4), Verdict::Next);
        d.record(4);
        assert_eq!(d.judge(4), Verdict::Duplicate);
        assert_eq!(d.judge(6), Verdict::Gap { expected: 5 });
        assert_eq!(d.judge(u64::MAX), Verdict::Gap { expected: 5 });
        assert_eq!(d.last(), Some(4));
        assert_eq!(d.judge(5), Verdict::Next);
    }

    #[test]
    fn no_baseline_takes_the_first_and_record_moves_back() {
        let mut d = Dedupe::new(None);
        assert_eq!(d.judge(10), Verdict::Next);
        d.record(10);
        d.record(2);
        assert_eq!(d.judge(3), Verdict::Next);
        let top = Dedupe::new(Some(u64::MAX));
        assert_eq!(top.judge(u64::MAX), Verdict::Duplicate);
    }
}
