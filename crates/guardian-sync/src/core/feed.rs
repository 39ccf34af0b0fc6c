//! The realtime feed as a state machine.
//!
//! [`FeedMachine`] decides what the follower does with what arrives (a
//! WebSocket `hello` or change, a session's end, a feed page or its
//! failure) and returns [`FeedCommand`]s: deliver a message, set the
//! baseline cursor, change the connection state, fetch a page, count. The
//! driver (`realtime/driver.rs`) owns the sockets, timers and channels and
//! decides nothing. Exactly-once, in-order delivery by cursor is the
//! dedupe's (`core/dedupe.rs`).

use guardian_protocol::{Change, ChangesPage};
use serde::Serialize;

use super::dedupe::{Dedupe, Verdict};

/// Where the service is in following the feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ConnectionState {
    /// Opening the first WebSocket.
    Connecting,
    /// The WebSocket is up: changes are pushed.
    Connected,
    /// No WebSocket and no successful poll (yet, or the feed fails too);
    /// reconnect attempts continue.
    Disconnected,
    /// No WebSocket, but polling the feed succeeds; reconnect attempts
    /// continue.
    Polling,
    /// The service was shut down (or the app dropped its message stream).
    Stopped,
}

impl ConnectionState {
    /// A stable lowercase name (`"connected"`, `"polling"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::Polling => "polling",
            Self::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The feed could not be followed from where the app was: it must refetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resync {
    /// The cursor the server refused (older than its retained feed, or ahead
    /// of a server that lost its data); `None` if there was none.
    pub stale_cursor: Option<u64>,
    /// The server's cursor when the feed was rejoined: changes after it
    /// follow this message.
    pub resume_cursor: u64,
    /// What the server said, for logs.
    pub reason: String,
}

/// What the service delivers, in cursor order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[non_exhaustive]
pub enum RealtimeMessage {
    /// A change on the server.
    Change {
        /// The change.
        change: Change,
    },
    /// Changes were lost to the app: refetch everything, then continue.
    Resync(Resync),
}

impl RealtimeMessage {
    /// The feed cursor this message brings the app to.
    pub fn cursor(&self) -> u64 {
        match self {
            Self::Change { change } => change.cursor,
            Self::Resync(r) => r.resume_cursor,
        }
    }
}

/// How a WebSocket attempt or session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Lost or never established; reconnect later.
    Lost(String),
    /// The cursor is not servable (410 on the upgrade, close 1008): resync.
    Expired(String),
}

/// Why a feed request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageFailure {
    /// 410 `cursor-expired`, with the feed's head if the server gave it.
    Expired {
        /// The problem's detail.
        reason: String,
        /// The feed's latest cursor.
        head: Option<u64>,
    },
    /// The app's token was refused (not a network blip).
    Refused(String),
    /// Anything else: network, status, size, body.
    Failed(String),
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedCommand {
    /// Hand the message to the app, then record its cursor as delivered.
    Deliver(RealtimeMessage),
    /// A first start begins at this cursor: record it as delivered and
    /// consumed, without a message.
    Baseline(u64),
    /// The connection state changed.
    State(ConnectionState),
    /// Fetch `limit` changes after `since`, then answer
    /// [`FeedMachine::page`].
    FetchPage {
        /// The cursor after which to read.
        since: u64,
        /// Most changes.
        limit: usize,
    },
    /// Count a WebSocket reconnect.
    CountReconnect,
    /// Count a change delivered.
    CountMessage,
}

/// A resync waiting for the feed's head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingResync {
    stale: Option<u64>,
    reason: String,
}

/// A poll of the feed in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Poll {
    /// The page in flight only asks for the feed's head.
    probing: bool,
    /// The cursor the page in flight reads after.
    since: u64,
    /// At most one rejoin per poll, so a backend that refuses its own head
    /// again cannot make the follower loop through resyncs.
    rejoined: bool,
}

