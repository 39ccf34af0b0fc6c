//! `/v1/entities/{type}[/{id}]`: create, read, update, delete.

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use guardian_protocol::{
    validate_entity_id, validate_entity_type, CreateRequest, Entity, MutationKind, Problem,
    UpdateRequest,
};

use super::mutate::{execute, if_match_header, key_header, op_response, prepare, RequestCtx, Slot};
use crate::auth::Tenant;
use crate::problem::{ApiError, ApiJson};
use crate::state::AppState;
use crate::store::{Applied, MutationInput, Refusal};

fn path_error(e: &PathRejection) -> ApiError {
    ApiError::bad_request(format!("bad path: {e}"))
}

/// Runs one mutation and renders its response.
async fn single(state: &AppState, tenant: &Tenant, ctx: &RequestCtx, slot: Slot) -> Response {
    match execute(state, &tenant.0, ctx, vec![slot]).await {
        Ok(mut results) => match results.pop() {
            Some(r) => op_response(r),
            None => ApiError::internal("no result").into_response(),
        },
        Err(e) => e.into_response(),
    }
}

fn slot(r: Result<MutationInput, ApiError>) -> Slot {
    match r {
        Ok(input) => Slot::Ready(input),
        Err(e) => Slot::Done(Err(e)),
    }
}

/// A 200 answer carrying `entity` (a GET).
fn found(entity: &Entity) -> Applied {
    Applied {
        status: 200,
        body: serde_json::to_value(entity)
            .unwrap_or(serde_json::Value::Null)
            .to_string(),
        replayed: false,
        version: Some(entity.version),
    }
}

/// Creates an entity.
#[utoipa::path(
    post,
    path = "/v1/entities/{type}",
    tag = "entities",
    params(
        ("type" = String, Path, description = "Entity type", pattern = r"^[a-z][a-z0-9_]{0,63}$"),
        ("Idempotency-Key" = String, Header, description = "Client-chosen key, 1 to 255 visible ASCII characters; the same key on every retry", pattern = r"^[\x21-\x7e]{1,255}$"),
    ),
    request_body = CreateRequest,
    responses(
        (status = 201, description = "Created (or re-created over a tombstone, version continuing)", body = Entity,
            headers(("ETag" = String, description = "Quoted version"))),
        (status = 400, description = "Malformed JSON, bad type or id, data not an object, or no Idempotency-Key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict:exists` with `current`, or `idempotency:in-flight`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`idempotency:mismatch`: the key was used for another request", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ctx: RequestCtx,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateRequest>,
) -> Response {
    let entity_type = match path {
        Ok(Path(t)) => t,
        Err(e) => return path_error(&e).into_response(),
    };
    let key = match key_header(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let input = prepare(
        &key,
        MutationKind::Create,
        &entity_type,
        &body.id,
        Some(body.data),
        None,
    );
    single(&state, &tenant, &ctx, slot(input)).await
}

/// Reads an entity.
#[utoipa::path(
    get,
    path = "/v1/entities/{type}/{id}",
    tag = "entities",
    params(
        ("type" = String, Path, description = "Entity type", pattern = r"^[a-z][a-z0-9_]{0,63}$"),
        ("id" = String, Path, description = "Entity id (`.` and `..` cannot be addressed in a URL path)", pattern = r"^(?!\.\.?$)[A-Za-z0-9._-]{1,128}$"),
    ),
    responses(
        (status = 200, description = "The entity", body = Entity, headers(("ETag" = String, description = "Quoted version"))),
        (status = 400, description = "`bad-request`: the type or id does not match its pattern", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`gone`: deleted; `current` is the tombstone", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let (entity_type, id) = match path {
        Ok(Path(p)) => p,
        Err(e) => return path_error(&e).into_response(),
    };
    if let Err(e) = validate_entity_type(&entity_type).and_then(|()| validate_entity_id(&id)) {
        return ApiError::bad_request(e.to_string()).into_response();
    }
    match state
        .store
        .get(tenant.0, entity_type.clone(), id.clone())
        .await
    {
        Ok(Some(e)) if e.deleted => ApiError::from(Refusal::Gone {
            entity: format!("{entity_type}/{id}"),
            current: Some(Box::new(e)),
        })
        .into_response(),
        Ok(Some(e)) => op_response(Ok(found(&e))),
        Ok(None) => ApiError::from(Refusal::NotFound {
            entity: format!("{entity_type}/{id}"),
        })
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "read failed");
            ApiError::internal("the database failed").into_response()
        }
    }
}

