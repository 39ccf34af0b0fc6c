"""guardian-sync for Python: a durable outbox drained to an HTTP backend.

An :class:`Engine` records changes durably (``enqueue`` returns once the op
is committed to the outbox file) and, once started with :meth:`Engine.run`,
drains them to the backend in the background, exactly once in effect and in
order per entity. What it does is reported as events (dicts), read with
``for event in engine.events(...)`` or ``async for event in
engine.aevents(...)``.

Every call may be made from any thread. Blocking calls release the GIL.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Tuple

from ._guardian_sync import NativeEngine, NativeError, __version__

__all__ = [
    "Engine",
    "GuardianSyncError",
    "InvalidArgumentError",
    "OpenError",
    "InvalidOpError",
    "StorageError",
    "NotFoundError",
    "WrongStateError",
    "AlreadyRunningError",
    "ClosedError",
    "WrongThreadError",
    "OutcomeUnknownError",
    "StopTimeoutError",
    "InternalError",
    "__version__",
]


class GuardianSyncError(Exception):
    """Base of every error raised by the engine; ``code`` is the C ABI's status."""

    code: int = 0

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(GuardianSyncError, ValueError):
    """Malformed JSON, an unknown setting, or an invalid value."""

    code = -1


class OpenError(GuardianSyncError):
    """The outbox could not be opened or the engine could not be built."""

    code = -2


class InvalidOpError(GuardianSyncError, ValueError):
    """The op was refused by validation; nothing was stored."""

    code = -3


class StorageError(GuardianSyncError):
    """The outbox's storage failed."""

    code = -4


class NotFoundError(GuardianSyncError, KeyError):
    """No op with that id."""

    code = -5

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class WrongStateError(GuardianSyncError):
    """The op's state does not allow this (e.g. retry of a pending op)."""

    code = -6


class AlreadyRunningError(GuardianSyncError):
    """``run`` while the runner is running."""

    code = -7


class ClosedError(GuardianSyncError):
    """The engine is closed."""

    code = -8


class WrongThreadError(GuardianSyncError):
    """Called where it would deadlock: ``close`` or ``stop`` from inside the
    token callback."""

    code = -9


class OutcomeUnknownError(GuardianSyncError):
    """The commit failed and the op may or may not be stored: check first."""

    code = -10


class StopTimeoutError(GuardianSyncError):
    """The runner did not stop in time and was aborted."""

    code = -11


class InternalError(GuardianSyncError):
    """A bug in the engine (a caught panic) or an unexpected code."""

    code = -98


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        OpenError,
        InvalidOpError,
        StorageError,
        NotFoundError,
        WrongStateError,
        AlreadyRunningError,
        ClosedError,
        WrongThreadError,
        OutcomeUnknownError,
        StopTimeoutError,
        InternalError,
    )
}


def _typed(e: NativeError) -> GuardianSyncError:
    code, message = e.args
    return _BY_CODE.get(code, InternalError)(message, code)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except NativeError as e:
        raise _typed(e) from None


