//! The record of a salvage under way, `<outbox>.salvaging`. A salvage
//! moves the damaged file aside and fills a fresh one in its place; a
//! process killed in between used to leave that partial file where the next
//! open took it for the whole outbox. The record names the moved file and
//! whether the fresh one was created; it is locked (an OS file lock) while
//! its salvage runs and removed when the salvage ends either way. An open
//! that finds it unlocked puts the damaged file back and salvages again; one
//! that finds it locked waits for the salvage to end.
//!
//! Who may remove the record: its salvage, or a process holding its lock
//! that has checked the name still leads to the file it locked. Its salvage
//! moves nothing before it holds the lock on the file the name leads to, so
//! a record is never removed under a live salvage.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::damage::with_suffix;

/// The record's first line; its version says how to read the rest.
const HEADER: &str = "guardian-sync salvage 1\n";
/// The line that names the moved file.
const ASIDE: &str = "aside ";
/// The line written once the fresh file exists.
const FRESH: &str = "fresh\n";
/// A record is a few lines; anything longer is not one of ours.
const MAX_LEN: u64 = 4096;
/// How often to look again while another process salvages.
const POLL: Duration = Duration::from_millis(20);

/// `<outbox>.salvaging`.
pub(crate) fn mark_path(path: &Path) -> PathBuf {
    with_suffix(path, ".salvaging")
}

/// Why a record could not be created, or an interrupted salvage finished.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MarkError {
    /// Another process is salvaging this outbox now.
    #[error("another process is salvaging this outbox")]
    UnderWay,
    /// A file at the record's name is not a record of ours: left alone.
    #[error("{0}")]
    NotOurs(String),
    /// Putting the damaged file back failed; the text says where it is.
    #[error("{0}")]
    Failed(String),
}

/// A salvage's record, held (locked) until [`Mark::finish`].
#[derive(Debug)]
pub(crate) struct Mark {
    file: File,
    path: PathBuf,
}

impl Mark {
    /// Records, before anything is moved, that `path` is about to be moved
    /// to `aside` and salvaged.
    pub(crate) fn begin(path: &Path, aside: &Path) -> Result<Self, MarkError> {
        let mark = mark_path(path);
        let io = |what: &str, e: std::io::Error| {
            MarkError::Failed(format!("cannot {what} {}: {e}", mark.display()))
        };
        let mut file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            // A symlink at the record's name is not a record.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&mark)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(MarkError::UnderWay)
            }
            Err(e) => return Err(io("create", e)),
        };
        match file.try_lock() {
            Ok(()) => {}
            // Another open judged the empty record stale and holds it.
            Err(TryLockError::WouldBlock) => return Err(MarkError::UnderWay),
            Err(TryLockError::Error(e)) => {
                let _ = std::fs::remove_file(&mark);
                return Err(io("lock", e));
            }
        }
        let name = aside
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let written = file
            .write_all(format!("{HEADER}{ASIDE}{name}\n").as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&mark);
            return Err(io("write", e));
        }
        sync_dir(&mark);
        // Before we locked it, another open may have removed the empty
        // record as stale (and may have made its own): then it is not ours.
        if !same_file(&file, &mark) {
            return Err(MarkError::UnderWay);
        }
        Ok(Self { file, path: mark })
    }

    /// Records that the fresh file at the outbox path is the salvage's own:
    /// an interrupted salvage's cleanup may remove it.
    pub(crate) fn fresh_created(&mut self) -> std::io::Result<()> {
        self.file.write_all(FRESH.as_bytes())?;
        self.file.sync_all()
    }

    /// Ends the salvage's record (it succeeded, or was undone).
    pub(crate) fn finish(self) -> std::io::Result<()> {
        std::fs::remove_file(&self.path)?;
        sync_dir(&self.path);
        Ok(())
    }
}

