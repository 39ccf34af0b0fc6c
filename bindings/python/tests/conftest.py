"""Fixtures: the reference server, started with `gsync serve` on an ephemeral
loopback port (GSYNC_BIN names the binary; default: `gsync` on PATH)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import pytest

TOKEN = "py-secret"


@dataclass
class Server:
    url: str
    token: str
    proc: subprocess.Popen

    def request(self, method: str, path: str, body: Optional[Any] = None) -> tuple:
        """One request to the server; returns (status, parsed JSON body or None)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Idempotency-Key", str(uuid.uuid4()))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                text = r.read()
                return r.status, json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            text = e.read()
            return e.code, json.loads(text) if text else None

    def entity(self, entity_type: str, entity_id: str) -> Optional[dict]:
        status, body = self.request("GET", f"/v1/entities/{entity_type}/{entity_id}")
        return body if status == 200 else None


def gsync_bin() -> str:
    path = os.environ.get("GSYNC_BIN") or shutil.which("gsync")
    if not path:
        pytest.fail("set GSYNC_BIN to the gsync binary (cargo build -p gsync)")
    return path


def start_server(extra: List[str]) -> Server:
    proc = subprocess.Popen(
        [gsync_bin(), "serve", "--in-memory", "--listen", "127.0.0.1:0",
         "--token", f"tenant-py:{TOKEN}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the process prints it once bound, or exits
    if "listening on " not in line:
        proc.kill()
        pytest.fail(f"gsync serve did not start: {line!r}")
    url = line.strip().split("listening on ", 1)[1]
    return Server(url=url, token=TOKEN, proc=proc)


def stop_server(s: Server) -> None:
    s.proc.terminate()
    try:
        s.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.proc.wait(timeout=10)


@pytest.fixture
def server() -> Iterator[Server]:
    s = start_server([])
    yield s
    stop_server(s)


@pytest.fixture
def slow_server() -> Iterator[Server]:
    """Every /v1 request takes 300 ms: a runner can be killed mid-drain."""
    s = start_server(["--fault-latency", "300ms"])
    yield s
    stop_server(s)


def wait_for(engine: Any, pred, seconds: float = 30.0) -> List[dict]:
    """Reads events until `pred(event)`; returns all read. Fails past the deadline."""
    seen: List[dict] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ev = engine.next_event(0.2)
        if ev is None:
            continue
        seen.append(ev)
        if pred(ev):
            return seen
    pytest.fail(f"no matching event within {seconds}s; saw {seen}")
