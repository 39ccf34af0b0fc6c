//! SQLite file handling shared by the outbox (`guardian-sync`) and the
//! reference server's store (`guardian-server`): both keep their data in a
//! SQLite file in WAL mode and commit at `synchronous=FULL`.

pub mod wal_prefill;

use std::path::Path;

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
