//! Realtime change delivery: WebSocket push with a polling fallback (DESIGN §8).
//!
//! [`RealtimeService::start`] spawns one task that follows the server's
//! per-tenant change feed and hands every change to the app through
//! [`RealtimeMessages`], once each and in cursor order:
//!
//! - **WebSocket first.** It connects to `GET /v1/realtime?since=<cursor>`
//!   with `Authorization: Bearer` on the upgrade (never a token in the URL)
//!   and small frame and message limits. The server sends `hello`, the
//!   backlog after the cursor, then live changes.
//! - **Dead connections are detected** by the client's own ping: if no pong
//!   (or any other frame) arrives within `pong_deadline` of a ping, the
//!   connection is dropped even though the socket never closed.
//! - **Reconnect** with exponential backoff and full jitter, up to
//!   `max_reconnect_attempts`, then slow probes every `probe_interval`,
//!   forever; the state stream always shows where it stands.
//! - **The change at the cursor goes along**: both requests carry
//!   `since_fingerprint`, the fingerprint of the change last delivered (when
//!   the cursor was reached by one), so a server whose feed was rewritten
//!   under the cursor (restored from a backup, then written to) answers 410
//!   and the app gets a `Resync` instead of a silent skip.
//! - **Polling** `GET /v1/changes?since=<cursor>` every `poll_interval`
//!   while the WebSocket is down; the state is [`ConnectionState::Polling`]
//!   while polls succeed. Back on the WebSocket it resumes from the same
//!   cursor.
//! - **Dedupe by cursor**: a change at or below the last delivered cursor is
//!   dropped, whichever path it came on, so the overlap of a switch is never
//!   delivered twice.
//! - **No silent holes**: a WebSocket change that skips cursors is not
//!   delivered; the session ends and the catch-up poll reads the hole from
//!   the feed. A hole in the feed itself, or a feed whose head (`hello`, a
//!   page's `head`) is below the delivered cursor (a server restored from a
//!   backup), is delivered as a [`RealtimeMessage::Resync`].
//! - **Resync**: a 410 `cursor-expired` (from the feed, the upgrade, or a
//!   close frame 1008 mid-session) means changes were purged before the app
//!   saw them. The service does not skip the gap silently: it opens the
//!   WebSocket without a cursor, and delivers [`RealtimeMessage::Resync`]
//!   carrying the server's current cursor (from `hello`); changes after
//!   that cursor follow. The app must refetch its state on `Resync`.
//!   While the WebSocket is down (a proxy that refuses upgrades, say),
//!   polling does the same: a 410 from `GET /v1/changes` carries the
//!   feed's latest cursor (`head`), the service delivers the `Resync` with
//!   it and polls on from there. Against a backend that does not report
//!   `head`, a resync waits for the WebSocket's `hello`.
//! - A change frame that does not parse ends the session (its change is
//!   then read from the feed); any other malformed frame is logged and
//!   skipped; an oversized one ends the connection (tungstenite refuses it)
//!   and the service reconnects.
//!
//! # Delivery semantics at crash boundaries
//!
//! Within one process a change is delivered exactly once. The cursor saved
//! in the [`CursorStore`] is the cursor of the last message the app has
//! *consumed*: a message counts as consumed when the app asks the stream for
//! the next one (or calls [`RealtimeMessages::ack`]). Saves happen in the
//! background, coalesced. After a crash or restart the service resumes after
//! the saved cursor, so a change that was being processed (or was still
//! queued) when the process died is delivered again: **at-least-once across
//! restarts, exactly-once within a run.** Apps apply changes by entity
//! version, which makes the redelivery harmless. The opposite choice (save
//! on receipt) would lose the changes queued at a crash, which we refuse.

mod cursor;
mod driver;
mod poll;
mod ws;

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use guardian_protocol::ChangeFingerprint;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::WatchStream;

use crate::retry::{RetryPolicy, RetryPolicyError};
use crate::telemetry::SyncMetrics;
use crate::transport::TokenProvider;

pub use cursor::{
    CursorStore, CursorStoreError, FeedPosition, MemoryCursorStore, OutboxCursorStore,
    DEFAULT_CURSOR_KEY,
};

pub use crate::core::feed::{ConnectionState, RealtimeMessage, Resync};

/// Where to start when the cursor store holds no cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// Only changes after the server's current cursor: from `hello`, or from
    /// the `head` of a feed response while the WebSocket is down (against a
    /// backend that reports no `head`, polling waits for the first `hello`).
    #[default]
    Latest,
    /// Every change after this cursor (0: the whole retained feed).
    After(u64),
}

