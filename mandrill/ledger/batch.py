"""Database operations queued by many tasks, committed in batches from one worker thread.

One thread hop and one commit per batch instead of per message: the ledger writes of a
busy daemon cost about as much as one write of an idle one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator
from typing import Any, Generic, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus

from mandrill.errors import LedgerError

T = TypeVar("T")
log = logging.getLogger(__name__)

#: How long the final flush at shutdown may take before queued writes are given up.
FINAL_FLUSH_SECONDS = 5.0


class Op(Generic[T]):
    """One queued operation: a function of a cursor, its result or error, and when it is done.

    Awaiting an op waits for its batch and returns its result or raises its error.
    ``key`` names the lock the op takes that other processes also take (``host:…``,
    ``message:…``; empty for none): a database whose batches lock rows or hosts runs a
    batch's ops in key order, so that processes never wait for each other in a cycle.
    """

    __slots__ = ("done", "error", "fn", "key", "result")

    def __init__(self, fn: Callable[[Any], T], key: str = "") -> None:
        self.fn = fn
        self.key = key
        self.result: T | None = None
        self.error: BaseException | None = None
        self.done = anyio.Event()

    async def wait(self) -> T:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]

    def __await__(self) -> Generator[Any, None, T]:
        return self.wait().__await__()


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
        self._closed = False
        # One connection, used by one thread at a time.
        self.limiter = anyio.CapacityLimiter(1)

    @property
    def healthy(self) -> bool:
        """False while whole batches keep failing (the ledger is unreachable)."""
        return self._failing_since is None

    def submit(self, fn: Callable[[Any], T], *, key: str = "") -> Op[T]:
        """Queue ``fn`` for the next batch; await the returned op for its result.

        The op runs with its batch even if nobody awaits it; awaiting raises ``LedgerError``.
        ``key`` is the lock ``fn`` takes (see :class:`Op`).
        """
        op: Op[T] = Op(fn, key)
        if self._closed:
            # Nobody would ever flush it: fail now rather than leave the caller waiting.
            op.error = LedgerError("ledger closed: its writer is not running any more")
            op.done.set()
            return op
        self._queue.append(op)
        self._wakeup.set()
        return op

    async def query(self, fn: Callable[[Any], T]) -> T:
        """Run a read outside the batches (history, replay); no :meth:`run` needed."""
        try:
            return await anyio.to_thread.run_sync(self._db.run_query, fn, limiter=self.limiter)
        except LedgerError:
            raise
        except Exception as exc:
            raise LedgerError(f"ledger query failed: {_one_line(exc)}") from exc

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until cancelled; then flush what is queued, shielded and bounded.

        Raises ``LedgerError`` when batches have failed for longer than ``outage_limit``.
        Ops submitted after it returns fail at once with ``LedgerError``.
        """
        self._closed = False
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
                    await self._flush(final=True)
            self._closed = True
            for op in self._queue:
                op.error = LedgerError("ledger closed before this write was committed")
                op.done.set()
            self._queue.clear()

    async def _flush(self, *, final: bool = False) -> None:
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        requeued = False
        try:
            await anyio.to_thread.run_sync(self._db.run_batch, batch, limiter=self.limiter)
        except Exception as exc:
            error = LedgerError(f"ledger write failed: {_one_line(exc)}")
            for op in batch:
                if op.error is None:
                    op.error = error
            # Not in the final flush: raising there would skip telling the ops still queued.
            if not final:
                self._note_failure(error)
        except BaseException:
            # Cancelled before the batch reached its thread (once there it cannot be
            # cancelled), so nothing was written: back to the queue for the final flush,
            # rather than done with neither result nor error, which reads as success.
            self._queue[:0] = batch
            requeued = True
            raise
        else:
            self._failing_since = None
        finally:
            if not requeued:
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
