//! Scenario 3: recovery. A real `gsync run --once` child process is started
//! on an outbox holding 10,000 or 1,000,000 pending ops; we time child spawn
//! to the first byte of its first request arriving at a counting proxy in
//! front of the reference server, let it drain for a second while reading
//! its peak RSS (`VmHWM`), and SIGKILL it. The first run of each size is a clean
//! start; later runs restart after that SIGKILL (a dead runner's lock row
//! and in-flight ops are left behind), which is the recovery path proper.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guardian_bench::machine::peak_rss_kib;
use guardian_bench::proxy::CountingProxy;
use guardian_bench::report::{millis, ratio, thousands, Table};
use guardian_bench::stats::Samples;
use guardian_sync::outbox::{Outbox, OutboxOptions};
use rusqlite::{params, Connection};
use uuid::Uuid;

use crate::common::{client_runtime, scratch, Config, Section, Server, Target, TOKEN};

/// How long the child drains after its first request before it is killed.
const DRAIN_WINDOW: Duration = Duration::from_secs(1);

/// How often the child's peak RSS is read during that window.
const RSS_POLL: Duration = Duration::from_millis(5);

/// The `gsync` binary: `GSYNC_BIN`, else built now with cargo (release
/// profile, same target dir as this bench).
fn gsync_binary(config: &Config) -> PathBuf {
    if let Ok(p) = std::env::var("GSYNC_BIN") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var("CARGO")
        .ok()
        .or_else(|| option_env!("CARGO").map(str::to_owned))
        .unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "gsync", "--bin", "gsync"])
        .current_dir(&config.workspace)
        .status()
        .expect("run cargo build for gsync");
    assert!(status.success(), "building gsync failed");
    // This bench runs from <target>/release/deps/; gsync lands in <target>/release/.
    let exe = std::env::current_exe().expect("current exe");
    let release = exe.parent().and_then(Path::parent).expect("target/release");
    release.join("gsync")
}

/// Creates the schema through the real outbox, then bulk-inserts `n`
/// pending CREATEs of distinct devices consistent with it (each its entity's
/// head, ready now, sealed) in one transaction, and checkpoints the WAL.
/// Panics if the outbox would not see them all as pending.
fn build_outbox(rt: &tokio::runtime::Runtime, path: &Path, n: usize) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let (outbox, _) = Outbox::open(path, OutboxOptions::default())
            .await
            .expect("create outbox");
        outbox.close().await;
    });
    let mut conn = Connection::open(path).expect("open for bulk insert");
    conn.pragma_update(None, "synchronous", "OFF")
        .expect("sync off");
    conn.pragma_update(None, "cache_size", -262_144)
        .expect("cache");
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("millis");
    let tx = conn.transaction().expect("begin");
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO ops (op_id, idempotency_key, kind, entity_type, entity_id, payload, \
                 base, base_version, chained, txn_tokens, envelope_version, state, is_head, \
                 attempts, next_attempt_at, created_at, updated_at, checksum) \
                 VALUES (?1, ?2, 'create', 'device', ?3, ?4, NULL, NULL, 0, '[]', 1, 'pending', 1, \
                 0, ?5, ?5, ?5, ?6)",
            )
            .expect("prepare");
        for i in 0..n {
            let op_id = Uuid::now_v7().to_string();
            let key = Uuid::new_v4().to_string();
            let entity = format!("rec-{i:08}");
            let payload = format!(
                "{{\"on\":{},\"level\":{},\"room\":\"living-room\"}}",
                i.is_multiple_of(2),
                i % 100
            );
            let seal = checksum([
                Some(op_id.as_str()),
                Some(key.as_str()),
                Some("create"),
                Some("device"),
                Some(entity.as_str()),
                Some(payload.as_str()),
                None,
            ]);
            stmt.execute(params![op_id, key, entity, payload, now, seal])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    drop(conn);
    let elapsed = start.elapsed();
    // The runner must find every row pending (none quarantined).
    rt.block_on(async {
        let (outbox, _) = Outbox::open(path, OutboxOptions::default())
            .await
            .expect("reopen outbox");
        let pending = outbox.stats().await.expect("stats").pending;
        assert_eq!(pending, n as u64, "bulk-inserted ops are all pending");
        outbox.close().await;
    });
    elapsed
}

/// An op row's seal as the outbox computes it (`op_checksum` in
/// `guardian-sync/src/outbox/schema.rs`): the first 8 bytes of SHA-256 over
/// op id, idempotency key, kind, entity type, entity id, payload and base,
/// each length-prefixed text or a NULL marker. A row without it is
/// quarantined as damaged when the outbox opens.
fn checksum(fields: [Option<&str>; 7]) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in fields {
        match f {
            Some(text) => {
                h.update([1u8]);
                h.update((text.len() as u64).to_le_bytes());
                h.update(text.as_bytes());
            }
            None => h.update([0u8]),
        }
    }
    let d = h.finalize();
    i64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

struct Probe {
    first_request_ms: f64,
    peak_rss_mib: f64,
    requests_in_window: u64,
}