/// True if `path` still names the file `file` has open.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Makes a created or removed name durable; best effort (some file
/// systems cannot sync a directory).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// What a record says.
#[derive(Debug, PartialEq, Eq)]
enum Record {
    /// Cut short before its salvage moved anything.
    Torn,
    /// The damaged file went to `aside`; `fresh` once the fresh file was
    /// created.
    Moved { aside: String, fresh: bool },
}

/// Reads a record, or says why it is not one of ours. `outbox_name` is the
/// outbox file's name: the moved file's name must start with it.
fn parse(text: &[u8], outbox_name: &str) -> Result<Record, String> {
    let not_ours = || "it is not a salvage record of guardian-sync".to_string();
    let text = std::str::from_utf8(text).map_err(|_| not_ours())?;
    let Some(rest) = text.strip_prefix(HEADER) else {
        // The record is written in one call before anything moves: a
        // prefix of it is one cut short by a kill.
        return if HEADER.starts_with(text) {
            Ok(Record::Torn)
        } else {
            Err(not_ours())
        };
    };
    let Some((line, rest)) = rest.split_once('\n') else {
        return if rest.is_empty() || rest.starts_with(ASIDE) || ASIDE.starts_with(rest) {
            Ok(Record::Torn)
        } else {
            Err(not_ours())
        };
    };
    let aside = line.strip_prefix(ASIDE).ok_or_else(not_ours)?;
    let suffix = aside
        .strip_prefix(outbox_name)
        .and_then(|s| s.strip_prefix(".corrupt-"))
        .ok_or_else(not_ours)?;
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return Err(not_ours());
    }
    let fresh = match rest {
        "" => false,
        FRESH => true,
        _ => return Err(not_ours()),
    };
    Ok(Record::Moved {
        aside: aside.to_string(),
        fresh,
    })
}

/// What [`settle`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// No record: no salvage was interrupted.
    Nothing,
    /// A salvage was interrupted; the damaged file is back at the outbox
    /// path (from the moved file named here), anything it had made removed.
    PutBack(PathBuf),
}

/// Before an open for writing: waits (up to `wait`) for a salvage under way
/// in another process to end, and undoes one that was interrupted.
pub(crate) fn settle(path: &Path, wait: Duration) -> Result<Settled, MarkError> {
    let mark = mark_path(path);
    let started = Instant::now();
    let outbox_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    loop {
        let Some(mut file) = open_record(&mark)? else {
            return Ok(Settled::Nothing);
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                if started.elapsed() >= wait {
                    return Err(MarkError::UnderWay);
                }
                std::thread::sleep(POLL);
                continue;
            }
            Err(TryLockError::Error(e)) => {
                return Err(MarkError::Failed(format!(
                    "cannot lock {}: {e}",
                    mark.display()
                )))
            }
        }
        // Its salvage ended and removed it after we opened it: look again.
        if !same_file(&file, &mark) {
            continue;
        }
        let mut text = Vec::new();
        (&mut file)
            .take(MAX_LEN + 1)
            .read_to_end(&mut text)
            .map_err(|e| MarkError::Failed(format!("cannot read {}: {e}", mark.display())))?;
        let record = parse(&text, &outbox_name)
            .map_err(|why| MarkError::NotOurs(format!("{}: {why}", mark.display())))?;
        let settled = match record {
            Record::Torn => Settled::Nothing,
            Record::Moved { aside, fresh } => {
                let aside = path.with_file_name(aside);
                put_back(path, &aside, fresh)?;
                // The killed salvage's working copy, named after the
                // moved file, is ours too.
                for ext in ["", "-wal", "-shm", "-journal"] {
                    let _ = std::fs::remove_file(with_suffix(&aside, &format!(".salvage{ext}")));
                }
                Settled::PutBack(aside)
            }
        };
        std::fs::remove_file(&mark)
            .map_err(|e| MarkError::Failed(format!("cannot remove {}: {e}", mark.display())))?;
        sync_dir(&mark);
        return Ok(settled);
    }
}

