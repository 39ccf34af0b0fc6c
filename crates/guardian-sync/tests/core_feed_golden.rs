//! Golden command streams of the realtime feed machine (`core::feed`).

mod golden;

use guardian_protocol::{Change, ChangesPage, MutationKind};
use guardian_sync::core::feed::{FeedCommand, FeedMachine, PageFailure, SessionEnd};
use guardian_sync::realtime::RealtimeMessage;
use serde_json::json;

fn change(cursor: u64) -> Change {
    Change {
        cursor,
        op: MutationKind::Update,
        entity_type: "item".into(),
        id: format!("e{cursor}"),
        version: 1,
        data: json!({}),
    }
}

fn page(cursors: &[u64], head: Option<u64>) -> ChangesPage {
    ChangesPage {
        changes: cursors.iter().map(|c| change(*c)).collect(),
        next: cursors.last().copied().unwrap_or(0),
        head,
    }
}

fn line(c: &FeedCommand) -> String {
    match c {
        FeedCommand::Deliver(RealtimeMessage::Change { change }) => {
            format!("deliver change {}", change.cursor)
        }
        FeedCommand::Deliver(RealtimeMessage::Resync(r)) => format!(
            "deliver resync from {:?} to {} ({})",
            r.stale_cursor, r.resume_cursor, r.reason
        ),
        FeedCommand::Deliver(other) => format!("deliver {other:?}"),
        FeedCommand::Baseline(c) => format!("baseline {c}"),
        FeedCommand::State(s) => format!("state {s}"),
        FeedCommand::FetchPage { since, limit, .. } => format!("fetch {limit} after {since}"),
        FeedCommand::EndSession(reason) => format!("end session ({reason})"),
        FeedCommand::ResetBackoff => "reset backoff".into(),
        FeedCommand::CountReconnect => "count reconnect".into(),
        FeedCommand::CountMessage => "count message".into(),
    }
}

struct Script {
    lines: Vec<String>,
}

impl Script {
    fn record(&mut self, what: &str, commands: impl IntoIterator<Item = FeedCommand>) {
        self.lines.push(format!("<- {what}"));
        self.lines
            .extend(commands.into_iter().map(|c| format!("-> {}", line(&c))));
    }

    fn check(&self, expected: &str) {
        golden::assert_transcript(&self.lines, expected);
    }
}

#[test]
fn a_410_while_polling_resyncs_at_the_head_and_keeps_polling() {
    let mut m = FeedMachine::new(Some(5), 2);
    let mut s = Script { lines: Vec::new() };
    s.record(
        "session lost",
        m.session_ended(SessionEnd::Lost("refused".into())),
    );
    s.record("poll", m.poll());
    s.record(
        "410 head 40",
        m.page(Err(PageFailure::Expired {
            reason: "cursor 5 was purged".into(),
            head: Some(40),
        })),
    );
    s.record("page [41, 42]", m.page(Ok(page(&[41, 42], Some(43)))));
    // Full, but it reaches the head: nothing more to ask for.
    s.record("page [42, 43]", m.page(Ok(page(&[42, 43], Some(43)))));
    assert_eq!(m.cursor(), Some(43));
    assert_eq!(m.ws_since(), Some(43));
    s.check(
        r"
        <- session lost
        -> state disconnected
        <- poll
        -> fetch 2 after 5
        <- 410 head 40
        -> deliver resync from Some(5) to 40 (cursor 5 was purged)
        -> fetch 2 after 40
        <- page [41, 42]
        -> state polling
        -> deliver change 41
        -> count message
        -> deliver change 42
        -> count message
        -> fetch 2 after 42
        <- page [42, 43]
        -> deliver change 43
        -> count message
        ",
    );
}

