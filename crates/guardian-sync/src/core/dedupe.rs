//! Exactly-once, in-order delivery by cursor (sans-IO).
//!
//! The feed's cursors increase by one per change with no gaps (DESIGN §10).
//! Whatever path a change arrives on (WebSocket backlog, live frame, a poll
//! page) it is delivered only if its cursor is above the last delivered one,
//! so the overlap after a WebSocket ↔ polling switch is dropped here.

/// What to do with an arriving change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The next change: deliver it.
    Deliver,
    /// Deliver it, but changes between the last delivered cursor and this one
    /// never arrived: a server bug, worth a warning.
    DeliverAfterGap {
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

    /// Judges a change with `cursor`; a delivered one becomes the new last.
    pub(super) fn accept(&mut self, cursor: u64) -> Verdict {
        let verdict = match self.last {
            Some(last) if cursor <= last => return Verdict::Duplicate,
            Some(last) if cursor != last.saturating_add(1) => Verdict::DeliverAfterGap {
                expected: last.saturating_add(1),
            },
            _ => Verdict::Deliver,
        };
        self.last = Some(cursor);
        verdict
    }

    /// Sets the baseline without a change (a `hello` on first connect, or a
    /// resync, which may move it backwards).
    pub(super) fn reset(&mut self, cursor: u64) {
        self.last = Some(cursor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_replays_and_keeps_order() {
        let mut d = Dedupe::new(Some(3));
        assert_eq!(d.accept(2), Verdict::Duplicate);
        assert_eq!(d.accept(3), Verdict::Duplicate);
        assert_eq!(d.accept(4), Verdict::Deliver);
        assert_eq!(d.accept(4), Verdict::Duplicate);
        assert_eq!(d.accept(6), Verdict::DeliverAfterGap { expected: 5 });
        assert_eq!(d.accept(5), Verdict::Duplicate);
        assert_eq!(d.last(), Some(6));
    }

    #[test]
    fn no_baseline_takes_the_first_and_reset_moves_back() {
        let mut d = Dedupe::new(None);
        assert_eq!(d.accept(10), Verdict::Deliver);
        d.reset(2);
        assert_eq!(d.accept(3), Verdict::Deliver);
    }
}
