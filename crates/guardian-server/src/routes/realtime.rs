//! `GET /v1/realtime?since=&since_fingerprint=`: the change feed pushed over
//! a WebSocket.
//!
//! The session subscribes to the broadcast *before* reading the backlog, so a
//! change committed in between is seen at least once; every frame is sent
//! only if its cursor is above the last one sent, so none is sent twice. A
//! gap (a lagging receiver, or a change out of order) is filled from the
//! database, and so is a doorbell (a commit of another server instance on
//! the same PostgreSQL database). The server pings every `ws_ping_interval`
//! and closes a peer silent for `ws_idle_timeout`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use guardian_protocol::{problem_type, Change, Problem, RealtimeFrame};
use tokio::sync::{broadcast, watch};
use tokio::time::{Duration, Instant};

use super::changes::{param, since_fingerprint};
use crate::auth::Tenant;
use crate::problem::ApiError;
use crate::state::AppState;
use crate::store::FeedEvent;

/// Backlog page size.
const PAGE: usize = 500;
/// Close code "going away" (RFC 6455 §7.4.1).
const GOING_AWAY: u16 = 1001;
/// Close code: the server is overloaded; the client may try again later.
const TRY_AGAIN_LATER: u16 = 1013;
/// Close code "policy violation", used for a cursor that expired mid-session.
const POLICY: u16 = 1008;

/// Largest message or frame a realtime client may send.
const CLIENT_MESSAGE_MAX: usize = 64 * 1024;

/// Opens the realtime feed.
#[utoipa::path(
    get,
    path = "/v1/realtime",
    tag = "realtime",
    params(
        ("since" = Option<u64>, Query, description = "Resume after this cursor; without it only live changes are sent", minimum = 0),
        ("since_fingerprint" = Option<String>, Query, description = "The fingerprint of the change the client holds at `since`, as for `GET /v1/changes`: if the feed's change there is another one, the upgrade is refused with 410 `cursor-expired`. Needs `since`", min_length = 16, max_length = 16, pattern = "^[0-9a-f]{16}$"),
    ),
    responses(
        (status = 101, description = "WebSocket: a `hello` frame with the current cursor, then `change` frames (`{\"type\":\"change\",\"change\":{...}}`), backlog first, then live", body = RealtimeFrame),
        (status = 400, description = "Not a WebSocket upgrade, or bad parameters", body = Problem, content_type = "application/problem+json"),
        (status = 426, description = "The connection cannot be upgraded (not HTTP/1.1)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`cursor-expired`: `since` is not servable, or the change at `since` is not the one `since_fingerprint` names", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn realtime(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        // A client sends only control frames (pings, pongs, close); without
        // these limits tungstenite buffers messages of up to 64 MiB.
        Ok(ws) => ws
            .max_message_size(CLIENT_MESSAGE_MAX)
            .max_frame_size(CLIENT_MESSAGE_MAX),
        Err(e) => {
            return ApiError::new(
                problem_type::BAD_REQUEST,
                e.status().as_u16(),
                "WebSocket upgrade required",
                format!("this route speaks WebSocket only: {e}"),
            )
            .into_response()
        }
    };
    let (since, holds) = match param(&query, "since")
        .and_then(|since| Ok((since, since_fingerprint(&query, since)?)))
    {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    // Subscribe before anything is read so no commit (and no disconnect
    // order) can slip between.
    let rx = state.store.subscribe();
    let kick = state.kick.subscribe();
    let cursor = match state
        .store
        .check_since(Arc::clone(&tenant.0), since, holds)
        .await
    {
        Ok(Ok(cursor)) => cursor,
        Ok(Err(refusal)) => return ApiError::from(&refusal).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "feed read failed");
            return ApiError::internal("the database failed").into_response();
        }
    };
    ws.on_upgrade(move |socket| async move {
        let session = Session {
            last_sent: since.unwrap_or(cursor),
            tenant: tenant.0,
            state,
        };
        session.run(socket, rx, kick, cursor).await;
    })
}

struct Session {
    state: AppState,
    tenant: Arc<str>,
    last_sent: u64,
}

/// Why the session ended.
enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The peer left or the socket failed: nothing more to send.
    Gone,
}

/// The session's sending half, every send bounded by the idle timeout: a
/// peer that stops reading fills the socket's buffers, and a send would
/// then wait for it without end, deaf to shutdown and to the idle check.
struct Bounded {
    sink: futures::stream::SplitSink<WebSocket, Message>,
    limit: Duration,
    /// A send timed out: the session ends without another.
    stuck: bool,
}

impl Bounded {
    /// Sends `msg`; an error when the socket failed or the peer did not
    /// take it within the limit.
    async fn send(&mut self, msg: Message) -> Result<(), ()> {
        match tokio::time::timeout(self.limit, self.sink.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(()),
            Err(_) => {
                tracing::debug!("closing a realtime peer that stopped reading");
                self.stuck = true;
                Err(())
            }
        }
    }
}

