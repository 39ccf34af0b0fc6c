"""WAL pages the server's SQLite schema writes per single PUT, by schema
version and setting (issue 21 point 1; figures in folded.md).

A model, not the server: it reads the schema from
crates/guardian-server/src/store/schema.rs, replays the throughput bench's
PUT pattern (16 clients updating their own entity under keys
`p-<client>-<n>`) with the rows one applied PUT writes, in commits of a
given size, and counts the WAL frames (`wal_autocheckpoint=0`).

    python3 crates/guardian-bench/models/wal_pages.py
"""

import hashlib
import json
import os
import re
import sqlite3
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
SCHEMA_RS = os.path.join(ROOT, "..", "..", "guardian-server", "src", "store", "schema.rs")


def migrations():
    text = open(SCHEMA_RS, encoding="utf-8").read()
    block = text[text.index("const MIGRATIONS"):]
    return re.findall(r'r"(.*?)"', block[: block.index("];")], re.S)


def run(ddl, path, group, n=16000, applied=True, body=True, page_size=4096):
    for f in (path, path + "-wal", path + "-shm"):
        if os.path.exists(f):
            os.remove(f)
    c = sqlite3.connect(path, isolation_level=None)
    c.execute(f"PRAGMA page_size={page_size}")
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.executescript(ddl)
    c.execute("INSERT INTO tenants (tenant) VALUES ('bench')")
    for cl in range(16):
        c.execute("INSERT INTO entities VALUES ('bench','bench',?,1,'{}',0,0)", (f"c{cl}",))
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cursor = done = commits = 0
    now = 1_700_000_000_000
    while done < n:
        c.execute("BEGIN")
        for _ in range(group):
            cl, k = done % 16, done // 16 + 1_000_000
            done += 1
            cursor += 1
            now += 1
            data = json.dumps({"n": k, "name": "sensor", "tags": ["a", "b"]}, separators=(",", ":"))
            c.execute(
                "UPDATE entities SET version = version + 1, data = ?, updated_at = ? "
                "WHERE tenant = 'bench' AND entity_type = 'bench' AND id = ?",
                (data, now, f"c{cl}"),
            )
            c.execute(
                "INSERT INTO changes VALUES ('bench', ?, 'update', 'bench', ?, ?, ?, ?)",
                (cursor, f"c{cl}", k, data, now),
            )
            if applied:
                c.execute(
                    "INSERT INTO applied (tenant, idempotency_key, entity_type, id, op, version, cursor, at) "
                    "VALUES ('bench', ?, 'bench', ?, 'update', ?, ?, ?)",
                    (f"p-{cl}-{k}", f"c{cl}", k, cursor, now),
                )
            stored = (
                f'{{"type":"bench","id":"c{cl}","version":{k},"data":{data},'
                f'"updated_at":"2026-12-04T14:00:00.000Z","deleted":false}}'
                if body
                else str(cursor)
            )
            c.execute(
                "INSERT OR REPLACE INTO idempotency (tenant, key, fingerprint, status, body, created_at) "
                "VALUES ('bench', ?, ?, 200, ?, ?)",
                (f"p-{cl}-{k}", hashlib.sha256(str(k).encode()).digest(), stored, now),
            )
        c.execute("UPDATE tenants SET last_cursor = ? WHERE tenant = 'bench'", (cursor,))
        c.execute("COMMIT")
        commits += 1
    frames = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    c.close()
    return frames / commits, frames * page_size / n / 1024


def main():
    steps = migrations()
    variants = [
        ("version 2, applied log", ";".join(steps[:2]), {}),
        ("version 4, applied log", ";".join(steps), {}),
        ("version 4, no applied log (gsync serve)", ";".join(steps), {"applied": False}),
        ("version 4, no log, body by reference", ";".join(steps), {"applied": False, "body": False}),
    ]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.db")
        print("| schema | PUTs per commit | WAL pages per commit | WAL KiB per PUT |")
        print("|---|---:|---:|---:|")
        for name, schema, kw in variants:
            for group in (1, 7, 16, 100):
                pages, kib = run(schema, path, group, **kw)
                print(f"| {name} | {group} | {pages:.1f} | {kib:.1f} |")


if __name__ == "__main__":
    main()
