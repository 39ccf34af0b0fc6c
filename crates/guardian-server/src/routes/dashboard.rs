//! `/dashboard`: the fleet's live page, behind the admin token.
//!
//! The page is one static HTML file compiled into the binary (no build
//! step); it draws its charts as hand-written SVG and updates from
//! `/dashboard/events`, a server-sent-event stream of the whole dashboard
//! state. A browser cannot put the admin token in a header on navigation or
//! on an `EventSource`, so `GET /dashboard?token=<admin token>` trades it for
//! an `HttpOnly`, `SameSite=Strict` session cookie (a hash of the token,
//! not the token) and redirects to `/dashboard`, so the token
//! leaves the address bar. A bearer header works on every route too.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::auth::bearer;
use crate::faults::Faults;
use crate::fleet::DashboardData;
use crate::problem::ApiError;
use crate::state::AppState;

const PAGE: &str = include_str!("dashboard.html");
const COOKIE: &str = "gsync_dashboard";
/// Least time between two events of one stream (the state is sent whole).
const MIN_EVENT_GAP: Duration = Duration::from_millis(200);

/// The session secret of `admin_token` (hex): a hash, so the cookie never
/// carries the token, yet stable across restarts with the same token (an
/// open page reconnects to a restarted server). Random without a token.
pub(crate) fn session_secret(admin_token: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    let bytes: [u8; 32] = match admin_token {
        Some(t) => Sha256::new()
            .chain_update(b"guardian-dashboard-session\0")
            .chain_update(t.as_bytes())
            .finalize()
            .into(),
        None => rand::random(),
    };
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// True when the request carries the admin token or the session cookie.
fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(admin) = state.config.admin_token.as_deref() else {
        return false;
    };
    bearer(headers).is_some_and(|t| constant_time_eq(t.as_bytes(), admin.as_bytes()))
        || session_cookie(headers)
            .is_some_and(|c| constant_time_eq(c.as_bytes(), state.dashboard_session.as_bytes()))
}

/// Middleware of `/dashboard/*` data routes.
pub(crate) async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.config.admin_token.is_none() {
        return ApiError::not_found("the dashboard is disabled (no admin token)").into_response();
    }
    if authorized(&state, req.headers()) {
        next.run(req).await
    } else {
        ApiError::unauthorized("the dashboard needs the admin token").into_response()
    }
}

/// Query of `GET /dashboard`.
#[derive(Debug, Deserialize)]
pub(crate) struct PageQuery {
    token: Option<String>,
}

/// The page. With `?token=`, trades the admin token for the session cookie.
pub(crate) async fn page(
    State(state): State<AppState>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(admin) = state.config.admin_token.as_deref() else {
        return ApiError::not_found("the dashboard is disabled (no admin token)").into_response();
    };
    if let Some(token) = q.token {
        if !constant_time_eq(token.as_bytes(), admin.as_bytes()) {
            return ApiError::unauthorized("wrong admin token").into_response();
        }
        let cookie = format!(
            "{COOKIE}={}; Path=/dashboard; HttpOnly; SameSite=Strict",
            state.dashboard_session
        );
        return ([(header::SET_COOKIE, cookie)], Redirect::to("/dashboard")).into_response();
    }
    if !authorized(&state, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Html("<!doctype html><title>guardian dashboard</title><p>Open <code>/dashboard?token=&lt;admin token&gt;</code>.</p>"),
        )
            .into_response();
    }
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
        ],
        Html(PAGE),
    )
        .into_response()
}

/// What the page receives.
#[derive(Debug, Serialize)]
pub(crate) struct DashboardState {
    #[serde(flatten)]
    fleet: DashboardData,
    faults: Faults,
}

fn snapshot(state: &AppState) -> DashboardState {
    DashboardState {
        fleet: state.fleet.dashboard(state.config.clock.now_millis()),
        faults: state.faults.get(),
    }
}

/// The dashboard's state as JSON (scripts, tests).
pub(crate) async fn state_json(State(state): State<AppState>) -> Json<DashboardState> {
    Json(snapshot(&state))
}

/// The dashboard's state as a server-sent-event stream: one `state` event
/// at once, then one per change (at most every 200 ms); ends at shutdown.
pub(crate) async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = state.fleet.subscribe();
    let stop = state.shutdown.clone();
    let stream = futures::stream::unfold(
        (state, changes, stop, true),
        |(state, mut changes, mut stop, first)| async move {
            if !first {
                tokio::time::sleep(MIN_EVENT_GAP).await;
                tokio::select! {
                    r = changes.changed() => r.ok()?,
                    _ = stop.wait_for(|s| *s) => return None,
                }
            }
            if *stop.borrow() {
                return None;
            }
            changes.borrow_and_update();
            let data = serde_json::to_string(&snapshot(&state)).unwrap_or_else(|_| "{}".into());
            let event = Event::default().event("state").data(data);
            Some((Ok(event), (state, changes, stop, false)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
