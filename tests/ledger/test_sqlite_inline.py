"""SQLite batches run on the event loop's thread only when they cannot block."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio

from mandrill.ledger import reads, sql
from mandrill.ledger.batch import Batcher
from mandrill.ledger.ops import Op
from mandrill.ledger.sqlite import DIALECT, INLINE_MAX_OPS, SQLiteDatabase
from tests.ledger import T0, message


def save(message_id: str) -> Op[Any]:
    return Op(lambda cur: sql.save(cur, DIALECT, "", message(message_id), T0))


def saved_ids(db: SQLiteDatabase) -> list[str]:
    rows = db.run_query(lambda cur: reads.saved_messages(cur, DIALECT, None, None, None, None))
    return [row.message_id for row in rows]


def test_a_small_batch_runs_at_once(tmp_path: Path) -> None:
    db = SQLiteDatabase(str(tmp_path / "ledger.db"))
    try:
        assert db.try_run_batch([save("m1"), save("m2")])
        assert saved_ids(db) == ["m1", "m2"]
    finally:
        db.close()


def test_a_big_batch_is_left_to_a_thread(tmp_path: Path) -> None:
    db = SQLiteDatabase(str(tmp_path / "ledger.db"))
    try:
        ops = [save(f"m{i}") for i in range(INLINE_MAX_OPS + 1)]
        assert not db.try_run_batch(ops)
        assert saved_ids(db) == []
    finally:
        db.close()


def test_a_batch_that_would_wait_for_a_lock_is_left_untouched(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    db = SQLiteDatabase(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process writing
        ops = [save("m1")]
        assert not db.try_run_batch(ops)
        assert (ops[0].result, ops[0].error) == (None, None)
        other.execute("COMMIT")
        assert db.try_run_batch(ops)
        assert saved_ids(db) == ["m1"]
    finally:
        other.close()
        db.close()


async def test_the_batcher_waits_for_a_lock_in_a_thread(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    db = SQLiteDatabase(path)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    batcher = Batcher(db)
    try:
        other.execute("BEGIN IMMEDIATE")
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.run)
            op = batcher.submit(lambda cur: sql.save(cur, DIALECT, "", message("m1"), T0))
            await anyio.sleep(0.2)  # the loop stays free while the batch waits
            assert not op.done.is_set()
            other.execute("COMMIT")
            with anyio.fail_after(5):
                await op
            tg.cancel_scope.cancel()
        assert saved_ids(db) == ["m1"]
    finally:
        other.close()
        db.close()


def test_in_memory_batches_always_run_at_once() -> None:
    db = SQLiteDatabase(":memory:")
    try:
        assert db.inline
        assert db.try_run_batch([save("m1")])
    finally:
        db.close()
