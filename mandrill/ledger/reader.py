"""Reads on a connection of their own (the status page, ``explain``), off the message path:
they never wait for its transactions, nor make them wait.

A read runs in a worker thread, bounded by the database's deadline; one that misses it is
abandoned to its thread, which still holds the connection: the next read waits for it
within its own deadline, then fails (a ledger that stopped answering). The connection is
opened by the first read, so a daemon whose status page nobody opens has none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import anyio

from mandrill.errors import LedgerError, describe

T = TypeVar("T")


class Reader(Protocol):
    """A read-only connection, used from one worker thread at a time."""

    def read(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(cursor)`` in one read-only transaction (one snapshot); blocks."""
        ...

    def close(self) -> None: ...


class Reads:
    """Runs reads on ``reader``, one at a time, each within ``deadline`` seconds."""

    def __init__(self, reader: Reader, deadline: float) -> None:
        self._reader = reader
        self._deadline = deadline
        self._lock = anyio.Lock()
        #: Held by the thread using the connection, also by one abandoned past its deadline.
        self._busy = threading.Lock()

    async def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(cursor)`` on the reader's connection. Raises :class:`LedgerError` if it
        failed or did not answer within the deadline."""
        async with self._lock:
            with anyio.move_on_after(self._deadline):
                try:
                    return await anyio.to_thread.run_sync(
                        self._guarded, fn, abandon_on_cancel=True
                    )
                except LedgerError:
                    raise
                except Exception as exc:
                    raise LedgerError(f"ledger read failed: {describe(exc)}") from exc
        raise LedgerError(f"ledger read did not answer within {self._deadline:g}s")

    def _guarded(self, fn: Callable[[Any], T]) -> T:
        # Half the deadline: the caller hears why, before its own deadline passes.
        if not self._busy.acquire(timeout=self._deadline / 2):
            raise LedgerError("ledger not answering: an earlier read is still waiting for it")
        try:
            return self._reader.read(fn)
        finally:
            self._busy.release()

    async def aclose(self) -> None:
        """Close the connection, unless an abandoned read still holds it (then the
        process's exit does)."""
        if self._busy.acquire(blocking=False):
            try:
                await anyio.to_thread.run_sync(self._reader.close)
            finally:
                self._busy.release()


__all__ = ["Reader", "Reads"]
