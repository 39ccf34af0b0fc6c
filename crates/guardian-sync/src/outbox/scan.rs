//! A read-only decoder of the SQLite file format, for salvage and for
//! finding WAL damage (`wal_break`): it finds op rows in table b-tree leaf
//! pages without SQLite's schema, so a damaged `sqlite_master` page, or a
//! WAL whose later commits SQLite ignores after a damaged frame, costs no
//! op whose row still decodes.
//!
//! It follows <https://www.sqlite.org/fileformat2.html>. Every offset,
//! varint, length and overflow chain is bounded: no byte pattern panics it.
//!
//! Which page images it reads (see docs/design/outbox.md, "Salvage without
//! the schema"): for each page number, the newest image among the database
//! file and the frames of the WAL's checksum chain from its header (see
//! `frames_of`) up to its last commit; pages on the freelist and past the
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
    /// The row came from a WAL frame whose checksum fails and carried no
    /// seal of its own (a file from before the seals): the seal it has was
    /// computed from possibly damaged bytes and vouches for nothing.
    pub unverified: bool,
}

/// What the scan found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Op rows, at most one per op id (the newest image's).
    pub rows: Vec<FoundRow>,
    /// Table leaf pages decoded.
    pub leaf_pages: u64,
    /// Cells that did not decode (a damaged cell, overflow chain or record).
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

