"""The ledger's read-only queries beyond the history: on every SQL ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mandrill.ledger import SQLLedger
from tests.ledger import T0, Clock, decide, message, running


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(ledger_url: str, clock: Clock) -> AsyncIterator[SQLLedger]:
    async with running(ledger_url, clock) as opened:
        yield opened


async def test_saved_messages_up_to_a_limit_are_the_oldest(ledger: SQLLedger, clock: Clock):
    for n, host in enumerate(["web-1", "web-2", "db-1", "db-2"]):
        clock.now = T0 + n
        await decide(ledger, message(f"m{n}", host))
    limited = await ledger.saved_messages(limit=2)
    assert [m.message_id for m in limited] == ["m0", "m1"]
    assert [m.message_id for m in await ledger.saved_messages(since=T0 + 1, limit=2)] == [
        "m1", "m2",
    ]
    assert len(await ledger.saved_messages(limit=10)) == 4
    assert len(await ledger.saved_messages()) == 4
