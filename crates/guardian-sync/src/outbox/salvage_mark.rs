//! The record of a salvage under way, `<outbox>.salvaging`. A salvage
//! moves the damaged file aside and fills a fresh one in its place; a
//! process killed in between used to leave that partial file where the next
//! open took it for the whole outbox. The record names the moved file and
//! whether the fresh one was created; it is locked (an OS file lock) while
//! its salvage runs and removed when the salvage ends either way. An open
//! that finds it unlocked puts the damaged file back; one that finds it
//! locked waits for the salvage to end.
//!
//! A record appears whole and already locked: it is written, synced and
//! locked under a temporary name, then linked to its name. So a record that
//! can be locked is one whose salvage is gone, and only a holder of its
//! lock, having checked the name still leads to the file it locked, removes
//! it.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::damage::{same_file, same_inode, with_suffix};

/// The record's first line; its version says how to read the rest.
const HEADER: &[u8] = b"guardian-sync salvage 1\n";
/// What every version's first line starts with.
const HEADER_ANY: &[u8] = b"guardian-sync salvage ";
/// The line that names the moved file.
const ASIDE: &[u8] = b"aside ";
/// The line appended once the fresh file exists, with its inode number.
const FRESH: &[u8] = b"fresh ";
/// A record is a few lines; anything longer is not one of ours.
const MAX_LEN: u64 = 8192;
/// How often to look again while another process salvages.
const POLL: Duration = Duration::from_millis(20);
/// A temporary record older than this was left by a killed process (a live
/// one links it within milliseconds).
const STALE_TEMP: Duration = Duration::from_secs(10);

/// `<outbox>.salvaging`.
fn mark_path(path: &Path) -> PathBuf {
    with_suffix(path, ".salvaging")
}

/// Why a record could not be created, or an interrupted salvage settled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MarkError {
    /// Another process is salvaging this outbox now.
    #[error("another process is salvaging this outbox")]
    UnderWay,
    /// A file at the record's name is not a record of ours: left alone.
    #[error("{0}")]
    NotOurs(String),
    /// A record of ours this build cannot read (a newer version's, or
    /// damaged): nothing may open the outbox until someone looks.
    #[error("{0}")]
    Unreadable(String),
    /// A file operation failed; the text says what and where things are.
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
        let name = aside.file_name().unwrap_or_default().as_bytes();
        if name.contains(&b'\n') {
            return Err(MarkError::Failed(format!(
                "cannot record a salvage of {}: its name holds a line break",
                path.display()
            )));
        }
        // Only a salvage makes temporary records: its start is where a
        // killed one's are cleared, not every open's.
        remove_stale_temps(&mark);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let temp = with_suffix(&mark, &format!(".{}-{nanos:020}", std::process::id()));
        let failed = |what: &str, e: std::io::Error| {
            MarkError::Failed(format!("cannot {what} {}: {e}", temp.display()))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .map_err(|e| failed("create", e))?;
        let mut text = HEADER.to_vec();
        text.extend_from_slice(ASIDE);
        text.extend_from_slice(name);
        text.push(b'\n');
        if let Err(e) = file.try_lock() {
            let _ = std::fs::remove_file(&temp);
            return Err(failed("lock", std::io::Error::from(e)));
        }
        if let Err(e) = file.write_all(&text).and_then(|()| file.sync_all()) {
            let _ = std::fs::remove_file(&temp);
            return Err(failed("write", e));
        }
        let linked = match std::fs::hard_link(&temp, &mark) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(MarkError::UnderWay),
            // A file system without links: a rename where nothing is yet.
            Err(_) if std::fs::symlink_metadata(&mark).is_ok() => Err(MarkError::UnderWay),
            Err(_) => std::fs::rename(&temp, &mark).map_err(|e| failed("rename", e)),
        };
        let _ = std::fs::remove_file(&temp);
        linked?;
        sync_dir(&mark);
        Ok(Self { file, path: mark })
    }

    /// Records that the fresh file now at `path` is the salvage's own: an
    /// interrupted salvage's cleanup may remove that file (that inode), and
    /// no other.
    pub(crate) fn fresh_created(&mut self, path: &Path) -> std::io::Result<()> {
        let ino = std::fs::symlink_metadata(path)?.ino();
        let mut line = FRESH.to_vec();
        line.extend_from_slice(ino.to_string().as_bytes());
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_all()
    }

    /// Whether the record is still at its name (no one removed or
    /// replaced it).
    pub(crate) fn intact(&self) -> bool {
        same_file(&self.file, &self.path)
    }

    /// Ends the salvage's record (it succeeded, or was undone). On failure
    /// the record (and its lock) is handed back.
    pub(crate) fn finish(self) -> Result<(), (Self, std::io::Error)> {
        // Someone removed or replaced it: the end it stands for (no record,
        // the fresh file whole) is reached all the same. Undoing instead
        // would remove a fresh file others may have written to since, and
        // a file put at its name is not ours to remove.
        if !self.intact() {
            tracing::warn!(record = %self.path.display(), "the salvage record was removed or replaced by someone else");
            return Ok(());
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            return Err((self, e));
        }
        sync_dir(&self.path);
        Ok(())
    }

    /// [`Mark::finish`], where a failure only leaves a record the next open
    /// settles: logged.
    pub(crate) fn finish_or_log(self) {
        if let Err((mark, e)) = self.finish() {
            tracing::warn!(record = %mark.path.display(), "cannot remove the salvage record: {e}");
        }
    }
}

