//! Outbox files under damage and at wrong paths: a path that is not an
//! outbox is refused and left byte-identical; a damaged op is quarantined
//! while the others flow; a row altered on disk is never sent; salvage
//! recovers every decodable op, leaves no temporary file and drains.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use guardian_sync::op::{Ack, NewOp, OpId, OpState};
use guardian_sync::outbox::{ListFilter, OpenError, Outbox, OutboxOptions, Synchronous};
use rusqlite::Connection;
use serde_json::json;

fn opts() -> OutboxOptions {
    OutboxOptions::default()
        .synchronous(Synchronous::Off)
        .coalesce(false)
}

/// Every file in `dir` (recursively) with its bytes.
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

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The ops of [`build`]: op `i` is a create of `thing/ent-000i-x` whose
/// payload holds the marker `m000i-payload`.
struct Built {
    ids: Vec<OpId>,
    keys: Vec<String>,
}

/// Builds a closed outbox (its WAL checkpointed into the file) with `n` ops.
async fn build(path: &Path, n: usize) -> Built {
    let (outbox, _) = Outbox::open(path, opts()).await.unwrap();
    let mut built = Built {
        ids: Vec::new(),
        keys: Vec::new(),
    };
    for i in 0..n {
        let done = outbox
            .enqueue(NewOp::create(
                "thing",
                format!("ent-{i:04}-x"),
                json!({"marker": format!("m{i:04}-payload"), "n": 5}),
            ))
            .await
            .unwrap();
        built.ids.push(done.op_id);
        built.keys.push(done.idempotency_key.to_string());
    }
    outbox.close().await;
    assert!(!path.with_extension("db-wal").exists());
    built
}

/// Applies `f` to every occurrence of `needle` in the file.
fn patch_all(path: &Path, needle: &[u8], f: impl Fn(&mut [u8])) -> usize {
    let mut bytes = std::fs::read(path).unwrap();
    let mut hits = 0;
    let mut i = 0;
    while i + needle.len() <= bytes.len() {
        if &bytes[i..i + needle.len()] == needle {
            f(&mut bytes[i..i + needle.len()]);
            hits += 1;
            i += needle.len();
        } else {
            i += 1;
        }
    }
    std::fs::write(path, bytes).unwrap();
    hits
}

fn patch_at(path: &Path, offset: usize, new: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset..offset + new.len()].copy_from_slice(new);
    std::fs::write(path, bytes).unwrap();
}

/// Claims and acks until nothing is ready; returns the op ids delivered.
async fn drain(outbox: &Outbox) -> Vec<OpId> {
    let fence = outbox.lock_acquire("test", None).await.unwrap().unwrap();
    let mut done = Vec::new();
    loop {
        let ops = outbox
            .fenced(&fence)
            .claim_ready(100, i64::MAX / 2)
            .await
            .unwrap();
        if ops.is_empty() {
            break;
        }
        for op in ops {
            assert_eq!(op.payload["n"], json!(5), "an altered payload was claimed");
            outbox
                .fenced(&fence)
                .ack(op.op_id, Ack::default())
                .await
                .unwrap();
            done.push(op.op_id);
        }
    }
    assert!(!outbox.next_due().await.unwrap().active, "ops left behind");
    done
}

fn no_temp_files(dir: &Path) {
    for n in names(dir) {
        assert!(
            n == "o.db"
                || n == "o.db-wal"
                || n == "o.db-shm"
                || n == "o.db.writers"
                || n.starts_with("o.db.corrupt-"),
            "unexpected file {n} in {:?}",
            names(dir)
        );
        assert!(!n.contains(".salvage"), "temporary file {n} left behind");
    }
}

