//! Where the realtime cursor survives restarts.
//!
//! The service keeps the cursor of the last change the app *consumed* (see
//! [`RealtimeMessages`](super::RealtimeMessages) for what consumed means) in a
//! [`CursorStore`]. The outbox's meta table is the production store
//! ([`OutboxCursorStore`]); [`MemoryCursorStore`] is for tests and for tools
//! that do not persist (`gsync watch` without `--persist`).
//!
//! With the cursor a store may keep the [`ChangeFingerprint`] of the change
//! consumed there ([`FeedPosition`]); the service sends it with the cursor
//! so a server whose feed was rewritten under it (restored from a backup,
//! then written to) refuses to resume there. A store that keeps only the
//! cursor still works: after a restart the first request goes without a
//! fingerprint, as before this existed.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use guardian_protocol::ChangeFingerprint;

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

/// Where the app stands in the feed: the cursor consumed last and, when
/// known, the fingerprint of the change at that cursor (none after a
/// resync or a first start, which reach a cursor without its change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedPosition {
    /// The cursor.
    pub cursor: u64,
    /// The change at `cursor`, if the service received it.
    pub fingerprint: Option<ChangeFingerprint>,
}

impl FeedPosition {
    /// A cursor whose change is not known.
    pub fn bare(cursor: u64) -> Self {
        Self {
            cursor,
            fingerprint: None,
        }
    }
}

/// Persists the realtime cursor. Implemented by the app if the outbox is not
/// where it wants the cursor.
///
/// The service loads and saves through [`load_position`](Self::load_position)
/// and [`save_position`](Self::save_position); their provided versions keep
/// the cursor alone (through `load` and `save`), so a store written before
/// fingerprints existed works unchanged, and one that overrides both also
/// keeps the fingerprint across restarts.
pub trait CursorStore: Send + Sync + Debug {
    /// The saved cursor, `None` if none was ever saved.
    fn load(&self) -> BoxFuture<'_, Result<Option<u64>, CursorStoreError>>;
    /// Saves `cursor` (it may be lower than the saved one after a resync
    /// against a server that lost its data).
    fn save(&self, cursor: u64) -> BoxFuture<'_, Result<(), CursorStoreError>>;

    /// The saved position. A fingerprint is returned only if it was saved
    /// with the cursor returned: one left from another cursor must not be
    /// sent, or the server would refuse a cursor that is fine.
    fn load_position(&self) -> BoxFuture<'_, Result<Option<FeedPosition>, CursorStoreError>> {
        Box::pin(async move { Ok(self.load().await?.map(FeedPosition::bare)) })
    }

    /// Saves `position`, replacing any fingerprint saved before (a position
    /// without one clears it).
    fn save_position(&self, position: FeedPosition) -> BoxFuture<'_, Result<(), CursorStoreError>> {
        self.save(position.cursor)
    }
}

/// A cursor kept in memory only (tests, one-shot tools), with its
/// fingerprint. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct MemoryCursorStore(Arc<Mutex<Option<FeedPosition>>>);

impl MemoryCursorStore {
    /// A store holding `initial` (without a fingerprint).
    pub fn new(initial: Option<u64>) -> Self {
        Self::with_position(initial.map(FeedPosition::bare))
    }

    /// A store holding `initial`.
    pub fn with_position(initial: Option<FeedPosition>) -> Self {
        Self(Arc::new(Mutex::new(initial)))
    }

    /// The saved cursor.
    pub fn get(&self) -> Option<u64> {
        self.position().map(|p| p.cursor)
    }

    /// The saved position.
    pub fn position(&self) -> Option<FeedPosition> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, position: FeedPosition) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(position);
    }
}

