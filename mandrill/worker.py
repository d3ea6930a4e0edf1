"""One delivery, start to finish: parse, save ∥ decide → restart, then settle.

A message's own failure stops here: it is logged once with the message id, counted, and
the message is nacked or dead-lettered. Only cancellation and the service's own failures
(the source giving up) leave :meth:`Worker.handle`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio

from mandrill.errors import InvalidMessage, LedgerError, RestartFailed
from mandrill.ledger.base import Ledger
from mandrill.message import DEFAULT_DOMAIN, Delivery, Message, parse_delivery
from mandrill.obs.counters import Counters, dead_letter_label, skip_label
from mandrill.policy import (
    UNKNOWN_REASON,
    Outcome,
    RateLimit,
    Result,
    Settlement,
    Verdict,
    defer_seconds,
    settlement_for,
)
from mandrill.restarters.base import Restarter
from mandrill.settler import Settler
from mandrill.shutdown import Shutdown
from mandrill.sources.base import Source

log = logging.getLogger(__name__)

#: How long a cancelled worker may spend recording that its restart was cancelled (and
#: never past the service's settle deadline).
CANCEL_RECORD_SECONDS = 2.0
DAY = 86400.0


@dataclass
class WorkerSettings:
    """What the worker decides by: the interval rule, attempts, dry run, safety controls."""

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
    skip_checks: list[Callable[[Message, datetime], str | None]] = field(default_factory=list)
    #: Wall-clock time for the ledger and the interval rule (injectable for tests).
    wall_clock: Callable[[], float] = time.time


class Worker:
    """Handles deliveries, one :meth:`handle` call each (many at once, on the daemon's
    long-lived worker tasks): parse, save beside the claim, restart if the ledger's claim
    says so, then settle through the :class:`~mandrill.settler.Settler`, which waits for the
    outcome's ledger write so that the worker does not."""

    def __init__(
        self,
        *,
        source: Source,
        ledger: Ledger,
        restarter: Restarter,
        settler: Settler,
        counters: Counters,
        settings: WorkerSettings,
        on_decision: Callable[[Message, Outcome, str], None] | None = None,
        shutdown: Shutdown | None = None,
        stop_after: int | None = None,
    ) -> None:
        self._source = source
        self._shutdown = shutdown if shutdown is not None else Shutdown()
        self._ledger = ledger
        self._restarter = restarter
        self._settler = settler
        self._counters = counters
        self.settings = settings
        self._wall_clock = settings.wall_clock
        self._on_decision = on_decision
        #: Request a graceful stop once this many messages are completed.
        self._stop_after = stop_after
        limit = settings.max_concurrent_restarts
        self._restart_slots = anyio.CapacityLimiter(limit) if limit else None

    async def handle(self, delivery: Delivery) -> None:
        """Work on one delivery and settle it. Raises only cancellation and ``SourceError``."""
        self._counters.received += 1
        try:
            message = parse_delivery(delivery, self.settings.domain)
        except InvalidMessage as exc:
            log.warning(
                "invalid message %s: %s",
                delivery.message_id,
                exc.reason,
                extra={"message_id": delivery.message_id},
            )
            await self._dead_letter(delivery, f"invalid: {exc.reason}")
            return
        try:
            result, failures, recorded = await self._work(message)
        except Exception:
            # A bug in handling one message must not stop the others.
            self._counters.errors += 1
            log.exception(
                "unexpected error handling message %s; nacking it",
                message.message_id,
                extra=_context(message),
            )
            self._settler.nack(delivery)
            return
        settlement = settlement_for(result, failures, self.settings.max_attempts)
        if settlement is Settlement.DEAD_LETTER:
            await self._give_up(delivery, message, failures, recorded)
        else:
            self._settle(delivery, settlement, recorded)

    def _settle(
        self, delivery: Delivery, settlement: Settlement, recorded: Awaitable[None] | None
    ) -> None:
        """Ack, nack or defer; with ``recorded`` (the outcome's ledger write), only once it is
        done (queued with the settler: this worker does not wait for it)."""
        settle: Callable[[Delivery], None]
        match settlement:
            case Settlement.ACK:
                settle = self._ack
            case Settlement.NACK:
                settle = self._settler.nack
            case Settlement.DEFER:
                seconds = defer_seconds(delivery.delivery_attempt)
                settle = lambda delivery: self._settler.defer(delivery, seconds)  # noqa: E731
            case _:
                raise AssertionError(settlement)
        if recorded is None:
            settle(delivery)
        else:
            self._settler.after(recorded, delivery, settle)

    async def _give_up(
        self,
        delivery: Delivery,
        message: Message,
        failures: int,
        recorded: Awaitable[None] | None,
    ) -> None:
        if recorded is not None:
            await self._recorded_quietly(recorded)
        log.warning(
            "giving up on message %s: restart of %s failed %d times; dead-lettering it",
            message.message_id, message.hostname, failures, extra=_context(message),
        )
        await self._dead_letter(delivery, f"restart failed {failures} times")

    async def _work(self, message: Message) -> tuple[Result, int, Awaitable[None] | None]:
        now = self._wall_clock()
        # Queued now, so the save commits in the same batch as the claim below.
        saved = self._ledger.save(message, now)
        # Cancelled, this does not wait for the save: it still commits with its batch (the
        # ledger writer outlives the workers), and waiting would hold a shutdown up for as
        # long as the ledger hangs.
        result = await self._decide_and_restart(message, now)
        try:
            await saved
        except LedgerError as exc:
            # The talk's rule: a failed save is logged, not retried.
            self._counters.save_failed += 1
            log.log(self._ledger_level(logging.ERROR), "could not save message %s: %s",
                    message.message_id, exc, extra=_context(message))
        return result

    async def _decide_and_restart(
        self, message: Message, now: float
    ) -> tuple[Result, int, Awaitable[None] | None]:
        settings = self.settings
        if settings.skip_checks:
            when = datetime.fromtimestamp(now, UTC)
            for check in settings.skip_checks:
                reason = check(message, when)
                if reason is not None:
                    return await self._skip_before_claim(message, now, reason), 0, None
        try:
            claim = await self._ledger.claim(
                message,
                now,
                settings.min_restart_interval,
                settings.rate_limit,
                retry_unknown=settings.retry_unknown,
            )
        except LedgerError as exc:
            self._counters.ledger_unavailable += 1
            log.log(self._ledger_level(logging.WARNING),
                    "cannot decide on message %s, handing it back: %s", message.message_id, exc,
                    extra=_context(message))
            return Result.LEDGER_UNAVAILABLE, 0, None
        decision = claim.decision
        if decision.verdict is Verdict.DUPLICATE:
            self._counters.duplicates += 1
            # A dead daemon's restart settled with an unknown outcome deserves more than info.
            level = logging.WARNING if decision.reason == UNKNOWN_REASON else logging.INFO
            log.log(level, "duplicate message %s (%s)", message.message_id, decision.reason,
                    extra=_context(message))
            return Result.DUPLICATE, decision.failures, None
        if decision.verdict is Verdict.BUSY:
            # Deferred, not decided: it comes back once the restart under way has an outcome
            # (or its daemon is found dead), and is decided then.
            log.info("message %s: %s; retrying it later", message.message_id, decision.reason,
                     extra=_context(message))
            return Result.BUSY, decision.failures, None
        if decision.verdict is Verdict.SKIP:
            self._note_skip(message, decision.reason)
            return Result.SKIPPED, decision.failures, None
        assert claim.restart_id is not None
        return await self._restart(message, claim.restart_id, decision.failures)

    async def _restart(
        self, message: Message, restart_id: int, failures: int
    ) -> tuple[Result, int, Awaitable[None]]:
        if self.settings.dry_run:
            recorded = self._record(restart_id, Outcome.DRY_RUN, "dry run: would restart")
            self._counters.dry_run += 1
            self._notify(message, Outcome.DRY_RUN, "would restart")
            log.info("DRY RUN: would restart %s", message.hostname, extra=_context(message))
            return Result.DRY_RUN, failures, recorded
        try:
            if self._restart_slots is None:
                detail = await self._timed_restart(message)
            else:
                async with self._restart_slots:
                    detail = await self._timed_restart(message)
        except RestartFailed as exc:
            return self._restart_failed(message, restart_id, failures, str(exc))
        except anyio.get_cancelled_exc_class():
            with self._shutdown.last_words(CANCEL_RECORD_SECONDS):
                await self._finish(restart_id, Outcome.CANCELLED, "cancelled by shutdown")
            raise
        except Exception as exc:
            log.exception("restarter raised unexpectedly for %s", message.hostname,
                          extra=_context(message))
            return self._restart_failed(message, restart_id, failures, f"bug: {exc!r}")
        recorded = self._record(restart_id, Outcome.RESTARTED, detail)
        self._counters.restarted += 1
        self._notify(message, Outcome.RESTARTED, detail)
        if log.isEnabledFor(logging.INFO):  # spare building the context on the hot path
            log.info("restarted %s (%s)", message.hostname, detail, extra=_context(message))
        return Result.RESTARTED, failures, recorded

    async def _timed_restart(self, message: Message) -> str:
        """The restart, timed for the histogram (success or failure; not cancellation)."""
        # time.monotonic, not anyio's clock: a restart takes real time, and anyio looks up
        # its backend on every call (two a message).
        started = time.monotonic()
        try:
            detail = await self._restarter.restart(message)
        except Exception:
            self._counters.restart_duration.observe(time.monotonic() - started)
            raise
        self._counters.restart_duration.observe(time.monotonic() - started)
        return detail

    def _restart_failed(
        self, message: Message, restart_id: int, failures: int, detail: str
    ) -> tuple[Result, int, Awaitable[None]]:
        recorded = self._record(restart_id, Outcome.FAILED, detail)
        self._counters.restart_failed += 1
        self._notify(message, Outcome.FAILED, detail)
        log.warning("restart of %s failed (attempt %d): %s", message.hostname, failures + 1,
                    detail, extra=_context(message))
        return Result.RESTART_FAILED, failures + 1, recorded

    async def _skip_before_claim(self, message: Message, now: float, reason: str) -> Result:
        try:
            await self._ledger.record(message, now, Outcome.SKIPPED, reason)
        except LedgerError as exc:
            self._counters.ledger_unavailable += 1
            log.log(self._ledger_level(logging.WARNING),
                    "cannot record skip of %s, handing it back: %s", message.message_id, exc,
                    extra=_context(message))
            return Result.LEDGER_UNAVAILABLE
        self._note_skip(message, reason)
        return Result.SKIPPED

    def _ledger_level(self, level: int) -> int:
        """``level`` for a message's ledger failure, or DEBUG during a known outage: the
        ledger says that once for all of them (and the counters count every one)."""
        return level if self._ledger.healthy() else logging.DEBUG

    def _note_skip(self, message: Message, reason: str) -> None:
        self._counters.skipped += 1
        self._counters.skip_reasons[skip_label(reason)] += 1
        self._notify(message, Outcome.SKIPPED, reason)
        log.info("skipped %s: %s", message.hostname, reason, extra=_context(message))

    def _record(self, restart_id: int, outcome: Outcome, detail: str) -> Awaitable[None]:
        """Queue the outcome of a claimed restart; the settler waits for it before the
        message is settled."""
        return self._ledger.finish(restart_id, self._wall_clock(), outcome, detail)

    async def _finish(self, restart_id: int, outcome: Outcome, detail: str) -> None:
        """Record the outcome and wait for it (where nothing settles after it)."""
        try:
            await self._record(restart_id, outcome, detail)
        except LedgerError as exc:
            # Journal and ledger both failed: the claim stays 'restarting' (its host waits)
            # while this daemon runs; once it stops, any daemon resolves it as 'unknown'.
            log.error("could not record outcome %s of restart %d: %s", outcome, restart_id, exc)

    async def _recorded_quietly(self, recorded: Awaitable[None]) -> None:
        try:
            await recorded
        except LedgerError as exc:
            log.error("could not record the outcome of a restart: %s", exc)

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Keep the delivery (ledger and dead-letter topic), then ack it.

        If neither could keep it, it is nacked instead: nothing is lost.
        """
        kept = False
        try:
            await self._ledger.dead_letter(delivery, self._wall_clock(), reason)
            kept = True
        except LedgerError as exc:
            log.error("could not record dead letter %s: %s", delivery.message_id, exc,
                      extra={"message_id": delivery.message_id})
        await self._source.dead_letter(delivery, reason)
        if not kept and not self._source.keeps_dead_letters:
            self._settler.nack(delivery)
            return
        self._counters.dead_lettered += 1
        self._counters.dead_letter_reasons[dead_letter_label(reason)] += 1
        self._ack(delivery)

    def _ack(self, delivery: Delivery) -> None:
        self._settler.ack(delivery)
        counters = self._counters
        counters.completed += 1
        counters.latency.observe(self._wall_clock() - delivery.publish_time.timestamp())
        if self._stop_after is not None and counters.completed >= self._stop_after:
            self._shutdown.request(f"processed {counters.completed} messages")

    def _notify(self, message: Message, outcome: Outcome, detail: str) -> None:
        if self._on_decision is not None:
            self._on_decision(message, outcome, detail)


def _context(message: Message) -> dict[str, str]:
    return {"message_id": message.message_id, "host": message.hostname}
