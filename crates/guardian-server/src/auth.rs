//! Bearer-token authentication: each token belongs to one tenant.
//!
//! Tokens are compared by hash-map lookup and are never logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::problem::ApiError;
use crate::state::AppState;

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

/// Middleware: resolves the tenant or answers 401.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let tenant = match bearer(req.headers()) {
        None => {
            return ApiError::unauthorized("send Authorization: Bearer <token>").into_response()
        }
        Some(token) => match state.config.tokens.get(token) {
            Some(tenant) => Arc::clone(tenant),
            None => return ApiError::unauthorized("unknown bearer token").into_response(),
        },
    };
    req.extensions_mut().insert(Tenant(tenant));
    next.run(req).await
}
