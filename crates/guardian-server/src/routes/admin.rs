//! `/admin/*`: run-time fault settings and test hooks, guarded by the admin
//! token (absent → the routes answer 404).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use guardian_protocol::Problem;
use serde::Serialize;

use crate::auth::{bearer, secret_eq};
use crate::faults::Faults;
use crate::problem::{ApiError, ApiJson};
use crate::state::AppState;
use crate::store::{AppliedMutation, StoreError};

/// Middleware: the admin token.
pub(crate) async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = &state.admin_digest else {
        return ApiError::not_found("the admin routes are disabled (no admin token)")
            .into_response();
    };
    match bearer(req.headers()) {
        Some(given) if secret_eq(given, expected) => next.run(req).await,
        _ => ApiError::unauthorized("the admin routes need the admin bearer token").into_response(),
    }
}

/// Reads the current fault settings.
#[utoipa::path(get, path = "/admin/faults", tag = "admin",
    responses((status = 200, description = "Current faults", body = Faults),
              (status = 401, description = "Wrong admin token", body = Problem, content_type = "application/problem+json")),
    security(("admin" = [])))]
pub(crate) async fn get_faults(State(state): State<AppState>) -> Json<Faults> {
    Json(state.faults.get())
}

/// Replaces the fault settings (reseeding the generator).
#[utoipa::path(put, path = "/admin/faults", tag = "admin", request_body = Faults,
    responses((status = 200, description = "The new faults", body = Faults),
              (status = 400, description = "Invalid faults", body = Problem, content_type = "application/problem+json"),
              (status = 401, description = "Wrong admin token", body = Problem, content_type = "application/problem+json")),
    security(("admin" = [])))]
pub(crate) async fn put_faults(
    State(state): State<AppState>,
    ApiJson(faults): ApiJson<Faults>,
) -> Response {
    if let Err(e) = faults.validate() {
        return ApiError::bad_request(e.to_string()).into_response();
    }
    tracing::info!("fault settings changed");
    state.faults.set(faults.clone());
    Json(faults).into_response()
}

/// Every applied mutation, for tests that run the server out of process.
#[utoipa::path(get, path = "/admin/applied", tag = "admin",
    responses((status = 200, description = "The applied-mutations log, in order", body = Vec<AppliedMutation>),
              (status = 404, description = "`not-found`: the server keeps no applied-mutations log", body = Problem, content_type = "application/problem+json"),
              (status = 500, description = "`internal`: the database failed", body = Problem, content_type = "application/problem+json")),
    security(("admin" = [])))]
pub(crate) async fn applied(State(state): State<AppState>) -> Response {
    match state.store.applied_log().await {
        Ok(log) => Json(log).into_response(),
        Err(e @ StoreError::AppliedLogOff) => ApiError::not_found(e.to_string()).into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

/// What `POST /admin/realtime/disconnect` did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Disconnected {
    /// How many realtime sessions were open.
    pub(crate) sessions: usize,
}

/// Closes every realtime session (clients should reconnect and resume).
#[utoipa::path(post, path = "/admin/realtime/disconnect", tag = "admin",
    responses((status = 200, description = "Sessions were told to close", body = Disconnected)),
    security(("admin" = [])))]
pub(crate) async fn disconnect(State(state): State<AppState>) -> Json<Disconnected> {
    let sessions = state.kick.receiver_count();
    state.kick.send_modify(|n| *n += 1);
    Json(Disconnected { sessions })
}
