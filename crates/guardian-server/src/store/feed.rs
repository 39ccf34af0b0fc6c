//! The per-tenant change feed.
//!
//! Cursors come from `tenants.last_cursor`, bumped in the mutation's own
//! transaction, so they are gap-free per tenant and a change is visible
//! exactly when its mutation is. Retention deletes old changes from the front
//! and raises `purged_through`; a reader whose `since` is below it has missed
//! changes and is told so (410 `cursor-expired`). A reader that names the
//! change it holds at `since` (its [`ChangeFingerprint`]) is told the same
//! when this feed's change there is another one: the feed was rewritten
//! under it (a restore from a backup that then took writes).

use guardian_protocol::{Change, ChangeFingerprint, MutationKind};
use rusqlite::{params, OptionalExtension, Transaction};

use super::{from_i64, to_i64, Cutoff, StoreError};

/// Why a feed read was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FeedRefusal {
    /// `since` is older than the retained feed.
    Expired {
        since: u64,
        purged_through: u64,
        last: u64,
    },
    /// `since` is newer than any cursor this server handed out.
    Ahead { since: u64, last: u64 },
    /// The change at `since` is not the one the reader holds (or is
    /// missing from the retained feed): the feed was rewritten after it.
    Diverged { since: u64, last: u64 },
}

