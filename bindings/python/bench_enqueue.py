"""Benchmark (not a test): Python `Engine.enqueue` per op, synchronous=FULL.

Compare with `cargo run --release -p guardian-sync-ffi --example
enqueue_bench` (Rust enqueue_blocking and the C ABI) run on the same
machine right before or after: `python bindings/python/bench_enqueue.py [OPS]`.
"""

import sys
import tempfile
import time

import guardian_sync as gs

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
with tempfile.TemporaryDirectory() as d:
    with gs.Engine(f"{d}/py.db", "http://127.0.0.1:9", "t") as e:
        t = time.perf_counter()
        for i in range(n):
            e.enqueue("create", "note", f"p{i}", {"i": i, "text": "hello"})
        dt = time.perf_counter() - t
print(f"python Engine.enqueue: {dt * 1e6 / n:8.1f} us/op over {n} ops")
