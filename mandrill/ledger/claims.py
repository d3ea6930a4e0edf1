"""Restart decisions in the ledger, shared by SQLite and PostgreSQL: the claims of one
transaction decided together (:func:`claim_many`), the claims of daemons that stopped
resolved as ``unknown`` (:func:`resolve_orphans`), and a daemon's own claims that no task of
it holds any more (:func:`reconcile_own`). Like :mod:`mandrill.ledger.sql`, every function
runs inside a transaction the caller owns (in a worker thread, or inline on the loop's).

Every time here is the ledger's (see :attr:`Dialect.server_clock
<mandrill.ledger.schema.Dialect.server_clock>`): decisions, heartbeats and the comparisons
between daemons all read one clock.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from mandrill.ledger import groups
from mandrill.ledger.breaker import Breaker
from mandrill.ledger.schema import Cursor, Dialect
from mandrill.ledger.sql import RESTARTING, UNKNOWN, insert_claims, insert_many, restart_row
from mandrill.message import Message
from mandrill.policy import (
    INTERRUPTED_DETAIL,
    NOT_STARTED_DETAIL,
    Decision,
    Outcome,
    Prior,
    Reason,
    Rules,
    Verdict,
    decide_restart,
    format_duration,
)

#: The lock name that serialises rate-limited decisions (and the breaker's) across the
#: fleet. It sorts before every ``host:`` and ``message:`` key, so batches always take it
#: first (no deadlock).
FLEET_LOCK = "*fleet*"


@dataclass(frozen=True, slots=True)
class Owner:
    """Who claims a restart, and which claims count as orphaned: those whose owner has not
    heartbeated since ``alive_since`` (on the ledger's clock), or has stopped.

    ``may_judge`` is false while the owner itself has not been connected to the ledger
    lately (see :func:`may_judge`): an outage that cut off every daemon leaves them all
    equally silent, and the first one back must not take the others for dead."""

    instance_id: str
    subscription: str
    alive_since: float
    may_judge: bool = True


def may_judge(cur: Cursor, d: Dialect, instance_id: str, now: float, timeout: float) -> bool:
    """Whether this daemon may judge its peers' silence now: its own last heartbeat is no
    older than half the instance timeout (so that it was connected while they were silent,
    and a peer cut off with it has had heartbeats of its own to come back)."""
    cur.execute(d.sql("SELECT last_seen FROM instances WHERE instance_id = ?"), (instance_id,))
    row = cur.fetchone()
    return row is not None and row[0] is not None and row[0] >= now - timeout / 2


class _Row:
    """A restart row as the claims of one batch see it: read from the ledger, or inserted
    by one of them (``id`` None until it is). ``order`` is the ledger's order (the id's)."""

    __slots__ = ("decided_at", "generation", "hostname", "id", "last_seen", "message_id",
                 "order", "outcome", "owner", "stopped_at", "subscription")

    def __init__(
        self, order: int, row_id: int | None, subscription: str, message_id: str,
        hostname: str, outcome: Outcome, decided_at: float, owner: str | None,
        last_seen: float | None, stopped_at: float | None, generation: int,
    ) -> None:
        self.order = order
        self.id = row_id
        self.subscription = subscription
        self.message_id = message_id
        self.hostname = hostname
        self.outcome = outcome
        self.decided_at = decided_at
        self.owner = owner
        self.last_seen = last_seen
        self.stopped_at = stopped_at
        self.generation = generation


def _order(row: _Row) -> int:
    return row.order


def lock_hosts(cur: Cursor, d: Dialect, messages: Collection[Message], rules: Rules) -> None:
    """Take the locks :func:`claim_many` decides under, until the transaction ends: the
    fleet's first (with a rate limit or a breaker), then every group's (with a limit per
    group), then every host's, each in name order. First in the transaction, so that every
    daemon takes its locks in one order (see :mod:`mandrill.ledger.postgres`)."""
    keys = sorted({message.hostname for message in messages})
    if rules.groups is not None:
        keys[:0] = groups.lock_keys(rules.groups, messages)
    if rules.rate_limit is not None or rules.breaker is not None:
        keys.insert(0, FLEET_LOCK)
    d.lock_hosts(cur, keys)


def claim_many(
    cur: Cursor, d: Dialect, owner: Owner, now: float, rules: Rules,
    messages: list[tuple[Message, int]], *, breaker: Breaker | None = None,
) -> list[tuple[Decision, int | None]]:
    """Decide, for each of ``messages`` (each with the generation of its id, see
    :mod:`mandrill.ledger.generations`), whether it restarts its host, inside the caller's
    transaction, with :func:`mandrill.policy.decide_restart` over what the ledger knows (the
    message's decisions, the host's last counted restart and claims under way, the fleet's
    count), and record a ``restarting`` claim owned by ``owner`` when it does. Returns
    ``(decision, restart id)`` per message, in order (the id of the claim, else ``None``).

    The caller holds the hosts' locks (:func:`lock_hosts`), so that daemons decide on one
    host one at a time. Resolves a host's orphaned claims (their owner stopped heartbeating)
    as ``unknown`` first; they count as restarts unless ``rules.retry_unknown``.

    An open ``breaker`` (read under the fleet lock: :mod:`mandrill.ledger.breaker`) holds
    back every restart: the message is deferred (``BUSY``, ``BREAKER_OPEN``), no row written.
    With ``rules.groups``, so does a group with as many live claims as its limit
    (``GROUP_LIMIT``; :mod:`mandrill.ledger.groups`), and every row records its group.

    In a few statements however many messages there are: one read of what the ledger knows
    of all of their messages and hosts (and one of the fleet's recent restarts, with a rate
    limit), then the decisions, message by message in the order given, each seeing the
    effects of those before it as if they had been written (a claim under way, a skip, an
    orphan resolved), and last the writes: one ``executemany`` each for the orphans resolved
    (in id order: row locks in one global order), the skips and the claims inserted.
    """
    subscription, instance_id = owner.subscription, owner.instance_id
    rate_limit, retry_unknown = rules.rate_limit, rules.retry_unknown
    host_set = {message.hostname for message, _ in messages}
    hosts = sorted(host_set)
    message_ids = {message.message_id: None for message, _ in messages}
    listed_hosts = d.list_param(hosts)
    # One round trip: the messages' decisions and the hosts' claims under way (with their
    # owners' heartbeats), then rows (id NULL) with each host's last restart and unknown.
    cur.execute(
        d.sql(
            "SELECT r.id, r.subscription, r.message_id, r.hostname, r.outcome, r.decided_at,"
            " r.owner, i.last_seen, i.stopped_at, r.generation FROM restarts r"
            " LEFT JOIN instances i ON i.instance_id = r.owner"
            f" WHERE (r.message_id {d.in_list} AND r.subscription IN (?, ''))"
            # The outcome as a literal, not a parameter: SQLite can use the partial index
            # restarts_under_way only for a literal, and re-prepares the statement on every
            # execution for a parameter (measured: 32 -> 6.5 us a claim).
            f" OR (r.hostname {d.in_list} AND r.outcome = '{Outcome.RESTARTING.value}')"
            " UNION ALL SELECT NULL, NULL, NULL, hostname, outcome, MAX(decided_at), NULL, NULL,"
            f" NULL, NULL FROM restarts WHERE hostname {d.in_list} AND outcome IN (?, ?)"
            " GROUP BY hostname, outcome"
        ),
        (
            d.list_param(list(message_ids)),
            subscription,
            listed_hosts,
            listed_hosts,
            _RESTARTED_CODE,
            _UNKNOWN_CODE,
        ),
    )
    last_restarted: dict[str, float] = {}
    last_unknown: dict[str, float] = {}
    loaded: list[_Row] = []
    for row_id, row_subscription, message_id, hostname, outcome, decided_at, *rest in (
        cur.fetchall()
    ):
        if row_id is None:
            latest = last_restarted if outcome == Outcome.RESTARTED else last_unknown
            latest[hostname] = decided_at
        else:
            loaded.append(_Row(int(row_id), int(row_id), row_subscription, message_id,
                               hostname, Outcome(outcome), decided_at, *rest))
    loaded.sort(key=_order)
    by_message: dict[tuple[str, int], list[_Row]] = {}
    by_host: dict[str, list[_Row]] = {}
    for row in loaded:
        if row.message_id in message_ids and row.subscription in (subscription, ""):
            by_message.setdefault((row.message_id, row.generation), []).append(row)
        if row.hostname in host_set:
            by_host.setdefault(row.hostname, []).append(row)
    group_of = rules.groups.by.group_of if rules.groups is not None else None
    under_way_in: groups.UnderWay | None = None
    if rules.groups is not None and breaker is None:
        under_way_in = groups.UnderWay.read(
            cur, d, rules.groups, {rules.groups.by.group_of(m) for m, _ in messages},
            partial(_orphaned, owner),
        )
    fleet: list[float] = []
    if rate_limit is not None:
        cur.execute(
            d.sql("SELECT decided_at FROM restarts WHERE decided_at > ? AND outcome IN (?, ?, ?)"),
            (now - rate_limit.window, _RESTARTED_CODE, _RESTARTING_CODE, _UNKNOWN_CODE),
        )
        fleet = sorted(decided_at for (decided_at,) in cur.fetchall())
    #: Claims under way that this transaction adds (for the fleet's count).
    added = 0
    next_order = (loaded[-1].order if loaded else 0) + 1
    resolutions: list[tuple[Any, ...]] = []
    claimed: list[tuple[Any, ...]] = []
    claimed_by: list[int] = []  # per claim, the index of its message
    skips: list[tuple[Any, ...]] = []
    restarting, unknown = _RESTARTING, _UNKNOWN
    decisions_made: list[Decision] = []
    for message, generation in messages:
        message_id, hostname = message.message_id, message.hostname
        key = (message_id, generation)
        own = by_message.get(key)
        on_host = by_host.get(hostname)
        under_way = [row for row in on_host if row.outcome is restarting] if on_host else None
        if not under_way:
            rows = own or ()
        elif not own:
            rows = under_way
        else:
            rows = sorted({id(row): row for row in own + under_way}.values(), key=_order)
        last = last_restarted.get(hostname)
        if not retry_unknown:
            last = _latest(last, last_unknown.get(hostname))
        decisions: list[tuple[Outcome, float]] = []
        busy_with: str | None = None
        for row in rows:
            outcome = row.outcome
            if outcome is restarting and _orphaned(
                owner, row.owner, row.decided_at, row.last_seen, row.stopped_at
            ):
                resolutions.append(_resolution(row.id, row.owner, row.last_seen, now))
                row.outcome = outcome = unknown
                known = last_unknown.get(row.hostname, row.decided_at)
                last_unknown[row.hostname] = max(known, row.decided_at)
                if not retry_unknown:
                    last = _latest(last, row.decided_at)
            if (row.message_id == message_id and row.generation == generation
                    and row.subscription in (subscription, "")):
                decisions.append((outcome, row.decided_at))
            elif outcome is restarting:
                busy_with = row.message_id
        if not decisions and busy_with is None and last is None and rate_limit is None:
            # What decide_restart decides for a message and a host with no history: spares
            # building its Prior for the common case (a first message for its host).
            decision = _FIRST_RESTART
        else:
            if len(decisions) > 1:
                decisions.sort(key=_decided_at)
            fleet_count = 0
            if rate_limit is not None:
                fleet_count = len(fleet) - bisect.bisect_right(fleet, now - rate_limit.window)
                fleet_count += added
            prior = Prior(decisions, last, fleet_count, busy_with)
            decision = decide_restart(prior, now, rules)
        verdict = decision.verdict
        group = None if group_of is None else group_of(message)
        if verdict is _RESTART:
            if breaker is not None:
                decision = Decision(Verdict.BUSY, Reason.BREAKER_OPEN, breaker.held_detail(),
                                    decision.failures)
            elif under_way_in is not None:
                decision = under_way_in.hold(group or "", decision)
            verdict = decision.verdict
        decisions_made.append(decision)
        if verdict is _RESTART:
            new = _Row(next_order, None, subscription, message_id, hostname, restarting, now,
                       instance_id, None, None, generation)
            if on_host is None:
                by_host[hostname] = [new]
            else:
                on_host.append(new)
            added += 1
            claimed_by.append(len(decisions_made) - 1)
            claim = (subscription, message_id, hostname, now, instance_id, generation)
            claimed.append(claim if group_of is None else (*claim, group))
        elif verdict is _SKIP:
            new = _Row(next_order, None, subscription, message_id, hostname, _SKIPPED, now,
                       None, None, None, generation)
            skips.append(restart_row(subscription, message, now, _SKIPPED, decision.detail,
                                     finished=True, owner=None, reason=decision.reason,
                                     generation=generation, group=group))
        else:
            continue
        next_order += 1
        if own is None:
            by_message[key] = [new]
        else:
            own.append(new)
    if resolutions:
        cur.executemany(d.sql(_RESOLVE_ORPHAN), sorted(resolutions, key=_resolved_id))
    insert_many(cur, d, skips)
    row_ids: list[int | None] = [None] * len(messages)
    claim_ids = insert_claims(cur, d, claimed, grouped=group_of is not None)
    for index, row_id in zip(claimed_by, claim_ids, strict=True):
        row_ids[index] = row_id
    return list(zip(decisions_made, row_ids, strict=True))


# Enum members as module constants: a class attribute lookup of an enum member is slow
# (about 0.15 us in Python 3.11), and a batch's claims look them up often.
_RESTARTING, _UNKNOWN, _SKIPPED = Outcome.RESTARTING, Outcome.UNKNOWN, Outcome.SKIPPED
_RESTART, _SKIP = Verdict.RESTART, Verdict.SKIP
# What the statements bind: plain strings (see mandrill.ledger.sql.RESTARTING).
_RESTARTING_CODE, _UNKNOWN_CODE = RESTARTING, UNKNOWN
_RESTARTED_CODE = Outcome.RESTARTED.value
_FIRST_RESTART = Decision(Verdict.RESTART)


def _decided_at(decision: tuple[Outcome, float]) -> float:
    return decision[1]


def _resolved_id(resolution: Sequence[Any]) -> Any:
    return resolution[4]


def _latest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _orphaned(
    owner: Owner,
    claimant: str | None,
    decided_at: float,
    last_seen: float | None,
    stopped_at: float | None,
) -> bool:
    if claimant is None:
        # A claim from before instances existed: only its age can tell.
        return bool(decided_at < owner.alive_since) and owner.may_judge
    if claimant == owner.instance_id:
        return False  # this daemon's own, alive however late its last heartbeat
    if not owner.may_judge:
        return False  # cut off itself lately: in no place to call another silent
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
            " WHERE r.outcome = ? ORDER BY r.id"
        ),
        (_RESTARTING_CODE,),
    )
    resolved = 0
    for row_id, hostname, decided_at, claimant, last_seen, stopped_at in cur.fetchall():
        if _orphaned(owner, claimant, decided_at, last_seen, stopped_at) and d.try_lock_host(
            cur, hostname
        ):
            cur.execute(d.sql(_RESOLVE_ORPHAN),
                        _resolution(int(row_id), claimant, last_seen, now))
            resolved += 1
    return resolved


_RESOLVE_ORPHAN = (
    "UPDATE restarts SET outcome = ?, finished_at = ?, detail = ?, reason = ?"
    " WHERE id = ? AND outcome = ?"
)


def _resolution(
    row_id: int | None, claimant: str | None, last_seen: float | None, now: float
) -> tuple[Any, ...]:
    if claimant is None:
        whose = "a daemon from before instance heartbeats"
    elif last_seen is None:
        whose = f"daemon {claimant} (never seen)"
    else:
        whose = f"daemon {claimant} (last seen {format_duration(max(0.0, now - last_seen))} ago)"
    detail = f"{whose} stopped mid-restart; the restart may or may not have happened"
    return (_UNKNOWN_CODE, now, detail, Reason.DAEMON_LOST.value, row_id, _RESTARTING_CODE)


def reconcile_own(
    cur: Cursor,
    d: Dialect,
    instance_id: str,
    now: float,
    *,
    held: Collection[str] = (),
    began: Collection[str] = (),
    why: str,
) -> tuple[int, int]:
    """Resolve this daemon's own ``restarting`` claims that no task of it holds: those of
    messages in ``held`` are left alone, those in ``began`` become ``unknown`` (the restart
    began: it may have happened), every other one ``cancelled`` (never began: not counted).

    A daemon's sweep passes what it holds (``held``), to find claims nothing owns: a
    decision whose COMMIT answer was lost, or that was cancelled mid-commit. A daemon that
    stops passes what began (``began``), so that its peers need not guess. ``why`` goes into
    the detail. Returns ``(cancelled, unknown)``.
    """
    cur.execute(
        d.sql(
            "SELECT id, message_id FROM restarts WHERE owner = ?"
            f" AND outcome = '{Outcome.RESTARTING.value}' ORDER BY id"
        ),
        (instance_id,),
    )
    cancelled: list[tuple[Any, ...]] = []
    unknown: list[tuple[Any, ...]] = []
    for row_id, message_id in cur.fetchall():
        if message_id in held:
            continue
        if message_id in began:
            unknown.append((_UNKNOWN_CODE, now, INTERRUPTED_DETAIL.format(why=why),
                            Reason.INTERRUPTED.value, row_id, _RESTARTING_CODE))
        else:
            cancelled.append((Outcome.CANCELLED.value, now, NOT_STARTED_DETAIL.format(why=why),
                              Reason.NOT_STARTED.value, row_id, _RESTARTING_CODE))
    rows = sorted(cancelled + unknown, key=_resolved_id)
    if rows:
        cur.executemany(d.sql(_RESOLVE_ORPHAN), rows)
    return len(cancelled), len(unknown)


__all__ = [
    "FLEET_LOCK", "Owner", "claim_many", "lock_hosts", "may_judge", "reconcile_own",
    "resolve_orphans",
]
