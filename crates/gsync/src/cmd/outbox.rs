//! Outbox commands: enqueue, status, ops, retry, discard, cancel, check.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use guardian_sync::clock::{Clock, SystemClock};
use guardian_sync::op::{NewOp, OpId, OpState, PendingOp};
use guardian_sync::outbox::{
    CheckReport, EnqueueError, ListFilter, OpenError, OpenReport, Outbox, OutboxOptions,
    OutboxReader, UnreadableOp, MAX_TRANSACTION_OPS,
};
use guardian_sync::retry::{clamp_due, RetryPolicy};
use serde_json::Value;
use uuid::Uuid;

use super::out::{self, flat, printable, usage};
use crate::Global;

/// Outbox commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Queue a change, or with --txn several as one atomic transaction
    /// (creates the outbox file if needed).
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

/// Kind of change to enqueue (`op` of a `--txn` file entry too).
#[derive(Debug, Clone, Copy, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    Create,
    Update,
    Delete,
}

/// Arguments of `enqueue`.
#[derive(Debug, clap::Args)]
pub(crate) struct EnqueueArgs {
    /// What to do.
    #[arg(required_unless_present = "txn")]
    kind: Option<Kind>,
    /// Entity type, e.g. `device`.
    #[arg(required_unless_present = "txn")]
    entity_type: Option<String>,
    /// Entity id.
    #[arg(required_unless_present = "txn")]
    id: Option<String>,
    /// The entity's data, a JSON object (create and update only).
    #[arg(value_name = "JSON")]
    payload: Option<String>,
    /// The state the change was made from (JSON), for conflict merges.
    #[arg(long, value_name = "JSON")]
    base: Option<String>,
    /// The server version the change was made against (sent as If-Match).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(..=i64::MAX.unsigned_abs()))]
    base_version: Option<u64>,
    /// Optimistic-update transaction token.
    #[arg(long, value_name = "TOKEN")]
    txn_token: Option<String>,
    /// Store the op as it is, without coalescing it into queued ops.
    #[arg(long)]
    no_coalesce: bool,
    /// Send the op only once this op is acknowledged (repeatable); it fails
    /// if that op fails.
    #[arg(long, value_name = "OP_ID")]
    depends_on: Vec<Uuid>,
    /// Enqueue the ops of FILE (`-` for stdin), a JSON array of
    /// `{"op","type","id","data","base","base_version","txn_token","depends_on"}`,
    /// as one atomic transaction: stored, sent and applied all or nothing.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["kind", "entity_type", "id", "payload", "base", "base_version", "txn_token", "no_coalesce", "depends_on"]
    )]
    txn: Option<PathBuf>,
}

/// One op of a `--txn` file: the arguments of a single `enqueue`, as JSON.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnOp {
    op: Kind,
    #[serde(rename = "type")]
    entity_type: String,
    id: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    base: Option<Value>,
    #[serde(default)]
    base_version: Option<u64>,
    #[serde(default)]
    txn_token: Option<String>,
    #[serde(default)]
    depends_on: Vec<OpId>,
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

