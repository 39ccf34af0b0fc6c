//! `gsync run`: drain an outbox to a server.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use guardian_sync::breaker::{BreakerConfig, TripPolicy};
use guardian_sync::clock::{Clock as _, SystemClock};
use guardian_sync::engine::{
    BatchConfig, BuildError, EngineError, OnceReport, OnceStop, SyncEngine, SyncEvent,
    LOCK_ATTEMPT_MIN,
};
use guardian_sync::lock::LockConfig;
use guardian_sync::outbox::{OpenError, OutboxOptions, OutboxReader};
use guardian_sync::retry::RetryPolicy;
use guardian_sync::telemetry::TelemetryConfig;
use guardian_sync::transport::{check_token, StaticToken, TransportBuildError};
use indicatif::{ProgressBar, ProgressStyle};

use super::out::{usage, Stopped, AUTH_REFUSED, DEAD_LETTERED, LOCK_HELD, OPS_REMAIN};
use super::progress::{Progress, Waiting};
use crate::Global;

/// Arguments of `gsync run`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Base URL of the backend.
    #[arg(long, env = "GSYNC_SERVER")]
    server: String,
    /// Bearer token (read from the environment rather than the command line
    /// where possible: command lines are visible to other users).
    #[arg(long, env = "GSYNC_TOKEN", hide_env_values = true)]
    token: String,
    /// Make one pass and exit: send everything that is due, wait out
    /// backoffs only up to --max-wait, and exit with a status that says why
    /// it stopped (see the README).
    #[arg(long)]
    once: bool,
    /// With --once: longest total time to wait with nothing to send
    /// (backoff, Retry-After, open breaker, a lock held by another runner).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    /// Lock heartbeat interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Take over a lock whose heartbeat stood still this long.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    stale_after: Duration,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Send up to N ops per batch request (0 = one request per op).
    #[arg(long, default_value_t = BatchConfig::default().max_ops)]
    batch: usize,
    /// Print every engine event as a JSON line on stdout (for scripts and tests).
    #[arg(long)]
    events: bool,
    /// Largest delay before the first retry (exponential backoff, full jitter).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    retry_base: Duration,
    /// Longest backoff delay.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    retry_cap: Duration,
    /// Sends of one op (the first included) before it fails permanently.
    #[arg(long, default_value_t = 20)]
    max_attempts: u32,
    /// Open the circuit breaker at this many failures within its window
    /// (the count policy). Without it, the breaker opens when at least 70 %
    /// of the latest 20 outcomes failed, once 10 were seen (the rate policy).
    #[arg(long)]
    breaker_threshold: Option<u32>,
    /// Sliding window the breaker counts failures in.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    breaker_window: Duration,
    /// How long an open breaker waits before a trial request.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    breaker_cooldown: Duration,
    /// Conflicts one op may reconcile before it fails (raise it for entities
    /// many writers edit at once).
    #[arg(long, default_value_t = 5)]
    max_reconciliations: u32,
    /// A label sent with this runner's telemetry, `KEY=VALUE` (repeatable,
    /// at most 16): app, version, device, site...
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Least time between two telemetry snapshots (at least 100ms); a
    /// breaker change is sent within 250ms all the same.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    telemetry_interval: Duration,
    /// Send telemetry to this backend instead of --server (a monitoring
    /// instance that stays up while the sync server is down).
    #[arg(long, value_name = "URL")]
    telemetry_url: Option<String>,
    /// Send no telemetry.
    #[arg(long, conflicts_with_all = ["labels", "telemetry_interval", "telemetry_url"])]
    no_telemetry: bool,
}

/// Parses `KEY=VALUE` within the backend's bounds: a snapshot with a label
/// out of bounds would be refused whole, silently.
fn parse_label(s: &str) -> Result<(String, String), String> {
    use guardian_protocol::telemetry::{MAX_LABEL_KEY, MAX_LABEL_VALUE};
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && k.len() <= MAX_LABEL_KEY && v.len() <= MAX_LABEL_VALUE => {
            Ok((k.to_owned(), v.to_owned()))
        }
        Some(_) => Err(format!(
            "a label is KEY=VALUE with a key of 1 to {MAX_LABEL_KEY} bytes and a value of at most {MAX_LABEL_VALUE}"
        )),
        None => Err("a label is KEY=VALUE".to_owned()),
    }
}

