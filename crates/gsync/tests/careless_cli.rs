//! A careless user at the command line: numbers at the edge of their type,
//! usage mistakes under `--json`, outbox paths that are special files.
//! Errors must be one line on stderr (one JSON object with `--json`),
//! without colour codes, and never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn gsync(outbox: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gsync"))
        .arg("--outbox")
        .arg(outbox)
        .args(args)
        .env_remove("GSYNC_OUTBOX")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LOG")
        .env("GSYNC_TOKEN", "t")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Exit status and stderr; asserts no panic and no escape sequence.
fn failed(outbox: &Path, args: &[&str]) -> (i32, String) {
    let out = gsync(outbox, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(!err.contains('\u{1b}'), "{args:?}: colour codes: {err:?}");
    (out.status.code().unwrap_or(-1), err)
}

/// A port where nothing listens.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// Special files as the outbox: one line, exit 1, nothing created beside
/// them, never a wait (a FIFO opened for reading waits for a writer).
#[test]
fn special_files_as_the_outbox_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for path in [fifo.as_path(), Path::new("/dev/null")] {
        for args in [
            &["status"][..],
            &["check"],
            &["check", "--repair"],
            &["enqueue", "create", "thing", "a", "{}"],
        ] {
            let (code, err) = failed(path, args);
            assert_eq!(code, 1, "{} {args:?}: {err}", path.display());
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(err.contains("not a guardian outbox"), "{err}");
        }
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "files created beside the FIFO");
    assert!(!Path::new("/dev/null-wal").exists());
}

/// `--json` promises one JSON object on stderr for an error; a usage
/// mistake (a bad value, an unknown flag, a number out of range) is an
/// error like any other, and without `--json` it is one line.
#[test]
fn usage_errors_are_one_line_and_json_under_json() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    for args in [
        &["ops", "--state", "weird"][..],
        &["ops", "--limit", "-1"],
        &["ops", "--limit", "18446744073709551616"],
        &["status", "--no-such-flag"],
    ] {
        let (code, err) = failed(&db, args);
        assert_eq!(code, 2, "{args:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let (code, err) = failed(&db, &with_json);
        assert_eq!(code, 2, "{args:?}");
        let v: Value = serde_json::from_str(err.trim_end())
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {err}"));
        assert_eq!(v["error"]["exit_code"], 2, "{v}");
    }
    assert!(!db.exists(), "a usage error created the outbox");
}

/// `run --batch` at the top of its type must be refused or work; it
/// overflows the runner's claim window and panics (exit 101, a panic
/// message on stderr).
#[test]
fn a_huge_batch_size_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let out = gsync(&db, &["enqueue", "create", "thing", "a", "{}"]);
    assert!(out.status.success());
    let url = dead_url();
    let (code, err) = failed(
        &db,
        &[
            "run",
            "--server",
            &url,
            "--once",
            "--max-wait",
            "1s",
            "--batch",
            "18446744073709551615",
        ],
    );
    assert!(code == 2 || code == 3, "exit {code}: {err}");
    // `run` logs a line per event off a terminal; the error is the last.
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("gsync: "), "{err}");
}

/// Numbers at the edge of what the flags take (`--limit 0`, `--limit`
/// at `u64::MAX`, `--concurrency` at `u64::MAX`): an answer or a one-line
/// error, never a panic.
#[test]
fn edge_numbers_in_flags_are_answered_or_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let out = gsync(&db, &["enqueue", "create", "thing", "a", "{}"]);
    assert!(out.status.success());
    for args in [
        &["ops", "--limit", "0"][..],
        &["ops", "--limit", "18446744073709551615"],
        &["--json", "ops", "--limit", "18446744073709551615"],
    ] {
        let (code, err) = failed(&db, args);
        assert!(code == 0 || code == 1, "{args:?}: exit {code}: {err}");
        if code == 1 {
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
    }
    let url = dead_url();
    let (code, err) = failed(
        &db,
        &[
            "run",
            "--server",
            &url,
            "--once",
            "--max-wait",
            "1s",
            "--concurrency",
            "18446744073709551615",
        ],
    );
    assert_eq!(code, 3, "{err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("gsync: 1 op(s) remain"), "{err}");
}