/// Settings of a [`RealtimeService`]. Build with [`RealtimeConfig::new`],
/// then adjust the public fields; [`RealtimeService::start`] validates.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RealtimeConfig {
    /// Base URL of the protocol, `http://` or `https://` (the WebSocket URL
    /// `ws(s)://…/v1/realtime` is derived from it).
    pub base_url: String,
    /// Overrides the derived WebSocket URL (a `ws://` or `wss://` URL of the
    /// realtime route itself, without query).
    pub realtime_url: Option<String>,
    /// Supplies the bearer token for the upgrade and the polls; refreshed
    /// once on a 401.
    pub tokens: Arc<dyn TokenProvider>,
    /// Where the consumed cursor is saved.
    pub cursor_store: Arc<dyn CursorStore>,
    /// Start position when the store holds no cursor.
    pub start_from: StartFrom,
    /// Counts reconnects and messages when set.
    pub metrics: Option<Arc<SyncMetrics>>,
    /// Largest delay of the first reconnect (full jitter draws below it).
    pub first_reconnect_delay: Duration,
    /// Largest reconnect delay during backoff.
    pub reconnect_cap: Duration,
    /// Backoff attempts before switching to slow probes.
    pub max_reconnect_attempts: u32,
    /// Delay between reconnect probes once backoff attempts are spent.
    pub probe_interval: Duration,
    /// How often the client pings an open WebSocket.
    pub ping_interval: Duration,
    /// How long after a ping the connection may stay silent before it is
    /// declared dead.
    pub pong_deadline: Duration,
    /// Delay between polls of `GET /v1/changes` while the WebSocket is down.
    pub poll_interval: Duration,
    /// Limit on TCP connect plus WebSocket handshake.
    pub connect_timeout: Duration,
    /// Limit on one poll request.
    pub http_timeout: Duration,
    /// Largest WebSocket frame accepted (bytes). The reference server sends
    /// each change as one message in one frame.
    pub max_frame_size: usize,
    /// Largest WebSocket message accepted (bytes): at least the largest
    /// change the server sends, or the session ends at it every time.
    pub max_message_size: usize,
    /// Largest poll response body accepted (bytes): at least the server's
    /// largest feed page, or polling stops at it.
    pub max_poll_body: usize,
    /// `limit` of each poll request (1..=1000).
    pub page_size: usize,
    /// Messages buffered for the app before the service waits for it.
    pub channel_capacity: usize,
}

impl RealtimeConfig {
    /// Defaults: reconnect backoff 500 ms doubling to 30 s, 10 attempts then
    /// probes every 60 s; ping every 15 s, dead after 10 s of silence; poll
    /// every 30 s; frames and messages up to twice the reference server's
    /// default body limit (2 MiB), poll bodies up to twice its feed page
    /// bound (8 MiB), so every change it accepts with its defaults can be
    /// read; pages of 100; cursor in memory, starting at the server's
    /// latest.
    pub fn new(base_url: impl Into<String>, tokens: Arc<dyn TokenProvider>) -> Self {
        Self {
            base_url: base_url.into(),
            realtime_url: None,
            tokens,
            cursor_store: Arc::new(MemoryCursorStore::default()),
            start_from: StartFrom::Latest,
            metrics: None,
            first_reconnect_delay: Duration::from_millis(500),
            reconnect_cap: Duration::from_secs(30),
            max_reconnect_attempts: 10,
            probe_interval: Duration::from_secs(60),
            ping_interval: Duration::from_secs(15),
            pong_deadline: Duration::from_secs(10),
            poll_interval: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            http_timeout: Duration::from_secs(30),
            max_frame_size: 2 * guardian_protocol::DEFAULT_BODY_LIMIT,
            max_message_size: 2 * guardian_protocol::DEFAULT_BODY_LIMIT,
            max_poll_body: 2 * guardian_protocol::FEED_PAGE_DATA_BYTES,
            page_size: 100,
            channel_capacity: 1024,
        }
    }

