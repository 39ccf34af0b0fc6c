"""An adversarial pass: the binding used by a careless or hostile Python user.

Risky calls (those that might crash, abort or hang the interpreter) run in a
child interpreter with a timeout; the test asserts on its exit status.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import guardian_sync as gs
from conftest import wait_for

FAST_RETRY = {"base_ms": 50, "cap_ms": 200, "max_attempts": 1000}


def run_child(code: str, *args: str, timeout: float = 30, cwd=None) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; a hang fails the test instead of blocking it."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            capture_output=True, text=True, timeout=timeout, cwd=cwd,
            env={**os.environ, "RUST_BACKTRACE": "0"},
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"child hung for {timeout}s; stdout={e.stdout!r} stderr={e.stderr!r}")


def snapshot(path) -> dict:
    """Bytes and mtime of every file under `path` (or of `path` itself)."""
    # A -shm is SQLite's shared-memory index, written by every reader of a
    # live WAL database: only the database and its WAL must stay as they were.
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if not p.name.endswith("-shm"))
    return {str(p): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in paths}


# --- passing tests: behaviour that is right and could plausibly break ----------


def test_wrong_types_raise_documented_errors_and_store_nothing(server, tmp_path):
    e = gs.Engine(tmp_path / "outbox.db", server.url, server.token)
    cyclic: dict = {}
    cyclic["self"] = cyclic
    bad_enqueues = [
        (gs.InvalidArgumentError, ("create", "note", "a", {"n": float("nan")}), {}),
        (gs.InvalidArgumentError, ("create", "note", "a", {"n": float("inf")}), {}),
        (gs.InvalidArgumentError, (None, "note", "a", {}), {}),
        (gs.InvalidArgumentError, ("create", "note", 5, {}), {}),
        (gs.InvalidArgumentError, ("create", "note", "\ud800", {}), {}),
        (gs.InvalidOpError, ("create", "note", "../x", {}), {}),
        (gs.InvalidOpError, ("create", "note", "a", [1, 2]), {}),
        (gs.InvalidOpError, ("delete", "note", "a", {"x": 1}), {}),
        (TypeError, ("create", "note", "a", {"s": {1, 2}}), {}),
        (TypeError, ("create", "note", "a", {(1, 2): 0}), {}),
        (TypeError, ("create", b"note", "a", {}), {}),
        (ValueError, ("create", "note", "a", cyclic), {}),
        (gs.InvalidArgumentError, ("update", "note", "a", {}), {"base_version": 2**64}),
        (gs.InvalidArgumentError, ("update", "note", "a", {}), {"base_version": -1}),
        (gs.InvalidArgumentError, ("update", "note", "a", {}), {"base_version": 1.5}),
        (gs.InvalidArgumentError, ("update", "note", "a", {}), {"base_version": True}),
        (gs.InvalidArgumentError, ("create", "note", "a", {}), {"txn_token": 5}),
    ]
    for exc, args, kw in bad_enqueues:
        with pytest.raises(exc):
            e.enqueue(*args, **kw)
    for kw in ({"limit": 1.5}, {"limit": -1}, {"limit": True}, {"limit": 2**70},
               {"after_seq": 2**63}, {"state": "bogus"}):
        with pytest.raises(gs.InvalidArgumentError):
            e.ops(**kw)
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError):
            e.stop(t)
        with pytest.raises(ValueError):
            e.next_event(t)
    with pytest.raises(TypeError):
        e.next_event(None)
    with pytest.raises(OverflowError):
        e.stop(10**400)
    for v in (None, b"x", 1):
        with pytest.raises(TypeError):
            e.retry(v)
        with pytest.raises(TypeError):
            e.set_token(v)
    for tok in ("", "a\nb", "a b", "é"):
        with pytest.raises(gs.InvalidArgumentError):
            e.set_token(tok)
    for ops in ([], None, {"kind": "create"}):
        with pytest.raises((gs.InvalidArgumentError, gs.InvalidOpError)):
            e.transaction(ops)
    assert e.status()["pending"] == 0 and e.ops() == []  # nothing refused was stored
    # Closed: every call raises ClosedError; close again is fine.
    e.close()
    e.close()
    for call in (e.status, e.run, e.stop, e.next_event, e.retry_all, lambda: e.running,
                 lambda: e.enqueue("create", "note", "z", {}), lambda: e.set_token("t"),
                 lambda: e.ops(), lambda: e.transaction([])):
        with pytest.raises(gs.ClosedError):
            call()
    with e:  # a with block on a closed engine closes it again quietly
        pass


def test_integers_beyond_64_bits_reach_the_server_exactly(server, tmp_path):
    # serde_json's arbitrary_precision comes only from feature unification
    # (guardian-protocol); without it these become lossy floats silently.
    payload = {"big": 2**64 + 1, "neg": -(2**70) - 3, "max": 2**64 - 1, "f": 1.5e308}
    with gs.Engine(tmp_path / "outbox.db", server.url, server.token, retry=FAST_RETRY) as e:
        e.enqueue("create", "note", "big", payload)
        assert e.ops()[0]["payload"] == payload
        e.run()
        wait_for(e, lambda ev: ev["event"] == "op_succeeded")
    assert server.entity("note", "big")["data"] == payload


def test_foreign_paths_are_refused_and_left_untouched(server, tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    (d / "keep.txt").write_text("keep")
    text = tmp_path / "notes.txt"
    text.write_text("CREATE TABLE txn_outcomes\nidempotency_key  TEXT\n" * 50)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE ops (seq INTEGER PRIMARY KEY, x TEXT)")
        c.execute("INSERT INTO ops (x) VALUES ('mine')")
    c.close()
    walled = tmp_path / "walled.sqlite"
    live = sqlite3.connect(walled)  # another program's database, in use, in WAL mode
    live.execute("PRAGMA journal_mode=WAL")
    live.execute("CREATE TABLE t (x)")
    live.execute("INSERT INTO t VALUES ('uncheckpointed')")
    live.commit()
    try:
        before = snapshot(tmp_path)
        for target in (d, text, other, walled, "/dev/null"):
            with pytest.raises(gs.OpenError, match="not a guardian outbox"):
                gs.Engine(target, server.url, server.token)
        assert snapshot(tmp_path) == before  # same files, same bytes, same mtimes
        assert live.execute("SELECT x FROM t").fetchall() == [("uncheckpointed",)]
    finally:
        live.close()


CONCURRENT_CHILD = """
import json, os, sys, threading, time, guardian_sync as gs
e = gs.Engine(sys.argv[1], sys.argv[2], sys.argv[3], retry={"base_ms": 50, "cap_ms": 200})
e.run()
acked, errors = [], []
def worker(k):
    for j in range(400):
        try:
            m = j % 5
            if m == 0:
                e.enqueue("create", "note", f"k{k}-{j}", {"j": j}); acked.append(f"k{k}-{j}")
            elif m == 1: e.status()
            elif m == 2: e.ops(limit=5)
            elif m == 3: e.next_event(0.01)
            else: e.retry_all()
        except gs.ClosedError:
            return
        except BaseException as ex:
            errors.append(repr(ex)); return
ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
for t in ts: t.start()
time.sleep(0.3)
e.close()
for t in ts: t.join(20)
time.sleep(0.5)
tasks = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
print(json.dumps({"acked": acked, "errors": errors, "alive": sum(t.is_alive() for t in ts), "tasks": tasks}))
"""


def test_threads_hammering_while_closed_lose_no_acked_op(server, tmp_path):
    db = str(tmp_path / "outbox.db")
    r = run_child(CONCURRENT_CHILD, db, server.url, server.token)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["errors"] == [] and out["alive"] == 0
    assert out["tasks"] == 1, "engine threads outlived close()"
    assert out["acked"], "no enqueue got through before close"
    with gs.Engine(db, server.url, server.token) as e:
        left = {o["entity_id"] for o in e.ops(limit=10_000)}
    for eid in out["acked"]:  # acknowledged = durable: in the outbox or on the server
        assert eid in left or server.entity("note", eid) is not None, eid


CALLBACK_CHILD = """
import sys, time, guardian_sync as gs
url, db = sys.argv[1], sys.argv[2]
def raises(r): raise RuntimeError("boom")
def kbi(r): raise KeyboardInterrupt
def exits(r): raise SystemExit(3)
def sleeps(r): time.sleep(1.0); raise RuntimeError("late")
bad = [raises, kbi, exits, lambda r: 12345, lambda r: b"tok", lambda r: None,
       lambda r: "bad token\\n", sleeps]
