//! Is this path an outbox? Decided before anything is written, so a wrong
//! path (a directory, a text file, another program's SQLite database) is
//! refused and left exactly as it was; only a file that is ours, intact or
//! damaged, may be opened, migrated or salvaged.
//!
//! Ours means: `application_id` [`APPLICATION_ID`] in the header (schema 4
//! and later), or, for files of earlier schemas and for a damaged header,
//! our tables: read through SQLite when it can read the schema, otherwise
//! the text of our `CREATE TABLE` statements found in the file's bytes.

use std::io::Read;
use std::path::Path;

use super::schema::APPLICATION_ID;

/// What is at an outbox path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// Nothing: a new outbox may be created there.
    Missing,
    /// An empty file: what SQLite (and an interrupted create) leaves; a new
    /// database.
    Empty,
    /// An outbox, intact or damaged.
    Ours,
    /// Something else; the reason says what.
    NotOurs(String),
}

const MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Statements only an outbox's schema holds (as stored in `sqlite_master`).
const SIGNATURES: [&[u8]; 2] = [b"CREATE TABLE txn_outcomes", b"idempotency_key  TEXT"];

/// `path`, or the file it leads to when it is a symlink (other spellings
/// name the same directory entry and are kept as given, so messages show
/// what the user typed).
pub(crate) fn through_link(path: &Path) -> std::path::PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

/// A file beside the outbox that SQLite opens (`-journal`, `-wal`, `-shm`)
/// but that is not a regular file: SQLite would wait for good on a FIFO
/// there, or fail without saying why. What is there, to refuse the open.
fn odd_side_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    for suffix in ["-journal", "-wal", "-shm"] {
        let side = super::damage::with_suffix(path, suffix);
        let Ok(meta) = std::fs::symlink_metadata(&side) else {
            continue;
        };
        let t = meta.file_type();
        let kind = if t.is_file() {
            continue;
        } else if t.is_symlink() {
            "a symbolic link"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else {
            "not a regular file"
        };
        return Some(format!(
            "{} is {kind}, not a file SQLite made: move it away; nothing was changed",
            side.display()
        ));
    }
    None
}

/// Looks at `path` without writing anything. Beside an odd side file (see
/// [`odd_side_file`]) SQLite would wait on it or fail, here or in the open
/// after: the file is told from its bytes alone, and unless it is not ours
/// that is an error.
pub(crate) fn classify(path: &Path) -> std::io::Result<Identity> {
    let beside = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let odd = odd_side_file(&beside);
    match (identify(path, odd.is_none())?, odd) {
        // A database in WAL mode may keep its schema in the WAL alone,
        // which cannot be read beside an odd side file: undecided.
        (Identity::NotOurs(_), Some(reason)) if wal_mode(&beside) => {
            Err(std::io::Error::other(reason))
        }
        (Identity::NotOurs(reason), _) => Ok(Identity::NotOurs(reason)),
        (_, Some(reason)) => Err(std::io::Error::other(reason)),
        (identity, None) => Ok(identity),
    }
}

/// Whether the header names a SQLite database in WAL mode (its read and
/// write versions are 2).
fn wal_mode(path: &Path) -> bool {
    let mut header = [0u8; 20];
    std::fs::File::open(path).is_ok_and(|mut f| f.read_exact(&mut header).is_ok())
        && header.starts_with(MAGIC)
        && header[18] == 2
        && header[19] == 2
}

/// [`classify`]; reads the schema through SQLite only if `through_sqlite`.
fn identify(path: &Path, through_sqlite: bool) -> std::io::Result<Identity> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Identity::Missing),
        Err(e) => return Err(e),
    };
    // SQLite names the WAL after the resolved path: through a symlink the
    // `-wal` beside the link is not the one that holds the latest commits.
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let path = resolved.as_path();
    if meta.is_dir() {
        return Ok(Identity::NotOurs("it is a directory".into()));
    }
    if !meta.is_file() {
        return Ok(Identity::NotOurs("it is not a regular file".into()));
    }
    if meta.len() == 0 {
        // SQLite deletes a WAL beside an empty file when it opens it (no
        // header says WAL mode, so it cannot be valid): one with another
        // program's data in it, bytes without our statements, is not ours
        // to discard.
        let wal = super::damage::with_suffix(path, "-wal");
        if std::fs::metadata(&wal).is_ok_and(|m| m.is_file() && m.len() > 0)
            && !contains_signatures(&wal)?
        {
            return Ok(Identity::NotOurs(
                "it is empty, beside another program's WAL".into(),
            ));
        }
        return Ok(Identity::Empty);
    }
    let mut header = Vec::with_capacity(100);
    std::fs::File::open(path)?
        .take(100)
        .read_to_end(&mut header)?;
    let sqlite = header.len() == 100 && header.starts_with(MAGIC);
    let app_id = (header.len() >= 72)
        .then(|| u32::from_be_bytes([header[68], header[69], header[70], header[71]]));
    if app_id == Some(APPLICATION_ID) {
        return Ok(Identity::Ours);
    }
    if sqlite {
        if let Some(id) = app_id.filter(|&id| id != 0) {
            return Ok(Identity::NotOurs(format!(
                "it is a SQLite database of another application (application_id {id:#010x})"
            )));
        }
        // Schema 1 to 3 (no application_id yet): our tables, if SQLite can
        // read them. An empty schema is an interrupted create (a process
        // killed before its first commit): there is nothing to lose, and
        // refusing it would leave the outbox stuck for good. A view or a
        // trigger without a table, or a user_version, is someone's.
        match through_sqlite.then(|| schema(path)).flatten() {
            Some(s) if s.is_empty() => return Ok(Identity::Empty),
            Some(s) if are_ours(&s.tables) => return Ok(Identity::Ours),
            Some(_) => {
                return Ok(Identity::NotOurs(
                    "it is a SQLite database of another application".into(),
                ))
            }
            None => {}
        }
    }
    // A damaged header (or schema): whole pages, page 1's b-tree header
    // after the file header, and our statements' text in the bytes. A text
    // file quoting our schema (this crate's source) has no b-tree page.
    let mut page1 = [0u8; 101];
    let btree = meta.len() % 512 == 0
        && std::fs::File::open(path)?.read_exact(&mut page1).is_ok()
        && matches!(page1[100], 0x05 | 0x0D);
    if btree && contains_signatures(path)? {
        return Ok(Identity::Ours);
    }
    // Read without SQLite, a new file's schema may still be only in its WAL.
    let wal = super::damage::with_suffix(path, "-wal");
    if sqlite
        && !through_sqlite
        && std::fs::symlink_metadata(&wal).is_ok_and(|m| m.is_file())
        && contains_signatures(&wal)?
    {
        return Ok(Identity::Ours);
    }
    Ok(Identity::NotOurs(if sqlite {
        "it is a SQLite database without the outbox's tables".into()
    } else {
        "it is not a SQLite database".into()
    }))
}