/// Opens the record for reading and locking, if there is one; refuses
/// anything at its name that is not a regular file.
fn open_record(mark: &Path) -> Result<Option<File>, MarkError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(mark)
    {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_file() && m.len() <= MAX_LEN => Ok(Some(f)),
            Ok(_) => Err(MarkError::NotOurs(format!(
                "{}: it is not a salvage record of guardian-sync",
                mark.display()
            ))),
            Err(e) => Err(MarkError::Failed(format!(
                "cannot read {}: {e}",
                mark.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(MarkError::NotOurs(format!("{}: {e}", mark.display()))),
    }
}

/// Read-only: is a salvage of `path` under way (true) or interrupted
/// (false)? `None` when there is no record.
pub(crate) fn look(path: &Path) -> Result<Option<bool>, MarkError> {
    let Some(file) = open_record(&mark_path(path))? else {
        return Ok(None);
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(Some(false)),
        Err(TryLockError::WouldBlock) => Ok(Some(true)),
        Err(TryLockError::Error(e)) => Err(MarkError::Failed(format!(
            "cannot lock {}: {e}",
            mark_path(path).display()
        ))),
    }
}

/// Puts the files moved to `aside` back at `path`: the WAL and
/// shared-memory files are moved before the main file, so a main file still
/// at `aside` means every file at `path` is the salvage's (removed only if
/// the record says it created them, or if empty), and a main file not moved
/// means only side files may need to come back.
pub(crate) fn put_back(path: &Path, aside: &Path, fresh: bool) -> Result<(), MarkError> {
    let failed = |e: std::io::Error| {
        MarkError::Failed(format!(
            "cannot put the damaged file back ({e}): it is at {}",
            aside.display()
        ))
    };
    if aside.exists() {
        let at_path = std::fs::symlink_metadata(path).ok();
        // A link made by an earlier, interrupted put-back is not a new file.
        let half_done = at_path
            .as_ref()
            .zip(std::fs::metadata(aside).ok())
            .is_some_and(|(a, b)| a.dev() == b.dev() && a.ino() == b.ino());
        let created = fresh
            || half_done
            || at_path
                .as_ref()
                .is_some_and(|m| m.is_file() && m.len() == 0);
        if at_path.is_some() && !created {
            return Err(MarkError::Failed(format!(
                "another process created {} during an interrupted salvage; the damaged file is at {}",
                path.display(),
                aside.display()
            )));
        }
        super::damage::move_back(path, aside).map_err(failed)?;
    } else {
        for ext in ["-wal", "-shm"] {
            let from = with_suffix(aside, ext);
            if from.exists() {
                super::damage::put_back_one(&from, &with_suffix(path, ext)).map_err(failed)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_read_back_and_anything_else_is_not_ours() {
        let full = format!("{HEADER}{ASIDE}o.db.corrupt-17\n");
        assert_eq!(
            parse(full.as_bytes(), "o.db"),
            Ok(Record::Moved {
                aside: "o.db.corrupt-17".into(),
                fresh: false
            })
        );
        assert_eq!(
            parse(format!("{full}{FRESH}").as_bytes(), "o.db"),
            Ok(Record::Moved {
                aside: "o.db.corrupt-17".into(),
                fresh: true
            })
        );
        for torn in ["", "guardian", HEADER, &format!("{HEADER}as")] {
            assert_eq!(parse(torn.as_bytes(), "o.db"), Ok(Record::Torn), "{torn:?}");
        }
        for other in [
            "hello\n".to_string(),
            format!("{HEADER}aside ../x.corrupt-1\n"),
            format!("{HEADER}aside o.db\n"),
            format!("{HEADER}aside o.db.corrupt-\n"),
            format!("{HEADER}aside o.db.corrupt-1/x\n"),
            format!("{HEADER}aside other.db.corrupt-1\n"),
            format!("{full}more\n"),
        ] {
            assert!(parse(other.as_bytes(), "o.db").is_err(), "{other:?}");
        }
        assert!(parse(&[0xff, 0xfe], "o.db").is_err());
    }
}