fn probe_once(
    rt: &tokio::runtime::Runtime,
    gsync: &Path,
    outbox: &Path,
    proxy: &CountingProxy,
    server: &Server,
) -> Probe {
    proxy.reset();
    let before = server.requests();
    let start = Instant::now();
    let mut child = Command::new(gsync)
        .arg("--outbox")
        .arg(outbox)
        // One request per op, so the 10,000-op outbox is still draining
        // for most of the window, as the 1,000,000-op one is.
        .args(["run", "--server", &proxy.url(), "--once", "--batch", "0"])
        .env("GSYNC_TOKEN", TOKEN)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gsync");
    let first = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(at) = proxy.first_byte_at() {
                return at;
            }
            assert!(Instant::now() < deadline, "gsync sent no request in 120 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    // VmHWM is read every few ms, not once at the end: a child that drains
    // everything before the window ends has exited, and an exited child
    // has no VmHWM to read (a fast machine drains 10,000 ops in under 1 s).
    let window_end = Instant::now() + DRAIN_WINDOW;
    let mut rss = 0;
    while Instant::now() < window_end {
        match peak_rss_kib(child.id()) {
            Some(kib) => rss = rss.max(kib),
            None => break,
        }
        if !matches!(child.try_wait(), Ok(None)) {
            break;
        }
        std::thread::sleep(RSS_POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
    Probe {
        first_request_ms: first.duration_since(start).as_secs_f64() * 1000.0,
        peak_rss_mib: rss as f64 / 1024.0,
        requests_in_window: server.requests().saturating_sub(before),
    }
}

pub(crate) fn run(config: &Config) -> Section {
    let gsync = gsync_binary(config);
    let big = config.recovery_ops;
    let small = config.size(10_000, 2_000);
    let rt = client_runtime();
    let dir = scratch("bench-recovery");
    let small_path = dir.path().join("small.db");
    let big_path = dir.path().join("big.db");
    eprintln!("recovery: building outboxes of {small} and {big} pending ops");
    let small_build = build_outbox(&rt, &small_path, small);
    let big_build = build_outbox(&rt, &big_path, big);
    let big_size_mib = std::fs::metadata(&big_path).map_or(0, |m| m.len()) as f64 / 1_048_576.0;
    let server = Server::start();
    let proxy = rt
        .block_on(CountingProxy::start(server.running.addr()))
        .expect("proxy");
    let (mut first_small, mut first_big) = (Samples::new(), Samples::new());
    let (mut rss_small, mut rss_big) = (Samples::new(), Samples::new());
    let (mut req_small, mut req_big) = (Samples::new(), Samples::new());
    for run in 0..config.runs {
        eprintln!("recovery: run {}/{}", run + 1, config.runs);
        // A fresh copy each run: the engine drains more of the small queue
        // in the window than a run leaves behind.
        let small_run = dir.path().join(format!("small-{run}.db"));
        std::fs::copy(&small_path, &small_run).expect("copy the small outbox");
        let p = probe_once(&rt, &gsync, &small_run, &proxy, &server);
        first_small.push(p.first_request_ms);
        rss_small.push(p.peak_rss_mib);
        req_small.push(p.requests_in_window as f64);
        let p = probe_once(&rt, &gsync, &big_path, &proxy, &server);
        first_big.push(p.first_request_ms);
        rss_big.push(p.peak_rss_mib);
        req_big.push(p.requests_in_window as f64);
    }
    drop(proxy);
    server.stop();
    let mut table = Table::new([
        "pending ops",
        "spawn → first request: median (min – max)",
        "peak RSS (VmHWM): median (min – max)",
        "requests in the 1 s window",
    ]);
    for (n, first, rss, req) in [
        (small, &first_small, &rss_small, &req_small),
        (big, &first_big, &rss_big, &req_big),
    ] {
        let (flo, fhi) = first.range().unwrap_or_default();
        let (rlo, rhi) = rss.range().unwrap_or_default();
        table.row([
            thousands(n as f64),
            format!(
                "{} ({} – {})",
                millis(first.median()),
                millis(Some(flo)),
                millis(Some(fhi))
            ),
            format!(
                "{:.1} MiB ({rlo:.1} – {rhi:.1})",
                rss.median().unwrap_or_default()
            ),
            thousands(req.median().unwrap_or_default()),
        ]);
    }
    let mut body = format!(
        "`gsync run --once --batch 0` (release, one request per op) as a child, on outboxes of pending CREATEs \
         bulk-inserted ({} ops in {:.1} s; {} in {:.1} s, {big_size_mib:.0} MiB), warm cache; \
         SIGKILLed {} s after its first request (unless it drained everything first), so \
         later runs recover a killed runner's lock; peak RSS read every {} ms while it runs.\n\n",
        thousands(small as f64),
        small_build.as_secs_f64(),
        thousands(big as f64),
        big_build.as_secs_f64(),
        DRAIN_WINDOW.as_secs(),
        RSS_POLL.as_millis()
    );
    body.push_str(&table.to_markdown());
    let first_ms = first_big.median();
    let rss_ratio = rss_big.ratio_to(&rss_small);
    let rss_big_med = rss_big.median();
    let size_note = if big == 1_000_000 {
        String::new()
    } else {
        format!(" (reduced to {} ops)", thousands(big as f64))
    };
    let targets = vec![
        Target {
            scenario: "3",
            target: format!("start → first request, 1M pending < 200 ms{size_note}"),
            measured: millis(first_ms),
            met: first_ms.is_some_and(|m| m < 200.0),
            note: None,
        },
        Target {
            scenario: "3",
            target: format!("peak RSS flat from 10k to 1M pending, < 64 MiB{size_note}"),
            measured: format!(
                "{:.1} MiB at {}, {} of {}",
                rss_big_med.unwrap_or_default(),
                thousands(big as f64),
                ratio(rss_ratio),
                thousands(small as f64)
            ),
            met: rss_big_med.is_some_and(|m| m < 64.0) && rss_ratio.is_some_and(|r| r <= 1.25),
            note: None,
        },
    ];
    Section {
        title: "3. Recovery".into(),
        body,
        targets,
    }
}
