//! Optimistic updates: show a change at once, take it back cleanly (DESIGN §7).
//!
//! The app applies a change to its UI, registers a transaction token with a
//! rollback handler and success/error callbacks, and enqueues the op with
//! that token. The engine commits the token when every op carrying it was
//! applied and rolls it back when one failed permanently.
//!
//! Handlers run on a dedicated thread, one at a time, each under
//! `catch_unwind`: a slow handler never stalls the drain and a panicking one
//! never takes the engine down. Handlers do not survive a restart; the
//! outcome itself does (it is stored in the outbox), and the engine
//! re-publishes undelivered outcomes as events after a restart.

use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

type Handler = Box<dyn FnOnce() + Send + 'static>;
type ErrorHandler = Box<dyn FnOnce(&str) + Send + 'static>;

/// What the app registers for one transaction token.
pub struct Registration {
    /// The state before the optimistic change, kept until the token settles.
    pub snapshot: Value,
    /// Undoes the optimistic change in the UI.
    pub rollback: Handler,
    /// Called once the change is confirmed by the server.
    pub on_success: Option<Handler>,
    /// Called after the rollback, with the reason.
    pub on_error: Option<ErrorHandler>,
}

impl Registration {
    /// A registration with a snapshot and a rollback handler.
    pub fn new(snapshot: Value, rollback: impl FnOnce() + Send + 'static) -> Self {
        Self {
            snapshot,
            rollback: Box::new(rollback),
            on_success: None,
            on_error: None,
        }
    }

    /// Adds a success callback.
    #[must_use]
    pub fn on_success(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_success = Some(Box::new(f));
        self
    }

    /// Adds an error callback (runs after the rollback).
    #[must_use]
    pub fn on_error(mut self, f: impl FnOnce(&str) + Send + 'static) -> Self {
        self.on_error = Some(Box::new(f));
        self
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("has_success", &self.on_success.is_some())
            .field("has_error", &self.on_error.is_some())
            .finish_non_exhaustive()
    }
}

/// Registered optimistic transactions, keyed by token.
#[derive(Clone)]
pub struct OptimisticStore {
    pending: Arc<Mutex<HashMap<String, Registration>>>,
    runner: mpsc::Sender<Handler>,
}

impl fmt::Debug for OptimisticStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OptimisticStore")
            .field("pending", &self.len())
            .finish()
    }
}

impl Default for OptimisticStore {
    fn default() -> Self {
        Self::new()
    }
}

impl OptimisticStore {
    /// An empty store with its handler thread.
    pub fn new() -> Self {
        let (runner, jobs) = mpsc::channel::<Handler>();
        let spawned = std::thread::Builder::new()
            .name("gsync-optimistic".into())
            .spawn(move || {
                for job in jobs {
                    if catch_unwind(AssertUnwindSafe(job)).is_err() {
                        tracing::warn!("an optimistic-update handler panicked; ignored");
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread, handlers are dropped unrun (the sender
            // errors); outcomes still reach the app as events.
            tracing::error!("cannot start the optimistic handler thread: {e}");
        }
        Self {
            pending: Arc::new(Mutex::new(HashMap::new())),
            runner,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registration>> {
        // A handler never runs under this lock, so poisoning cannot leave it
        // half-updated; recover instead of propagating a panic.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a token; a second registration of the same token replaces the first.
    pub fn register(&self, txn_token: impl Into<String>, registration: Registration) {
        self.map().insert(txn_token.into(), registration);
    }

    /// Number of unsettled registrations.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The snapshot kept for a token, if it is registered.
    pub fn snapshot(&self, txn_token: &str) -> Option<Value> {
        self.map().get(txn_token).map(|r| r.snapshot.clone())
    }

    /// Confirms a token: drops its snapshot and runs its success callback.
    /// Returns false when the token was not registered (e.g. after a restart).
    pub fn commit(&self, txn_token: &str) -> bool {
        let Some(reg) = self.map().remove(txn_token) else {
            return false;
        };
        if let Some(f) = reg.on_success {
            self.run(f);
        }
        true
    }

    /// Rolls a token back: runs its rollback, then its error callback.
    /// Returns false when the token was not registered.
    pub fn rollback(&self, txn_token: &str, error: &str) -> bool {
        let Some(reg) = self.map().remove(txn_token) else {
            return false;
        };
        let rollback = reg.rollback;
        let on_error = reg.on_error;
        let error = error.to_owned();
        self.run(Box::new(move || {
            rollback();
            if let Some(f) = on_error {
                f(&error);
            }
        }));
        true
    }

    /// Rolls back several tokens (e.g. a form whose fields were separate ops),
    /// in the order given. Returns how many were registered.
    pub fn rollback_all<'a>(
        &self,
        tokens: impl IntoIterator<Item = &'a str>,
        error: &str,
    ) -> usize {
        tokens
            .into_iter()
            .filter(|t| self.rollback(t, error))
            .count()
    }

    fn run(&self, job: Handler) {
        if self.runner.send(job).is_err() {
            tracing::error!("optimistic handler thread is gone; handler not run");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn commit_runs_success_and_forgets_the_token() {
        let store = OptimisticStore::new();
        let (tx, rx) = channel();
        store.register(
            "t1",
            Registration::new(json!({"on": false}), || panic!("no rollback on commit"))
                .on_success(move || tx.send("ok").unwrap()),
        );
        assert_eq!(store.snapshot("t1"), Some(json!({"on": false})));
        assert!(store.commit("t1"));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "ok");
        assert!(!store.commit("t1"));
        assert!(store.is_empty());
    }

    #[test]
    fn rollback_runs_rollback_then_error_and_survives_panics() {
        let store = OptimisticStore::new();
        let (tx, rx) = channel();
        store.register(
            "boom",
            Registration::new(json!(null), || panic!("handler bug")),
        );
        let tx2 = tx.clone();
        store.register(
            "t2",
            Registration::new(json!(1), move || tx.send("rolled back".to_owned()).unwrap())
                .on_error(move |e| tx2.send(format!("error: {e}")).unwrap()),
        );
        assert_eq!(store.rollback_all(["boom", "t2", "unknown"], "denied"), 2);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            "rolled back"
        );
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            "error: denied"
        );
    }
}