#[tokio::test]
async fn paths_that_are_not_outboxes_are_refused_and_left_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("some-directory")).unwrap();
    std::fs::write(d.join("some-directory/inside.txt"), b"keep me").unwrap();
    std::fs::write(d.join("notes.txt"), b"my notes\nline two\n").unwrap();
    std::fs::write(d.join("short"), b"hi").unwrap();
    let garbage: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(d.join("garbage.bin"), &garbage).unwrap();
    {
        let other = Connection::open(d.join("other.sqlite")).unwrap();
        other
            .execute_batch(
                "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
                 INSERT INTO users (name) VALUES ('ann'), ('bob');",
            )
            .unwrap();
        let tagged = Connection::open(d.join("tagged.sqlite")).unwrap();
        tagged
            .execute_batch(
                "PRAGMA application_id = 1234; CREATE TABLE ops (seq INTEGER PRIMARY KEY);",
            )
            .unwrap();
    }
    // A text file quoting our schema (as this crate's source does).
    let mut quoting = include_str!("outbox_schema.rs").as_bytes().to_vec();
    quoting.resize(quoting.len().div_ceil(4096) * 4096, b' ');
    std::fs::write(d.join("schema.rs"), &quoting).unwrap();
    let before = snapshot(d);
    for name in [
        "some-directory",
        "notes.txt",
        "short",
        "garbage.bin",
        "other.sqlite",
        "tagged.sqlite",
        "schema.rs",
    ] {
        let err = Outbox::open(d.join(name), opts()).await.unwrap_err();
        assert!(
            matches!(err, OpenError::NotAnOutbox { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains("not a guardian outbox"), "{err}");
        let err = Outbox::repair(d.join(name), opts()).await.unwrap_err();
        assert!(
            matches!(err, OpenError::NotAnOutbox { .. }),
            "{name}: {err}"
        );
        let err = guardian_sync::outbox::OutboxReader::open(d.join(name)).unwrap_err();
        assert!(
            matches!(err, OpenError::NotAnOutbox { .. }),
            "{name}: {err}"
        );
    }
    assert_eq!(snapshot(d), before, "a path that is not ours was changed");
}

#[tokio::test]
async fn new_files_are_stamped_and_older_files_recognised_and_stamped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 3).await;
    let header = std::fs::read(&path).unwrap();
    assert_eq!(&header[68..72], b"GSOB");
    // Schema 3 as it shipped: no application_id, no checksums.
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA application_id = 0; DROP TRIGGER ops_reseal; ALTER TABLE ops DROP COLUMN checksum;
             DROP INDEX ops_txn; DROP INDEX ops_gated;
             ALTER TABLE ops DROP COLUMN txn; ALTER TABLE ops DROP COLUMN depends_on;
             PRAGMA user_version = 3;",
        )
        .unwrap();
    }
    assert_eq!(&std::fs::read(&path).unwrap()[68..72], &[0, 0, 0, 0]);
    let reader = guardian_sync::outbox::OutboxReader::open(&path).unwrap();
    assert_eq!(reader.schema_version(), 3);
    assert_eq!(reader.stats().unwrap().pending, 3);
    drop(reader);
    let (outbox, report) = Outbox::open(&path, opts()).await.unwrap();
    assert_eq!(report.migrated_from, Some(3));
    assert_eq!(drain(&outbox).await.len(), 3, "migrated rows are sealed");
    outbox.close().await;
    assert_eq!(&std::fs::read(&path).unwrap()[68..72], b"GSOB");
}