/// One WAL frame of the checksum chain (see [`frames_of`]).
#[derive(Debug, Clone, Copy)]
struct Frame {
    pgno: u32,
    commit_size: u32,
    /// Its checksum continues the chain from the WAL header; if not, the
    /// frame is in the chain only because one damaged byte explains the
    /// failure (SQLite stops reading there).
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

/// A WAL's page size and the frames of its checksum chain.
struct Wal {
    page_size: u32,
    frames: Vec<Frame>,
    /// SQLite accepts the header. If not, it ignores the whole WAL.
    header_ok: bool,
}

/// What a WAL header says, once it is valid.
#[derive(Debug, Clone, Copy)]
struct Header {
    big_endian: bool,
    page_size: u32,
    salts: [u8; 8],
    /// The checksum the first frame continues.
    seed: (u32, u32),
}

/// The header as SQLite reads it, if it accepts it: magic, version, page
/// size and its own checksum.
fn valid_header(h: &[u8; 32]) -> Option<Header> {
    let magic = be32(h, 0)?;
    let page_size = be32(h, 8)?;
    if !matches!(magic, WAL_MAGIC_BE | WAL_MAGIC_LE)
        || be32(h, 4) != Some(WAL_VERSION)
        || !valid_page_size(page_size)
    {
        return None;
    }
    let big_endian = magic == WAL_MAGIC_BE;
    let seed = checksum(big_endian, (0, 0), [&h[0..24], &[]]);
    (Some(seed) == be32(h, 24).zip(be32(h, 28))).then(|| Header {
        big_endian,
        page_size,
        salts: std::array::from_fn(|i| h[16 + i]),
        seed,
    })
}

/// The valid headers that differ from `h` in one byte: SQLite refuses
/// `h`, and one damaged byte explains why.
fn headers_one_byte_off(h: &[u8; 32]) -> Vec<Header> {
    let mut found = Vec::new();
    // A byte of the stored checksum: the rest is valid and checksums to
    // a value one byte away from it.
    let big = be32(h, 0) == Some(WAL_MAGIC_BE);
    let sum = checksum(big, (0, 0), [&h[0..24], &[]]);
    let mut fixed = *h;
    fixed[24..28].copy_from_slice(&sum.0.to_be_bytes());
    fixed[28..32].copy_from_slice(&sum.1.to_be_bytes());
    if let Some(valid) = valid_header(&fixed).filter(|_| one_byte_apart(&h[24..32], &fixed[24..32]))
    {
        found.push(valid);
    }
    // A byte of the checksummed fields: with it restored, the stored
    // checksum verifies.
    for at in 0..24 {
        for v in 0..=u8::MAX {
            if v == h[at] {
                continue;
            }
            let mut fixed = *h;
            fixed[at] = v;
            if let Some(valid) = valid_header(&fixed) {
                found.push(valid);
            }
        }
    }
    found
}

/// Reads a WAL's checksum chain (see [`frames_of`]). A WAL whose header
/// SQLite refuses is ignored by SQLite as a whole; its frames are read
/// only when the header is a valid one with one damaged byte and the
/// first frame continues that header's checksum (preferring, if several
/// fit, the database's page size, then the longest chain).
fn wal_frames(wal: &[u8], db_page_size: u32) -> Option<Wal> {
    let header: [u8; 32] = wal.get(0..32)?.try_into().ok()?;
    if let Some(h) = valid_header(&header) {
        return Some(Wal {
            page_size: h.page_size,
            frames: frames_of(wal, h),
            header_ok: true,
        });
    }
    let best = headers_one_byte_off(&header)
        .into_iter()
        .map(|h| (h, frames_of(wal, h)))
        .filter(|(_, frames)| frames.first().is_some_and(|f| f.intact))
        .max_by_key(|(h, frames)| (h.page_size == db_page_size, frames.len()));
    let (page_size, frames) = best.map_or((db_page_size, Vec::new()), |(h, f)| (h.page_size, f));
    Some(Wal {
        page_size,
        frames,
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

/// True if `a` and `b` differ in exactly one byte.
fn one_byte_apart(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).filter(|(x, y)| x != y).count() == 1
}

/// The single bytes of `head ++ page` (a frame's first 8 header bytes
/// and its page) whose change would make the checksum from `seed` equal
/// `stored`: each as its offset and the value it must have had. Empty if
/// no single byte explains the difference.
///
/// The checksum is linear: each 8-byte pair `(a, b)` maps the state `s`
/// to `M s + (a, a + b)` with `M = [[1, 1], [1, 2]]` (mod 2^32), so the
/// stored value minus the computed one is `M^j (δ, δ)` for a change `δ`
/// of the word `a` of the pair `j` places before the end, or `M^j (0, δ)`
/// for the word `b`. `M` is invertible, so each pair is tried by undoing
/// one step at a time, and `δ` must be one byte's change in that word.
/// A change in a word's high bits can fit several places (`M` mod 2^k has
/// a short period), hence a list.
fn one_byte_fixes(
    big_endian: bool,
    seed: (u32, u32),
    head: &[u8],
    page: &[u8],
    stored: (u32, u32),
) -> Vec<(usize, u8)> {
    let computed = checksum(big_endian, seed, [head, page]);
    let mut d = (
        stored.0.wrapping_sub(computed.0),
        stored.1.wrapping_sub(computed.1),
    );
    let mut fixes = Vec::new();
    if d == (0, 0) {
        return fixes;
    }
    let byte_at = |i: usize| {
        if i < head.len() {
            head[i]
        } else {
            page[i - head.len()]
        }
    };
    let pairs = (head.len() + page.len()) / 8;
    for pair in (0..pairs).rev() {
        let words = [
            (0, (d.0 == d.1).then_some(d.0)),
            (4, (d.0 == 0).then_some(d.1)),
        ];
        for (word, delta) in words {
            let Some(delta) = delta else { continue };
            for shift in 0..4u32 {
                // The byte `shift` places from the word's low end.
                if delta & ((1u32 << (8 * shift)) - 1) != 0 {
                    continue;
                }
                let in_word = if big_endian { 3 - shift } else { shift };
                let at = pair * 8 + word + in_word as usize;
                let width = 32 - 8 * shift;
                let mask = if width == 32 {
                    u32::MAX
                } else {
                    (1 << width) - 1
                };
                let was = u32::from(byte_at(at)).wrapping_add(delta >> (8 * shift)) & mask;
                let Ok(was) = u8::try_from(was) else { continue };
                // Check the algebra on the bytes themselves.
                let mut bytes = [head, page].concat();
                bytes[at] = was;
                let (h, p) = bytes.split_at(head.len());
                if checksum(big_endian, seed, [h, p]) == stored {
                    fixes.push((at, was));
                }
            }
        }
        // Undo one step: M^-1 = [[2, -1], [-1, 1]].
        d = (d.0.wrapping_mul(2).wrapping_sub(d.1), d.1.wrapping_sub(d.0));
    }
    fixes
}

/// How one frame continues the chain.
#[derive(Debug, Clone, Copy)]
struct Link {
    pgno: u32,
    commit_size: u32,
    intact: bool,
    /// The checksum the next frame continues.
    next: (u32, u32),
}

/// Whether `frame` continues the chain from `seed` untouched, as SQLite
/// checks it: the header's salts, a page number, the checksum.
fn link_intact(frame: &[u8], h: &Header, seed: (u32, u32)) -> Option<Link> {
    let pgno = be32(frame, 0)?;
    let stored = (be32(frame, 16)?, be32(frame, 20)?);
    let ok = frame.get(8..16)? == h.salts
        && pgno != 0
        && checksum(h.big_endian, seed, [frame.get(0..8)?, frame.get(24..)?]) == stored;
    ok.then(|| Link {
        pgno,
        commit_size: be32(frame, 4).unwrap_or(0),
        intact: true,
        next: stored,
    })
}

/// How `frame` continues the chain from `seed`: intact, or damaged in one
/// byte — of its page or page number or commit size (the stored checksum
/// is then the true one, and the values are restored), of its stored
/// checksum, or of its salts — else `None`: the chain ends there. If two
/// readings fit, the one the next frame continues wins.
fn link(frame: &[u8], h: &Header, seed: (u32, u32), next: Option<&[u8]>) -> Option<Link> {
    if let Some(l) = link_intact(frame, h, seed) {
        return Some(l);
    }
    let (head, page) = (frame.get(0..8)?, frame.get(24..)?);
    let stored_bytes = frame.get(16..24)?;
    let stored = (be32(frame, 16)?, be32(frame, 20)?);
    let computed = checksum(h.big_endian, seed, [head, page]);
    let field = |b: &[u8], at: usize| be32(b, at).unwrap_or(0);
    let mut readings = Vec::new();
    if frame.get(8..16)? == h.salts {
        // Of several fits, the smallest page number and commit size: a
        // damaged high bit inflates them, and no page is 2^24 or more.
        let fits = one_byte_fixes(h.big_endian, seed, head, page, stored)
            .into_iter()
            .map(|(at, was)| {
                let mut head = [0u8; 8];
                head.copy_from_slice(frame.get(0..8).unwrap_or(&[0; 8]));
                if at < 8 {
                    head[at] = was;
                }
                (field(&head, 0), field(&head, 4))
            })
            .filter(|&(pgno, _)| pgno != 0)
            .min();
        if let Some((pgno, commit_size)) = fits {
            readings.push(Link {
                pgno,
                commit_size,
                intact: false,
                next: stored,
            });
        }
        let mut true_sum = [0u8; 8];
        true_sum[..4].copy_from_slice(&computed.0.to_be_bytes());
        true_sum[4..].copy_from_slice(&computed.1.to_be_bytes());
        if one_byte_apart(stored_bytes, &true_sum) {
            readings.push(Link {
                pgno: field(head, 0),
                commit_size: field(head, 4),
                intact: false,
                next: computed,
            });
        }
    } else if computed == stored && one_byte_apart(frame.get(8..16)?, &h.salts) {
        readings.push(Link {
            pgno: field(head, 0),
            commit_size: field(head, 4),
            intact: false,
            next: stored,
        });
    }
    readings.retain(|l| l.pgno != 0);
    let continued = readings
        .iter()
        .position(|l| next.is_some_and(|n| link_intact(n, h, l.next).is_some()))
        .unwrap_or(0);
    readings.get(continued).copied()
}

/// The WAL's checksum chain from its header: every frame from the first
/// whose salts and cumulative checksum SQLite would accept, or which one
/// damaged byte keeps from being accepted (see [`link`]). The chain ends
/// at the first frame that is neither: a torn or unpublished frame, the
/// end of the frames written since the header (older frames carry other
/// salts and continue another chain), or zeros. Every frame is checked
/// against the checksum the chain computed, never reseeded from a stored
/// one, so frames left by another writer (a killed writer's frames that
/// the next writer partly overwrote, a previous generation) cannot join
/// it.
fn frames_of(wal: &[u8], h: Header) -> Vec<Frame> {
    let frame_len = 24 + h.page_size as usize;
    let mut frames = Vec::new();
    let mut seed = h.seed;
    let mut at = 32usize;
    while let Some(frame) = wal.get(at..at.saturating_add(frame_len)) {
        let next = wal.get(at + frame_len..at.saturating_add(2 * frame_len));
        let Some(l) = link(frame, &h, seed, next) else {
            break;
        };
        frames.push(Frame {
            pgno: l.pgno,
            commit_size: l.commit_size,
            intact: l.intact,
            page_at: at + 24,
        });
        seed = l.next;
        at += frame_len;
    }
    frames
}

/// The committed frames: up to the last commit frame of the chain; and the
/// first frame SQLite does not read before it, if any (the first damaged
/// frame, or the first frame when SQLite refuses the header): SQLite
/// ignores every frame from there.
fn committed(wal: &Wal) -> (&[Frame], Option<usize>) {
    let frames = &wal.frames;
    let Some(last) = frames.iter().rposition(|f| f.commit_size > 0) else {
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

/// Whether the WAL's checksum chain (see [`frames_of`]) holds a frame that
/// one damaged byte keeps SQLite from reading, before a commit of the
/// chain, or the header is a valid one with one damaged byte: SQLite
/// stops there and ignores every later commit without an error. A torn
/// tail, a killed writer's frames, older generations and zeros end the
/// chain and are never damage; so is a frame being written, but the
/// write lock keeps the reading consistent.
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

/// A page image, whether it comes from past a WAL break, and whether it is
/// a WAL frame whose checksum fails.
#[derive(Clone, Copy)]
struct Image<'a> {
    data: &'a [u8],
    past_break: bool,
    damaged: bool,
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
                        damaged: false,
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
                        damaged: !f.intact,
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

/// The body length of a value of serial type `t`; `None` for the reserved
/// types.
fn serial_len(t: u64) -> Option<usize> {
    match t {
        0 | 8 | 9 => Some(0),
        1..=4 => usize::try_from(t).ok(),
        5 => Some(6),
        6 | 7 => Some(8),
        10 | 11 => None,
        _ => usize::try_from((t - 12) / 2).ok(),
    }
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
        let len = serial_len(t)?;
        let b = p.get(body..body.checked_add(len)?)?;
        let int = || -> i64 {
            let mut v: i64 = if b.first().is_some_and(|x| x & 0x80 != 0) {
                -1
            } else {
                0
            };
            for &x in b {
                v = (v << 8) | i64::from(x);
            }
            v
        };
        let value = match t {
            0 => SqlValue::Null,
            1..=6 => SqlValue::Integer(int()),
            7 => SqlValue::Real(f64::from_bits(u64::from_be_bytes(b.try_into().ok()?))),
            8 => SqlValue::Integer(0),
            9 => SqlValue::Integer(1),
            _ if t % 2 == 0 => SqlValue::Blob(b.to_vec()),
            _ => match std::str::from_utf8(b) {
                Ok(s) => SqlValue::Text(s.to_owned()),
                Err(_) => SqlValue::Blob(b.to_vec()),
            },
        };
        values.push(value);
        body += len;
    }
    Some(values)
}

/// An op row's record whose first byte, the header size, is damaged. The
/// header size is redundant: the serial types must account for the whole
/// payload. So the types are read from the second byte on, and where they
/// end with an op row's number of columns and a body that fills the rest
/// exactly, the record is decoded with that header size. An op row's
/// header is under 128 bytes, so its size took one byte.
fn record_resized(p: &[u8]) -> Option<Vec<SqlValue>> {
    let mut at = 1;
    let mut body: usize = 0;
    let mut columns = 0;
    while at < p.len().min(0x80) && columns < OP_COLUMNS_V6 {
        let (t, k) = varint(p, at)?;
        at += k;
        body = body.checked_add(serial_len(t)?)?;
        columns += 1;
        let fits = at.checked_add(body) == Some(p.len());
        if fits && OP_COLUMN_COUNTS.contains(&columns) && at < 0x80 {
            let mut fixed = p.to_vec();
            fixed[0] = u8::try_from(at).ok()?;
            return record(&fixed);
        }
    }
    None
}

/// Columns of an op row before schema 4 (no checksum), in schema 4, in
/// schema 5 (`txn_id` and `depends_on` after the checksum), and since
/// schema 6 (`foreign_id` last; a copy is foreign, so it is dropped).
const OP_COLUMNS_V3: usize = 22;
const OP_COLUMNS_V4: usize = 23;
const OP_COLUMNS_V5: usize = 25;
const OP_COLUMNS_V6: usize = 26;
const OP_COLUMN_COUNTS: [usize; 4] = [OP_COLUMNS_V3, OP_COLUMNS_V4, OP_COLUMNS_V5, OP_COLUMNS_V6];
/// The `is_head` column, rebuilt by salvage and not copied.
const IS_HEAD: usize = 13;

/// Whether a value is text that parses as a UUID.
fn is_uuid(v: &SqlValue) -> bool {
    matches!(v, SqlValue::Text(s) if uuid::Uuid::parse_str(s).is_ok())
}

/// The values to copy if `values` (a record with rowid `rowid`) has the
/// shape of an op row: 22, 23, 25 or 26 columns, the rowid alias stored as NULL
/// (or an integer), and an op id or an idempotency key that is a UUID (so a
/// row damaged in one of them is still recognised, and quarantined).
/// [`op_row`], and whether the record carried a seal of its own (schema 4
/// on) rather than one computed here.
fn sealed_op_row(rowid: i64, values: Vec<SqlValue>) -> Option<(Vec<SqlValue>, bool)> {
    let sealed = values.len() >= OP_COLUMNS_V4;
    op_row(rowid, values).map(|v| (v, sealed))
}

fn op_row(rowid: i64, mut values: Vec<SqlValue>) -> Option<Vec<SqlValue>> {
    if !OP_COLUMN_COUNTS.contains(&values.len()) {
        return None;
    }
    if values.len() == OP_COLUMNS_V6 {
        values.pop();
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
        // A row from before the seals gets this schema's seal: op id to
        // base, no txn or dependencies, its base version and chained flag.
        use rusqlite::types::ValueRef;
        let v = &values;
        let mut fields = [ValueRef::Null; super::schema::SEALED];
        for (i, f) in fields.iter_mut().take(7).enumerate() {
            *f = (&v[i + 1]).into();
        }
        fields[9] = (&v[8]).into();
        fields[10] = match (&v[9]).into() {
            ValueRef::Integer(0) => ValueRef::Null,
            chained => chained,
        };
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
    let mut by_id: HashMap<String, FoundRow> = HashMap::new();
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
            let decoded = record(&payload);
            let undecoded = decoded.is_none();
            let row = match decoded {
                Some(values) => match small_row(rowid, values, &mut out) {
                    Some(values) => sealed_op_row(rowid, values),
                    None => continue,
                },
                None => None,
            };
            // A record that does not decode, or decodes as no op row, may
            // be an op row with a damaged header size.
            let resized = || record_resized(&payload).and_then(|v| sealed_op_row(rowid, v));
            let Some((values, sealed)) = row.or_else(resized) else {
                out.bad_cells += u64::from(undecoded);
                continue;
            };
            out.max_rowid = out.max_rowid.max(rowid);
            let key = match &values[1] {
                SqlValue::Text(s) => s.clone(),
                other => format!("{other:?}@{rowid}"),
            };
            let found = FoundRow {
                values,
                past_break: img.past_break,
                unverified: img.damaged && !sealed,
            };
            match by_id.get(&key) {
                Some(had) if had.past_break && !img.past_break => {}
                _ => {
                    by_id.insert(key, found);
                }
            }
        }
    }
    out.complete = out.bad_cells == 0 && !pages.damaged_image;
    out.rows = by_id.into_values().collect();
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

    /// A 22-column record shaped like an op row of schema 3: the rowid
    /// alias, two UUIDs, then small integers.
    fn op_like_record() -> (Vec<u8>, Vec<SqlValue>) {
        let id = "0b9d8a4e-8d3c-4b57-9a3e-3f7f6b1c2d4e";
        let mut header = vec![0u8, 85, 85];
        header.extend(std::iter::repeat_n(1u8, OP_COLUMNS_V3 - 3));
        let mut p = vec![u8::try_from(header.len() + 1).unwrap()];
        p.extend_from_slice(&header);
        p.extend_from_slice(id.as_bytes());
        p.extend_from_slice(id.as_bytes());
        p.extend((0..OP_COLUMNS_V3 - 3).map(|i| u8::try_from(i).unwrap()));
        let mut values = vec![
            SqlValue::Null,
            SqlValue::Text(id.into()),
            SqlValue::Text(id.into()),
        ];
        values.extend((0..OP_COLUMNS_V3 - 3).map(|i| SqlValue::Integer(i64::try_from(i).unwrap())));
        (p, values)
    }

    #[test]
    fn an_op_record_with_a_damaged_header_size_is_read_again() {
        let (p, values) = op_like_record();
        assert_eq!(record(&p).as_ref(), Some(&values));
        for flip in [0x82u8, 0x01, 0x40, 0x1b] {
            let mut bad = p.clone();
            bad[0] ^= flip;
            assert_ne!(record(&bad).as_ref(), Some(&values), "flip {flip:#x}");
            assert_eq!(
                record_resized(&bad).as_ref(),
                Some(&values),
                "flip {flip:#x}"
            );
        }
        // A record of another shape, or with a damaged type, is not guessed.
        assert_eq!(record_resized(&p[..p.len() - 1]), None);
        let mut bad = p.clone();
        bad[2] = 87;
        assert_eq!(record_resized(&bad), None);
    }

    /// A WAL header for 512-byte pages (checksums big- or little-endian)
    /// and the checksum its first frame continues.
    fn wal_header(big: bool, salts: [u32; 2]) -> (Vec<u8>, (u32, u32)) {
        let magic = if big { WAL_MAGIC_BE } else { WAL_MAGIC_LE };
        let mut h = Vec::new();
        for v in [magic, WAL_VERSION, 512, 0, salts[0], salts[1]] {
            h.extend_from_slice(&v.to_be_bytes());
        }
        let seed = checksum(big, (0, 0), [&h[..24], &[]]);
        h.extend_from_slice(&seed.0.to_be_bytes());
        h.extend_from_slice(&seed.1.to_be_bytes());
        (h, seed)
    }

    /// Frames of 512-byte pages as a writer appends them after `seed`: one
    /// per `(page number, commit size, page bytes)`. Returns the bytes and
    /// the checksum of the last frame.
    fn chain(
        big: bool,
        salts: [u32; 2],
        mut seed: (u32, u32),
        frames: &[(u32, u32, Vec<u8>)],
    ) -> (Vec<u8>, (u32, u32)) {
        let mut out = Vec::new();
        for (pgno, commit, page) in frames {
            let mut h = Vec::new();
            for v in [*pgno, *commit, salts[0], salts[1]] {
                h.extend_from_slice(&v.to_be_bytes());
            }
            seed = checksum(big, seed, [&h[..8], page]);
            h.extend_from_slice(&seed.0.to_be_bytes());
            h.extend_from_slice(&seed.1.to_be_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(page);
        }
        (out, seed)
    }

    /// `(page number, commit size)` pairs as frames whose pages are filled
    /// with `fill + i`.
    fn filled(frames: &[(u32, u32)], fill: u8) -> Vec<(u32, u32, Vec<u8>)> {
        frames
            .iter()
            .zip(0u8..)
            .map(|(&(p, c), i)| (p, c, vec![fill.wrapping_add(i); 512]))
            .collect()
    }

    /// A WAL of 512-byte pages with valid checksums: one frame per
    /// `(page number, commit size)`.
    fn test_wal(frames: &[(u32, u32)]) -> Vec<u8> {
        let (mut wal, seed) = wal_header(true, [7, 9]);
        wal.extend(chain(true, [7, 9], seed, &filled(frames, 0)).0);
        wal
    }

    /// Offset of frame `i`'s page image in a [`test_wal`].
    fn page_at(i: usize) -> usize {
        32 + i * (24 + 512) + 24
    }

    #[test]
    fn only_a_damaged_frame_before_a_commit_is_a_break() {
        let wal = test_wal(&[(2, 2), (2, 0), (3, 3), (2, 0)]);
        assert_eq!(wal_break(&wal, 512), None);
        // A torn tail: the damaged frame has no commit after it.
        let mut torn = wal.clone();
        torn[page_at(3) + 5] ^= 1;
        assert_eq!(wal_break(&torn, 512), None);
        // A damaged frame before a commit: SQLite ignores it.
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

    /// Any one byte changed (to any other value) in a frame before the
    /// last commit, the last commit frame included, or in the WAL header,
    /// is found; the chain then reads on, so the commits after it count.
    #[test]
    fn one_damaged_byte_anywhere_is_found() {
        for big in [true, false] {
            let (mut wal, seed) = wal_header(big, [0x0102_0304, 0xA0B0_C0D0]);
            let frames = filled(&[(2, 0), (3, 0), (2, 4), (4, 0), (3, 4)], 0x41);
            wal.extend(chain(big, [0x0102_0304, 0xA0B0_C0D0], seed, &frames).0);
            assert_eq!(wal_break(&wal, 512), None);
            let frame_len = 24 + 512;
            for frame in [1usize, 4] {
                for within in 0..frame_len {
                    for xor in [0x01u8, 0x80, 0xFF] {
                        let mut bad = wal.clone();
                        bad[32 + frame * frame_len + within] ^= xor;
                        let found = wal_break(&bad, 512);
                        assert!(
                            found
                                .as_deref()
                                .is_some_and(|m| m.contains(&format!("frame {} ", frame + 1))),
                            "big {big}, frame {frame}, byte {within} ^ {xor:#x}: {found:?}"
                        );
                        let parsed = wal_frames(&bad, 512).unwrap();
                        assert_eq!(parsed.frames.len(), 5, "the chain reads on");
                        assert_eq!(parsed.frames[frame].pgno, frames[frame].0);
                        assert_eq!(parsed.frames[frame].commit_size, frames[frame].1);
                    }
                }
            }
            for at in 0..32 {
                let mut bad = wal.clone();
                bad[at] ^= 0x24;
                let found = wal_break(&bad, 512);
                assert!(
                    found.as_deref().is_some_and(|m| m.contains("header")),
                    "big {big}, header byte {at}: {found:?}"
                );
                assert_eq!(wal_frames(&bad, 512).unwrap().frames.len(), 5);
            }
        }
    }

    /// The false alarm that made a check at every open unsafe: a writer
    /// killed after writing a transaction's frames (its commit included)
    /// but before publishing them in the WAL index; the next writer
    /// appends over the first of them from the last published frame. The
    /// killed writer's later frames still chain to each other (a frame
    /// checked against the stored checksum of the frame before it looks
    /// damaged, and the next ones intact up to a commit), but not to the
    /// chain from the header: the WAL is not damaged.
    #[test]
    fn a_killed_writers_frames_overwritten_by_the_next_writer_are_not_damage() {
        for big in [true, false] {
            let salts = [11, 0x5EED];
            let (header, seed) = wal_header(big, salts);
            let (published, seed) = chain(big, salts, seed, &filled(&[(2, 0), (3, 3)], 1));
            let killed = filled(&[(2, 0), (3, 0), (4, 0), (5, 5)], 10);
            let (aborted, _) = chain(big, salts, seed, &killed);
            for next in [vec![(2, 0), (3, 3)], vec![(4, 0), (2, 0)], vec![(6, 6)]] {
                let (written, _) = chain(big, salts, seed, &filled(&next, 20));
                let mut wal = [header.clone(), published.clone(), written.clone()].concat();
                wal.extend_from_slice(&aborted[written.len()..]);
                let h = valid_header(wal[..32].try_into().unwrap()).unwrap();
                // Checked against the stored checksum before it, the first
                // surviving frame of the killed writer looks damaged and
                // the next ones intact, up to its commit frame.
                let frame_len = 24 + 512;
                let first = 32 + published.len() + written.len();
                let stale: Vec<&[u8]> = wal[first..].chunks(frame_len).collect();
                assert!(link_intact(
                    stale[0],
                    &h,
                    (
                        be32(&wal, first - frame_len + 16).unwrap(),
                        be32(&wal, first - frame_len + 20).unwrap()
                    )
                )
                .is_none());
                for pair in stale.windows(2) {
                    let before = (be32(pair[0], 16).unwrap(), be32(pair[0], 20).unwrap());
                    assert!(link_intact(pair[1], &h, before).is_some());
                }
                assert_eq!(wal_break(&wal, 512), None, "big {big}, next {next:?}");
                let parsed = wal_frames(&wal, 512).unwrap();
                assert_eq!(parsed.frames.len(), 2 + next.len());
                assert!(parsed.frames.iter().all(|f| f.intact));
            }
        }
    }

    /// A WAL restarted (new salts: the first incremented, the second
    /// random, here kept so they differ in one byte) over the frames of the
    /// previous generation, commits included, then zeros (preallocation),
    /// or an all-zero header before frames: none of it is damage.
    #[test]
    fn older_generations_and_zeros_are_not_damage() {
        for big in [true, false] {
            let (old_header, old_seed) = wal_header(big, [7, 9]);
            let (old, _) = chain(
                big,
                [7, 9],
                old_seed,
                &filled(&[(2, 0), (3, 3), (4, 0), (2, 4), (5, 5)], 1),
            );
            let (header, seed) = wal_header(big, [8, 9]);
            let (new, _) = chain(big, [8, 9], seed, &filled(&[(3, 0), (2, 5)], 50));
            let mut wal = [header.clone(), new.clone()].concat();
            wal.extend_from_slice(&old[new.len()..]);
            wal.extend(vec![0u8; 3 * (24 + 512)]);
            assert_eq!(wal_break(&wal, 512), None, "big {big}");
            assert_eq!(wal_frames(&wal, 512).unwrap().frames.len(), 2);
            let zero_header = [vec![0u8; 32], old[..].to_vec()].concat();
            assert_eq!(wal_break(&zero_header, 512), None);
            let zeros = vec![0u8; 32 + 4 * (24 + 512)];
            assert_eq!(wal_break(&zeros, 512), None);
            assert_eq!(wal_break(&[old_header, old].concat(), 512), None);
        }
    }

    /// One transaction's frames as a writer of [`live_wal`] writes them.
    #[derive(Debug, Clone)]
    enum Step {
        /// A commit of this many frames, published.
        Commit(usize),
        /// A commit of this many frames written, the writer killed before
        /// publishing it (the next writer appends over it).
        Killed(usize),
        /// A writer killed while writing: this many whole frames, then the
        /// next frame's header without its page.
        Torn(usize),
        /// A WAL restart (after a checkpoint): a new header, frames from
        /// the start again.
        Restart,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1usize..6).prop_map(Step::Commit),
            3 => (2usize..8).prop_map(Step::Killed),
            1 => (0usize..4).prop_map(Step::Torn),
            1 => Just(Step::Restart),
        ]
    }

    /// The WAL that `steps` of live writers leave (pages of random bytes
    /// from `seed`, preallocated zeros at the end), and the number of its
    /// published frames.
    fn live_wal(big: bool, steps: &[Step], mut seed: u64) -> (Vec<u8>, usize) {
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let frame_len = 24 + 512;
        let mut salts = [1u32, 2];
        let (mut wal, mut sum) = wal_header(big, salts);
        wal.resize(32 + 64 * frame_len, 0);
        let mut published = 0usize;
        let write = |wal: &mut Vec<u8>, at: usize, bytes: &[u8]| {
            if wal.len() < at + bytes.len() {
                wal.resize(at + bytes.len(), 0);
            }
            wal[at..at + bytes.len()].copy_from_slice(bytes);
        };
        for s in steps {
            let n = match s {
                Step::Restart => {
                    salts = [salts[0] + 1, u32::try_from(random() >> 32).unwrap()];
                    let (h, seed) = wal_header(big, salts);
                    write(&mut wal, 0, &h);
                    sum = seed;
                    published = 0;
                    continue;
                }
                Step::Commit(n) | Step::Killed(n) => *n,
                Step::Torn(n) => n + 1,
            };
            let frames: Vec<(u32, u32, Vec<u8>)> = (0..n)
                .map(|i| {
                    let page: Vec<u8> = (0..512).map(|_| random() as u8).collect();
                    let commit = if i + 1 == n { 9 } else { 0 };
                    (2 + u32::try_from(i).unwrap(), commit, page)
                })
                .collect();
            let (bytes, end) = chain(big, salts, sum, &frames);
            let at = 32 + published * frame_len;
            match s {
                Step::Commit(_) => {
                    write(&mut wal, at, &bytes);
                    published += n;
                    sum = end;
                }
                Step::Killed(_) => write(&mut wal, at, &bytes),
                _ => write(&mut wal, at, &bytes[..(n - 1) * frame_len + 24]),
            }
        }
        (wal, published)
    }

    /// Ops in [`real_files`]: some with payloads over a page (overflow).
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

        /// Whatever live writers leave — commits, writers killed before
        /// publishing (their frames partly overwritten by the next), torn
        /// frames, restarts over older generations, zeros — is never
        /// damage; one byte changed in a published frame or the header
        /// always is.
        #[test]
        fn live_wals_are_never_damage_and_one_flipped_byte_always_is(
            steps in proptest::collection::vec(step(), 1..24),
            seed in 1u64..,
            big in any::<bool>(),
            flip in (any::<prop::sample::Index>(), 1u8..),
        ) {
            let (wal, published) = live_wal(big, &steps, seed);
            prop_assert_eq!(wal_break(&wal, 512), None);
            let parsed = wal_frames(&wal, 512).unwrap();
            prop_assert!(parsed.frames.len() >= published);
            prop_assert!(parsed.frames.iter().all(|f| f.intact));
            if published > 0 {
                let span = 32 + published * (24 + 512);
                let at = flip.0.index(span);
                let mut bad = wal.clone();
                bad[at] ^= flip.1;
                prop_assert!(wal_break(&bad, 512).is_some(), "byte {} of {}", at, span);
            }
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