/// The directory holding `path` (`.` for a bare name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes a created or removed name durable; best effort (some file
/// systems cannot sync a directory).
pub(crate) fn sync_dir(path: &Path) {
    if let Ok(d) = File::open(dir_of(path)) {
        let _ = d.sync_all();
    }
}

/// What a record says: the damaged file went to `aside`; `fresh` is the
/// inode number of the fresh file once it was created (`None` before, or
/// if that line was cut short).
#[derive(Debug, PartialEq, Eq)]
struct Record {
    aside: OsString,
    fresh: Option<u64>,
}

/// Reads a record. `outbox_name` is the outbox file's name: the moved
/// file's name must start with it.
fn parse(text: &[u8], outbox_name: &[u8]) -> Result<Record, MarkError> {
    let unreadable = |why: &str| MarkError::Unreadable(why.to_string());
    let Some(rest) = text.strip_prefix(HEADER) else {
        // A record is linked to its name whole, after it is synced: one
        // cut short is damaged, not an earlier step of a salvage.
        return if text.starts_with(HEADER_ANY) {
            Err(unreadable("a newer version's or a damaged salvage record"))
        } else {
            Err(MarkError::NotOurs(
                "it is not a salvage record of guardian-sync".into(),
            ))
        };
    };
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        return Err(unreadable("a damaged salvage record"));
    };
    let (line, rest) = (&rest[..end], &rest[end + 1..]);
    let aside = line
        .strip_prefix(ASIDE)
        .ok_or_else(|| unreadable("a damaged salvage record"))?;
    let suffix = aside
        .strip_prefix(outbox_name)
        .and_then(|s| s.strip_prefix(b".corrupt-".as_slice()))
        .ok_or_else(|| unreadable("a salvage record naming another file"))?;
    if suffix.is_empty() || !suffix.iter().all(|b| b.is_ascii_digit() || *b == b'-') {
        return Err(unreadable("a salvage record naming another file"));
    }
    // A fresh line cut short names no file: the file at the path is then
    // removed only if it is empty.
    let digits = |d: &[u8]| !d.is_empty() && d.iter().all(u8::is_ascii_digit);
    let fresh = match rest.strip_prefix(FRESH) {
        _ if rest.is_empty() || FRESH.starts_with(rest) => None,
        Some([number @ .., b'\n']) if digits(number) => {
            let number = std::str::from_utf8(number)
                .ok()
                .and_then(|n| n.parse().ok());
            Some(number.ok_or_else(|| unreadable("a damaged salvage record"))?)
        }
        Some(number) if number.iter().all(u8::is_ascii_digit) => None,
        _ => return Err(unreadable("a damaged salvage record")),
    };
    Ok(Record {
        aside: OsString::from_vec(aside.to_vec()),
        fresh,
    })
}