/// One damaged op of 20 (a 0xFF byte in its payload, entity id or
/// idempotency key) is quarantined; the 19 others are claimed and drain.
#[tokio::test]
async fn an_undecodable_op_is_quarantined_and_the_others_flow() {
    for target in ["payload", "entity id", "idempotency key"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let built = build(&path, 20).await;
        let needle = match target {
            "payload" => b"m0007-payload".to_vec(),
            // The row (its entity id is followed by its payload), not the
            // index entry.
            "entity id" => br#"ent-0007-x{"marker""#.to_vec(),
            _ => built.keys[7].as_bytes().to_vec(),
        };
        assert_eq!(patch_all(&path, &needle, |b| b[3] = 0xFF), 1, "{target}");
        let (outbox, report) = Outbox::open(&path, opts()).await.unwrap();
        assert!(report.salvage.is_none(), "{target}: {report:?}");
        assert_eq!(outbox.list(ListFilter::default()).await.unwrap().len(), 19);
        let listed = outbox.list_checked(ListFilter::default()).await.unwrap();
        assert_eq!(listed.iter().filter(|r| r.is_err()).count(), 1, "{target}");
        let delivered = drain(&outbox).await;
        assert_eq!(delivered.len(), 19, "{target}");
        assert!(!delivered.contains(&built.ids[7]));
        let failed = outbox
            .list_checked(ListFilter {
                state: Some(OpState::Failed),
                ..ListFilter::default()
            })
            .await
            .unwrap();
        let [Err(bad)] = failed.as_slice() else {
            panic!("{target}: {failed:?}")
        };
        assert_eq!(bad.state, "failed");
        assert!(bad.reason.contains("damaged row"), "{bad:?}");
        let check = outbox.check().await.unwrap();
        assert_eq!(check.unreadable_ops.len(), 1, "{check:?}");
        assert!(check.ok, "a quarantined op is accounted for: {check:?}");
        outbox.close().await;
    }
}

/// A byte changed on disk that still decodes (a digit of the payload, a hex
/// digit of the idempotency key) is caught by the row's checksum: the op
/// is quarantined, never sent altered or under a key never enqueued.
#[tokio::test]
async fn a_row_altered_on_disk_is_never_sent() {
    for target in ["payload", "idempotency key"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let built = build(&path, 20).await;
        let hits = if target == "payload" {
            patch_all(&path, br#"m0003-payload","n":5"#, |b| b[19] = b'6')
        } else {
            let key = built.keys[3].as_bytes().to_vec();
            patch_all(&path, &key, |b| {
                b[0] = if b[0] == b'a' { b'b' } else { b'a' }
            })
        };
        assert_eq!(hits, 1, "{target}");
        let (outbox, _) = Outbox::open(&path, opts()).await.unwrap();
        let check = guardian_sync::outbox::OutboxReader::open(&path)
            .unwrap()
            .check()
            .unwrap();
        assert!(!check.ok, "{target}: the read-only check reports it");
        assert_eq!(check.unreadable_ops[0].seq, 4, "{check:?}");
        let delivered = drain(&outbox).await;
        assert_eq!(delivered.len(), 19, "{target}");
        assert!(!delivered.contains(&built.ids[3]), "{target} sent altered");
        let stats = outbox.stats().await.unwrap();
        assert_eq!(stats.failed, 1);
        outbox.close().await;
    }
}

/// Writes that change sealed fields through the outbox reseal the row.
#[tokio::test]
async fn the_outbox_own_edits_keep_rows_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let (outbox, _) = Outbox::open(
        &path,
        OutboxOptions::default().synchronous(Synchronous::Off),
    )
    .await
    .unwrap();
    let a = outbox
        .enqueue(NewOp::update("thing", "a", json!({"n": 1})))
        .await
        .unwrap();
    // Coalesced into the first (a payload change).
    outbox
        .enqueue(NewOp::update("thing", "a", json!({"n": 2})))
        .await
        .unwrap();
    let b = outbox
        .enqueue(NewOp::update("thing", "b", json!({"n": 1})))
        .await
        .unwrap();
    outbox.edit_payload(b.op_id, json!({"n": 3})).await.unwrap();
    let check = outbox.check().await.unwrap();
    assert!(check.ok && check.unreadable_ops.is_empty(), "{check:?}");
    let fence = outbox.lock_acquire("t", None).await.unwrap().unwrap();
    let ops = outbox
        .fenced(&fence)
        .claim_ready(10, i64::MAX / 2)
        .await
        .unwrap();
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0].op_id, a.op_id);
    assert_eq!(ops[0].payload, json!({"n": 2}));
    assert_eq!(ops[1].payload, json!({"n": 3}));
    outbox.close().await;
}

