//! One poll of `GET /v1/changes?since=&limit=` (the fallback path).

use guardian_protocol::{problem_type, ChangeFingerprint, ChangesPage};
use reqwest::{StatusCode, Url};

use crate::transport::{read_bounded, Auth, BodyError, TokenError};

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    /// 410 `cursor-expired`: the app must resync, from `head` if the server
    /// said where its feed is now.
    #[error("cursor expired: {reason}")]
    Expired {
        /// The problem's detail.
        reason: String,
        /// The feed's latest cursor, from the problem's `head` member.
        head: Option<u64>,
    },
    /// Still 401 after one token refresh.
    #[error("the server refused the token (401)")]
    Unauthorized,
    /// The app supplied no token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Any other non-success status.
    #[error("the feed answered HTTP {0}")]
    Status(u16),
    /// Connect, timeout, or a broken body.
    #[error("feed request failed: {0}")]
    Network(#[from] reqwest::Error),
    /// The body exceeded the configured limit.
    #[error("feed response larger than {0} bytes")]
    TooLarge(usize),
    /// The body is not a change page.
    #[error("malformed feed response: {0}")]
    Malformed(String),
}

/// `base/v1/changes?since=..[&since_fingerprint=..]&limit=..`.
pub(super) fn changes_url(
    base: &Url,
    since: u64,
    fingerprint: Option<ChangeFingerprint>,
    limit: usize,
) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(["v1", "changes"]);
    }
    // The cursor and its change go as on the WebSocket.
    let mut url = super::ws::with_since(&url, Some(since), fingerprint);
    url.query_pairs_mut()
        .append_pair("limit", &limit.to_string());
    url
}

/// Fetches one page after `since`, refreshing the token once on a 401
/// (through the single-flight [`Auth`], as the transport does).
pub(super) async fn fetch(
    http: &reqwest::Client,
    url: Url,
    auth: &Auth,
    max_body: usize,
) -> Result<ChangesPage, FetchError> {
    let token = auth.token().await?;
    let mut resp = http.get(url.clone()).bearer_auth(&token).send().await?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        tracing::debug!("feed poll got 401; refreshing the token once");
        let fresh = auth.refreshed(&token).await?;
        resp = http.get(url).bearer_auth(&fresh).send().await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(FetchError::Unauthorized);
        }
    }
    let status = resp.status();
    let body = read_bounded(resp, max_body).await.map_err(|e| match e {
        BodyError::TooLarge(max) => FetchError::TooLarge(max),
        BodyError::Network(e) => FetchError::Network(e),
    })?;
    if status == StatusCode::GONE {
        return Err(expired(&body));
    }
    if !status.is_success() {
        return Err(FetchError::Status(status.as_u16()));
    }
    serde_json::from_slice(&body).map_err(|e| FetchError::Malformed(super::json_error(&e)))
}

/// A 410's problem body, parsed once: its `detail` (for logs and the
/// `Resync` reason; the problem `type` is checked so an unrelated 410 is
/// still reported as such) and, from a `cursor-expired` problem only, the
/// `head` member where the feed is now.
fn gone_problem(body: &[u8]) -> (String, Option<u64>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return ("410 without a problem body".to_owned(), None);
    };
    let detail = v
        .get("detail")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("cursor expired");
    match v.get("type").and_then(serde_json::Value::as_str) {
        Some(problem_type::CURSOR_EXPIRED) => (
            detail.to_owned(),
            v.get(problem_type::FEED_HEAD)
                .and_then(serde_json::Value::as_u64),
        ),
        None => (detail.to_owned(), None),
        Some(other) => (format!("{other}: {detail}"), None),
    }
}

fn expired(body: &[u8]) -> FetchError {
    let (reason, head) = gone_problem(body);
    FetchError::Expired { reason, head }
}

/// The `detail` of a 410 problem body (see [`gone_problem`]).
pub(super) fn problem_detail(body: &[u8]) -> String {
    gone_problem(body).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_is_read_only_from_a_cursor_expired_problem() {
        let expired =
            br#"{"type":"urn:guardian:cursor-expired","title":"t","status":410,"head":42}"#;
        assert_eq!(gone_problem(expired).1, Some(42));
        let other = br#"{"type":"urn:guardian:gone","title":"t","status":410,"head":42}"#;
        assert_eq!(gone_problem(other).1, None);
        let negative =
            br#"{"type":"urn:guardian:cursor-expired","title":"t","status":410,"head":-1}"#;
        assert_eq!(gone_problem(negative).1, None);
        assert_eq!(gone_problem(b"not json").1, None);
        assert_eq!(
            gone_problem(br#"{"type":"urn:guardian:cursor-expired"}"#).1,
            None
        );
    }

    #[test]
    fn url_keeps_the_base_path() {
        let base = Url::parse("http://h:1/api/").unwrap();
        assert_eq!(
            changes_url(&base, 5, None, 100).as_str(),
            "http://h:1/api/v1/changes?since=5&limit=100"
        );
        let base = Url::parse("http://h:1").unwrap();
        assert_eq!(
            changes_url(&base, 0, None, 1).as_str(),
            "http://h:1/v1/changes?since=0&limit=1"
        );
        let fp = ChangeFingerprint::of("note", "n1", 3);
        assert_eq!(
            changes_url(&base, 5, Some(fp), 100).as_str(),
            format!("http://h:1/v1/changes?since=5&since_fingerprint={fp}&limit=100")
        );
    }
}
