//! The follower task: WebSocket sessions and the polling fallback between
//! them. What to deliver, from where and in which state is the
//! [`FeedMachine`]'s to decide; this task carries its commands out.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use guardian_protocol::{ChangeFingerprint, ChangesPage, RealtimeFrame};
use rand::rngs::StdRng;
use rand::SeedableRng;
use reqwest::Url;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use super::poll::{self, FetchError};
use super::ws::{self, ConnectError, Limits, Socket};
use super::{ConnectionState, FeedPosition, RealtimeConfig, RealtimeMessage, Validated};
use crate::core::feed::{FeedCommand, FeedMachine, PageFailure, SessionEnd};
use crate::core::reconnect::{Phase, Reconnect};
use crate::telemetry::Counter;
use crate::transport::Auth;

/// The service was stopped (or the app dropped its stream): unwind.
#[derive(Debug)]
pub(super) struct Stopped;

/// Everything the driver is built from.
pub(super) struct Parts {
    pub(super) config: RealtimeConfig,
    pub(super) validated: Validated,
    pub(super) http: reqwest::Client,
    pub(super) tx: mpsc::Sender<RealtimeMessage>,
    pub(super) state: watch::Sender<ConnectionState>,
    pub(super) delivered: watch::Sender<Option<u64>>,
    pub(super) consumed: Arc<watch::Sender<Option<FeedPosition>>>,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) start: Option<u64>,
    /// The change at `start`, if the cursor store kept it.
    pub(super) start_fingerprint: Option<ChangeFingerprint>,
}

pub(super) struct Driver {
    cfg: RealtimeConfig,
    base: Url,
    realtime: Url,
    http: reqwest::Client,
    tx: mpsc::Sender<RealtimeMessage>,
    state: watch::Sender<ConnectionState>,
    delivered: watch::Sender<Option<u64>>,
    consumed: Arc<watch::Sender<Option<FeedPosition>>>,
    stop: watch::Receiver<bool>,
    /// Single-flight token refresh for the WebSocket upgrade and the polls.
    auth: Auth,
    feed: FeedMachine,
    reconnect: Reconnect,
    next_poll: Instant,
}

impl Driver {
    pub(super) fn new(p: Parts) -> Self {
        let reconnect = Reconnect::new(
            p.validated.policy,
            p.config.max_reconnect_attempts,
            p.config.probe_interval,
        );
        let feed = FeedMachine::new(p.start, p.config.page_size).holding(p.start_fingerprint);
        let auth = Auth::new(Arc::clone(&p.config.tokens));
        Self {
            base: p.validated.base,
            realtime: p.validated.realtime,
            cfg: p.config,
            http: p.http,
            tx: p.tx,
            state: p.state,
            delivered: p.delivered,
            consumed: p.consumed,
            stop: p.stop,
            auth,
            feed,
            reconnect,
            next_poll: Instant::now(),
        }
    }

    pub(super) async fn run(mut self) {
        let Err(Stopped) = self.follow().await;
        self.set_state(ConnectionState::Stopped);
    }

    async fn follow(&mut self) -> Result<std::convert::Infallible, Stopped> {
        let mut rng = StdRng::from_os_rng();
        loop {
            self.check_stop()?;
            let end = self.websocket().await?;
            let commands = self.feed.session_ended(end);
            self.exec(commands).await?;
            let (delay, phase) = self.reconnect.next_delay(&mut rng);
            match phase {
                Phase::Backoff(n) => {
                    tracing::debug!(attempt = n + 1, ?delay, "realtime reconnect scheduled");
                }
                Phase::Probe => tracing::info!(
                    ?delay,
                    "realtime reconnect attempts spent; probing slowly (polling continues)"
                ),
            }
            self.disconnected(delay).await?;
        }
    }

    fn check_stop(&self) -> Result<(), Stopped> {
        if *self.stop.borrow() {
            Err(Stopped)
        } else {
            Ok(())
        }
    }

    fn set_state(&self, new: ConnectionState) {
        let changed = self.state.send_if_modified(|s| {
            if *s == new {
                false
            } else {
                *s = new;
                true
            }
        });
        if changed {
            tracing::info!(state = %new, "realtime connection state");
        }
    }

    /// Carries out the feed machine's commands; returns what is left for
    /// the caller's loop (a page to fetch, a session to end).
    async fn exec(&mut self, commands: Vec<FeedCommand>) -> Result<Next, Stopped> {
        let mut next = Next::default();
        for command in commands {
            match command {
                FeedCommand::Deliver(message) => self.send(message).await?,
                FeedCommand::Baseline(cursor) => {
                    self.delivered.send_replace(Some(cursor));
                    self.consumed.send_replace(Some(FeedPosition::bare(cursor)));
                }
                FeedCommand::State(state) => self.set_state(state),
                FeedCommand::FetchPage {
                    since,
                    fingerprint,
                    limit,
                } => next.fetch = Some((since, fingerprint, limit)),
                FeedCommand::EndSession(reason) => next.end_session = Some(reason),
                FeedCommand::ResetBackoff => self.reconnect.connected(),
                FeedCommand::CountReconnect => {
                    if let Some(m) = &self.cfg.metrics {
                        m.incr(Counter::RealtimeReconnects);
                    }
                }
                FeedCommand::CountMessage => {
                    if let Some(m) = &self.cfg.metrics {
                        m.incr(Counter::MessagesReceived);
                    }
                }
            }
        }
        Ok(next)
    }

