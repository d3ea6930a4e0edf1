"""The decisions, as pure functions: restart or skip, and how to settle a delivery.

Nothing here does I/O or reads a clock; callers pass in what the ledger knows and the time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from mandrill.sources.limits import MAX_ACK_DEADLINE_SECONDS

if TYPE_CHECKING:
    from mandrill.grouping import GroupLimit


class Outcome(StrEnum):
    """What the ledger records for one restart decision of one message."""

    RESTARTING = "restarting"  # claimed, restart under way
    #: The restart began and its daemon could not see it end: killed (SIGKILL, a crash,
    #: found by its silence), or stopping (cancelled after ``--grace``). It may or may not
    #: have happened: counts as a restart unless the operator says to retry.
    UNKNOWN = "unknown"
    RESTARTED = "restarted"
    FAILED = "failed"
    #: Claimed, but the restart never began (the daemon was stopping, or lost track of the
    #: claim): does not count; the message is redelivered.
    CANCELLED = "cancelled"
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
    #: this daemon or another), or a fleet-wide control holds restarts back (the breaker is
    #: open, the host's group is at its limit): handed back, decided again once it comes
    #: back.
    BUSY = "busy"


class Reason(StrEnum):
    """Why a message was not restarted (or not yet), or why a claim ended without an outcome
    of its own: the code that metrics, the ledger and the status page use. The text a user
    reads is rendered from it, with the facts of the case (:attr:`Decision.detail`)."""

    # Skips: mandrill_messages_skipped_total{reason}.
    INTERVAL = "interval"
    EXCLUDED = "excluded"
    NOT_ALLOWED = "not_allowed"
    OUTSIDE_DAYS = "outside_days"
    OUTSIDE_HOURS = "outside_hours"
    BLACKOUT_DATE = "blackout_date"
    RATE_LIMIT = "rate_limit"
    # Duplicates: a redelivery of a message already decided.
    ALREADY_DECIDED = "already_decided"
    UNKNOWN_COUNTED = "unknown_counted"
    # Waits: handed back, decided later.
    MESSAGE_UNDER_WAY = "message_under_way"
    HOST_UNDER_WAY = "host_under_way"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    #: The fleet's restart-storm breaker is open: no restart until ``mandrill resume``.
    BREAKER_OPEN = "breaker_open"
    #: The message's group has as many restarts under way as it may have at once.
    GROUP_LIMIT = "group_limit"
    # Dead letters: mandrill_messages_dead_lettered_total{reason}.
    INVALID = "invalid"
    MAX_ATTEMPTS = "max_attempts"
    # Claims that ended without an outcome of their own.
    DAEMON_LOST = "daemon_lost"  # unknown: its daemon stopped heartbeating mid-restart
    INTERRUPTED = "interrupted"  # unknown: its daemon cancelled it after it began
    NOT_STARTED = "not_started"  # cancelled: claimed, but its restart never began
    #: Cancelled: a blocker said no (or could not tell) just before it began; deferred.
    BLOCKED = "blocked"


#: The reasons of skips, and of dead letters: the labels their counters always show.
SKIP_REASONS = (
    Reason.INTERVAL, Reason.EXCLUDED, Reason.NOT_ALLOWED, Reason.OUTSIDE_DAYS,
    Reason.OUTSIDE_HOURS, Reason.BLACKOUT_DATE, Reason.RATE_LIMIT,
)
DEAD_LETTER_REASONS = (Reason.INVALID, Reason.MAX_ATTEMPTS)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A safety control's no: its code and the sentence that explains it."""

    reason: Reason
    detail: str


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
class BreakerRule:
    """When the fleet's restart-storm breaker opens: more than ``failures`` restarts failed,
    or more than ``unknown`` ended ``unknown``, within the last ``window`` seconds, across
    every daemon (``None``: that outcome does not count)."""

    failures: int | None
    unknown: int | None
    window: float


def breaker_trips(rule: BreakerRule, failed: int, unknown: int) -> str | None:
    """Why the breaker opens, given the restarts that ``failed`` and ended ``unknown``
    within ``rule.window``; ``None`` while they are within its limits."""
    window = format_duration(rule.window)
    if rule.failures is not None and failed > rule.failures:
        return f"{_restarts(failed)} failed in the last {window} (limit {rule.failures})"
    if rule.unknown is not None and unknown > rule.unknown:
        return (
            f"{_restarts(unknown)} ended with an unknown outcome in the last {window}"
            f" (limit {rule.unknown})"
        )
    return None


def _restarts(count: int) -> str:
    return f"{count} restart" + ("" if count == 1 else "s")


@dataclass(frozen=True, slots=True)
class Rules:
    """What a claim is decided by: the interval rule, the fleet's rate limit, whether a
    restart of unknown outcome counts (the default) or is retried, when the fleet's
    restart-storm breaker opens (never without a ``breaker``), and how many restarts each
    group of hosts may have under way at once (``groups``)."""

    min_interval: float
    rate_limit: RateLimit | None = None
    retry_unknown: bool = False
    breaker: BreakerRule | None = None
    groups: GroupLimit | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """A :class:`Verdict`, its :class:`Reason` (``None`` for a restart) and the sentence a
    user reads in the history (rendered from the reason and the facts of the case)."""

    verdict: Verdict
    reason: Reason | None = None
    detail: str = ""
    #: Earlier failed restarts of this message (for the poison-message limit).
    failures: int = 0