impl CursorStore for MemoryCursorStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<u64>, CursorStoreError>> {
        Box::pin(async move { Ok(self.get()) })
    }

    fn save(&self, cursor: u64) -> BoxFuture<'_, Result<(), CursorStoreError>> {
        self.set(FeedPosition::bare(cursor));
        Box::pin(async { Ok(()) })
    }

    fn load_position(&self) -> BoxFuture<'_, Result<Option<FeedPosition>, CursorStoreError>> {
        Box::pin(async move { Ok(self.position()) })
    }

    fn save_position(&self, position: FeedPosition) -> BoxFuture<'_, Result<(), CursorStoreError>> {
        self.set(position);
        Box::pin(async { Ok(()) })
    }
}

/// The meta key [`OutboxCursorStore`] uses unless told otherwise.
pub const DEFAULT_CURSOR_KEY: &str = "realtime.cursor";

/// The cursor in the outbox's meta table (DESIGN §2), so it shares the
/// outbox file's durability. The fingerprint goes under `<key>.fingerprint`
/// as `<cursor>:<fingerprint>` (empty when there is none), written in the
/// cursor's transaction: the cursor alone stays under `<key>` as before,
/// and a fingerprint is used only if it names the saved cursor (one left by
/// an older build that saved the cursor alone is ignored).
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

impl OutboxCursorStore {
    fn fingerprint_key(&self) -> String {
        format!("{}.fingerprint", self.key)
    }

    async fn get(&self, key: &str) -> Result<Option<String>, CursorStoreError> {
        self.outbox
            .meta_get(key)
            .await
            .map_err(|e| CursorStoreError::Store(e.to_string()))
    }
}

/// The fingerprint saved as `<cursor>:<fingerprint>` if it names `cursor`.
/// Anything else (empty, another cursor, unreadable) is no fingerprint: it
/// only ever makes the service send less, never block the feed.
fn fingerprint_for(raw: &str, cursor: u64) -> Option<ChangeFingerprint> {
    let (at, fingerprint) = raw.trim().split_once(':')?;
    if at.parse::<u64>().ok()? != cursor {
        return None;
    }
    ChangeFingerprint::parse(fingerprint).ok()
}

impl CursorStore for OutboxCursorStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<u64>, CursorStoreError>> {
        Box::pin(async move {
            let raw = self.get(&self.key).await?;
            raw.map(|s| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| CursorStoreError::Corrupt(s))
            })
            .transpose()
        })
    }

    fn save(&self, cursor: u64) -> BoxFuture<'_, Result<(), CursorStoreError>> {
        self.save_position(FeedPosition::bare(cursor))
    }

    fn load_position(&self) -> BoxFuture<'_, Result<Option<FeedPosition>, CursorStoreError>> {
        Box::pin(async move {
            let Some(cursor) = self.load().await? else {
                return Ok(None);
            };
            let raw = self.get(&self.fingerprint_key()).await?;
            Ok(Some(FeedPosition {
                cursor,
                fingerprint: raw.and_then(|r| fingerprint_for(&r, cursor)),
            }))
        })
    }

    fn save_position(&self, position: FeedPosition) -> BoxFuture<'_, Result<(), CursorStoreError>> {
        Box::pin(async move {
            let fingerprint = position
                .fingerprint
                .map_or_else(String::new, |f| format!("{}:{f}", position.cursor));
            let cursor = position.cursor.to_string();
            self.outbox
                .meta_set_all(&[
                    (&self.fingerprint_key(), &fingerprint),
                    (&self.key, &cursor),
                ])
                .await
                .map_err(|e| CursorStoreError::Store(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_fingerprint_counts_only_for_its_own_cursor() {
        let fp = ChangeFingerprint::of("note", "n1", 2);
        assert_eq!(fingerprint_for(&format!("7:{fp}"), 7), Some(fp));
        assert_eq!(fingerprint_for(&format!("6:{fp}"), 7), None);
        for junk in ["", "7", "7:", "7:xyz", ":abc", "x:0123456789abcdef"] {
            assert_eq!(fingerprint_for(junk, 7), None, "{junk:?}");
        }
    }
}