impl Args {
    /// The telemetry settings, `None` when turned off.
    fn telemetry(&self) -> anyhow::Result<Option<TelemetryConfig>> {
        use guardian_protocol::telemetry::MAX_LABELS;
        if self.no_telemetry {
            return Ok(None);
        }
        if self.telemetry_interval < Duration::from_millis(100) {
            anyhow::bail!("--telemetry-interval must be at least 100ms");
        }
        let labels: BTreeMap<_, _> = self.labels.iter().cloned().collect();
        if labels.len() > MAX_LABELS {
            anyhow::bail!("at most {MAX_LABELS} --label");
        }
        if let Some(url) = &self.telemetry_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!("--telemetry-url must be an http(s) URL");
            }
        }
        Ok(Some(TelemetryConfig {
            labels,
            min_interval: self.telemetry_interval,
            endpoint: self.telemetry_url.clone(),
            ..TelemetryConfig::default()
        }))
    }
}

pub(crate) fn run(global: &Global, args: Args) -> anyhow::Result<()> {
    check_token(&args.token)
        .context("--token (GSYNC_TOKEN)")
        .map_err(usage)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(drain(global, args))
}

async fn drain(global: &Global, args: Args) -> anyhow::Result<()> {
    let lock = LockConfig::new(args.heartbeat, args.stale_after).map_err(usage)?;
    let telemetry = args.telemetry().map_err(usage)?;
    let open_wait = open_wait(&args);
    let mut builder = SyncEngine::builder()
        .outbox_path(&global.outbox)
        .outbox_options(OutboxOptions::default().open_timeout(open_wait))
        .server(&args.server)
        .token_provider(Arc::new(StaticToken::new(args.token.clone())))
        .lock(lock)
        .retry(
            RetryPolicy::new(
                args.retry_base,
                2.0,
                args.retry_cap,
                args.max_attempts,
                RetryPolicy::default().max_retry_after(),
            )
            .map_err(usage)?,
        )
        .breaker(BreakerConfig {
            policy: args
                .breaker_threshold
                .map_or(TripPolicy::DEFAULT_RATE, |failures| TripPolicy::Count {
                    failures,
                }),
            window: args.breaker_window,
            cooldown: args.breaker_cooldown,
            ..BreakerConfig::default()
        })
        .max_reconciliations(args.max_reconciliations)
        .concurrency(args.concurrency.max(1));
    builder = match telemetry {
        Some(config) => builder.telemetry(config),
        None => builder.no_telemetry(),
    };
    builder = match args.batch {
        0 => builder.no_batching(),
        max_ops => builder.batching(BatchConfig {
            max_ops,
            ..BatchConfig::default()
        }),
    };
    let engine = match builder.build().await {
        Ok(engine) => engine,
        Err(BuildError::Open(OpenError::Storage(e))) if args.once && e.is_busy() => {
            return Err(busy_at_open(&global.outbox, open_wait).await.into());
        }
        Err(BuildError::Open(OpenError::SalvageUnderWay { .. })) if args.once => {
            return Err(Stopped {
                code: LOCK_HELD,
                kind: "lock_held",
                reason: format!(
                    "another process was salvaging the damaged outbox for all of {}",
                    humantime::format_duration(open_wait)
                ),
            }
            .into());
        }
        Err(
            e @ (BuildError::Breaker(_)
            | BuildError::Telemetry(_)
            | BuildError::ZeroConcurrency
            | BuildError::Transport(TransportBuildError::BadUrl { .. })),
        ) => return Err(usage(e).into()),
        Err(e) => return Err(e.into()),
    };
    let interactive = std::io::stderr().is_terminal() && !global.json && !args.events;
    let progress = if interactive {
        // Counting the queue costs O(queue); only a terminal user needs it.
        let total = engine.outbox().stats().await?;
        Some(Arc::new(Mutex::new(Progress::new(
            total.pending + total.in_flight,
        ))))
    } else {
        None
    };
    let bar = progress.as_ref().map(|_| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let mut events = engine.events();
    let printer_progress = progress.clone();
    let print_events = args.events;
    // With --json, stdout carries the report and stderr only a JSON error:
    // no plain event lines.
    let plain_lines = !global.json;
    let printer = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) if print_events || plain_lines => {
                    report_event(&event, print_events, printer_progress.as_deref());
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    if print_events {
                        println!("{}", serde_json::json!({"event": "lagged", "missed": n}));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let ticker = match (&progress, &bar) {
        (Some(p), Some(b)) => Some(tokio::spawn(tick(engine.clone(), p.clone(), b.clone()))),
        _ => None,
    };
    let result = if args.once {
        engine.run_once(args.max_wait).await.map(Finished::Once)
    } else {
        engine
            .run(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map(|r| Finished::Run(Box::new(r)))
    };
    if let Some(t) = ticker {
        t.abort();
    }
    printer.abort();
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = engine.metrics().summary();
    let finished = match result {
        Ok(finished) => finished,
        Err(EngineError::LockLost) => {
            anyhow::bail!("lost the processing lock to another runner; stopped without writing")
        }
        Err(e) => return Err(e.into()),
    };
    match finished {
        Finished::Run(report) => {
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({"report": report, "metrics": summary})
                );
            } else if !args.events {
                eprintln!(
                    "drained: {} succeeded, {} failed, {} retried, {} conflicts resolved, {} takeovers",
                    report.drain.succeeded,
                    report.drain.failed,
                    report.drain.retried,
                    report.drain.conflicts_resolved,
                    report.takeovers
                );
                eprintln!("{summary}");
            }
            Ok(())
        }
        Finished::Once(once) => {
            let now = SystemClock::new().now_millis();
            let breaker_open = engine.breaker_retry_in().is_some();
            let verdict = verdict(&once, breaker_open, now);
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "report": once.run,
                        "metrics": summary,
                        "stop": once.stop,
                        "remaining": once.remaining,
                        "next_attempt_at": once.next_attempt_at,
                        "last_error": once.last_error,
                        "lock_holder": once.lock_holder,
                        "waited_ms": once.waited_ms,
                        "exit_code": verdict.as_ref().map_or(0, |v| v.code),
                    })
                );
            }
            match verdict {
                Some(stopped) => Err(stopped.into()),
                None => {
                    if !global.json {
                        eprintln!(
                            "done: queue empty; {} succeeded, {} retried, {} conflicts resolved",
                            once.run.drain.succeeded,
                            once.run.drain.retried,
                            once.run.drain.conflicts_resolved
                        );
                    }
                    Ok(())
                }
            }
        }
    }
}