/// Header damage (the magic, the page size, the schema-format number, a
/// fixed field, the text encoding) and a row that is not UTF-8: open
/// salvages without a panic, recovers every decodable op, quarantines the
/// other, leaves no temporary file, and the result drains.
#[tokio::test]
async fn salvage_recovers_every_op_past_header_damage_and_drains() {
    let cases: [(&str, usize, &[u8]); 5] = [
        ("magic", 0, b"XQLite"),
        ("page size", 16, &[0x03, 0x00]),
        ("schema format", 44, &[0, 0, 0, 9]),
        ("payload fraction", 21, &[0]),
        ("text encoding", 56, &[0, 0, 0, 7]),
    ];
    for (what, offset, bytes) in cases {
        for with_bad_row in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("o.db");
            let built = build(&path, 20).await;
            patch_at(&path, offset, bytes);
            if with_bad_row {
                assert_eq!(patch_all(&path, b"m0011-payload", |b| b[1] = 0xFF), 1);
            }
            let damaged = std::fs::read(&path).unwrap();
            let (outbox, report) = Outbox::open(&path, opts()).await.unwrap();
            let s = report
                .salvage
                .unwrap_or_else(|| panic!("{what}: not salvaged"));
            let bad = usize::from(with_bad_row);
            assert_eq!(s.ops_saved as usize, 20 - bad, "{what}: {s:?}");
            assert_eq!(s.ops_quarantined as usize, bad, "{what}: {s:?}");
            assert_eq!(std::fs::read(&s.moved_to).unwrap(), damaged, "{what}");
            no_temp_files(dir.path());
            let delivered = drain(&outbox).await;
            assert_eq!(delivered.len(), 20 - bad, "{what}");
            if with_bad_row {
                assert!(!delivered.contains(&built.ids[11]));
                assert_eq!(outbox.stats().await.unwrap().failed, 1);
            }
            outbox.close().await;
            no_temp_files(dir.path());
        }
    }
}

/// A salvage never moves a file another open outbox may write (its writes
/// would land in the moved file, after the salvage read it): a repair
/// while another handle has the file open is refused and changes nothing;
/// once that handle is closed, the repair saves every op.
#[tokio::test]
async fn a_salvage_never_moves_a_file_another_writer_has_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 5).await;
    let (holder, _) = Outbox::open(&path, opts()).await.unwrap();
    patch_at(&path, 0, b"XQLite");
    let before = snapshot(dir.path());
    let short = opts().open_timeout(std::time::Duration::from_millis(200));
    let err = Outbox::repair(&path, short.clone()).await.unwrap_err();
    assert!(
        matches!(&err, OpenError::SalvageFailed { reason, .. } if reason.contains("it is open elsewhere")),
        "{err}"
    );
    assert!(snapshot(dir.path()) == before, "{:?}", names(dir.path()));
    holder.close().await;
    let (outbox, report, _) = Outbox::repair(&path, short).await.unwrap();
    assert_eq!(report.salvage.map(|s| s.ops_saved), Some(5));
    assert_eq!(outbox.stats().await.unwrap().pending, 5);
    outbox.close().await;
    no_temp_files(dir.path());
}

