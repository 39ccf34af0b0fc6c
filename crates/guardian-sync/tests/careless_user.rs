//! A careless user, a damaged disk and a misusing app against the outbox:
//! paths that are not outboxes (special files, other applications' files
//! reached through symlinks, another application's database caught
//! mid-session with its tables only in its WAL), a flipped byte at many
//! offsets of our own file, payloads the outbox could store but not read
//! back. Every foreign file is compared byte for byte before and after,
//! and nothing may be created beside it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use guardian_sync::op::{Ack, NewOp, OpId};
use guardian_sync::outbox::{
    EnqueueError, ListFilter, OpenError, Outbox, OutboxOptions, OutboxReader, Synchronous,
};
use rusqlite::Connection;
use serde_json::{json, Value};

fn opts() -> OutboxOptions {
    OutboxOptions::default()
        .synchronous(Synchronous::Off)
        .coalesce(false)
}

/// What a file holds: its length and SHA-256 (short enough to print).
fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(bytes);
    let hex: String = hash.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("{} bytes {hex}", bytes.len())
}

/// Every entry under `dir` (recursively) with a digest of its bytes;
/// symlinks as their target, special files and directories by kind.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode();
        if meta.is_dir() {
            out.insert(p.clone(), format!("dir {mode:o}"));
            out.extend(snapshot(&p));
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&p).unwrap();
            out.insert(p, format!("link to {}", target.display()));
        } else if meta.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            out.insert(p, format!("file {mode:o} {}", digest(&bytes)));
        } else {
            out.insert(p, format!("special {mode:o}"));
        }
    }
    out
}

/// Tries every way of opening `path` for writing and reading; each must be
/// refused as not an outbox.
async fn refused_everywhere(path: &Path, what: &str) {
    let err = Outbox::open(path, opts()).await.map(|_| ()).unwrap_err();
    assert!(
        matches!(err, OpenError::NotAnOutbox { .. }),
        "{what}: open: {err}"
    );
    let err = Outbox::repair(path, opts()).await.map(|_| ()).unwrap_err();
    assert!(
        matches!(err, OpenError::NotAnOutbox { .. }),
        "{what}: repair: {err}"
    );
    let err = OutboxReader::open(path).map(|_| ()).unwrap_err();
    assert!(
        matches!(err, OpenError::NotAnOutbox { .. }),
        "{what}: reader: {err}"
    );
}

fn wal_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

/// Special files (a FIFO, a socket, `/dev/null`), a symlink to each, and
/// symlinks to other programs' files (a PNG, a text file, a file of zeros,
/// another app's database): refused, left byte-identical, nothing beside
/// the link or its target. A FIFO must not be opened for reading (that
/// would wait forever for a writer).
#[tokio::test]
async fn special_files_and_symlinks_to_foreign_files_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let sock = d.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.resize(4096, 7);
    std::fs::write(d.join("pic.png"), &png).unwrap();
    std::fs::write(d.join("notes.txt"), b"dear diary\n").unwrap();
    std::fs::write(d.join("zeros"), vec![0u8; 8192]).unwrap();
    {
        let other = Connection::open(d.join("contacts.sqlite")).unwrap();
        other
            .execute_batch(
                "CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT);
                 INSERT INTO contacts (name) VALUES ('ann');",
            )
            .unwrap();
    }
    let links = d.join("links");
    std::fs::create_dir(&links).unwrap();
    let mut targets: Vec<PathBuf> = ["fifo", "sock", "pic.png", "notes.txt", "zeros"]
        .iter()
        .map(|n| d.join(n))
        .collect();
    targets.push(d.join("contacts.sqlite"));
    targets.push(PathBuf::from("/dev/null"));
    for (i, t) in targets.iter().enumerate() {
        std::os::unix::fs::symlink(t, links.join(format!("l{i}.db"))).unwrap();
    }
    let null_before = std::fs::metadata("/dev/null").unwrap().permissions().mode();
    let before = snapshot(d);
    let mut paths = targets.clone();
    paths.extend((0..targets.len()).map(|i| links.join(format!("l{i}.db"))));
    for p in &paths {
        refused_everywhere(p, &p.display().to_string()).await;
    }
    assert_eq!(snapshot(d), before, "a foreign file was changed");
    assert_eq!(
        std::fs::metadata("/dev/null").unwrap().permissions().mode(),
        null_before
    );
    assert!(!Path::new("/dev/null-wal").exists());
    assert!(!Path::new("/dev/null-shm").exists());
}