class Engine:
    """An engine on one outbox file.

    ``Engine(outbox_path, server_url, token=None, **settings)`` opens (or
    creates) the outbox; the runner starts with :meth:`run`. Settings are
    those of the C ABI's configuration: ``retry``, ``breaker``, ``lock`` and
    ``batch`` (dicts), ``concurrency``, ``synchronous``,
    ``connect_timeout_ms``, ``request_timeout_ms``, ``owner_id``,
    ``worker_threads`` and ``stall_after_ms``. Ops go in batches of 100
    unless ``batch={"max_ops": 0}``. ``token_callback(refresh)`` may supply
    tokens instead of ``token``.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        outbox_path: str,
        server_url: str,
        token: Optional[str] = None,
        *,
        token_callback: Optional[Callable[[bool], str]] = None,
        **settings: Any,
    ) -> None:
        path = os.fspath(outbox_path)  # TypeError for None and non-paths
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if token_callback is not None and not callable(token_callback):
            raise TypeError("token_callback must be callable")
        config: Dict[str, Any] = {"outbox_path": path, "server_url": server_url}
        if token is not None:
            config["token"] = token
        config.update({k: v for k, v in settings.items() if v is not None})
        self._native = _call(NativeEngine, json.dumps(config))
        if token_callback is not None:
            _call(self._native.set_token_callback, token_callback)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def enqueue(
        self,
        kind: str,
        entity_type: str,
        entity_id: str,
        payload: Optional[Dict[str, Any]] = None,
        *,
        base: Optional[Dict[str, Any]] = None,
        base_version: Optional[int] = None,
        txn_token: Optional[str] = None,
    ) -> str:
        """Durably records an op (``create``, ``update`` or ``delete``);
        returns once it is committed, with the id of the op carrying it."""
        op: Dict[str, Any] = {"kind": kind, "entity_type": entity_type, "entity_id": entity_id}
        if payload is not None:
            op["payload"] = payload
        if base is not None:
            op["base"] = base
        if base_version is not None:
            op["base_version"] = base_version
        if txn_token is not None:
            op["txn_token"] = txn_token
        return _call(self._native.enqueue, json.dumps(op))

    def transaction(self, ops: List[Dict[str, Any]]) -> Tuple[str, List[str]]:
        """Durably records several ops as one atomic transaction: committed
        together (or, on an error, none), sent as one unit, applied by the
        server all or none. Each op is a dict as :meth:`enqueue` builds one
        (``kind``, ``entity_type``, ``entity_id``, ``payload``, and optionally
        ``base``, ``base_version``, ``txn_token``, ``depends_on``). Returns
        the transaction id and its op ids, in order."""
        return _call(self._native.transaction, json.dumps(ops))

    def run(self) -> None:
        """Starts the background runner (on the engine's own threads)."""
        _call(self._native.start)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the runner, waiting up to ``timeout`` seconds."""
        _call(self._native.stop, timeout)

    @property
    def running(self) -> bool:
        """True while the runner runs."""
        return _call(self._native.running)

    def status(self) -> Dict[str, Any]:
        """Queue depth (``pending``, ``in_flight``, ``failed``, ...),
        ``running``, ``breaker``, ``owner_id`` and ``runner_error``."""
        return json.loads(_call(self._native.status))

    def ops(
        self, state: Optional[str] = None, limit: int = 100, after_seq: int = 0
    ) -> List[Dict[str, Any]]:
        """The ops in the outbox, oldest first (``state``: ``pending``,
        ``in_flight`` or ``failed``)."""
        f: Dict[str, Any] = {"limit": limit, "after_seq": after_seq}
        if state is not None:
            f["state"] = state
        return json.loads(_call(self._native.ops, json.dumps(f)))

    def retry(self, op_id: str) -> None:
        """Puts a failed op back in the queue, due now."""
        _call(self._native.retry, op_id)

    def retry_all(self) -> int:
        """Puts every failed op back in the queue; returns how many."""
        return _call(self._native.retry_all)

    def discard(self, op_id: str) -> None:
        """Removes a failed op for good."""
        _call(self._native.discard, op_id)

    def cancel(self, op_id: str) -> None:
        """Removes an op that was never attempted."""
        _call(self._native.cancel, op_id)

    def set_token(self, token: str) -> None:
        """Replaces the bearer token; resumes a runner paused on ``auth_required``."""
        _call(self._native.set_token, token)

    def next_event(self, timeout: float = 0.0) -> Optional[Dict[str, Any]]:
        """The next event, waiting up to ``timeout`` seconds; ``None`` if none came."""
        text = _call(self._native.next_event, timeout)
        return None if text is None else json.loads(text)

    def events(self, idle_timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """Yields events as they arrive; ends after ``idle_timeout`` seconds
        without one (never, if ``None``). Waits in short slices so Ctrl-C
        works."""
        slice_s = 0.2
        idle = 0.0
        while True:
            ev = self.next_event(slice_s)
            if ev is not None:
                idle = 0.0
                yield ev
                continue
            idle += slice_s
            if idle_timeout is not None and idle >= idle_timeout:
                return

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self.events()

    async def aevents(self, idle_timeout: Optional[float] = None) -> AsyncIterator[Dict[str, Any]]:
        """Like :meth:`events`, for asyncio: waits on a worker thread, so the
        event loop stays free."""
        loop = asyncio.get_running_loop()
        slice_s = 0.2
        idle = 0.0
        while True:
            ev = await loop.run_in_executor(None, self.next_event, slice_s)
            if ev is not None:
                idle = 0.0
                yield ev
                continue
            idle += slice_s
            if idle_timeout is not None and idle >= idle_timeout:
                return

    def __aiter__(self) -> AsyncIterator[Dict[str, Any]]:
        return self.aevents()

    def close(self) -> None:
        """Stops the runner, closes the outbox; later calls raise :class:`ClosedError`.

        Waits for a token callback that is running; Ctrl-C ends the wait
        (``KeyboardInterrupt``) and the engine finishes closing in the
        background."""
        _call(self._native.close)