/// `(last_cursor, purged_through)` of a tenant; zeros for a new tenant.
pub(crate) fn counters(
    conn: &rusqlite::Connection,
    tenant: &str,
) -> Result<(u64, u64), StoreError> {
    let row = conn
        .prepare_cached("SELECT last_cursor, purged_through FROM tenants WHERE tenant = ?1")?
        .query_row(params![tenant], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    Ok(row.map_or((0, 0), |(l, p)| (from_i64(l), from_i64(p))))
}

/// Checks that the changes after `since` are all still retained and, if
/// the reader says which change it holds at `since`, that it is this
/// feed's.
pub(crate) fn check_since(
    conn: &rusqlite::Connection,
    tenant: &str,
    since: u64,
    holds: Option<ChangeFingerprint>,
) -> Result<Result<u64, FeedRefusal>, StoreError> {
    let (last, purged_through) = counters(conn, tenant)?;
    let last = match judge_since(since, last, purged_through) {
        Ok(last) => last,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let Some(holds) = holds.filter(|_| checkable(since, purged_through)) else {
        return Ok(Ok(last));
    };
    let found = conn
        .prepare_cached(
            "SELECT entity_type, id, version FROM changes WHERE tenant = ?1 AND cursor = ?2",
        )?
        .query_row(params![tenant, to_i64(since)], |r| {
            Ok(ChangeFingerprint::of(
                &r.get::<_, String>(0)?,
                &r.get::<_, String>(1)?,
                from_i64(r.get::<_, i64>(2)?),
            ))
        })
        .optional()?;
    Ok(judge_held(since, last, holds, found))
}

/// Whether the change at `since` can be compared with the reader's: it is
/// in the retained feed. At the feed's front (`since` = `purged_through`,
/// 0 included) it was purged or never existed; refusing there would send
/// every reader of a feed that was quiet for the whole retention into a
/// resync, so such a `since` is served as without a fingerprint.
pub(crate) fn checkable(since: u64, purged_through: u64) -> bool {
    since > purged_through
}

/// The refusal when the retained change at `since` (`found`, by its
/// fingerprint) is missing or is not the one the reader `holds`.
pub(crate) fn judge_held(
    since: u64,
    last: u64,
    holds: ChangeFingerprint,
    found: Option<ChangeFingerprint>,
) -> Result<u64, FeedRefusal> {
    if found == Some(holds) {
        Ok(last)
    } else {
        Err(FeedRefusal::Diverged { since, last })
    }
}

/// Whether the changes after `since` are all retained, given the tenant's
/// counters: `Ok(last)`, or why not.
pub(crate) fn judge_since(since: u64, last: u64, purged_through: u64) -> Result<u64, FeedRefusal> {
    if since < purged_through {
        Err(FeedRefusal::Expired {
            since,
            purged_through,
            last,
        })
    } else if since > last {
        Err(FeedRefusal::Ahead { since, last })
    } else {
        Ok(last)
    }
}

/// Hands out a tenant's next cursors inside one write transaction: reads
/// `last_cursor` once, counts in memory, and writes it back once
/// ([`Cursors::finish`], before the commit) instead of bumping the row per
/// change. Sound because the store's single connection serializes writers.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Cursors {
    /// The last cursor handed out, once the row has been read.
    last: Option<u64>,
    /// Whether any cursor was handed out (the row must be written back).
    dirty: bool,
}

impl Cursors {
    /// The next cursor of `tenant`.
    pub(crate) fn next(&mut self, tx: &Transaction<'_>, tenant: &str) -> Result<u64, StoreError> {
        let last = match self.last {
            Some(l) => l,
            None => counters(tx, tenant)?.0,
        };
        let next = last + 1;
        self.last = Some(next);
        self.dirty = true;
        Ok(next)
    }

    /// Writes the last cursor handed out to `tenants`.
    pub(crate) fn finish(self, tx: &Transaction<'_>, tenant: &str) -> Result<(), StoreError> {
        let (true, Some(last)) = (self.dirty, self.last) else {
            return Ok(());
        };
        tx.prepare_cached(
            "INSERT INTO tenants (tenant, last_cursor) VALUES (?1, ?2)
             ON CONFLICT (tenant) DO UPDATE SET last_cursor = excluded.last_cursor",
        )?
        .execute(params![tenant, to_i64(last)])?;
        Ok(())
    }
}

/// SQL of the change an applied mutation appends.
pub(crate) const APPEND_SQL: &str =
    "INSERT INTO changes (tenant, cursor, op, entity_type, id, version, data, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Up to `limit` changes after `since`, in cursor order, ending with the
/// one whose data takes the page past `max_bytes`.
pub(crate) fn read(
    conn: &rusqlite::Connection,
    tenant: &str,
    since: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<Change>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT cursor, op, entity_type, id, version, data FROM changes
         WHERE tenant = ?1 AND cursor > ?2 ORDER BY cursor LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![
            tenant,
            to_i64(since),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for row in rows {
        if bytes > max_bytes {
            break;
        }
        let (cursor, op, entity_type, id, version, data) = row?;
        bytes = bytes.saturating_add(data.len());
        out.push(Change {
            cursor: from_i64(cursor),
            op: parse_op(&op)?,
            entity_type,
            id,
            version: from_i64(version),
            data: serde_json::from_str(&data)
                .map_err(|e| StoreError::Corrupt(format!("change data is not JSON: {e}")))?,
        });
    }
    Ok(out)
}

pub(crate) fn parse_op(op: &str) -> Result<MutationKind, StoreError> {
    match op {
        "create" => Ok(MutationKind::Create),
        "update" => Ok(MutationKind::Update),
        "delete" => Ok(MutationKind::Delete),
        other => Err(StoreError::Corrupt(format!("unknown op {other:?}"))),
    }
}

/// Deletes each tenant's expired front: its changes in cursor order up to
/// the first one still young (see [`Cutoff`]); returns how many.
///
/// Walking the feed from its front reads only what it deletes (and one row
/// more), so no index on `at` is kept up to date on every write. After a
/// clock step back a younger change can precede older ones: the front stops
/// there, so nothing younger than the retention is deleted. A change
/// stamped in the future goes with the front (the feed stays a prefix; a
/// reader behind it is told 410 and resyncs).
pub(crate) fn purge(tx: &Transaction<'_>, cutoff: Cutoff) -> Result<usize, StoreError> {
    let tenants: Vec<(String, i64)> = {
        let mut stmt = tx.prepare(
            "SELECT tenant, purged_through FROM tenants WHERE last_cursor > purged_through",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut fronts = Vec::new();
    {
        let mut stmt = tx.prepare(
            "SELECT cursor, at FROM changes WHERE tenant = ?1 AND cursor > ?2 ORDER BY cursor",
        )?;
        for (tenant, from) in tenants {
            let mut rows = stmt.query(params![tenant, from])?;
            let mut through = None;
            while let Some(row) = rows.next()? {
                if cutoff.stops_at(row.get::<_, i64>(1)?) {
                    break;
                }
                through = Some(row.get::<_, i64>(0)?);
            }
            if let Some(t) = through {
                fronts.push((tenant, t));
            }
        }
    }
    let mut purged = 0;
    for (tenant, through) in fronts {
        purged += tx.execute(
            "DELETE FROM changes WHERE tenant = ?1 AND cursor <= ?2",
            params![tenant, through],
        )?;
        tx.execute(
            "UPDATE tenants SET purged_through = MAX(purged_through, ?2) WHERE tenant = ?1",
            params![tenant, through],
        )?;
    }
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{schema, Synchronous};

    /// A cutoff at `not_before` with the clock well past every stamp.
    fn cut(not_before: i64) -> Cutoff {
        Cutoff {
            not_before,
            now: 50_000,
        }
    }

    /// Retention deletes each tenant's expired front and stops at the first
    /// change still young, even when a clock step back put older changes
    /// after it; a tenant with nothing expired keeps everything.
    #[test]
    fn purge_takes_the_expired_front_only() {
        let mut conn = schema::open(None, Synchronous::Full).unwrap();
        let tx = conn.transaction().unwrap();
        // Tenant a: 1 and 2 old, 3 young (clock stepped forward), 4 old
        // again (stepped back). Tenant b: all young.
        for (tenant, cursor, at) in [
            ("a", 1, 100),
            ("a", 2, 200),
            ("a", 3, 9_000),
            ("a", 4, 300),
            ("b", 1, 8_000),
        ] {
            tx.execute(
                "INSERT INTO changes VALUES (?1, ?2, 'create', 'd', ?2, 1, '{}', ?3)",
                params![tenant, cursor, at],
            )
            .unwrap();
        }
        tx.execute_batch("INSERT INTO tenants (tenant, last_cursor) VALUES ('a', 4), ('b', 1)")
            .unwrap();
        assert_eq!(purge(&tx, cut(1_000)).unwrap(), 2);
        assert_eq!(counters(&tx, "a").unwrap(), (4, 2));
        assert_eq!(counters(&tx, "b").unwrap(), (1, 0));
        let left: Vec<u64> = read(&tx, "a", 2, 10, usize::MAX)
            .unwrap()
            .iter()
            .map(|c| c.cursor)
            .collect();
        assert_eq!(left, [3, 4]);
        // Once the young change expires, the rest of the front goes too.
        assert_eq!(purge(&tx, cut(10_000)).unwrap(), 3);
        assert_eq!(counters(&tx, "a").unwrap(), (4, 4));
        assert_eq!(counters(&tx, "b").unwrap(), (1, 1));
        // Nothing left to purge.
        assert_eq!(purge(&tx, cut(10_000)).unwrap(), 0);
    }

    /// A reader's change is compared only inside the retained feed, and a
    /// missing one there counts as another.
    #[test]
    fn a_held_change_is_compared_only_inside_the_retained_feed() {
        let mut conn = schema::open(None, Synchronous::Full).unwrap();
        let tx = conn.transaction().unwrap();
        for cursor in 1..=4 {
            tx.execute(
                "INSERT INTO changes VALUES ('a', ?1, 'create', 'd', ?1, 1, '{}', 100)",
                params![cursor],
            )
            .unwrap();
        }
        tx.execute_batch(
            "INSERT INTO tenants (tenant, last_cursor, purged_through) VALUES ('a', 4, 1)",
        )
        .unwrap();
        let at3 = ChangeFingerprint::of("d", "3", 1);
        assert_eq!(check_since(&tx, "a", 3, Some(at3)).unwrap(), Ok(4));
        assert_eq!(
            check_since(&tx, "a", 2, Some(at3)).unwrap(),
            Err(FeedRefusal::Diverged { since: 2, last: 4 })
        );
        // The front (purged through 1) cannot be compared: served.
        assert_eq!(check_since(&tx, "a", 1, Some(at3)).unwrap(), Ok(4));
        // Missing inside the retained feed: refused.
        tx.execute("DELETE FROM changes WHERE cursor = 3", [])
            .unwrap();
        assert_eq!(
            check_since(&tx, "a", 3, Some(at3)).unwrap(),
            Err(FeedRefusal::Diverged { since: 3, last: 4 })
        );
        assert_eq!(check_since(&tx, "a", 3, None).unwrap(), Ok(4));
    }

    /// A change stamped in the future (the clock ran ahead, then came back)
    /// does not stall the purge: it goes with the expired front, which stops
    /// at the first change young by the clock as it is now.
    #[test]
    fn purge_passes_a_change_from_the_future() {
        let mut conn = schema::open(None, Synchronous::Full).unwrap();
        let tx = conn.transaction().unwrap();
        for (cursor, at) in [(1, 100), (2, 90_000), (3, 200), (4, 2_000)] {
            tx.execute(
                "INSERT INTO changes VALUES ('a', ?1, 'create', 'd', ?1, 1, '{}', ?2)",
                params![cursor, at],
            )
            .unwrap();
        }
        tx.execute_batch("INSERT INTO tenants (tenant, last_cursor) VALUES ('a', 4)")
            .unwrap();
        assert_eq!(purge(&tx, cut(1_000)).unwrap(), 3);
        assert_eq!(counters(&tx, "a").unwrap(), (4, 3));
    }
}
