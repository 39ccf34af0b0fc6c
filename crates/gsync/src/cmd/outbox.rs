//! Outbox commands: enqueue, status, ops, retry, discard, cancel, check.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use guardian_sync::clock::{Clock, SystemClock};
use guardian_sync::op::{NewOp, OpState, PendingOp};
use guardian_sync::outbox::{
    CheckReport, ListFilter, OpenError, OpenReport, Outbox, OutboxOptions, OutboxReader,
    UnreadableOp,
};
use guardian_sync::retry::{clamp_due, RetryPolicy};
use serde_json::Value;
use uuid::Uuid;

use crate::Global;

/// Outbox commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Queue a change (creates the outbox file if needed).
    Enqueue(EnqueueArgs),
    /// Counts by state, oldest op age, next attempt time, lock holder and runner status.
    Status(StatusArgs),
    /// List queued and failed ops (a table, or JSON with --json).
    Ops(OpsArgs),
    /// Put a failed op (or all of them) back in the queue as new: attempts reset, error cleared (kept in its history).
    Retry(RetryArgs),
    /// Remove a failed op for good.
    Discard {
        /// The op id.
        op_id: Uuid,
    },
    /// Remove a pending op that was never attempted.
    Cancel {
        /// The op id.
        op_id: Uuid,
    },
    /// Check the file and every op row, changing nothing (exit 1 if damaged).
    Check(CheckArgs),
}

/// Arguments of `check`.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    /// Repair what the check finds: rebuild indexes, quarantine damaged ops
    /// (to the failed list) and salvage a damaged file into a fresh one.
    #[arg(long)]
    repair: bool,
}

/// Kind of change to enqueue.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Kind {
    Create,
    Update,
    Delete,
}

/// Arguments of `enqueue`.
#[derive(Debug, clap::Args)]
pub(crate) struct EnqueueArgs {
    /// What to do.
    kind: Kind,
    /// Entity type, e.g. `device`.
    entity_type: String,
    /// Entity id.
    id: String,
    /// The entity's data, a JSON object (create and update only).
    #[arg(value_name = "JSON")]
    payload: Option<String>,
    /// The state the change was made from (JSON), for conflict merges.
    #[arg(long, value_name = "JSON")]
    base: Option<String>,
    /// The server version the change was made against (sent as If-Match).
    #[arg(long, value_name = "N")]
    base_version: Option<u64>,
    /// Optimistic-update transaction token.
    #[arg(long, value_name = "TOKEN")]
    txn_token: Option<String>,
    /// Store the op as it is, without coalescing it into queued ops.
    #[arg(long)]
    no_coalesce: bool,
}

/// State filter of `ops`: the names of the JSON output (`in-flight` is
/// accepted too, as earlier versions spelled it).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum StateArg {
    Pending,
    #[value(name = "in_flight", alias = "in-flight")]
    InFlight,
    Failed,
}

impl From<StateArg> for OpState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => OpState::Pending,
            StateArg::InFlight => OpState::InFlight,
            StateArg::Failed => OpState::Failed,
        }
    }
}

/// Arguments of `ops`.
#[derive(Debug, clap::Args)]
pub(crate) struct OpsArgs {
    /// Only ops in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// At most this many ops.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Only ops after this position (for paging).
    #[arg(long, default_value_t = 0)]
    after: i64,
}

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// Also print the telemetry a live runner last published (counters, latency, health).
    #[arg(long)]
    metrics: bool,
}

/// Arguments of `retry`.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct RetryArgs {
    /// The failed op to retry.
    op_id: Option<Uuid>,
    /// Retry every failed op.
    #[arg(long)]
    all_failed: bool,
}

/// Runs an outbox command.
pub(crate) fn run(global: &Global, command: Command) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run_async(global, command))
}

