"""The dead-letter stage, directly: publish, record what is kept, then settle; nothing acked
that is kept nowhere. The ledger is the real SQLite one; the broker the real in-process one
(the emulator's 404 and 400 are in tests/test_dead_letter_failures.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mandrill.dead_letters import DeadLetters
from mandrill.errors import SourceError
from mandrill.holdings import Holdings
from mandrill.ledger import SQLLedger, open_ledger, sqlite
from mandrill.ledger.base import DeadLetterRecord, Finish
from mandrill.message import Delivery
from mandrill.obs.counters import Counters
from mandrill.policy import Outcome, Reason, Settlement
from mandrill.settler import Outbox, settle_stream
from mandrill.sources.memory import MemoryBroker
from tests.ledger import decide_one, delivery, message


class NowhereToKeep(MemoryBroker):
    """A source without a dead-letter topic: the ledger is the only keeper."""

    def __init__(self) -> None:
        super().__init__()
        self.keeps_dead_letters = False


class Refusing(MemoryBroker):
    """A dead-letter topic that refuses every publish."""

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        raise SourceError("publish to dead: HTTP 404 NOT_FOUND: Topic not found")


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SQLLedger]:
    ledger = await open_ledger(str(tmp_path / "ledger.db"))
    yield ledger
    await ledger.aclose()


async def keep(source: MemoryBroker, ledger: SQLLedger, letter: DeadLetterRecord
               ) -> tuple[Settlement, Counters]:
    holdings, counters = Holdings(4), Counters()
    holdings.add(letter.delivery, 0.0, 600.0)
    send, settled = settle_stream()
    with settled, Outbox(send, holdings) as outbox:
        await DeadLetters(source=source, ledger=ledger, counters=counters,
                          outbox=outbox).keep(letter)
        assert len(holdings) == 0
        return settled.receive_nowait().settlement, counters


async def test_published_and_recorded_it_is_acked(ledger: SQLLedger) -> None:
    broker = MemoryBroker()
    letter = DeadLetterRecord(delivery("bad", data=b"[]"), Reason.INVALID, "invalid: a list")
    settlement, counters = await keep(broker, ledger, letter)
    assert settlement is Settlement.ACK
    assert [d.reason for d in broker.dead_letters] == ["invalid: a list"]
    assert [(s.message_id, s.status) for s in await ledger.saved_messages()] == [
        ("bad", "dead_letter")
    ]
    assert (counters.dead_lettered, counters.dead_letter_reasons) == (1, {Reason.INVALID: 1})


async def test_a_refused_publish_is_handed_back_and_not_recorded_as_a_dead_letter(
    ledger: SQLLedger,
) -> None:
    claimed = await decide_one(ledger, message("m1"))
    assert claimed.claim is not None
    finish = Finish(claimed.claim, Outcome.FAILED, "exit 1")
    letter = DeadLetterRecord(delivery("m1"), Reason.MAX_ATTEMPTS, "restart failed 5 times",
                              finish)
    settlement, counters = await keep(Refusing(), ledger, letter)
    assert settlement is Settlement.DEFER
    assert (counters.dead_lettered, counters.dead_letter_failures) == (0, 1)
    assert await ledger.saved_messages(status="dead_letter") == []
    # The last restart's outcome ends its claim all the same.
    assert [row.outcome for row in await ledger.history()] == ["failed"]


@pytest.mark.parametrize("source", [MemoryBroker, NowhereToKeep])
async def test_a_dead_letter_the_ledger_cannot_record_is_handed_back(
    ledger: SQLLedger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    source: type[MemoryBroker],
) -> None:
    # Nothing acked without its record: published or not, it comes back, and is kept again.
    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_MS", 50)
    letter = DeadLetterRecord(delivery("bad", data=b"[]"), Reason.INVALID, "invalid: a list")
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None,
                            check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # the ledger is unreachable
        settlement, counters = await keep(source(), ledger, letter)
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert settlement is Settlement.DEFER
    assert counters.dead_lettered == 0
