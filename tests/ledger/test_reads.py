"""The ledger's read-only queries beyond the history: on every SQL ledger."""

from __future__ import annotations

from mandrill.ledger import SQLLedger
from tests.ledger import T0, Clock, decide, message


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
