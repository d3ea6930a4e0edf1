"""The decider: the stage between intake and the restarts. One task takes what the
consumer pulled, parses it, and decides a whole batch in one ledger transaction that it
awaits itself: every message saved, every safety control's skip recorded, every claim
made. Then each delivery goes one way on:

* a claimed restart, to the restart workers' stream (the claim is held by this daemon from
  before its transaction began until its outcome is recorded);
* a skip or a duplicate, to the settler (ack); a message whose host is being restarted,
  that the fleet's restart-storm breaker holds back, or that the ledger could not decide
  on, to the settler (deferred: it comes back);
* an invalid payload, to the dead letters.

Cancelled while its transaction runs, the decider leaves its deliveries held (the final
settlement nacks them) and its claims unheld: committed or not, the ledger's sweep (or its
stop) resolves them as never begun.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mandrill.errors import InvalidMessage, LedgerError
from mandrill.ledger.base import DeadLetterRecord, Decided, Ledger, Request
from mandrill.ledger.breaker import Breaker
from mandrill.message import Delivery, Message, parse_delivery
from mandrill.obs.counters import Counters
from mandrill.policy import Outcome, Reason, Refusal, Settlement, Verdict, settlement_for
from mandrill.settler import Outbox
from mandrill.shutdown import Shutdown
from mandrill.streams import ready
from mandrill.worker import Claimed, WorkerSettings

log = logging.getLogger(__name__)

#: Most deliveries decided in one transaction (on SQLite it runs on the loop's thread).
MAX_DECISIONS = 1000


class Decider:
    """Decides on deliveries in batches, from :meth:`run`."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        settings: WorkerSettings,
        counters: Counters,
        shutdown: Shutdown,
        outbox: Outbox,
        restarts: MemoryObjectSendStream[Claimed],
        dead_letters: MemoryObjectSendStream[DeadLetterRecord],
        on_decision: Callable[[Message, Outcome, str], None] | None = None,
        on_breaker: Callable[[Breaker], None] | None = None,
    ) -> None:
        """``on_breaker`` is told of the restart-storm breaker when one of this daemon's
        decisions opens it (once for the fleet: no other daemon's does)."""
        self._ledger = ledger
        self.settings = settings
        self._rules = settings.rules
        self._counters = counters
        self._shutdown = shutdown
        self._outbox = outbox
        self._restarts = restarts
        self._dead_letters = dead_letters
        self._on_decision = on_decision
        self._on_breaker = on_breaker

    async def run(self, deliveries: MemoryObjectReceiveStream[Sequence[Delivery]]) -> None:
        """Decide on what ``deliveries`` brings (a pull's worth at a time; those that came
        while a transaction ran are decided together) until it ends. Raises only
        cancellation."""
        with self._outbox, self._restarts, self._dead_letters:
            async with deliveries:
                async for pulled in deliveries:
                    batch = list(pulled)
                    for more in ready(deliveries):
                        batch += more
                        if len(batch) >= MAX_DECISIONS:
                            break
                    await self.decide(batch)

    async def decide(self, batch: list[Delivery]) -> None:
        """Decide on ``batch`` in one transaction and hand each delivery on."""
        if self._shutdown.requested.is_set():
            # Not started yet: hand them back at once rather than during the grace.
            for delivery in batch:
                self._outbox.settle(delivery, Settlement.NACK)
            return
        counters = self._counters
        counters.received += len(batch)
        requests: list[Request] = []
        deliveries: list[Delivery] = []
        for delivery in batch:
            try:
                message = parse_delivery(delivery, self.settings.domain)
            except InvalidMessage as exc:
                log.warning("invalid message %s: %s", delivery.message_id, exc.reason,
                            extra={"message_id": delivery.message_id})
                self._dead_letters.send_nowait(DeadLetterRecord(
                    delivery, Reason.INVALID, f"invalid: {exc.reason}"
                ))
                continue
            requests.append(Request(message, self._refusal(message)))
            deliveries.append(delivery)
        if not requests:
            return
        try:
            decided = await self._ledger.decide(requests, self._rules)
        except LedgerError as exc:
            counters.ledger_unavailable += len(requests)
            log.log(self._ledger_level(logging.WARNING),
                    "cannot decide on %d messages, handing them back: %s", len(requests), exc)
            for delivery in deliveries:
                self._outbox.settle(delivery, Settlement.DEFER)
            return
        opened = self._ledger.breaker_opened()
        if opened is not None:
            self._announce(opened)
        restarts = self._restarts
        for delivery, request, result in zip(deliveries, requests, decided, strict=True):
            if result.claim is not None and result.saved and not result.conflict:
                # The common case, kept short (a reused id is said in _hand_on).
                restarts.send_nowait(Claimed(delivery, request.message, result.claim))
            else:
                self._hand_on(delivery, request.message, result)

    def _announce(self, breaker: Breaker) -> None:
        log.error("restart-storm breaker opened: %s; every daemon defers its restarts until"
                  " `mandrill resume`", breaker.why)
        if self._on_breaker is not None:
            self._on_breaker(breaker)

    def _refusal(self, message: Message) -> Refusal | None:
        checks = self.settings.skip_checks
        if not checks:
            return None
        when = datetime.fromtimestamp(self.settings.wall_clock(), UTC)
        for check in checks:
            refusal = check(message, when)
            if refusal is not None:
                return refusal
        return None

    def _hand_on(self, delivery: Delivery, message: Message, result: Decided) -> None:
        counters = self._counters
        if result.conflict:
            # Real Pub/Sub never reuses an id; a restarted emulator does, from 1.
            counters.message_id_conflicts += 1
            log.warning(
                "message id %s reused: the ledger holds it for %s, this message is for %s;"
                " decided as a new message", message.message_id, result.conflict,
                message.hostname, extra=_context(message),
            )
        if not result.saved:
            # The talk's rule: a failed save is logged, not retried.
            counters.save_failed += 1
            log.log(self._ledger_level(logging.ERROR), "could not save message %s",
                    message.message_id, extra=_context(message))
        if result.claim is not None:
            self._restarts.send_nowait(Claimed(delivery, message, result.claim))
            return
        decision = result.decision
        if decision is None:  # its claim failed alone
            counters.ledger_unavailable += 1
            log.log(self._ledger_level(logging.WARNING),
                    "cannot decide on message %s, handing it back: %s", message.message_id,
                    result.error, extra=_context(message))
            self._outbox.settle(delivery, Settlement.DEFER)
            return
        if decision.verdict is Verdict.DUPLICATE:
            counters.duplicates += 1
            # A dead daemon's restart settled with an unknown outcome deserves more than info.
            unknown = decision.reason is Reason.UNKNOWN_COUNTED
            log.log(logging.WARNING if unknown else logging.INFO, "duplicate message %s (%s)",
                    message.message_id, decision.detail, extra=_context(message))
            if unknown and self._on_decision is not None:
                # The first this daemon hears of it: the restart's daemon stopped without
                # an outcome (its claim resolved as unknown by the ledger), so told no one.
                self._on_decision(message, Outcome.UNKNOWN, decision.detail)
        elif decision.verdict is Verdict.BUSY:
            # Deferred, not decided: it comes back once the restart under way has an outcome
            # (or its daemon is found dead), and is decided then.
            log.info("message %s: %s; retrying it later", message.message_id, decision.detail,
                     extra=_context(message))
        else:
            counters.skipped += 1
            counters.skip_reasons[decision.reason or Reason.INTERVAL] += 1
            if self._on_decision is not None:
                self._on_decision(message, Outcome.SKIPPED, decision.detail)
            log.info("skipped %s: %s", message.hostname, decision.detail,
                     extra=_context(message))
        self._outbox.settle(delivery, settlement_for(decision))

    def _ledger_level(self, level: int) -> int:
        """``level`` for a message's ledger failure, or DEBUG during a known outage: the
        ledger says that once for all of them (and the counters count every one)."""
        return level if self._ledger.healthy() else logging.DEBUG


def _context(message: Message) -> dict[str, str]:
    return {"message_id": message.message_id, "host": message.hostname}


__all__ = ["MAX_DECISIONS", "Decider"]
