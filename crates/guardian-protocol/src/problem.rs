//! RFC 9457 problem details, the body of every error response.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Media type of problem documents.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Stable `type` URIs. Clients branch on these, never on `title` or `detail`.
pub mod problem_type {
    /// The entity already exists (create); `current` holds it.
    pub const CONFLICT_EXISTS: &str = "urn:guardian:conflict:exists";
    /// `If-Match` did not match the current version; `current` holds the entity.
    pub const CONFLICT_VERSION: &str = "urn:guardian:conflict:version";
    /// The same idempotency key is still being processed: retry later with the same key.
    pub const IDEMPOTENCY_IN_FLIGHT: &str = "urn:guardian:idempotency:in-flight";
    /// The idempotency key was used before with another method, path or body.
    pub const IDEMPOTENCY_MISMATCH: &str = "urn:guardian:idempotency:mismatch";
    /// A mutation came without an `Idempotency-Key` header.
    pub const IDEMPOTENCY_MISSING: &str = "urn:guardian:idempotency:missing";
    /// A batch op was not applied because the op it depends on (its
    /// `depends_on`) did not succeed (424); send it again after that op.
    pub const DEPENDENCY_FAILED: &str = "urn:guardian:batch:dependency-failed";
    /// An op of an atomic transaction that was not applied because another
    /// op of the same transaction was refused (424): nothing of the
    /// transaction was applied.
    pub const TRANSACTION_ABORTED: &str = "urn:guardian:transaction:aborted";
    /// The server requires `If-Match` on this request (428).
    pub const PRECONDITION_REQUIRED: &str = "urn:guardian:precondition-required";
    /// The entity does not exist.
    pub const NOT_FOUND: &str = "urn:guardian:not-found";
    /// The entity existed and was deleted.
    pub const GONE: &str = "urn:guardian:gone";
    /// The change feed no longer holds the requested cursor: resync. The
    /// problem carries the feed's latest cursor as the [`FEED_HEAD`]
    /// extension member, where the client rejoins after refetching.
    pub const CURSOR_EXPIRED: &str = "urn:guardian:cursor-expired";
    /// Extension member of a [`CURSOR_EXPIRED`] problem: the tenant's
    /// latest cursor (an integer).
    pub const FEED_HEAD: &str = "head";
    /// The request is malformed (JSON, entity type or id, parameters).
    pub const BAD_REQUEST: &str = "urn:guardian:bad-request";
    /// Missing or unknown bearer token.
    pub const UNAUTHORIZED: &str = "urn:guardian:unauthorized";
    /// The body is larger than the server accepts.
    pub const PAYLOAD_TOO_LARGE: &str = "urn:guardian:payload-too-large";
    /// Too many requests: honor `Retry-After`.
    pub const RATE_LIMITED: &str = "urn:guardian:rate-limited";
    /// The server is failing on purpose (fault injection) or overloaded.
    pub const UNAVAILABLE: &str = "urn:guardian:unavailable";
    /// The request took longer than the server allows.
    pub const TIMEOUT: &str = "urn:guardian:timeout";
    /// An unexpected server-side error.
    pub const INTERNAL: &str = "urn:guardian:internal";
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A stable URI from [`problem_type`].
    #[serde(rename = "type")]
    pub problem_type: String,
    /// Short human summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// Human explanation of this occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For conflicts: the server's current entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub current: Option<crate::Entity>,
    /// Other extension members.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extensions: Map<String, Value>,
}

impl Problem {
    /// A problem with a type, title and status, and nothing else.
    pub fn new(problem_type: &str, title: &str, status: u16) -> Self {
        Self {
            problem_type: problem_type.to_owned(),
            title: title.to_owned(),
            status,
            detail: None,
            current: None,
            extensions: Map::new(),
        }
    }

    /// Adds a detail message.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds the server's current entity (conflicts).
    #[must_use]
    pub fn with_current(mut self, current: crate::Entity) -> Self {
        self.current = Some(current);
        self
    }

    /// True when this problem has the given stable type URI.
    pub fn is(&self, problem_type: &str) -> bool {
        self.problem_type == problem_type
    }
}
