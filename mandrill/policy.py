"""The decisions, as pure functions: restart or skip, and how to settle a delivery.

Nothing here does I/O or reads a clock; callers pass in what the ledger knows and the time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from mandrill.sources.limits import MAX_ACK_DEADLINE_SECONDS


class Outcome(StrEnum):
    """What the ledger records for one restart decision of one message."""

    RESTARTING = "restarting"  # claimed, restart under way
    #: The daemon that claimed it stopped mid-restart (SIGKILL, crash): the restart may or
    #: may not have happened. Counts as a restart unless the operator says to retry.
    UNKNOWN = "unknown"
    RESTARTED = "restarted"
    FAILED = "failed"
    CANCELLED = "cancelled"  # shutdown cancelled the restart; the message was nacked
    SKIPPED = "skipped"
    DRY_RUN = "dry_run"


#: Outcomes after which a redelivered message is a duplicate and is acked without a restart.
FINAL_OUTCOMES = frozenset({Outcome.RESTARTED, Outcome.SKIPPED, Outcome.DRY_RUN})


class Verdict(StrEnum):
    """What the ledger's claim decided for one message."""

    RESTART = "restart"
    SKIP = "skip"  # the host must not be restarted now (interval rule, safety control)
    DUPLICATE = "duplicate"  # this message was already decided
    #: A restart of this message's host is under way (for this message or another one, in
    #: this daemon or another): decided once that restart has an outcome.
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Prior:
    """What the ledger knows before deciding on one message."""

    #: ``(outcome, decided_at)`` of this message's earlier decisions; a ``RESTARTING`` one
    #: is live (the ledger resolves a dead daemon's claims as ``UNKNOWN`` first).
    message_decisions: Sequence[tuple[Outcome, float]] = ()
    #: When the host's last restart that counts began (epoch seconds): a restart that
    #: succeeded, or whose outcome is unknown (unless those are retried). Not one under way.
    host_last_restart: float | None = None
    #: Restarts (and live claims) across the fleet within the rate-limit window.
    fleet_restarts: int = 0
    #: The message id of a live claim on this host by another message, if any.
    host_busy_with: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``restarts`` restarts per ``window`` seconds, across every daemon."""

    restarts: int
    window: float


@dataclass(frozen=True, slots=True)
class Decision:
    """A :class:`Verdict` with the reason a user reads in the history."""

    verdict: Verdict
    reason: str
    #: Earlier failed restarts of this message (for the poison-message limit).
    failures: int = 0


def decide_restart(
    prior: Prior,
    now: float,
    min_interval: float,
    rate_limit: RateLimit | None = None,
    *,
    retry_unknown: bool = False,
) -> Decision:
    """Restart, skip, wait (busy), or recognise a duplicate.

    Only a restart that succeeded, or whose outcome is unknown, counts for the interval
    rule: a message for a host whose restart is under way waits for its outcome (``BUSY``).
    With ``retry_unknown``, an unknown outcome counts as a failed attempt instead.
    """
    failures = 0
    for outcome, _decided_at in prior.message_decisions:
        if outcome in FINAL_OUTCOMES:
            return Decision(Verdict.DUPLICATE, f"already {outcome.value}", failures)
        if outcome is Outcome.UNKNOWN:
            if not retry_unknown:
                return Decision(Verdict.DUPLICATE, UNKNOWN_REASON, failures)
            failures += 1
        if outcome is Outcome.RESTARTING:
            return Decision(Verdict.BUSY, "a restart for this message is under way", failures)
        if outcome is Outcome.FAILED:
            failures += 1
    if prior.host_busy_with is not None:
        reason = f"host is being restarted (message {prior.host_busy_with}); waiting for it"
        return Decision(Verdict.BUSY, reason, failures)
    last = prior.host_last_restart
    if last is not None and now - last < min_interval:
        ago = format_duration(now - last)
        return Decision(Verdict.SKIP, f"host restarted {ago} ago", failures)
    if rate_limit is not None and prior.fleet_restarts >= rate_limit.restarts:
        reason = (
            f"fleet rate limit: {prior.fleet_restarts} restarts in the last"
            f" {format_duration(rate_limit.window)} (limit {rate_limit.restarts})"
        )
        return Decision(Verdict.SKIP, reason, failures)
    return Decision(Verdict.RESTART, "", failures)


#: Why a message whose restart has an unknown outcome is settled without another restart.
UNKNOWN_REASON = "restart outcome unknown (its daemon stopped mid-restart); counted as done"


#: A deferred delivery (its host busy, the ledger down) comes back after this long for its
#: first ``STEADY_DEFERRALS`` deliveries (a claim stranded by a dead daemon is resolved
#: within seconds of its owner's timeout), then twice as late at each delivery, up to the
#: longest lease Pub/Sub grants: a restart that takes long must not use up a subscription's
#: dead-letter policy (10 deliveries by default: 11 minutes this way, where 10 s gave 100 s).
DEFER_SECONDS = 10
STEADY_DEFERRALS = 4
MAX_DEFER_SECONDS = MAX_ACK_DEADLINE_SECONDS


def defer_seconds(delivery_attempt: int | None) -> int:
    """How long a delivery handed back for later stays away; ``delivery_attempt`` is
    ``None`` where the source does not count deliveries (then the first delay)."""
    doublings = min(max((delivery_attempt or 1) - STEADY_DEFERRALS, 0), 16)
    return min(MAX_DEFER_SECONDS, DEFER_SECONDS << doublings)


class Settlement(StrEnum):
    """What becomes of a delivery once its work is over."""

    ACK = "ack"
    NACK = "nack"
    #: Hand back, but only after a pause: another worker is on it, retrying at once spins.
    DEFER = "defer"
    DEAD_LETTER = "dead_letter"


class Result(StrEnum):
    """How the work on one delivery ended."""

    RESTARTED = "restarted"
    SKIPPED = "skipped"
    DUPLICATE = "duplicate"
    BUSY = "busy"
    RESTART_FAILED = "restart_failed"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    DRY_RUN = "dry_run"


def settlement_for(result: Result, failures: int, max_attempts: int) -> Settlement:
    """Ack what is done, nack what may succeed later, dead-letter what never will.

    ``failures`` counts failed restarts of this message including the current one.
    """
    if result is Result.RESTART_FAILED:
        return Settlement.DEAD_LETTER if failures >= max_attempts else Settlement.NACK
    if result is Result.BUSY:
        return Settlement.DEFER
    if result is Result.LEDGER_UNAVAILABLE:
        # Not at once: until the ledger is back, an immediate redelivery fails again.
        return Settlement.DEFER
    return Settlement.ACK


def leases_due(
    leases: Sequence[tuple[str, float, float]], now: float, margin: float, max_lease: float
) -> tuple[list[str], list[str]]:
    """Split held leases ``(ack_id, expires_at, held_since)`` into (extend, give up).

    A lease is due when it expires within ``margin``; one held longer than ``max_lease`` is
    not extended any more, so the source will redeliver it.
    """
    extend: list[str] = []
    give_up: list[str] = []
    for ack_id, expires_at, held_since in leases:
        if expires_at - now > margin:
            continue
        (give_up if now - held_since >= max_lease else extend).append(ack_id)
    return extend, give_up


def format_duration(seconds: float) -> str:
    """``90061`` → ``'1d 1h 1m 1s'``; for humans, in logs and skip reasons."""
    whole = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    if whole or not parts:
        parts.append(f"{whole}s")
    return " ".join(parts)
