//! The disk misbehaves (issue 7): corrupt outbox files at start-up, and I/O
//! errors and disk-full (EIO / ENOSPC on `pwrite`, `fsync`, `fdatasync`,
//! injected with Debian's `fiu-run`) while `gsync enqueue` writes. The claims:
//! no panic and a clear one-line error; an op is acknowledged only if it was
//! stored; nothing already queued is lost; the file passes its integrity
//! check; then everything acknowledged reaches the server exactly once (the
//! six invariants of DESIGN §11 against the applied log).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{
    assert_no_panic, check_invariants, require_tool, server, Planned, Runner, RunnerOpts, Workload,
    TYPE,
};
use guardian_protocol::MutationKind;
use guardian_server::Faults;
use guardian_sync::outbox::{ListFilter, Outbox, OutboxOptions};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

async fn gsync(prefix: &[&str], outbox: &Path, args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_gsync");
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = tokio::process::Command::new(p);
            c.args(rest).arg(bin);
            c
        }
        None => tokio::process::Command::new(bin),
    };
    cmd.arg("--outbox")
        .arg(outbox)
        .args(args)
        .env("RUST_LOG", "error")
        .env("NO_COLOR", "1")
        .env_remove("GSYNC_OUTBOX")
        .output()
        .await
        .unwrap()
}

