"""Restart workers: each takes claimed restarts from a stream, one at a time, restarts the
host, and hands the outcome on to be recorded and settled. Nothing comes back to them.

A claim the worker takes once shutdown has begun is not started: it goes on as
``cancelled`` (never began: not counted, the message is redelivered). A worker cancelled
mid-restart (after ``--grace``) hands its claim on as ``unknown``: the restart began and
may have happened, as for a daemon killed at that point. A claim whose restart a blocker
holds back (asked just before it would begin) goes on as ``cancelled`` too, for the
reason ``blocked``, and its message is deferred: it comes back later, to be asked again.
Handing on is a ``send_nowait`` on
an unbounded stream, which a cancelled task can still do; the settler, which outlives the
workers, records it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mandrill.blockers import Block, Blockers
from mandrill.errors import RestartFailed
from mandrill.grouping import GroupLimit
from mandrill.ledger.base import Claim, DeadLetterRecord, Finish
from mandrill.message import DEFAULT_DOMAIN, Delivery, Message
from mandrill.obs.counters import Counters
from mandrill.policy import (
    BLOCKED_DETAIL,
    INTERRUPTED_DETAIL,
    NOT_STARTED_DETAIL,
    BreakerRule,
    Outcome,
    RateLimit,
    Reason,
    Refusal,
    Rules,
    Settlement,
    settlement_after,
)
from mandrill.restarters.base import Restarter
from mandrill.settler import Outbox
from mandrill.shutdown import Shutdown

log = logging.getLogger(__name__)

DAY = 86400.0


@dataclass
class WorkerSettings:
    """What the message path decides by: the interval rule, attempts, dry run, safety
    controls."""

    domain: str = DEFAULT_DOMAIN
    min_restart_interval: float = 7 * DAY
    #: Restart again a host whose restart has an unknown outcome (its daemon died
    #: mid-restart) instead of counting it as restarted.
    retry_unknown: bool = False
    #: Failed restarts of one message after which it is dead-lettered.
    max_attempts: int = 5
    dry_run: bool = False
    max_concurrent_restarts: int | None = None
    rate_limit: RateLimit | None = None
    #: When the fleet's restart-storm breaker opens (never without one).
    breaker: BreakerRule | None = None
    #: Restarts under way at once in each group of hosts, fleet-wide (no limit without).
    groups: GroupLimit | None = None
    skip_checks: list[Callable[[Message, datetime], Refusal | None]] = field(
        default_factory=list
    )
    #: This machine's wall clock, for the safety controls' windows and the latency
    #: histogram (injectable for tests). The ledger keeps its own time.
    wall_clock: Callable[[], float] = time.time

    @property
    def rules(self) -> Rules:
        return Rules(self.min_restart_interval, self.rate_limit, self.retry_unknown,
                     self.breaker, self.groups)


class Claimed(NamedTuple):
    """A delivery whose restart the ledger gave to this daemon: what a worker takes."""

    delivery: Delivery
    message: Message
    claim: Claim


#: Why a claim taken once shutdown began is not started.
SHUTTING_DOWN = "the daemon was shutting down"


class Worker:
    """Restarts claimed hosts; :meth:`run` is one worker task (the daemon starts many)."""

    def __init__(
        self,
        *,
        restarter: Restarter,
        settings: WorkerSettings,
        counters: Counters,
        shutdown: Shutdown,
        outbox: Outbox,
        dead_letters: MemoryObjectSendStream[DeadLetterRecord],
        on_decision: Callable[[Message, Outcome, str], None] | None = None,
        blockers: Blockers | None = None,
    ) -> None:
        """``outbox`` and ``dead_letters`` are this worker's own (clones): :meth:`run`
        closes them when it ends. ``blockers`` are asked just before each restart."""
        self._restarter = restarter
        self.settings = settings
        self._counters = counters
        self._shutdown = shutdown
        self._outbox = outbox
        self._dead_letters = dead_letters
        self._on_decision = on_decision
        self._blockers = blockers or None

    def close(self) -> None:
        """Close this worker's ways on (its outbox and dead letters)."""
        self._outbox.close()
        self._dead_letters.close()

    async def run(self, claims: MemoryObjectReceiveStream[Claimed]) -> None:
        """Restart what ``claims`` brings until it ends, then :meth:`close`. Raises only
        cancellation (having handed its claim on)."""
        try:
            async with claims:
                async for claimed in claims:
                    await self.restart(claimed)
        finally:
            self.close()

    async def restart(self, claimed: Claimed) -> None:
        """Restart one claimed host and hand its outcome on."""
        message, claim = claimed.message, claimed.claim
        if self._shutdown.requested.is_set():
            self._not_started(claimed)
            return
        if self._blockers is not None:
            # Before the claim begins: a blocked restart never began (not counted, not
            # unknown), whatever the blocker took, cancellation included.
            try:
                block = await self._blockers.first(message)
            except anyio.get_cancelled_exc_class():
                self._not_started(claimed)
                raise
            if block is not None:
                self._blocked(claimed, block)
                return
            if self._shutdown.requested.is_set():  # it came while the blockers were asked
                self._not_started(claimed)
                return
        claim.began = True
        if self.settings.dry_run:
            self._counters.dry_run += 1
            self._notify(message, Outcome.DRY_RUN, "would restart")
            log.info("DRY RUN: would restart %s", message.hostname, extra=_context(message))
            self._finish(claimed, Outcome.DRY_RUN, "dry run: would restart")
            return
        # time.monotonic, not anyio's clock: a restart takes real time, and anyio looks up
        # its backend on every call.
        started = time.monotonic()
        try:
            detail = await self._restarter.restart(message)
        except anyio.get_cancelled_exc_class():
            self._counters.restart_unknown += 1
            detail = INTERRUPTED_DETAIL.format(why=SHUTTING_DOWN)
            self._notify(message, Outcome.UNKNOWN, detail)  # only queues: fine when cancelled
            self._finish(claimed, Outcome.UNKNOWN, detail, Reason.INTERRUPTED)
            log.warning("restart of %s interrupted by shutdown: it may or may not have"
                        " happened, and counts as done", message.hostname,
                        extra=_context(message))
            raise
        except Exception as exc:
            self._counters.restart_duration.observe(time.monotonic() - started)
            if isinstance(exc, RestartFailed):
                self._failed(claimed, str(exc))
            else:
                log.exception("restarter raised unexpectedly for %s", message.hostname,
                              extra=_context(message))
                self._failed(claimed, f"bug: {exc!r}")
            return
        self._counters.restart_duration.observe(time.monotonic() - started)
        self._counters.restarted += 1
        self._notify(message, Outcome.RESTARTED, detail)
        if log.isEnabledFor(logging.INFO):  # spare building the context on the hot path
            log.info("restarted %s (%s)", message.hostname, detail, extra=_context(message))
        self._finish(claimed, Outcome.RESTARTED, detail)

    def _not_started(self, claimed: Claimed) -> None:
        self._counters.restart_cancelled += 1
        self._finish(claimed, Outcome.CANCELLED, NOT_STARTED_DETAIL.format(why=SHUTTING_DOWN),
                     Reason.NOT_STARTED)

    def _blocked(self, claimed: Claimed, block: Block) -> None:
        counters = self._counters
        counters.blocked[block.blocker] += 1
        if block.error:
            counters.blocker_errors[block.blocker] += 1
        message = claimed.message
        (log.warning if block.error else log.info)(
            "restart of %s blocked by %s; deferred", message.hostname, block,
            extra=_context(message),
        )
        self._finish(claimed, Outcome.CANCELLED, BLOCKED_DETAIL.format(block=block),
                     Reason.BLOCKED)

    def _failed(self, claimed: Claimed, detail: str) -> None:
        self._counters.restart_failed += 1
        self._notify(claimed.message, Outcome.FAILED, detail)
        log.warning("restart of %s failed (attempt %d): %s", claimed.message.hostname,
                    claimed.claim.failures + 1, detail, extra=_context(claimed.message))
        self._finish(claimed, Outcome.FAILED, detail)

    def _finish(
        self, claimed: Claimed, outcome: Outcome, detail: str, reason: Reason | None = None
    ) -> None:
        """Hand the outcome on: to the settler, or with the message to the dead letters."""
        finish = Finish(claimed.claim, outcome, detail, reason)
        settings = self.settings
        settlement = settlement_after(outcome, claimed.claim.failures, settings.max_attempts,
                                      retry_unknown=settings.retry_unknown, reason=reason)
        if settlement is Settlement.DEAD_LETTER:
            failures = claimed.claim.failures + 1
            log.warning(
                "giving up on message %s: restart of %s failed %d times; dead-lettering it",
                claimed.message.message_id, claimed.message.hostname, failures,
                extra=_context(claimed.message),
            )
            self._dead_letters.send_nowait(DeadLetterRecord(
                claimed.delivery, Reason.MAX_ATTEMPTS, f"restart failed {failures} times",
                finish,
            ))
        else:
            self._outbox.settle(claimed.delivery, settlement, finish)

    def _notify(self, message: Message, outcome: Outcome, detail: str) -> None:
        if self._on_decision is not None:
            self._on_decision(message, outcome, detail)


def _context(message: Message) -> dict[str, str]:
    return {"message_id": message.message_id, "host": message.hostname}


__all__ = ["Claimed", "Worker", "WorkerSettings"]
