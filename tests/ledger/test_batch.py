"""The Batcher, over an in-process fake database that fails on demand."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger.batch import Batcher
from mandrill.ledger.ops import Gathered, Op, run_in_savepoint

T = TypeVar("T")


class FakeDatabase:
    """Runs ops as plain functions of ``None``; ``failing`` makes whole batches fail."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.failing = False
        self.closed = False

    def run_batch(self, ops: list[Op[Any]]) -> None:
        if self.failing:
            raise ConnectionError("server closed the connection\nunexpectedly")
        for op in ops:
            try:
                op.result = op.fn(None)
            except Exception as exc:
                op.error = LedgerError(f"ledger write failed: {exc}")
        self.batches.append([op.key for op in ops])

    def run_query(self, fn: Callable[[Any], T]) -> T:
        if self.failing:
            raise ConnectionError("server closed the connection")
        return fn(None)

    def close(self) -> None:
        self.closed = True


def returns(value: T) -> Callable[[Any], T]:
    return lambda _: value


def fails(_: Any) -> None:
    raise ValueError("bad op")


async def test_ops_queued_together_share_one_batch() -> None:
    db = FakeDatabase()
    batcher = Batcher(db)
    ops = [batcher.submit(returns(i * 10), key=f"k{i}") for i in range(5)]
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        assert [await op for op in ops] == [0, 10, 20, 30, 40]
        tg.cancel_scope.cancel()
    assert db.batches == [["k0", "k1", "k2", "k3", "k4"]]


async def test_batches_are_capped_at_max_batch() -> None:
    db = FakeDatabase()
    batcher = Batcher(db, max_batch=2)
    ops = [batcher.submit(lambda _: None) for _ in range(5)]
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        for op in ops:
            await op
        tg.cancel_scope.cancel()
    assert [len(batch) for batch in db.batches] == [2, 2, 1]


async def test_an_op_error_reaches_only_its_caller() -> None:
    db = FakeDatabase()
    batcher = Batcher(db)
    good, bad = batcher.submit(lambda _: "ok"), batcher.submit(fails)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        with pytest.raises(LedgerError, match="bad op"):
            await bad
        assert await good == "ok"
        tg.cancel_scope.cancel()


async def test_failed_batch_fails_its_ops_and_the_next_one_recovers() -> None:
    db = FakeDatabase()
    batcher = Batcher(db)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        db.failing = True
        with pytest.raises(
            LedgerError, match=r"^ledger write failed: server closed the connection unexpectedly$"
        ):
            await batcher.submit(lambda _: None)
        db.failing = False
        assert await batcher.submit(lambda _: 1) == 1
        tg.cancel_scope.cancel()


async def test_outage_longer_than_the_limit_stops_run() -> None:
    db = FakeDatabase()
    db.failing = True
    batcher = Batcher(db, outage_limit=0.2)
    failed_ops = 0
    with pytest.RaisesGroup(pytest.RaisesExc(LedgerError, match="ledger unavailable for")):
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.run)
            with anyio.fail_after(5):
                while True:
                    with pytest.raises(LedgerError, match="ledger write failed"):
                        await batcher.submit(lambda _: None)
                    failed_ops += 1
                    await anyio.sleep(0.05)
    assert failed_ops >= 3
    # The writer is gone: a late write fails at once instead of waiting forever.
    with pytest.raises(LedgerError, match="ledger closed"):
        await batcher.submit(lambda _: None)


async def test_outage_shorter_than_the_limit_is_survived() -> None:
    db = FakeDatabase()
    db.failing = True
    batcher = Batcher(db, outage_limit=1.0)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        start = anyio.current_time()
        while anyio.current_time() - start < 0.2:
            with pytest.raises(LedgerError):
                await batcher.submit(lambda _: None)
            await anyio.sleep(0.05)
        db.failing = False
        assert await batcher.submit(lambda _: "back") == "back"
        # A success resets the outage clock: failing again starts a new outage.
        db.failing = True
        await anyio.sleep(0.9)
        with pytest.raises(LedgerError):
            await batcher.submit(lambda _: None)
        tg.cancel_scope.cancel()


async def test_an_outage_is_logged_once_and_so_is_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = FakeDatabase()
    db.failing = True
    batcher = Batcher(db)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        for _ in range(5):
            with pytest.raises(LedgerError):
                await batcher.submit(lambda _: None)
        assert not batcher.healthy
        db.failing = False
        await batcher.submit(lambda _: None)
        assert batcher.healthy
        tg.cancel_scope.cancel()
    # Only mandrill's own lines: on a loaded machine asyncio's debug mode adds its "slow
    # callback" warnings.
    lines = [record.getMessage() for record in caplog.records
             if record.name.startswith("mandrill")]
    assert len(lines) == 2, lines
    assert lines[0] == (
        "ledger write failed: server closed the connection unexpectedly;"
        " handing affected messages back until it recovers"
    )
    assert lines[1].startswith("ledger recovered after ")