for i, cb in enumerate(bad):
    e = gs.Engine(f"{db}{i}", url, token_callback=cb, retry={"base_ms": 50, "cap_ms": 200})
    e.enqueue("create", "note", "n", {}); e.run()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ev = e.next_event(0.2)
        if ev and ev["event"] == "auth_required": break
    else:
        raise AssertionError(f"callback {i}: no auth_required")
    assert e.status()["pending"] + e.status()["in_flight"] == 1
    t0 = time.monotonic(); e.close()
    assert time.monotonic() - t0 < 5, f"close took {time.monotonic() - t0:.1f}s"
print("ok")
"""


def test_misbehaving_token_callbacks_pause_the_engine_without_crashing(server, tmp_path):
    r = run_child(CALLBACK_CHILD, server.url, str(tmp_path / "cb.db"), timeout=45)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.stdout, r.stderr[-2000:])


EXIT_CHILD = """
import sys, threading, time, guardian_sync as gs
db, url, tok = sys.argv[1:4]
e = gs.Engine(db, url, tok, concurrency=1, batch={"max_ops": 0})
for i in range(5): e.enqueue("create", "item", f"i{i}", {"i": i})
e.run()
while (ev := e.next_event(5)) and ev["event"] != "op_succeeded": pass
t0 = time.monotonic(); del e  # dropped, not closed, mid-drain
print("drop took", round(time.monotonic() - t0, 2), flush=True)
def slow(r): time.sleep(0.5); return tok
e2 = gs.Engine(db + "2", url, token_callback=slow)
e2.enqueue("create", "item", "other", {}); e2.run()
threading.Thread(target=e2.next_event, args=(60,), daemon=True).start()
time.sleep(0.2)
print("exiting", flush=True)  # no close: the interpreter must still exit
"""


def test_engine_dropped_mid_drain_and_interpreter_exit_without_close(slow_server, tmp_path):
    server, db = slow_server, str(tmp_path / "outbox.db")
    t0 = time.monotonic()
    r = run_child(EXIT_CHILD, db, server.url, server.token, timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == "exiting" and time.monotonic() - t0 < 25
    assert float(r.stdout.split()[2]) < 12
    with gs.Engine(db, server.url, server.token, retry=FAST_RETRY) as e:
        e.run()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (e.status()["pending"] or e.status()["in_flight"]):
            e.next_event(0.2)
        assert e.status()["pending"] == 0 and e.status()["failed"] == 0
    for i in range(5):  # each applied exactly once
        assert server.entity("item", f"i{i}")["version"] == 1


# --- found by the adversarial pass; each failed before its fix --------------


def test_none_is_refused_and_bytes_is_a_path(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError):
        gs.Engine(None, server.url, server.token)
    assert os.listdir(tmp_path) == [], "Engine(None) created a file"
    # Bytes name a file as everywhere in Python's os APIs, not by their repr.
    gs.Engine(b"bytes.db", server.url, server.token).close()
    # The writers' lock file is made beside every outbox opened for writing.
    assert sorted(os.listdir(tmp_path)) == ["bytes.db", "bytes.db.writers"]


def test_special_sqlite_names_are_not_silently_volatile(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in (":memory:", f"file:{tmp_path}/m.db?mode=memory"):
        try:
            e = gs.Engine(name, server.url, server.token)
        except gs.GuardianSyncError:
            continue  # refusing the name is fine too
        e.enqueue("create", "note", "n1", {"x": 1})  # "durable now"
        e.close()
        with gs.Engine(name, server.url, server.token) as again:
            assert again.status()["pending"] == 1, f"{name}: the acknowledged op is gone"


def test_non_callable_token_callback_is_refused(server, tmp_path):
    try:
        e = gs.Engine(tmp_path / "outbox.db", server.url, token_callback=42)
    except TypeError:
        return
    e.close()
    pytest.fail("token_callback=42 accepted")


def test_close_inside_token_callback_is_not_an_internal_error(server, tmp_path):
    caught: list = []
    holder: list = []

    def cb(refresh: bool) -> str:
        try:
            holder[0].close()
        except BaseException as ex:  # noqa: BLE001 - record whatever it is
            caught.append(ex)
        return server.token

    with gs.Engine(tmp_path / "outbox.db", server.url, token_callback=cb, retry=FAST_RETRY) as e:
        holder.append(e)
        e.enqueue("create", "note", "c", {})
        e.run()
        wait_for(e, lambda ev: ev["event"] == "op_succeeded", seconds=15)
    assert caught and isinstance(caught[0], gs.GuardianSyncError) and caught[0].code == -9
    assert not isinstance(caught[0], gs.InternalError), "InternalError is documented as an engine bug"


PANIC_CHILD = """
import resource, guardian_sync as gs
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # bound a release build's spawn attempt
try:
    gs.Engine("{db}", "http://127.0.0.1:9", "t", worker_threads=2**64 - 1)
    print("opened")
