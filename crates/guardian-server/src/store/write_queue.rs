//! The SQLite store's queue of mutation requests waiting for its writer:
//! a queue per tenant, served in turn. One FIFO let a tenant that kept
//! hundreds of 1000-op batches queued delay every other tenant's single
//! write by seconds (past the request timeout on a large database); now
//! another tenant's request waits for at most one group per tenant ahead
//! of it. Each tenant's requests keep their order, so its feed and
//! per-entity order are unchanged; tenants share nothing that is ordered.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What the queue needs of a request.
pub(super) trait Queued {
    /// The tenant it writes for.
    fn tenant(&self) -> &Arc<str>;
    /// How many ops it carries.
    fn ops(&self) -> usize;
}

/// Requests waiting for the writer, and whether a writer is running (at
/// most one: it drains the queue, then stops).
#[derive(Debug)]
pub(super) struct WriteQueue<J> {
    /// Each tenant's waiting requests, oldest first; never empty.
    waiting: HashMap<Arc<str>, VecDeque<J>>,
    /// The tenants with waiting requests, in the order they are served.
    turn: VecDeque<Arc<str>>,
    pub(super) writer_active: bool,
}

impl<J> Default for WriteQueue<J> {
    fn default() -> Self {
        Self {
            waiting: HashMap::new(),
            turn: VecDeque::new(),
            writer_active: false,
        }
    }
}

impl<J: Queued> WriteQueue<J> {
    /// Queues a request behind its tenant's others.
    pub(super) fn push(&mut self, job: J) {
        if let Some(jobs) = self.waiting.get_mut(job.tenant()) {
            jobs.push_back(job);
            return;
        }
        let tenant = Arc::clone(job.tenant());
        self.turn.push_back(Arc::clone(&tenant));
        self.waiting.insert(tenant, VecDeque::from([job]));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.turn.is_empty()
    }

    /// Drops every waiting request (their callers hear the writer stopped).
    pub(super) fn clear(&mut self) {
        self.waiting.clear();
        self.turn.clear();
    }

    /// The next group to commit: one request of each tenant in turn, until
    /// the next would take the group past `max_ops` (a group always holds
    /// one request, whatever its size). The tenant whose request did not
    /// fit is served first next time.
    pub(super) fn take_group(&mut self, max_ops: usize) -> Vec<J> {
        let mut group = Vec::new();
        let mut ops = 0;
        while let Some(tenant) = self.turn.pop_front() {
            let Some(jobs) = self.waiting.get_mut(&tenant) else {
                continue;
            };
            let Some(next) = jobs.front() else {
                self.waiting.remove(&tenant);
                continue;
            };
            if !group.is_empty() && ops + next.ops() > max_ops {
                self.turn.push_front(tenant);
                break;
            }
            ops += next.ops();
            group.extend(jobs.pop_front());
            if jobs.is_empty() {
                self.waiting.remove(&tenant);
            } else {
                self.turn.push_back(tenant);
            }
        }
        group
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Job(Arc<str>, usize, u32);

    impl Queued for Job {
        fn tenant(&self) -> &Arc<str> {
            &self.0
        }
        fn ops(&self) -> usize {
            self.1
        }
    }

    fn names(group: &[Job]) -> Vec<String> {
        group.iter().map(|j| format!("{}{}", j.0, j.2)).collect()
    }

    #[test]
    fn a_flooding_tenant_delays_another_by_one_group_at_most() {
        let (evil, acme): (Arc<str>, Arc<str>) = ("e".into(), "a".into());
        let mut q = WriteQueue::default();
        for i in 0..5 {
            q.push(Job(Arc::clone(&evil), 1000, i));
        }
        q.push(Job(Arc::clone(&acme), 1, 0));
        q.push(Job(Arc::clone(&acme), 1, 1));
        assert_eq!(names(&q.take_group(1000)), ["e0"]);
        // acme's first request goes next, with no 1000-op batch before it.
        assert_eq!(names(&q.take_group(1000)), ["a0"]);
        assert_eq!(names(&q.take_group(1000)), ["e1"]);
        assert_eq!(names(&q.take_group(1000)), ["a1"]);
        for i in 2..5 {
            assert_eq!(names(&q.take_group(1000)), [format!("e{i}")]);
        }
        assert!(q.is_empty());
        assert!(q.take_group(1000).is_empty());
    }

    #[test]
    fn small_requests_share_a_group_in_turn_and_keep_their_tenants_order() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut q = WriteQueue::default();
        for i in 0..3 {
            q.push(Job(Arc::clone(&a), 1, i));
        }
        q.push(Job(Arc::clone(&b), 1, 0));
        assert_eq!(names(&q.take_group(1000)), ["a0", "b0", "a1", "a2"]);
        // A request larger than a group still goes, alone.
        q.push(Job(Arc::clone(&a), 5000, 3));
        q.push(Job(Arc::clone(&b), 1, 1));
        assert_eq!(names(&q.take_group(1000)), ["a3"]);
        assert_eq!(names(&q.take_group(1000)), ["b1"]);
        q.push(Job(Arc::clone(&a), 1, 4));
        q.clear();
        assert!(q.is_empty());
    }
}