/// How a run ended without an engine error.
enum Finished {
    Run(Box<guardian_sync::engine::RunReport>),
    Once(OnceReport),
}

/// The exit status and line of a `run --once` pass, `None` for success.
///
/// One pass can stop for several reasons at once; the status names the one
/// that asks most of the user: a lock held (nothing was tried), a refused
/// token, ops moved to the failed list, then ops left for a later pass.
fn verdict(once: &OnceReport, breaker_open: bool, now_ms: i64) -> Option<Stopped> {
    let d = &once.run.drain;
    let tally = format!(
        "this pass: {} succeeded, {} failed, {} retried",
        d.succeeded, d.failed, d.retried
    );
    let last = once
        .last_error
        .as_deref()
        .map(|e| format!("; last error: {e}"))
        .unwrap_or_default();
    let remain = || {
        let when = match once.next_attempt_at {
            Some(at) if at > now_ms => format!(
                "next attempt in {}",
                humantime::format_duration(Duration::from_secs(
                    u64::try_from(at - now_ms).unwrap_or(0).div_ceil(1000)
                ))
            ),
            // The breaker lives in this process: a new pass may try at once.
            Some(_) if breaker_open => {
                "stopped while the circuit breaker was open; due now".to_owned()
            }
            Some(_) => "next attempt due now".to_owned(),
            None => "blocked behind failed ops".to_owned(),
        };
        format!("{} op(s) remain, {when}", once.remaining)
    };
    let (code, kind, reason) = match once.stop {
        OnceStop::LockHeld => (
            LOCK_HELD,
            "lock_held",
            lock_held_line(once.lock_holder.as_deref(), once.waited_ms, once.remaining),
        ),
        OnceStop::AuthRefused => (
            AUTH_REFUSED,
            "auth_refused",
            format!("the server refused the token; {}; {tally}", remain()),
        ),
        _ if d.failed > 0 => (
            DEAD_LETTERED,
            "dead_lettered",
            format!(
                "{} op(s) failed for good (see `gsync ops --state failed`){last}; {tally}",
                d.failed
            ),
        ),
        OnceStop::Remaining => (
            OPS_REMAIN,
            "ops_remain",
            format!("{}{last}; {tally}", remain()),
        ),
        _ => return None,
    };
    Some(Stopped { code, kind, reason })
}

