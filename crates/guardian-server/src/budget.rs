//! A server-wide byte budget (request bodies, or answers held until sent)
//! of which one tenant may hold at most a share.
//!
//! Without the share, one tenant's stalled clients (bodies trickled in,
//! answers never read) could hold the whole budget up to their time
//! bounds, and every other tenant's requests would be refused meanwhile.
//! A hold for no tenant counts against the whole budget only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

type Shares = Arc<Mutex<HashMap<Arc<str>, Share>>>;

/// A tenant's share, and how many [`ShareRef`]s point at it (holds and
/// waiters), counted under the map's lock.
#[derive(Debug)]
struct Share {
    sem: Arc<Semaphore>,
    refs: usize,
}

/// The budget: one permit a byte.
#[derive(Debug)]
pub(crate) struct Budget {
    total: Arc<Semaphore>,
    capacity: usize,
    /// The most one tenant may hold at once; `None` when that is the whole.
    share: Option<usize>,
    /// Tenants holding or waiting for part of the budget; an entry goes
    /// when nothing refers to it.
    tenants: Shares,
}

/// Bytes held in a [`Budget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Hold {
    total: OwnedSemaphorePermit,
    /// As many bytes of the tenant's share as `total` holds.
    tenant: Option<(OwnedSemaphorePermit, ShareRef)>,
}

/// A reference to a tenant's share; the last one dropped removes its
/// entry.
#[derive(Debug)]
struct ShareRef {
    sem: Arc<Semaphore>,
    key: Arc<str>,
    tenants: Shares,
}

impl Budget {
    /// A budget of `total` bytes of which one tenant may hold `share`.
    pub(crate) fn new(total: usize, share: usize) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS);
        Self {
            total: Arc::new(Semaphore::new(total)),
            capacity: total,
            share: (share < total).then_some(share),
            tenants: Arc::default(),
        }
    }

    /// Bytes not held by anyone.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.total.available_permits()
    }

    /// The most one hold of a tenant's may take.
    pub(crate) fn most(&self) -> usize {
        self.share.unwrap_or(self.capacity)
    }

    /// Takes `n` bytes at once, or none if the budget, or the tenant's
    /// share of it, has no room now.
    pub(crate) fn try_take(&self, tenant: Option<&Arc<str>>, n: u32) -> Option<Hold> {
        let tenant = match self.share_of(tenant) {
            Some(share) => {
                let permit = Arc::clone(&share.sem).try_acquire_many_owned(n).ok()?;
                Some((permit, share))
            }
            None => None,
        };
        let total = Arc::clone(&self.total).try_acquire_many_owned(n).ok()?;
        Some(Hold { total, tenant })
    }

    /// Takes `n` bytes, waiting for room in the tenant's share and then in
    /// the budget. `None` when `n` is more than a tenant may ever hold
    /// (waiting would never end).
    pub(crate) async fn take(&self, tenant: Option<&Arc<str>>, n: u32) -> Option<Hold> {
        if usize::try_from(n).map_or(true, |n| n > self.most()) {
            return None;
        }
        let tenant = match self.share_of(tenant) {
            Some(share) => {
                let permit = Arc::clone(&share.sem).acquire_many_owned(n).await.ok()?;
                Some((permit, share))
            }
            None => None,
        };
        let total = Arc::clone(&self.total).acquire_many_owned(n).await.ok()?;
        Some(Hold { total, tenant })
    }

    /// The tenant's share, its entry made on first use; `None` when no
    /// share applies.
    fn share_of(&self, tenant: Option<&Arc<str>>) -> Option<ShareRef> {
        let (share, key) = (self.share?, tenant?);
        let mut tenants = lock(&self.tenants);
        let entry = tenants.entry(Arc::clone(key)).or_insert_with(|| Share {
            sem: Arc::new(Semaphore::new(share)),
            refs: 0,
        });
        entry.refs += 1;
        let sem = Arc::clone(&entry.sem);
        drop(tenants);
        Some(ShareRef {
            sem,
            key: Arc::clone(key),
            tenants: Arc::clone(&self.tenants),
        })
    }
}

fn lock(tenants: &Mutex<HashMap<Arc<str>, Share>>) -> MutexGuard<'_, HashMap<Arc<str>, Share>> {
    tenants.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ShareRef {
    fn clone_ref(&self) -> Self {
        if let Some(entry) = lock(&self.tenants).get_mut(&self.key) {
            entry.refs += 1;
        }
        Self {
            sem: Arc::clone(&self.sem),
            key: Arc::clone(&self.key),
            tenants: Arc::clone(&self.tenants),
        }
    }
}

impl Drop for ShareRef {
    fn drop(&mut self) {
        let mut tenants = lock(&self.tenants);
        if let Some(entry) = tenants.get_mut(&self.key) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                tenants.remove(&self.key);
            }
        }
    }
}

impl Hold {
    /// Bytes held.
    pub(crate) fn len(&self) -> usize {
        self.total.num_permits()
    }