async fn open(path: &Path, create: bool, coalesce: bool) -> anyhow::Result<Outbox> {
    if !create && !path.exists() {
        bail!(
            "no outbox at {} (pass --outbox PATH or set GSYNC_OUTBOX)",
            path.display()
        );
    }
    let options = OutboxOptions::default().coalesce(coalesce);
    let (outbox, report) = Outbox::open(path, options)
        .await
        .with_context(|| format!("cannot open outbox {}", path.display()))?;
    warn_about(&report);
    Ok(outbox)
}

/// Opens the outbox for a read-only command: nothing is written, moved or
/// created, whatever is at the path.
fn open_read_only(path: &Path) -> anyhow::Result<OutboxReader> {
    OutboxReader::open(path).map_err(|e| match e {
        OpenError::Missing { .. } => anyhow::anyhow!(
            "no outbox at {} (pass --outbox PATH or set GSYNC_OUTBOX)",
            path.display()
        ),
        other => anyhow::Error::new(other),
    })
}

fn warn_about(report: &OpenReport) {
    if let Some(s) = &report.salvage {
        eprintln!(
            "gsync: warning: the outbox was damaged ({}); moved to {}, salvaged {} ops ({} quarantined to failed, {} unreadable{})",
            s.reason,
            s.moved_to.display(),
            s.ops_saved,
            s.ops_quarantined,
            s.ops_unreadable,
            if s.ops_found_by_scan > 0 {
                format!(", {} found by the page scan", s.ops_found_by_scan)
            } else if s.ops_table_lost {
                ", ops table lost".to_owned()
            } else {
                String::new()
            }
        );
    }
    if report.upcast_failed > 0 {
        eprintln!(
            "gsync: warning: {} ops could not be upcast and were moved to failed",
            report.upcast_failed
        );
    }
}