except gs.GuardianSyncError as ex:
    print("typed", type(ex).__name__)
except BaseException as ex:
    print("untyped", type(ex).__name__, ex)
"""


def test_absurd_worker_threads_is_a_typed_error(tmp_path):
    r = run_child(PANIC_CHILD.format(db=tmp_path / "outbox.db"), timeout=30)
    assert r.returncode == 0, r.stderr[-1000:]
    assert r.stdout.startswith("typed InvalidArgumentError"), r.stdout


SIGINT_CHILD = """
import sys, time, guardian_sync as gs
e = gs.Engine(sys.argv[1], "http://127.0.0.1:9", "t")
print("ready", flush=True)
t0 = time.monotonic()
try:
    e.next_event(6)
    print("no interrupt", flush=True)
except KeyboardInterrupt:
    print(f"interrupted {time.monotonic() - t0:.2f}", flush=True)
e.close()
"""


def interrupted_child(code: str, *args: str):
    """Runs `code` in a child Python, sends it SIGINT half a second after it
    prints "ready", and returns its stdout, stderr, exit code and how long
    it took to exit after the signal."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
        waited = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    return out, err, child.returncode, waited


def test_ctrl_c_interrupts_a_long_next_event(tmp_path):
    out, err, _, waited = interrupted_child(SIGINT_CHILD, str(tmp_path / "o.db"))
    assert out.startswith("interrupted") and waited < 2.5, (out, err[-2000:], waited)