/// The follower's decisions: what is delivered, from where, in which state.
#[derive(Debug, Clone)]
pub struct FeedMachine {
    dedupe: Dedupe,
    resync: Option<PendingResync>,
    has_connected: bool,
    /// False once the backend answered a feed request without its latest
    /// cursor (`head`): then polling cannot rejoin the feed on its own, and
    /// a resync or a first start waits for the WebSocket's `hello`.
    feed_reports_head: bool,
    state: ConnectionState,
    poll: Option<Poll>,
    page_size: usize,
}

impl FeedMachine {
    /// Resumes after `start` (`None`: from the feed's head), reading
    /// `page_size` changes per page.
    pub fn new(start: Option<u64>, page_size: usize) -> Self {
        Self {
            dedupe: Dedupe::new(start),
            resync: None,
            has_connected: false,
            feed_reports_head: true,
            state: ConnectionState::Connecting,
            poll: None,
            page_size: page_size.max(1),
        }
    }

    /// The connection state.
    pub fn state(&self) -> ConnectionState {
        self.state
    }

    /// The last delivered cursor.
    pub fn cursor(&self) -> Option<u64> {
        self.dedupe.last()
    }

    /// The cursor to open the WebSocket with: none while a resync waits
    /// for the head.
    pub fn ws_since(&self) -> Option<u64> {
        if self.resync.is_some() {
            None
        } else {
            self.dedupe.last()
        }
    }

    /// The WebSocket opened.
    pub fn connected(&mut self) -> Vec<FeedCommand> {
        let mut out = Vec::new();
        if self.has_connected {
            out.push(FeedCommand::CountReconnect);
        }
        self.has_connected = true;
        self.set_state(ConnectionState::Connected, &mut out);
        out
    }

    /// A WebSocket attempt or session ended.
    pub fn session_ended(&mut self, end: SessionEnd) -> Vec<FeedCommand> {
        let mut out = Vec::new();
        match end {
            SessionEnd::Lost(reason) => tracing::debug!(%reason, "realtime WebSocket unavailable"),
            SessionEnd::Expired(reason) => self.begin_resync(reason),
        }
        if matches!(
            self.state,
            ConnectionState::Connected | ConnectionState::Connecting
        ) {
            self.set_state(ConnectionState::Disconnected, &mut out);
        }
        out
    }

    /// The WebSocket said where the feed is now.
    pub fn hello(&mut self, head: u64) -> Vec<FeedCommand> {
        let mut out = Vec::new();
        self.rejoin(head, &mut out);
        out
    }

    /// A change arrived (WebSocket or page).
    pub fn change(&mut self, change: Change) -> Vec<FeedCommand> {
        let mut out = Vec::new();
        self.deliver(change, &mut out);
        out
    }

    /// Whether polling can follow the feed now: it needs a cursor, or a
    /// backend that tells where its feed is (then a first start or a
    /// resync rejoins it by polling).
    pub fn can_poll(&self) -> bool {
        self.feed_reports_head || (self.resync.is_none() && self.dedupe.last().is_some())
    }

    /// Starts a poll of the feed: its first page (or the head, when there
    /// is no usable cursor). Nothing while one is in progress.
    pub fn poll(&mut self) -> Vec<FeedCommand> {
        let mut out = Vec::new();
        if self.poll.is_some() {
            return out;
        }
        let probing = self.resync.is_some() || self.dedupe.last().is_none();
        self.next_page(
            Poll {
                probing,
                since: 0,
                rejoined: false,
            },
            &mut out,
        );
        out
    }

