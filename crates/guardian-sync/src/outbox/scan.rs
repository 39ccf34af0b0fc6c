//! A read-only decoder of the SQLite file format, for salvage only: it finds
//! op rows in table b-tree leaf pages without SQLite's schema, so a
//! damaged `sqlite_master` page, or a WAL whose later commits SQLite ignores
//! after a damaged frame, costs no op whose row still decodes.
//!
//! It follows <https://www.sqlite.org/fileformat2.html>. Every offset,
//! varint, length and overflow chain is bounded: no byte pattern panics it.
//!
//! Which page images it reads (see docs/design/outbox.md, "Salvage without
//! the schema"): for each page number, the newest image among the database
//! file and the WAL frames of the WAL's current generation (its header's
//! salts) up to its last intact commit; pages on the freelist and past the
//! database size are skipped, so rows of acknowledged (deleted) ops that
//! only survive in freed pages or in older images of a page are not read.

use std::collections::{HashMap, HashSet};

use rusqlite::types::Value as SqlValue;

/// The magic numbers of a WAL header (checksums big- or little-endian).
const WAL_MAGIC_BE: u32 = 0x377f_0683;
const WAL_MAGIC_LE: u32 = 0x377f_0682;

/// One op row found by the scan, as the values of `damage::OP_COPY_COLUMNS`
/// followed by its checksum.
#[derive(Debug, Clone)]
pub(crate) struct FoundRow {
    /// The values to copy.
    pub values: Vec<SqlValue>,
    /// The row came from a WAL frame SQLite itself does not read (after a
    /// damaged frame): it is newer than what SQLite shows of the file.
    pub past_break: bool,
}

/// What the scan found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Op rows, at most one per op id (the newest image's).
    pub rows: Vec<FoundRow>,
    /// Table leaf pages decoded.
    pub leaf_pages: u64,
    /// Cells that did not decode (a damaged cell or overflow chain).
    pub bad_cells: u64,
    /// The first WAL frame (1-based) whose checksum fails while an intact
    /// commit follows it, if any.
    pub wal_break: Option<usize>,
    /// The largest rowid of an op row seen: positions the old file used.
    pub max_rowid: i64,
    /// The lock row (id, owner, epoch, heartbeat, beat_at), the one with
    /// the highest epoch if several are found.
    pub lock: Option<Vec<SqlValue>>,
    /// The largest value found in the `ops_seq_mark` row (`deleted_max`,
    /// `bound`): positions the old file may have used.
    pub seq_mark: i64,
    /// No page image read is known to be damaged: no cell failed to decode
    /// and no page's newest image is a damaged WAL frame. Then the rows
    /// found are all the rows of the newest state, and an op missing from
    /// them was deleted.
    pub complete: bool,
}