/// A page can end short of the size asked for (the server bounds a page's
/// bytes): below the head, the next page is asked for at once.
#[test]
fn a_short_page_below_the_head_is_followed_at_once() {
    let mut m = FeedMachine::new(Some(40), 100);
    let mut s = Script { lines: Vec::new() };
    s.record(
        "session lost",
        m.session_ended(SessionEnd::Lost("refused".into())),
    );
    s.record("poll", m.poll());
    s.record("page [41]", m.page(Ok(page(&[41], Some(42)))));
    s.record("page [42]", m.page(Ok(page(&[42], Some(42)))));
    s.check(
        r"
        <- session lost
        -> state disconnected
        <- poll
        -> fetch 100 after 40
        <- page [41]
        -> state polling
        -> deliver change 41
        -> count message
        -> fetch 100 after 41
        <- page [42]
        -> deliver change 42
        -> count message
        ",
    );
}

#[test]
fn a_410_on_the_upgrade_resyncs_at_the_next_hello() {
    let mut m = FeedMachine::new(Some(9), 100);
    let mut s = Script { lines: Vec::new() };
    s.record("connected", m.connected());
    s.record("change 10", m.change(change(10)));
    s.record("change 10 again", m.change(change(10)));
    s.record(
        "closed 1008",
        m.session_ended(SessionEnd::Expired("cursor expired".into())),
    );
    // The next WebSocket opens without a cursor.
    assert_eq!(m.ws_since(), None);
    s.record("connected", m.connected());
    s.record("hello 70", m.hello(70));
    s.record("change 71", m.change(change(71)));
    s.check(
        r"
        <- connected
        -> state connected
        <- change 10
        -> deliver change 10
        -> count message
        <- change 10 again
        <- closed 1008
        -> reset backoff
        -> state disconnected
        <- connected
        -> count reconnect
        -> state connected
        <- hello 70
        -> deliver resync from Some(10) to 70 (cursor expired)
        <- change 71
        -> deliver change 71
        -> count message
        ",
    );
}

#[test]
fn a_first_start_begins_at_the_head_and_a_backend_without_one_waits_for_hello() {
    let mut m = FeedMachine::new(None, 100);
    let mut s = Script { lines: Vec::new() };
    s.record("poll", m.poll());
    s.record("head 12", m.page(Ok(page(&[], Some(12)))));
    s.record("page [13]", m.page(Ok(page(&[13], Some(13)))));
    let mut blind = FeedMachine::new(None, 100);
    assert!(blind.can_poll());
    s.record("poll (blind backend)", blind.poll());
    s.record("no head", blind.page(Ok(page(&[], None))));
    assert!(!blind.can_poll());
    s.check(
        r"
        <- poll
        -> fetch 1 after 0
        <- head 12
        -> baseline 12
        -> state polling
        -> fetch 100 after 12
        <- page [13]
        -> deliver change 13
        -> count message
        <- poll (blind backend)
        -> fetch 1 after 0
        <- no head
        ",
    );
}

/// The WebSocket never delivers across a hole: the session ends and the
/// catch-up poll reads the hole from the feed (a page out of order is
/// sorted). A session that broke the protocol before delivering anything
/// does not reset the reconnect backoff.
#[test]
fn a_websocket_gap_ends_the_session_and_the_feed_fills_it() {
    let mut m = FeedMachine::new(Some(0), 100);
    let mut s = Script { lines: Vec::new() };
    s.record("connected", m.connected());
    s.record("hello 0", m.hello(0));
    s.record("change 1", m.change(change(1)));
    s.record("change 3", m.change(change(3)));
    s.record(
        "session broken",
        m.session_ended(SessionEnd::Broken("cursor gap".into())),
    );
    s.record("poll", m.poll());
    s.record("page [3, 2]", m.page(Ok(page(&[3, 2], Some(3)))));
    s.record("connected", m.connected());
    s.record("hello 3", m.hello(3));
    s.record("change 5", m.change(change(5)));
    s.record(
        "session broken",
        m.session_ended(SessionEnd::Broken("cursor gap".into())),
    );
    s.record("connected", m.connected());
    s.record("malformed change", m.malformed_change("not JSON"));
    s.check(
        r"
        <- connected
        -> state connected
        <- hello 0
        <- change 1
        -> deliver change 1
        -> count message
        <- change 3
        -> end session (cursor gap: expected 2, got 3)
        <- session broken
        -> reset backoff
        -> state disconnected
        <- poll
        -> fetch 100 after 1
        <- page [3, 2]
        -> state polling
        -> deliver change 2
        -> count message
        -> deliver change 3
        -> count message
        <- connected
        -> count reconnect
        -> state connected
        <- hello 3
        <- change 5
        -> end session (cursor gap: expected 4, got 5)
        <- session broken
        -> state disconnected
        <- connected
        -> count reconnect
        -> state connected
        <- malformed change
        -> end session (a change frame does not parse: not JSON)
        ",
    );
}