    fn validate(&self) -> Result<Validated, ConfigError> {
        let base = parse_url(&self.base_url, &["http", "https"])?;
        let realtime = match &self.realtime_url {
            Some(u) => parse_url(u, &["ws", "wss"])?,
            None => derive_realtime_url(&base)?,
        };
        for (name, d) in [
            ("first_reconnect_delay", self.first_reconnect_delay),
            ("probe_interval", self.probe_interval),
            ("ping_interval", self.ping_interval),
            ("pong_deadline", self.pong_deadline),
            ("poll_interval", self.poll_interval),
            ("connect_timeout", self.connect_timeout),
            ("http_timeout", self.http_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        let policy = RetryPolicy::new(
            self.first_reconnect_delay,
            2.0,
            self.reconnect_cap,
            u32::MAX,
            Duration::ZERO,
        )?;
        if !(1..=1000).contains(&self.page_size) {
            return Err(ConfigError::PageSize(self.page_size));
        }
        if self.max_frame_size == 0 || self.max_frame_size > self.max_message_size {
            return Err(ConfigError::FrameSize {
                frame: self.max_frame_size,
                message: self.max_message_size,
            });
        }
        if self.channel_capacity == 0 || self.max_poll_body == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        Ok(Validated {
            base,
            realtime,
            policy,
        })
    }
}

/// A validated configuration, as the driver uses it.
#[derive(Debug, Clone)]
struct Validated {
    base: reqwest::Url,
    realtime: reqwest::Url,
    policy: RetryPolicy,
}

fn parse_url(raw: &str, schemes: &[&str]) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(raw).map_err(|e| ConfigError::Url(format!("{raw:?}: {e}")))?;
    if !schemes.contains(&url.scheme()) || url.cannot_be_a_base() {
        return Err(ConfigError::Url(format!(
            "{raw:?}: expected a {} URL",
            schemes.join(" or ")
        )));
    }
    Ok(url)
}

/// A JSON error without serde's message, which can quote the payload (app
/// data must not reach the logs).
fn json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Eof => "truncated JSON",
        serde_json::error::Category::Data => "JSON of an unexpected shape",
        serde_json::error::Category::Io => "unreadable JSON",
    };
    format!("{what} at line {}, column {}", e.line(), e.column())
}

/// `http://h/base` → `ws://h/base/v1/realtime` (`https` → `wss`).
fn derive_realtime_url(base: &reqwest::Url) -> Result<reqwest::Url, ConfigError> {
    let mut url = base.clone();
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    url.set_scheme(scheme)
        .map_err(|()| ConfigError::Url(format!("cannot derive a {scheme} URL from {base}")))?;
    url.set_query(None);
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(["v1", "realtime"]);
    }
    Ok(url)
}

/// Why a [`RealtimeConfig`] was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A URL did not parse or has the wrong scheme.
    #[error("bad URL {0}")]
    Url(String),
    /// A duration that must be positive was zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// The reconnect backoff settings are inconsistent.
    #[error("reconnect backoff: {0}")]
    Backoff(#[from] RetryPolicyError),
    /// `page_size` outside 1..=1000.
    #[error("page_size must be in 1..=1000, got {0}")]
    PageSize(usize),
    /// Frame limit zero or above the message limit.
    #[error("max_frame_size ({frame}) must be positive and at most max_message_size ({message})")]
    FrameSize {
        /// Configured frame limit.
        frame: usize,
        /// Configured message limit.
        message: usize,
    },
    /// `channel_capacity` or `max_poll_body` was zero.
    #[error("channel_capacity and max_poll_body must be greater than zero")]
    ZeroCapacity,
}

