"""The decision path binds plain values to SQLite. Python's sqlite3 binds an exact ``int``,
``float`` or ``str`` directly and runs every other parameter through its adaptation
protocol: an enum member costs about 3.5k instructions there, and the path bound four a
message (16k instructions a message on a Pub/Sub drain, by callgrind:
``python -m tests.benchmarks.instructions``). No behaviour shows it, so these tests refuse
to adapt the ledger's enums: a member bound anywhere on the path fails its statement."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from mandrill.ledger.base import Finish, Request
from mandrill.policy import Outcome, Reason, Refusal, Verdict
from tests.ledger import HOUR, RULES, T0, Clock, decide_one, message, running, verdict


@pytest.fixture
def enums_refused() -> Iterator[None]:
    """sqlite3 raises for an :class:`Outcome`, :class:`Reason` or :class:`Verdict` bound
    as a parameter (it asks the adapters registered for a type first)."""

    def refuse(value: object) -> object:
        raise TypeError(f"{value!r} bound as an enum member")

    enums = (Outcome, Reason, Verdict)
    for enum in enums:
        sqlite3.register_adapter(enum, refuse)
    try:
        yield
    finally:
        for enum in enums:
            sqlite3.adapters.pop((enum, sqlite3.PrepareProtocol), None)


@pytest.mark.usefixtures("enums_refused")
async def test_claims_skips_and_outcomes_bind_plain_values(tmp_path: Path) -> None:
    clock = Clock()
    async with running(f"sqlite:///{tmp_path / 'ledger.db'}", clock) as ledger:
        first = await decide_one(ledger, message("m1", "web-1"))
        assert verdict(first)[0] is Verdict.RESTART
        assert first.claim is not None
        assert await ledger.finish([Finish(first.claim, Outcome.RESTARTED, "ok")]) == [True]
        failing = await decide_one(ledger, message("m2", "web-2"))
        assert failing.claim is not None
        assert await ledger.finish(
            [Finish(failing.claim, Outcome.FAILED, "no route", Reason.INTERRUPTED)]
        ) == [True]

        clock.now = T0 + HOUR
        skipped = await decide_one(ledger, message("m3", "web-1"))
        assert verdict(skipped) == (Verdict.SKIP, "host restarted 1h ago")
        refusal = Refusal(Reason.BLACKOUT_DATE, "a blackout date")
        (refused,) = await ledger.decide([Request(message("m4", "web-3"), refusal)], RULES)
        assert refused.decision is not None
        assert refused.decision.reason is Reason.BLACKOUT_DATE
        left = await decide_one(ledger, message("m5", "web-4"))
        assert left.claim is not None  # never begun: the ledger's stop cancels it

    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = db.execute("SELECT message_id, outcome, reason FROM restarts").fetchall()
    assert sorted(rows) == [
        ("m1", "restarted", ""),
        ("m2", "failed", "interrupted"),
        ("m3", "skipped", "interval"),
        ("m4", "skipped", "blackout_date"),
        ("m5", "cancelled", "not_started"),
    ]
