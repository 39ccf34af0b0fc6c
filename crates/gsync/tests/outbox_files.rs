//! The real `gsync` on outbox paths that are not outboxes, on damaged
//! outboxes and on a damaged op: read-only commands change nothing,
//! nothing that is not ours is touched, damage is repaired and every
//! decodable op reaches the reference server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{final_drain, server, wait_applied};
use guardian_server::Faults;
use guardian_sync::op::NewOp;
use guardian_sync::outbox::{Outbox, OutboxOptions, Synchronous};
use serde_json::{json, Value};

fn gsync(outbox: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gsync"))
        .arg("--outbox")
        .arg(outbox)
        .args(args)
        .env_remove("GSYNC_OUTBOX")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// Runs `gsync`, expects exit `code` and no panic; returns (stdout, stderr).
fn expect(outbox: &Path, args: &[&str], code: i32) -> (String, String) {
    let out = gsync(outbox, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

/// Every file under `dir` with its bytes (directories as empty entries).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.insert(p.clone(), Vec::new());
            out.extend(snapshot(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

/// A closed outbox with `n` creates of `thing/ent-000i-x`, payload marker
/// `m000i-payload`.
async fn build(path: &Path, n: usize) {
    let options = OutboxOptions::default()
        .synchronous(Synchronous::Off)
        .coalesce(false);
    let (outbox, _) = Outbox::open(path, options).await.unwrap();
    for i in 0..n {
        outbox
            .enqueue(NewOp::create(
                "thing",
                format!("ent-{i:04}-x"),
                json!({"marker": format!("m{i:04}-payload"), "n": 5}),
            ))
            .await
            .unwrap();
    }
    outbox.close().await;
}

fn patch_once(path: &Path, needle: &[u8], f: impl Fn(&mut [u8])) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in file");
    f(&mut bytes[at..at + needle.len()]);
    std::fs::write(path, bytes).unwrap();
}

fn patch_at(path: &Path, offset: usize, new: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset..offset + new.len()].copy_from_slice(new);
    std::fs::write(path, bytes).unwrap();
}

fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            ["o.db", "o.db-wal", "o.db-shm", "o.db.lock", "o.db.writers"].contains(&n.as_str())
                || n.starts_with("o.db.corrupt-"),
            "unexpected file {n}"
        );
        assert!(!n.contains(".salvage"), "temporary file {n} left behind");
    }
}

#[test]
fn paths_that_are_not_outboxes_are_refused_and_left_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("some-directory")).unwrap();
    std::fs::write(d.join("some-directory/inside.txt"), b"keep").unwrap();
    std::fs::write(d.join("notes.txt"), b"my notes\n").unwrap();
    {
        let other = rusqlite::Connection::open(d.join("app.sqlite")).unwrap();
        other
            .execute_batch("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann');")
            .unwrap();
    }
    let before = snapshot(d);
    for name in ["some-directory", "notes.txt", "app.sqlite"] {
        let path = d.join(name);
        for args in [
            &["status"][..],
            &["ops"],
            &["check"],
            &["check", "--repair"],
            &["enqueue", "create", "thing", "a", "{}"],
        ] {
            let (_, err) = expect(&path, args, 1);
            assert!(
                err.contains("is not a guardian outbox"),
                "{name} {args:?}: {err}"
            );
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
    }
    assert_eq!(
        snapshot(d),
        before,
        "a path that is not an outbox was changed"
    );
}

#[tokio::test]
async fn read_only_commands_never_change_create_or_move_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 5).await;
    let before = snapshot(dir.path());
    expect(&path, &["status"], 0);
    expect(&path, &["--json", "ops"], 0);
    let (out, _) = expect(&path, &["check"], 0);
    assert_eq!(out.trim(), "ok");
    assert_eq!(snapshot(dir.path()), before, "a healthy outbox was changed");

    // Damaged: reported, left exactly as it was, not salvaged.
    patch_at(&path, 44, &[0, 0, 0, 9]);
    let before = snapshot(dir.path());
    for args in [&["status"][..], &["ops"], &["check"]] {
        let (_, err) = expect(&path, args, 1);
        assert!(err.contains("check --repair"), "{args:?}: {err}");
    }
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a read-only command changed files"
    );
}

/// One op of 20 with a 0xFF byte in its payload: `ops` lists it, `check`
/// reports it, and a runner quarantines it and delivers the 19 others.
#[tokio::test]
async fn a_damaged_op_is_reported_quarantined_and_the_others_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 20).await;
    patch_once(&path, b"m0007-payload", |b| b[2] = 0xFF);
    let (out, _) = expect(&path, &["--json", "ops"], 0);
    let ops: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(ops.len(), 20);
    assert_eq!(
        ops.iter()
            .filter(|o| o["unreadable"] == json!(true))
            .count(),
        1
    );
    let (out, err) = expect(&path, &["check"], 1);
    assert!(out.contains("damaged op: seq 8"), "{out}");
    assert!(err.contains("check --repair"), "{err}");

    let server = server(Faults::default()).await;
    final_drain(&path, &server.url()).await;
    let log = wait_applied(&server, Duration::from_secs(30), |l| l.len() >= 19).await;
    assert_eq!(log.len(), 19);
    assert!(log.iter().all(|m| m.id != "ent-0007-x"));
    let (out, _) = expect(&path, &["--json", "ops", "--state", "failed"], 0);
    let failed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(failed.len(), 1, "{out}");
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("damaged row"),
        "{out}"
    );
    let (out, _) = expect(&path, &["check"], 0);
    assert!(out.contains("quarantined"), "{out}");
}

