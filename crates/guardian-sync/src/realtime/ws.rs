//! Opening the realtime WebSocket.

use std::time::Duration;

use guardian_protocol::{ChangeFingerprint, SINCE_FINGERPRINT_PARAM};
use reqwest::Url;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header::AUTHORIZATION, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The client side of a realtime connection.
pub(super) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why the upgrade failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    /// 410: the cursor is not servable; resync.
    #[error("cursor expired: {0}")]
    Expired(String),
    /// 401: the token was refused.
    #[error("the server refused the token (401)")]
    Unauthorized,
    /// Anything else: connection refused, timeout, another status.
    #[error("{0}")]
    Failed(String),
}

/// Limits on what the server may send.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_frame: usize,
    pub(super) max_message: usize,
    pub(super) timeout: Duration,
}

/// `url?since=<cursor>[&since_fingerprint=<change at cursor>]` (no query
/// without a cursor: a fingerprint names the change at one); the feed's
/// page URL starts the same way.
pub(super) fn with_since(
    url: &Url,
    since: Option<u64>,
    fingerprint: Option<ChangeFingerprint>,
) -> Url {
    let mut url = url.clone();
    url.set_query(None);
    if let Some(since) = since {
        let mut query = url.query_pairs_mut();
        query.append_pair("since", &since.to_string());
        if let Some(f) = fingerprint {
            query.append_pair(SINCE_FINGERPRINT_PARAM, &f.to_string());
        }
    }
    url
}

/// Connects and upgrades, the token in the `Authorization` header only.
pub(super) async fn connect(
    url: &Url,
    token: &str,
    limits: Limits,
) -> Result<Socket, ConnectError> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Failed(format!("bad realtime URL: {e}")))?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ConnectError::Failed("the token is not a valid header value".to_owned()))?;
    auth.set_sensitive(true);
    request.headers_mut().insert(AUTHORIZATION, auth);
    let config = WebSocketConfig::default()
        .max_frame_size(Some(limits.max_frame))
        .max_message_size(Some(limits.max_message))
        .read_buffer_size(limits.max_frame.min(64 * 1024));
    let attempt = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    match tokio::time::timeout(limits.timeout, attempt).await {
        Err(_) => Err(ConnectError::Failed(format!(
            "connect and upgrade took longer than {:?}",
            limits.timeout
        ))),
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(WsError::Http(response))) => match response.status() {
            StatusCode::UNAUTHORIZED => Err(ConnectError::Unauthorized),
            StatusCode::GONE => Err(ConnectError::Expired(super::poll::problem_detail(
                response.body().as_deref().unwrap_or_default(),
            ))),
            other => Err(ConnectError::Failed(format!(
                "upgrade refused with HTTP {}",
                other.as_u16()
            ))),
        },
        Ok(Err(e)) => Err(ConnectError::Failed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_goes_in_the_query_and_nothing_else() {
        let url = Url::parse("ws://h:1/v1/realtime").unwrap();
        assert_eq!(
            with_since(&url, Some(9), None).as_str(),
            "ws://h:1/v1/realtime?since=9"
        );
        let fp = ChangeFingerprint::of("note", "n1", 3);
        assert_eq!(
            with_since(&url, Some(9), Some(fp)).as_str(),
            format!("ws://h:1/v1/realtime?since=9&since_fingerprint={fp}")
        );
        assert_eq!(
            with_since(&url, None, Some(fp)).as_str(),
            "ws://h:1/v1/realtime"
        );
    }
}