/// A one-line error (`gsync: ...`, or with `--json` a JSON error object)
/// and no panic.
fn assert_clean_failure(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_no_panic(&stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    let message = |line: &str| -> Option<String> {
        if let Some(text) = line.strip_prefix("gsync: ") {
            return Some(text.to_owned());
        }
        let v: Value = serde_json::from_str(line).ok()?;
        v["error"]["message"].as_str().map(str::to_owned)
    };
    let errors: Vec<String> = stderr.lines().filter_map(message).collect();
    assert!(
        errors.len() == 1 && !errors[0].is_empty(),
        "{what}: expected one clear error line, got: {stderr}"
    );
}

/// Enqueues through `gsync enqueue` under fault injection; every op the
/// command acknowledged must be in the outbox afterwards, exactly as stored.
async fn enqueue_under_faults(fiu_command: &str, tag: &str, rounds: usize) {
    require_tool("fiu-run", "fiu-utils");
    let server = server(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    // Something already queued before the faults start.
    let mut work = Workload::open(&path, tag).await;
    work.simple(3, 1).await;
    work.outbox.close().await;
    let prefix = ["fiu-run", "-x", "-f", "", "-c", fiu_command];
    let (mut acked, mut refused) = (0, 0);
    // Ops whose enqueue reported an unknown outcome (the commit failed).
    let mut announced: Vec<String> = Vec::new();
    for i in 0..rounds {
        let id = format!("{tag}-cli-{i}");
        let data = json!({ "n": i, "via": "cli" });
        let out = gsync(
            &prefix,
            &path,
            &[
                "--json",
                "enqueue",
                "--no-coalesce",
                "create",
                TYPE,
                &id,
                &data.to_string(),
            ],
        )
        .await;
        if out.status.success() {
            let done: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
            acked += 1;
            work.ops.push(Planned {
                index: work.ops.len(),
                op_id: done["op_id"].as_str().unwrap().parse().unwrap(),
                key: done["idempotency_key"].as_str().unwrap().parse().unwrap(),
                entity_id: id,
                kind: MutationKind::Create,
                data,
            });
        } else {
            refused += 1;
            assert_clean_failure(&out, &format!("enqueue {i} under {fiu_command}"));
            let stderr = String::from_utf8_lossy(&out.stderr);
            if let Some(rest) = stderr.split("may or may not be stored (op ").nth(1) {
                announced.extend(rest.split(')').next().map(str::to_owned));
            }
            if refused == 1 {
                eprintln!("{tag}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }
    eprintln!("{tag}: {acked} enqueues acknowledged, {refused} refused with a clear error");
    assert!(refused > 0, "{tag}: no fault was injected ({fiu_command})");
    assert!(acked > 0, "{tag}: every enqueue failed ({fiu_command})");
    // Reopen cleanly: every acknowledged op is there, nothing else.
    let (outbox, report) = Outbox::open(&path, OutboxOptions::default()).await.unwrap();
    assert!(report.salvage.is_none(), "{tag}: {report:?}");
    let check = outbox.check().await.unwrap();
    assert!(check.ok, "{tag}: integrity {check:?}");
    let stored = outbox
        .list(ListFilter {
            state: None,
            limit: 10_000,
            after_seq: 0,
        })
        .await
        .unwrap();
    let stored_ids: Vec<_> = stored.iter().map(|o| o.op_id).collect();
    for p in &work.ops {
        assert!(
            stored_ids.contains(&p.op_id),
            "{tag}: acknowledged op {} ({}) is not in the outbox",
            p.op_id,
            p.entity_id
        );
    }
    // A refused enqueue may still have reached the file: when fsync fails
    // after SQLite wrote the WAL frames, the commit is reported as failed,
    // yet the frames are replayed at the next open. Such an op is not lost
    // but its outcome was ambiguous to the app; count it and make sure it
    // too is applied exactly once.
    let known: Vec<_> = work.ops.iter().map(|p| p.op_id).collect();
    let phantoms: Vec<_> = stored
        .iter()
        .filter(|o| !known.contains(&o.op_id))
        .collect();
    assert!(
        phantoms.len() <= refused,
        "{tag}: ops appeared from nowhere"
    );
    for o in &phantoms {
        assert!(
            announced.contains(&o.op_id.to_string()),
            "{tag}: op {} was stored although its enqueue reported a definite failure",
            o.op_id
        );
    }
    if !phantoms.is_empty() {
        eprintln!(
            "{tag}: {} of {refused} refused enqueues were stored anyway (ambiguous outcome)",
            phantoms.len()
        );
    }
    for o in phantoms {
        work.ops.push(Planned {
            index: work.ops.len(),
            op_id: o.op_id,
            key: o.idempotency_key,
            entity_id: o.entity_id.clone(),
            kind: MutationKind::Create,
            data: o.payload.clone(),
        });
    }
    work.outbox = outbox;
    let mut r = Runner::spawn("drain", &path, &server.url(), &RunnerOpts::default());
    r.expect_success(LONG).await;
    check_invariants(&server, &work).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_write_never_acknowledges_an_unstored_op() {
    enqueue_under_faults(
        "enable_random name=posix/io/rw/pwrite,probability=0.02,failinfo=5",
        "eio",
        30,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_write_never_acknowledges_an_unstored_op() {
    enqueue_under_faults(
        "enable_random name=posix/io/rw/pwrite,probability=0.02,failinfo=28",
        "enospc",
        30,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_fsync_never_acknowledges_an_unstored_op() {
    enqueue_under_faults(
        "enable_random name=posix/io/sync/fsync,probability=0.2,failinfo=5",
        "fsync",
        30,
    )
    .await;
}

/// Ways to damage a closed outbox file.
fn damage(path: &Path, how: &str) {
    let mut bytes = std::fs::read(path).unwrap();
    match how {
        "garbage" => {
            bytes = (0..bytes.len().max(8192))
                .map(|i| u8::try_from((i * 7919 + 13) % 251).unwrap())
                .collect();
        }
        "truncated" => bytes.truncate(bytes.len() / 2 + 100),
        "zero-length" => bytes.clear(),
        // Page 1 after the file header: `sqlite_master`, every table's
        // schema and root page.
        "wrecked-schema" => {
            let end = bytes.len().min(4096);
            bytes[100..end].fill(0xA5);
        }
        "wrecked-page" => {
            let len = bytes.len();
            for b in &mut bytes[len / 2..(len / 2 + 4096).min(len)] {
                *b = 0xA5;
            }
        }
        other => panic!("unknown damage {other}"),
    }
    std::fs::write(path, bytes).unwrap();
}

/// A damaged outbox at start-up: `gsync status` and `gsync run` neither
/// panic nor loop; the damage is reported and moved aside; what could be
/// salvaged drains to the server exactly once; the new file is sound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_outbox_at_startup_is_salvaged_without_panic() {
    let server = server(Faults::default()).await;
    for how in [
        "garbage",
        "truncated",
        "zero-length",
        "wrecked-page",
        "wrecked-schema",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let mut work = Workload::open(&path, how).await;
        work.simple(40, 1).await;
        work.outbox.close().await;
        let planned: Vec<String> = work.ops.iter().map(|p| p.key.to_string()).collect();
        drop(work);
        for side in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{side}", path.display()));
        }
        damage(&path, how);
        if how == "garbage" {
            // Nothing left says it was an outbox: it cannot be told from
            // another program's file, so it is refused and left as it is.
            let before = std::fs::read(&path).unwrap();
            for args in [
                &["status"][..],
                &[
                    "run",
                    "--once",
                    "--server",
                    "http://127.0.0.1:9",
                    "--token",
                    "t",
                ],
            ] {
                let out = gsync(&[], &path, args).await;
                assert_clean_failure(&out, how);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(stderr.contains("not a guardian outbox"), "{stderr}");
            }
            assert_eq!(std::fs::read(&path).unwrap(), before);
            continue;
        }
        // `status` is read-only: it reports damage it meets, never salvages.
        let before = std::fs::read(&path).unwrap();
        let status = gsync(&[], &path, &["status"]).await;
        let stderr = String::from_utf8_lossy(&status.stderr).to_string();
        assert_no_panic(&stderr);
        if !status.status.success() {
            assert_clean_failure(&status, how);
            // An empty file is a new outbox only for a writer.
            assert!(
                stderr.contains("check --repair")
                    || (how == "zero-length" && stderr.contains("empty file")),
                "{how}: {stderr}"
            );
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{how}: status changed the file"
        );
        // Runs (and a second run) neither panic nor fail on the salvaged file.
        for round in 0..2 {
            let mut r = Runner::spawn(
                &format!("{how}{round}"),
                &path,
                &server.url(),
                &RunnerOpts::default(),
            );
            r.expect_success(LONG).await;
        }
        let (outbox, report) = Outbox::open(&path, OutboxOptions::default()).await.unwrap();
        assert!(report.salvage.is_none(), "{how}: damaged again: {report:?}");
        assert!(outbox.check().await.unwrap().ok, "{how}");
        let stats = outbox.stats().await.unwrap();
        assert_eq!(stats.pending + stats.in_flight, 0, "{how}: {stats:?}");
        if how == "wrecked-schema" {
            // Every row is intact: the page scan recovers each op.
            let applied: std::collections::HashSet<String> = server
                .applied_log()
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.idempotency_key)
                .collect();
            let lost = planned.iter().filter(|k| !applied.contains(*k)).count();
            assert_eq!(lost, 0, "{how}: {lost} of {} ops lost", planned.len());
        }
        eprintln!("{how}: {}", stderr.trim());
    }
    // Salvaged ops went out once each: no key twice in the applied log.
    let log = server.applied_log().await.unwrap();
    let mut keys: Vec<_> = log.iter().map(|m| m.idempotency_key.clone()).collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "a salvaged op was applied twice");
    eprintln!("corrupt files: {n} salvaged ops applied");
}