impl MarkError {
    /// As an open's error about the outbox at `path`.
    pub(crate) fn at_open(self, path: &Path) -> super::OpenError {
        let path = path.to_path_buf();
        match self {
            Self::UnderWay => super::OpenError::SalvageUnderWay { path },
            Self::NotOurs(reason) | Self::Unreadable(reason) | Self::Failed(reason) => {
                super::OpenError::SalvageFailed { path, reason }
            }
        }
    }
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
    let outbox_name = path.file_name().unwrap_or_default().as_bytes();
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
        let text = read_record(&mut file, &mark)?;
        let Record { aside, fresh } = parse(&text, outbox_name).map_err(|e| at(&mark, e))?;
        let aside = path.with_file_name(aside);
        put_back(path, &aside, fresh).map_err(|e| at(&mark, e))?;
        // The killed salvage's working copy and unlinked fresh file, named
        // after the moved file, are ours too.
        super::damage::remove_salvage_files(&aside, fresh);
        std::fs::remove_file(&mark)
            .map_err(|e| MarkError::Failed(format!("cannot remove {}: {e}", mark.display())))?;
        sync_dir(&mark);
        return Ok(Settled::PutBack(aside));
    }
}

/// Names the record in an error about it.
fn at(mark: &Path, e: MarkError) -> MarkError {
    match e {
        MarkError::NotOurs(why) => MarkError::NotOurs(format!("{}: {why}", mark.display())),
        MarkError::Unreadable(why) => MarkError::Unreadable(format!(
            "{} is {why}; nothing was opened or changed (look at it, and at the outbox's .corrupt- files, before removing it)",
            mark.display()
        )),
        other => other,
    }
}

fn read_record(file: &mut File, mark: &Path) -> Result<Vec<u8>, MarkError> {
    let mut text = Vec::new();
    file.take(MAX_LEN + 1)
        .read_to_end(&mut text)
        .map_err(|e| MarkError::Failed(format!("cannot read {}: {e}", mark.display())))?;
    Ok(text)
}

/// Removes temporary records (`<record>.<pid>-<ns>`, the nanoseconds in 20
/// digits, mode 0600) a killed process left before linking them: unlocked,
/// and older than any live one. A name of another form (a date, a user's
/// notes) is not ours.
fn remove_stale_temps(mark: &Path) {
    let Some(name) = mark.file_name() else {
        return;
    };
    let dir = dir_of(mark);
    let mut prefix = name.as_bytes().to_vec();
    prefix.push(b'.');
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let entry_name = entry.file_name();
        let Some(tail) = entry_name.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        // Exactly `<pid>-<ns>`, as `Mark::begin` names them.
        let digits = |n: &[u8]| n.iter().all(u8::is_ascii_digit);
        match tail.iter().position(|&b| b == b'-') {
            Some(i)
                if (1..=10).contains(&i)
                    && digits(&tail[..i])
                    && tail.len() - i - 1 == 20
                    && digits(&tail[i + 1..]) => {}
            _ => continue,
        }
        let temp = entry.path();
        let Ok(mut file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&temp)
        else {
            continue;
        };
        // Empty (killed before writing) or a record: nothing else is ours.
        let mut head = Vec::new();
        let ours = (&mut file)
            .take(HEADER.len() as u64)
            .read_to_end(&mut head)
            .is_ok()
            && (head.is_empty() || head == HEADER);
        if !ours {
            continue;
        }
        let old = file
            .metadata()
            .ok()
            .filter(|m| m.is_file() && m.permissions().mode() & 0o7777 == 0o600)
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP);
        if old && file.try_lock().is_ok() && same_file(&file, &temp) {
            let _ = std::fs::remove_file(&temp);
        }
    }
}

