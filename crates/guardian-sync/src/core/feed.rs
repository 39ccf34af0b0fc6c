//! The realtime feed as a state machine.
//!
//! [`FeedMachine`] decides what the follower does with what arrives (a
//! WebSocket `hello` or change, a session's end, a feed page or its
//! failure) and returns [`FeedCommand`]s: deliver a message, set the
//! baseline cursor, change the connection state, fetch a page, end a
//! session, count. The driver (`realtime/driver.rs`) owns the sockets,
//! timers and channels and decides nothing. Invariant: nothing is delivered
//! across a hole in the cursors without the app being told. The WebSocket
//! never delivers across one (the session ends and a poll of the feed fills
//! it); a hole in the feed itself, or a feed whose head is below the
//! delivered cursor, is delivered as a [`Resync`]. Dropping what was
//! already delivered is the dedupe's (`core/dedupe.rs`).
//!
//! The machine also keeps the fingerprint of the change at the delivered
//! cursor, sent with it as `since_fingerprint`; it is known only when a
//! change brought the cursor there, and dropped when a resync or a first
//! start set the cursor without one (a server then checks nothing, as
//! before the parameter existed).

use guardian_protocol::{Change, ChangeFingerprint, ChangesPage};
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
    /// The last cursor delivered before the feed was lost: the one the
    /// server refused (older than its retained feed, or ahead of a server
    /// that lost its data), one above the feed's head, or the one before a
    /// hole in the feed; `None` if there was none.
    pub stale_cursor: Option<u64>,
    /// The server's cursor when the feed was rejoined: changes after it
    /// follow this message.
    pub resume_cursor: u64,
    /// What the server said, or what the client saw, for logs: control
    /// characters escaped, at most 512 characters.
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
    /// The server broke the protocol mid-session (a cursor gap, a change
    /// that does not parse; see [`FeedCommand::EndSession`]): reconnect
    /// later, after a poll of the feed from the last delivered cursor.
    Broken(String),
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
    /// The feed answered, but not with a page that can be read (too large,
    /// malformed): likely to repeat at every poll, unlike a blip.
    Unreadable(String),
    /// Anything else: network, status.
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
        /// The change the app holds at `since`, sent as
        /// `since_fingerprint` when known.
        fingerprint: Option<ChangeFingerprint>,
        /// Most changes.
        limit: usize,
    },
    /// Close the WebSocket session now (the server broke the protocol) and
    /// answer [`FeedMachine::session_ended`] with [`SessionEnd::Broken`].
    EndSession(String),
    /// The session that ended was healthy: the next reconnect starts the
    /// backoff from its first delay.
    ResetBackoff,
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

/// The WebSocket session in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Session {
    /// Something was delivered (or a baseline set): the session was of use,
    /// even if it then broke the protocol.
    progressed: bool,
    /// The server answered a ping: the connection stayed sound for a ping
    /// interval at least.
    answered: bool,
}

/// Longest server-supplied text kept in a [`Resync`] or a log line, in
/// characters.
const MAX_SERVER_TEXT: usize = 512;

/// The follower's decisions: what is delivered, from where, in which state.
#[derive(Debug, Clone)]
pub struct FeedMachine {
    dedupe: Dedupe,
    /// The change at the delivered cursor, when a change brought it there.
    held: Option<ChangeFingerprint>,
    resync: Option<PendingResync>,
    has_connected: bool,
    /// False once the backend answered a feed request without its latest
    /// cursor (`head`): then polling cannot rejoin the feed on its own, and
    /// a resync or a first start waits for the WebSocket's `hello`.
    feed_reports_head: bool,
    state: ConnectionState,
    poll: Option<Poll>,
    session: Option<Session>,
    /// The last unreadable-page failure warned about: the same one at every
    /// poll is logged once, not every `poll_interval`.
    unreadable: Option<String>,
    page_size: usize,
}

impl FeedMachine {
    /// Resumes after `start` (`None`: from the feed's head), reading
    /// `page_size` changes per page.
    pub fn new(start: Option<u64>, page_size: usize) -> Self {
        Self {
            dedupe: Dedupe::new(start),
            held: None,
            resync: None,
            has_connected: false,
            feed_reports_head: true,
            state: ConnectionState::Connecting,
            poll: None,
            session: None,
            unreadable: None,
            page_size: page_size.max(1),
        }
    }