/// Why [`RealtimeService::start`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The saved cursor could not be read.
    #[error(transparent)]
    Cursor(#[from] CursorStoreError),
    /// The HTTP client for polling could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// A running realtime follower. Dropping it stops the task (without the
/// final cursor save that [`RealtimeService::shutdown`] waits for).
#[derive(Debug)]
pub struct RealtimeService {
    state: watch::Receiver<ConnectionState>,
    delivered: watch::Receiver<Option<u64>>,
    messages: Mutex<Option<RealtimeMessages>>,
    stop: watch::Sender<bool>,
    driver: Option<JoinHandle<()>>,
    saver: Option<JoinHandle<()>>,
}

impl RealtimeService {
    /// Validates `config`, loads the saved cursor and spawns the follower on
    /// the current tokio runtime.
    pub async fn start(config: RealtimeConfig) -> Result<Self, StartError> {
        let validated = config.validate()?;
        let saved = config.cursor_store.load_position().await?;
        let start = saved.map(|p| p.cursor).or(match config.start_from {
            StartFrom::Latest => None,
            StartFrom::After(c) => Some(c),
        });
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .timeout(config.http_timeout)
            .user_agent(concat!("guardian-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let (tx, rx) = mpsc::channel(config.channel_capacity);
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
        let (delivered_tx, delivered_rx) = watch::channel(start);
        let (consumed_tx, consumed_rx) = watch::channel(saved);
        let consumed_tx = Arc::new(consumed_tx);
        let (stop_tx, stop_rx) = watch::channel(false);
        let saver = tokio::spawn(save_loop(
            Arc::clone(&config.cursor_store),
            consumed_rx,
            stop_rx.clone(),
            saved,
        ));
        let driver = driver::Driver::new(driver::Parts {
            config,
            validated,
            http,
            tx,
            state: state_tx,
            delivered: delivered_tx,
            consumed: Arc::clone(&consumed_tx),
            stop: stop_rx,
            start,
            start_fingerprint: saved.and_then(|p| p.fingerprint),
        });
        let driver = tokio::spawn(driver.run());
        Ok(Self {
            state: state_rx,
            delivered: delivered_rx,
            messages: Mutex::new(Some(RealtimeMessages {
                rx,
                consumed: consumed_tx,
                unacked: None,
            })),
            stop: stop_tx,
            driver: Some(driver),
            saver: Some(saver),
        })
    }

    /// The message stream. The first call returns it; later calls return
    /// `None` (exactly-once delivery needs a single consumer). The service
    /// waits when the app does not read, so take it early.
    pub fn messages(&self) -> Option<RealtimeMessages> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The connection state now and on every change (intermediate states
    /// may be skipped if they change faster than the stream is read).
    pub fn connection_state(&self) -> WatchStream<ConnectionState> {
        WatchStream::new(self.state.clone())
    }

    /// A watch receiver of the connection state (for `wait_for`).
    pub fn state_receiver(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// The connection state now.
    pub fn state(&self) -> ConnectionState {
        *self.state.borrow()
    }

    /// The cursor of the last message handed to the stream (`None` before a
    /// baseline is known).
    pub fn delivered_cursor(&self) -> Option<u64> {
        *self.delivered.borrow()
    }

    /// Stops following the feed, closes the WebSocket and waits until the
    /// last consumed cursor is saved.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        // A panicked task was already reported by tokio; nothing more to do.
        if let Some(driver) = self.driver.take() {
            let _ = driver.await;
        }
        if let Some(saver) = self.saver.take() {
            let _ = saver.await;
        }
    }
}

impl Drop for RealtimeService {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Saves the consumed position in the background, coalescing bursts: while
/// one save runs, newer values replace each other and only the latest is
/// saved next.
async fn save_loop(
    store: Arc<dyn CursorStore>,
    mut consumed: watch::Receiver<Option<FeedPosition>>,
    mut stop: watch::Receiver<bool>,
    mut saved: Option<FeedPosition>,
) {
    loop {
        let stopping = tokio::select! {
            changed = consumed.changed() => changed.is_err(),
            _ = stop.wait_for(|s| *s) => true,
        };
        let latest = *consumed.borrow_and_update();
        if latest.is_some() && latest != saved {
            if let Some(p) = latest {
                match store.save_position(p).await {
                    Ok(()) => saved = latest,
                    Err(e) => {
                        tracing::warn!(error = %e, cursor = p.cursor, "saving the realtime cursor failed");
                    }
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Where consuming `message` leaves the app: a change is known by its
/// fingerprint; a resync reaches its cursor without the change there.
fn position_after(message: &RealtimeMessage) -> FeedPosition {
    match message {
        RealtimeMessage::Change { change } => FeedPosition {
            cursor: change.cursor,
            fingerprint: Some(ChangeFingerprint::of_change(change)),
        },
        RealtimeMessage::Resync(r) => FeedPosition::bare(r.resume_cursor),
    }
}

/// The app's stream of [`RealtimeMessage`]s, in cursor order, each once.
///
/// Asking for the next message marks the previous one consumed; its cursor
/// is then saved in the background (see the module docs for what that means
/// at a crash).
#[derive(Debug)]
pub struct RealtimeMessages {
    rx: mpsc::Receiver<RealtimeMessage>,
    consumed: Arc<watch::Sender<Option<FeedPosition>>>,
    unacked: Option<FeedPosition>,
}

impl RealtimeMessages {
    /// Marks the last message returned as consumed now, without asking for
    /// the next one (call it before a long pause to have its cursor saved).
    pub fn ack(&mut self) {
        if let Some(p) = self.unacked.take() {
            self.consumed.send_replace(Some(p));
        }
    }
}

impl Stream for RealtimeMessages {
    type Item = RealtimeMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ack();
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(m)) = &polled {
            self.unacked = Some(position_after(m));
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::StaticToken;

    fn cfg(base: &str) -> RealtimeConfig {
        RealtimeConfig::new(base, Arc::new(StaticToken::new("t")))
    }

    #[test]
    fn websocket_url_is_derived_from_the_base() {
        let v = cfg("http://h:8080").validate().unwrap();
        assert_eq!(v.realtime.as_str(), "ws://h:8080/v1/realtime");
        let v = cfg("https://api.example.com/sync/").validate().unwrap();
        assert_eq!(
            v.realtime.as_str(),
            "wss://api.example.com/sync/v1/realtime"
        );
    }

    #[test]
    fn invalid_settings_are_named() {
        let mut c = cfg("http://h");
        c.page_size = 0;
        assert_eq!(c.validate().unwrap_err(), ConfigError::PageSize(0));
        let mut c = cfg("http://h");
        c.poll_interval = Duration::ZERO;
        assert_eq!(
            c.validate().unwrap_err(),
            ConfigError::ZeroDuration("poll_interval")
        );
        let mut c = cfg("http://h");
        c.realtime_url = Some("http://h/v1/realtime".into());
        assert!(matches!(c.validate().unwrap_err(), ConfigError::Url(_)));
    }
}
