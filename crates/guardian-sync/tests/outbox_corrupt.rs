//! Damaged files: garbage, truncation, a zero-length file, a wrecked page,
//! inconsistent indexes. Never a panic; a report; salvage where possible.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use guardian_sync::op::NewOp;
use guardian_sync::outbox::{ListFilter, Outbox, OutboxOptions, Synchronous};
use serde_json::json;

fn opts() -> OutboxOptions {
    OutboxOptions::default().synchronous(Synchronous::Off)
}

/// Builds a closed outbox (WAL checkpointed into the file) with `n` ops.
async fn build(path: &Path, n: usize) {
    let (outbox, _) = Outbox::open(path, opts().coalesce(false)).await.unwrap();
    let filler = "x".repeat(300);
    for i in 0..n {
        outbox
            .enqueue(NewOp::create(
                "thing",
                format!("t{i}"),
                json!({"i": i, "filler": filler}),
            ))
            .await
            .unwrap();
    }
    outbox.meta_set("cursor", "77").await.unwrap();
    outbox.close().await;
    assert!(
        !wal(path).exists(),
        "closing the last connection checkpoints the WAL"
    );
}

fn wal(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

fn moved_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.to_string_lossy().contains(".corrupt-") && !p.to_string_lossy().ends_with("-wal")
        })
        .filter(|p| !p.to_string_lossy().ends_with("-shm"))
        .collect()
}

async fn count(outbox: &Outbox) -> usize {
    outbox
        .list(ListFilter {
            limit: 1_000_000,
            ..ListFilter::default()
        })
        .await
        .unwrap()
        .len()
}

/// Garbage is not an outbox: refused, left exactly as it was, nothing
/// created beside it (it used to be moved aside and replaced).
#[tokio::test]
async fn garbage_file_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let garbage: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = Outbox::open(&path, opts()).await.unwrap_err();
    assert!(err.to_string().contains("not a guardian outbox"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
    assert!(moved_files(dir.path()).is_empty());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[tokio::test]
async fn short_garbage_and_zero_length_files() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.db");
    std::fs::write(&short, b"hello").unwrap();
    let err = Outbox::open(&short, opts()).await.unwrap_err();
    assert!(err.to_string().contains("not a SQLite database"), "{err}");
    assert_eq!(std::fs::read(&short).unwrap(), b"hello");

    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let (outbox, report) = Outbox::open(&empty, opts()).await.unwrap();
    assert!(
        report.salvage.is_none(),
        "a zero-length file is a new database"
    );
    assert!(!report.created);
    assert_eq!(report.migrated_from, Some(0));
    outbox
        .enqueue(NewOp::create("thing", "a", json!({})))
        .await
        .unwrap();
    assert_eq!(count(&outbox).await, 1);
}

#[tokio::test]
async fn truncated_file_is_salvaged_row_by_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 2_000).await;
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len * 6 / 10).unwrap();
    drop(f);
    let (outbox, report) = Outbox::open(&path, opts()).await.unwrap();
    let s = report.salvage.expect("truncation must be detected");
    assert!(s.reason.contains("truncated"), "{s:?}");
    assert!(s.ops_saved > 100 && s.ops_saved < 2_000, "{s:?}");
    assert!(!s.ops_table_lost);
    assert_eq!(count(&outbox).await as u64, s.ops_saved);
    assert_eq!(std::fs::metadata(&s.moved_to).unwrap().len(), len * 6 / 10);
    // Salvaged ops are whole and usable.
    let ops = outbox.list(ListFilter::default()).await.unwrap();
    for op in &ops {
        assert_eq!(
            op.payload["i"],
            json!(op.entity_id[1..].parse::<u64>().unwrap())
        );
    }
    let fence = outbox.lock_acquire("r", None).await.unwrap().unwrap();
    assert!(!outbox
        .fenced(&fence)
        .claim_ready(10, i64::MAX)
        .await
        .unwrap()
        .is_empty());
    assert!(outbox.check().await.unwrap().ok);
}

#[tokio::test]
async fn a_wrecked_page_is_found_by_the_full_check_and_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 2_000).await;
    let len = std::fs::metadata(&path).unwrap().len();
    // Overwrite one page in the middle of the file with garbage.
    let page = 4096;
    let target = (len / page / 2) * page;
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(target)).unwrap();
    f.write_all(&vec![0xA5; 4096]).unwrap();
    drop(f);
    // The cheap probe at open may not touch that page; the full check does.
    let (outbox, report) = Outbox::open(&path, opts().integrity_check_at_open(true))
        .await
        .unwrap();
    let s = report
        .salvage
        .expect("the integrity check must flag the page");
    // The page may have held table rows (lost) or only index entries (all
    // rows saved: indexes are rebuilt in the fresh file).
    assert!(s.ops_saved > 1_000 && s.ops_saved <= 2_000, "{s:?}");
    assert_eq!(count(&outbox).await as u64, s.ops_saved);
    assert_eq!(
        outbox.meta_get("cursor").await.unwrap().as_deref(),
        Some("77")
    );
    assert!(outbox.check().await.unwrap().ok);
}

#[tokio::test]
async fn damage_met_after_open_is_a_typed_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 2_000).await;
    let len = std::fs::metadata(&path).unwrap().len();
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // Wreck every page but the first few: the probe's pages may survive.
    for p in (4..len / 4096).step_by(3) {
        f.seek(SeekFrom::Start(p * 4096)).unwrap();
        f.write_all(&[0x5A; 4096]).unwrap();
    }
    drop(f);
    match Outbox::open(&path, opts()).await {
        Ok((outbox, report)) => {
            if report.salvage.is_none() {
                let listed = outbox
                    .list(ListFilter {
                        limit: 1_000_000,
                        ..ListFilter::default()
                    })
                    .await;
                if let Err(e) = listed {
                    assert!(
                        e.to_string().contains("malformed") || e.to_string().contains("corrupt"),
                        "{e}"
                    );
                }
                // A check SQLite has to abort on a wrecked page is a
                // finding in the report, not an error.
                let check = outbox.check().await.unwrap();
                assert!(!check.ok && !check.problems.is_empty(), "{check:?}");
            }
        }
        Err(e) => panic!("open must salvage, not fail: {e}"),
    }
}

#[tokio::test]
async fn check_rebuilds_inconsistent_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 300).await;
    {
        // Change an index's definition behind SQLite's back: its stored
        // entries no longer match what it claims to index.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA writable_schema = ON;
             UPDATE sqlite_master SET sql = 'CREATE INDEX ops_state ON ops(entity_id, seq)'
                 WHERE name = 'ops_state';
             PRAGMA writable_schema = OFF;",
        )
        .unwrap();
    }
    let (outbox, report) = Outbox::open(&path, opts()).await.unwrap();
    assert!(report.salvage.is_none());
    let check = outbox.check().await.unwrap();
    assert!(!check.problems.is_empty(), "{check:?}");
    assert!(check.reindexed && check.ok, "{check:?}");
    assert!(outbox.check().await.unwrap().problems.is_empty());
    assert_eq!(count(&outbox).await, 300);
}
