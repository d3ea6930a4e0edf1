"""The ledger over any SQL database: batching, the shared SQL, and a dialect; and the
daemon instance it writes for, kept alive in the ledger by a heartbeat."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Collection

import anyio
from anyio.abc import TaskStatus

from mandrill.errors import LedgerError
from mandrill.ledger import claims, reads, sql
from mandrill.ledger.base import Claim, HistoryRow, SavedMessage
from mandrill.ledger.batch import Batcher, Database
from mandrill.ledger.journal import OutcomeJournal
from mandrill.ledger.ops import Op
from mandrill.message import Delivery, Message
from mandrill.policy import Outcome, RateLimit

log = logging.getLogger(__name__)

#: While outcomes wait in the journal, how often the ledger is offered them again.
REPLAY_INTERVAL = 5.0
#: Default bound on a daemon's silence: past it, its restart claims are resolved by others.
INSTANCE_TIMEOUT = 30.0
#: Heartbeats per ``instance_timeout``: a few may be late or lost before it runs out.
HEARTBEATS_PER_TIMEOUT = 6
#: Instances not seen for this long, owning no claim, are dropped from ``instances``.
FORGET_INSTANCES_AFTER = 7 * 86400.0


#: The kinds of gathered ops (see Batcher.gather): message rows (saves and dead letters, in
#: one op so that their row locks are taken in one order), claims, and finishes.
_MESSAGES = "messages"
_CLAIMS = "claims"
_FINISHES = "finishes"


def new_instance(clock: Callable[[], float] = time.time) -> sql.Instance:
    """This process as a daemon instance: ``host:pid:random`` (readable in the history)."""
    host = socket.gethostname()
    pid = os.getpid()
    return sql.Instance(f"{host}:{pid}:{secrets.token_hex(3)}", host, pid, clock())


class SQLLedger:
    """A :class:`~mandrill.ledger.base.Ledger` backed by a SQL :class:`Database`.

    With a ``journal``, :meth:`finish` does not fail when the database does: the outcome
    is kept in the journal and :meth:`run` writes it to the database when it is back
    (first of all when it starts, before any claim).

    Messages are recorded under ``subscription`` (a message id is unique within one). The
    ledger writes for one daemon instance (``instance``): :meth:`run` registers it and
    refreshes its heartbeat every ``instance_timeout / 6`` seconds of ``clock`` (wall
    time), and marks it stopped when it ends. A claim whose owner has not heartbeated for
    ``instance_timeout`` is resolved as ``unknown`` by the next claim on its host.
    """

    def __init__(
        self,
        db: Database,
        dialect: sql.Dialect,
        *,
        max_batch: int = 2000,
        outage_limit: float = math.inf,
        journal: OutcomeJournal | None = None,
        subscription: str = "",
        instance: sql.Instance | None = None,
        instance_timeout: float = INSTANCE_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dialect = dialect
        self._batcher = Batcher(db, max_batch=max_batch, outage_limit=outage_limit)
        self._db = db
        self.journal = journal
        self._journal_written = anyio.Event()
        self.subscription = subscription
        self.instance = instance if instance is not None else new_instance(clock)
        self.instance_timeout = instance_timeout
        self._clock = clock
        self._batcher.on_close.append(
            lambda cur: sql.stopped(cur, dialect, self.instance, self._clock())
        )

    async def check(self) -> None:
        """Raise :class:`LedgerError` if what the ledger needs besides its database (the
        outcome journal) is unusable."""
        if self.journal is not None:
            await self.journal.check()

    def healthy(self) -> bool:
        return self._batcher.healthy

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit batches, heartbeat, and record kept outcomes until cancelled.

        Raises :class:`LedgerError` if the instance cannot be registered at start, or when
        the ledger has been unreachable for longer than ``outage_limit``.
        """
        async with anyio.create_task_group() as tg:
            await tg.start(self._batcher.run)
            if self.journal is not None:
                # Before anyone claims: a redelivered message must find its restart's outcome
                # (and before the sweep below takes it for unknown).
                await self.record_kept_outcomes()
                tg.start_soon(self._replay_journal)
            # Before any claim names this instance as its owner.
            await self._heartbeat(forget=True)
            task_status.started()
            while True:
                await anyio.sleep(self.instance_timeout / HEARTBEATS_PER_TIMEOUT)
                # An outage: the batcher says so once; the claims wait for it to end.
                with contextlib.suppress(LedgerError):
                    await self._heartbeat()

    def _heartbeat(self, *, forget: bool = False) -> Op[None]:
        """Say this instance is alive, and resolve the claims of those that are not."""
        d, instance, owner, now = self._dialect, self.instance, self._owner(), self._clock()

        def beat(cur: sql.Cursor) -> None:
            # The sweep first, while this transaction holds no lock (see resolve_orphans).
            resolved = claims.resolve_orphans(cur, d, owner, now)
            if resolved:
                log.warning("resolved %d restart claims of stopped daemons as unknown",
                            resolved)
            sql.heartbeat(cur, d, instance, now)
            if forget:
                sql.forget_instances(cur, d, now - FORGET_INSTANCES_AFTER)

        return self._batcher.submit(beat)

    def _owner(self) -> claims.Owner:
        # Liveness on the ledger's own clock, the one its heartbeats are written with.
        return claims.Owner(
            self.instance.instance_id, self.subscription, self._clock() - self.instance_timeout
        )

    async def _replay_journal(self) -> None:
        while True:
            await self._journal_written.wait()
            self._journal_written = anyio.Event()
            await anyio.sleep(REPLAY_INTERVAL)
            if not await self.record_kept_outcomes():
                self._journal_written.set()  # still waiting: try again later

    # Each kind of write is gathered into one op per batch (Batcher.gather): one statement
    # per kind and batch, executed for many rows, instead of one per message.

    def save(self, message: Message, now: float) -> Op[None]:
        return self._batcher.gather(
            _MESSAGES, self._write_messages,
            sql.message_row(self.subscription, message, now),
            key="message:" + message.message_id,
        )

    def _write_messages(self, cur: sql.Cursor, rows: list[sql.MessageRow]) -> list[None]:
        return sql.write_messages(cur, self._dialect, rows)

    def claim(
        self,
        message: Message,
        now: float,
        min_interval: float,
        rate_limit: RateLimit | None = None,
        *,
        retry_unknown: bool = False,
    ) -> Op[Claim]:
        key = "host:" + message.hostname
        return self._batcher.gather(
            _CLAIMS, self._claim_many,
            claims.ClaimRequest(self._owner(), message, now, min_interval, rate_limit,
                             retry_unknown),
            key=claims.FLEET_LOCK + key if rate_limit is not None else key,
        )

    def _claim_many(self, cur: sql.Cursor, requests: list[claims.ClaimRequest]) -> list[Claim]:
        return claims.claim_many(cur, self._dialect, requests)

    async def record(self, message: Message, now: float, outcome: Outcome, detail: str) -> None:
        d, subscription = self._dialect, self.subscription
        await self._batcher.submit(
            lambda cur: sql.insert(cur, d, subscription, message, now, outcome, detail,
                                   finished=True)
        )

    def finish(
        self, restart_id: int, now: float, outcome: Outcome, detail: str
    ) -> Awaitable[None]:
        """Queue the outcome of a claimed restart now (in the next batch); await the result
        to learn that it was recorded. With a journal, an outcome the database could not
        take is kept in the journal instead (awaiting fails only if that fails too)."""
        op = self._submit_finish(restart_id, now, outcome, detail)
        if self.journal is None:
            return op
        return self._finish_or_keep(op, restart_id, now, outcome, detail)

    async def _finish_or_keep(
        self, op: Op[None], restart_id: int, now: float, outcome: Outcome, detail: str
    ) -> None:
        assert self.journal is not None
        try:
            await op
        except LedgerError as exc:
            await self.journal.keep(restart_id, now, outcome, detail)
            self._journal_written.set()
            log.warning("%s; outcome %s of restart %d kept in %s until the ledger is back",
                        exc, outcome, restart_id, self.journal.path)

    def _submit_finish(
        self, restart_id: int, now: float, outcome: Outcome, detail: str
    ) -> Op[None]:
        return self._batcher.gather(
            _FINISHES, self._finish_many, sql.finish_row(restart_id, now, outcome, detail)
        )

    def _finish_many(self, cur: sql.Cursor, rows: list[sql.FinishRow]) -> list[None]:
        return sql.finish_many(cur, self._dialect, rows)

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
        await self._batcher.gather(
            _MESSAGES, self._write_messages,
            sql.dead_letter_row(self.subscription, delivery, now, reason),
            key="message:" + delivery.message_id,
        )

    async def history(
        self, *, hostname: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[HistoryRow]:
        d = self._dialect
        return await self._batcher.query(lambda cur: reads.history(cur, d, hostname, since, limit))

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
            lambda cur: reads.history_of_outcomes(cur, d, hostname, since, outcomes, limit)
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
            lambda cur: reads.saved_messages(cur, d, hostname, since, until, status)
        )

    async def counts(self) -> dict[str, int]:
        return await self._batcher.query(reads.counts)

    async def drain(self) -> None:
        await self._batcher.drain()

    async def aclose(self) -> None:
        if self._batcher.stuck:
            # A thread is still inside a write that hangs and holds the connection: closing
            # it would wait for that write, or break it. The process exit closes it.
            log.warning("ledger connection left open: a write is still stuck in it")
            return
        await anyio.to_thread.run_sync(self._db.close, limiter=self._batcher.limiter)