/// One WAL frame.
#[derive(Debug, Clone, Copy)]
struct Frame {
    pgno: u32,
    commit_size: u32,
    /// Its stored checksum matches its contents, seeded with the stored
    /// checksum of the frame before it (so a damaged frame does not make
    /// every later one look damaged).
    intact: bool,
    /// Where its page image starts in the WAL.
    page_at: usize,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

/// A WAL's page size and frames of the current generation (frames whose
/// salts match the header's; older ones are left over from before the last
/// restart and are not part of the database).
struct Wal {
    page_size: u32,
    frames: Vec<Frame>,
    /// SQLite accepts the header. If not, it ignores the whole WAL.
    header_ok: bool,
}

/// Reads a WAL's frames. A WAL whose header SQLite refuses (magic,
/// version, page size or header checksum) is ignored by SQLite as a whole:
/// its frames are then read by the first frame's salts, with
/// `db_page_size` (the database header's), in the byte order and from the
/// first frame's seed (the stored header checksum, or the one its bytes
/// give) that verify the most frames.
fn wal_frames(wal: &[u8], db_page_size: u32) -> Option<Wal> {
    let magic = be32(wal, 0)?;
    let page_size = be32(wal, 8)?;
    let header_ok = matches!(magic, WAL_MAGIC_BE | WAL_MAGIC_LE)
        && be32(wal, 4) == Some(WAL_VERSION)
        && valid_page_size(page_size)
        && {
            let big_endian = magic == WAL_MAGIC_BE;
            let header = wal.get(0..24)?;
            Some(checksum(big_endian, (0, 0), [header, &[]])) == be32(wal, 24).zip(be32(wal, 28))
        };
    if header_ok {
        let salts = wal.get(16..24)?;
        let seed = (be32(wal, 24)?, be32(wal, 28)?);
        let frames = frames_of(wal, page_size, magic == WAL_MAGIC_BE, salts, seed);
        return Some(Wal {
            page_size,
            frames,
            header_ok: true,
        });
    }
    let salts = wal.get(40..48)?;
    let stored = (be32(wal, 24)?, be32(wal, 28)?);
    let header = wal.get(0..24)?;
    let mut best: Option<Vec<Frame>> = None;
    let intact = |f: &[Frame]| f.iter().filter(|f| f.intact).count();
    for big in [true, false] {
        for seed in [stored, checksum(big, (0, 0), [header, &[]])] {
            let frames = frames_of(wal, db_page_size, big, salts, seed);
            if best.as_deref().is_none_or(|b| intact(&frames) > intact(b)) {
                best = Some(frames);
            }
        }
    }
    Some(Wal {
        page_size: db_page_size,
        frames: best.unwrap_or_default(),
        header_ok: false,
    })
}

/// The WAL format version SQLite writes.
const WAL_VERSION: u32 = 3_007_000;

fn valid_page_size(p: u32) -> bool {
    (512..=65_536).contains(&p) && p.is_power_of_two()
}

/// SQLite's WAL checksum over `parts` (each a multiple of 8 bytes long),
/// continuing from `seed`, reading words big- or little-endian.
fn checksum(big_endian: bool, seed: (u32, u32), parts: [&[u8]; 2]) -> (u32, u32) {
    let word = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    };
    let (mut s0, mut s1) = seed;
    for part in parts {
        for pair in part.chunks_exact(8) {
            s0 = s0.wrapping_add(word(&pair[0..4])).wrapping_add(s1);
            s1 = s1.wrapping_add(word(&pair[4..8])).wrapping_add(s0);
        }
    }
    (s0, s1)
}

/// The frames carrying `salts`, each checked against the stored checksum
/// of the frame before it (the first against `seed`).
fn frames_of(
    wal: &[u8],
    page_size: u32,
    big_endian: bool,
    salts: &[u8],
    mut seed: (u32, u32),
) -> Vec<Frame> {
    let frame_len = 24 + page_size as usize;
    let mut frames = Vec::new();
    let mut at = 32usize;
    while let Some(frame) = wal.get(at..at.saturating_add(frame_len)) {
        if frame.len() < frame_len {
            break;
        }
        let (h, page) = frame.split_at(24);
        let word = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        if &h[8..16] == salts {
            let stored = (word(16), word(20));
            frames.push(Frame {
                pgno: word(0),
                commit_size: word(4),
                intact: checksum(big_endian, seed, [&h[0..8], page]) == stored,
                page_at: at + 24,
            });
            seed = stored;
        }
        at += frame_len;
    }
    frames
}

/// The committed frames: up to the last intact commit frame; and the first
/// frame SQLite does not read before it, if any (the first damaged frame,
/// or the first frame when SQLite refuses the header): SQLite ignores every
/// frame from there.
fn committed(wal: &Wal) -> (&[Frame], Option<usize>) {
    let frames = &wal.frames;
    let Some(last) = frames.iter().rposition(|f| f.intact && f.commit_size > 0) else {
        return (&[], None);
    };
    let frames = &frames[..=last];
    let first_unread = if wal.header_ok {
        frames.iter().position(|f| !f.intact)
    } else {
        Some(0)
    };
    (frames, first_unread)
}