def decide_restart(prior: Prior, now: float, rules: Rules) -> Decision:
    """Restart, skip, wait (busy), or recognise a duplicate.

    Only a restart that succeeded, or whose outcome is unknown, counts for the interval
    rule: a message for a host whose restart is under way waits for its outcome (``BUSY``).
    With ``rules.retry_unknown``, an unknown outcome counts as a failed attempt instead.
    """
    failures = 0
    for outcome, _decided_at in prior.message_decisions:
        if outcome in FINAL_OUTCOMES:
            return Decision(Verdict.DUPLICATE, Reason.ALREADY_DECIDED,
                            f"already {outcome.value}", failures)
        if outcome is Outcome.UNKNOWN:
            if not rules.retry_unknown:
                return Decision(Verdict.DUPLICATE, Reason.UNKNOWN_COUNTED, UNKNOWN_DETAIL,
                                failures)
            failures += 1
        if outcome is Outcome.RESTARTING:
            return Decision(Verdict.BUSY, Reason.MESSAGE_UNDER_WAY,
                            "a restart for this message is under way", failures)
        if outcome is Outcome.FAILED:
            failures += 1
    if prior.host_busy_with is not None:
        detail = f"host is being restarted (message {prior.host_busy_with}); waiting for it"
        return Decision(Verdict.BUSY, Reason.HOST_UNDER_WAY, detail, failures)
    last = prior.host_last_restart
    if last is not None and now - last < rules.min_interval:
        detail = f"host restarted {format_duration(now - last)} ago"
        return Decision(Verdict.SKIP, Reason.INTERVAL, detail, failures)
    rate_limit = rules.rate_limit
    if rate_limit is not None and prior.fleet_restarts >= rate_limit.restarts:
        detail = (
            f"fleet rate limit: {prior.fleet_restarts} restarts in the last"
            f" {format_duration(rate_limit.window)} (limit {rate_limit.restarts})"
        )
        return Decision(Verdict.SKIP, Reason.RATE_LIMIT, detail, failures)
    return Decision(Verdict.RESTART, None, "", failures)


#: Why a message whose restart has an unknown outcome is settled without another restart.
UNKNOWN_DETAIL = "restart outcome unknown (its daemon stopped mid-restart); counted as done"
#: The detail of a claim that ended without an outcome of its own (``{why}`` says how):
#: cancelled, its restart never began; unknown, it began and its end was not seen.
NOT_STARTED_DETAIL = (
    "claimed, but the restart never began ({why}); not counted, the message is redelivered"
)
#: The detail of a claim a blocker held back (``{block}``: which blocker, and why).
BLOCKED_DETAIL = "blocked by {block}; not started, the message comes back later"
INTERRUPTED_DETAIL = (
    "interrupted after it began ({why}); the restart may or may not have happened"
)


#: A deferred delivery (its host busy, the ledger down) comes back after this long for its
#: first ``STEADY_DEFERRALS`` deliveries (a claim stranded by a dead daemon is resolved
#: within seconds of its owner's timeout), then twice as late at each delivery, up to the
#: longest lease Pub/Sub grants: a restart that takes long must not use up a subscription's
#: dead-letter policy (10 deliveries by default: 11 minutes this way, where 10 s gave 100 s).
DEFER_SECONDS = 10
STEADY_DEFERRALS = 4
MAX_DEFER_SECONDS = MAX_ACK_DEADLINE_SECONDS


def defer_seconds(delivery_attempt: int | None, first: float = DEFER_SECONDS) -> float:
    """How long a delivery handed back for later stays away (``first`` for its first few
    deliveries); ``delivery_attempt`` is ``None`` where the source does not count
    deliveries (then the first delay)."""
    doublings = min(max((delivery_attempt or 1) - STEADY_DEFERRALS, 0), 16)
    return min(MAX_DEFER_SECONDS, first * (1 << doublings))


class Settlement(StrEnum):
    """What becomes of a delivery once its work is over."""

    ACK = "ack"
    NACK = "nack"
    #: Hand back, but only after a pause: another worker is on it, retrying at once spins.
    DEFER = "defer"
    DEAD_LETTER = "dead_letter"


def settlement_for(decision: Decision) -> Settlement:
    """How a message the ledger did not give a restart is settled: a skip or a duplicate is
    done (acked); a message whose restart is under way waits for its outcome, one held back
    by a fleet-wide control waits for it to let go (both deferred)."""
    return Settlement.DEFER if decision.verdict is Verdict.BUSY else Settlement.ACK


def settlement_after(outcome: Outcome, failures: int, max_attempts: int, *,
                     retry_unknown: bool = False, reason: Reason | None = None) -> Settlement:
    """How a message whose claimed restart ended with ``outcome`` (for ``reason``) is
    settled.

    ``failures`` counts this message's earlier failed restarts. A failed restart is
    redelivered, or dead-lettered once it failed ``max_attempts`` times; a restart that was
    interrupted after it began (``UNKNOWN``) counts as done unless ``retry_unknown``; one
    that never began (``CANCELLED``) is redelivered: after a pause if a blocker held it
    back (``BLOCKED``: asking again at once would only be told no again), else at once.
    """
    if outcome is Outcome.FAILED:
        return Settlement.DEAD_LETTER if failures + 1 >= max_attempts else Settlement.NACK
    if outcome is Outcome.CANCELLED and reason is Reason.BLOCKED:
        return Settlement.DEFER
    if outcome is Outcome.CANCELLED or (outcome is Outcome.UNKNOWN and retry_unknown):
        return Settlement.NACK
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