fn parse_json(what: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON"))
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn run_async(global: &Global, command: Command) -> anyhow::Result<()> {
    let path = global.outbox.as_path();
    match command {
        Command::Enqueue(args) => enqueue(global, args).await,
        Command::Status(args) => {
            let outbox = open_read_only(path)?;
            let mut stats = outbox.stats()?;
            let now = SystemClock::new().now_millis();
            // As a runner will see it: a time stored under a wall clock
            // ahead of this one is not shown as hours away.
            stats.next_attempt_at = outbox.next_attempt(now, RetryPolicy::default().horizon())?;
            let lock = outbox.lock_read()?;
            let runner: Option<Value> = outbox
                .meta_get(guardian_sync::engine::RUNNER_STATUS_KEY)?
                .and_then(|s| serde_json::from_str(&s).ok());
            if global.json {
                let mut v = serde_json::to_value(&stats)?;
                v["lock"] = serde_json::to_value(&lock)?;
                let mut runner = runner.unwrap_or(Value::Null);
                if !args.metrics {
                    if let Some(r) = runner.as_object_mut() {
                        r.remove("metrics");
                    }
                }
                v["runner"] = runner;
                return print_json(&v);
            }
            println!("outbox:       {}", path.display());
            println!("pending:      {}", stats.pending);
            println!("in flight:    {}", stats.in_flight);
            println!("failed:       {}", stats.failed);
            println!(
                "oldest op:    {}",
                stats
                    .oldest_created_at
                    .map_or_else(|| "-".into(), |t| format!("{} ago", age(now - t)))
            );
            println!(
                "next attempt: {}",
                stats.next_attempt_at.map_or_else(
                    || "-".into(),
                    |t| if t <= now {
                        "now".into()
                    } else {
                        format!("in {}", age(t - now))
                    }
                )
            );
            match &lock {
                Some(l) if !l.owner.is_empty() => println!(
                    "lock:         held by {} (epoch {}, last beat {} ago)",
                    l.owner,
                    l.epoch,
                    age(now - l.beat_at)
                ),
                Some(l) => println!("lock:         free (epoch {})", l.epoch),
                None => println!("lock:         never taken"),
            }
            if let Some(r) = &runner {
                println!(
                    "runner:       {} breaker {}, published {} ago",
                    r["owner"].as_str().unwrap_or("?"),
                    r["breaker"].as_str().unwrap_or("?"),
                    age(now - r["at"].as_i64().unwrap_or(now))
                );
                if args.metrics {
                    println!("{}", serde_json::to_string_pretty(&r["metrics"])?);
                }
            } else if args.metrics {
                println!("runner:       no runner has published metrics yet");
            }
            Ok(())
        }
        Command::Ops(args) => {
            let outbox = open_read_only(path)?;
            let ops = outbox.list_checked(&ListFilter {
                state: args.state.map(OpState::from),
                limit: args.limit,
                after_seq: args.after,
            })?;
            if global.json {
                let rows = ops
                    .iter()
                    .map(|r| match r {
                        Ok(op) => serde_json::to_value(op),
                        Err(u) => {
                            let mut v = serde_json::to_value(u)?;
                            v["unreadable"] = Value::Bool(true);
                            Ok(v)
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                print_json(&rows)
            } else {
                print_table(&ops);
                Ok(())
            }
        }
        Command::Retry(args) => {
            let outbox = open(path, false, true).await?;
            let n = if args.all_failed {
                outbox.retry_all_failed().await?
            } else if let Some(id) = args.op_id {
                outbox.retry_failed(id).await?;
                1
            } else {
                bail!("give an op id or --all-failed");
            };
            report(global, "retried", &serde_json::json!({ "retried": n }))
        }
        Command::Discard { op_id } => {
            let outbox = open(path, false, true).await?;
            let op = outbox.discard(op_id).await?;
            report(global, "discarded", &op)
        }
        Command::Cancel { op_id } => {
            let outbox = open(path, false, true).await?;
            let op = outbox.cancel(op_id).await?;
            report(global, "cancelled", &op)
        }
        Command::Check(args) => {
            let check = if args.repair {
                let options = OutboxOptions::default();
                let (outbox, opened, check) = Outbox::repair(path, options)
                    .await
                    .with_context(|| format!("cannot repair outbox {}", path.display()))?;
                warn_about(&opened);
                outbox.close().await;
                if global.json {
                    let mut v = serde_json::to_value(&check)?;
                    v["salvage"] = serde_json::to_value(&opened.salvage)?;
                    print_json(&v)?;
                } else {
                    print_check(&check, true);
                }
                check
            } else {
                let check = open_read_only(path)?.check()?;
                if global.json {
                    print_json(&check)?;
                } else {
                    print_check(&check, false);
                }
                check
            };
            if check.ok {
                Ok(())
            } else if args.repair {
                bail!(
                    "the outbox is still damaged after the repair: {}",
                    check.remaining.first().map_or("", String::as_str)
                )
            } else {
                bail!("the outbox is damaged; repair it with `gsync check --repair`")
            }
        }
    }
}

fn print_check(check: &CheckReport, repaired: bool) {
    for p in &check.problems {
        println!("problem: {p}");
    }
    if check.reindexed {
        println!("indexes rebuilt");
    }
    for u in &check.unreadable_ops {
        println!("{}", unreadable_line(u));
    }
    match (check.ok, repaired) {
        (true, _) if check.problems.is_empty() && check.unreadable_ops.is_empty() => {
            println!("ok");
        }
        (true, true) => println!("ok now"),
        (true, false) => println!("ok (damaged ops are quarantined in the failed list)"),
        (false, true) => println!("still damaged"),
        (false, false) => println!("damaged"),
    }
}

fn unreadable_line(u: &UnreadableOp) -> String {
    format!(
        "damaged op: seq {} (op {}, {}/{}, {}): {}",
        u.seq,
        cut(&u.op_id, 36),
        cut(&u.entity_type, 20),
        cut(&u.entity_id, 20),
        u.state,
        u.reason
    )
}

fn report(global: &Global, verb: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if global.json {
        return print_json(value);
    }
    let v = serde_json::to_value(value)?;
    match (v.get("op_id"), v.get("retried")) {
        (Some(id), _) => println!("{verb} {}", id.as_str().unwrap_or_default()),
        (_, Some(n)) => println!("{verb} {n} op(s)"),
        _ => println!("{verb}"),
    }
    Ok(())
}

async fn enqueue(global: &Global, args: EnqueueArgs) -> anyhow::Result<()> {
    let payload = match (&args.kind, &args.payload) {
        (Kind::Delete, None) => Value::Null,
        (Kind::Delete, Some(_)) => bail!("delete takes no JSON payload"),
        (_, None) => bail!("create and update need a JSON object payload"),
        (_, Some(text)) => parse_json("payload", text)?,
    };
    let mut op = match args.kind {
        Kind::Create => NewOp::create(&args.entity_type, &args.id, payload),
        Kind::Update => NewOp::update(&args.entity_type, &args.id, payload),
        Kind::Delete => NewOp::delete(&args.entity_type, &args.id),
    };
    if let Some(b) = &args.base {
        op.base = Some(parse_json("--base", b)?);
    }
    op.base_version = args.base_version;
    op.txn_token = args.txn_token;
    let outbox = open(&global.outbox, true, !args.no_coalesce).await?;
    let done = outbox.enqueue(op).await?;
    if global.json {
        return print_json(&done);
    }
    match &done.coalesced {
        None => println!("{}", done.op_id),
        Some(c) => {
            let how = serde_json::to_value(c)?;
            println!(
                "{} (coalesced: {})",
                done.op_id,
                how["how"].as_str().unwrap_or("yes")
            );
        }
    }
    Ok(())
}

fn age(ms: i64) -> String {
    let secs = u64::try_from(ms.max(0) / 1000).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn print_table(ops: &[Result<PendingOp, UnreadableOp>]) {
    if ops.is_empty() {
        println!("(no ops)");
        return;
    }
    let now = SystemClock::new().now_millis();
    println!(
        "{:>6}  {:<36}  {:<6}  {:<28}  {:<9}  {:>4}  {:>8}  {:>5}  {:>5}  ERROR",
        "SEQ", "OP ID", "KIND", "ENTITY", "STATE", "TRY", "NEXT", "COAL", "RECON"
    );
    let horizon = RetryPolicy::default().horizon();
    for op in ops {
        let op = match op {
            Ok(op) => op,
            Err(u) => {
                let line = format!(
                    "{:>6}  {:<36}  {:<6}  {:<28}  {:<9}  {:>4}  {:>8}  {:>5}  {:>5}  {}",
                    u.seq,
                    cut(&u.op_id, 36),
                    "?",
                    cut(&format!("{}/{}", u.entity_type, u.entity_id), 28),
                    cut(&u.state, 9),
                    "",
                    "-",
                    "",
                    "",
                    cut(&u.reason, 80)
                );
                println!("{}", line.trim_end());
                continue;
            }
        };
        // As a runner will see it (a time stored under a clock ahead is not shown as hours away).
        let due = clamp_due(op.next_attempt_at, op.attempts, op.updated_at, now, horizon);
        let next = if op.state != OpState::Pending {
            "-".to_owned()
        } else if due <= now {
            "now".to_owned()
        } else {
            format!("+{}s", (due - now + 999) / 1000)
        };
        let line = format!(
            "{:>6}  {:<36}  {:<6}  {:<28}  {:<9}  {:>4}  {:>8}  {:>5}  {:>5}  {}",
            op.seq,
            op.op_id,
            op.kind.as_str(),
            cut(&format!("{}/{}", op.entity_type, op.entity_id), 28),
            op.state.as_str(),
            op.attempts,
            next,
            op.coalesced_count,
            op.reconciliations,
            cut(op.last_error.as_deref().unwrap_or(""), 60)
        );
        println!("{}", line.trim_end());
        for h in &op.history {
            println!(
                "{:>6}  └ {} {} ago: {}",
                "",
                h.event,
                age(now - h.at),
                cut(&h.detail, 100)
            );
        }
    }
}
