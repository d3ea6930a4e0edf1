"""Ledger tests; below, the messages, times and steps they share.

Time in these tests is a :class:`Clock` the test moves: the ledgers are opened with
``server_clock=False``, so that PostgreSQL uses it too, as SQLite always does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio

from mandrill.ledger import open_ledger
from mandrill.ledger.base import Decided, Finish, Request
from mandrill.ledger.sqlledger import SQLLedger
from mandrill.message import Delivery, Message, encode_payload, parse_delivery
from mandrill.policy import Outcome, Rules

T0 = 1_800_000_000.0
HOUR = 3600.0
WEEK = 7 * 86400.0
PUBLISHED = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
#: The interval rule of most tests: a week.
RULES = Rules(WEEK)


@dataclass
class Clock:
    """A wall clock the test sets."""

    now: float = T0

    def __call__(self) -> float:
        return self.now


def delivery(message_id: str, instance: str = "web-1", data: bytes | None = None) -> Delivery:
    return Delivery(
        ack_id=f"ack-{message_id}",
        message_id=message_id,
        data=encode_payload(instance) if data is None else data,
        attributes={"origin": "test"},
        publish_time=PUBLISHED,
        delivery_attempt=1,
    )


def message(message_id: str, instance: str = "web-1") -> Message:
    return parse_delivery(delivery(message_id, instance))


@asynccontextmanager
async def writing(ledger: SQLLedger) -> AsyncIterator[SQLLedger]:
    """``ledger`` with its heartbeat running, as in a daemon; stopped (its open claims
    resolved) and closed afterwards."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.run)
            yield ledger
            tg.cancel_scope.cancel()
        await ledger.stop()
    finally:
        await ledger.aclose()


@asynccontextmanager
async def running(url: str, clock: Clock | None = None, **options: Any) -> AsyncIterator[SQLLedger]:
    """A ledger on ``url`` on the test's clock, with its heartbeat running: one daemon's."""
    ledger = await open_ledger(url, clock=clock or Clock(), server_clock=False, **options)
    async with writing(ledger):
        yield ledger


async def decide(
    ledger: SQLLedger, *messages: Message, rules: Rules = RULES, beat: bool = True
) -> list[Decided]:
    """The ledger's decisions on ``messages``, in one transaction; first, unless ``beat`` is
    false, a heartbeat at the test clock's time (a daemon heartbeats as its time passes,
    and claims nothing while its heartbeat is stale)."""
    if beat:
        await ledger._beat()
    return await ledger.decide([Request(msg) for msg in messages], rules)


async def decide_one(
    ledger: SQLLedger, msg: Message, rules: Rules = RULES, *, beat: bool = True
) -> Decided:
    (decided,) = await decide(ledger, msg, rules=rules, beat=beat)
    return decided


async def finish(ledger: SQLLedger, decided: Decided, outcome: Outcome, detail: str = "") -> None:
    """Record how the restart ``decided`` claimed ended."""
    assert decided.claim is not None, decided
    assert await ledger.finish([Finish(decided.claim, outcome, detail)]) == [True]


def verdict(decided: Decided) -> tuple[Any, str]:
    assert decided.decision is not None, decided.error
    return decided.decision.verdict, decided.decision.detail
