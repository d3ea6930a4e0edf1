"""Database operations queued by many tasks, committed in batches from one worker thread.

One thread hop and one commit per batch instead of per message: the ledger writes of a
busy daemon cost about as much as one write of an idle one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus

from mandrill.errors import LedgerError

T = TypeVar("T")
log = logging.getLogger(__name__)

#: How long the final flush at shutdown may take before queued writes are given up.
FINAL_FLUSH_SECONDS = 5.0


class Op(Generic[T]):
    """One queued operation: a function of a cursor, its result or error, and when it is done."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[Any], T]) -> None:
        self.fn = fn
        self.result: T | None = None
        self.error: BaseException | None = None
        self.done = anyio.Event()


class Database(Protocol):
    """A connection that runs blocking work; every method is called from a worker thread."""

    def run_batch(self, ops: list[Op[Any]]) -> None:
        """Run every op in one transaction, each in its own savepoint; set result or error.

        Raises when the batch as a whole failed (cannot begin or commit).
        """
        ...

    def run_query(self, fn: Callable[[Any], T]) -> T: ...

    def close(self) -> None: ...


class Batcher:
    """Queues ops and commits them in batches while :meth:`run` runs.

    ``outage_limit`` is how long whole batches may keep failing before :meth:`run` raises
    :class:`LedgerError` and so stops the service; until then each failed op raises
    ``LedgerError`` to its caller, who nacks its message.
    """

    def __init__(
        self, db: Database, *, max_batch: int = 2000, outage_limit: float = math.inf
    ) -> None:
        self._db = db
        self._max_batch = max_batch
        self._outage_limit = outage_limit
        self._queue: list[Op[Any]] = []
        self._wakeup = anyio.Event()
        self._failing_since: float | None = None
        # One connection, used by one thread at a time.
        self.limiter = anyio.CapacityLimiter(1)

    async def submit(self, fn: Callable[[Any], T]) -> T:
        """Queue ``fn`` for the next batch and wait for its result.

        If the caller is cancelled the op still runs with its batch; raises ``LedgerError``.
        """
        op: Op[T] = Op(fn)
        self._queue.append(op)
        self._wakeup.set()
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]

    async def query(self, fn: Callable[[Any], T]) -> T:
        """Run a read outside the batches (history, replay); no :meth:`run` needed."""
        try:
            return await anyio.to_thread.run_sync(self._db.run_query, fn, limiter=self.limiter)
        except LedgerError:
            raise
        except Exception as exc:
            raise LedgerError(f"ledger query failed: {exc}") from exc

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until cancelled; then flush what is queued, shielded and bounded."""
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                while self._queue:
                    await self._flush()
        finally:
            with anyio.move_on_after(FINAL_FLUSH_SECONDS, shield=True):
                while self._queue:
                    await self._flush()
            for op in self._queue:
                op.error = LedgerError("ledger closed before this write was committed")
                op.done.set()

    async def _flush(self) -> None:
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        try:
            await anyio.to_thread.run_sync(self._db.run_batch, batch, limiter=self.limiter)
        except Exception as exc:
            error = LedgerError(f"ledger write failed: {_one_line(exc)}")
            for op in batch:
                if op.error is None:
                    op.error = error
            self._note_failure(error)
        else:
            self._failing_since = None
        finally:
            for op in batch:
                op.done.set()

    def _note_failure(self, error: LedgerError) -> None:
        now = anyio.current_time()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("%s; nacking affected messages until it recovers", error)
        elif now - self._failing_since >= self._outage_limit:
            raise LedgerError(
                f"ledger unavailable for {now - self._failing_since:.0f}s"
                f" (limit {self._outage_limit:.0f}s): {error}"
            )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