    /// The answer to the last [`FeedCommand::FetchPage`].
    pub fn page(&mut self, result: Result<ChangesPage, PageFailure>) -> Vec<FeedCommand> {
        let mut out = Vec::new();
        let Some(mut poll) = self.poll.take() else {
            return out;
        };
        if poll.probing {
            // Only the head of the smallest page is used.
            let head = match result {
                Ok(page) => page.head,
                Err(PageFailure::Expired { head, .. }) => head,
                Err(e) => {
                    self.poll_failed(&e, &mut out);
                    return out;
                }
            };
            let Some(head) = head else {
                tracing::info!(
                    "the feed does not report its latest cursor; a resync or first start waits \
                     for the WebSocket"
                );
                self.feed_reports_head = false;
                return out;
            };
            self.rejoin(head, &mut out);
            self.set_state(ConnectionState::Polling, &mut out);
            poll.probing = false;
            poll.rejoined = true;
            self.next_page(poll, &mut out);
            return out;
        }
        match result {
            Ok(page) => {
                self.set_state(ConnectionState::Polling, &mut out);
                // A page can end short of `page_size` (the server bounds its
                // bytes): where the feed reports its head, that says whether
                // more is left.
                let full = page.changes.len() >= self.page_size;
                let head = page.head;
                for change in page.changes {
                    self.deliver(change, &mut out);
                }
                let more = match head {
                    Some(head) => self.dedupe.last().is_some_and(|last| last < head),
                    None => full,
                };
                if more && self.dedupe.last() != Some(poll.since) {
                    self.next_page(poll, &mut out);
                }
            }
            Err(PageFailure::Expired { reason, head }) => {
                self.begin_resync(reason);
                match head {
                    Some(head) if !poll.rejoined => {
                        // Resync here and keep polling from the head.
                        poll.rejoined = true;
                        self.rejoin(head, &mut out);
                        self.next_page(poll, &mut out);
                    }
                    _ => self.set_state(ConnectionState::Disconnected, &mut out),
                }
            }
            Err(e) => self.poll_failed(&e, &mut out),
        }
        out
    }

    /// Asks for the next page after the last delivered cursor, if any.
    fn next_page(&mut self, mut poll: Poll, out: &mut Vec<FeedCommand>) {
        let (since, limit) = if poll.probing {
            (0, 1)
        } else {
            match self.dedupe.last() {
                Some(since) => (since, self.page_size),
                None => return,
            }
        };
        poll.since = since;
        self.poll = Some(poll);
        out.push(FeedCommand::FetchPage { since, limit });
    }

    fn poll_failed(&mut self, e: &PageFailure, out: &mut Vec<FeedCommand>) {
        match e {
            // Not a network blip: the app's token is refused.
            PageFailure::Refused(error) => {
                tracing::warn!(%error, "realtime fallback poll refused");
            }
            PageFailure::Failed(error) | PageFailure::Expired { reason: error, .. } => {
                tracing::debug!(%error, "realtime fallback poll failed");
            }
        }
        self.set_state(ConnectionState::Disconnected, out);
    }

    fn begin_resync(&mut self, reason: String) {
        if self.resync.is_none() {
            tracing::warn!(%reason, cursor = ?self.dedupe.last(), "realtime cursor expired; resync");
            self.resync = Some(PendingResync {
                stale: self.dedupe.last(),
                reason,
            });
        }
    }

    /// Learns the feed's latest cursor: a pending resync completes there
    /// (the app gets [`RealtimeMessage::Resync`] and refetches), and a first
    /// start without a cursor begins there. Otherwise the head changes
    /// nothing.
    fn rejoin(&mut self, head: u64, out: &mut Vec<FeedCommand>) {
        if let Some(r) = self.resync.take() {
            self.dedupe.reset(head);
            out.push(FeedCommand::Deliver(RealtimeMessage::Resync(Resync {
                stale_cursor: r.stale,
                resume_cursor: head,
                reason: r.reason,
            })));
        } else if self.dedupe.last().is_none() {
            self.dedupe.reset(head);
            out.push(FeedCommand::Baseline(head));
        }
    }

    fn deliver(&mut self, change: Change, out: &mut Vec<FeedCommand>) {
        match self.dedupe.accept(change.cursor) {
            Verdict::Duplicate => {
                tracing::trace!(
                    cursor = change.cursor,
                    "dropping an already delivered change"
                );
                return;
            }
            Verdict::DeliverAfterGap { expected } => tracing::warn!(
                expected,
                got = change.cursor,
                "gap in the change feed (the server should never skip cursors)"
            ),
            Verdict::Deliver => {}
        }
        out.push(FeedCommand::Deliver(RealtimeMessage::Change { change }));
        out.push(FeedCommand::CountMessage);
    }

    fn set_state(&mut self, new: ConnectionState, out: &mut Vec<FeedCommand>) {
        if self.state != new {
            self.state = new;
            out.push(FeedCommand::State(new));
        }
    }
}
