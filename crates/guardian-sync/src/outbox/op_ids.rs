//! Op ids derived from positions (schema 6).
//!
//! An enqueued op's id is a version-8 UUID made of a random namespace (60
//! bits) and the op's position `seq` (the low 62 bits), so finding an op by
//! id is a primary-key lookup and `ops` keeps no index of ids: one b-tree
//! less to write per enqueue and per ack. Each open draws its namespace
//! ([`namespace`]), so two opens never derive the same id, even for a
//! position reused after a commit that failed (the failed enqueue's caller
//! was told that id and looks for it); within one open no position is
//! given twice (`Ctx::seq_floor`).
//!
//! A row whose id does not name its own position is "foreign"
//! (`foreign_id = 1`, the column's default): rows from before schema 6,
//! rows salvaged into a fresh file, rows written by other tools. Those are
//! found, and kept unique, through the partial index `ops_foreign_id`. A
//! lookup tries the position the id names first, and checks that the row
//! there has that very id, so it never confuses the two kinds.

use rusqlite::{params, Connection, OptionalExtension, Row};
use uuid::{Uuid, Variant};

use crate::op::OpId;

const SEQ_BITS: u32 = 62;
const SEQ_MASK: u128 = (1 << SEQ_BITS) - 1;
/// The namespace's bits beside the version nibble (the rest go first).
const NS_LOW_BITS: u32 = 12;

/// The id an op stored at `seq` gets under namespace `ns` (60 bits used);
/// `None` for a position too large to name (2^62 and beyond).
pub(crate) fn derive(ns: u64, seq: i64) -> Option<OpId> {
    let seq = u128::try_from(seq).ok().filter(|&s| s <= SEQ_MASK)?;
    let ns = u128::from(ns);
    let high = (ns >> NS_LOW_BITS) & ((1 << 48) - 1);
    let low = ns & ((1 << NS_LOW_BITS) - 1);
    let v = (high << 80) | (0x8 << 76) | (low << 64) | (0b10 << SEQ_BITS) | seq;
    Some(Uuid::from_u128(v))
}

/// The position an id of the derived form names, whatever its namespace.
pub(crate) fn position(id: OpId) -> Option<i64> {
    if id.get_version_num() != 8 || id.get_variant() != Variant::RFC4122 {
        return None;
    }
    i64::try_from(id.as_u128() & SEQ_MASK).ok()
}

/// A namespace for the ids one open gives. Not stored: lookups read the
/// id a row holds and never derive one.
pub(crate) fn namespace() -> u64 {
    rand::random()
}

/// `columns` of the op with this id, read by `read`, if it is stored.
pub(crate) fn find<T>(
    conn: &Connection,
    id: OpId,
    columns: &str,
    read: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    let mut buf = Uuid::encode_buffer();
    let text: &str = id.hyphenated().encode_lower(&mut buf);
    if let Some(seq) = position(id) {
        let found = conn
            .prepare_cached(&format!(
                "SELECT {columns} FROM ops WHERE seq = ?1 AND op_id = ?2"
            ))?
            .query_row(params![seq, text], &read)
            .optional()?;
        if found.is_some() {
            return Ok(found);
        }
    }
    conn.prepare_cached(&format!(
        "SELECT {columns} FROM ops WHERE op_id = ?1 AND foreign_id = 1"
    ))?
    .query_row([text], &read)
    .optional()
}

/// Whether a foreign row already has this id (then a derived id for a new
/// op would not be unique: only after a namespace collision, or a row
/// salvaged from a file that shared this one's namespace).
pub(crate) fn taken_by_foreign(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM ops WHERE op_id = ?1 AND foreign_id = 1")?
        .query_row([id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Marks foreign every row the lookup by position would miss: a row not
/// marked foreign whose id does not name its own position (a file edited
/// by hand, or damaged). Returns how many were marked; a row whose id a
/// foreign row already has stays as it is (its id is not unique).
pub(crate) fn refile_misplaced(conn: &Connection) -> rusqlite::Result<u64> {
    let misplaced: Vec<i64> = conn
        .prepare("SELECT seq, op_id FROM ops WHERE foreign_id IS NOT 1")?
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get_ref(1)?.as_str().ok().map(str::to_owned),
            ))
        })?
        .filter_map(Result::ok)
        .filter(|(seq, id)| {
            let named = id
                .as_deref()
                .and_then(|t| Uuid::parse_str(t).ok())
                .and_then(position);
            named != Some(*seq)
        })
        .map(|(seq, _)| seq)
        .collect();
    let mut marked = 0;
    for seq in misplaced {
        match conn.execute("UPDATE ops SET foreign_id = 1 WHERE seq = ?1", [seq]) {
            Ok(n) => marked += n as u64,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation => {}
            Err(e) => return Err(e),
        }
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_names_its_position_and_namespace() {
        let ns = 0x0123_4567_89ab_cdef;
        for seq in [0, 1, 2, 1 << 40, (1 << 62) - 1] {
            let id = derive(ns, seq).unwrap();
            assert_eq!(id.get_version_num(), 8);
            assert_eq!(id.get_variant(), Variant::RFC4122);
            assert_eq!(position(id), Some(seq));
        }
        assert_ne!(derive(ns, 7), derive(ns ^ 1, 7), "namespaces apart");
        assert_ne!(derive(ns, 7), derive(ns, 8));
        assert_eq!(derive(ns, 1 << 62), None);
        assert_eq!(derive(ns, -1), None);
    }

    #[test]
    fn other_ids_name_no_position() {
        assert_eq!(position(Uuid::now_v7()), None);
        assert_eq!(position(Uuid::new_v4()), None);
        assert_eq!(position(Uuid::nil()), None);
    }
}
