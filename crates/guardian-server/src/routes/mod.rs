//! HTTP routes and the middleware stack.
//!
//! `/v1/*` (outer to inner): metrics → timeout + concurrency → bearer auth →
//! rate limit → injected faults → handler. `/admin/*`: metrics → admin token.
//! `/healthz`, `/metrics`, `/openapi.json`: metrics only. `/v1/telemetry`:
//! like `/v1/*` without injected faults. `/dashboard*`: metrics → admin
//! token or dashboard session cookie.

pub(crate) mod admin;
pub(crate) mod batch;
pub(crate) mod changes;
pub(crate) mod dashboard;
pub(crate) mod entities;
pub(crate) mod health;
pub(crate) mod mutate;
pub(crate) mod realtime;
pub(crate) mod telemetry;

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::problem::ApiError;
use crate::state::AppState;
use crate::{auth, limits, metrics};

/// The whole application.
pub(crate) fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/entities/{type}", post(entities::create))
        .route(
            "/v1/entities/{type}/{id}",
            get(entities::get)
                .put(entities::update)
                .delete(entities::delete),
        )
        .route("/v1/batch", post(batch::batch))
        .route("/v1/changes", get(changes::changes))
        .route("/v1/realtime", get(realtime::realtime))
        .layer(from_fn_with_state(state.clone(), inject_faults))
        .layer(from_fn_with_state(state.clone(), limits::rate_limit))
        .layer(from_fn_with_state(state.clone(), auth::authenticate))
        .layer(from_fn_with_state(
            state.clone(),
            limits::timeout_and_concurrency,
        ));
    // Telemetry is best effort and no part of the protocol's data path:
    // authenticated and rate limited, but exempt from injected faults.
    let telemetry = Router::new()
        .route("/v1/telemetry", post(telemetry::telemetry))
        .layer(from_fn_with_state(state.clone(), limits::rate_limit))
        .layer(from_fn_with_state(state.clone(), auth::authenticate))
        .layer(from_fn_with_state(
            state.clone(),
            limits::timeout_and_concurrency,
        ));
    let dashboard = Router::new()
        .route("/dashboard/state", get(dashboard::state_json))
        .route("/dashboard/events", get(dashboard::events))
        .layer(from_fn_with_state(state.clone(), dashboard::guard))
        .route("/dashboard", get(dashboard::page));
    let admin = Router::new()
        .route(
            "/admin/faults",
            get(admin::get_faults).put(admin::put_faults),
        )
        .route("/admin/applied", get(admin::applied))
        .route("/admin/realtime/disconnect", post(admin::disconnect))
        .layer(from_fn_with_state(state.clone(), admin::guard));
    let ops = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(health::openapi));
    Router::new()
        .merge(v1)
        .merge(telemetry)
        .merge(dashboard)
        .merge(admin)
        .merge(ops)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), metrics::track))
        .with_state(state)
}

async fn not_found() -> Response {
    ApiError::not_found("no such route").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(
        guardian_protocol::problem_type::BAD_REQUEST,
        405,
        "Method not allowed",
        "this route does not accept this method",
    )
    .into_response()
}

/// Middleware: injected failures and latency. Mutations get their latency
/// inside the pipeline (after the key is reserved); the WebSocket is exempt.
async fn inject_faults(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/v1/realtime" {
        return next.run(req).await;
    }
    if let Some(failure) = state.faults.request_failure() {
        state.metrics.injected_failure();
        let (problem_type, title) = match failure.status {
            429 => (
                guardian_protocol::problem_type::RATE_LIMITED,
                "Too many requests",
            ),
            500 => (
                guardian_protocol::problem_type::INTERNAL,
                "Internal server error",
            ),
            _ => (
                guardian_protocol::problem_type::UNAVAILABLE,
                "Service unavailable",
            ),
        };
        let mut err = ApiError::new(
            problem_type,
            failure.status,
            title,
            "failure injected by the server's fault settings; nothing was applied",
        );
        if let Some(ra) = failure.retry_after {
            err = err.with_header(
                header::RETRY_AFTER,
                ra.header_value(state.config.clock.now_millis()),
            );
        }
        return err.into_response();
    }
    if req.method() == Method::GET || req.method() == Method::HEAD {
        let latency = state.faults.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
    next.run(req).await
}