    /// Splits `n` bytes off into a hold of their own; `None` if this one
    /// holds fewer.
    pub(crate) fn split(&mut self, n: usize) -> Option<Hold> {
        if n > self.len() {
            return None;
        }
        let tenant = match &mut self.tenant {
            Some((permit, share)) => Some((permit.split(n)?, share.clone_ref())),
            None => None,
        };
        let total = self.total.split(n)?;
        Some(Hold { total, tenant })
    }

    /// Adds `other`'s bytes to this hold. Both must come from the same
    /// budget and tenant.
    pub(crate) fn merge(&mut self, other: Hold) {
        debug_assert_eq!(self.tenant.is_some(), other.tenant.is_some());
        self.total.merge(other.total);
        if let (Some((mine, _)), Some((theirs, _))) = (&mut self.tenant, other.tenant) {
            mine.merge(theirs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn one_tenant_holds_at_most_its_share_and_others_still_get_room() {
        let budget = Budget::new(1000, 400);
        let (a, b) = (t("a"), t("b"));
        let first = budget.try_take(Some(&a), 300).unwrap();
        // Past a's share, though the budget has room: refused, nothing kept.
        assert!(budget.try_take(Some(&a), 200).is_none());
        assert_eq!(budget.available(), 700);
        let second = budget.try_take(Some(&a), 100).unwrap();
        // Another tenant, and a request with no tenant, are not held back.
        let other = budget.try_take(Some(&b), 400).unwrap();
        let anonymous = budget.try_take(None, 200).unwrap();
        assert_eq!(budget.available(), 0);
        // The budget is full: refused whatever the share says.
        drop(second);
        assert!(budget.try_take(Some(&b), 100).is_none());
        assert!(budget.try_take(Some(&a), 100).is_some());
        drop((first, other, anonymous));
        assert_eq!(budget.available(), 1000);
        assert!(
            lock(&budget.tenants).is_empty(),
            "no entry outlives its holds"
        );
    }

    #[test]
    fn a_share_as_large_as_the_budget_is_no_share() {
        let budget = Budget::new(1000, 1000);
        let a = t("a");
        let all = budget.try_take(Some(&a), 1000).unwrap();
        assert!(lock(&budget.tenants).is_empty());
        assert_eq!(budget.most(), 1000);
        drop(all);
        assert_eq!(budget.available(), 1000);
    }

    #[test]
    fn split_and_merge_keep_the_share_and_the_budget_in_step() {
        let budget = Budget::new(1000, 500);
        let a = t("a");
        let mut hold = budget.try_take(Some(&a), 300).unwrap();
        let more = budget.try_take(Some(&a), 200).unwrap();
        hold.merge(more);
        assert_eq!(hold.len(), 500);
        assert!(budget.try_take(Some(&a), 1).is_none(), "the share is full");
        assert!(hold.split(501).is_none());
        let kept = hold.split(120).unwrap();
        drop(hold);
        assert_eq!(kept.len(), 120);
        assert_eq!(budget.available(), 880);
        // What the split gave back is a's again.
        let again = budget.try_take(Some(&a), 380).unwrap();
        assert!(budget.try_take(Some(&a), 1).is_none());
        drop((kept, again));
        assert_eq!(budget.available(), 1000);
        assert!(lock(&budget.tenants).is_empty());
    }

    /// Holds of one tenant dropped at once on several threads: the last
    /// one out removes the entry, whichever it is.
    #[test]
    fn the_last_hold_dropped_removes_the_entry_under_races() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 5_000;
        let budget = Budget::new(1000, 400);
        let a = t("a");
        let barrier = std::sync::Barrier::new(THREADS);
        for _ in 0..ROUNDS {
            let holds: Vec<Hold> = (0..THREADS)
                .map(|_| budget.try_take(Some(&a), 100).unwrap())
                .collect();
            std::thread::scope(|s| {
                for hold in holds {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        drop(hold);
                    });
                }
            });
            assert!(
                lock(&budget.tenants).is_empty(),
                "an entry outlived its holds"
            );
            assert_eq!(budget.available(), 1000);
        }
    }

    #[tokio::test]
    async fn a_waiting_take_gets_its_share_when_the_tenant_gives_some_back() {
        let budget = Arc::new(Budget::new(1000, 400));
        let a = t("a");
        let held = budget.try_take(Some(&a), 400).unwrap();
        assert!(budget.take(Some(&a), 401).await.is_none(), "never fits");
        let waiting = {
            let (budget, a) = (Arc::clone(&budget), Arc::clone(&a));
            tokio::spawn(async move { budget.take(Some(&a), 300).await.map(|h| h.len()) })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // Another tenant's room is not what a waits for.
        let other = budget.try_take(Some(&t("b")), 400).unwrap();
        drop(held);
        assert_eq!(waiting.await.unwrap(), Some(300));
        // A wait given up (its request timed out) leaves nothing behind.
        let held = budget.try_take(Some(&a), 400).unwrap();
        let polled_once = futures::FutureExt::now_or_never(budget.take(Some(&a), 1));
        assert!(polled_once.is_none(), "waits while the share is full");
        drop((held, other));
        assert_eq!(budget.available(), 1000);
        assert!(lock(&budget.tenants).is_empty());
    }
}