/// Opens the record for reading and locking, if there is one; refuses
/// anything at its name that is not a regular file.
fn open_record(mark: &Path) -> Result<Option<File>, MarkError> {
    let not_ours = || {
        MarkError::NotOurs(format!(
            "{}: it is not a salvage record of guardian-sync",
            mark.display()
        ))
    };
    match OpenOptions::new()
        .read(true)
        // A symlink at the record's name is not a record, and a FIFO there
        // must not block the open.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(mark)
    {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_file() && m.len() <= MAX_LEN => Ok(Some(f)),
            Ok(_) => Err(not_ours()),
            Err(e) => Err(MarkError::Failed(format!(
                "cannot read {}: {e}",
                mark.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(_) => Err(not_ours()),
    }
}

/// What a read-only open finds at the record's name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Look {
    /// No record of ours.
    Clear,
    /// A salvage runs now.
    UnderWay,
    /// A salvage was killed; an open for writing settles it.
    Interrupted,
}

/// Read-only: is a salvage of `path` under way or interrupted? Changes
/// nothing. A record this build cannot read is an error.
pub(crate) fn look(path: &Path) -> Result<Look, MarkError> {
    let mark = mark_path(path);
    let mut file = match open_record(&mark) {
        Ok(Some(f)) => f,
        Ok(None) | Err(MarkError::NotOurs(_)) => return Ok(Look::Clear),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(Look::UnderWay),
        Err(TryLockError::Error(e)) => {
            return Err(MarkError::Failed(format!(
                "cannot lock {}: {e}",
                mark.display()
            )))
        }
    }
    let text = read_record(&mut file, &mark)?;
    match parse(&text, path.file_name().unwrap_or_default().as_bytes()) {
        Err(MarkError::NotOurs(_)) => Ok(Look::Clear),
        Ok(Record { aside, .. }) => {
            moved_outbox(&path.with_file_name(aside)).map_err(|e| at(&mark, e))?;
            Ok(Look::Interrupted)
        }
        Err(e) => Err(at(&mark, e)),
    }
}

/// Only an outbox file goes back in the outbox's place: a record naming
/// another file was not written by a salvage.
fn moved_outbox(aside: &Path) -> Result<(), MarkError> {
    match super::ident::classify(aside) {
        Ok(super::ident::Identity::Ours | super::ident::Identity::Missing) => Ok(()),
        _ => Err(MarkError::Unreadable(format!(
            "a salvage record naming {}, which is not a moved outbox file",
            aside.display()
        ))),
    }
}

/// Puts the files moved to `aside` back at `path`. [`damage::move_aside`]
/// moves the side files before the main file, and
/// [`damage::move_back`] removes everything at `path` and then puts the
/// main file back before the side files. So a main file still at `aside`
/// means every file at `path` is the salvage's (removed only if the record
/// names its inode, or if empty, or if it is a link to the moved file
/// itself), and a main file not at `aside` means only side files still at
/// `aside` need to come back.
///
/// [`damage::move_aside`]: super::damage::move_aside
/// [`damage::move_back`]: super::damage::move_back
pub(crate) fn put_back(path: &Path, aside: &Path, fresh: Option<u64>) -> Result<(), MarkError> {
    let failed = |e: std::io::Error| {
        MarkError::Failed(format!(
            "cannot put the damaged file back ({e}): it is at {}",
            aside.display()
        ))
    };
    if std::fs::symlink_metadata(aside).is_ok() {
        moved_outbox(aside)?;
        let at_path = std::fs::symlink_metadata(path).ok();
        // A link made by an earlier, interrupted put-back is not a new file.
        let half_done = same_inode(path, aside);
        let created = half_done
            || at_path
                .as_ref()
                .is_some_and(|m| fresh == Some(m.ino()) || (m.is_file() && m.len() == 0));
        if at_path.is_some() && !created {
            return Err(MarkError::Failed(format!(
                "a salvage was interrupted and another process then created {}; move that file away and open again to put the damaged file ({}) back",
                path.display(),
                aside.display()
            )));
        }
        super::damage::move_back(path, aside).map_err(failed)?;
    } else {
        for ext in ["-wal", "-shm"] {
            let from = with_suffix(aside, ext);
            if std::fs::symlink_metadata(&from).is_ok() {
                super::damage::put_back_one(&from, &with_suffix(path, ext)).map_err(failed)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(lines: &[&[u8]]) -> Vec<u8> {
        lines.concat()
    }

    /// What a kill left, made from the damaged file and its WAL.
    type Kill = fn(&Path, &Path);

    fn wal(p: &Path) -> PathBuf {
        with_suffix(p, "-wal")
    }

    /// Only a killed salvage's own temporary record is cleared: a name of
    /// another form (a date, a user's notes, even with a record's first
    /// line) or another mode is not ours. A date-like name used to pass.
    #[test]
    fn only_temporary_records_of_the_exact_form_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let mark = mark_path(&dir.path().join("o.db"));
        let old = SystemTime::now() - Duration::from_secs(3600);
        let ours = format!("{}.4242-{:020}", mark.display(), 17_u64);
        let make = |name: &str, text: &[u8], mode: u32| {
            std::fs::write(name, text).unwrap();
            let f = std::fs::File::options().write(true).open(name).unwrap();
            f.set_modified(old).unwrap();
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .unwrap();
        };
        make(&ours, b"", 0o600);
        let keep = [
            format!("{}.2024-01", mark.display()),
            format!("{}.20240101-1200", mark.display()),
            format!("{}.4242-{:020}", mark.display(), 18_u64),
            format!("{}.4242-{:019}", mark.display(), 19_u64),
        ];
        make(&keep[0], b"", 0o600);
        make(&keep[1], &record(&[HEADER, b"my notes, keep!\n"]), 0o600);
        make(&keep[2], b"", 0o644);
        make(&keep[3], b"", 0o600);
        remove_stale_temps(&mark);
        assert!(!Path::new(&ours).exists(), "a killed salvage's temp stays");
        for k in &keep {
            assert!(Path::new(k).exists(), "{k} was removed");
        }
    }

    #[test]
    fn a_record_is_read_back_and_anything_else_is_not_ours() {
        let full = record(&[HEADER, b"aside o.db.corrupt-17\n"]);
        let moved = |fresh| Record {
            aside: "o.db.corrupt-17".into(),
            fresh,
        };
        let o = b"o.db".to_vec();
        assert_eq!(parse(&full, &o).ok(), Some(moved(None)));
        assert_eq!(
            parse(&record(&[&full, b"fresh 42\n"]), &o).ok(),
            Some(moved(Some(42)))
        );
        // Cut short: names no file.
        for tail in [&b"fr"[..], b"f", b"fresh ", b"fresh 4"] {
            assert_eq!(parse(&record(&[&full, tail]), &o).ok(), Some(moved(None)));
        }
        for foreign in [&b""[..], b"guardian", b"hello\n", &[0xff, 0xfe]] {
            assert!(
                matches!(parse(foreign, &o), Err(MarkError::NotOurs(_))),
                "{foreign:?}"
            );
        }
        for unreadable in [
            record(&[b"guardian-sync salvage 2\n", b"aside o.db.corrupt-1\n"]),
            record(&[HEADER, b"aside ../x.corrupt-1\n"]),
            record(&[HEADER, b"aside o.db\n"]),
            record(&[HEADER, b"aside o.db.corrupt-\n"]),
            record(&[HEADER, b"aside o.db.corrupt-1/x\n"]),
            record(&[HEADER, b"aside other.db.corrupt-1\n"]),
            record(&[HEADER, b"nonsense\n"]),
            HEADER.to_vec(),
            record(&[HEADER, b"aside o.db.corr"]),
            record(&[&full, b"more\n"]),
            record(&[&full, b"fresh \n"]),
            record(&[&full, b"fresh x\n"]),
            record(&[&full, b"fresh 1\nfresh 2\n"]),
            record(&[&full, b"\0\0\0"]),
        ] {
            assert!(
                matches!(parse(&unreadable, &o), Err(MarkError::Unreadable(_))),
                "{unreadable:?}"
            );
        }
        // Names are bytes: not UTF-8 is fine.
        let odd = b"o\xff.db".to_vec();
        let text = record(&[HEADER, b"aside o\xff.db.corrupt-5\n"]);
        assert_eq!(
            parse(&text, &odd).ok(),
            Some(Record {
                aside: OsString::from_vec(b"o\xff.db.corrupt-5".to_vec()),
                fresh: None
            })
        );
    }

    /// The states a kill can leave, built by hand: settling each puts the
    /// damaged file and its WAL back, byte for byte, and removes what the
    /// salvage made.
    #[test]
    fn every_state_a_kill_leaves_settles_to_the_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let aside = dir.path().join("o.db.corrupt-9");
        let write = |p: &Path, b: &[u8]| std::fs::write(p, b).unwrap();
        let read = |p: &Path| std::fs::read(p).ok();
        let filling = |a: &Path| super::super::damage::filling_path(a);
        let cases: [(&str, Kill); 8] = [
            // Killed during move_aside: the WAL moved, the main file not.
            ("wal moved", |p, a| {
                std::fs::rename(wal(p), wal(a)).unwrap();
            }),
            // Killed while filling the fresh file under its own name.
            ("filling", |p, a| {
                std::fs::rename(wal(p), wal(a)).unwrap();
                std::fs::rename(p, a).unwrap();
                let f = super::super::damage::filling_path(a);
                std::fs::write(&f, b"fresh").unwrap();
                std::fs::write(wal(&f), b"fresh wal").unwrap();
            }),
            // Killed between linking the filled file into place and
            // removing its own name.
            ("fresh linked", |p, a| {
                std::fs::rename(wal(p), wal(a)).unwrap();
                std::fs::rename(p, a).unwrap();
                let f = super::super::damage::filling_path(a);
                std::fs::write(&f, b"fresh").unwrap();
                std::fs::hard_link(&f, p).unwrap();
            }),
            // Killed after the fresh file was linked into place (or, before
            // fresh files were filled under their own name, while filling).
            ("linked", |p, a| {
                std::fs::rename(wal(p), wal(a)).unwrap();
                std::fs::rename(p, a).unwrap();
                std::fs::write(p, b"fresh").unwrap();
                std::fs::write(wal(p), b"fresh wal").unwrap();
            }),
            // Killed in move_back after the fresh files were removed.
            ("fresh removed", |p, a| {
                std::fs::rename(wal(p), wal(a)).unwrap();
                std::fs::rename(p, a).unwrap();
            }),
            // Killed in move_back between linking the main file and
            // removing its moved name.
            ("main linked", |p, a| {
                std::fs::rename(wal(p), wal(a)).unwrap();
                std::fs::rename(p, a).unwrap();
                std::fs::hard_link(a, p).unwrap();
            }),
            // Killed between linking the WAL back and removing its moved
            // name.
            ("wal linked", |p, a| {
                std::fs::rename(wal(p), wal(a)).unwrap();
                std::fs::hard_link(wal(a), wal(p)).unwrap();
            }),
            // Killed in move_back after the main file, before the WAL.
            ("main back", |p, a| {
                std::fs::rename(wal(p), wal(a)).unwrap();
            }),
        ];
        // Damaged past SQLite's reading (no header), still an outbox by its
        // page layout and statements (see `ident::classify`).
        let mut damaged = vec![0u8; 1024];
        damaged[100] = 0x0D;
        let text = b"CREATE TABLE txn_outcomes; idempotency_key  TEXT";
        damaged[200..200 + text.len()].copy_from_slice(text);
        let damaged = damaged.as_slice();
        for (name, kill) in cases {
            write(&path, damaged);
            write(&wal(&path), b"damaged wal");
            kill(&path, &aside);
            // The record names the fresh file where there is one.
            let mut rec = record(&[HEADER, b"aside o.db.corrupt-9\n"]);
            if aside.exists() {
                let fresh = std::fs::symlink_metadata(&path)
                    .or_else(|_| std::fs::symlink_metadata(filling(&aside)));
                if let Ok(m) = fresh {
                    rec.extend_from_slice(format!("fresh {}\n", m.ino()).as_bytes());
                }
            }
            write(&mark_path(&path), &rec);
            assert_eq!(
                settle(&path, Duration::ZERO).ok(),
                Some(Settled::PutBack(aside.clone())),
                "{name}"
            );
            assert_eq!(read(&path).as_deref(), Some(damaged), "{name}");
            assert_eq!(
                read(&wal(&path)).as_deref(),
                Some(&b"damaged wal"[..]),
                "{name}"
            );
            let made = [filling(&aside), wal(&filling(&aside))];
            for gone in [aside.clone(), wal(&aside), mark_path(&path)]
                .into_iter()
                .chain(made)
            {
                assert!(read(&gone).is_none(), "{name}: {gone:?} is left");
            }
        }
    }

    /// A record (planted, or restored from a backup) whose fresh file is
    /// not the file at the path never removes that file.
    #[test]
    fn a_record_never_removes_a_file_it_did_not_create() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let mut outbox = vec![0u8; 1024];
        outbox[100] = 0x0D;
        let text = b"CREATE TABLE txn_outcomes; idempotency_key  TEXT";
        outbox[200..200 + text.len()].copy_from_slice(text);
        std::fs::write(&path, &outbox).unwrap();
        std::fs::write(dir.path().join("o.db.corrupt-5"), &outbox).unwrap();
        let other = std::fs::symlink_metadata(&path).unwrap().ino() + 1;
        let rec = format!("guardian-sync salvage 1\naside o.db.corrupt-5\nfresh {other}\n");
        std::fs::write(mark_path(&path), rec).unwrap();
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(
            settle(&path, Duration::ZERO),
            Err(MarkError::Failed(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(dir.path().join("o.db.corrupt-5").exists());
        // Nor a file at the fresh file's own name that it did not create.
        std::fs::remove_file(&path).unwrap();
        let theirs = dir.path().join("o.db.corrupt-5.fresh");
        std::fs::write(&theirs, b"theirs").unwrap();
        std::fs::write(wal(&theirs), b"their wal").unwrap();
        let other = std::fs::symlink_metadata(&theirs).unwrap().ino() + 1;
        let rec = format!("guardian-sync salvage 1\naside o.db.corrupt-5\nfresh {other}\n");
        std::fs::write(mark_path(&path), rec).unwrap();
        assert_eq!(
            settle(&path, Duration::ZERO).ok(),
            Some(Settled::PutBack(dir.path().join("o.db.corrupt-5")))
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(std::fs::read(&theirs).unwrap(), b"theirs");
        assert_eq!(std::fs::read(wal(&theirs)).unwrap(), b"their wal");
    }

    /// A salvage killed between creating its fresh file and recording it
    /// leaves an empty private file: removed; anything else there stays.
    #[test]
    fn an_unrecorded_fresh_file_is_removed_only_if_empty_and_private() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let aside = dir.path().join("o.db.corrupt-7");
        let fresh = super::super::damage::filling_path(&aside);
        let mut outbox = vec![0u8; 1024];
        outbox[100] = 0x0D;
        let text = b"CREATE TABLE txn_outcomes; idempotency_key  TEXT";
        outbox[200..200 + text.len()].copy_from_slice(text);
        let cases: [(&[u8], u32, bool); 3] = [
            (b"", 0o600, true),
            (b"", 0o644, false),
            (b"x", 0o600, false),
        ];
        for (bytes, mode, removed) in cases {
            std::fs::write(&aside, &outbox).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&fresh)
                .unwrap();
            std::fs::write(&fresh, bytes).unwrap();
            let rec = "guardian-sync salvage 1\naside o.db.corrupt-7\n";
            std::fs::write(mark_path(&path), rec).unwrap();
            assert_eq!(
                settle(&path, Duration::ZERO).ok(),
                Some(Settled::PutBack(aside.clone()))
            );
            assert_eq!(fresh.exists(), !removed, "{bytes:?} {mode:o}");
            let _ = std::fs::remove_file(&fresh);
            std::fs::remove_file(&path).unwrap();
        }
    }

    /// A record someone removed or replaced while the salvage ran ends it
    /// all the same, and a file put at its name stays: the salvage used to
    /// undo itself on a removed record, removing a fresh file that another
    /// open, finding no record, had written an op to, and to remove what
    /// was put there.
    #[test]
    fn a_record_removed_or_replaced_by_someone_else_ends_the_salvage() {
        for replace in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("o.db");
            std::fs::write(&path, b"fresh").unwrap();
            let mark = Mark::begin(&path, &dir.path().join("o.db.corrupt-1")).unwrap();
            std::fs::remove_file(mark_path(&path)).unwrap();
            if replace {
                std::fs::write(mark_path(&path), b"my notes").unwrap();
            }
            mark.finish().map_err(|(_, e)| e).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"fresh");
            if replace {
                assert_eq!(std::fs::read(mark_path(&path)).unwrap(), b"my notes");
            } else {
                assert_eq!(settle(&path, Duration::ZERO).ok(), Some(Settled::Nothing));
            }
        }
    }

    /// A record locked by a live salvage is waited for, then reported;
    /// never removed.
    #[test]
    fn a_live_salvage_is_waited_for_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        std::fs::write(&path, b"damaged").unwrap();
        let aside = dir.path().join("o.db.corrupt-1");
        let mark = Mark::begin(&path, &aside).unwrap();
        assert!(matches!(
            settle(&path, Duration::from_millis(50)),
            Err(MarkError::UnderWay)
        ));
        assert_eq!(look(&path).ok(), Some(Look::UnderWay));
        assert!(matches!(
            Mark::begin(&path, &aside),
            Err(MarkError::UnderWay)
        ));
        mark.finish().map_err(|(_, e)| e).unwrap();
        assert_eq!(settle(&path, Duration::ZERO).ok(), Some(Settled::Nothing));
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.map(|e| e.file_name()))
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
