//! `gsync run`: drain an outbox to a server.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use guardian_sync::breaker::{BreakerConfig, TripPolicy};
use guardian_sync::engine::{BatchConfig, EngineError, SyncEngine, SyncEvent};
use guardian_sync::lock::LockConfig;
use guardian_sync::retry::RetryPolicy;
use guardian_sync::transport::StaticToken;
use indicatif::{ProgressBar, ProgressStyle};

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
    /// Exit once no op is pending or in flight (waiting out backoffs).
    #[arg(long)]
    once: bool,
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
    #[arg(long, default_value_t = 0)]
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
    /// (the count policy). Without it, the breaker opens when at least half
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
}

pub(crate) fn run(global: &Global, args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(drain(global, args))
}

async fn drain(global: &Global, args: Args) -> anyhow::Result<()> {
    let lock = LockConfig::new(args.heartbeat, args.stale_after)?;
    let mut builder = SyncEngine::builder()
        .outbox_path(&global.outbox)
        .server(&args.server)
        .token_provider(Arc::new(StaticToken::new(args.token.clone())))
        .lock(lock)
        .retry(RetryPolicy::new(
            args.retry_base,
            2.0,
            args.retry_cap,
            args.max_attempts,
            RetryPolicy::default().max_retry_after(),
        )?)
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
    if args.batch > 0 {
        builder = builder.batching(BatchConfig {
            max_ops: args.batch,
            ..BatchConfig::default()
        });
    }
    let engine = builder.build().await?;
    let interactive = std::io::stderr().is_terminal() && !global.json && !args.events;
    let bar = if interactive {
        // Counting the queue costs O(queue); only a terminal user needs it.
        let total = engine.outbox().stats().await?;
        let bar = ProgressBar::new(total.pending + total.in_flight);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let mut events = engine.events();
    let printer_bar = bar.clone();
    let print_events = args.events;
    let printer = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => report_event(&event, print_events, printer_bar.as_ref()),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("{n} events were not shown");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let result = if args.once {
        engine.run_until_empty().await
    } else {
        engine
            .run(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    };
    printer.abort();
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = engine.metrics().summary();
    match &result {
        Ok(report) => {
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
                eprintln!("{}", engine.metrics().summary());
            }
        }
        Err(EngineError::LockLost) => {
            anyhow::bail!("lost the processing lock to another runner; stopped without writing")
        }
        Err(e) => anyhow::bail!("{e}"),
    }
    Ok(())
}

fn report_event(event: &SyncEvent, json: bool, bar: Option<&ProgressBar>) {
    if json {
        if let Ok(line) = serde_json::to_string(event) {
            println!("{line}");
        }
        return;
    }
    if let Some(bar) = bar {
        match event {
            SyncEvent::OpSucceeded { .. } | SyncEvent::OpFailed { .. } => bar.inc(1),
            SyncEvent::Breaker { to, .. } => bar.set_message(format!("breaker {to}")),
            SyncEvent::AuthRequired => bar.set_message("authentication required"),
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
    eprintln!("{line}");
}