    /// One WebSocket attempt and, if it opens, the session.
    async fn websocket(&mut self) -> Result<SessionEnd, Stopped> {
        let url = ws::with_since(
            &self.realtime,
            self.feed.ws_since(),
            self.feed.ws_since_fingerprint(),
        );
        let limits = Limits {
            max_frame: self.cfg.max_frame_size,
            max_message: self.cfg.max_message_size,
            timeout: self.cfg.connect_timeout,
        };
        let mut stop = self.stop.clone();
        let auth = &self.auth;
        let mut sent_token = None;
        let attempt = async {
            let token = auth
                .token()
                .await
                .map_err(|e| ConnectError::Failed(e.to_string()))?;
            let result = ws::connect(&url, &token, limits).await;
            sent_token = Some(token);
            result
        };
        let result = tokio::select! {
            r = attempt => r,
            () = stopped(&mut stop) => return Err(Stopped),
        };
        let socket = match result {
            Ok(socket) => socket,
            Err(ConnectError::Expired(reason)) => return Ok(SessionEnd::Expired(reason)),
            Err(ConnectError::Unauthorized) => {
                // The next attempt reads the refreshed token; a refresh
                // already made by a poll (or another request) is reused.
                let rejected = sent_token.unwrap_or_default();
                if let Err(e) = self.auth.refreshed(&rejected).await {
                    tracing::warn!(error = %e, "token refresh after a realtime 401 failed");
                }
                return Ok(SessionEnd::Lost("401 on upgrade".to_owned()));
            }
            Err(ConnectError::Failed(reason)) => return Ok(SessionEnd::Lost(reason)),
        };
        let commands = self.feed.connected();
        self.exec(commands).await?;
        let end = self.session(socket).await;
        // Catch up by polling at once: the socket may have died a while ago.
        self.next_poll = Instant::now();
        end
    }