/// Root page of an index or table, read before the damage.
fn root_page(path: &Path, name: &str) -> usize {
    let conn = Connection::open(path).unwrap();
    conn.query_row(
        "SELECT rootpage FROM sqlite_master WHERE name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|p| usize::try_from(p).unwrap())
    .unwrap()
}

/// A wrecked index page is not seen by the cheap probe at open: the
/// read-only check finds it, changing nothing, and a repair rebuilds or
/// salvages so that every op is delivered.
#[tokio::test]
async fn index_damage_is_found_by_check_and_repaired() {
    for index in ["ops_entity", "ops_ready", "ops_state"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        build(&path, 20).await;
        let page = root_page(&path, index);
        patch_at(&path, (page - 1) * 4096, &[0xA5; 4096]);
        let before = snapshot(dir.path());
        let check = guardian_sync::outbox::OutboxReader::open(&path)
            .unwrap()
            .check()
            .unwrap();
        assert!(
            !check.ok && !check.problems.is_empty(),
            "{index}: {check:?}"
        );
        assert_eq!(snapshot(dir.path()), before, "{index}: check changed files");
        let (outbox, _, check) = Outbox::repair(&path, opts()).await.unwrap();
        assert!(check.ok, "{index}: {check:?}");
        assert_eq!(drain(&outbox).await.len(), 20, "{index}");
        outbox.close().await;
        no_temp_files(dir.path());
    }
}

/// A value of the wrong type in a row open reads (the lock's epoch) fails
/// every plain open; the read-only check says the file is damaged, and a
/// repair salvages it: every op delivered, the epoch still increasing.
#[tokio::test]
async fn a_wrong_column_type_met_at_open_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    build(&path, 20).await;
    {
        let (outbox, _) = Outbox::open(&path, opts()).await.unwrap();
        let fence = outbox.lock_acquire("old", None).await.unwrap().unwrap();
        outbox.fenced(&fence).lock_release().await.unwrap();
        outbox.close().await;
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE lock SET heartbeat = 'x\u{FF}'", [])
            .unwrap();
    }
    assert!(Outbox::open(&path, opts()).await.is_err());
    let err = guardian_sync::outbox::OutboxReader::open(&path).unwrap_err();
    assert!(err.to_string().contains("--repair"), "{err}");
    let (outbox, report, check) = Outbox::repair(&path, opts()).await.unwrap();
    assert!(check.ok, "{check:?}");
    let s = report.salvage.expect("salvaged");
    assert_eq!(s.ops_saved, 20, "{s:?}");
    assert_eq!(drain(&outbox).await.len(), 20);
    outbox.close().await;
    no_temp_files(dir.path());
}

/// Opened through a symlink, the outbox preallocates the WAL SQLite uses,
/// beside the link's target, and leaves a file named like a WAL beside the
/// link (not SQLite's, so not ours) byte-identical.
#[cfg(unix)]
#[tokio::test]
async fn through_a_symlink_the_wal_fill_touches_only_sqlites_wal() {
    let dir = tempfile::tempdir().unwrap();
    let real_dir = dir.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let real = real_dir.join("o.db");
    let (created, _) = Outbox::open(&real, opts()).await.unwrap();
    created.close().await;
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    // As long as a WAL the fill starts on: a fill that took it for the WAL
    // would append to it.
    let decoy = dir.path().join("link.db-wal");
    let foreign = vec![b'x'; 256 << 10];
    std::fs::write(&decoy, &foreign).unwrap();
    let options = OutboxOptions::default()
        .synchronous(Synchronous::Full)
        .coalesce(false);
    let (outbox, _) = Outbox::open(&link, options).await.unwrap();
    let real_wal = real_dir.join("o.db-wal");
    // Each enqueue is a commit of a few pages; the fill starts past 256 KiB.
    let target = 32 + (1000 + 256) * (4096 + 24);
    let mut n = 0;
    while std::fs::metadata(&real_wal).unwrap().len() < target {
        outbox
            .enqueue(NewOp::create("device", format!("d{n}"), json!({"n": n})))
            .await
            .unwrap();
        n += 1;
        assert!(n < 1000, "the WAL was never preallocated");
    }
    assert_eq!(std::fs::metadata(&real_wal).unwrap().len(), target);
    assert_eq!(std::fs::read(&decoy).unwrap(), foreign);
    outbox.close().await;
}
