//! HTTP routes and the middleware stack.
//!
//! Every route (outermost): the access log (`routes/middleware.rs`).
//! `/v1/*` (outer to inner): metrics → request timeout → bearer auth →
//! rate limit → whole body read → concurrency slot → injected faults →
//! handler. `/admin/*`: metrics → lockout of addresses that failed the
//! admin token too often → admin token.
//! `/healthz`, `/metrics`, `/openapi.json`: metrics only. `/v1/telemetry`:
//! like `/v1/*` without injected faults. `/dashboard*`: metrics → lockout →
//! admin token or dashboard session cookie.

pub(crate) mod admin;
pub(crate) mod batch;
pub(crate) mod changes;
pub(crate) mod dashboard;
pub(crate) mod entities;
pub(crate) mod health;
pub(crate) mod middleware;
pub(crate) mod mutate;
pub mod openapi;
pub(crate) mod realtime;
pub(crate) mod telemetry;
pub(crate) mod transactions;

use std::sync::Arc;

use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::faults::layer::FaultLayer;
use crate::problem::ApiError;
use crate::state::AppState;
use middleware::{access_log, admin_lockout, admit, authenticate, deadline, track};

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
        .route("/v1/transactions", post(transactions::transactions))
        .route("/v1/changes", get(changes::changes))
        .route("/v1/realtime", get(realtime::realtime))
        .layer(FaultLayer::new(
            Arc::clone(&state.faults),
            Arc::clone(&state.metrics),
            Arc::clone(&state.config.clock),
        ))
        .layer(from_fn_with_state(state.clone(), admit))
        .layer(from_fn_with_state(state.clone(), authenticate))
        .layer(from_fn_with_state(state.clone(), deadline));
    // Telemetry is best effort and no part of the protocol's data path:
    // authenticated and rate limited, but exempt from injected faults.
    let telemetry = Router::new()
        .route("/v1/telemetry", post(telemetry::telemetry))
        .layer(from_fn_with_state(state.clone(), admit))
        .layer(from_fn_with_state(state.clone(), authenticate))
        .layer(from_fn_with_state(state.clone(), deadline));
    let dashboard = Router::new()
        .route("/dashboard/state", get(dashboard::state_json))
        .route("/dashboard/events", get(dashboard::events))
        .layer(from_fn_with_state(state.clone(), dashboard::guard))
        .route("/dashboard", get(dashboard::page))
        .layer(from_fn_with_state(state.clone(), admin_lockout));
    let admin = Router::new()
        .route(
            "/admin/faults",
            get(admin::get_faults).put(admin::put_faults),
        )
        .route("/admin/applied", get(admin::applied))
        .route("/admin/realtime/disconnect", post(admin::disconnect))
        .layer(from_fn_with_state(state.clone(), admin::guard))
        .layer(from_fn_with_state(state.clone(), admin_lockout));
    let ops = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::serve));
    Router::new()
        .merge(v1)
        .merge(telemetry)
        .merge(dashboard)
        .merge(admin)
        .merge(ops)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), track))
        .layer(access_log())
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
