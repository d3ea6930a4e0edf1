"""The ledger over any SQL database: the transactions the daemon runs, and the daemon
instance it writes for, kept alive in the ledger by a heartbeat.

Every write is one transaction, run and awaited by the task that needs it
(:class:`~mandrill.ledger.transactions.Transactions`): the decider's decisions, the
settler's outcomes, a heartbeat. The claims this daemon holds are kept in
:class:`~mandrill.ledger.owned.OwnedClaims`, so that a claim committed without an owner (a
lost COMMIT answer, a decision cancelled mid-commit) is found and resolved.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection, Sequence
from functools import partial
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskStatus

from mandrill.errors import LedgerError, describe
from mandrill.ledger import breaker as breakers
from mandrill.ledger import claims, generations, reads, sql
from mandrill.ledger.base import (
    Claim,
    DeadLetterRecord,
    Decided,
    Finish,
    FleetStatus,
    HistoryRow,
    Request,
    SavedMessage,
)
from mandrill.ledger.journal import KeptOutcome, OutcomeJournal
from mandrill.ledger.owned import OwnedClaims
from mandrill.ledger.reader import Reads
from mandrill.ledger.transactions import Database, Transactions
from mandrill.message import Message
from mandrill.policy import Decision, Outcome, Rules, Verdict

T = TypeVar("T")

#: The identity of a message saved as the first of its id (new, or a redelivery of it).
_FIRST = generations.Identity(0)
log = logging.getLogger(__name__)

#: Default bound on a daemon's silence: past it, its restart claims are resolved by others.
INSTANCE_TIMEOUT = 30.0
#: Heartbeats per ``instance_timeout``: a few may be late or lost before it runs out.
HEARTBEATS_PER_TIMEOUT = 6
#: Instances not seen for this long, owning no claim, are dropped from ``instances``.
FORGET_INSTANCES_AFTER = 7 * 86400.0
#: What a sweep says of this daemon's claims that no task of it holds.
LOST_TRACK = "its daemon lost track of the claim: a decision whose answer was lost"
STOPPED = "its daemon stopped"


def new_instance(backend: str = "", version: str = "") -> sql.Instance:
    """This process as a daemon instance: ``host:pid:random`` (readable in the history)."""
    host = socket.gethostname()
    pid = os.getpid()
    return sql.Instance(f"{host}:{pid}:{secrets.token_hex(3)}", host, pid, backend, version)


class SQLLedger:
    """A :class:`~mandrill.ledger.base.Ledger` backed by a SQL :class:`Database`.

    With a ``journal``, :meth:`finish` does not fail when the database does: the outcomes
    are kept in the journal and written to the database when it is back (first of all when
    :meth:`run` starts, before any claim).

    Messages are recorded under ``subscription`` (a message id is unique within one). The
    ledger writes for one daemon instance (``instance``): :meth:`run` registers it and
    refreshes its heartbeat every ``instance_timeout / 6`` seconds, and :meth:`stop` marks
    it stopped. A claim whose owner has not heartbeated for ``instance_timeout`` is resolved
    as ``unknown`` by the next claim on its host, or by any daemon's sweep.

    Times are the database server's clock where it has one (PostgreSQL): one clock for the
    fleet. Elsewhere (SQLite, one machine's file) they are ``clock``, this machine's wall
    clock; ``server_clock=False`` makes a PostgreSQL ledger use ``clock`` too (for tests
    that move time).
    """

    def __init__(
        self,
        db: Database,
        dialect: sql.Dialect,
        *,
        outage_limit: float = math.inf,
        journal: OutcomeJournal | None = None,
        subscription: str = "",
        instance: sql.Instance | None = None,
        instance_timeout: float = INSTANCE_TIMEOUT,
        clock: Callable[[], float] = time.time,
        server_clock: bool = True,
    ) -> None:
        self._d = dialect
        self._db = db
        self._tx = Transactions(db)
        self.outage_limit = outage_limit
        self.journal = journal
        self.subscription = subscription
        self.instance = instance if instance is not None else new_instance()
        self.instance_timeout = instance_timeout
        self._clock = clock
        self._server_clock = dialect.server_clock if server_clock else None
        #: The claims this daemon holds (see :mod:`mandrill.ledger.owned`).
        self.owned = OwnedClaims()
        #: Claims whose outcome waits in the journal, by restart id.
        self._journaled: dict[int, Claim] = {}
        #: Outcomes that neither the database nor the journal could take: kept here and
        #: offered again at each heartbeat.
        self._unrecorded: list[Finish] = []
        #: The fleet's breaker as the last decision or heartbeat read it (open), and the
        #: one the last decision opened.
        self._breaker: breakers.Breaker | None = None
        self._opened: breakers.Breaker | None = None
        opener: Callable[[], Any] | None = getattr(db, "reader", None)
        reader = opener() if opener is not None else None
        #: Reads on a connection of their own (the status page, explain); none where the
        #: database has no second connection (``:memory:``): they share the ledger's then.
        self._reads = Reads(reader, db.deadline) if reader is not None else None

    def now(self, cur: Any) -> float:
        """The ledger's time, inside a transaction (see the class docstring)."""
        return self._server_clock(cur) if self._server_clock is not None else self._clock()

    async def check(self) -> None:
        """Raise :class:`LedgerError` if what the ledger needs besides its database (the
        outcome journal) is unusable."""
        if self.journal is not None:
            await self.journal.check()

    def healthy(self) -> bool:
        return self._tx.healthy

    def problem(self) -> str | None:
        return self._tx.problem()

    # -- the heartbeat ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat, sweep and record kept outcomes until cancelled.

        Raises :class:`LedgerError` if the instance cannot be registered at start, or once
        the ledger has been failing for longer than ``outage_limit``.
        """
        if self.journal is not None:
            # Before anyone claims: a redelivered message must find its restart's outcome
            # (and before a sweep takes its claim for unknown).
            await self.record_kept_outcomes()
        # Before any claim names this instance as its owner.
        await self._beat(forget=True)
        task_status.started()
        while True:
            await anyio.sleep(self.instance_timeout / HEARTBEATS_PER_TIMEOUT)
            try:
                await self._beat()
                if self._journaled or self._unrecorded:
                    await self.record_kept_outcomes()
            except LedgerError:
                pass  # an outage: the transactions say so once; the claims wait for its end
            failing = self._tx.failing_for()
            if failing >= self.outage_limit:
                raise LedgerError(
                    f"ledger unavailable for {failing:.0f}s (limit {self.outage_limit:.0f}s):"
                    f" {self._tx.problem()}"
                )

    async def _beat(self, *, forget: bool = False) -> None:
        """Say this instance is alive; resolve the claims of those that are not, and this
        daemon's own claims that no task of it holds; read the fleet's breaker."""
        resolved, cancelled, breaker = await self._tx.run(partial(self._sweep, forget=forget))
        self._see_breaker(breaker)
        if resolved:
            log.warning("resolved %d restart claims of stopped daemons as unknown", resolved)
        if cancelled:
            log.warning(
                "resolved %d restart claims of this daemon that no task held (a decision"
                " whose answer was lost, or cancelled) as cancelled: their restarts never"
                " began, and their messages are decided again when they come back", cancelled,
            )

    def _sweep(
        self, cur: Any, *, forget: bool
    ) -> tuple[int, int, breakers.Breaker | None]:
        d, instance = self._d, self.instance
        now = self.now(cur)
        # Others' orphans first, while this transaction holds no lock (see resolve_orphans);
        # judged on this daemon's heartbeat before this one (claims.Owner.may_judge).
        resolved = claims.resolve_orphans(cur, d, self._owner(cur, now), now)
        # What this daemon holds, read inside the transaction: a claim committed before it
        # was reserved before its own transaction began (OwnedClaims.reserve).
        cancelled, _ = claims.reconcile_own(
            cur, d, instance.instance_id, now, held=self.owned.held(), why=LOST_TRACK
        )
        sql.heartbeat(cur, d, instance, now)
        if forget:
            sql.forget_instances(cur, d, now - FORGET_INSTANCES_AFTER)
        return resolved, cancelled, breakers.latest(cur, d)

    def _owner(self, cur: Any, now: float) -> claims.Owner:
        instance_id, timeout = self.instance.instance_id, self.instance_timeout
        judging = claims.may_judge(cur, self._d, instance_id, now, timeout)
        return claims.Owner(instance_id, self.subscription, now - timeout, judging)

    async def stop(self) -> None:
        """Resolve this daemon's open claims (``unknown`` where the restart began,
        ``cancelled`` where it never did), write outcomes still unrecorded, and mark it
        stopped, in one transaction. Raises :class:`LedgerError` if it cannot."""
        unrecorded, self._unrecorded = self._unrecorded, []
        try:
            cancelled, unknown = await self._tx.run(
                partial(self._stop, unrecorded, self.owned.began())
            )
        except BaseException:
            self._unrecorded[:0] = unrecorded
            raise
        self.owned.settled(finish.claim for finish in unrecorded)
        if cancelled or unknown:
            log.warning(
                "at stop, %d claimed restarts that never began were recorded as cancelled"
                " and %d interrupted ones as unknown", cancelled, unknown,
            )

    def _stop(self, unrecorded: list[Finish], began: frozenset[str], cur: Any) -> tuple[int, int]:
        now = self.now(cur)
        self._write_finishes(cur, unrecorded, now)
        counts = claims.reconcile_own(
            cur, self._d, self.instance.instance_id, now, began=began, why=STOPPED
        )
        sql.stopped(cur, self._d, self.instance, now)
        return counts

    # -- decisions ---------------------------------------------------------------------------

    async def decide(self, requests: Sequence[Request], rules: Rules) -> list[Decided]:
        reserved = self.owned.reserve(
            request.message.message_id for request in requests if request.refusal is None
        )
        self._opened = None
        try:
            decided, breaker, opened = await self._tx.run(
                partial(self._decide, list(requests), rules)
            )
        except BaseException:
            # Committed or not: a claim left without an owner is the sweep's to resolve.
            self.owned.release(reserved)
            raise
        self.owned.hold(result.claim for result in decided if result.claim is not None)
        self.owned.release(reserved)
        if opened:
            self._opened = breaker
        self._see_breaker(breaker, announced=opened)
        return decided

    def _decide(
        self, requests: list[Request], rules: Rules, cur: Any
    ) -> tuple[list[Decided], breakers.Breaker | None, bool]:
        """Save every message and decide on it, in one transaction: locks first (one order
        for every daemon: fleet, hosts, then message rows, then restart rows), then the
        message rows, the safety controls' skips, the breaker, and the claims. One failing
        part fails alone (a savepoint each, then item by item). A message whose id the
        ledger holds for another message is a new one (:mod:`~mandrill.ledger.generations`).
        Returns the decisions, the breaker's last row (read when there was a claim to make)
        and whether this transaction opened it."""
        d, subscription = self._d, self.subscription
        now = self.now(cur)
        to_lock = [request.message for request in requests if request.refusal is None]
        if to_lock:
            claims.lock_hosts(cur, d, to_lock, rules)
        saved, identities = self._save(cur, [request.message for request in requests], now)
        group_of = rules.groups.by.group_of if rules.groups is not None else None
        skips = [
            sql.restart_row(subscription, request.message, now, Outcome.SKIPPED,
                            request.refusal.detail, finished=True, owner=None,
                            reason=request.refusal.reason, generation=identity.generation,
                            group=None if group_of is None else group_of(request.message))
            for request, identity in zip(requests, identities, strict=True)
            if request.refusal is not None
        ]
        to_claim = [
            (request.message, identity.generation)
            for request, identity in zip(requests, identities, strict=True)
            if request.refusal is None
        ]
        skipped = _each(cur, skips, partial(sql.insert_many, cur, d))
        owner = self._owner(cur, now)
        if to_claim and not owner.may_judge:
            # Claims made now would be orphans at birth (for a peer to resolve as unknown,
            # counted, never begun): none until this daemon's heartbeat says it is alive.
            raise LedgerError(
                f"this daemon has not heartbeated for over {self.instance_timeout / 2:g}s (cut"
                " off from the ledger): it claims nothing until it has"
            )
        breaker, opened = None, False
        if to_claim:
            breaker, opened = breakers.check(cur, d, rules.breaker, now,
                                             self.instance.instance_id)
        holding = breaker if breaker is not None and breaker.is_open else None
        decisions = _each(
            cur, to_claim,
            partial(claims.claim_many, cur, d, owner, now, rules, breaker=holding),
        )
        results: list[Decided] = []
        skip_results, claim_results = iter(skipped), iter(decisions)
        for request, save, identity in zip(requests, saved, identities, strict=True):
            was_saved = not isinstance(save, Exception)
            result = next(skip_results if request.refusal is not None else claim_results)
            conflict = identity.conflict
            if isinstance(result, Exception):
                results.append(Decided(None, None, was_saved, describe(result), conflict))
            elif request.refusal is not None:
                results.append(Decided(_refused(request), None, was_saved, conflict=conflict))
            else:
                decision, restart_id = result
                message = request.message
                claim = None if restart_id is None else Claim(
                    restart_id, message.message_id, message.hostname, decision.failures
                )
                results.append(Decided(decision, claim, was_saved, conflict=conflict))
        return results, breaker, opened

    # -- the breaker ------------------------------------------------------------------------

    def breaker(self) -> breakers.Breaker | None:
        return self._breaker

    def breaker_opened(self) -> breakers.Breaker | None:
        return self._opened

    async def breaker_status(self) -> breakers.Breaker | None:
        """The fleet's open breaker as the ledger has it now (a query), or ``None``: for
        the status page and ``explain``. Raises :class:`LedgerError`."""
        d = self._d
        return await self._tx.query(lambda cur: breakers.current(cur, d))

    async def resume(self, by: str) -> breakers.Breaker | None:
        d = self._d

        def close(cur: Any) -> breakers.Breaker | None:
            d.lock_hosts(cur, [claims.FLEET_LOCK])
            return breakers.close(cur, d, self.now(cur), by)

        closed = await self._tx.run(close)
        self._see_breaker(closed)
        return closed

    def _see_breaker(self, breaker: breakers.Breaker | None, *, announced: bool = False) -> None:
        """Keep what a transaction read of the breaker (its last row, or ``None`` when not
        read); say once when this daemon finds it opened by another, or closed."""
        if breaker is None:
            return
        seen = self._breaker
        if breaker.is_open:
            if not announced and (seen is None or seen.id != breaker.id):
                log.warning("restart-storm breaker open (daemon %s opened it): %s; every"
                            " restart is deferred until `mandrill resume`",
                            breaker.opened_by, breaker.why)
            self._breaker = breaker
        elif seen is not None:
            log.warning("restart-storm breaker closed by %s: restarts resume",
                        breaker.closed_by)
            self._breaker = None

    def _save(
        self, cur: Any, messages: list[Message], now: float
    ) -> tuple[list[Any], list[generations.Identity]]:
        """Save ``messages`` (their rows, in the caller's transaction): each one's result (an
        exception for a row that failed) and identity. Written as generation 0 first, the
        common case (a new message, or a redelivery): only when a row was not written, an
        id the ledger holds for another message, are the ids read and each such message
        saved as its generation (:mod:`~mandrill.ledger.generations`)."""
        subscription, d = self.subscription, self._d
        rows = [sql.message_row(subscription, message, now) for message in messages]
        saved = _each(cur, rows, partial(sql.write_messages, cur, d))
        if all(result is True for result in saved):
            return saved, [_FIRST] * len(messages)
        identities = self._identify(cur, [
            (message.message_id, message.hostname, message.data, message.publish_time)
            for message in messages
        ])
        later = [index for index, identity in enumerate(identities) if identity.generation]
        again = _each(cur, [
            sql.message_row(subscription, messages[index], now, identities[index].generation)
            for index in later
        ], partial(sql.write_messages, cur, d))
        for index, result in zip(later, again, strict=True):
            saved[index] = result
        return saved, identities

    def _identify(
        self, cur: Any, messages: Sequence[tuple[str, str | None, bytes, float]]
    ) -> list[generations.Identity]:
        """Each message's generation under its id (and the host of the other message the
        ledger holds under it, if any), in order; ``messages`` as (id, host, payload,
        publish time)."""
        versions = generations.read_versions(
            cur, self._d, self.subscription, {message[0] for message in messages}
        )
        return [generations.identify(versions, *message) for message in messages]

    # -- outcomes ----------------------------------------------------------------------------

    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        if not finishes:
            return []
        try:
            await self._tx.run(partial(self._finish, list(finishes)))
        except LedgerError as exc:
            return [await self._keep(finishes, exc)] * len(finishes)
        self.owned.settled(finish.claim for finish in finishes)
        return [True] * len(finishes)

    def _finish(self, finishes: list[Finish], cur: Any) -> None:
        self._write_finishes(cur, finishes, self.now(cur))

    def _write_finishes(self, cur: Any, finishes: Collection[Finish], now: float) -> None:
        if finishes:
            sql.finish_many(cur, self._d, [
                sql.finish_row(f.claim.restart_id, now, f.outcome, f.detail, f.reason)
                for f in finishes
            ])

    async def _keep(self, finishes: Sequence[Finish], error: LedgerError) -> bool:
        """Keep outcomes the database could not take: in the journal (True), else in
        memory until a heartbeat writes them (False: nothing durable holds them)."""
        if self.journal is not None:
            now = self._clock()
            try:
                await self.journal.keep_many([
                    (f.claim.restart_id, now, f.outcome, f.detail, f.reason or "")
                    for f in finishes
                ])
            except LedgerError as exc:
                log.error("%s; and %s", error, exc)
            else:
                self._journaled.update((f.claim.restart_id, f.claim) for f in finishes)
                log.warning("%s; %d restart outcomes kept in %s until the ledger is back",
                            error, len(finishes), self.journal.path)
                return True
        self._unrecorded.extend(finishes)
        return False

    async def record_kept_outcomes(self) -> bool:
        """Write the journal's outcomes (and those kept in memory) to the database; True
        when none is left."""
        kept: list[KeptOutcome] = []
        if self.journal is not None:
            try:
                kept = await self.journal.entries()
            except LedgerError as exc:
                log.error("cannot read %s", exc)
                return False
        unrecorded, self._unrecorded = self._unrecorded, []
        if not kept and not unrecorded:
            return True
        try:
            await self._tx.run(partial(self._record_kept, kept, unrecorded))
        except LedgerError:
            self._unrecorded[:0] = unrecorded
            return False
        self.owned.settled(finish.claim for finish in unrecorded)
        self.owned.settled(
            claim for claim in (self._journaled.pop(entry.restart_id, None) for entry in kept)
            if claim is not None
        )
        if self.journal is not None:
            try:
                await self.journal.forget(kept)
            except LedgerError as exc:
                log.error("cannot update %s", exc)  # recorded twice later: harmless
                return False
        if kept:
            assert self.journal is not None
            log.info("recorded %d restart outcomes kept in %s", len(kept), self.journal.path)
        return True

    def _record_kept(
        self, kept: list[KeptOutcome], unrecorded: list[Finish], cur: Any
    ) -> None:
        now = self.now(cur)
        self._write_finishes(cur, unrecorded, now)
        if kept:
            sql.finish_many(cur, self._d, [
                sql.finish_row(entry.restart_id, entry.finished_at, entry.outcome,
                               entry.detail, entry.reason)
                for entry in kept
            ])

    # -- dead letters ------------------------------------------------------------------------

    async def dead_letter(self, records: Sequence[DeadLetterRecord]) -> None:
        """Record dead letters (see the protocol). Raises :class:`LedgerError` if the
        database cannot take them (their restarts' outcomes are kept in the journal)."""
        finishes = [record.finish for record in records if record.finish is not None]
        try:
            await self._tx.run(partial(self._dead_letter, list(records)))
        except LedgerError as exc:
            if finishes:
                await self._keep(finishes, exc)
            raise
        self.owned.settled(finish.claim for finish in finishes)

    def _dead_letter(self, records: list[DeadLetterRecord], cur: Any) -> None:
        now = self.now(cur)
        # A dead letter whose id the ledger holds for another message is kept beside it.
        identities = self._identify(cur, [
            (record.delivery.message_id, None, record.delivery.data,
             record.delivery.publish_time)
            for record in records
        ])
        sql.write_messages(cur, self._d, [
            sql.dead_letter_row(self.subscription, record.delivery, now, record.detail,
                                identity.generation)
            for record, identity in zip(records, identities, strict=True)
        ])
        self._write_finishes(
            cur, [record.finish for record in records if record.finish is not None], now
        )

    # -- reads -------------------------------------------------------------------------------

    async def history(
        self, *, hostname: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[HistoryRow]:
        d = self._d
        return await self._tx.query(lambda cur: reads.history(cur, d, hostname, since, limit))

    async def history_of_outcomes(
        self,
        outcomes: Collection[str],
        *,
        hostname: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[HistoryRow]:
        d = self._d
        return await self._tx.query(
            lambda cur: reads.history_of_outcomes(cur, d, hostname, since, outcomes, limit)
        )

    async def saved_messages(
        self,
        *,
        hostname: str | None = None,
        since: float | None = None,
        until: float | None = None,
        status: str | None = None,
        limit: int | None = None,
    ) -> list[SavedMessage]:
        d = self._d
        return await self._tx.query(
            lambda cur: reads.saved_messages(cur, d, hostname, since, until, status, limit)
        )

    async def counts(self) -> dict[str, int]:
        return await self._tx.query(reads.counts)

    async def fleet_status(self, min_interval: float, retry_unknown: bool) -> FleetStatus:
        d = self._d
        return await self._tx.query(
            lambda cur: reads.fleet_status(cur, d, self.now(cur), min_interval, retry_unknown)
        )

    async def read(self, fn: Callable[[Any, sql.Dialect, float], T]) -> T:
        """``fn(cursor, dialect, now)``, ``now`` the ledger's time, in one read-only
        snapshot on a connection of its own (opened by the first read): neither waiting for
        the message path's transactions nor holding them up. Raises :class:`LedgerError`."""
        d = self._d

        def with_time(cur: Any) -> T:
            return fn(cur, d, self.now(cur))

        if self._reads is None:
            return await self._tx.query(with_time)
        return await self._reads.run(with_time)

    async def aclose(self) -> None:
        if self._reads is not None:
            await self._reads.aclose()
        if self._tx.stuck:
            # A thread is still inside a transaction that hangs and holds the connection:
            # closing it would wait for that, or break it. The process exit closes it.
            log.warning("ledger connection left open: a transaction is still stuck in it")
            return
        await anyio.to_thread.run_sync(self._db.close, limiter=self._tx.limiter)


def _each(cur: Any, items: list[T], run: Callable[[list[T]], Sequence[Any]]) -> list[Any]:
    """``run(items)`` in a savepoint; if it fails, ``run([item])`` for each item in a
    savepoint of its own, so that one bad item fails alone. Returns one result per item (an
    exception for an item that failed). An error in the savepoint statements themselves
    (the connection is gone) fails the whole transaction."""
    if not items:
        return []
    failed, results = _in_savepoint(cur, lambda: run(items))
    if not failed:
        return list(results)
    if len(items) == 1:
        return [results]
    singles = [_in_savepoint(cur, lambda item=item: run([item])) for item in items]  # type: ignore[misc]
    return [result if failed else result[0] for failed, result in singles]


def _in_savepoint(cur: Any, work: Callable[[], Any]) -> tuple[bool, Any]:
    """``(False, result)`` of ``work()`` in a savepoint, or ``(True, exception)`` with the
    savepoint rolled back."""
    cur.execute("SAVEPOINT part")
    try:
        result = work()
    except Exception as exc:
        cur.execute("ROLLBACK TO SAVEPOINT part")
        cur.execute("RELEASE SAVEPOINT part")
        return True, exc
    cur.execute("RELEASE SAVEPOINT part")
    return False, result


def _refused(request: Request) -> Decision:
    assert request.refusal is not None
    return Decision(Verdict.SKIP, request.refusal.reason, request.refusal.detail)


__all__ = ["INSTANCE_TIMEOUT", "SQLLedger", "new_instance"]
