"""What a ledger is: the record of every message and every restart decision."""

from __future__ import annotations

from collections.abc import Awaitable, Collection
from dataclasses import dataclass
from typing import Protocol

from anyio.abc import TaskStatus

from mandrill.message import Delivery, Message
from mandrill.policy import Decision, Outcome, RateLimit


@dataclass(frozen=True, slots=True)
class Claim:
    """A decision on one message; ``restart_id`` names the ledger row to finish."""

    decision: Decision
    restart_id: int | None


@dataclass(frozen=True, slots=True)
class HistoryRow:
    hostname: str
    message_id: str
    decided_at: float
    finished_at: float | None
    outcome: str
    detail: str


@dataclass(frozen=True, slots=True)
class SavedMessage:
    """A message as first saved, for replay; ``status`` is ``received`` or ``dead_letter``."""

    message_id: str
    data: bytes
    attributes: dict[str, str]
    hostname: str | None
    first_seen: float
    status: str
    reason: str


class Ledger(Protocol):
    """The source of truth for what was restarted, shared by every daemon on a subscription.

    Writes are batched by :meth:`run`, which must be running (in the service's task group)
    for the other coroutines to complete. Every method raises
    :class:`~mandrill.errors.LedgerError` when the ledger cannot be reached.
    """

    def healthy(self) -> bool:
        """False while the ledger cannot be written (for readiness probes)."""
        ...

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Commit queued writes in batches until cancelled, then flush what is queued."""
        ...

    async def drain(self) -> None:
        """Wait until every write queued now is committed or has failed (callers bound
        it: the service's final settlement does, within its deadline)."""
        ...

    def save(self, message: Message, now: float) -> Awaitable[None]:
        """Queue a message's record (history and replay); await the result to learn if it
        was committed. Queued at call time, so it commits in the same batch as a claim made
        right after it. A redelivery counts its deliveries."""
        ...

    def claim(
        self,
        message: Message,
        now: float,
        min_interval: float,
        rate_limit: RateLimit | None = None,
        *,
        retry_unknown: bool = False,
    ) -> Awaitable[Claim]:
        """Queue a claim at call time (the claims of many messages made before the first
        is awaited commit in one batch); await it for the decision. Decides atomically
        (across daemons) whether this message restarts its host, under the interval rule and
        the fleet's ``rate_limit``; a claimed restart is owned by this daemon instance. First
        resolves the host's claims whose owner stopped heartbeating as ``unknown`` (counted
        as restarts unless ``retry_unknown``)."""
        ...

    async def record(self, message: Message, now: float, outcome: Outcome, detail: str) -> None:
        """Record a decision taken before the claim (a safety control's skip)."""
        ...

    def finish(
        self, restart_id: int, now: float, outcome: Outcome, detail: str
    ) -> Awaitable[None]:
        """Record how a claimed restart ended (also over an ``unknown`` resolution that
        another daemon made while this one could not prove it was alive).

        Queued at call time, like :meth:`save`: it commits with the next batch whether or
        not the result is awaited. Await the result to learn whether it was recorded (in
        the ledger, or in the outcome journal when the ledger could not take it); once its
        batch has committed, awaiting it returns at once."""
        ...

    async def dead_letter(self, delivery: Delivery, now: float, reason: str) -> None:
        """Keep a delivery that will never be processed, with the reason."""
        ...

    async def history(
        self, *, hostname: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[HistoryRow]:
        """Latest decisions first."""
        ...

    async def history_of_outcomes(
        self,
        outcomes: Collection[str],
        *,
        hostname: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[HistoryRow]:
        """Latest decisions first, only those with one of ``outcomes``."""
        ...

    async def saved_messages(
        self,
        *,
        hostname: str | None = None,
        since: float | None = None,
        until: float | None = None,
        status: str | None = None,
    ) -> list[SavedMessage]:
        """Messages as saved, oldest first, for replay."""
        ...

    async def counts(self) -> dict[str, int]:
        """Messages and decisions by outcome, for summaries and tests."""
        ...

    async def aclose(self) -> None: ...


__all__ = ["Claim", "HistoryRow", "Ledger", "SavedMessage"]
