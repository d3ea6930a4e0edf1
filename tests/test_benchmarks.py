"""The benchmarks' own code, at a size that costs nothing: `tox -e bench` is not part of
the suite, so an API change of the ledger would otherwise break it unseen (issue 18's did:
the naive contenders still called ``sql.save``, the memory run ``SQLLedger._batcher``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mandrill.ledger import open_ledger
from tests.benchmarks import inprocess, memory

pytestmark = pytest.mark.anyio

MESSAGES = 40


@pytest.mark.parametrize("contender", inprocess.CONTENDERS)
async def test_each_in_process_contender_drains_the_broker_and_keeps_each_message(
    contender: str, backend_name: str
) -> None:
    broker = await inprocess.filled_broker(MESSAGES)
    with inprocess.ledger_path("file") as path:
        timing = await inprocess.RUNNERS[contender, backend_name](broker, path, MESSAGES)
        with sqlite3.connect(path) as conn:
            (kept,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    assert broker.backlog == 0
    assert broker.stats.acked == MESSAGES
    assert kept == MESSAGES
    assert timing["seconds"] > 0


async def test_the_memory_benchmark_reads_the_size_of_the_ledger(tmp_path: Path) -> None:
    ledger = await open_ledger(str(tmp_path / "ledger.db"))
    try:
        assert await memory.database_bytes(ledger) > 0
    finally:
        await ledger.aclose()
