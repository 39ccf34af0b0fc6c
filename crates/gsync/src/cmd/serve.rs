//! `gsync serve`: run the reference backend (wire protocol v1) standalone.
//!
//! Prints `listening on http://ADDR` on stdout once bound (so a parent
//! process can use `--listen 127.0.0.1:0` and read the port; with `--json`,
//! `{"event":"listening","url":"http://ADDR"}`), then serves
//! until Ctrl-C or SIGTERM, shutting down gracefully.

use std::io::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use guardian_server::{
    AlertRules, Faults, IpNet, RateLimit, RetryAfter, RetryAfterForm, ServerBuilder, Synchronous,
};

use crate::Global;

/// Whether `--db` names a PostgreSQL database rather than a SQLite file.
fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// Arguments of `gsync serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// SQLite database file (WAL mode), created if missing; or a
    /// PostgreSQL URL (`postgres://user@host:port/dbname`), which several
    /// `gsync serve` processes may share.
    #[arg(long, conflicts_with = "in_memory")]
    db: Option<PathBuf>,
    /// Keep everything in memory (lost at exit).
    #[arg(long)]
    in_memory: bool,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// A bearer token of a tenant, `TENANT:TOKEN` (repeatable).
    #[arg(long = "token", value_name = "TENANT:TOKEN")]
    tokens: Vec<String>,
    /// A file of `TENANT:TOKEN` lines (`#` starts a comment).
    #[arg(long, value_name = "PATH")]
    tokens_file: Option<PathBuf>,
    /// Answer 428 to updates and deletes without If-Match.
    #[arg(long)]
    require_if_match: bool,
    /// Keep the applied-mutations log: a row per mutation that took effect,
    /// never purged, served at /admin/applied to audit exactly-once.
    #[arg(long)]
    applied_log: bool,
    /// Bearer token of the /admin routes (disabled without one).
    #[arg(long, env = "GSYNC_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// How long idempotent responses are kept.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    idempotency_retention: Duration,
    /// How long changes stay in the feed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
    feed_retention: Duration,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = guardian_protocol::DEFAULT_BODY_LIMIT)]
    body_limit: usize,
    /// Most bytes of request bodies held at once, all requests together.
    #[arg(long, default_value_t = guardian_server::DEFAULT_BODY_BUDGET)]
    body_budget: usize,
    /// Most bytes of feed pages held at once, all reads together.
    #[arg(long, default_value_t = guardian_server::DEFAULT_ANSWER_BUDGET)]
    answer_budget: usize,
    /// Most of the body budget and of the answer budget one tenant may
    /// hold at once, in percent (100: no share).
    #[arg(long, default_value_t = guardian_server::DEFAULT_TENANT_SHARE_PERCENT,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    tenant_share: u8,
    /// Most ops per batch.
    #[arg(long, default_value_t = 1000)]
    max_batch_ops: usize,
    /// Request timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    request_timeout: Duration,
    /// Most requests handled at once.
    #[arg(long, default_value_t = 256)]
    concurrency_limit: usize,
    /// Per-tenant requests per second (no limit without it).
    #[arg(long)]
    rate_limit: Option<f64>,
    /// Per-tenant burst for --rate-limit.
    #[arg(long, default_value_t = 20)]
    rate_burst: u32,
    /// Interval of WebSocket pings.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    ws_ping_interval: Duration,
    /// Close WebSocket peers silent this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "45s")]
    ws_idle_timeout: Duration,
    /// Close a connection that has not sent a request's headers this long
    /// after connecting or after its previous response.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    header_read_timeout: Duration,
    /// Most connections open at once; more wait in the listen backlog.
    /// [default: three quarters of the open-file limit, 16 to 4096]
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections open at once from one IP address; more are closed
    /// at once.
    #[arg(long, default_value_t = 64)]
    max_connections_per_peer: usize,
    /// A reverse proxy or load balancer in front of this server, `ADDR` or
    /// `ADDR/PREFIX` (repeatable): its `X-Forwarded-For` names the client
    /// the admin lockout counts, and its connections have no per-peer cap.
    #[arg(long = "trusted-proxy", value_name = "ADDR[/PREFIX]")]
    trusted_proxies: Vec<IpNet>,
    /// Commit durability: `full` (fsync every commit) or `normal`.
    #[arg(long, default_value = "full")]
    sync: String,
    /// Fault: probability that a /v1 request fails.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Fault: status to fail with (500, 502, 503, 429; repeatable).
    #[arg(long = "fault-status")]
    fault_statuses: Vec<u16>,
    /// Fault: Retry-After seconds sent with injected failures.
    #[arg(long)]
    fault_retry_after: Option<u64>,
    /// Send --fault-retry-after as an HTTP-date instead of seconds.
    #[arg(long)]
    fault_retry_after_date: bool,
    /// Fault: latency added to every /v1 request.
    #[arg(long, value_parser = humantime::parse_duration)]
    fault_latency: Option<Duration>,
    /// Fault: probability of a forced version conflict on conditional writes.
    #[arg(long, default_value_t = 0.0)]
    fault_conflict_rate: f64,
    /// Fault: probability of dropping a mutation's connection before commit.
    #[arg(long, default_value_t = 0.0)]
    fault_drop_before_commit: f64,
    /// Fault: probability of dropping a mutation's connection after commit.
    #[arg(long, default_value_t = 0.0)]
    fault_drop_after_commit: f64,
    /// Fault: seed of the fault generator (deterministic faults).
    #[arg(long)]
    fault_seed: Option<u64>,
    /// Alert: a device's circuit breaker has been open this long (`off`:
    /// never).
    #[arg(long, value_name = "DURATION|off", default_value = "60s")]
    alert_breaker_open: OrOff<humantime::Duration>,
    /// Alert: a device has had queued ops and no progress this long.
    #[arg(long, value_name = "DURATION|off", default_value = "5m")]
    alert_stalled: OrOff<humantime::Duration>,
    /// Alert: a device has more dead-letter (failed) ops than this.
    #[arg(long, value_name = "N|off", default_value = "0")]
    alert_dead_letters: OrOff<u64>,
    /// Alert: a tenant's mean health score (0-100) is below this.
    #[arg(long, value_name = "SCORE|off", default_value = "50")]
    alert_fleet_health: OrOff<u8>,
    /// POST every alert that fires or resolves to this URL as JSON
    /// (retried with backoff).
    #[arg(long, value_name = "URL")]
    alert_webhook: Option<String>,
}