/// A damaged header (the schema-format number) is salvaged by the runner
/// that opens it; every op reaches the server; no temporary file is left.
#[tokio::test]
async fn a_runner_salvages_a_damaged_header_and_delivers_every_op() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 20).await;
    patch_at(&path, 44, &[0, 0, 0, 9]);
    let server = server(Faults::default()).await;
    final_drain(&path, &server.url()).await;
    let log = wait_applied(&server, Duration::from_secs(30), |l| l.len() >= 20).await;
    assert_eq!(log.len(), 20);
    no_temp_files(dir.path());
    let (out, _) = expect(&path, &["--json", "status"], 0);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["pending"], json!(0));
}

/// A wrecked index page that the cheap probe at open misses: `check`
/// finds it and changes nothing; `check --repair` fixes it; every op is
/// then delivered.
#[tokio::test]
async fn check_finds_index_damage_and_repair_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 20).await;
    let root: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = 'ops_ready'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    patch_at(
        &path,
        (usize::try_from(root).unwrap() - 1) * 4096,
        &[0xA5; 4096],
    );
    let before = snapshot(dir.path());
    let (out, _) = expect(&path, &["check"], 1);
    assert!(out.contains("problem:"), "{out}");
    assert_eq!(snapshot(dir.path()), before, "check changed files");
    let (out, _) = expect(&path, &["check", "--repair"], 0);
    assert!(out.contains("ok"), "{out}");
    expect(&path, &["check"], 0);
    let server = server(Faults::default()).await;
    final_drain(&path, &server.url()).await;
    let log = wait_applied(&server, Duration::from_secs(30), |l| l.len() >= 20).await;
    assert_eq!(log.len(), 20);
    no_temp_files(dir.path());
}

/// The crash image of an outbox whose last commits are only in its WAL:
/// 20 ops, each enqueued in its own commit, copied to `path` (and its
/// `-wal`) while the outbox is open. Returns the WAL's frames as
/// (page number, offset of the page image).
async fn crash_image(path: &Path) -> Vec<(u32, usize)> {
    let live_dir = tempfile::tempdir().unwrap();
    let live = live_dir.path().join("live.db");
    let options = OutboxOptions::default()
        .synchronous(Synchronous::Off)
        .coalesce(false)
        .preallocate_wal(false);
    let (outbox, _) = Outbox::open(&live, options).await.unwrap();
    for i in 0..20 {
        outbox
            .enqueue(NewOp::create(
                "thing",
                format!("ent-{i:04}-x"),
                json!({"marker": format!("m{i:04}-payload"), "n": 5}),
            ))
            .await
            .unwrap();
    }
    std::fs::copy(&live, path).unwrap();
    let wal = std::fs::read(live_dir.path().join("live.db-wal")).unwrap();
    outbox.close().await;
    std::fs::write(PathBuf::from(format!("{}-wal", path.display())), &wal).unwrap();
    let page = u32::from_be_bytes(wal[8..12].try_into().unwrap()) as usize;
    (0..(wal.len() - 32) / (24 + page))
        .map(|i| {
            let at = 32 + i * (24 + page);
            (
                u32::from_be_bytes(wal[at..at + 4].try_into().unwrap()),
                at + 24,
            )
        })
        .collect()
}

/// One flipped byte in a WAL frame with commits after it: SQLite would
/// read the commits before it only, and the first write would overwrite
/// the rest. `check` reports it and changes nothing; a plain `enqueue`
/// (then a runner) opens it, salvages with a warning, and all 20 ops and
/// the new one reach the server.
#[tokio::test]
async fn a_damaged_wal_frame_is_salvaged_by_the_next_enqueue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let frames = crash_image(&path).await;
    // A frame in the middle (the schema is readable before it) whose page
    // a later frame rewrites.
    let bad = (frames.len() / 2..frames.len() - 1)
        .find(|&i| frames[i + 1..].iter().any(|f| f.0 == frames[i].0))
        .unwrap();
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let mut bytes = std::fs::read(&wal).unwrap();
    bytes[frames[bad].1 + 4095] ^= 0x55;
    std::fs::write(&wal, bytes).unwrap();
    let seen: i64 = {
        let copy = tempfile::tempdir().unwrap();
        let p = copy.path().join("o.db");
        std::fs::copy(&path, &p).unwrap();
        std::fs::copy(&wal, copy.path().join("o.db-wal")).unwrap();
        // Before the damage the schema itself may be only in the WAL.
        rusqlite::Connection::open(&p)
            .unwrap()
            .query_row("SELECT count(*) FROM ops", [], |r| r.get(0))
            .unwrap_or(0)
    };
    assert!(seen < 20, "SQLite reads past the damaged frame: {seen}");
    let before = snapshot(dir.path());
    let (out, _) = expect(&path, &["check"], 1);
    assert!(out.contains("WAL frame"), "{out}");
    let after: BTreeMap<_, _> = snapshot(dir.path())
        .into_iter()
        .filter(|(p, _)| !p.to_string_lossy().ends_with("-shm"))
        .collect();
    assert_eq!(after, before, "check changed files");
    // With --json the warning is one JSON object on one line.
    let (_, err) = expect(
        &path,
        &[
            "--json",
            "enqueue",
            "create",
            "thing",
            "after",
            r#"{"n":1}"#,
        ],
        0,
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let warning: Value = serde_json::from_str(&err).unwrap();
    assert_eq!(warning["warning"]["kind"], "salvaged", "{err}");
    let err = warning["warning"]["message"].as_str().unwrap();
    assert!(err.contains("damaged") && err.contains("WAL"), "{err}");
    assert!(err.contains("salvaged 20 ops"), "{err}");
    expect(&path, &["check"], 0);
    let server = server(Faults::default()).await;
    final_drain(&path, &server.url()).await;
    let log = wait_applied(&server, Duration::from_secs(30), |l| l.len() >= 21).await;
    assert_eq!(log.len(), 21);
    no_temp_files(dir.path());
}