/// Whether the WAL holds a damaged frame followed by an intact commit:
/// SQLite stops at the damaged frame and ignores every later commit
/// without an error. A torn tail after a crash, with no commit after it,
/// is not damage. The caller must hold the database's write lock (or own
/// the file), or a frame being written is misread as damage.
pub(crate) fn wal_break(wal: &[u8], db_page_size: u32) -> Option<String> {
    let wal = wal_frames(wal, db_page_size)?;
    let (_, bad) = committed(&wal);
    bad.map(|i| {
        if wal.header_ok {
            format!(
                "WAL frame {} is damaged; SQLite ignores the commits after it",
                i + 1
            )
        } else {
            "the WAL header is damaged; SQLite ignores every commit in the WAL".to_owned()
        }
    })
}

/// The page size in a database header (the first bytes of the file), or
/// SQLite's default when it is damaged.
pub(crate) fn db_page_size(header: &[u8]) -> u32 {
    match be16(header, 16).map(|p| if p == 1 { 65_536 } else { u32::from(p) }) {
        Some(p) if valid_page_size(p) => p,
        _ => 4096,
    }
}

/// A page image and whether it comes from past a WAL break.
#[derive(Clone, Copy)]
struct Image<'a> {
    data: &'a [u8],
    past_break: bool,
}

/// The newest image of every page (see the module comment).
struct Pages<'a> {
    images: HashMap<u32, Image<'a>>,
    /// Usable size of a page (its size less the reserved bytes).
    usable: usize,
    /// Pages in the database.
    count: u32,
    /// Some page's newest image is a WAL frame whose checksum fails.
    damaged_image: bool,
}

impl<'a> Pages<'a> {
    fn new(db: &'a [u8], wal: Option<&'a [u8]>, wal_break: &mut Option<usize>) -> Self {
        let db_page_size = db_page_size(db);
        let wal = wal.and_then(|w| wal_frames(w, db_page_size).map(|parsed| (w, parsed)));
        // An intact WAL header's page size is the database's; a damaged
        // database header's is not.
        let page_size = wal.as_ref().map_or(db_page_size, |(_, w)| w.page_size) as usize;
        let reserved = db.get(20).map_or(0, |r| usize::from(*r));
        let usable = if page_size - reserved >= 480 {
            page_size - reserved
        } else {
            page_size
        };
        let mut images = HashMap::new();
        let file_pages = u32::try_from(db.len() / page_size).unwrap_or(u32::MAX);
        for n in 0..file_pages {
            let at = n as usize * page_size;
            if let Some(data) = db.get(at..at + page_size) {
                images.insert(
                    n + 1,
                    Image {
                        data,
                        past_break: false,
                    },
                );
            }
        }
        let mut count = file_pages;
        let mut damaged = HashMap::new();
        if let Some((bytes, parsed)) = &wal {
            let (frames, bad) = committed(parsed);
            *wal_break = bad;
            for (i, f) in frames.iter().enumerate() {
                let Some(data) = bytes.get(f.page_at..f.page_at + page_size) else {
                    continue;
                };
                if f.pgno == 0 {
                    continue;
                }
                damaged.insert(f.pgno, !f.intact);
                images.insert(
                    f.pgno,
                    Image {
                        data,
                        past_break: bad.is_some_and(|b| i >= b),
                    },
                );
            }
            if let Some(last) = frames.last() {
                count = last.commit_size;
            }
        }
        // Pages past the database's size were truncated away.
        images.retain(|&n, _| n <= count);
        let damaged_image = damaged
            .iter()
            .any(|(n, bad)| *bad && images.contains_key(n));
        let mut pages = Pages {
            images,
            usable,
            count,
            damaged_image,
        };
        pages.drop_freelist();
        pages
    }