async fn open(
    global: &Global,
    path: &Path,
    create: bool,
    coalesce: bool,
) -> anyhow::Result<Outbox> {
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
    warn_about(&report, global.json);
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

/// Warns on stderr of what opening the outbox repaired: one line, or with
/// `--json` one JSON object (`{"warning":{"kind","message"}}`).
fn warn_about(report: &OpenReport, json: bool) {
    let mut warnings = Vec::new();
    if let Some(s) = &report.salvage {
        let lost = match s.unreadable_seq_ranges.as_slice() {
            [] => String::new(),
            ranges => format!(
                "; unreadable, ops there may be lost: seq {}",
                seq_ranges(ranges)
            ),
        };
        warnings.push((
            "salvaged",
            format!(
                "the outbox was damaged ({}); moved to {}, salvaged {} ops ({} quarantined to failed, {} unreadable{}){lost}",
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
            ),
        ));
    }
    if report.upcast_failed > 0 {
        warnings.push((
            "upcast_failed",
            format!(
                "{} ops could not be upcast and were moved to failed",
                report.upcast_failed
            ),
        ));
    }
    for (kind, message) in warnings {
        let message = flat(&message);
        if json {
            eprintln!(
                "{}",
                serde_json::json!({"warning": {"kind": kind, "message": message}})
            );
        } else {
            eprintln!("gsync: warning: {message}");
        }
    }
}

/// Position ranges as `3, 7-9`, the first few of them.
fn seq_ranges(ranges: &[(i64, i64)]) -> String {
    const SHOWN: usize = 5;
    let mut parts: Vec<String> = ranges
        .iter()
        .take(SHOWN)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    if ranges.len() > SHOWN {
        parts.push(format!("and {} more ranges", ranges.len() - SHOWN));
    }
    parts.join(", ")
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
            let holder_alive = match &lock {
                Some(l) if !l.owner.is_empty() => outbox.lock_holder_alive()?,
                _ => None,
            };
            let runner: Option<Value> = outbox
                .meta_get(guardian_sync::engine::RUNNER_STATUS_KEY)?
                .and_then(|s| serde_json::from_str(&s).ok());
            if global.json {
                let mut v = serde_json::to_value(&stats)?;
                v["lock"] = serde_json::to_value(&lock)?;
                if let Some(l) = v["lock"].as_object_mut() {
                    l.insert("holder_alive".into(), serde_json::to_value(holder_alive)?);
                }
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
                    "lock:         held by {} (epoch {}, last beat {} ago){}",
                    l.owner,
                    l.epoch,
                    age(now - l.beat_at),
                    if holder_alive == Some(false) {
                        "; its process has exited (nothing holds its lock file): the next runner takes over at once"
                    } else {
                        ""
                    }
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
            let outbox = open(global, path, false, true).await?;
            let n = if args.all_failed {
                outbox.retry_all_failed().await?
            } else if let Some(id) = args.op_id {
                // Its transaction and its failed dependents come back with
                // it: the count is what left the failed list (at least the
                // op itself, should a runner fail another op meanwhile).
                let before = outbox.stats().await?.failed;
                outbox.retry_failed(id).await?;
                out::made(format!("op {id} was retried"), global.json);
                before.saturating_sub(outbox.stats().await?.failed).max(1)
            } else {
                bail!("give an op id or --all-failed");
            };
            out::made(format!("{n} op(s) were retried"), global.json);
            report(global, "retried", &serde_json::json!({ "retried": n }))
        }
        Command::Discard { op_id } => {
            let outbox = open(global, path, false, true).await?;
            let op = outbox.discard(op_id).await?;
            out::made(format!("op {op_id} was discarded"), global.json);
            report(global, "discarded", &op)
        }
        Command::Cancel { op_id } => {
            let outbox = open(global, path, false, true).await?;
            let op = outbox.cancel(op_id).await?;
            out::made(format!("op {op_id} was cancelled"), global.json);
            report(global, "cancelled", &op)
        }
        Command::Check(args) => {
            let check = if args.repair {
                let options = OutboxOptions::default();
                let (outbox, opened, check) = Outbox::repair(path, options)
                    .await
                    .with_context(|| format!("cannot repair outbox {}", path.display()))?;
                warn_about(&opened, global.json);
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
        println!("problem: {}", flat(p));
    }
    if check.reindexed {
        println!("indexes rebuilt");
    }
    for u in &check.unreadable_ops {
        println!("{}", flat(&unreadable_line(u)));
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
        (Some(id), _) => {
            let id = id.as_str().unwrap_or_default();
            match (v["txn"]["id"].as_str(), v["txn"]["size"].as_u64()) {
                (Some(txn), Some(size)) if size > 1 => {
                    println!("{verb} {id} and the other ops of its transaction {txn} ({size} ops)");
                }
                _ => println!("{verb} {id}"),
            }
        }
        (_, Some(n)) => println!("{verb} {n} op(s)"),
        _ => println!("{verb}"),
    }
    Ok(())
}

/// The op of one change: the checks of the command line, in one place for
/// a single `enqueue` and a `--txn` file.
fn new_op(
    kind: Kind,
    entity_type: &str,
    id: &str,
    payload: Option<Value>,
) -> anyhow::Result<NewOp> {
    Ok(match (kind, payload) {
        (Kind::Delete, None) => NewOp::delete(entity_type, id),
        (Kind::Delete, Some(_)) => bail!("delete takes no JSON payload"),
        (_, None) => bail!("create and update need a JSON object payload"),
        (Kind::Create, Some(p)) => NewOp::create(entity_type, id, p),
        (Kind::Update, Some(p)) => NewOp::update(entity_type, id, p),
    })
}

/// An enqueue's error: what the input made the outbox refuse is a usage
/// error (status 2), a failure of the outbox is not.
fn refused(e: EnqueueError) -> anyhow::Error {
    match e {
        EnqueueError::Storage(_)
        | EnqueueError::OutcomeUnknown { .. }
        | EnqueueError::Closed
        | EnqueueError::DependencyFailed { .. } => anyhow::Error::new(e),
        invalid => usage(invalid).into(),
    }
}

/// The op the arguments of a single `enqueue` describe.
fn op_of_args(args: &EnqueueArgs) -> anyhow::Result<NewOp> {
    let (Some(kind), Some(entity_type), Some(id)) = (args.kind, &args.entity_type, &args.id) else {
        bail!("give KIND TYPE ID, or --txn FILE");
    };
    let payload = match (kind, &args.payload) {
        (Kind::Delete, Some(_)) => bail!("delete takes no JSON payload"),
        (_, Some(text)) => Some(parse_json("payload", text)?),
        (_, None) => None,
    };
    let mut op = new_op(kind, entity_type, id, payload)?;
    if let Some(b) = &args.base {
        op.base = Some(parse_json("--base", b)?);
    }
    op.base_version = args.base_version;
    op.txn_token.clone_from(&args.txn_token);
    op.depends_on.clone_from(&args.depends_on);
    Ok(op)
}

async fn enqueue(global: &Global, args: EnqueueArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.txn {
        return enqueue_transaction(global, file).await;
    }
    let op = op_of_args(&args).map_err(usage)?;
    let outbox = open(global, &global.outbox, true, !args.no_coalesce).await?;
    let done = outbox.enqueue(op).await.map_err(refused)?;
    out::made(format!("op {} was stored", done.op_id), global.json);
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

/// Reads and checks a `--txn` file completely before the outbox is opened,
/// so bad input neither creates the outbox nor stores anything.
fn read_transaction(file: &Path) -> anyhow::Result<Vec<NewOp>> {
    let stdin = file == Path::new("-");
    let name = if stdin {
        "stdin".to_owned()
    } else {
        file.display().to_string()
    };
    let text = if stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the transaction from stdin")?;
        text
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {name}"))?
    };
    ops_of_text(&name, &text).map_err(|e| usage(e).into())
}

/// The ops a transaction's text names, each checked as `enqueue` checks
/// its arguments.
fn ops_of_text(name: &str, text: &str) -> anyhow::Result<Vec<NewOp>> {
    let Value::Array(entries) = parse_json(name, text)? else {
        bail!("{name} must hold a JSON array of ops");
    };
    if entries.is_empty() || entries.len() > MAX_TRANSACTION_OPS {
        bail!(
            "{name} holds {} ops; a transaction has 1 to {MAX_TRANSACTION_OPS}",
            entries.len()
        );
    }
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let n = i + 1;
            let t: TxnOp = serde_json::from_value(entry)
                .with_context(|| format!("{name}: op {n} is not a valid op"))?;
            guardian_protocol::validate_entity_type(&t.entity_type)
                .and_then(|()| guardian_protocol::validate_entity_id(&t.id))
                .with_context(|| format!("{name}: op {n}"))?;
            let mut op = new_op(t.op, &t.entity_type, &t.id, t.data)
                .with_context(|| format!("{name}: op {n}"))?;
            op.base = t.base;
            op.base_version = t.base_version;
            op.txn_token = t.txn_token;
            op.depends_on = t.depends_on;
            Ok(op)
        })
        .collect()
}

