"""The ledger's queries, shared by SQLite and PostgreSQL: one DB-API cursor in, plain data
out (the schema and its migrations: :mod:`mandrill.ledger.schema`).

Every function here runs inside a worker thread, inside a transaction the caller owns.
Queries are written with ``?`` placeholders; :class:`Dialect` adapts them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from mandrill.ledger.base import Claim
from mandrill.ledger.schema import Cursor, Dialect
from mandrill.message import Delivery, Message
from mandrill.policy import (
    Decision,
    Outcome,
    Prior,
    RateLimit,
    Verdict,
    decide_restart,
    format_duration,
)

# -- messages ------------------------------------------------------------------------------


def save(cur: Cursor, d: Dialect, subscription: str, message: Message, now: float) -> None:
    cur.execute(
        d.sql(
            "INSERT INTO messages (subscription, message_id, instance_name, hostname, data,"
            " attributes, publish_time, first_seen, status)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'received') ON CONFLICT (subscription, message_id)"
            " DO UPDATE SET deliveries = messages.deliveries + 1"
        ),
        (
            subscription,
            message.message_id,
            message.instance_name,
            message.hostname,
            message.data,
            _attributes_json(message.attributes),
            message.publish_time.timestamp(),
            now,
        ),
    )


def _attributes_json(attributes: Mapping[str, str]) -> str:
    # Most messages have none: spare the encoder.
    return json.dumps(dict(attributes)) if attributes else "{}"


def dead_letter(
    cur: Cursor, d: Dialect, subscription: str, delivery: Delivery, now: float, reason: str
) -> None:
    cur.execute(
        d.sql(
            "INSERT INTO messages (subscription, message_id, data, attributes, publish_time,"
            " first_seen, status, reason) VALUES (?, ?, ?, ?, ?, ?, 'dead_letter', ?)"
            " ON CONFLICT (subscription, message_id) DO UPDATE SET status = 'dead_letter',"
            " reason = excluded.reason, deliveries = messages.deliveries + 1"
        ),
        (
            subscription,
            delivery.message_id,
            delivery.data,
            _attributes_json(delivery.attributes),
            delivery.publish_time.timestamp(),
            now,
            reason,
        ),
    )


# -- daemon instances ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    """The daemon a ledger writes for: restart claims name it as their owner, and its
    heartbeat (``last_seen``) proves they are still being worked on."""

    instance_id: str
    host: str
    pid: int
    started: float


def heartbeat(cur: Cursor, d: Dialect, instance: Instance, now: float) -> None:
    """Say that ``instance`` is alive at ``now`` (registering it the first time)."""
    cur.execute(
        d.sql(
            "INSERT INTO instances (instance_id, host, pid, started, last_seen)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (instance_id)"
            " DO UPDATE SET last_seen = excluded.last_seen, stopped_at = NULL"
        ),
        (instance.instance_id, instance.host, instance.pid, instance.started, now),
    )


def stopped(cur: Cursor, d: Dialect, instance: Instance, now: float) -> None:
    """``instance`` has stopped: a claim it left (an outcome it could not record) needs
    not wait for its heartbeat to age."""
    cur.execute(
        d.sql("UPDATE instances SET stopped_at = ?, last_seen = ? WHERE instance_id = ?"),
        (now, now, instance.instance_id),
    )


def forget_instances(cur: Cursor, d: Dialect, before: float) -> None:
    """Drop instances not seen since ``before`` that own no claim under way."""
    cur.execute(
        d.sql(
            "DELETE FROM instances WHERE last_seen < ? AND instance_id NOT IN"
            " (SELECT owner FROM restarts WHERE outcome = ? AND owner IS NOT NULL)"
        ),
        (before, Outcome.RESTARTING),
    )


# -- decisions -----------------------------------------------------------------------------


#: The lock name that serialises rate-limited decisions across the fleet. It sorts before
#: every ``host:`` and ``message:`` key, so batches always take it first (no deadlock).
FLEET_LOCK = "*fleet*"


@dataclass(frozen=True, slots=True)
class Owner:
    """Who claims a restart, and which claims count as orphaned: those whose owner has not
    heartbeated since ``alive_since`` (on the ledger's clock), or has stopped."""

    instance_id: str
    subscription: str
    alive_since: float


def claim(
    cur: Cursor,
    d: Dialect,
    owner: Owner,
    message: Message,
    now: float,
    min_interval: float,
    rate_limit: RateLimit | None = None,
    *,
    retry_unknown: bool = False,
) -> Claim:
    """Decide whether ``message`` restarts its host, inside the caller's transaction, with
    :func:`mandrill.policy.decide_restart` over what the ledger knows (this message's
    decisions, the host's last counted restart and claims under way, the fleet's count), and
    record a ``restarting`` claim owned by ``owner`` when it does.

    Holds the host's lock (and the fleet's, with a ``rate_limit``) until the transaction
    ends, so that daemons decide on one host one at a time. Resolves the host's orphaned
    claims (their owner stopped heartbeating) as ``unknown`` first; they count as restarts
    unless ``retry_unknown``.
    """
    if rate_limit is not None:
        d.lock_host(cur, FLEET_LOCK)
    d.lock_host(cur, message.hostname)
    counted = (Outcome.RESTARTED,) if retry_unknown else (Outcome.RESTARTED, Outcome.UNKNOWN)
    # One round trip: this message's decisions and the host's claims under way (with their
    # owner's heartbeat), then one row (id NULL) with the host's last counted restart.
    cur.execute(
        d.sql(
            "SELECT r.id, r.subscription, r.message_id, r.outcome, r.decided_at, r.owner,"
            " i.last_seen, i.stopped_at FROM restarts r"
            " LEFT JOIN instances i ON i.instance_id = r.owner"
            " WHERE (r.message_id = ? AND r.subscription IN (?, ''))"
            # The outcome as a literal, not a parameter: SQLite can use the partial index
            # restarts_under_way only for a literal, and re-prepares the statement on every
            # execution for a parameter (measured: 32 -> 6.5 us a claim).
            f" OR (r.hostname = ? AND r.outcome = '{Outcome.RESTARTING.value}')"
            " UNION ALL SELECT NULL, NULL, NULL, NULL, MAX(decided_at), NULL, NULL, NULL"
            f" FROM restarts WHERE hostname = ? AND outcome IN ({', '.join('?' * len(counted))})"
        ),
        (
            message.message_id,
            owner.subscription,
            message.hostname,
            message.hostname,
            *counted,
        ),
    )
    last: float | None = None
    decisions: list[tuple[Outcome, float]] = []
    busy_with: str | None = None
    for row in cur.fetchall():
        row_id, subscription, message_id, outcome, decided_at, claimant, last_seen, stopped_at = row
        if row_id is None:
            last = decided_at
            continue
        outcome = Outcome(outcome)
        if outcome is Outcome.RESTARTING and _orphaned(
            owner, claimant, decided_at, last_seen, stopped_at
        ):
            resolve_orphan(cur, d, int(row_id), claimant, last_seen, now)
            outcome = Outcome.UNKNOWN
            if not retry_unknown:
                last = decided_at if last is None else max(last, decided_at)
        if message_id == message.message_id and subscription in (owner.subscription, ""):
            decisions.append((outcome, decided_at))
        elif outcome is Outcome.RESTARTING:
            busy_with = message_id
    decisions.sort(key=lambda decision: decision[1])
    fleet = 0
    if rate_limit is not None:
        cur.execute(
            d.sql("SELECT COUNT(*) FROM restarts WHERE decided_at > ? AND outcome IN (?, ?, ?)"),
            (now - rate_limit.window, Outcome.RESTARTED, Outcome.RESTARTING, Outcome.UNKNOWN),
        )
        (fleet,) = cur.fetchone()
    prior = Prior(decisions, last, int(fleet), busy_with)
    decision = decide_restart(prior, now, min_interval, rate_limit, retry_unknown=retry_unknown)
    if decision.verdict is Verdict.RESTART:
        row_id = insert(cur, d, owner.subscription, message, now, Outcome.RESTARTING, "",
                        owner=owner.instance_id)
        return Claim(decision, row_id)
    if decision.verdict is Verdict.SKIP:
        insert(cur, d, owner.subscription, message, now, Outcome.SKIPPED, decision.reason,
               finished=True)
    return Claim(decision, None)


def _orphaned(
    owner: Owner,
    claimant: str | None,
    decided_at: float,
    last_seen: float | None,
    stopped_at: float | None,
) -> bool:
    if claimant is None:
        # A claim from before instances existed: only its age can tell.
        return bool(decided_at < owner.alive_since)
    if claimant == owner.instance_id:
        return False  # this daemon's own, alive however late its last heartbeat
    return last_seen is None or stopped_at is not None or last_seen < owner.alive_since


def resolve_orphans(cur: Cursor, d: Dialect, owner: Owner, now: float) -> int:
    """Resolve every orphaned claim of the ledger as unknown (a heartbeat's sweep), so that
    the record is right even if no message for its host comes again; returns how many.

    A host being decided by another transaction right now is left to that claim, which
    resolves it itself: the sweep only takes host locks that are free, so it never waits
    for one and can never be part of a deadlock.
    """
    cur.execute(
        d.sql(
            "SELECT r.id, r.hostname, r.decided_at, r.owner, i.last_seen, i.stopped_at"
            " FROM restarts r LEFT JOIN instances i ON i.instance_id = r.owner"
            " WHERE r.outcome = ?"
        ),
        (Outcome.RESTARTING,),
    )
    resolved = 0
    for row_id, hostname, decided_at, claimant, last_seen, stopped_at in cur.fetchall():
        if _orphaned(owner, claimant, decided_at, last_seen, stopped_at) and d.try_lock_host(
            cur, hostname
        ):
            resolve_orphan(cur, d, int(row_id), claimant, last_seen, now)
            resolved += 1
    return resolved


def resolve_orphan(
    cur: Cursor, d: Dialect, row_id: int, claimant: str | None, last_seen: float | None,
    now: float,
) -> None:
    """Record that nobody knows how the restart of an orphaned claim ended."""
    if claimant is None:
        whose = "a daemon from before instance heartbeats"
    elif last_seen is None:
        whose = f"daemon {claimant} (never seen)"
    else:
        whose = f"daemon {claimant} (last seen {format_duration(max(0.0, now - last_seen))} ago)"
    detail = f"{whose} stopped mid-restart; the restart may or may not have happened"
    cur.execute(
        d.sql(
            "UPDATE restarts SET outcome = ?, finished_at = ?, detail = ?"
            " WHERE id = ? AND outcome = ?"
        ),
        (Outcome.UNKNOWN, now, detail, row_id, Outcome.RESTARTING),
    )


def insert(
    cur: Cursor,
    d: Dialect,
    subscription: str,
    message: Message,
    now: float,
    outcome: Outcome,
    detail: str,
    *,
    finished: bool = False,
    owner: str | None = None,
) -> int:
    cur.execute(
        d.sql(
            "INSERT INTO restarts (subscription, message_id, hostname, decided_at, finished_at,"
            " outcome, detail, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            + ("" if d.has_lastrowid else " RETURNING id")
        ),
        (
            subscription,
            message.message_id,
            message.hostname,
            now,
            now if finished else None,
            outcome,
            detail,
            owner,
        ),
    )
    if d.has_lastrowid:
        return int(cast(Any, cur).lastrowid)  # SQLite's cursor: not in the protocol
    (row_id,) = cur.fetchone()
    return int(row_id)


def finish(
    cur: Cursor, d: Dialect, restart_id: int, now: float, outcome: Outcome, detail: str
) -> None:
    cur.execute(
        # A live claim, or one another daemon resolved as unknown while this one could not
        # heartbeat (a ledger outage, a pause): the real outcome replaces the guess. Never
        # a final one: a journaled outcome may be replayed twice (see ledger.journal).
        d.sql(
            "UPDATE restarts SET finished_at = ?, outcome = ?, detail = ?"
            " WHERE id = ? AND outcome IN (?, ?)"
        ),
        (now, outcome, detail, restart_id, Outcome.RESTARTING, Outcome.UNKNOWN),
    )


__all__ = ["Cursor", "Decision", "Dialect", "Instance", "Owner"]