/// What SQLite reads of a file's schema.
struct Schema {
    tables: Vec<String>,
    /// Entries of `sqlite_master` (tables, indexes, views, triggers).
    entries: usize,
    user_version: i64,
}

impl Schema {
    /// Nothing at all: what SQLite leaves of a create killed before its
    /// first commit.
    fn is_empty(&self) -> bool {
        self.entries == 0 && self.user_version == 0
    }
}

/// The schema SQLite reads; `None` if it cannot be read.
fn schema(path: &Path) -> Option<Schema> {
    read_only(path, |conn| {
        let tables = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .ok()?
            .query_map([], |r| r.get(0))
            .ok()?
            .collect::<rusqlite::Result<Vec<String>>>()
            .ok()?;
        let entries: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .ok()?;
        let user_version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .ok()?;
        Some(Schema {
            tables,
            entries: usize::try_from(entries).unwrap_or(usize::MAX),
            user_version,
        })
    })
}

/// Most bytes of a database and its WAL copied to read their schema.
const MAX_COPY: u64 = 64 << 20;

/// Runs `read` on a read-only connection to the database at `path`
/// (immutable without a WAL: no lock, nothing created). SQLite's read-only
/// mode creates a `-shm` beside a WAL database that has a `-wal` but no
/// `-shm`, and leaves it there: for a file that may be another program's,
/// `read` then sees a private copy of the file and its WAL. Where no copy
/// can be made (a WAL over [`MAX_COPY`], no usable temp dir), the file is
/// read in place: a stray `-shm` harms less than taking another program's
/// database for an empty one.
fn read_only<T>(path: &Path, read: impl Fn(&rusqlite::Connection) -> Option<T>) -> Option<T> {
    let in_place = || read(&super::reader::connect_read_only(path).ok()?);
    // Without a WAL SQLite reads, the file is read alone, creating nothing.
    let Some((wal, wal_size)) = guardian_sqlite::live_wal(path) else {
        return in_place();
    };
    if super::damage::with_suffix(path, "-shm").exists() {
        return in_place();
    }
    let size = std::fs::metadata(path).map_or(u64::MAX, |m| m.len());
    if size.saturating_add(wal_size) > MAX_COPY {
        return in_place();
    }
    let Some(dir) = PrivateDir::new() else {
        return in_place();
    };
    let copy = dir.0.join("db");
    match std::fs::copy(path, &copy)
        .and_then(|_| std::fs::copy(&wal, super::damage::with_suffix(&copy, "-wal")))
    {
        Ok(_) => read(&super::reader::connect_read_only(&copy).ok()?),
        Err(_) => in_place(),
    }
}

/// A new directory only this user may enter, in the system's temp dir;
/// removed with what it holds when dropped.
struct PrivateDir(std::path::PathBuf);

impl PrivateDir {
    fn new() -> Option<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "guardian-ident-{}-{n}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).ok()?;
        Some(Self(dir))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `names` hold the outbox's tables.
fn are_ours(names: &[String]) -> bool {
    let has = |t: &str| names.iter().any(|n| n == t);
    has("ops") && has("meta") && has("lock") && has("txn_outcomes")
}

/// Whether the file's bytes hold every [`SIGNATURES`] entry (read in
/// chunks that overlap by the longest signature).
fn contains_signatures(path: &Path) -> std::io::Result<bool> {
    const CHUNK: usize = 1 << 20;
    let overlap = SIGNATURES.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut file = std::fs::File::open(path)?;
    let mut found = [false; SIGNATURES.len()];
    let mut buf = vec![0u8; CHUNK + overlap];
    let mut kept = 0;
    loop {
        let n = file.read(&mut buf[kept..])?;
        if n == 0 {
            return Ok(false);
        }
        let filled = kept + n;
        for (f, sig) in found.iter_mut().zip(SIGNATURES) {
            *f = *f || buf[..filled].windows(sig.len()).any(|w| w == sig);
        }
        if found.iter().all(|f| *f) {
            return Ok(true);
        }
        kept = overlap.min(filled);
        buf.copy_within(filled - kept..filled, 0);
    }
}
