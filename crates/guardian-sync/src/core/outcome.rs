//! What became of a request, as a transport classifies it (DESIGN §4): the
//! vocabulary the drain machine decides on, free of any HTTP client.

use guardian_protocol::{Entity, Problem};

/// Why a request may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryReason {
    /// Connection refused, reset, DNS, TLS: the request may not have arrived.
    Network,
    /// The request or connection timed out.
    Timeout,
    /// The server answered 408, 425, 429, 500, 502, 503 or 504.
    Server,
    /// The server answered something the protocol does not allow: malformed
    /// or oversized body, unexpected status such as a redirect.
    Protocol,
}

/// The classified result of one mutation (DESIGN §4).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// Applied (2xx). `stored` is what the server now holds, used for
    /// version chaining.
    Applied {
        /// The entity after the change ([`Stored::Nothing`] for a delete).
        stored: Stored,
        /// True when the server replayed a stored response for this key.
        replayed: bool,
    },
    /// A DELETE of an entity that is already gone (404/410): success.
    AlreadyGone,
    /// A data conflict (409 `conflict:*`, 412): definitively not applied;
    /// the reconciler decides what to do.
    Conflict {
        /// The server's problem document.
        problem: Box<Problem>,
    },
    /// Transient: retry the same request, same key, later.
    Retryable {
        /// What kind of failure.
        reason: RetryReason,
        /// HTTP status, when there was a response.
        status: Option<u16>,
        /// Raw `Retry-After` header, when present (parsed by the retry policy).
        retry_after: Option<String>,
        /// Short description, never containing the body.
        detail: String,
        /// Whether this failure says something about server health (the
        /// breaker counts it). `idempotency:in-flight` does not.
        counts_for_breaker: bool,
    },
    /// Authentication failed even after one token refresh: the engine pauses.
    AuthRequired,
    /// A batch op that was not applied because the op it depends on (an
    /// earlier op of its entity in the same batch) did not succeed; the
    /// server recorded nothing under its key (424 `batch:dependency-failed`).
    /// Not an attempt: the op waits in the queue behind its predecessor.
    DependencyFailed,
    /// Will never succeed as is (400, 403, 422, other 4xx): the op fails and is kept.
    Permanent {
        /// HTTP status.
        status: u16,
        /// The problem document, when the server sent a readable one.
        problem: Option<Box<Problem>>,
        /// Short description.
        detail: String,
    },
}

impl Outcome {
    /// A response the protocol does not allow (malformed or oversized body,
    /// unexpected status, an answer that contradicts the request): retried
    /// like any transient failure of the server.
    pub fn protocol(status: Option<u16>, detail: impl Into<String>) -> Self {
        Self::Retryable {
            reason: RetryReason::Protocol,
            status,
            retry_after: None,
            detail: detail.into(),
            counts_for_breaker: true,
        }
    }

    /// A retryable network-level failure.
    pub fn network(reason: RetryReason, detail: impl Into<String>) -> Self {
        Self::Retryable {
            reason,
            status: None,
            retry_after: None,
            detail: detail.into(),
            counts_for_breaker: true,
        }
    }
}

/// What a 2xx answer to a mutation says the server now holds.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Stored {
    /// Nothing the drain uses (a delete).
    Nothing,
    /// The entity as the server now has it.
    Entity(Entity),
    /// The request's data exactly, at `version`: the answer echoed the data
    /// sent byte for byte, so the op's own payload stands for it and the
    /// answer's copy is never decoded.
    AsSent {
        /// The entity's new server version.
        version: u64,
    },
}

impl Stored {
    /// The entity's version after the change, if the answer gave one.
    pub fn version(&self) -> Option<u64> {
        match self {
            Self::Nothing => None,
            Self::Entity(e) => Some(e.version),
            Self::AsSent { version } => Some(*version),
        }
    }

    /// True when the server holds other data than `sent`, the request's
    /// data: an op chained on this one was made from `sent` and must not
    /// be applied on top of it unmerged.
    pub fn differs_from(&self, sent: &serde_json::Value) -> bool {
        matches!(self, Self::Entity(e) if !guardian_protocol::json_eq(&e.data, sent))
    }
}

/// What a fetch of the current server entity found (used by the reconciler).
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// The server returned the entity (possibly a tombstone: `deleted`).
    Present(Entity),
    /// No such entity (404).
    Absent,
    /// The entity was deleted and the server sent no tombstone (410).
    Deleted,
}