/// A path that cannot be created (no parent, a file as parent, a name too
/// long, a read-only directory) is an error, never a panic, and creates
/// nothing; a path with a newline and bytes that are not UTF-8 works.
#[tokio::test]
async fn paths_that_cannot_be_created_are_errors_and_odd_names_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("plain"), b"x").unwrap();
    let ro = d.join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
    // Root writes anywhere: the read-only case only means something for
    // other users.
    let probe = ro.join("probe");
    let root = std::fs::write(&probe, b"").is_ok();
    if root {
        std::fs::remove_file(&probe).unwrap();
    }
    let before = snapshot(d);
    let mut bad = vec![
        d.join("missing/parent/o.db"),
        d.join("plain/o.db"),
        d.join("x".repeat(300)),
        d.join(format!("{}/o.db", "y".repeat(5000))),
    ];
    if !root {
        bad.push(ro.join("o.db"));
    }
    for p in &bad {
        let err = Outbox::open(p, opts()).await.map(|_| ()).unwrap_err();
        assert!(!err.to_string().is_empty());
        assert!(OutboxReader::open(p).is_err());
    }
    assert_eq!(snapshot(d), before, "a failed open left something");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();

    use std::os::unix::ffi::OsStrExt;
    let odd = d.join(std::ffi::OsStr::from_bytes(
        b"new\nline \xff\xfe %41?x#y.db",
    ));
    let (outbox, report) = Outbox::open(&odd, opts()).await.unwrap();
    assert!(report.created);
    let done = outbox
        .enqueue(NewOp::create("thing", "a", json!({"n": 1})))
        .await
        .unwrap();
    outbox.close().await;
    let mode = std::fs::metadata(&odd).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let reader = OutboxReader::open(&odd).unwrap();
    assert_eq!(reader.stats().unwrap().pending, 1);
    drop(reader);
    let (outbox, _) = Outbox::open(&odd, opts()).await.unwrap();
    let ops = outbox.list(ListFilter::default()).await.unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].op_id, done.op_id);
    outbox.close().await;
    // Nothing was created under a name SQLite took from a URI reading of
    // the path (`%41` as `A`, `?` starting a query).
    for e in std::fs::read_dir(d).unwrap() {
        let name = e.unwrap().file_name();
        let name = name.as_bytes();
        assert!(
            !name.starts_with(b"new\nline \xff\xfe A"),
            "{:?}",
            String::from_utf8_lossy(name)
        );
    }
}

/// Another application's SQLite database in WAL mode whose tables are
/// still only in its `-wal` (copied, or restored from a backup, without
/// the `-shm`), its main file as SQLite left it or empty: refused, and
/// nothing created beside it. Reading its schema through SQLite's
/// read-only mode creates a `-shm` beside it and leaves it.
#[tokio::test]
async fn another_apps_database_with_its_tables_only_in_its_wal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let db = src.join("app.sqlite");
    // The other app's session: WAL mode, a table, a row, no checkpoint.
    let other = Connection::open(&db).unwrap();
    other
        .execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT);
             INSERT INTO contacts (name) VALUES ('ann'), ('bob');",
        )
        .unwrap();
    // Its main file and WAL, copied while it runs (no shared memory); the
    // second copy's main file is empty (all it has is in the WAL).
    let kept = dir.path().join("app.sqlite");
    let empty = dir.path().join("empty.sqlite");
    for path in [&kept, &empty] {
        std::fs::copy(&db, path).unwrap();
        std::fs::copy(wal_of(&db), wal_of(path)).unwrap();
    }
    std::fs::File::create(&empty).unwrap();
    drop(other);
    std::fs::remove_dir_all(&src).unwrap();
    let before = snapshot(dir.path());
    refused_everywhere(&kept, "main file and a foreign WAL").await;
    refused_everywhere(&empty, "empty main file and a foreign WAL").await;
    assert_eq!(
        snapshot(dir.path()),
        before,
        "another app's database changed"
    );
}

