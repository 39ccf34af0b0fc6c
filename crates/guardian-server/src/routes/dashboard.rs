//! `/dashboard`: the fleet's live page, behind the admin token.
//!
//! The page is one static HTML file compiled into the binary (no build
//! step); it draws its charts as hand-written SVG and updates from
//! `/dashboard/events`, a server-sent-event stream of the dashboard state
//! (bounded: [`Fleet::dashboard`](crate::fleet::Fleet::dashboard)). A
//! browser cannot put the admin token in a header on navigation or on an
//! `EventSource`, so `GET /dashboard?token=<admin token>` trades it for
//! an `HttpOnly`, `SameSite=Strict` session cookie and redirects to
//! `/dashboard`, so the token leaves the address bar. The cookie carries
//! its expiry and a MAC of it under a secret derived from the token, never
//! the token; it is `Secure` when a proxy says the request came over HTTPS.
//! A bearer header works on every route too.

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

use crate::auth::{bearer, digest, secret_eq};
use crate::faults::Faults;
use crate::fleet::DashboardData;
use crate::problem::ApiError;
use crate::state::AppState;

const PAGE: &str = include_str!("dashboard.html");
const COOKIE: &str = "gsync_dashboard";
/// Session cookies of one request checked at most (each check is a hash).
const MAX_COOKIES_CHECKED: usize = 4;
/// How long a dashboard session lasts.
const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// Least time between two events of one stream (the state is sent whole).
const MIN_EVENT_GAP: Duration = Duration::from_millis(200);
/// The fleet's state is the admin's: no cache (a browser's, a proxy's)
/// keeps a copy.
const NO_STORE: (header::HeaderName, &str) = (header::CACHE_CONTROL, "no-store");

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

/// A session cookie's value: its expiry (ms since the epoch, 16 hex digits:
/// a fixed length, so no other message has a MAC an attacker can extend to)
/// and the MAC of it.
fn session_value(secret: &str, expires_ms: i64) -> String {
    use sha2::{Digest, Sha256};
    let expiry = format!("{expires_ms:016x}");
    let mac = Sha256::new()
        .chain_update(secret.as_bytes())
        .chain_update(b"\0")
        .chain_update(expiry.as_bytes())
        .finalize();
    mac.iter().fold(expiry + ".", |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Whether `value` is a session cookie of `secret` that has not expired.
fn session_valid(secret: &str, value: &str, now_ms: i64) -> bool {
    let Some((expiry, _)) = value.split_once('.') else {
        return false;
    };
    let Ok(expires_ms) = i64::from_str_radix(expiry, 16) else {
        return false;
    };
    expiry.len() == 16
        && now_ms < expires_ms
        && secret_eq(value, &digest(&session_value(secret, expires_ms)))
}

/// The values of every session cookie the request carries (a browser may
/// send an old one beside the current one).
fn session_cookies(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// True when the request carries the admin token or a valid session cookie.
fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(admin) = &state.admin_digest else {
        return false;
    };
    let now = state.config.clock.now_millis();
    bearer(headers).is_some_and(|t| secret_eq(t, admin))
        || session_cookies(headers)
            .take(MAX_COOKIES_CHECKED)
            .any(|c| session_valid(&state.dashboard_session, c, now))
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
    let Some(admin) = &state.admin_digest else {
        return ApiError::not_found("the dashboard is disabled (no admin token)").into_response();
    };
    if let Some(token) = q.token {
        if !secret_eq(&token, admin) {
            return ApiError::unauthorized("wrong admin token").into_response();
        }
        let expires = state
            .config
            .clock
            .now_millis()
            .saturating_add(SESSION_TTL_MS);
        let over_https = headers
            .get("x-forwarded-proto")
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
        let cookie = format!(
            "{COOKIE}={}; Path=/dashboard; Max-Age={}; HttpOnly; SameSite=Strict{}",
            session_value(&state.dashboard_session, expires),
            SESSION_TTL_MS / 1000,
            if over_https { "; Secure" } else { "" },
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
            NO_STORE,
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
pub(crate) async fn state_json(State(state): State<AppState>) -> impl IntoResponse {
    ([NO_STORE], Json(snapshot(&state)))
}

/// The dashboard's state as a server-sent-event stream: one `state` event
/// at once, then one per change (at most every 200 ms); ends at shutdown.
pub(crate) async fn events(
    State(state): State<AppState>,
) -> (
    [(header::HeaderName, &'static str); 1],
    Sse<impl Stream<Item = Result<Event, Infallible>>>,
) {
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
    (
        [NO_STORE],
        Sse::new(stream).keep_alive(KeepAlive::default()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_valid_until_it_expires_and_only_as_issued() {
        let secret = session_secret(Some("admin"));
        let v = session_value(&secret, 1_000);
        assert!(session_valid(&secret, &v, 999));
        assert!(!session_valid(&secret, &v, 1_000), "expired");
        assert!(
            !session_valid(&session_secret(Some("other")), &v, 0),
            "another token's"
        );
        // A later expiry with the old MAC, a shortened expiry, garbage.
        let mac = v.split_once('.').unwrap().1;
        assert!(!session_valid(&secret, &format!("{:016x}.{mac}", 9_999), 0));
        assert!(!session_valid(&secret, &format!("3e8.{mac}"), 0));
        for bad in ["", ".", "zz.zz", "0000000000000fff", &v[..v.len() - 1]] {
            assert!(!session_valid(&secret, bad, 0), "{bad:?}");
        }
    }
}
