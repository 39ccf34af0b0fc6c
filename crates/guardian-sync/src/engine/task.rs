//! Work the engine spawns and owns: aborted when its handle is dropped, so
//! nothing is left running that no one waits for.

use std::future::Future;
use std::time::Duration;

use tokio::task::{JoinError, JoinHandle};

use super::EngineError;

/// A spawned task, aborted when dropped.
pub(super) struct Owned<T>(JoinHandle<T>);

impl<T: Send + 'static> Owned<T> {
    /// Spawns `future` on the current runtime.
    pub(super) fn spawn(future: impl Future<Output = T> + Send + 'static) -> Self {
        Self(tokio::spawn(future))
    }
}

impl<T> Owned<T> {
    /// Waits for the task to end. Cancel-safe: the task goes on.
    pub(super) async fn join(&mut self) -> Result<T, JoinError> {
        (&mut self.0).await
    }

    /// Aborts the task and waits, at most `within`, until the runtime has
    /// dropped it (tokio drops an aborted task lazily). False if it was
    /// not dropped in time.
    pub(super) async fn cancel(mut self, within: Duration) -> bool {
        self.0.abort();
        tokio::time::timeout(within, &mut self.0).await.is_ok()
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A task's own result: its panic goes on in the caller; cancelled (only
/// the runtime shutting down can do that while the handle is held), it
/// ends as the outbox closing.
pub(super) fn outcome<T>(
    joined: Result<Result<T, EngineError>, JoinError>,
) -> Result<T, EngineError> {
    match joined {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(EngineError::from(crate::outbox::OutboxError::Closed)),
    }
}