/// Why a pass could not take the processing lock. With no holder in the
/// lock row, no runner held it: another process kept the outbox's write
/// lock, or held the lock file as it took or gave up the row.
fn lock_held_line(holder: Option<&str>, waited_ms: u64, remaining: u64) -> String {
    let why = holder.map_or_else(
        || "could not take the processing lock: another process was writing to the outbox or taking the lock".to_owned(),
        |h| format!("another runner holds the processing lock ({h})"),
    );
    let tenths = f64::from(u32::try_from(waited_ms / 100).unwrap_or(u32::MAX));
    format!(
        "{why} (waited {:.1}s); {remaining} op(s) wait for it",
        tenths / 10.0
    )
}

/// How long opening the outbox waits for another process's write lock: the
/// busy timeout, or for `--once` its `--max-wait` if that is shorter (but
/// at least the pass's one attempt at the lock).
fn open_wait(args: &Args) -> Duration {
    let busy = OutboxOptions::default().busy_timeout;
    if args.once {
        args.max_wait
            .clamp(LOCK_ATTEMPT_MIN, busy.max(LOCK_ATTEMPT_MIN))
    } else {
        busy
    }
}

/// The verdict of a pass whose outbox stayed busy past the busy timeout as
/// it opened: like a held lock, nothing was tried and a later pass may go.
/// The queue is counted through a read-only view, which a writer does not
/// block.
async fn busy_at_open(path: &std::path::Path, waited: Duration) -> Stopped {
    let path = path.to_path_buf();
    let counted = tokio::task::spawn_blocking(move || {
        let stats = OutboxReader::open(&path).ok()?.stats().ok()?;
        Some(stats.pending + stats.in_flight)
    })
    .await
    .ok()
    .flatten();
    let waiting = counted.map_or_else(String::new, |n| format!("; {n} op(s) wait for it"));
    Stopped {
        code: LOCK_HELD,
        kind: "lock_held",
        reason: format!(
            "the outbox stayed busy: another process held its write lock for {} as it opened{waiting}",
            humantime::format_duration(waited)
        ),
    }
}

