"""One transaction at a time, awaited by whoever asked for it, bounded by a deadline; the
ledger's health as its transactions see it; SQLite's transactions on the loop's thread
when they cannot block. A database double (the real SQLite, whose transactions can be held
or made to fail) stands for a server that stops answering."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger.sqlite import SQLiteDatabase
from mandrill.ledger.transactions import Transactions

T = TypeVar("T")


class Wedged:
    """SQLite in worker threads only, whose transactions can be held (:attr:`open`
    cleared: a server that stopped answering) or refused (:attr:`failing`)."""

    def __init__(self, path: str, deadline: float = 0.5) -> None:
        self.db = SQLiteDatabase(path)
        self.deadline = deadline
        self.open = threading.Event()
        self.open.set()
        self.failing = False
        self.entered = threading.Event()
        self.ran = 0

    def transaction(self, work: Callable[[Any], T]) -> T:
        self.entered.set()
        self.open.wait(30)
        if self.failing:
            raise sqlite3.OperationalError("disk I/O error")
        self.ran += 1
        return self.db.transaction(work)

    def query(self, fn: Callable[[Any], T]) -> T:
        return self.db.query(fn)

    def close(self) -> None:
        self.db.close()


def insert(value: int) -> Callable[[Any], int]:
    def work(cur: Any) -> int:
        cur.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
        cur.execute("INSERT INTO t VALUES (?)", (value,))
        return value
    return work


def values(cur: Any) -> list[int]:
    return [v for (v,) in cur.execute("SELECT v FROM t ORDER BY v").fetchall()]


@pytest.fixture
def wedged(tmp_path: Path) -> Wedged:
    return Wedged(str(tmp_path / "ledger.db"))


async def test_each_caller_gets_its_own_result_in_order(wedged: Wedged) -> None:
    transactions = Transactions(wedged)
    results: list[int] = []

    async def run(value: int) -> None:
        results.append(await transactions.run(insert(value)))

    async with anyio.create_task_group() as tg:
        for value in range(5):
            tg.start_soon(run, value)
    assert sorted(results) == list(range(5))
    assert await transactions.query(values) == list(range(5))
    assert wedged.ran == 5  # one transaction each: nothing gathered, nothing queued


async def test_a_failure_is_an_outage_until_a_transaction_succeeds(
    wedged: Wedged, caplog: pytest.LogCaptureFixture
) -> None:
    transactions = Transactions(wedged)
    wedged.failing = True
    for _ in range(3):
        with pytest.raises(LedgerError, match=r"^ledger write failed: disk I/O error$"):
            await transactions.run(insert(1))
    assert not transactions.healthy
    assert "disk I/O error" in (transactions.problem() or "")
    wedged.failing = False
    assert await transactions.run(insert(2)) == 2
    assert transactions.healthy
    assert transactions.problem() is None
    lines = [r.getMessage() for r in caplog.records if r.name == "mandrill.ledger.transactions"]
    assert len(lines) == 2  # once when it began, once when it ended
    assert lines[1].startswith("ledger recovered after")


async def test_a_transaction_past_its_deadline_is_an_outage_and_holds_the_connection(
    wedged: Wedged,
) -> None:
    transactions = Transactions(wedged)
    await transactions.run(insert(0))
    wedged.open.clear()  # the server stops answering
    with anyio.fail_after(10), pytest.raises(LedgerError, match=r"did not answer within 0\.5s"):
        await transactions.run(insert(1))
    assert transactions.stuck
    assert "did not answer" in (transactions.problem() or "")
    # Its thread still holds the connection: the next ones fail at once, without using it.
    with anyio.fail_after(1), pytest.raises(LedgerError, match="no answer for"):
        await transactions.run(insert(2))
    wedged.open.set()  # it answers again: the abandoned transaction ends, and so does it
    with anyio.fail_after(10):
        while transactions.stuck:  # noqa: ASYNC110 - its thread tells nobody
            await anyio.sleep(0.01)
    assert await transactions.run(insert(3)) == 3
    assert transactions.healthy
    assert await transactions.query(values) == [0, 1, 3]  # the abandoned one committed late


async def test_a_cancelled_caller_leaves_its_transaction_to_its_thread(wedged: Wedged) -> None:
    transactions = Transactions(wedged)
    wedged.open.clear()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(transactions.run, insert(1))
            await anyio.to_thread.run_sync(wedged.entered.wait)
            scope.cancel()
    assert transactions.stuck
    # The next transaction waits for it (within its own deadline), then runs.
    async with anyio.create_task_group() as tg:
        tg.start_soon(transactions.run, insert(2))
        await anyio.sleep(0.05)
        wedged.open.set()
    assert await transactions.query(values) == [1, 2]
    assert transactions.healthy  # a cancellation is no outage


async def test_queries_wrap_errors(wedged: Wedged) -> None:
    transactions = Transactions(wedged)

    def missing(cur: Any) -> Any:
        return cur.execute("SELECT * FROM no_such_table").fetchall()

    with pytest.raises(LedgerError, match="ledger query failed: no such table"):
        await transactions.query(missing)
    assert transactions.healthy  # reads do not count for the ledger's health


# -- SQLite on the loop's thread -------------------------------------------------------------


def test_a_transaction_runs_at_once_when_nothing_can_make_it_wait(tmp_path: Path) -> None:
    db = SQLiteDatabase(str(tmp_path / "ledger.db"))
    try:
        assert db.try_transaction_now(insert(1)) == (True, 1)
        assert db.query(values) == [1]
    finally:
        db.close()


def test_a_transaction_that_would_wait_for_a_lock_is_left_untouched(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    db = SQLiteDatabase(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        assert db.try_transaction_now(insert(1)) == (False, None)
        other.execute("ROLLBACK")
        assert db.try_transaction_now(insert(2)) == (True, 2)
        assert db.query(values) == [2]
    finally:
        other.close()
        db.close()


async def test_a_transaction_that_must_wait_for_a_lock_waits_in_a_thread(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    transactions = Transactions(SQLiteDatabase(path))
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(transactions.run, insert(1))
            await anyio.sleep(0.1)  # the loop is free meanwhile: this sleep ends
            other.execute("ROLLBACK")
        assert await transactions.query(values) == [1]
    finally:
        other.close()


def test_in_memory_transactions_always_run_at_once() -> None:
    db = SQLiteDatabase(":memory:")
    try:
        assert db.try_transaction_now(insert(1)) == (True, 1)
    finally:
        db.close()


async def test_a_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    transactions = Transactions(SQLiteDatabase(str(tmp_path / "ledger.db")))
    await transactions.run(insert(1))

    def half_done(cur: Any) -> None:
        insert(2)(cur)
        raise RuntimeError("a bug\nover two lines")

    with pytest.raises(LedgerError, match=r"^ledger write failed: a bug over two lines$"):
        await transactions.run(half_done)
    assert await transactions.query(values) == [1]



def test_daemons_opening_one_file_together_all_open(tmp_path: Path) -> None:
    # Two daemons on one machine may share a ledger file; starting together, each sets
    # the file's journal mode, which SQLite does without waiting for the other (its busy
    # handler is not called for it): "database is locked" stopped one of them.
    for attempt in range(5):
        path = str(tmp_path / f"ledger-{attempt}.db")
        errors = open_together(path, 6)
        assert errors == []


def open_together(path: str, count: int) -> list[BaseException]:
    """Open ``count`` databases on ``path`` at the same moment; the errors raised."""
    opened: list[SQLiteDatabase] = []
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def open_one() -> None:
        start.wait()
        try:
            opened.append(SQLiteDatabase(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for db in opened:
        db.close()
    return errors
