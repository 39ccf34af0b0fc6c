//! What the store answers for one mutation: the response it took effect
//! with ([`Applied`], fresh or replayed), or why it was refused
//! ([`Refusal`]). The HTTP layer turns a refusal into a problem document;
//! nothing here knows about HTTP beyond the status a stored response keeps.

use guardian_protocol::Entity;
use serde_json::Value;

use super::idempotency::StoredResponse;
use super::StoreError;

/// A mutation that took effect, now or before (a replay): the response its
/// idempotency record keeps.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Applied {
    /// 200, 201 or 204.
    pub(crate) status: u16,
    /// JSON text: the entity (`null` for 204). Object keys are sorted (as
    /// `serde_json::Value` prints them), so a replay from the store is byte
    /// for byte the first answer.
    pub(crate) body: String,
    pub(crate) replayed: bool,
    /// The entity version in the body, for the `ETag` of single requests.
    pub(crate) version: Option<u64>,
}

impl Applied {
    /// A response replayed from the idempotency store.
    pub(crate) fn replay(stored: StoredResponse) -> Result<Self, StoreError> {
        #[derive(serde::Deserialize)]
        struct Versioned {
            version: Option<u64>,
        }
        // Validates the stored text too: it is spliced into responses as is.
        let body: Value = serde_json::from_str(&stored.body)
            .map_err(|e| StoreError::Corrupt(format!("stored response is not JSON: {e}")))?;
        let version = match body {
            Value::Object(_) => serde_json::from_value::<Versioned>(body)
                .ok()
                .and_then(|v| v.version),
            _ => None,
        };
        Ok(Self {
            status: stored.status,
            body: stored.body,
            replayed: true,
            version,
        })
    }
}

/// Why a mutation was refused; nothing was written and no response stored,
/// so a retry under the same key is evaluated afresh. The message is the
/// problem document's `detail`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The server requires `If-Match` on updates and deletes.
    #[error("this server requires If-Match on updates and deletes")]
    PreconditionRequired,
    /// A create of a live entity.
    #[error("{entity} already exists")]
    Exists {
        entity: String,
        current: Option<Box<Entity>>,
    },
    /// An update or delete of an entity that never existed.
    #[error("{entity} does not exist")]
    NotFound { entity: String },
    /// An update or delete of a tombstone.
    #[error("{entity} was deleted")]
    Gone {
        entity: String,
        current: Option<Box<Entity>>,
    },
    /// `If-Match` names another version than the current one.
    #[error("If-Match {expected} does not match the current version {version} of {entity}")]
    VersionConflict {
        expected: u64,
        version: u64,
        entity: String,
        current: Option<Box<Entity>>,
    },
    /// The key was applied before for another request.
    #[error(
        "idempotency key {key:?} was used before with another method, path or body; \
         use a new key for a different request"
    )]
    KeyReused { key: String },
    /// A batch op whose `depends_on` op did not succeed.
    #[error(
        "op {batch_index} of this batch, which this op depends on, did not succeed; \
         this op was not applied and its key was not recorded: send it again after that op"
    )]
    DependencyFailed { batch_index: u32 },
    /// Another request holds this key right now.
    #[error(
        "a request with idempotency key {key:?} is still being processed; retry later with the same key"
    )]
    InFlight { key: String },
    /// An earlier op of this entity in the batch is held back as in flight.
    #[error(
        "an earlier op on {entity} in this batch is still being processed elsewhere; retry later with the same key"
    )]
    EarlierInFlight { entity: String },
}

impl Refusal {
    /// Whether the refusal shows the entity as it is (`current`).
    pub(crate) fn shows_current(&self) -> bool {
        matches!(
            self,
            Refusal::Exists { .. } | Refusal::Gone { .. } | Refusal::VersionConflict { .. }
        )
    }

    /// Attaches the entity as it is, for the refusals that show it.
    pub(crate) fn with_current(mut self, entity: Entity) -> Self {
        if let Refusal::Exists { current, .. }
        | Refusal::Gone { current, .. }
        | Refusal::VersionConflict { current, .. } = &mut self
        {
            *current = Some(Box::new(entity));
        }
        self
    }

    /// The entity shown, if any.
    pub(crate) fn current(&self) -> Option<&Entity> {
        match self {
            Refusal::Exists { current, .. }
            | Refusal::Gone { current, .. }
            | Refusal::VersionConflict { current, .. } => current.as_deref(),
            _ => None,
        }
    }

    /// Removes the entity shown, for the refusals that show one.
    pub(crate) fn without_current(mut self) -> Self {
        if let Refusal::Exists { current, .. }
        | Refusal::Gone { current, .. }
        | Refusal::VersionConflict { current, .. } = &mut self
        {
            *current = None;
        }
        self
    }
}

/// The store's answer to one mutation.
pub(crate) type OpOutcome = Result<Applied, Refusal>;