    fn page(&self, n: u32) -> Option<&'a [u8]> {
        self.images.get(&n).map(|i| i.data)
    }

    /// Removes the freelist's pages (trunks and leaves): freed pages keep
    /// the rows they held, rows of ops since acknowledged and deleted. A
    /// damaged chain stops where it stops making sense.
    fn drop_freelist(&mut self) {
        let Some(first) = self.page(1) else { return };
        let Some(mut trunk) = be32(first, 32) else {
            return;
        };
        let per_trunk = self.usable / 4 - 2;
        let mut free = HashSet::new();
        while trunk != 0 && trunk <= self.count {
            if !free.insert(trunk) {
                break;
            }
            let Some(data) = self.page(trunk) else { break };
            let next = be32(data, 0).unwrap_or(0);
            let n = be32(data, 4).unwrap_or(0) as usize;
            if n > per_trunk {
                break;
            }
            for k in 0..n {
                match be32(data, 8 + 4 * k) {
                    Some(leaf) if leaf != 0 && leaf <= self.count => {
                        free.insert(leaf);
                    }
                    _ => break,
                }
            }
            trunk = next;
        }
        self.images.retain(|n, _| !free.contains(n));
    }
}

/// Reads a varint at `at`: its value and length.
fn varint(b: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for i in 0..9 {
        let byte = *b.get(at.checked_add(i)?)?;
        if i == 8 {
            return Some(((v << 8) | u64::from(byte), 9));
        }
        v = (v << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The cells of a table b-tree leaf page: (rowid, payload).
fn leaf_cells<'a>(
    pages: &Pages<'a>,
    pgno: u32,
    data: &'a [u8],
    bad: &mut u64,
) -> Option<Vec<(i64, Vec<u8>)>> {
    let hdr = if pgno == 1 { 100 } else { 0 };
    if *data.get(hdr)? != 0x0D {
        return None;
    }
    let usable = pages.usable.min(data.len());
    let ncells = usize::from(be16(data, hdr + 3)?);
    if hdr + 8 + 2 * ncells > usable {
        return None;
    }
    let mut out = Vec::with_capacity(ncells);
    for c in 0..ncells {
        let ptr = usize::from(be16(data, hdr + 8 + 2 * c)?);
        match cell(pages, &data[..usable], ptr) {
            Some(v) => out.push(v),
            None => *bad += 1,
        }
    }
    Some(out)
}

/// One table leaf cell at `at`: its rowid and its whole payload, overflow
/// pages followed (and bounded: a chain may not revisit a page or run
/// longer than the payload needs).
fn cell(pages: &Pages<'_>, page: &[u8], at: usize) -> Option<(i64, Vec<u8>)> {
    let (size, n1) = varint(page, at)?;
    let (rowid, n2) = varint(page, at + n1)?;
    let start = at + n1 + n2;
    let u = pages.usable;
    let size = usize::try_from(size).ok()?;
    // No payload is larger than the database.
    if size > (pages.count as usize).saturating_mul(u) {
        return None;
    }
    let max_local = u - 35;
    let local = if size <= max_local {
        size
    } else {
        let min_local = (u - 12) * 32 / 255 - 23;
        let k = min_local + (size - min_local) % (u - 4);
        if k <= max_local {
            k
        } else {
            min_local
        }
    };
    let mut payload = Vec::with_capacity(size.min(1 << 20));
    payload.extend_from_slice(page.get(start..start + local)?);
    if local < size {
        let mut next = be32(page, start + local)?;
        let mut seen = HashSet::new();
        while payload.len() < size {
            if next == 0 || !seen.insert(next) {
                return None;
            }
            let ov = pages.page(next)?;
            let take = (size - payload.len()).min(u - 4);
            payload.extend_from_slice(ov.get(4..4 + take)?);
            next = be32(ov, 0)?;
        }
    }
    // A rowid is a signed 64-bit integer stored as its two's complement.
    Some((rowid as i64, payload))
}

/// Decodes a record into its values; text that is not UTF-8 is kept as a
/// blob, as salvage's SQL path keeps it.
fn record(p: &[u8]) -> Option<Vec<SqlValue>> {
    let (hlen, n) = varint(p, 0)?;
    let hlen = usize::try_from(hlen).ok()?;
    if hlen > p.len() || hlen < n {
        return None;
    }
    let mut types = Vec::new();
    let mut at = n;
    while at < hlen {
        let (t, k) = varint(p, at)?;
        types.push(t);
        at += k;
        if types.len() > 64 {
            return None;
        }
    }
    let mut body = hlen;
    let mut values = Vec::with_capacity(types.len());
    for t in types {
        let int = |len: usize| -> Option<i64> {
            let b = p.get(body..body + len)?;
            let mut v: i64 = if b[0] & 0x80 != 0 { -1 } else { 0 };
            for &x in b {
                v = (v << 8) | i64::from(x);
            }
            Some(v)
        };
        let (value, len) = match t {
            0 => (SqlValue::Null, 0),
            1..=4 => (SqlValue::Integer(int(t as usize)?), t as usize),
            5 => (SqlValue::Integer(int(6)?), 6),
            6 => (SqlValue::Integer(int(8)?), 8),
            7 => {
                let b = p.get(body..body + 8)?;
                let bits = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                (SqlValue::Real(f64::from_bits(bits)), 8)
            }
            8 => (SqlValue::Integer(0), 0),
            9 => (SqlValue::Integer(1), 0),
            10 | 11 => return None,
            _ => {
                let len = usize::try_from((t - 12) / 2).ok()?;
                let b = p.get(body..body.checked_add(len)?)?;
                let v = if t % 2 == 0 {
                    SqlValue::Blob(b.to_vec())
                } else {
                    match std::str::from_utf8(b) {
                        Ok(s) => SqlValue::Text(s.to_owned()),
                        Err(_) => SqlValue::Blob(b.to_vec()),
                    }
                };
                (v, len)
            }
        };
        values.push(value);
        body += len;
    }
    Some(values)
}

/// Columns of an op row before schema 4 (no checksum), in schema 4, and
/// since schema 5 (`txn_id` and `depends_on` after the checksum).
const OP_COLUMNS_V3: usize = 22;
const OP_COLUMNS_V4: usize = 23;
const OP_COLUMNS_V5: usize = 25;
/// The `is_head` column, rebuilt by salvage and not copied.
const IS_HEAD: usize = 13;

/// Whether a value is text that parses as a UUID.
fn is_uuid(v: &SqlValue) -> bool {
    matches!(v, SqlValue::Text(s) if uuid::Uuid::parse_str(s).is_ok())
}

/// The values to copy if `values` (a record with rowid `rowid`) has the
/// shape of an op row: 22 or 23 columns, the rowid alias stored as NULL
/// (or an integer), and an op id or an idempotency key that is a UUID (so a
/// row damaged in one of them is still recognised, and quarantined).
fn op_row(rowid: i64, mut values: Vec<SqlValue>) -> Option<Vec<SqlValue>> {
    if ![OP_COLUMNS_V3, OP_COLUMNS_V4, OP_COLUMNS_V5].contains(&values.len()) {
        return None;
    }
    if !matches!(values[0], SqlValue::Null | SqlValue::Integer(_)) {
        return None;
    }
    if !is_uuid(&values[1]) && !is_uuid(&values[2]) {
        return None;
    }
    // The schema 5 columns, moved before the checksum as the copy wants them.
    let (txn_id, depends_on) = if values.len() == OP_COLUMNS_V5 {
        let depends_on = values.pop().unwrap_or(SqlValue::Null);
        (values.pop().unwrap_or(SqlValue::Null), depends_on)
    } else {
        (SqlValue::Null, SqlValue::Null)
    };
    let checksum = if values.len() == OP_COLUMNS_V4 {
        values.pop().unwrap_or(SqlValue::Null)
    } else {
        let v = &values;
        let fields: [rusqlite::types::ValueRef<'_>; 7] =
            std::array::from_fn(|i| (&v[i + 1]).into());
        SqlValue::Integer(super::schema::op_checksum(&fields))
    };
    values.remove(IS_HEAD);
    values[0] = SqlValue::Integer(rowid);
    values.push(txn_id);
    values.push(depends_on);
    values.push(checksum);
    Some(values)
}

/// Takes the one-row tables' rows (rowid 1) that the fresh file needs:
/// the lock row (5 columns: the id alias, owner text, three integers), so
/// lock epochs keep increasing, and the `ops_seq_mark` row (3 columns:
/// the id alias, two integers), so no position is reused. Returns the
/// values if they are not such a row.
fn small_row(rowid: i64, values: Vec<SqlValue>, out: &mut Scan) -> Option<Vec<SqlValue>> {
    use SqlValue::{Integer, Null, Text};
    if rowid != 1 || !matches!(values.first(), Some(Null | Integer(1))) {
        return Some(values);
    }
    match values.as_slice() {
        [_, Text(_), Integer(epoch), Integer(_), Integer(_)] => {
            let higher = match out.lock.as_deref() {
                Some([_, _, Integer(e), ..]) => epoch > e,
                _ => true,
            };
            if higher {
                let mut lock = values.clone();
                lock[0] = Integer(1);
                out.lock = Some(lock);
            }
            None
        }
        [_, Integer(a), Integer(b)] => {
            out.seq_mark = out.seq_mark.max(*a).max(*b);
            None
        }
        _ => Some(values),
    }
}

/// Scans a database file's bytes and its WAL's for op rows (see the
/// module comment for which page images are read). Never panics.
pub(crate) fn scan(db: &[u8], wal: Option<&[u8]>) -> Scan {
    let mut out = Scan::default();
    let pages = Pages::new(db, wal, &mut out.wal_break);
    // Newest first per op id: an image past the break beats one SQLite
    // shows; between images of the same age, the higher page wins (any).
    let mut by_id: HashMap<String, (bool, Vec<SqlValue>)> = HashMap::new();
    let mut numbers: Vec<u32> = pages.images.keys().copied().collect();
    numbers.sort_unstable();
    for n in numbers {
        let Some(img) = pages.images.get(&n).copied() else {
            continue;
        };
        let Some(cells) = leaf_cells(&pages, n, img.data, &mut out.bad_cells) else {
            continue;
        };
        out.leaf_pages += 1;
        for (rowid, payload) in cells {
            let Some(values) = record(&payload) else {
                continue;
            };
            let Some(values) = small_row(rowid, values, &mut out) else {
                continue;
            };
            let Some(values) = op_row(rowid, values) else {
                continue;
            };
            out.max_rowid = out.max_rowid.max(rowid);
            let key = match &values[1] {
                SqlValue::Text(s) => s.clone(),
                other => format!("{other:?}@{rowid}"),
            };
            match by_id.get(&key) {
                Some((past, _)) if *past && !img.past_break => {}
                _ => {
                    by_id.insert(key, (img.past_break, values));
                }
            }
        }
    }
    out.complete = out.bad_cells == 0 && !pages.damaged_image;
    out.rows = by_id
        .into_values()
        .map(|(past_break, values)| FoundRow { values, past_break })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varints_decode_and_stop_at_nine_bytes() {
        assert_eq!(varint(&[0x7f], 0), Some((0x7f, 1)));
        assert_eq!(varint(&[0x81, 0x00], 0), Some((0x80, 2)));
        assert_eq!(varint(&[0xff; 9], 0), Some((u64::MAX, 9)));
        assert_eq!(varint(&[0xff; 3], 0), None);
    }

    #[test]
    fn records_decode_every_serial_type() {
        // Header: size 8, then NULL, int8, int16, 0, 1, real, text "ab".
        let p = [
            8u8, 0, 1, 2, 8, 9, 7, 17, 0xFE, 0x01, 0x02, 0x3F, 0xF0, 0, 0, 0, 0, 0, 0, b'a', b'b',
        ];
        let v = record(&p).unwrap();
        assert_eq!(
            v,
            vec![
                SqlValue::Null,
                SqlValue::Integer(-2),
                SqlValue::Integer(0x0102),
                SqlValue::Integer(0),
                SqlValue::Integer(1),
                SqlValue::Real(1.0),
                SqlValue::Text("ab".into()),
            ]
        );
        assert_eq!(record(&p[..p.len() - 1]), None);
    }

    /// A WAL of 512-byte pages with valid checksums: one frame per
    /// `(page number, commit size)`.
    fn test_wal(frames: &[(u32, u32)]) -> Vec<u8> {
        let mut wal = Vec::new();
        for v in [WAL_MAGIC_BE, WAL_VERSION, 512, 0, 7, 9] {
            wal.extend_from_slice(&v.to_be_bytes());
        }
        let mut seed = checksum(true, (0, 0), [&wal[..24], &[]]);
        wal.extend_from_slice(&seed.0.to_be_bytes());
        wal.extend_from_slice(&seed.1.to_be_bytes());
        for (i, &(pgno, commit)) in frames.iter().enumerate() {
            let mut h = Vec::new();
            for v in [pgno, commit, 7, 9] {
                h.extend_from_slice(&v.to_be_bytes());
            }
            let page = vec![u8::try_from(i).unwrap(); 512];
            seed = checksum(true, seed, [&h[..8], &page]);
            h.extend_from_slice(&seed.0.to_be_bytes());
            h.extend_from_slice(&seed.1.to_be_bytes());
            wal.extend_from_slice(&h);
            wal.extend_from_slice(&page);
        }
        wal
    }

    /// Offset of frame `i`'s page image in a [`test_wal`].
    fn page_at(i: usize) -> usize {
        32 + i * (24 + 512) + 24
    }

    #[test]
    fn only_a_damaged_frame_before_an_intact_commit_is_a_break() {
        let wal = test_wal(&[(2, 2), (2, 0), (3, 3), (2, 3)]);
        assert_eq!(wal_break(&wal, 512), None);
        // A torn tail: the damaged frame has no commit after it.
        let mut torn = wal.clone();
        torn[page_at(3) + 5] ^= 1;
        assert_eq!(wal_break(&torn, 512), None);
        // A damaged frame before intact commits: SQLite ignores them.
        let mut mid = wal.clone();
        mid[page_at(1) + 5] ^= 1;
        assert!(wal_break(&mid, 512).is_some_and(|m| m.contains("frame 2")));
        // A damaged header: SQLite ignores the whole WAL.
        for at in [3, 8, 20, 27] {
            let mut head = wal.clone();
            head[at] ^= 1;
            assert!(
                wal_break(&head, 512).is_some_and(|m| m.contains("header")),
                "header byte {at}"
            );
        }
    }

    /// Ops in [`real_files`]: some with payloads over a page (overflow).
    const REAL_OPS: usize = 60;

    /// A real outbox's file and WAL: ops inserted, some deleted, through
    /// the outbox's own schema.
    fn real_files() -> &'static (Vec<u8>, Vec<u8>) {
        static FILES: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
        FILES.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("o.db");
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            super::super::schema::migrate(&mut conn).unwrap();
            let insert = |conn: &rusqlite::Connection, i: usize| {
                let payload = if i.is_multiple_of(7) {
                    format!("{{\"big\":\"{}\"}}", "x".repeat(9000 + i))
                } else {
                    format!("{{\"i\":{i}}}")
                };
                conn.execute(
                    "INSERT INTO ops (op_id, idempotency_key, kind, entity_type, entity_id, payload, \
                     envelope_version, state, next_attempt_at, created_at, updated_at, checksum) \
                     VALUES (?1, ?2, 'create', 't', ?3, ?4, 1, 'pending', 0, 0, 0, 7)",
                    rusqlite::params![
                        uuid::Uuid::new_v4().to_string(),
                        uuid::Uuid::new_v4().to_string(),
                        format!("e{i}"),
                        payload
                    ],
                )
                .unwrap();
            };
            for i in 0..REAL_OPS + 20 {
                insert(&conn, i);
            }
            // Checkpoint, then delete some (freed pages) and write more
            // in the WAL.
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
            conn.execute("DELETE FROM ops WHERE seq <= 20", []).unwrap();
            let db = std::fs::read(&path).unwrap();
            let wal = std::fs::read(path.with_extension("db-wal")).unwrap();
            (db, wal)
        })
    }

    /// A page image that starts as a table leaf with cells, then mutated.
    fn leafy(page: usize) -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(any::<u8>(), page),
            0u16..40,
            proptest::collection::vec((0usize..page, any::<u8>()), 0..16),
        )
            .prop_map(move |(mut p, n, edits)| {
                p[0] = 0x0D;
                p[3..5].copy_from_slice(&n.to_be_bytes());
                for (at, b) in edits {
                    p[at] = b;
                }
                p
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Random and mutated pages, headers and WALs never panic the scan.
        #[test]
        fn no_byte_pattern_panics_the_scan(
            pages in proptest::collection::vec(leafy(512), 1..6),
            header in proptest::collection::vec(any::<u8>(), 100),
            wal_pages in proptest::collection::vec(leafy(512), 0..4),
            frame_heads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 24), 4),
            page_size_512 in any::<bool>(),
        ) {
            let mut db: Vec<u8> = pages.concat();
            db[..100].copy_from_slice(&header);
            if page_size_512 {
                db[16..18].copy_from_slice(&512u16.to_be_bytes());
                db[20] = 0;
            }
            let mut wal = vec![0u8; 32];
            wal[0..4].copy_from_slice(&WAL_MAGIC_LE.to_be_bytes());
            wal[8..12].copy_from_slice(&512u32.to_be_bytes());
            for (p, h) in wal_pages.iter().zip(&frame_heads) {
                let mut h = h.clone();
                h[8..16].fill(0);
                wal.extend_from_slice(&h);
                wal.extend_from_slice(p);
            }
            let _ = scan(&db, None);
            let _ = scan(&db, Some(&wal));
            let _ = wal_break(&wal, 512);
            for cut in [0, 7, 100, db.len() / 2] {
                let _ = scan(&db[..cut.min(db.len())], Some(&wal[..cut.min(wal.len())]));
            }
        }

        /// A real outbox file (with overflow chains) and its WAL, with
        /// random bytes overwritten, never panic the scan; untouched, every
        /// op row is found.
        #[test]
        fn mutated_outbox_files_never_panic_the_scan(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..64),
            in_wal in any::<bool>(),
        ) {
            let (db, wal) = real_files();
            prop_assert_eq!(scan(db, Some(wal)).rows.len(), REAL_OPS);
            let (mut db, mut wal) = (db.clone(), wal.clone());
            let target = if in_wal { &mut wal } else { &mut db };
            for (at, b) in edits {
                let i = at.index(target.len());
                target[i] = b;
            }
            let _ = scan(&db, Some(&wal));
            let _ = scan(&db, None);
        }

        /// Any bytes as a record or a varint never panic the decoder.
        #[test]
        fn no_record_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = record(&bytes);
            let _ = varint(&bytes, 0);
            if let Some(v) = record(&bytes) {
                let _ = op_row(1, v);
            }
        }
    }
}
