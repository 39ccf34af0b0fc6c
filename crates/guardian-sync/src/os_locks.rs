//! The kernel's table of file locks (`/proc/locks`, Linux): who holds a
//! lock on a file, read without opening the file (a descriptor of this
//! process closed on a file drops this process's POSIX locks on it).

/// A file as the table names it: `major:minor:inode` in hex, hex, decimal,
/// from `st_dev` (glibc's encoding) and `st_ino`.
pub(crate) fn table_id(dev: u64, ino: u64) -> String {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    format!("{major:02x}:{minor:02x}:{ino}")
}

/// Whether a process other than `except` holds a lock of `kind` (`POSIX`,
/// `FLOCK`) on one of `ids`; `None` where the table cannot be read.
pub(crate) fn held(ids: &[String], kind: &str, except: Option<&str>) -> Option<bool> {
    let table = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: POSIX  ADVISORY  READ 4242 fe:00:1234 1073741826 1073742335";
    // a waiter's line has "->" after the number and holds nothing.
    Some(table.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.get(1) == Some(&kind)
            && f.get(5).is_some_and(|id| ids.iter().any(|i| i == id))
            && f.get(4).copied() != except
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock this process holds is found by the file's id and excluded
    /// by its pid.
    #[test]
    fn a_held_flock_is_found_and_its_holder_can_be_excluded() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("l")).unwrap();
        let meta = file.metadata().unwrap();
        let ids = [table_id(meta.dev(), meta.ino())];
        if std::fs::metadata("/proc/locks").is_err() {
            assert_eq!(held(&ids, "FLOCK", None), None);
            return;
        }
        assert_eq!(held(&ids, "FLOCK", None), Some(false));
        file.lock().unwrap();
        assert_eq!(held(&ids, "FLOCK", None), Some(true));
        let me = std::process::id().to_string();
        assert_eq!(held(&ids, "FLOCK", Some(&me)), Some(false));
        assert_eq!(held(&ids, "POSIX", None), Some(false));
    }
}
