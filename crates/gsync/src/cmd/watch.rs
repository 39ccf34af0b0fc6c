//! `gsync watch`: follow a server's change feed live.
//!
//! Prints every change as it arrives and every connection state change
//! (`connected`, `disconnected`, `polling`), so the fallback to polling is
//! visible. With `--json`, one JSON object per line:
//! `{"event":"state","state":"polling"}`,
//! `{"event":"change","change":{...}}`,
//! `{"event":"resync","stale_cursor":..,"resume_cursor":..,"reason":".."}`.
//!
//! Cursor: by default in memory only, starting at `--since` (or at the
//! server's latest change without it), so watching never touches an outbox
//! file. With `--persist` the consumed cursor is saved in the outbox named by
//! the global `--outbox` (meta key `realtime.cursor`, the same place an app
//! keeps it, with the consumed change's fingerprint under
//! `realtime.cursor.fingerprint`); a saved cursor wins over `--since`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use guardian_sync::outbox::{Outbox, OutboxOptions};
use guardian_sync::realtime::{
    ConnectionState, OutboxCursorStore, RealtimeConfig, RealtimeMessage, RealtimeService, StartFrom,
};
use guardian_sync::transport::{check_token, StaticToken};
use serde_json::json;

use super::out::flat;
use crate::Global;

/// Arguments of `gsync watch`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Base URL of the backend (the WebSocket URL is derived from it).
    #[arg(long, env = "GSYNC_SERVER")]
    server: String,
    /// Bearer token (prefer the environment: command lines are visible to
    /// other users). Sent in the upgrade's Authorization header, never in the URL.
    #[arg(long, env = "GSYNC_TOKEN", hide_env_values = true)]
    token: String,
    /// Start after this cursor (0: the whole retained feed). Default: only
    /// changes from now on.
    #[arg(long)]
    since: Option<u64>,
    /// Save the cursor in the outbox file (--outbox) and resume from it.
    #[arg(long)]
    persist: bool,
    /// Poll interval while the WebSocket is down.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Client ping interval on the WebSocket.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// Declare the WebSocket dead after this long without an answer to a ping.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pong_deadline: Duration,
    /// Exit after this many changes (for scripts).
    #[arg(long)]
    count: Option<u64>,
}

pub(crate) fn run(global: &Global, args: Args) -> anyhow::Result<()> {
    check_token(&args.token)
        .context("--token (GSYNC_TOKEN)")
        .map_err(super::out::usage)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(watch(global, args))
}

async fn watch(global: &Global, args: Args) -> anyhow::Result<()> {
    let mut config = RealtimeConfig::new(&args.server, Arc::new(StaticToken::new(args.token)));
    config.start_from = args.since.map_or(StartFrom::Latest, StartFrom::After);
    config.poll_interval = args.poll_interval;
    config.ping_interval = args.ping_interval;
    config.pong_deadline = args.pong_deadline;
    if args.persist {
        let (outbox, _) = Outbox::open(&global.outbox, OutboxOptions::default())
            .await
            .with_context(|| format!("cannot open the outbox {}", global.outbox.display()))?;
        config.cursor_store = Arc::new(OutboxCursorStore::new(outbox));
    }
    let poll_interval = config.poll_interval;
    let service = RealtimeService::start(config).await?;
    let mut messages = service
        .messages()
        .context("the message stream was already taken")?;
    let mut states = service.connection_state();
    let mut seen = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            // States first: the service changes its state before it hands
            // over what the new connection brought, so a change is never
            // printed ahead of the "connected" that delivered it.
            biased;
            Some(state) = states.next() => print_state(state, global.json, poll_interval),
            message = messages.next() => {
                let Some(message) = message else { break };
                print_message(&message, global.json);
                if matches!(message, RealtimeMessage::Change { .. }) {
                    seen += 1;
                }
                if args.count.is_some_and(|n| seen >= n) {
                    // Count it as consumed so --persist saves it.
                    messages.ack();
                    break;
                }
            }
            _ = &mut ctrl_c => break,
        }
    }
    service.shutdown().await;
    Ok(())
}

fn print_state(state: ConnectionState, json: bool, poll_interval: Duration) {
    if json {
        println!("{}", json!({"event": "state", "state": state}));
        return;
    }
    let line = match state {
        ConnectionState::Connecting => "connecting…".to_owned(),
        ConnectionState::Connected => "connected (WebSocket push)".to_owned(),
        ConnectionState::Disconnected => "disconnected; reconnecting with backoff".to_owned(),
        ConnectionState::Polling => format!(
            "WebSocket down; polling the feed every {}",
            humantime::format_duration(poll_interval)
        ),
        ConnectionState::Stopped => "stopped".to_owned(),
        other => other.to_string(),
    };
    eprintln!("-- {line}");
}

fn print_message(message: &RealtimeMessage, json: bool) {
    match (message, json) {
        (RealtimeMessage::Change { change }, true) => {
            println!("{}", json!({"event": "change", "change": change}));
        }
        // The server's text is printed without its control characters.
        (RealtimeMessage::Change { change }, false) => println!(
            "#{} {} {}/{} v{} {}",
            change.cursor,
            change.op.as_str(),
            flat(&change.entity_type),
            flat(&change.id),
            change.version,
            change.data
        ),
        (RealtimeMessage::Resync(r), true) => {
            let mut v = json!(r);
            v["event"] = json!("resync");
            println!("{v}");
        }
        (RealtimeMessage::Resync(r), false) => println!(
            "!! resync: the feed no longer holds changes after {}; refetch everything (continuing after {}): {}",
            r.stale_cursor.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            r.resume_cursor,
            flat(&r.reason)
        ),
        (other, _) => eprintln!("-- unknown message at cursor {}", other.cursor()),
    }
}
