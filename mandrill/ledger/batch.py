"""Database operations queued by many tasks, committed in batches from one worker thread.

One thread hop and one commit per batch instead of per message: the ledger writes of a
busy daemon cost about as much as one write of an idle one.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus

from mandrill.errors import LedgerError, describe
from mandrill.ledger.ops import Gathered, Op

T = TypeVar("T")
P = TypeVar("P")
log = logging.getLogger(__name__)

#: How long the final flush at shutdown may take before queued writes are given up. The
#: service drains the queue within its settle deadline first (:meth:`Batcher.drain`), so
#: this is for what comes after (the instance's "stopped" mark) and for a failing service.
FINAL_FLUSH_SECONDS = 1.0


class _Batch:
    """Ops committed together, and the one event that tells all of them they are done
    (one event per batch rather than one per op, three per message: measured 1.1-1.2x
    the in-process throughput on asyncio).

    ``gathered`` holds its :class:`Gathered` ops by kind; ``size`` counts the writes
    queued (a gathered op's items each count). ``open`` is true while the batch takes new
    ops: until the writer takes it for committing."""

    __slots__ = ("done", "gathered", "open", "ops", "size")

    def __init__(self) -> None:
        self.ops: list[Op[Any]] = []
        self.done = anyio.Event()
        self.gathered: dict[Hashable, Gathered] = {}
        self.size = 0
        self.open = True

    def fail(self, error: BaseException) -> None:
        for op in self.ops:
            if isinstance(op, Gathered):
                op.fail(error)
            elif op.error is None:
                op.error = error
        self.done.set()


class Database(Protocol):
    """A connection that runs blocking work; every method is called from a worker thread.

    A database whose batches are short CPU work may also offer ``try_run_batch(ops) ->
    bool``: run the batch now, on the event loop's thread, if that cannot block (no lock to
    wait for, no network); return ``False``, having changed nothing, if it could. The
    batcher tries it first and uses a worker thread only when it returns ``False``.
    """

    def run_batch(self, ops: list[Op[Any]]) -> None:
        """Run every op in one transaction, each in its own savepoint; set result or error
        (:func:`run_in_savepoint`: a :class:`Gathered` op that fails is run again item by
        item, so that only the failing items get an error).

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
        #: Batches waiting for the writer, oldest first; only the last one takes new ops.
        self._queue: list[_Batch] = []
        self._wakeup = anyio.Event()
        self._failing_since: float | None = None
        self._closed = False
        # One connection, used by one thread at a time.
        self.limiter = anyio.CapacityLimiter(1)
        self._try_now: Callable[[list[Op[Any]]], bool] | None = getattr(
            db, "try_run_batch", None
        )
        #: Ops queued when :meth:`run` stops, committed by its final flush (last words,
        #: such as a daemon instance saying it has stopped).
        self.on_close: list[Callable[[Any], object]] = []
        self._current: _Batch | None = None
        self._stuck = False

    @property
    def healthy(self) -> bool:
        """False while whole batches keep failing (the ledger is unreachable)."""
        return self._failing_since is None

    def submit(self, fn: Callable[[Any], T], *, key: str = "") -> Op[T]:
        """Queue ``fn`` for the next batch; await the returned op for its result.

        The op runs with its batch even if nobody awaits it; awaiting raises ``LedgerError``.
        ``key`` is the lock ``fn`` takes (see :class:`Op`).
        """
        if self._closed:
            # Nobody would ever flush it: fail now rather than leave the caller waiting.
            op: Op[T] = Op(fn, key)
            op.error = LedgerError("ledger closed: its writer is not running any more")
            op.done.set()
            return op
        batch = self._open_batch()
        op = Op(fn, key, batch.done)
        batch.ops.append(op)
        batch.size += 1
        return op

    def gather(
        self,
        kind: Hashable,
        run: Callable[[Any, list[P]], Sequence[T]],
        payload: P,
        *,
        key: str = "",
    ) -> Op[T]:
        """Queue ``payload`` for the next batch's one :class:`Gathered` op of ``kind``,
        which runs ``run`` over all of that batch's payloads of the kind (the first one
        queued decides ``run``); await the returned op for this payload's result.

        ``key`` is the lock this payload's part of ``run`` takes (see :class:`Op`).
        """
        if self._closed:
            return self.submit(lambda cur: run(cur, [payload])[0], key=key)
        batch = self._open_batch()
        gathered = batch.gathered.get(kind)
        if gathered is None:
            gathered = batch.gathered[kind] = Gathered(run, key, batch.done)
            batch.ops.append(gathered)
        batch.size += 1
        item: Op[T] = gathered.add(payload, key)
        return item

    def _open_batch(self) -> _Batch:
        """The batch new ops go to: the last one queued, unless it is full (or no longer
        open, once the writer has taken it back after a cancellation)."""
        queue = self._queue
        if not queue or queue[-1].size >= self._max_batch or not queue[-1].open:
            queue.append(_Batch())
            self._wakeup.set()
        return queue[-1]

    async def query(self, fn: Callable[[Any], T]) -> T:
        """Run a read outside the batches (history, replay); no :meth:`run` needed."""
        try:
            return await anyio.to_thread.run_sync(self._db.run_query, fn, limiter=self.limiter)
        except LedgerError:
            raise
        except Exception as exc:
            raise LedgerError(f"ledger query failed: {describe(exc)}") from exc

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
            if self._stuck:
                log.warning("ledger write still stuck at shutdown: %d queued writes given up",
                            sum(batch.size for batch in self._queue))
            else:
                for fn in self.on_close:
                    self.submit(fn)
                with anyio.move_on_after(FINAL_FLUSH_SECONDS, shield=True):
                    while self._queue:
                        await self._flush(final=True)
            self._closed = True
            for batch in self._queue:
                batch.fail(LedgerError("ledger closed before this write was committed"))
            self._queue.clear()

    async def drain(self) -> None:
        """Wait until every op queued now has its result or error (:meth:`run` commits
        them). Callers bound it: a database that hangs keeps it waiting."""
        pending = ([self._current] if self._current is not None else []) + self._queue
        for batch in pending:
            await batch.done.wait()

    @property
    def stuck(self) -> bool:
        """True once a batch was abandoned in its thread (cancelled while the database
        hung): that thread still holds the connection, so it must not be used or closed."""
        return self._stuck

    async def _flush(self, *, final: bool = False) -> None:
        batch = self._current = self._queue.pop(0)
        batch.open = False  # a gathered op is not extended while (or after) it runs
        try:
            await self._commit(batch, final=final)
        finally:
            self._current = None

    async def _commit(self, batch: _Batch, *, final: bool) -> None:
        try:
            if not self._ran_now(batch.ops):
                await self._run_in_thread(batch)
        except Exception as exc:
            error = LedgerError(f"ledger write failed: {describe(exc)}")
            batch.fail(error)
            # Not in the final flush: raising there would skip telling the ops still queued.
            if not final:
                self._note_failure(error)
        except BaseException:
            if not self._stuck:
                # Cancelled before the batch reached its thread, so nothing was written:
                # back to the queue for the final flush, rather than done with neither
                # result nor error, which reads as success.
                self._queue.insert(0, batch)
            raise
        else:
            if self._failing_since is not None:
                down = anyio.current_time() - self._failing_since
                log.warning("ledger recovered after %.1fs", down)
                self._failing_since = None
            batch.done.set()

    async def _run_in_thread(self, batch: _Batch) -> None:
        # Abandoned if cancelled in its thread: a shutdown must not wait for a database
        # that hangs (a lock held elsewhere, a server that stopped answering).
        started = threading.Event()

        def run_batch(ops: list[Op[Any]]) -> None:
            started.set()
            self._db.run_batch(ops)

        try:
            await anyio.to_thread.run_sync(
                run_batch, batch.ops, limiter=self.limiter, abandon_on_cancel=True
            )
        except anyio.get_cancelled_exc_class():
            if started.is_set():
                self._stuck = True
                batch.fail(LedgerError(
                    "ledger write abandoned at shutdown: it may or may not be committed"
                ))
            raise

    def _ran_now(self, ops: list[Op[Any]]) -> bool:
        """Run the batch on this thread if the database can without blocking (and no
        worker thread is using the connection): no thread hop, and no wait for the GIL,
        which the loop holds while it is busy (each statement of a threaded batch waits
        for it again)."""
        return (
            self._try_now is not None
            and self.limiter.borrowed_tokens == 0
            and self._try_now(ops)
        )

    def _note_failure(self, error: LedgerError) -> None:
        now = anyio.current_time()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("%s; handing affected messages back until it recovers", error)
        elif now - self._failing_since >= self._outage_limit:
            raise LedgerError(
                f"ledger unavailable for {now - self._failing_since:.0f}s"
                f" (limit {self._outage_limit:.0f}s): {error}"
            )