/// Redraws the progress line on a steady tick, so the clock, the rate and
/// a countdown move while nothing else happens.
async fn tick(engine: SyncEngine, progress: Arc<Mutex<Progress>>, bar: ProgressBar) {
    const TICK: Duration = Duration::from_millis(250);
    let started = Instant::now();
    let clock = SystemClock::new();
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut backoff_until = None;
    let mut ticks: u64 = 0;
    loop {
        interval.tick().await;
        let now = started.elapsed();
        // The next due op is an index lookup on the writer thread: once a
        // second is plenty for a countdown in seconds.
        if ticks.is_multiple_of(4) {
            backoff_until = match engine.outbox().next_due().await {
                Ok(due) => due.next_attempt_at.and_then(|at| {
                    let ms = at - clock.now_millis();
                    (ms > 0).then(|| now + Duration::from_millis(ms.unsigned_abs()))
                }),
                Err(_) => None,
            };
        }
        ticks += 1;
        let waiting = if engine.auth_paused() {
            Waiting::Auth
        } else if let Some(left) = engine.breaker_retry_in() {
            Waiting::Breaker { until: now + left }
        } else if let Some(until) = backoff_until.filter(|u| *u > now) {
            Waiting::Backoff { until }
        } else {
            Waiting::No
        };
        let line = {
            let mut p = progress.lock().unwrap_or_else(PoisonError::into_inner);
            p.set_waiting(waiting);
            p.sample(now);
            p.line(now)
        };
        bar.set_message(line);
    }
}

fn report_event(event: &SyncEvent, json: bool, progress: Option<&Mutex<Progress>>) {
    if json {
        // Stamped with the wall clock (Unix ms), so a reader can time what
        // followed the event (a dashboard showing a breaker trip).
        if let Ok(serde_json::Value::Object(mut line)) = serde_json::to_value(event) {
            line.insert("at".into(), SystemClock::new().now_millis().into());
            println!("{}", serde_json::Value::Object(line));
        }
        return;
    }
    if let Some(progress) = progress {
        let mut p = progress.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            SyncEvent::OpSucceeded { .. } => p.succeeded(),
            SyncEvent::OpFailed { error, .. } => p.failed(error),
            SyncEvent::OpRetried { reason, .. } => p.attempt_failed(reason),
            _ => {}
        }
        return;
    }
    // Not a terminal: one plain line per event (never payloads).
    let line = match event {
        SyncEvent::OpSucceeded {
            op_id,
            entity_type,
            entity_id,
            version,
            replayed,
        } => format!(
            "ok      {op_id} {entity_type}/{entity_id} v{}{}",
            version.map_or_else(|| "-".to_owned(), |v| v.to_string()),
            if *replayed { " (replayed)" } else { "" }
        ),
        SyncEvent::OpFailed {
            op_id,
            entity_type,
            entity_id,
            error,
        } => format!("failed  {op_id} {entity_type}/{entity_id}: {error}"),
        SyncEvent::OpRetried {
            op_id,
            attempts,
            reason,
            ..
        } => format!("retry   {op_id} after attempt {attempts}: {reason}"),
        SyncEvent::Conflict {
            op_id, resolution, ..
        } => format!("conflict {op_id}: {resolution}"),
        SyncEvent::Breaker { from, to } => format!("breaker {from} -> {to}"),
        SyncEvent::LockAcquired {
            epoch,
            took_over_from,
        } => match took_over_from {
            Some(prev) => format!("lock    acquired at epoch {epoch} (took over from {prev})"),
            None => format!("lock    acquired at epoch {epoch}"),
        },
        SyncEvent::LockLost => "lock    lost to another runner".to_owned(),
        SyncEvent::AuthRequired => "auth    required: ops stay pending".to_owned(),
        SyncEvent::Stalled {
            stalled_for_ms,
            pending,
        } => format!("stalled {pending} pending, no progress for {stalled_for_ms} ms"),
        other => serde_json::to_string(other).unwrap_or_default(),
    };
    // Errors and reasons quote the server's text.
    eprintln!("{}", super::out::printable(&line));
}

#[cfg(test)]
mod tests {
    use super::lock_held_line;

    #[test]
    fn a_held_lock_names_its_holder_and_a_busy_outbox_says_so() {
        assert_eq!(
            lock_held_line(Some("runner-1"), 1_049, 2),
            "another runner holds the processing lock (runner-1) (waited 1.0s); 2 op(s) wait for it"
        );
        assert_eq!(
            lock_held_line(None, 30_000, 0),
            "could not take the processing lock: another process was writing to the outbox or taking the lock (waited 30.0s); 0 op(s) wait for it"
        );
    }
}
