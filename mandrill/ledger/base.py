"""What a ledger is: the record of every message and every restart decision."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

from anyio.abc import TaskStatus

from mandrill.ledger.breaker import Breaker
from mandrill.ledger.schema import Dialect
from mandrill.message import Delivery, Message
from mandrill.policy import Decision, Outcome, Reason, Refusal, Rules

T = TypeVar("T")

# The values that travel along the message path are NamedTuples: as immutable as a frozen
# dataclass, and built without a setattr call per field (measured: a few thousand
# instructions a message, over the four of them).


@dataclass(eq=False, slots=True)
class Claim:
    """A restart this daemon claimed in the ledger: the value that travels from the decision
    to the restart and on to its outcome. Until that outcome is recorded, the ledger counts
    it as held by this daemon (see :mod:`mandrill.ledger.owned`).

    ``began`` is set as the restart starts: a claim that never began ends ``cancelled`` (not
    counted), one that began and could not see its end ``unknown`` (counted).
    """

    restart_id: int
    message_id: str
    hostname: str
    #: Earlier failed restarts of this message (for the poison-message limit).
    failures: int
    began: bool = False


class Finish(NamedTuple):
    """How a claimed restart ended, to record."""

    claim: Claim
    outcome: Outcome
    detail: str
    reason: Reason | None = None


class Request(NamedTuple):
    """One message to decide on; with a ``refusal`` (a safety control's no), recorded as a
    skip without a claim."""

    message: Message
    refusal: Refusal | None = None


class Decided(NamedTuple):
    """The ledger's decision on one message: with a ``claim`` when it restarts its host.
    ``saved`` is false when its record (history, replay) could not be written: logged,
    not retried. ``error`` says why a message could not be decided at all (its claim failed
    alone; the others of its transaction were decided). ``conflict`` is the host of another
    message the ledger held under this message's id (a reused id: a restarted emulator
    numbers messages from 1 again), "" if none: this one was saved beside it and decided as
    a new message."""

    decision: Decision | None
    claim: Claim | None = None
    saved: bool = True
    error: str = ""
    conflict: str = ""


class DeadLetterRecord(NamedTuple):
    """A delivery that will never be processed, kept with its reason; ``finish`` is the
    outcome of its last restart, for a message dead-lettered after too many failures."""

    delivery: Delivery
    reason: Reason
    detail: str
    finish: Finish | None = None


@dataclass(frozen=True, slots=True)
class HistoryRow:
    hostname: str
    message_id: str
    decided_at: float
    finished_at: float | None
    outcome: str
    detail: str


@dataclass(frozen=True, slots=True)
class DaemonRow:
    """A daemon that has not stopped, as its heartbeat left it in ``instances``."""

    instance_id: str
    host: str
    pid: int
    started: float
    last_seen: float
    backend: str
    version: str


@dataclass(frozen=True, slots=True)
class ClaimRow:
    """A restart under way: claimed by ``owner`` (a daemon's instance id) at ``since``."""

    hostname: str
    since: float
    owner: str | None
    message_id: str


@dataclass(frozen=True, slots=True)
class CooldownRow:
    """A host the interval rule keeps from restarting until ``until``."""

    hostname: str
    last_restart: float
    until: float


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """What ``mandrill status`` shows, read at the ledger's time ``now``."""

    now: float
    daemons: list[DaemonRow]
    claims: list[ClaimRow]
    cooldowns: list[CooldownRow]


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

    Every write is a transaction that its caller awaits. :meth:`run` must be running (in the
    service's task group) for the daemon's claims to stay alive in the fleet's eyes. Every
    method raises :class:`~mandrill.errors.LedgerError` when the ledger cannot be reached.
    """

    def problem(self) -> str | None:
        """Why the ledger cannot be written now (for readiness probes); ``None`` if it can."""
        ...

    def healthy(self) -> bool:
        """False while the ledger cannot be written."""
        ...

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Keep this daemon alive in the ledger (heartbeats), resolve the claims of daemons
        that stopped and the claims of this one that no task holds, and record the
        outcomes kept while the ledger was down, until cancelled. Raises when the ledger
        has been failing for longer than its outage limit."""
        ...

    async def decide(self, requests: Sequence[Request], rules: Rules) -> list[Decided]:
        """Save each message and decide whether it restarts its host, in one transaction:
        atomically across daemons, under ``rules``. A claimed restart is owned by this
        daemon until its outcome is recorded (:meth:`finish`); one whose owner is gone is
        resolved as ``unknown``, counted as a restart unless ``rules.retry_unknown``.

        Cancelled, the decisions may or may not be committed: a claim that no task holds
        is resolved as cancelled (never began) by the next sweep."""
        ...

    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        """Record how claimed restarts ended (also over an ``unknown`` that another daemon
        guessed while this one could not prove it was alive), in one transaction; when the
        ledger cannot take them, in the outcome journal. Returns, per finish, whether it is
        kept durably (ledger or journal); one that is not is kept in memory and written
        with a later heartbeat."""
        ...

    async def dead_letter(self, records: Sequence[DeadLetterRecord]) -> None:
        """Keep deliveries that will never be processed, with their reasons (and the last
        outcome of each one's restart), in one transaction. Raises :class:`LedgerError`
        if the database cannot take them (the outcomes are kept in the journal)."""
        ...

    def breaker(self) -> Breaker | None:
        """The fleet's restart-storm breaker, open, as this daemon last read it (every
        decision that claims and every heartbeat reads it); ``None`` while closed."""
        ...

    def breaker_opened(self) -> Breaker | None:
        """The breaker the last :meth:`decide` opened (the fleet's one announcement of it:
        only the daemon whose decision opened it sees it here), else ``None``."""
        ...

    async def breaker_status(self) -> Breaker | None:
        """The fleet's open breaker as the ledger has it now, or ``None``."""
        ...

    async def resume(self, by: str) -> Breaker | None:
        """Close the fleet's breaker, recording ``by`` (who) and the ledger's time (when);
        returns it closed, or ``None`` if it was not open. Every daemon restarts again from
        its next decision."""
        ...

    async def stop(self) -> None:
        """This daemon stops: resolve its claims that are still open (``unknown`` where the
        restart began, ``cancelled`` where it never did) and mark it stopped, so that no
        peer has to wait for its heartbeat to age."""
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
        limit: int | None = None,
    ) -> list[SavedMessage]:
        """Messages as saved, oldest first, for replay (the first ``limit`` of them)."""
        ...

    async def counts(self) -> dict[str, int]:
        """Messages and decisions by outcome, for summaries and tests."""
        ...

    async def fleet_status(self, min_interval: float, retry_unknown: bool) -> FleetStatus:
        """The daemons that have not stopped, the claims under way and the hosts in their
        interval's cooldown, at the ledger's time (see
        :func:`mandrill.ledger.reads.fleet_status`)."""
    async def read(self, fn: Callable[[Any, Dialect, float], T]) -> T:
        """``fn(cursor, dialect, now)`` (``now``: the ledger's time) in one read-only
        snapshot, off the message path (the status page, ``explain``; the queries are in
        :mod:`mandrill.ledger.fleet`)."""
        ...

    async def aclose(self) -> None: ...


__all__ = [
    "Claim", "ClaimRow", "CooldownRow", "DaemonRow", "DeadLetterRecord", "Decided", "Finish",
    "FleetStatus", "HistoryRow", "Ledger", "Request", "SavedMessage",
]