/// A threshold of an alert rule, or `off`.
#[derive(Debug, Clone, Copy)]
struct OrOff<T>(Option<T>);

impl<T: FromStr> FromStr for OrOff<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|v| Self(Some(v)))
            .map_err(|e: T::Err| format!("{e} (or `off`)"))
    }
}

fn parse_token(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once(':') {
        Some((tenant, token)) if !tenant.trim().is_empty() && !token.trim().is_empty() => {
            Ok((tenant.trim().to_owned(), token.trim().to_owned()))
        }
        // Never echo the value: it holds a secret.
        _ => bail!("a token must be given as TENANT:TOKEN"),
    }
}

impl Args {
    fn builder(&self) -> anyhow::Result<ServerBuilder> {
        let mut b = ServerBuilder::new();
        let mut count = 0;
        for t in &self.tokens {
            let (tenant, token) = parse_token(t)?;
            b = b.token(tenant, token);
            count += 1;
        }
        if let Some(path) = &self.tokens_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read tokens file {}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                let (tenant, token) =
                    parse_token(line).with_context(|| format!("{}:{}", path.display(), n + 1))?;
                b = b.token(tenant, token);
                count += 1;
            }
        }
        if count == 0 {
            bail!("no tokens: give --token TENANT:TOKEN or --tokens-file PATH");
        }
        b = match (&self.db, self.in_memory) {
            (Some(db), _) => match db.to_str().filter(|s| is_postgres_url(s)) {
                Some(url) => b.postgres(url),
                None => b.database(db),
            },
            (None, true) => b.in_memory(),
            (None, false) => bail!("give --db PATH or --in-memory"),
        };
        b = b.synchronous(match self.sync.as_str() {
            "full" => Synchronous::Full,
            "normal" => Synchronous::Normal,
            other => bail!("--sync must be full or normal, not {other:?}"),
        });
        if let Some(n) = self.max_connections {
            b = b.max_connections(n);
        }
        if let Some(t) = &self.admin_token {
            b = b.admin_token(t.clone());
        }
        b = b.applied_log(self.applied_log);
        let faults = Faults {
            failure_rate: self.fault_rate,
            failure_statuses: self.fault_statuses.clone(),
            retry_after: self.fault_retry_after.map(|seconds| RetryAfter {
                seconds,
                form: if self.fault_retry_after_date {
                    RetryAfterForm::HttpDate
                } else {
                    RetryAfterForm::Seconds
                },
            }),
            latency_ms: self
                .fault_latency
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            conflict_rate: self.fault_conflict_rate,
            drop_before_commit_rate: self.fault_drop_before_commit,
            drop_after_commit_rate: self.fault_drop_after_commit,
            seed: self.fault_seed,
            ..Faults::default()
        };
        faults.validate()?;
        if self.alert_fleet_health.0.is_some_and(|w| w > 100) {
            bail!("--alert-fleet-health is a score from 0 to 100");
        }
        b = b.alert_rules(AlertRules {
            breaker_open_for: self.alert_breaker_open.0.map(Into::into),
            stalled_for: self.alert_stalled.0.map(Into::into),
            dead_letters_above: self.alert_dead_letters.0,
            fleet_health_below: self.alert_fleet_health.0,
        });
        if let Some(url) = &self.alert_webhook {
            b = b.alert_webhook(url.clone());
        }
        Ok(b.require_if_match(self.require_if_match)
            .idempotency_retention(self.idempotency_retention)
            .feed_retention(self.feed_retention)
            .body_limit(self.body_limit)
            .body_budget(self.body_budget)
            .answer_budget(self.answer_budget)
            .tenant_share(self.tenant_share)
            .max_batch_ops(self.max_batch_ops)
            .request_timeout(self.request_timeout)
            .concurrency_limit(self.concurrency_limit)
            .rate_limit(self.rate_limit.map(|per_second| RateLimit {
                per_second,
                burst: self.rate_burst,
            }))
            .ws_ping_interval(self.ws_ping_interval)
            .ws_idle_timeout(self.ws_idle_timeout)
            .header_read_timeout(self.header_read_timeout)
            .max_connections_per_peer(self.max_connections_per_peer)
            .trusted_proxies(self.trusted_proxies.iter().copied())
            .faults(faults))
    }
}

