"""The ledger over any SQL database: batching, the shared SQL, and a dialect."""

from __future__ import annotations

import math

import anyio
from anyio.abc import TaskStatus

from mandrill.ledger import sql
from mandrill.ledger.base import Claim, HistoryRow, SavedMessage
from mandrill.ledger.batch import Batcher, Database, Op
from mandrill.message import Delivery, Message
from mandrill.policy import Outcome, RateLimit


class SQLLedger:
    """A :class:`~mandrill.ledger.base.Ledger` backed by a SQL :class:`Database`."""

    def __init__(
        self,
        db: Database,
        dialect: sql.Dialect,
        *,
        max_batch: int = 2000,
        outage_limit: float = math.inf,
    ) -> None:
        self._dialect = dialect
        self._batcher = Batcher(db, max_batch=max_batch, outage_limit=outage_limit)
        self._db = db

    def healthy(self) -> bool:
        return self._batcher.healthy

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        await self._batcher.run(task_status=task_status)

    def save(self, message: Message, now: float) -> Op[None]:
        d = self._dialect
        return self._batcher.submit(
            lambda cur: sql.save(cur, d, message, now), key=f"message:{message.message_id}"
        )

    async def claim(
        self,
        message: Message,
        now: float,
        min_interval: float,
        stale_after: float,
        rate_limit: RateLimit | None = None,
    ) -> Claim:
        d = self._dialect
        key = f"host:{message.hostname}"
        return await self._batcher.submit(
            lambda cur: sql.claim(cur, d, message, now, min_interval, stale_after, rate_limit),
            key=sql.FLEET_LOCK + key if rate_limit is not None else key,
        )

    async def record(self, message: Message, now: float, outcome: Outcome, detail: str) -> None:
        d = self._dialect
        await self._batcher.submit(
            lambda cur: sql.insert(cur, d, message, now, outcome, detail, finished=True)
        )

    async def finish(self, restart_id: int, now: float, outcome: Outcome, detail: str) -> None:
        d = self._dialect
        await self._batcher.submit(lambda cur: sql.finish(cur, d, restart_id, now, outcome, detail))

    async def dead_letter(self, delivery: Delivery, now: float, reason: str) -> None:
        d = self._dialect
        await self._batcher.submit(
            lambda cur: sql.dead_letter(cur, d, delivery, now, reason),
            key=f"message:{delivery.message_id}",
        )

    async def history(
        self, *, hostname: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[HistoryRow]:
        d = self._dialect
        return await self._batcher.query(lambda cur: sql.history(cur, d, hostname, since, limit))

    async def saved_messages(
        self,
        *,
        hostname: str | None = None,
        since: float | None = None,
        until: float | None = None,
        status: str | None = None,
    ) -> list[SavedMessage]:
        d = self._dialect
        return await self._batcher.query(
            lambda cur: sql.saved_messages(cur, d, hostname, since, until, status)
        )

    async def counts(self) -> dict[str, int]:
        return await self._batcher.query(sql.counts)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._db.close, limiter=self._batcher.limiter)
