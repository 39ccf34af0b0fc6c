//! Bearer-token authentication: each token belongs to one tenant.
//!
//! Tokens are compared by hash-map lookup and are never logged.

use std::sync::Arc;

use axum::http::{header, HeaderMap};

/// The tenant of the authenticated request (a request extension).
#[derive(Debug, Clone)]
pub(crate) struct Tenant(pub(crate) Arc<str>);

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}
