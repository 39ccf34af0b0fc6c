"""The Python binding against the real reference server (`gsync serve`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import guardian_sync as gs
from conftest import wait_for

FAST_RETRY = {"base_ms": 50, "cap_ms": 200, "max_attempts": 1000}


def succeeded(ev: dict) -> bool:
    return ev["event"] == "op_succeeded"


def test_offline_enqueue_then_drain(server, tmp_path):
    with gs.Engine(tmp_path / "outbox.db", server.url, server.token, retry=FAST_RETRY) as e:
        ids = [e.enqueue("create", "note", f"n{i}", {"i": i}) for i in range(10)]
        assert len(set(ids)) == 10
        # Offline: nothing sent, everything durable.
        st = e.status()
        assert st["pending"] == 10 and st["running"] is False
        e.run()
        assert e.running
        done = [ev for ev in e.events(idle_timeout=10) if succeeded(ev)]
        while len(done) < 10:  # pragma: no cover - only if the idle timeout cut in
            done += [ev for ev in e.events(idle_timeout=10) if succeeded(ev)]
        assert sorted(ev["op_id"] for ev in done[:10]) == sorted(ids)
        st = e.status()
        assert st["pending"] == 0 and st["in_flight"] == 0 and st["failed"] == 0
        e.stop()
        assert not e.running
    for i in range(10):
        ent = server.entity("note", f"n{i}")
        assert ent is not None and ent["data"] == {"i": i} and ent["version"] == 1


def test_conflict_409_is_merged(server, tmp_path):
    status, _ = server.request("POST", "/v1/entities/doc", {"id": "d1", "data": {"title": "server", "tags": 1}})
    assert status in (200, 201)
    with gs.Engine(tmp_path / "outbox.db", server.url, server.token, retry=FAST_RETRY) as e:
        # A create of an entity the server already has: a 409, reconciled
        # into an update merged with the server's data.
        e.enqueue("create", "doc", "d1", {"title": "server", "body": "local"})
        e.run()
        seen = wait_for(e, succeeded)
        conflicts = [ev for ev in seen if ev["event"] == "conflict"]
        assert conflicts, seen
        assert conflicts[0]["remote"] == {"title": "server", "tags": 1}
    ent = server.entity("doc", "d1")
    assert ent["version"] == 2
    assert ent["data"]["body"] == "local" and ent["data"]["title"] == "server"


def test_dead_letter_is_retried(server, tmp_path):
    with gs.Engine(tmp_path / "outbox.db", server.url, server.token, retry=FAST_RETRY) as e:
        op_id = e.enqueue("update", "note", "later", {"v": 2})
        e.run()
        failed = wait_for(e, lambda ev: ev["event"] == "op_failed")[-1]
        assert failed["op_id"] == op_id and "404" in failed["error"]
        dead = e.ops(state="failed")
        assert [o["op_id"] for o in dead] == [op_id]
        assert e.status()["failed"] == 1
        with pytest.raises(gs.WrongStateError):
            e.cancel(op_id)
        # The app fixes the cause (the entity now exists) and retries.
        status, _ = server.request("POST", "/v1/entities/note", {"id": "later", "data": {"v": 1}})
        assert status in (200, 201)
        e.retry(op_id)
        ok = wait_for(e, succeeded)[-1]
        assert ok["op_id"] == op_id
        assert e.status()["failed"] == 0
    assert server.entity("note", "later")["data"] == {"v": 2}


CHILD = textwrap.dedent(
    """
    import sys, guardian_sync as gs
    # One op per request, one at a time, so the kill lands mid-drain.
    e = gs.Engine(
        sys.argv[1], sys.argv[2], sys.argv[3], concurrency=1, batch={"max_ops": 0}
    )
    e.run()
    for ev in e.events():
        print(ev["event"], flush=True)
    """
)


def test_runner_killed_and_replaced(slow_server, tmp_path):
    server = slow_server
    db = str(tmp_path / "outbox.db")
    with gs.Engine(db, server.url, server.token) as e:
        for i in range(6):
            e.enqueue("create", "item", f"i{i}", {"i": i})
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, db, server.url, server.token],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)},
    )
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and line.strip() != "op_succeeded":
            line = child.stdout.readline()
            assert line, "the child runner exited early"
        assert line.strip() == "op_succeeded"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    # A new runner takes over at once (the dead one's OS lock is gone) and
    # drains the rest; every item is applied exactly once.
    with gs.Engine(db, server.url, server.token, retry=FAST_RETRY) as e:
        left = e.status()["pending"] + e.status()["in_flight"]
        assert 0 < left < 6
        e.run()
        seen = wait_for(e, lambda ev: ev["event"] == "lock_acquired")
        n = sum(1 for ev in seen if succeeded(ev))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = e.status()
            if st["pending"] == 0 and st["in_flight"] == 0:
                break
            ev = e.next_event(0.2)
            n += ev is not None and succeeded(ev)
        st = e.status()
        assert st["pending"] == 0 and st["in_flight"] == 0 and st["failed"] == 0
    for i in range(6):
        ent = server.entity("item", f"i{i}")
        assert ent is not None and ent["data"] == {"i": i} and ent["version"] == 1


def test_async_iterator(server, tmp_path):
    async def main() -> list:
        with gs.Engine(tmp_path / "outbox.db", server.url, server.token) as e:
            e.enqueue("create", "note", "a1", {"x": 1})
            e.run()
            got = []
            async for ev in e.aevents(idle_timeout=30):
                got.append(ev)
                if succeeded(ev):
                    break
            return got

    got = asyncio.run(asyncio.wait_for(main(), 60))
    assert got[-1]["event"] == "op_succeeded" and got[-1]["entity_id"] == "a1"


def test_typed_exceptions(server, tmp_path):
    with pytest.raises(gs.InvalidArgumentError, match="tokn"):
        gs.Engine(tmp_path / "x.db", server.url, tokn="t")
    with pytest.raises(gs.InvalidArgumentError):
        gs.Engine(tmp_path / "x.db", "ftp://nowhere", "t")
    with pytest.raises(gs.OpenError):
        gs.Engine(tmp_path / "no" / "such" / "dir" / "x.db", server.url, "t")
    e = gs.Engine(tmp_path / "outbox.db", server.url, server.token)
    with pytest.raises(gs.InvalidOpError):
        e.enqueue("create", "Bad Type", "x", {})
    with pytest.raises(gs.InvalidOpError):
        e.enqueue("create", "note", "x", None)
    with pytest.raises(gs.InvalidArgumentError):
        e.enqueue("upsert", "note", "x", {})
    with pytest.raises(gs.NotFoundError):
        e.retry("01890a5d-ac96-774b-bcce-b302099a8057")
    with pytest.raises(gs.InvalidArgumentError):
        e.discard("not-an-id")
    op_id = e.enqueue("create", "note", "x", {})
    with pytest.raises(gs.WrongStateError):
        e.retry(op_id)
    e.cancel(op_id)
    assert e.status()["pending"] == 0
    e.run()
    with pytest.raises(gs.AlreadyRunningError):
        e.run()
    with pytest.raises(ValueError):
        e.next_event(-1)
    e.close()
    with pytest.raises(gs.ClosedError):
        e.status()
    e.close()  # twice is fine
    assert isinstance(gs.ClosedError("m"), gs.GuardianSyncError)


def test_token_set_later_resumes(server, tmp_path):
    with gs.Engine(tmp_path / "outbox.db", server.url, "wrong", retry=FAST_RETRY) as e:
        e.enqueue("create", "note", "t1", {"x": 1})
        e.run()
        wait_for(e, lambda ev: ev["event"] == "auth_required")
        e.set_token(server.token)

        def done(ev: dict) -> bool:
            # A 401 to a request sent before the new token pauses the engine
            # again: an app answers every auth_required.
            if ev["event"] == "auth_required":
                e.set_token(server.token)
            return succeeded(ev)

        wait_for(e, done)


def test_token_callback(server, tmp_path):
    calls = []

    def tokens(refresh: bool) -> str:
        calls.append(refresh)
        return server.token

    with gs.Engine(tmp_path / "outbox.db", server.url, token_callback=tokens) as e:
        e.enqueue("create", "note", "cb", {"x": 1})
        e.run()
        wait_for(e, succeeded)
    assert calls and calls[0] is False


def test_transaction_is_applied_whole_and_a_bad_one_stores_nothing(server, tmp_path):
    with gs.Engine(tmp_path / "outbox.db", server.url, server.token, retry=FAST_RETRY) as e:
        bad = [
            {"kind": "create", "entity_type": "note", "entity_id": "s1", "payload": {}},
            {"kind": "create", "entity_type": "Bad Type", "entity_id": "s2", "payload": {}},
        ]
        with pytest.raises(gs.InvalidOpError):
            e.transaction(bad)
        assert e.status()["pending"] == 0
        txn_id, op_ids = e.transaction(
            [
                {"kind": "create", "entity_type": "note", "entity_id": "s1", "payload": {"scene": 1}},
                {"kind": "create", "entity_type": "note", "entity_id": "s2", "payload": {"scene": 1}},
            ]
        )
        assert len(op_ids) == 2 and len(txn_id) == 36
        e.run()
        seen = wait_for(e, lambda ev: ev["event"] == "transaction_committed")
        assert seen[-1]["txn_id"] == txn_id and seen[-1]["ops"] == 2
    for i in (1, 2):
        assert server.entity("note", f"s{i}")["data"] == {"scene": 1}


def test_close_ends_a_wait_on_another_thread(server, tmp_path):
    """close() closes the engine even while another thread waits in
    next_event: the wait ends with ClosedError at once. Before, that thread's
    own handle kept the engine open until its wait ran out."""
    import threading

    e = gs.Engine(tmp_path / "outbox.db", server.url, server.token)
    outcome = []
    calling = threading.Event()

    def waiter() -> None:
        calling.set()
        try:
            outcome.append(e.next_event(timeout=120.0))
        except gs.ClosedError as err:
            outcome.append(err)

    t = threading.Thread(target=waiter)
    t.start()
    assert calling.wait(timeout=10)
    # The waiter is about to wait or waiting; either way it must end with
    # ClosedError.
    e.close()
    t.join(timeout=20)
    assert not t.is_alive(), "next_event still waiting 20 s after close()"
    assert len(outcome) == 1 and isinstance(outcome[0], gs.ClosedError), outcome
    with pytest.raises(gs.ClosedError):
        e.enqueue("create", "note", "late", {"x": 1})