    /// Reads frames until the connection ends; pings on our own schedule.
    async fn session(&mut self, socket: Socket) -> Result<SessionEnd, Stopped> {
        let (mut sink, mut stream) = socket.split();
        let interval = self.cfg.ping_interval;
        let deadline = self.cfg.pong_deadline;
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Set while a ping is unanswered: the connection is dead at this instant.
        let mut dead_at: Option<Instant> = None;
        let mut stop = self.stop.clone();
        loop {
            let silent_until = dead_at;
            tokio::select! {
                biased;
                () = stopped(&mut stop) => {
                    close(&mut sink).await;
                    return Err(Stopped);
                }
                frame = stream.next() => {
                    // Any frame proves the peer alive, not only a pong.
                    if dead_at.take().is_some() && matches!(frame, Some(Ok(_))) {
                        self.feed.answered();
                    }
                    match frame {
                        None => return Ok(SessionEnd::Lost("closed".to_owned())),
                        Some(Err(e @ tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                            // Every session would end at the same message.
                            tracing::warn!(error = %e, "a realtime message over this client's limits (max_frame_size, max_message_size)");
                            return Ok(SessionEnd::Lost(e.to_string()));
                        }
                        Some(Err(e)) => return Ok(SessionEnd::Lost(e.to_string())),
                        Some(Ok(Message::Text(text))) => {
                            if let Some(reason) = self.on_text(text.as_str()).await? {
                                close(&mut sink).await;
                                return Ok(SessionEnd::Broken(reason));
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let reason = frame.as_ref().map_or_else(String::new, |f| f.reason.to_string());
                            if frame.is_some_and(|f| f.code == CloseCode::Policy) {
                                return Ok(SessionEnd::Expired(reason));
                            }
                            return Ok(SessionEnd::Lost(format!("closed by the server: {reason}")));
                        }
                        Some(Ok(Message::Binary(b))) => {
                            tracing::warn!(len = b.len(), "skipping an unexpected binary realtime frame");
                        }
                        // Pings are answered by tungstenite; pongs only prove life.
                        Some(Ok(_)) => {}
                    }
                }
                _ = ping.tick() => {
                    if dead_at.is_none() {
                        let sent = tokio::time::timeout(deadline, sink.send(Message::Ping(bytes::Bytes::from_static(b"gs")))).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            return Ok(SessionEnd::Lost("could not send a ping".to_owned()));
                        }
                        dead_at = Some(Instant::now() + deadline);
                    }
                }
                () = sleep_until(silent_until.unwrap_or_else(Instant::now)), if silent_until.is_some() => {
                    tracing::info!(?deadline, "realtime peer silent past the pong deadline; dropping it");
                    return Ok(SessionEnd::Lost("pong deadline passed".to_owned()));
                }
            }
        }
    }

    /// Handles one text frame; returns why the session must end, if it must.
    async fn on_text(&mut self, text: &str) -> Result<Option<String>, Stopped> {
        let commands = match serde_json::from_str::<RealtimeFrame>(text) {
            Ok(RealtimeFrame::Hello { cursor }) => self.feed.hello(cursor),
            Ok(RealtimeFrame::Change { change }) => self.feed.change(change),
            Err(e) if is_change_frame(text) => self.feed.malformed_change(&super::json_error(&e)),
            Err(e) => {
                // Never log the payload itself (it holds app data).
                tracing::warn!(error = %super::json_error(&e), len = text.len(), "skipping a malformed realtime frame");
                return Ok(None);
            }
        };
        Ok(self.exec(commands).await?.end_session)
    }

    async fn send(&mut self, message: RealtimeMessage) -> Result<(), Stopped> {
        let cursor = message.cursor();
        let mut stop = self.stop.clone();
        tokio::select! {
            biased;
            sent = self.tx.send(message) => sent.map_err(|_| Stopped)?,
            () = stopped(&mut stop) => return Err(Stopped),
        }
        self.delivered.send_replace(Some(cursor));
        Ok(())
    }

    /// Between WebSocket attempts: polls the feed until `delay` has passed.
    async fn disconnected(&mut self, delay: Duration) -> Result<(), Stopped> {
        let reconnect_at = Instant::now() + delay;
        let mut stop = self.stop.clone();
        loop {
            // Polling needs a cursor, or a backend that tells where its feed
            // is now (then a first start or a resync rejoins it by polling).
            if self.feed.can_poll() && self.next_poll < reconnect_at {
                tokio::select! {
                    () = sleep_until(self.next_poll) => {}
                    () = stopped(&mut stop) => return Err(Stopped),
                }
                self.poll_feed().await?;
                self.next_poll = Instant::now() + self.cfg.poll_interval;
            } else {
                tokio::select! {
                    () = sleep_until(reconnect_at) => return Ok(()),
                    () = stopped(&mut stop) => return Err(Stopped),
                }
            }
        }
    }

    /// One feed request (`limit` changes after `since`, holding the change
    /// `fingerprint` names there), abandoned if the service is stopped.
    async fn fetch_page(
        &self,
        since: u64,
        fingerprint: Option<ChangeFingerprint>,
        limit: usize,
    ) -> Result<Result<ChangesPage, FetchError>, Stopped> {
        let url = poll::changes_url(&self.base, since, fingerprint, limit);
        let mut stop = self.stop.clone();
        tokio::select! {
            r = poll::fetch(&self.http, url, &self.auth, self.cfg.max_poll_body) => Ok(r),
            () = stopped(&mut stop) => Err(Stopped),
        }
    }

    /// Polls until the feed has no more changes (page by page), as the
    /// feed machine asks.
    async fn poll_feed(&mut self) -> Result<(), Stopped> {
        let commands = self.feed.poll();
        let mut fetch = self.exec(commands).await?.fetch;
        while let Some((since, fingerprint, limit)) = fetch {
            let result = self
                .fetch_page(since, fingerprint, limit)
                .await?
                .map_err(page_failure);
            let commands = self.feed.page(result);
            fetch = self.exec(commands).await?.fetch;
        }
        Ok(())
    }
}

/// What the feed machine's commands leave for the driver's loop.
#[derive(Debug, Default)]
struct Next {
    /// The page to fetch and answer with: since, its change, limit.
    fetch: Option<(u64, Option<ChangeFingerprint>, usize)>,
    /// The session must end, for this reason.
    end_session: Option<String>,
}

/// Whether an unparsable frame says it is a change (then its change would
/// be lost by skipping it), rather than not being JSON or of a type this
/// client does not know.
fn is_change_frame(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .is_ok_and(|v| v.get("type").and_then(serde_json::Value::as_str) == Some("change"))
}

/// A feed request's failure, as the feed machine sees it.
fn page_failure(e: FetchError) -> PageFailure {
    match e {
        FetchError::Expired { reason, head } => PageFailure::Expired { reason, head },
        FetchError::Unauthorized | FetchError::Token(_) => PageFailure::Refused(e.to_string()),
        FetchError::TooLarge(_) | FetchError::Malformed(_) => {
            PageFailure::Unreadable(e.to_string())
        }
        other => PageFailure::Failed(other.to_string()),
    }
}

/// How long our close frame may take to leave: a peer that stopped reading
/// must not hold up a stop or a reconnect.
const CLOSE_BOUND: Duration = Duration::from_secs(1);

/// Sends a close frame, within [`CLOSE_BOUND`]; the connection is dropped
/// either way.
async fn close<S>(sink: &mut S)
where
    S: futures::Sink<Message> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_BOUND, sink.send(Message::Close(None))).await;
}

/// Resolves once the service is asked to stop (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard returned by `wait_for` must not live across an await.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