impl Session {
    async fn run(
        mut self,
        socket: WebSocket,
        mut rx: broadcast::Receiver<FeedEvent>,
        mut kick: watch::Receiver<u64>,
        cursor: u64,
    ) {
        let metrics = Arc::clone(&self.state.metrics);
        let _active = metrics.ws_client();
        let (sink, mut stream) = socket.split();
        let mut sink = Bounded {
            sink,
            limit: self.state.config.ws_idle_timeout,
            stuck: false,
        };
        let end = self
            .serve(&mut sink, &mut stream, &mut rx, &mut kick, cursor)
            .await;
        if sink.stuck {
            // The peer reads nothing: a close frame would wait again.
            return;
        }
        // The close frame and the closing handshake share one bound.
        let close = async {
            if let End::Close(code, reason) = end {
                let _ = sink
                    .sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: Utf8Bytes::from_static(reason),
                    })))
                    .await;
            }
            let _ = sink.sink.close().await;
        };
        let _ = tokio::time::timeout(sink.limit, close).await;
    }

    async fn serve(
        &mut self,
        sink: &mut Bounded,
        stream: &mut futures::stream::SplitStream<WebSocket>,
        rx: &mut broadcast::Receiver<FeedEvent>,
        kick: &mut watch::Receiver<u64>,
        cursor: u64,
    ) -> End {
        if send(sink, &RealtimeFrame::Hello { cursor }).await.is_err() {
            return End::Gone;
        }
        if let Err(end) = self.backfill(sink).await {
            return end;
        }
        let cfg = Arc::clone(&self.state.config);
        let mut shutdown = self.state.shutdown.clone();
        let mut ping = tokio::time::interval(cfg.ws_ping_interval);
        ping.tick().await;
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Ok(event) => {
                        if !event.concerns(&self.tenant) {
                            continue;
                        }
                        let FeedEvent::Committed(tc) = event else {
                            // Committed elsewhere: the feed says what.
                            if let Err(end) = self.backfill(sink).await {
                                return end;
                            }
                            continue;
                        };
                        for change in &tc.changes {
                            if change.cursor <= self.last_sent {
                                continue;
                            }
                            if change.cursor != self.last_sent + 1 {
                                // A gap: the backfill sends the rest of
                                // this commit too (it is committed).
                                if let Err(end) = self.backfill(sink).await {
                                    return end;
                                }
                                continue;
                            }
                            if let Err(end) = self.send_change(sink, change.clone()).await {
                                return end;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Err(end) = self.backfill(sink).await {
                            return end;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return End::Close(GOING_AWAY, "server shutting down");
                    }
                },
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return End::Gone,
                    Some(Ok(_)) => last_heard = Instant::now(),
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() > cfg.ws_idle_timeout {
                        tracing::debug!("closing a silent realtime peer");
                        return End::Close(GOING_AWAY, "idle timeout");
                    }
                    if sink.send(Message::Ping(bytes::Bytes::from_static(b"guardian"))).await.is_err() {
                        return End::Gone;
                    }
                },
                _ = shutdown.changed() => return End::Close(GOING_AWAY, "server shutting down"),
                _ = kick.changed() => return End::Close(GOING_AWAY, "disconnected by the server"),
            }
        }
    }

    /// Sends every stored change after `last_sent`.
    async fn backfill(&mut self, sink: &mut Bounded) -> Result<(), End> {
        loop {
            // Held while the page is sent: a peer that does not read keeps
            // the page in memory up to the send bound. Waited for within
            // the request timeout (deaf to shutdown meanwhile), then the
            // client is told to come back later.
            let permits = super::changes::page_permits(&self.state);
            let reserving = self.state.answer_budget.take(Some(&self.tenant), permits);
            let Ok(Some(_reserved)) =
                tokio::time::timeout(self.state.config.request_timeout, reserving).await
            else {
                return Err(End::Close(TRY_AGAIN_LATER, "server busy; try again later"));
            };
            let page = match self
                .state
                .store
                .changes(Arc::clone(&self.tenant), self.last_sent, None, PAGE)
                .await
            {
                Ok(Ok(page)) => page,
                Ok(Err(_)) => return Err(End::Close(POLICY, "cursor expired; resync")),
                Err(e) => {
                    tracing::error!(error = %e, "feed read failed");
                    return Err(End::Close(1011, "database failure"));
                }
            };
            let n = page.changes.len();
            for change in page.changes {
                self.send_change(sink, change).await?;
            }
            // A page can end early (its byte bound): only the head says
            // whether changes are left.
            if n == 0 || page.head.is_none_or(|head| self.last_sent >= head) {
                return Ok(());
            }
        }
    }

    async fn send_change(&mut self, sink: &mut Bounded, change: Change) -> Result<(), End> {
        let cursor = change.cursor;
        send(sink, &RealtimeFrame::Change { change })
            .await
            .map_err(|()| End::Gone)?;
        self.state.metrics.ws_frame();
        self.last_sent = cursor;
        Ok(())
    }
}

async fn send(sink: &mut Bounded, frame: &RealtimeFrame) -> Result<(), ()> {
    let text = serde_json::to_string(frame).map_err(|_| ())?;
    sink.send(Message::Text(text.into())).await
}