async def test_cancelled_run_flushes_what_is_queued() -> None:
    db = FakeDatabase()
    batcher = Batcher(db)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        queued = [batcher.submit(returns(i)) for i in range(3)]
        tg.cancel_scope.cancel()  # before the writer has had a chance to run
    assert [await op for op in queued] == [0, 1, 2]
    with pytest.raises(LedgerError, match="ledger closed"):
        await batcher.submit(lambda _: None)


async def test_final_flush_during_an_outage_fails_every_queued_op() -> None:
    db = FakeDatabase()
    db.failing = True
    batcher = Batcher(db, max_batch=1, outage_limit=0)
    ops = [batcher.submit(lambda _: None) for _ in range(4)]
    with pytest.RaisesGroup(LedgerError):
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.run)
    # The second failure ended the outage allowance; the ops still queued were not left
    # waiting.
    with anyio.fail_after(1):
        for op in ops:
            with pytest.raises(LedgerError):
                await op


async def test_a_cancelled_caller_does_not_cancel_its_write() -> None:
    db = FakeDatabase()
    batcher = Batcher(db)
    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            scope.cancel()
            op = batcher.submit(lambda _: "written")
            await op  # cancelled here
        await tg.start(batcher.run)
        assert await op == "written"
        tg.cancel_scope.cancel()


async def test_query_runs_without_the_writer_and_wraps_errors() -> None:
    db = FakeDatabase()
    batcher = Batcher(db)
    assert await batcher.query(lambda _: [1, 2]) == [1, 2]
    db.failing = True
    with pytest.raises(LedgerError, match=r"^ledger query failed: server closed the connection$"):
        await batcher.query(lambda _: None)


def tens(_: Any, payloads: list[int]) -> list[int]:
    return [payload * 10 for payload in payloads]


async def test_gathered_items_share_one_op_per_batch_and_kind() -> None:
    db = FakeDatabase()
    batcher = Batcher(db)
    runs: list[list[int]] = []

    def recorded(cur: Any, payloads: list[int]) -> list[int]:
        runs.append(list(payloads))
        return tens(cur, payloads)

    items = [batcher.gather("tens", recorded, i, key=f"k{3 - i}") for i in range(3)]
    plain = batcher.submit(returns("plain"), key="a")
    other = batcher.gather("other", tens, 7, key="z")
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        assert [await item for item in items] == [0, 10, 20]
        assert await plain == "plain"
        assert await other == 70
        tg.cancel_scope.cancel()
    assert runs == [[0, 1, 2]]
    # One op for the three items, with the smallest of their keys.
    assert db.batches == [["k1", "a", "z"]]


async def test_a_batch_taken_for_committing_is_not_extended() -> None:
    release = threading.Event()

    class SlowDatabase(FakeDatabase):
        def run_batch(self, ops: list[Op[Any]]) -> None:
            release.wait(5)
            super().run_batch(ops)

    db = SlowDatabase()
    batcher = Batcher(db)
    runs: list[list[int]] = []

    def recorded(cur: Any, payloads: list[int]) -> list[int]:
        runs.append(list(payloads))
        return tens(cur, payloads)

    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        first = batcher.gather("tens", recorded, 1)
        await anyio.wait_all_tasks_blocked()  # the writer has taken it, waits in a thread
        second = batcher.gather("tens", recorded, 2)
        release.set()
        assert (await first, await second) == (10, 20)
        tg.cancel_scope.cancel()
    assert runs == [[1], [2]]


async def test_gathered_items_count_towards_max_batch() -> None:
    db = FakeDatabase()
    batcher = Batcher(db, max_batch=2)
    items = [batcher.gather("tens", tens, i) for i in range(5)]
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        assert [await item for item in items] == [0, 10, 20, 30, 40]
        tg.cancel_scope.cancel()
    assert len(db.batches) == 3


class RecordingCursor:
    def __init__(self) -> None:
        self.statements: list[str] = []

    def execute(self, statement: str) -> None:
        self.statements.append(statement)


def test_a_failed_gathered_op_is_run_again_item_by_item() -> None:
    def checked(cur: Any, payloads: list[int]) -> list[int]:
        if 13 in payloads:
            raise ValueError("unlucky")
        return tens(cur, payloads)

    gathered = Gathered(checked, "", anyio.Event())
    items = [gathered.add(payload, "") for payload in (1, 13, 2)]
    cur = RecordingCursor()
    run_in_savepoint(cur, gathered)
    assert [(item.result, str(item.error)) for item in items] == [
        (10, "None"),
        (None, "ledger write failed: unlucky"),
        (20, "None"),
    ]
    assert cur.statements == [
        "SAVEPOINT op", "ROLLBACK TO SAVEPOINT op",
        *["SAVEPOINT op", "RELEASE SAVEPOINT op"],
        *["SAVEPOINT op", "ROLLBACK TO SAVEPOINT op", "RELEASE SAVEPOINT op"],
        *["SAVEPOINT op", "RELEASE SAVEPOINT op"],
        "RELEASE SAVEPOINT op",
    ]
