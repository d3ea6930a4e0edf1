"""The operations a :class:`~mandrill.ledger.batch.Batcher` commits: one function of a
cursor (:class:`Op`), or one function over the items many callers gathered into a batch
(:class:`Gathered`), and how a batch runs one in a savepoint of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence
from typing import Any, Generic, TypeVar

import anyio

from mandrill.errors import LedgerError, describe

T = TypeVar("T")


class Op(Generic[T]):
    """One queued operation: a function of a cursor, its result or error, and when it is done.

    Awaiting an op waits for its batch and returns its result or raises its error.
    ``key`` names the lock the op takes that other processes also take (``host:…``,
    ``message:…``; empty for none): a database whose batches lock rows or hosts runs a
    batch's ops in key order, so that processes never wait for each other in a cycle.
    ``done`` is set when the op has its result or error; the ops of one batch share it.
    """

    __slots__ = ("done", "error", "fn", "key", "result")

    def __init__(
        self, fn: Callable[[Any], T], key: str = "", done: anyio.Event | None = None
    ) -> None:
        self.fn = fn
        self.key = key
        self.result: T | None = None
        self.error: BaseException | None = None
        self.done = anyio.Event() if done is None else done

    async def wait(self) -> T:
        return await self

    def __await__(self) -> Generator[Any, None, T]:
        # An op awaited after its batch (a worker's save, awaited last) returns at once,
        # without a trip through the event loop: like a finished future, it is no
        # cancellation point.
        if not self.done.is_set():
            yield from self.done.wait().__await__()
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


def _not_split(cur: Any) -> Any:
    raise AssertionError("a gathered item runs with its gathered op until that is split")


class Gathered(Op[None]):
    """One op that runs ``run`` once over the payloads of many items queued in one batch
    (such as every message row the batch writes: one ``executemany`` instead of one
    statement each); each item is an :class:`Op` its caller awaits for its own result.

    ``run(cur, payloads)`` returns one result per payload, in order; it takes the locks of
    its items in key order (its key is the smallest of theirs, so that a database that
    orders a batch's ops by key still takes every lock in one global order). If it fails,
    :meth:`split` gives the items as ops of their own, each running ``run`` over its own
    payload, for the database to run one by one, each in its own savepoint: one failing
    item does not fail the others (:func:`run_in_savepoint`).
    """

    __slots__ = ("items", "payloads", "run")

    def __init__(
        self, run: Callable[[Any, list[Any]], Sequence[Any]], key: str, done: anyio.Event
    ) -> None:
        super().__init__(self._run_all, key, done)
        self.run = run
        self.items: list[Op[Any]] = []
        self.payloads: list[Any] = []

    def add(self, payload: Any, key: str) -> Op[Any]:
        item: Op[Any] = Op(_not_split, key, self.done)
        self.items.append(item)
        self.payloads.append(payload)
        if key < self.key:
            self.key = key
        return item

    def _run_all(self, cur: Any) -> None:
        results = self.run(cur, self.payloads)
        for item, result in zip(self.items, results, strict=True):
            item.result = result
            item.error = None

    def split(self) -> list[Op[Any]]:
        """The items as ops of their own, each running ``run`` over its own payload."""
        for item, payload in zip(self.items, self.payloads, strict=True):
            item.fn = functools.partial(_run_one, self.run, payload)
            item.result = item.error = None
        return self.items

    def fail(self, error: BaseException) -> None:
        """Give ``error`` to every item that has none."""
        self.error = error
        for item in self.items:
            if item.error is None:
                item.error = error


def _run_one(run: Callable[[Any, list[Any]], Sequence[Any]], payload: Any, cur: Any) -> Any:
    return run(cur, [payload])[0]


def size(op: Op[Any]) -> int:
    """How many queued writes ``op`` stands for (a gathered op: its items)."""
    return len(op.items) if isinstance(op, Gathered) else 1


def run_in_savepoint(
    cur: Any, op: Op[Any], fatal: Callable[[BaseException], bool] = lambda exc: False
) -> None:
    """Run ``op`` in a savepoint of the cursor's transaction; set its result or error.

    A failed op is rolled back to its savepoint, and its error set (``LedgerError``); a
    failed :class:`Gathered` op is run again item by item, each in its own savepoint, so
    that only the failing items get an error. An exception for which ``fatal`` is true (the
    connection is gone) is raised instead: the whole batch has failed.
    """
    cur.execute("SAVEPOINT op")
    try:
        op.result = op.fn(cur)
    except Exception as exc:
        if fatal(exc):
            raise
        cur.execute("ROLLBACK TO SAVEPOINT op")
        if isinstance(op, Gathered):
            for item in op.split():
                run_in_savepoint(cur, item, fatal)
        else:
            op.error = LedgerError(f"ledger write failed: {describe(exc)}")
    cur.execute("RELEASE SAVEPOINT op")


def in_key_order(ops: list[Op[Any]]) -> list[Op[Any]]:
    """A batch's ops in the order every database runs them: by :attr:`Op.key`, stably (ops
    on one key keep their queue order). Outcomes, records and heartbeats (no key) first, so
    that a claim gathered earlier in the batch still sees an outcome queued before it (else
    its host reads as busy); then the fleet lock, hosts, messages: on PostgreSQL the one
    global lock order that keeps two daemons out of a deadlock."""
    return sorted(ops, key=_key)


def _key(op: Op[Any]) -> str:
    return op.key
