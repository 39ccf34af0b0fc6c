//! Hooks the store calls while it applies mutations, so that a test harness
//! (the server's fault injection) can act inside a transaction without the
//! store knowing about faults.

use super::MutationInput;

/// What the store asks while it applies a request's mutations. Called on
/// the store's writer, inside the transaction: keep it quick.
pub(crate) trait StoreHooks: Send + Sync + std::fmt::Debug {
    /// Called once for each conditional update or delete (`If-Match: "v"`,
    /// or chained on an earlier op) before anything else is done with it:
    /// `true` makes another writer bump the entity (same data, version + 1)
    /// just before the op is decided, if the entity is live then.
    fn concurrent_write(&self, input: &MutationInput) -> bool;

    /// The idempotency key the applied log records for such a write.
    fn concurrent_write_key(&self) -> String;
}

/// Hooks that never act.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NoHooks;

#[cfg(test)]
impl StoreHooks for NoHooks {
    fn concurrent_write(&self, _input: &MutationInput) -> bool {
        false
    }

    fn concurrent_write_key(&self) -> String {
        String::new()
    }
}
