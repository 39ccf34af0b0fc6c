//! Conflict policies: who wins a field both sides changed, per entity type.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// What a custom merge function sees of one both-sides conflict.
///
/// `None` means the key is absent on that side (never existed, or deleted).
#[derive(Debug, Clone, Copy)]
pub struct FieldConflictCtx<'a> {
    /// JSON Pointer (RFC 6901) of the field, `""` for the whole document.
    pub path: &'a str,
    /// The value both sides started from.
    pub base: Option<&'a Value>,
    /// The value in the op's payload.
    pub local: Option<&'a Value>,
    /// The value on the server.
    pub remote: Option<&'a Value>,
}

/// An app-supplied merge function for one conflicting field. It returns the
/// value to keep (it cannot delete the key; return the side that is `None`
/// through [`ConflictPolicy::LocalWins`]/[`ConflictPolicy::RemoteWins`] if
/// deletions must win).
pub type CustomMerge = Arc<dyn Fn(&FieldConflictCtx<'_>) -> Value + Send + Sync>;

/// Who wins a field changed on both sides to different values.
#[derive(Clone, Default)]
pub enum ConflictPolicy {
    /// The op's value wins (the default: the user's last edit is kept).
    #[default]
    LocalWins,
    /// The server's value wins.
    RemoteWins,
    /// The app decides per field.
    Custom(CustomMerge),
}

impl ConflictPolicy {
    /// A custom policy from a closure.
    pub fn custom<F>(f: F) -> Self
    where
        F: Fn(&FieldConflictCtx<'_>) -> Value + Send + Sync + 'static,
    {
        Self::Custom(Arc::new(f))
    }

    /// A stable lower-case name for events, metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::LocalWins => "local_wins",
            Self::RemoteWins => "remote_wins",
            Self::Custom(_) => "custom",
        }
    }

    /// Resolves one conflict: `None` means the key ends up absent.
    pub(crate) fn resolve(&self, ctx: &FieldConflictCtx<'_>) -> Option<Value> {
        match self {
            Self::LocalWins => ctx.local.cloned(),
            Self::RemoteWins => ctx.remote.cloned(),
            Self::Custom(f) => Some(f(ctx)),
        }
    }
}

impl fmt::Debug for ConflictPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The conflict policy of each entity type, with a default for the rest.
#[derive(Debug, Clone, Default)]
pub struct ReconcilePolicies {
    default: ConflictPolicy,
    by_type: HashMap<String, ConflictPolicy>,
}

impl ReconcilePolicies {
    /// All types use [`ConflictPolicy::LocalWins`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the policy of types without their own.
    pub fn with_default(mut self, policy: ConflictPolicy) -> Self {
        self.default = policy;
        self
    }

    /// Sets the policy of one entity type.
    pub fn with(mut self, entity_type: impl Into<String>, policy: ConflictPolicy) -> Self {
        self.set(entity_type, policy);
        self
    }

    /// Sets the policy of one entity type, in place.
    pub fn set(&mut self, entity_type: impl Into<String>, policy: ConflictPolicy) {
        self.by_type.insert(entity_type.into(), policy);
    }

    /// The policy that applies to `entity_type`.
    pub fn get(&self, entity_type: &str) -> &ConflictPolicy {
        self.by_type.get(entity_type).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn per_type_policy_with_default() {
        let p = ReconcilePolicies::new()
            .with("device", ConflictPolicy::RemoteWins)
            .with("note", ConflictPolicy::custom(|_| json!("x")));
        assert_eq!(p.get("device").name(), "remote_wins");
        assert_eq!(p.get("note").name(), "custom");
        assert_eq!(p.get("other").name(), "local_wins");
        let p = p.with_default(ConflictPolicy::RemoteWins);
        assert_eq!(p.get("other").name(), "remote_wins");
        assert_eq!(format!("{:?}", p.get("note")), "custom");
    }
}