    /// The change at the start cursor is the one `fingerprint` names (as
    /// saved with the cursor); ignored without a start cursor.
    #[must_use]
    pub fn holding(mut self, fingerprint: Option<ChangeFingerprint>) -> Self {
        self.held = fingerprint.filter(|_| self.dedupe.last().is_some());
        self
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

    /// The fingerprint to open the WebSocket with, beside
    /// [`ws_since`](Self::ws_since): that of the change at that cursor, if
    /// known.
    pub fn ws_since_fingerprint(&self) -> Option<ChangeFingerprint> {
        self.ws_since().and(self.held)
    }

    /// The WebSocket opened.
    pub fn connected(&mut self) -> Vec<FeedCommand> {
        let mut out = Vec::new();
        if self.has_connected {
            out.push(FeedCommand::CountReconnect);
        }
        self.has_connected = true;
        self.session = Some(Session::default());
        self.set_state(ConnectionState::Connected, &mut out);
        out
    }

    /// The server answered a ping of the session.
    pub fn answered(&mut self) {
        if let Some(s) = &mut self.session {
            s.answered = true;
        }
    }

    /// A WebSocket attempt or session ended.
    pub fn session_ended(&mut self, end: SessionEnd) -> Vec<FeedCommand> {
        let mut out = Vec::new();
        let broken = matches!(end, SessionEnd::Broken(_));
        match end {
            SessionEnd::Lost(reason) | SessionEnd::Broken(reason) => {
                tracing::debug!(reason = %printable(&reason), "realtime WebSocket unavailable");
            }
            SessionEnd::Expired(reason) => self.begin_resync(&reason),
        }
        // A session must have been of use to reset the backoff: one that
        // ends at once every time (the protocol broken, or a message the
        // client cannot take) would otherwise make a tight loop.
        if self
            .session
            .take()
            .is_some_and(|s| s.progressed || (s.answered && !broken))
        {
            out.push(FeedCommand::ResetBackoff);
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

    /// A change arrived on the WebSocket. One that skips cursors is not
    /// delivered: the session ends, and the poll that follows a lost
    /// session reads the hole from the feed.
    pub fn change(&mut self, change: Change) -> Vec<FeedCommand> {
        let mut out = Vec::new();
        match self.dedupe.judge(change.cursor) {
            Verdict::Duplicate => trace_duplicate(change.cursor),
            Verdict::Next => self.deliver(change, &mut out),
            Verdict::Gap { expected } => {
                tracing::warn!(
                    expected,
                    got = change.cursor,
                    "the realtime WebSocket skipped cursors; reading them from the feed"
                );
                out.push(FeedCommand::EndSession(format!(
                    "cursor gap: expected {expected}, got {}",
                    change.cursor
                )));
            }
        }
        out
    }

    /// A WebSocket change frame did not parse (`error` must not quote the
    /// payload). Skipping it would lose its change for good once the next
    /// one is delivered, so the session ends and a poll reads it instead.
    pub fn malformed_change(&mut self, error: &str) -> Vec<FeedCommand> {
        tracing::warn!(
            error,
            "a realtime change frame does not parse; reading it from the feed"
        );
        vec![FeedCommand::EndSession(format!(
            "a change frame does not parse: {error}"
        ))]
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
            Ok(mut page) => {
                self.unreadable = None;
                self.set_state(ConnectionState::Polling, &mut out);
                // A page can end short of `page_size` (the server bounds its
                // bytes): where the feed reports its head, that says whether
                // more is left.
                let full = page.changes.len() >= self.page_size;
                // The protocol orders a page by cursor; a server that does
                // not must not make the lower cursors look delivered.
                page.changes.sort_by_key(|c| c.cursor);
                // A head below the page's own changes contradicts it: the
                // changes are taken as the truth.
                let top = page.changes.last().map(|c| c.cursor);
                let head = page.head.map(|head| head.max(top.unwrap_or(0)));
                if let Some(head) = head {
                    self.rejoin(head, &mut out);
                }
                for change in page.changes {
                    self.deliver_from_feed(change, &mut out);
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
                self.begin_resync(&reason);
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
        let (since, fingerprint, limit) = if poll.probing {
            (0, None, 1)
        } else {
            match self.dedupe.last() {
                Some(since) => (since, self.held, self.page_size),
                None => return,
            }
        };
        poll.since = since;
        self.poll = Some(poll);
        out.push(FeedCommand::FetchPage {
            since,
            fingerprint,
            limit,
        });
    }

    fn poll_failed(&mut self, e: &PageFailure, out: &mut Vec<FeedCommand>) {
        match e {
            // Not a network blip: the app's token is refused.
            PageFailure::Refused(error) => {
                tracing::warn!(%error, "realtime fallback poll refused");
            }
            PageFailure::Unreadable(error) if self.unreadable.as_ref() != Some(error) => {
                tracing::warn!(
                    %error,
                    "the feed's answer cannot be read; polling cannot follow it (logged again \
                     only if the failure changes)"
                );
                self.unreadable = Some(error.clone());
            }
            PageFailure::Failed(error) | PageFailure::Unreadable(error) => {
                tracing::debug!(%error, "realtime fallback poll failed");
            }
            PageFailure::Expired { reason, .. } => {
                tracing::debug!(error = %printable(reason), "realtime fallback poll failed");
            }
        }
        self.set_state(ConnectionState::Disconnected, out);
    }

    fn begin_resync(&mut self, reason: &str) {
        if self.resync.is_none() {
            let reason = printable(reason);
            tracing::warn!(%reason, cursor = ?self.dedupe.last(), "realtime cursor expired; resync");
            self.resync = Some(PendingResync {
                stale: self.dedupe.last(),
                reason,
            });
        }
    }

    /// Learns the feed's latest cursor: a pending resync completes there
    /// (the app gets [`RealtimeMessage::Resync`] and refetches), and a first
    /// start without a cursor begins there. A head below the delivered
    /// cursor (a server restored from a backup, or that lost data) is a
    /// resync too: the changes it writes next reuse cursors the app has
    /// seen. Otherwise the head changes nothing.
    fn rejoin(&mut self, head: u64, out: &mut Vec<FeedCommand>) {
        if let Some(r) = self.resync.take() {
            self.resync_to(r.stale, head, r.reason, out);
        } else if let Some(last) = self.dedupe.last().filter(|last| head < *last) {
            let reason = format!("the feed's head {head} is below the delivered cursor {last}");
            tracing::warn!(%reason, "realtime feed went back; resync");
            self.resync_to(Some(last), head, reason, out);
        } else if self.dedupe.last().is_none() {
            self.dedupe.record(head);
            self.held = None;
            self.mark_progress();
            out.push(FeedCommand::Baseline(head));
        }
    }

    fn resync_to(
        &mut self,
        stale_cursor: Option<u64>,
        resume_cursor: u64,
        reason: String,
        out: &mut Vec<FeedCommand>,
    ) {
        self.dedupe.record(resume_cursor);
        // The app resumes at the server's head without its change.
        self.held = None;
        self.mark_progress();
        out.push(FeedCommand::Deliver(RealtimeMessage::Resync(Resync {
            stale_cursor,
            resume_cursor,
            reason,
        })));
    }

    /// A change read from the feed itself (a page). A hole there is in the
    /// feed, not in transit, so reading again cannot fill it: the app is
    /// told with a [`Resync`] up to the change, which follows.
    fn deliver_from_feed(&mut self, change: Change, out: &mut Vec<FeedCommand>) {
        match self.dedupe.judge(change.cursor) {
            Verdict::Duplicate => trace_duplicate(change.cursor),
            Verdict::Next => self.deliver(change, out),
            Verdict::Gap { expected } => {
                let reason = format!("the feed has no changes {expected}..={}", change.cursor - 1);
                tracing::warn!(%reason, "hole in the change feed; resync");
                self.resync_to(self.dedupe.last(), change.cursor - 1, reason, out);
                self.deliver(change, out);
            }
        }
    }

    /// Delivers the next change (judged [`Verdict::Next`]).
    fn deliver(&mut self, change: Change, out: &mut Vec<FeedCommand>) {
        self.dedupe.record(change.cursor);
        self.held = Some(ChangeFingerprint::of_change(&change));
        self.mark_progress();
        out.push(FeedCommand::Deliver(RealtimeMessage::Change { change }));
        out.push(FeedCommand::CountMessage);
    }

    fn mark_progress(&mut self) {
        if let Some(s) = &mut self.session {
            s.progressed = true;
        }
    }

    fn set_state(&mut self, new: ConnectionState, out: &mut Vec<FeedCommand>) {
        if self.state != new {
            self.state = new;
            out.push(FeedCommand::State(new));
        }
    }
}

fn trace_duplicate(cursor: u64) {
    tracing::trace!(cursor, "dropping an already delivered change");
}

/// Server-supplied text as it may go into a log line or a [`Resync`]:
/// control and bidi characters escaped (no forged log lines, no terminal
/// escapes) and at most [`MAX_SERVER_TEXT`] characters (a 410's detail can
/// be megabytes).
fn printable(text: &str) -> String {
    let mut out = String::new();
    let mut len = 0;
    for c in text.chars() {
        let hidden = c.is_control()
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
        let piece: String = if hidden {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        let n = piece.chars().count();
        if len + n > MAX_SERVER_TEXT {
            out.push('…');
            break;
        }
        out.push_str(&piece);
        len += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(cursor: u64, id: &str) -> Change {
        Change {
            cursor,
            op: guardian_protocol::MutationKind::Create,
            entity_type: "note".into(),
            id: id.into(),
            version: 1,
            data: serde_json::Value::Null,
        }
    }

    fn fetch(out: &[FeedCommand]) -> Option<(u64, Option<ChangeFingerprint>)> {
        out.iter().find_map(|c| match c {
            FeedCommand::FetchPage {
                since, fingerprint, ..
            } => Some((*since, *fingerprint)),
            _ => None,
        })
    }

    /// The fingerprint sent with the cursor is that of the change that
    /// brought the cursor there; a cursor reached otherwise (a resync, a
    /// baseline, a start without a saved fingerprint) goes without one.
    #[test]
    fn the_held_fingerprint_follows_the_delivered_change_and_clears_on_resync() {
        let fp = |id: &str| ChangeFingerprint::of("note", id, 1);
        let saved = FeedMachine::new(Some(5), 10).holding(Some(fp("n5")));
        assert_eq!(saved.ws_since_fingerprint(), Some(fp("n5")));
        assert_eq!(
            FeedMachine::new(None, 10)
                .holding(Some(fp("n5")))
                .ws_since_fingerprint(),
            None
        );

        let mut m = FeedMachine::new(Some(5), 10).holding(Some(fp("n5")));
        m.connected();
        m.change(change(6, "n6"));
        assert_eq!(
            (m.ws_since(), m.ws_since_fingerprint()),
            (Some(6), Some(fp("n6")))
        );
        m.session_ended(SessionEnd::Lost("cut".into()));
        assert_eq!(fetch(&m.poll()), Some((6, Some(fp("n6")))));
        // The server refuses the cursor: a resync at its head, without the
        // change there.
        let out = m.page(Err(PageFailure::Expired {
            reason: "rewritten".into(),
            head: Some(9),
        }));
        assert!(out.iter().any(|c| matches!(
            c,
            FeedCommand::Deliver(RealtimeMessage::Resync(Resync {
                stale_cursor: Some(6),
                resume_cursor: 9,
                ..
            }))
        )));
        assert_eq!(fetch(&out), Some((9, None)));
        assert_eq!(m.ws_since_fingerprint(), None);
        m.page(Ok(ChangesPage {
            changes: vec![change(10, "n10")],
            next: 10,
            head: Some(10),
        }));
        assert_eq!(m.ws_since_fingerprint(), Some(fp("n10")));

        // While a resync waits for the head, nothing is sent with `since`.
        m.session_ended(SessionEnd::Expired("gone".into()));
        assert_eq!((m.ws_since(), m.ws_since_fingerprint()), (None, None));
        m.hello(12);
        assert_eq!((m.ws_since(), m.ws_since_fingerprint()), (Some(12), None));

        // A first start begins at the head without a change.
        let mut first = FeedMachine::new(None, 10);
        first.hello(4);
        assert_eq!(
            (first.ws_since(), first.ws_since_fingerprint()),
            (Some(4), None)
        );
    }

    #[test]
    fn server_text_is_bounded_and_escaped() {
        assert_eq!(printable("gone\n\u{1b}[31m"), "gone\\n\\u{1b}[31m");
        assert_eq!(printable("a\u{202E}b"), "a\\u{202e}b");
        let long = printable(&"x".repeat(10_000));
        assert_eq!(long.chars().count(), MAX_SERVER_TEXT + 1);
        assert!(long.ends_with('…'));
        assert_eq!(printable("cursor 5 was purged"), "cursor 5 was purged");
    }
}