/// A FIFO where a database's `-wal` would be, beside another app's
/// database (rollback journal, no `-shm`): refused at once, the FIFO never
/// opened (that would wait for a writer) and nothing created.
#[tokio::test]
async fn a_fifo_named_like_a_wal_is_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE notes (body TEXT);")
        .unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(wal_of(&path))
        .status()
        .unwrap();
    assert!(made.success());
    let before = snapshot(dir.path());
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        refused_everywhere(&path, "a FIFO as its WAL"),
    )
    .await
    .expect("opening waited on the FIFO");
    assert_eq!(snapshot(dir.path()), before, "the directory changed");
}

/// A SQLite file of another application that has no table (only a view):
/// SQLite's schema is not empty, so it is not an interrupted create of
/// ours. It must not be migrated.
#[tokio::test]
async fn a_foreign_database_without_tables_is_not_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views.sqlite");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE VIEW answer AS SELECT 42 AS n; PRAGMA user_version = 0;")
            .unwrap();
    }
    let before = snapshot(dir.path());
    refused_everywhere(&path, "view-only database").await;
    assert_eq!(snapshot(dir.path()), before, "a view-only database changed");
}

/// A value nested deeper than the outbox can read back: enqueue must refuse
/// it (a clear error) rather than store an op that is later quarantined as
/// "damaged" and never sent. 100 levels are kept and read back exactly.
#[tokio::test]
async fn a_payload_too_deep_to_read_back_is_refused_at_enqueue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let (outbox, _) = Outbox::open(&path, opts()).await.unwrap();
    let nested = |levels: usize| {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!({ "d": v });
        }
        v
    };
    let kept = nested(100);
    let done = outbox
        .enqueue(NewOp::create("thing", "kept", kept.clone()))
        .await
        .unwrap();
    let ops = outbox.list(ListFilter::default()).await.unwrap();
    let got = ops.iter().find(|o| o.op_id == done.op_id);
    assert_eq!(
        got.map(|o| &o.payload),
        Some(&kept),
        "read back as enqueued"
    );
    for levels in [101, 200] {
        let result = outbox
            .enqueue(NewOp::create("thing", "deep", nested(levels)))
            .await;
        assert!(
            matches!(result, Err(EnqueueError::PayloadTooDeep { max: 100 })),
            "{levels} levels: {result:?}"
        );
    }
    assert_eq!(outbox.list(ListFilter::default()).await.unwrap().len(), 1);
    outbox.close().await;
}

/// A base version over `i64::MAX` cannot be stored: it was clamped to
/// `i64::MAX` and later sent as an `If-Match` the app never gave. Refused
/// at enqueue, alone or in a transaction, storing nothing; `i64::MAX`
/// itself is kept exactly.
#[tokio::test]
async fn a_base_version_too_large_to_store_is_refused_not_altered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let (outbox, _) = Outbox::open(&path, opts()).await.unwrap();
    let max = u64::try_from(i64::MAX).unwrap();
    let update =
        |id: &str, v: u64| NewOp::update("thing", id, json!({"n": 1})).with_base_version(v);
    let done = outbox.enqueue(update("kept", max)).await.unwrap();
    for v in [max + 1, u64::MAX] {
        let result = outbox.enqueue(update("over", v)).await;
        assert!(
            matches!(result, Err(EnqueueError::BaseVersionTooLarge(got)) if got == v),
            "{v}: {result:?}"
        );
        let result = outbox
            .enqueue_transaction(vec![
                NewOp::create("thing", "first", json!({"n": 1})),
                update("over", v),
            ])
            .await;
        assert!(
            matches!(result, Err(EnqueueError::BaseVersionTooLarge(got)) if got == v),
            "{v} in a transaction: {result:?}"
        );
    }
    let ops = outbox.list(ListFilter::default()).await.unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!((ops[0].op_id, ops[0].base_version), (done.op_id, Some(max)));
    outbox.close().await;
}

/// The ops of [`build`], by op id: what was enqueued.
type Enqueued = BTreeMap<OpId, (String, String, Value, Option<u64>)>;