pub(crate) fn run(global: &Global, args: Args) -> anyhow::Result<()> {
    let builder = args.builder()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = builder
            .bind(args.listen.as_str())
            .await
            .with_context(|| format!("cannot serve on {}", args.listen))?;
        {
            let mut out = std::io::stdout().lock();
            if global.json {
                let line = serde_json::json!({ "event": "listening", "url": server.url() });
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "listening on {}", server.url())?;
            }
            out.flush()?;
        }
        wait_for_signal().await;
        if global.json {
            eprintln!("{}", serde_json::json!({ "event": "shutting_down" }));
        } else {
            eprintln!("gsync serve: shutting down");
        }
        server.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::OrOff;

    #[test]
    fn an_alert_threshold_is_a_value_or_off() {
        let d: OrOff<humantime::Duration> = "90s".parse().unwrap();
        assert_eq!(
            d.0.map(Into::into),
            Some(std::time::Duration::from_secs(90))
        );
        assert!("off".parse::<OrOff<u64>>().unwrap().0.is_none());
        assert!("OFF".parse::<OrOff<u8>>().unwrap().0.is_none());
        assert_eq!("3".parse::<OrOff<u64>>().unwrap().0, Some(3));
        let e = "soon".parse::<OrOff<u64>>().unwrap_err();
        assert!(e.contains("`off`"), "{e}");
    }
}
