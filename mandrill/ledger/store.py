"""The ledger over any SQL database: batching, the shared SQL, and a dialect."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection

import anyio
from anyio.abc import TaskStatus

from mandrill.errors import LedgerError
from mandrill.ledger import sql
from mandrill.ledger.base import Claim, HistoryRow, SavedMessage
from mandrill.ledger.batch import Batcher, Database, Op
from mandrill.ledger.journal import OutcomeJournal
from mandrill.message import Delivery, Message
from mandrill.policy import Outcome, RateLimit

log = logging.getLogger(__name__)

#: While outcomes wait in the journal, how often the ledger is offered them again.
REPLAY_INTERVAL = 5.0


class SQLLedger:
    """A :class:`~mandrill.ledger.base.Ledger` backed by a SQL :class:`Database`.

    With a ``journal``, :meth:`finish` does not fail when the database does: the outcome
    is kept in the journal and :meth:`run` writes it to the database when it is back
    (first of all when it starts, before any claim).
    """

    def __init__(
        self,
        db: Database,
        dialect: sql.Dialect,
        *,
        max_batch: int = 2000,
        outage_limit: float = math.inf,
        journal: OutcomeJournal | None = None,
    ) -> None:
        self._dialect = dialect
        self._batcher = Batcher(db, max_batch=max_batch, outage_limit=outage_limit)
        self._db = db
        self.journal = journal
        self._journal_written = anyio.Event()

    async def check(self) -> None:
        """Raise :class:`LedgerError` if what the ledger needs besides its database (the
        outcome journal) is unusable."""
        if self.journal is not None:
            await self.journal.check()

    def healthy(self) -> bool:
        return self._batcher.healthy

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.journal is None:
            await self._batcher.run(task_status=task_status)
            return
        async with anyio.create_task_group() as tg:
            await tg.start(self._batcher.run)
            # Before anyone claims: a redelivered message must find its restart's outcome.
            await self.record_kept_outcomes()
            task_status.started()
            while True:
                await self._journal_written.wait()
                self._journal_written = anyio.Event()
                await anyio.sleep(REPLAY_INTERVAL)
                if not await self.record_kept_outcomes():
                    self._journal_written.set()  # still waiting: try again later

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
        try:
            await self._submit_finish(restart_id, now, outcome, detail)
        except LedgerError as exc:
            if self.journal is None:
                raise
            await self.journal.keep(restart_id, now, outcome, detail)
            self._journal_written.set()
            log.warning("%s; outcome %s of restart %d kept in %s until the ledger is back",
                        exc, outcome, restart_id, self.journal.path)

    def _submit_finish(
        self, restart_id: int, now: float, outcome: Outcome, detail: str
    ) -> Op[None]:
        d = self._dialect
        return self._batcher.submit(
            lambda cur: sql.finish(cur, d, restart_id, now, outcome, detail)
        )

    async def record_kept_outcomes(self) -> bool:
        """Write the journal's outcomes to the database; True when none is left."""
        assert self.journal is not None
        try:
            kept = await self.journal.entries()
        except LedgerError as exc:
            log.error("cannot read %s", exc)
            return False
        # All queued before the first await: one batch.
        ops = [
            (entry, self._submit_finish(
                entry.restart_id, entry.finished_at, entry.outcome, entry.detail))
            for entry in kept
        ]
        recorded = []
        for entry, op in ops:
            try:
                await op
            except LedgerError:
                continue
            recorded.append(entry)
        try:
            await self.journal.forget(recorded)
        except LedgerError as exc:
            log.error("cannot update %s", exc)  # recorded twice later: harmless
            return False
        if recorded:
            log.info("recorded %d restart outcomes kept in %s", len(recorded), self.journal.path)
        return len(recorded) == len(kept)

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

    async def history_of_outcomes(
        self,
        outcomes: Collection[str],
        *,
        hostname: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[HistoryRow]:
        d = self._dialect
        return await self._batcher.query(
            lambda cur: sql.history_of_outcomes(cur, d, hostname, since, outcomes, limit)
        )

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
