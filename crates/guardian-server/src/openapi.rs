//! The OpenAPI 3.1 document of the protocol, generated from the handlers'
//! annotations so it cannot drift from the code. Served at `/openapi.json`
//! and committed as `docs/openapi.json` (a test compares the two).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{admin, batch, changes, entities, health, realtime, telemetry};

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
        batch::batch, changes::changes, realtime::realtime, telemetry::telemetry,
        health::healthz, health::metrics, health::openapi,
        admin::get_faults, admin::put_faults, admin::applied, admin::disconnect,
    ),
    components(schemas(
        guardian_protocol::Entity, guardian_protocol::CreateRequest, guardian_protocol::UpdateRequest,
        guardian_protocol::MutationKind, guardian_protocol::BatchOp, guardian_protocol::BatchRequest,
        guardian_protocol::BatchResult, guardian_protocol::BatchResponse, guardian_protocol::Change,
        guardian_protocol::ChangesPage, guardian_protocol::RealtimeFrame, guardian_protocol::Problem,
        crate::faults::Faults, crate::faults::RetryAfter, crate::faults::RetryAfterForm,
        crate::store::AppliedMutation,
        guardian_protocol::telemetry::TelemetrySnapshot, guardian_protocol::telemetry::QueueDepth,
        guardian_protocol::telemetry::BreakerStateName,
    )),
    modifiers(&Security),
    tags(
        (name = "entities", description = "Versioned entities"),
        (name = "batch", description = "Many mutations in one request"),
        (name = "changes", description = "The per-tenant change feed"),
        (name = "realtime", description = "The change feed over WebSocket"),
        (name = "telemetry", description = "Devices' sync health (best effort)"),
        (name = "ops", description = "Health, metrics, this document"),
        (name = "admin", description = "Fault injection and test hooks (admin token)"),
    )
)]
struct ApiDoc;

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
