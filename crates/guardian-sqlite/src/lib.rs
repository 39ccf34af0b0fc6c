//! SQLite file handling shared by the outbox (`guardian-sync`) and the
//! reference server's store (`guardian-server`): both keep their data in a
//! SQLite file in WAL mode and commit at `synchronous=FULL`.

pub mod wal_prefill;

/// `PRAGMA application_id` of an outbox file ("GSOB").
pub const OUTBOX_APPLICATION_ID: u32 = 0x4753_4F42;

/// `PRAGMA application_id` of a reference server's database file ("GSRV").
pub const SERVER_APPLICATION_ID: u32 = 0x4753_5256;

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

/// Creates the database file with mode 0600 if it does not exist, so the
/// `-wal` and `-shm` files SQLite creates beside it inherit that mode (a
/// database holds payloads: no other user may read it). Returns true if it
/// was created. An existing file is left as it is.
pub fn create_private(path: &Path) -> std::io::Result<bool> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// A `file:` URI for `path`, every byte outside the unreserved set escaped.
fn uri(path: &Path, query: &str) -> String {
    #[cfg(unix)]
    let bytes = {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let bytes = path.to_string_lossy().into_owned().into_bytes();
    let mut s = String::from("file:");
    for b in bytes {
        if b.is_ascii_alphanumeric() || b"/._-~".contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.push('?');
    s.push_str(query);
    s
}

/// Opens the database at `path` for reading without creating or changing
/// any file, so that a file can be looked at before anything is known of
/// it. SQLite's read-only mode still creates the `-wal` and `-shm` files
/// of a WAL database and leaves them behind, so when no `-wal` exists (no
/// connection is open, and the file holds every commit) the file is opened
/// `immutable`: read directly, without locks or side files. When a `-wal`
/// exists it is opened read-only through it and sees the latest commits; a
/// read-only connection never checkpoints. Only a regular file beside a
/// database in WAL mode counts as its WAL: SQLite would otherwise take a
/// FIFO for one (and wait on it), or delete a WAL beside an empty file.
pub fn connect_read_only(path: &Path) -> rusqlite::Result<Connection> {
    // The WAL is named after the resolved path (a symlink's target).
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let query = if live_wal(&resolved).is_some() {
        "mode=ro"
    } else {
        "mode=ro&immutable=1"
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    Connection::open_with_flags(uri(path, query), flags)
}

/// The WAL SQLite reads for the database at `path` (already resolved), with
/// its size: a regular file named after it, beside a database whose header
/// says WAL mode. Anything else (a FIFO, a WAL beside a rollback-journal
/// or empty file) SQLite would wait on or delete; it is not read.
pub fn live_wal(path: &Path) -> Option<(std::path::PathBuf, u64)> {
    let wal = wal_prefill::wal_path(path);
    let size = std::fs::metadata(&wal)
        .ok()
        .filter(std::fs::Metadata::is_file)?
        .len();
    in_wal_mode(path).then_some((wal, size))
}

/// Whether the database file's header says WAL mode (bytes 18 and 19 are
/// 2); false for a file without a header.
fn in_wal_mode(path: &Path) -> bool {
    use std::io::Read;
    let mut header = Vec::with_capacity(20);
    std::fs::File::open(path)
        .and_then(|f| f.take(20).read_to_end(&mut header))
        .is_ok_and(|_| header.get(18..20) == Some(&[2, 2][..]))
}
