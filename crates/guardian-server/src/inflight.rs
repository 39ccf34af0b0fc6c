//! Idempotency keys being processed right now.
//!
//! A second request with a key that is in flight gets 409
//! `idempotency:in-flight` at once instead of waiting. The set lives in
//! memory: the mutation's transaction is atomic, so after a crash nothing is
//! half-applied and there is nothing in flight to remember.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

type Key = (Arc<str>, String);

/// The set of `(tenant, key)` in flight.
#[derive(Debug)]
pub(crate) struct InFlight {
    keys: Mutex<HashSet<Key>>,
    count: watch::Sender<usize>,
}

/// Keys reserved by one request; released when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    owner: Arc<InFlight>,
    keys: Vec<Key>,
}

impl InFlight {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            keys: Mutex::new(HashSet::new()),
            count: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<Key>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `keys` for one request; returns the reservation and, per key,
    /// whether another request holds it. A key repeated within the request
    /// is reserved once and is not "held by another".
    pub(crate) fn reserve<'a>(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> (Reservation, Vec<bool>) {
        let keys = keys.into_iter();
        let mut seen: HashSet<&str> = HashSet::with_capacity(keys.size_hint().0);
        let mut mine: Vec<Key> = Vec::with_capacity(keys.size_hint().0);
        let mut busy = Vec::with_capacity(keys.size_hint().0);
        let mut set = self.lock();
        for key in keys {
            if !seen.insert(key) {
                // Repeated within this request: reserved (or refused) once.
                busy.push(mine.iter().all(|(_, k)| k != key));
                continue;
            }
            let k = (Arc::clone(tenant), key.to_owned());
            if set.insert(k.clone()) {
                mine.push(k);
                busy.push(false);
            } else {
                busy.push(true);
            }
        }
        // Published under the lock: two changes on two threads publish in
        // the order they changed the set, so the last count is its size.
        self.count.send_replace(set.len());
        drop(set);
        (
            Reservation {
                owner: Arc::clone(self),
                keys: mine,
            },
            busy,
        )
    }

    /// Number of keys in flight.
    pub(crate) fn len(&self) -> usize {
        *self.count.borrow()
    }

    /// Watches the number of keys in flight.
    pub(crate) fn watch(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut set = self.owner.lock();
        for k in &self.keys {
            set.remove(k);
        }
        // Under the lock, as in `reserve`.
        self.owner.count.send_replace(set.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_reservation_of_a_key_is_busy_until_released() {
        let f = InFlight::new();
        let t: Arc<str> = Arc::from("t");
        let (r1, busy) = f.reserve(&t, ["a", "b", "a"]);
        assert_eq!(busy, vec![false, false, false]);
        let (_r2, busy) = f.reserve(&t, ["b", "c"]);
        assert_eq!(busy, vec![true, false]);
        assert_eq!(f.len(), 3);
        drop(r1);
        assert_eq!(f.len(), 1);
        let other: Arc<str> = Arc::from("u");
        let (_r3, busy) = f.reserve(&other, ["c"]);
        assert_eq!(busy, vec![false], "keys are per tenant");
    }

    /// Two requests released at once on two threads: the count published
    /// last must be the set's final size, or a waiter on the count (a
    /// graceful stop, a test waiting for quiet) waits on a key long gone.
    #[test]
    fn the_count_settles_to_the_set_size_under_concurrent_releases() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 20_000;
        let f = InFlight::new();
        let t: Arc<str> = Arc::from("t");
        let barrier = std::sync::Barrier::new(THREADS);
        let stale = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for n in 0..THREADS {
                let (f, t, barrier, stale) = (&f, &t, &barrier, &stale);
                s.spawn(move || {
                    let key = n.to_string();
                    for _ in 0..ROUNDS {
                        let (r, _) = f.reserve(t, [key.as_str()]);
                        barrier.wait();
                        drop(r);
                        if barrier.wait().is_leader() && f.len() != 0 {
                            stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        barrier.wait();
                    }
                });
            }
        });
        assert_eq!(
            stale.into_inner(),
            0,
            "rounds that ended with keys counted that no request held"
        );
    }
}