/// Replaces an entity's data.
#[utoipa::path(
    put,
    path = "/v1/entities/{type}/{id}",
    tag = "entities",
    params(
        ("type" = String, Path, description = "Entity type", pattern = r"^[a-z][a-z0-9_]{0,63}$"),
        ("id" = String, Path, description = "Entity id (`.` and `..` cannot be addressed in a URL path)", pattern = r"^(?!\.\.?$)[A-Za-z0-9._-]{1,128}$"),
        ("Idempotency-Key" = String, Header, description = "Client-chosen key, 1 to 255 visible ASCII characters; the same key on every retry", pattern = r"^[\x21-\x7e]{1,255}$"),
        ("If-Match" = Option<String>, Header, description = "Expected version, quoted (`\"3\"`) or `*`; required when the server runs with --require-if-match", pattern = r#"^(\*|"[0-9]{1,19}"|[0-9]{1,19})$"#),
    ),
    request_body = UpdateRequest,
    responses(
        (status = 200, description = "Updated", body = Entity, headers(("ETag" = String, description = "Quoted version"))),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict:version` with `current`, or `idempotency:in-flight`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`gone`: the entity was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`idempotency:mismatch`", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "`precondition-required`: If-Match is required", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn update(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ctx: RequestCtx,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UpdateRequest>,
) -> Response {
    let (entity_type, id) = match path {
        Ok(Path(p)) => p,
        Err(e) => return path_error(&e).into_response(),
    };
    let (key, if_match) =
        match key_header(&headers).and_then(|k| Ok((k, if_match_header(&headers)?))) {
            Ok(v) => v,
            Err(e) => return e.into_response(),
        };
    let input = prepare(
        &key,
        MutationKind::Update,
        &entity_type,
        &id,
        Some(body.data),
        if_match,
    );
    single(&state, &tenant, &ctx, slot(input)).await
}

/// Deletes an entity (leaves a tombstone).
#[utoipa::path(
    delete,
    path = "/v1/entities/{type}/{id}",
    tag = "entities",
    params(
        ("type" = String, Path, description = "Entity type", pattern = r"^[a-z][a-z0-9_]{0,63}$"),
        ("id" = String, Path, description = "Entity id (`.` and `..` cannot be addressed in a URL path)", pattern = r"^(?!\.\.?$)[A-Za-z0-9._-]{1,128}$"),
        ("Idempotency-Key" = String, Header, description = "Client-chosen key, 1 to 255 visible ASCII characters; the same key on every retry", pattern = r"^[\x21-\x7e]{1,255}$"),
        ("If-Match" = Option<String>, Header, description = "Expected version, quoted, or `*`", pattern = r#"^(\*|"[0-9]{1,19}"|[0-9]{1,19})$"#),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`bad-request`: bad type or id, bad If-Match, or `idempotency:missing`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict:version` with `current`, or `idempotency:in-flight`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`gone`: already deleted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`idempotency:mismatch`", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "`precondition-required`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ctx: RequestCtx,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let (entity_type, id) = match path {
        Ok(Path(p)) => p,
        Err(e) => return path_error(&e).into_response(),
    };
    let (key, if_match) =
        match key_header(&headers).and_then(|k| Ok((k, if_match_header(&headers)?))) {
            Ok(v) => v,
            Err(e) => return e.into_response(),
        };
    let input = prepare(
        &key,
        MutationKind::Delete,
        &entity_type,
        &id,
        None,
        if_match,
    );
    single(&state, &tenant, &ctx, slot(input)).await
}