async fn enqueue_transaction(global: &Global, file: &Path) -> anyhow::Result<()> {
    let ops = read_transaction(file)?;
    let outbox = open(global, &global.outbox, true, true).await?;
    let done = outbox
        .enqueue_transaction(ops)
        .await
        .map_err(|e| refused(e).context("cannot enqueue the transaction"))?;
    out::made(
        format!(
            "transaction {} ({} ops) was stored",
            done.txn_id,
            done.ops.len()
        ),
        global.json,
    );
    if global.json {
        return print_json(&done);
    }
    println!("txn {}", done.txn_id);
    for op in &done.ops {
        println!("{}", op.op_id);
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
    let txns = txn_positions(ops);
    println!(
        "{:>6}  {:<36}  {:<6}  {:<28}  {:<9}  {:>4}  {:>8}  {:>5}  {:>5}  {:<16}  ERROR",
        "SEQ", "OP ID", "KIND", "ENTITY", "STATE", "TRY", "NEXT", "COAL", "RECON", "TXN"
    );
    let horizon = RetryPolicy::default().horizon();
    for op in ops {
        let op = match op {
            Ok(op) => op,
            Err(u) => {
                let line = format!(
                    "{:>6}  {:<36}  {:<6}  {:<28}  {:<9}  {:>4}  {:>8}  {:>5}  {:>5}  {:<16}  {}",
                    u.seq,
                    cut(&u.op_id, 36),
                    "?",
                    cut(&format!("{}/{}", u.entity_type, u.entity_id), 28),
                    cut(&u.state, 9),
                    "",
                    "-",
                    "",
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
        let txn = op.txn.map_or_else(
            || "-".to_owned(),
            |t| {
                let at = txns
                    .get(&op.seq)
                    .map_or_else(|| "?".to_owned(), ToString::to_string);
                format!("{} {at}/{}", &t.id.simple().to_string()[..8], t.size)
            },
        );
        let line = format!(
            "{:>6}  {:<36}  {:<6}  {:<28}  {:<9}  {:>4}  {:>8}  {:>5}  {:>5}  {:<16}  {}",
            op.seq,
            op.op_id,
            op.kind.as_str(),
            cut(&format!("{}/{}", op.entity_type, op.entity_id), 28),
            op.state.as_str(),
            op.attempts,
            next,
            op.coalesced_count,
            op.reconciliations,
            txn,
            cut(&printable(op.last_error.as_deref().unwrap_or("")), 60)
        );
        println!("{}", line.trim_end());
        if !op.depends_on.is_empty() {
            let ids: Vec<String> = op.depends_on.iter().map(ToString::to_string).collect();
            println!("{:>6}  └ depends on {}", "", ids.join(", "));
        }
        for h in &op.history {
            println!(
                "{:>6}  └ {} {} ago: {}",
                "",
                h.event,
                age(now - h.at),
                cut(&printable(&h.detail), 100)
            );
        }
    }
}

/// Each listed transaction op's position (1-based, in queue order) in its
/// transaction, by seq; only for transactions listed whole, as a page or a
/// state filter can cut one and positions counted on a part would be wrong.
fn txn_positions(ops: &[Result<PendingOp, UnreadableOp>]) -> HashMap<i64, usize> {
    let mut by_txn: HashMap<Uuid, (u32, Vec<i64>)> = HashMap::new();
    for op in ops.iter().flatten() {
        if let Some(t) = op.txn {
            by_txn
                .entry(t.id)
                .or_insert((t.size, Vec::new()))
                .1
                .push(op.seq);
        }
    }
    let mut positions = HashMap::new();
    for (size, mut seqs) in by_txn.into_values() {
        if u32::try_from(seqs.len()).ok() != Some(size) {
            continue;
        }
        seqs.sort_unstable();
        for (i, seq) in seqs.into_iter().enumerate() {
            positions.insert(seq, i + 1);
        }
    }
    positions
}