/// A feed whose head is below the delivered cursor (a server restored
/// from a backup) and a hole in the feed itself are both told to the app
/// as a resync; the feed is followed from there.
#[test]
fn a_feed_that_went_back_or_skips_cursors_is_a_resync() {
    let mut m = FeedMachine::new(Some(10), 100);
    let mut s = Script { lines: Vec::new() };
    s.record(
        "session lost",
        m.session_ended(SessionEnd::Lost("refused".into())),
    );
    s.record("poll", m.poll());
    s.record("page [] head 5", m.page(Ok(page(&[], Some(5)))));
    s.record("poll", m.poll());
    s.record("page [6, 8]", m.page(Ok(page(&[6, 8], Some(8)))));
    s.record("connected", m.connected());
    s.record("hello 3", m.hello(3));
    s.record("change 4", m.change(change(4)));
    s.check(
        r"
        <- session lost
        -> state disconnected
        <- poll
        -> fetch 100 after 10
        <- page [] head 5
        -> state polling
        -> deliver resync from Some(10) to 5 (the feed's head 5 is below the delivered cursor 10)
        <- poll
        -> fetch 100 after 5
        <- page [6, 8]
        -> deliver change 6
        -> count message
        -> deliver resync from Some(6) to 7 (the feed has no changes 7..=7)
        -> deliver change 8
        -> count message
        <- connected
        -> state connected
        <- hello 3
        -> deliver resync from Some(8) to 3 (the feed's head 3 is below the delivered cursor 8)
        <- change 4
        -> deliver change 4
        -> count message
        ",
    );
}

/// A session lost at once, before delivering anything or answering a ping
/// (a message over the client's limits ends every session there), does
/// not reset the reconnect backoff, or reconnects would come in a tight
/// loop; one whose server answered a ping was sound, and does.
#[test]
fn only_a_session_of_use_resets_the_backoff() {
    let mut m = FeedMachine::new(Some(1), 100);
    let mut s = Script { lines: Vec::new() };
    s.record("connected", m.connected());
    s.record("hello 6", m.hello(6));
    s.record(
        "session lost",
        m.session_ended(SessionEnd::Lost("message too long".into())),
    );
    s.record("connected", m.connected());
    m.answered();
    s.record(
        "session lost after a pong",
        m.session_ended(SessionEnd::Lost("reset".into())),
    );
    s.record("connected", m.connected());
    m.answered();
    s.record("malformed change", m.malformed_change("not JSON"));
    s.record(
        "session broken after a pong",
        m.session_ended(SessionEnd::Broken("not JSON".into())),
    );
    s.check(
        r"
        <- connected
        -> state connected
        <- hello 6
        <- session lost
        -> state disconnected
        <- connected
        -> count reconnect
        -> state connected
        <- session lost after a pong
        -> reset backoff
        -> state disconnected
        <- connected
        -> count reconnect
        -> state connected
        <- malformed change
        -> end session (a change frame does not parse: not JSON)
        <- session broken after a pong
        -> state disconnected
        ",
    );
}