CLOSE_SIGINT_CHILD = """
import sys, threading, time, guardian_sync as gs
entered, never = threading.Event(), threading.Event()
def hangs(refresh):
    entered.set()
    never.wait()
    return "t"
e = gs.Engine(sys.argv[1], "http://127.0.0.1:9", token_callback=hangs)
e.enqueue("create", "note", "n", {})
e.run()
assert entered.wait(20), "the token callback was never called"
print("ready", flush=True)
t0 = time.monotonic()
try:
    e.close()
    print("closed", flush=True)
except KeyboardInterrupt:
    print(f"interrupted {time.monotonic() - t0:.2f}", flush=True)
try:
    e.status()
    print("still open", flush=True)
except gs.ClosedError:
    print("closed after", flush=True)
"""


def test_ctrl_c_ends_a_close_that_waits_for_a_hung_token_callback(tmp_path):
    out, err, code, waited = interrupted_child(CLOSE_SIGINT_CHILD, str(tmp_path / "o.db"))
    assert out.startswith("interrupted") and waited < 2.5, (out, err[-2000:], waited)
    assert "closed after" in out, out
    assert code == 0, (code, err[-2000:])


def test_too_deep_payload_is_always_invalid_op(server, tmp_path):
    def nest(n: int):
        x: object = 1
        for _ in range(n):
            x = {"a": x}
        return x

    with gs.Engine(tmp_path / "outbox.db", server.url, server.token) as e:
        for depth in (101, 126, 127, 200):
            with pytest.raises(gs.InvalidOpError):
                e.enqueue("create", "note", f"d{depth}", nest(depth))
