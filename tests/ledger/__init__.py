"""Ledger tests; below, the messages and times they share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import anyio

from mandrill.ledger.sqlledger import SQLLedger
from mandrill.message import Delivery, Message, encode_payload, parse_delivery

T0 = 1_800_000_000.0
HOUR = 3600.0
WEEK = 7 * 86400.0
PUBLISHED = datetime(2026, 11, 1, tzinfo=UTC)


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
    """``ledger`` with its writer running, as in a daemon; closed afterwards."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.run)
            yield ledger
            tg.cancel_scope.cancel()
    finally:
        await ledger.aclose()
