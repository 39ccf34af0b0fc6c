//! The OpenAPI 3.1 document of the protocol, generated from the handlers'
//! annotations so it cannot drift from the code. Served at `/openapi.json`
//! and committed as `docs/openapi.json` (a test compares the two).

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{admin, batch, changes, entities, health, realtime, telemetry, transactions};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "guardian-sync wire protocol",
        version = "1",
        description = "Wire protocol v1 of guardian-sync (DESIGN §10), as served by guardian-server. \
Every error is an RFC 9457 problem document (`application/problem+json`) whose `type` is a stable URI \
(`urn:guardian:...`); clients branch on `type`. Every mutation needs an `Idempotency-Key`; a repeat replays \
the stored response with `Idempotent-Replayed: true`. ETag and If-Match carry the version as a quoted string."
    ),
    paths(
        entities::create, entities::get, entities::update, entities::delete,
        batch::batch, transactions::transactions, changes::changes, realtime::realtime, telemetry::telemetry,
        health::healthz, health::metrics, serve,
        admin::get_faults, admin::put_faults, admin::applied, admin::disconnect,
    ),
    components(schemas(
        guardian_protocol::Entity, guardian_protocol::CreateRequest, guardian_protocol::UpdateRequest,
        guardian_protocol::MutationKind, guardian_protocol::BatchOp, guardian_protocol::BatchRequest,
        guardian_protocol::BatchResult, guardian_protocol::BatchResponse,
        guardian_protocol::TransactionRequest, guardian_protocol::TransactionResponse, guardian_protocol::Change,
        guardian_protocol::ChangesPage, guardian_protocol::RealtimeFrame, guardian_protocol::Problem,
        crate::faults::Faults, crate::faults::RetryAfter, crate::faults::RetryAfterForm,
        crate::store::AppliedMutation,
        guardian_protocol::telemetry::TelemetrySnapshot, guardian_protocol::telemetry::QueueDepth,
        guardian_protocol::telemetry::BreakerStateName,
    )),
    modifiers(&Security, &CommonResponses),
    tags(
        (name = "entities", description = "Versioned entities"),
        (name = "batch", description = "Many mutations in one request"),
        (name = "transactions", description = "Mutations of several entities, all or nothing"),
        (name = "changes", description = "The per-tenant change feed"),
        (name = "realtime", description = "The change feed over WebSocket"),
        (name = "telemetry", description = "Devices' sync health (best effort)"),
        (name = "ops", description = "Health, metrics, this document"),
        (name = "admin", description = "Fault injection and test hooks (admin token)"),
    )
)]
struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of the protocol", body = Object)))]
pub(crate) async fn serve() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["bearer", "admin"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// Adds the statuses the middleware and the body extractor can answer on
/// every operation they wrap, so that no route's list misses one:
/// `/v1` routes 400 (malformed), 401 (token), 408 (the body too slow), 413
/// (declared or actual size), 429 (rate limit, injected), 500 (database,
/// injected), 502 (injected) and 503 (request timeout, injected); routes
/// with a JSON body 400, 413 and 415 (not JSON); `/admin` routes
/// 401 (admin token), 404 (disabled: no admin token configured) and 429
/// (locked out).
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in &mut openapi.paths.paths {
            let ops = [
                item.get.as_mut(),
                item.put.as_mut(),
                item.post.as_mut(),
                item.delete.as_mut(),
            ];
            for op in ops.into_iter().flatten() {
                let has_body = op.request_body.is_some();
                if path.starts_with("/v1/") {
                    add(
                        op,
                        401,
                        "`unauthorized`: no bearer token, or an unknown one",
                    );
                    add(op, 429, "`rate-limited` (tenant rate limit, or an injected fault): retry after `Retry-After`");
                    add(op, 500, "`internal`: the database failed before the commit, or an injected fault; nothing was applied");
                    add(
                        op,
                        502,
                        "`unavailable`: an injected fault; nothing was applied",
                    );
                    add(op, 503, "`timeout` (the request timeout expired before the transaction began: nothing was applied; or the transaction ran on as long again: outcome unknown) or `unavailable` (an injected fault, or the server holds as many request bodies as it may: nothing was applied; or the database connection was lost during the commit: outcome unknown); retry after `Retry-After` with the same `Idempotency-Key`");
                } else if path.starts_with("/admin/") {
                    add(op, 401, "`unauthorized`: not the admin token");
                    add(op, 404, "`not-found`: the admin routes are disabled (the server has no admin token)");
                    add(op, 429, "`rate-limited`: too many wrong admin tokens from this address; retry after `Retry-After`");
                }
                if has_body {
                    add(
                        op,
                        400,
                        "`bad-request`: malformed JSON or an unexpected shape",
                    );
                    add(op, 413, TOO_LARGE);
                    add(op, 415, "`bad-request`: the body is not `application/json`");
                }
                if path.starts_with("/v1/") {
                    // Every `/v1` request's body, declared or not, is read
                    // whole before it is handled.
                    add(op, 400, "`bad-request`: a malformed request or body");
                    add(op, 408, "`timeout`: the body did not arrive within the request timeout; nothing was applied, the connection is closed");
                    add(op, 413, TOO_LARGE);
                }
            }
        }
    }
}

const TOO_LARGE: &str = "`payload-too-large`: the body (declared or sent) is over the body limit";

/// Adds a problem response for `status` unless the operation declares it.
fn add(op: &mut Operation, status: u16, description: &str) {
    op.responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        guardian_protocol::PROBLEM_CONTENT_TYPE,
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("Problem")))
                            .build(),
                    )
                    .build(),
            )
        });
}

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The OpenAPI document as pretty JSON with a trailing newline, exactly as
/// committed in `docs/openapi.json`.
pub fn document_json() -> String {
    let mut s = document()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".to_owned());
    s.push('\n');
    s
}
