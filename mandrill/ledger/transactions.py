"""One transaction at a time on the ledger's connection, each awaited by the task that
asked for it and bounded by a deadline; and the ledger's health as its transactions see it.

Whoever needs a write runs it and waits for it (:meth:`Transactions.run`): a decision, the
outcomes of a batch of restarts, a heartbeat. Nothing is queued for later: there is no
writer task, and no awaitable that someone else finishes.

A transaction that runs in a worker thread (every PostgreSQL one; SQLite's when another
process holds the write lock) is abandoned when its caller is cancelled or its deadline
passes: a shutdown must not wait for a database that hangs. The thread still holds the
connection, so the next transaction waits for it to return, within its own deadline, and a
transaction that missed its deadline makes the next ones fail at once until its thread
returns: a ledger that stopped answering is an outage, like one that refuses.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import anyio

from mandrill.errors import LedgerError, describe

T = TypeVar("T")
log = logging.getLogger(__name__)


class Database(Protocol):
    """A connection that runs blocking work, one call at a time, from a worker thread.

    A database whose transactions are short CPU work may also offer
    ``try_transaction_now(work) -> tuple[bool, result]``: run it now, on the event loop's
    thread, if that cannot block (no lock to wait for, no network); ``(False, None)``,
    having changed nothing, if it could. And ``reader()``: a
    :class:`~mandrill.ledger.reader.Reader` on a connection of its own, or ``None``.
    """

    #: Seconds a transaction may take before it counts as stalled (about twice what the
    #: database itself allows a statement, or a lock wait).
    deadline: float

    def transaction(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction and commit; raise if any of it failed
        (nothing of it is committed then, unless the COMMIT's answer was what failed)."""
        ...

    def query(self, fn: Callable[[Any], T]) -> T:
        """Run a read outside any transaction of :meth:`transaction`'s."""
        ...

    def close(self) -> None: ...


class _Job:
    """One transaction in a worker thread; ``done`` is set when the thread let go of the
    connection, whether or not anyone still waits for it."""

    __slots__ = ("began", "deadline", "done", "work")

    def __init__(self, work: Callable[[], Any], deadline: float) -> None:
        self.work = work
        self.deadline = deadline
        self.began = False
        self.done = threading.Event()

    def run(self) -> Any:
        self.began = True
        try:
            return self.work()
        finally:
            self.done.set()


class Transactions:
    """Runs transactions on ``db``, one at a time, and keeps track of whether they work.

    :meth:`run` raises :class:`LedgerError` for a transaction that failed, or that passed
    ``db.deadline``; the ledger counts as failing (:meth:`problem`) from the first such one
    until a transaction succeeds again.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = anyio.Lock()
        #: One thread at a time on the connection (also for reads).
        self.limiter = anyio.CapacityLimiter(1)
        self._try_now: Callable[[Callable[[Any], Any]], tuple[bool, Any]] | None = getattr(
            db, "try_transaction_now", None
        )
        #: A transaction abandoned in its thread (its caller cancelled, or its deadline
        #: passed) that may still hold the connection.
        self._abandoned: _Job | None = None
        self._failing_since: float | None = None
        self._problem = ""

    @property
    def healthy(self) -> bool:
        """False from a failed (or stalled) transaction until one succeeds again."""
        return self._failing_since is None

    def problem(self) -> str | None:
        """Why the ledger is failing, for readiness probes; ``None`` while it works."""
        if self._failing_since is None:
            return None
        return f"{self._problem} (failing for {self.failing_for():.0f}s)"

    def failing_for(self) -> float:
        """Seconds since the ledger began to fail (0 while it works)."""
        if self._failing_since is None:
            return 0.0
        return anyio.current_time() - self._failing_since

    @property
    def stuck(self) -> bool:
        """True while an abandoned transaction's thread still holds the connection (it
        must then be neither used nor closed)."""
        return self._abandoned is not None and not self._abandoned.done.is_set()

    async def run(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction, after those already asked for, and
        return its result. Raises :class:`LedgerError` if it failed or did not finish
        within the database's deadline (it may then be committed or not); cancelled, it
        may be committed or not as well."""
        async with self._lock:
            began = anyio.current_time()
            try:
                result = await self._run(work, began)
            except LedgerError as error:
                self._failed(error, began)
                raise
            self._succeeded()
            return result

    async def query(self, fn: Callable[[Any], T]) -> T:
        """Run a read outside the transactions (history, replay); it does not count for
        the ledger's health. Raises :class:`LedgerError`."""
        async with self._lock:
            await self._wait_for_abandoned(anyio.current_time() + self._db.deadline)
            try:
                return await anyio.to_thread.run_sync(self._db.query, fn, limiter=self.limiter)
            except LedgerError:
                raise
            except Exception as exc:
                raise LedgerError(f"ledger query failed: {describe(exc)}") from exc

    async def _run(self, work: Callable[[Any], T], began: float) -> T:
        deadline = began + self._db.deadline
        if self._try_now is not None and self._abandoned is None:
            try:
                ran, result = self._try_now(work)
            except Exception as exc:
                raise LedgerError(f"ledger write failed: {describe(exc)}") from exc
            if ran:
                return result  # type: ignore[no-any-return]
        await self._wait_for_abandoned(deadline)
        job = _Job(lambda: self._db.transaction(work), deadline)
        try:
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                return await anyio.to_thread.run_sync(
                    job.run, limiter=self.limiter, abandon_on_cancel=True
                )
        except anyio.get_cancelled_exc_class():
            if job.began:
                self._abandoned = job
            raise
        except Exception as exc:
            raise LedgerError(f"ledger write failed: {describe(exc)}") from exc
        # Past the deadline: left to its thread, which keeps the connection until it returns.
        if job.began:
            self._abandoned = job
        raise LedgerError(
            f"ledger did not answer within {self._db.deadline:g}s (the transaction may or may"
            " not be committed)"
        )

    async def _wait_for_abandoned(self, deadline: float) -> None:
        """Wait, until ``deadline``, for an abandoned transaction's thread to let go of the
        connection; fail at once if that transaction itself is past its deadline."""
        job = self._abandoned
        if job is None:
            return
        if not job.done.is_set():
            now = anyio.current_time()
            wait = min(deadline, job.deadline) - now
            if wait > 0:
                # A thread of its own waits on the thread's event (no polling), and is
                # abandoned if this caller is cancelled: it ends by its own timeout.
                await anyio.to_thread.run_sync(job.done.wait, wait, abandon_on_cancel=True)
            if not job.done.is_set():
                stalled = math.floor(anyio.current_time() - (job.deadline - self._db.deadline))
                raise LedgerError(
                    f"ledger not answering: a transaction has had no answer for {stalled}s"
                )
        self._abandoned = None

    def _failed(self, error: LedgerError, began: float) -> None:
        self._problem = str(error)
        if self._failing_since is None:
            self._failing_since = began
            log.warning("%s; handing affected messages back until it recovers", error)

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            log.warning("ledger recovered after %.1fs", self.failing_for())
            self._failing_since = None
            self._problem = ""


__all__ = ["Database", "Transactions"]
