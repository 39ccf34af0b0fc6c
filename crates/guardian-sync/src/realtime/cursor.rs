//! Where the realtime cursor survives restarts.
//!
//! The service keeps the cursor of the last change the app *consumed* (see
//! [`RealtimeMessages`](super::RealtimeMessages) for what consumed means) in a
//! [`CursorStore`]. The outbox's meta table is the production store
//! ([`OutboxCursorStore`]); [`MemoryCursorStore`] is for tests and for tools
//! that do not persist (`gsync watch` without `--persist`).

use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;

use crate::outbox::Outbox;

/// Why the cursor could not be loaded or saved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CursorStoreError {
    /// The backing store failed (I/O, a closed outbox).
    #[error("cursor store failed: {0}")]
    Store(String),
    /// The stored value is not a cursor; fix or delete it (the service
    /// would otherwise have to guess where to resume).
    #[error("stored realtime cursor {0:?} is not an unsigned integer")]
    Corrupt(String),
}

/// Persists the realtime cursor. Implemented by the app if the outbox is not
/// where it wants the cursor.
pub trait CursorStore: Send + Sync + Debug {
    /// The saved cursor, `None` if none was ever saved.
    fn load(&self) -> BoxFuture<'_, Result<Option<u64>, CursorStoreError>>;
    /// Saves `cursor` (it may be lower than the saved one after a resync
    /// against a server that lost its data).
    fn save(&self, cursor: u64) -> BoxFuture<'_, Result<(), CursorStoreError>>;
}

/// A cursor kept in memory only (tests, one-shot tools). Clones share it.
#[derive(Debug, Clone, Default)]
pub struct MemoryCursorStore(Arc<Mutex<Option<u64>>>);

impl MemoryCursorStore {
    /// A store holding `initial`.
    pub fn new(initial: Option<u64>) -> Self {
        Self(Arc::new(Mutex::new(initial)))
    }

    /// The saved cursor.
    pub fn get(&self) -> Option<u64> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CursorStore for MemoryCursorStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<u64>, CursorStoreError>> {
        Box::pin(async move { Ok(self.get()) })
    }

    fn save(&self, cursor: u64) -> BoxFuture<'_, Result<(), CursorStoreError>> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(cursor);
        Box::pin(async { Ok(()) })
    }
}

/// The meta key [`OutboxCursorStore`] uses unless told otherwise.
pub const DEFAULT_CURSOR_KEY: &str = "realtime.cursor";

/// The cursor in the outbox's meta table (DESIGN §2), so it shares the
/// outbox file's durability.
#[derive(Debug, Clone)]
pub struct OutboxCursorStore {
    outbox: Outbox,
    key: String,
}

impl OutboxCursorStore {
    /// Stores the cursor under [`DEFAULT_CURSOR_KEY`].
    pub fn new(outbox: Outbox) -> Self {
        Self::with_key(outbox, DEFAULT_CURSOR_KEY)
    }

    /// Stores the cursor under `key` (one key per feed if an app follows
    /// several servers).
    pub fn with_key(outbox: Outbox, key: impl Into<String>) -> Self {
        Self {
            outbox,
            key: key.into(),
        }
    }
}

impl CursorStore for OutboxCursorStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<u64>, CursorStoreError>> {
        Box::pin(async move {
            let raw = self
                .outbox
                .meta_get(&self.key)
                .await
                .map_err(|e| CursorStoreError::Store(e.to_string()))?;
            raw.map(|s| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| CursorStoreError::Corrupt(s))
            })
            .transpose()
        })
    }

    fn save(&self, cursor: u64) -> BoxFuture<'_, Result<(), CursorStoreError>> {
        Box::pin(async move {
            self.outbox
                .meta_set(&self.key, &cursor.to_string())
                .await
                .map_err(|e| CursorStoreError::Store(e.to_string()))
        })
    }
}