/// A closed outbox (WAL checkpointed into the file) of `n` updates, each
/// with a payload marker, a base and a base version (`If-Match`) of its own.
async fn build(path: &Path, n: u64) -> Enqueued {
    let (outbox, _) = Outbox::open(path, opts()).await.unwrap();
    let mut out = BTreeMap::new();
    for i in 0..n {
        let payload = json!({"marker": format!("m{i:04}-payload"), "n": i});
        let version = 0x1234_5600 + i;
        let done = outbox
            .enqueue(
                NewOp::update("thing", format!("ent-{i:04}"), payload.clone())
                    .with_base(json!({"old": i}), version),
            )
            .await
            .unwrap();
        out.insert(
            done.op_id,
            (
                done.idempotency_key.to_string(),
                format!("ent-{i:04}"),
                payload,
                Some(version),
            ),
        );
    }
    outbox.close().await;
    assert!(!wal_of(path).exists());
    out
}

/// Claims and acknowledges everything ready, checking that each op handed
/// out is one that was enqueued, exactly as it was enqueued.
async fn claim_all_unaltered(outbox: &Outbox, enqueued: &Enqueued, what: &str) -> usize {
    let Ok(Some(fence)) = outbox.lock_acquire("careless", None).await else {
        return 0;
    };
    let mut claimed = 0;
    for _ in 0..100 {
        let Ok(ops) = outbox.fenced(&fence).claim_ready(100, i64::MAX / 2).await else {
            break;
        };
        if ops.is_empty() {
            break;
        }
        for op in ops {
            let (key, entity, payload, version) = enqueued
                .get(&op.op_id)
                .unwrap_or_else(|| panic!("{what}: an op never enqueued was claimed: {op:?}"));
            assert_eq!(&op.idempotency_key.to_string(), key, "{what}: key altered");
            assert_eq!(&op.entity_id, entity, "{what}: entity altered");
            assert_eq!(&op.payload, payload, "{what}: payload altered");
            assert_eq!(&op.base_version, version, "{what}: If-Match altered");
            claimed += 1;
            let _ = outbox.fenced(&fence).ack(op.op_id, Ack::default()).await;
        }
    }
    claimed
}

/// One flipped bit at offsets spread over the whole file (header, schema,
/// table, index and free pages): open salvages, refuses or opens, but
/// never panics, and no op is ever handed out altered or invented.
#[tokio::test]
async fn a_flipped_bit_anywhere_never_hands_out_an_altered_op() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = dir.path().join("pristine.db");
    let enqueued = build(&pristine, 30).await;
    let bytes = std::fs::read(&pristine).unwrap();
    let started = std::time::Instant::now();
    let mut opened = 0;
    // A prime step walks every position within a page over the file.
    for offset in (0..bytes.len()).step_by(331) {
        let case = tempfile::tempdir().unwrap();
        let path = case.path().join("o.db");
        let mut damaged = bytes.clone();
        damaged[offset] ^= 0x04;
        std::fs::write(&path, &damaged).unwrap();
        let what = format!("offset {offset}");
        if let Ok((outbox, _)) = Outbox::open(&path, opts()).await {
            opened += 1;
            claim_all_unaltered(&outbox, &enqueued, &what).await;
            outbox.close().await;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "too slow"
        );
    }
    assert!(opened > 0);
}

/// A flipped bit in an op's base version (the `If-Match` its request
/// carries) is damage like one in its payload: the op must not be sent
/// with a version the app never gave.
#[tokio::test]
async fn a_flipped_bit_in_the_base_version_is_never_sent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let enqueued = build(&path, 5).await;
    // Op 3's base version 0x12345603 is stored as a 4-byte big-endian
    // integer in its row (the only place it is stored).
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = [0x12, 0x34, 0x56, 0x03];
    let at: Vec<usize> = bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{at:?}");
    bytes[at[0] + 3] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (outbox, _) = Outbox::open(&path, opts()).await.unwrap();
    let claimed = claim_all_unaltered(&outbox, &enqueued, "base version").await;
    assert_eq!(claimed, 4, "the damaged op is quarantined, the others flow");
    outbox.close().await;
}
