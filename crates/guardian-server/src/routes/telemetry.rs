//! `POST /v1/telemetry`: a device reports its sync health.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use guardian_protocol::telemetry::TelemetrySnapshot;
use guardian_protocol::Problem;

use crate::auth::Tenant;
use crate::fleet::Refused;
use crate::problem::{ApiError, ApiJson};
use crate::state::AppState;

/// Stores the device's latest health snapshot (best effort: the engine
/// never waits on it). Only counts, states and timings: no payloads.
#[utoipa::path(post, path = "/v1/telemetry", tag = "telemetry", request_body = TelemetrySnapshot,
    responses((status = 204, description = "Snapshot stored"),
              (status = 400, description = "Malformed or out-of-bounds snapshot", body = Problem, content_type = "application/problem+json"),
              (status = 401, description = "Missing or unknown token", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "The server keeps as many devices as it may", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub(crate) async fn telemetry(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    ApiJson(snapshot): ApiJson<TelemetrySnapshot>,
) -> Response {
    if let Err(e) = snapshot.validate() {
        return ApiError::bad_request(e.to_string()).into_response();
    }
    let now = state.config.clock.now_millis();
    let runner_id = snapshot.runner_id.clone();
    match state.fleet.record(&tenant, snapshot, now) {
        Ok(evicted) => {
            crate::fleet::evaluate_device_alerts(
                &state.fleet,
                state.webhook.as_ref(),
                &tenant,
                &runner_id,
                &evicted,
                now,
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(Refused::Full) => ApiError::new(
            guardian_protocol::problem_type::UNAVAILABLE,
            503,
            "Service unavailable",
            "the server keeps telemetry of as many devices as it may",
        )
        .into_response(),
    }
}
