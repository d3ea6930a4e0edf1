"""What the ledger says of the fleet, for the status page and ``explain``: read-only queries
shared by SQLite and PostgreSQL, one cursor in, plain data out.

They run through :meth:`SQLLedger.read <mandrill.ledger.sqlledger.SQLLedger.read>`, on a
connection of their own, in one read-only transaction (one snapshot for every query of a
page), never on the message path's. ``now`` is the ledger's time (the server's clock on
PostgreSQL), as in the decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from mandrill.ledger import claims, groups
from mandrill.ledger.schema import Cursor, Dialect
from mandrill.policy import Outcome, RateLimit, Rules

#: Rows of each list a page shows at most.
DECISIONS = 25
DEAD_LETTERS = 10
COOLDOWN = 100
DAEMONS = 50


@dataclass(frozen=True, slots=True)
class DaemonRow:
    """A daemon of the fleet as its heartbeats recorded it."""

    instance_id: str
    host: str
    pid: int
    backend: str
    version: str
    started: float
    last_seen: float
    stopped_at: float | None

    def state(self, now: float, instance_timeout: float) -> str:
        """``running``, ``silent`` (no heartbeat for ``instance_timeout``: its claims are
        resolved by the others) or ``stopped``."""
        if self.stopped_at is not None:
            return "stopped"
        return "silent" if self.last_seen < now - instance_timeout else "running"


@dataclass(frozen=True, slots=True)
class UnderWayRow:
    """A restart claimed and not finished: who holds it, since when."""

    restart_id: int
    hostname: str
    message_id: str
    since: float
    owner: str | None
    owner_last_seen: float | None
    owner_stopped_at: float | None

    def orphaned(self, now: float, instance_timeout: float) -> bool:
        """Whether its owner is gone (the claim path's own test): the next claim on the
        host, or any daemon's sweep, resolves it as ``unknown``."""
        return orphaned_at(now, instance_timeout)(
            self.owner, self.since, self.owner_last_seen, self.owner_stopped_at
        )


def orphaned_at(now: float, instance_timeout: float) -> groups.Orphaned:
    """The claim path's test of a claim whose owner is gone, as a reader judges it at
    ``now`` (no daemon of its own: every owner is someone else's)."""
    return partial(claims._orphaned, claims.Owner("", "", now - instance_timeout))


@dataclass(frozen=True, slots=True)
class CooldownRow:
    """A host restarted within the interval: eligible again at ``last_restart`` plus the
    interval."""

    hostname: str
    last_restart: float


@dataclass(frozen=True, slots=True)
class DecisionRow:
    restart_id: int
    decided_at: float
    finished_at: float | None
    hostname: str
    message_id: str
    outcome: str
    #: A :class:`~mandrill.policy.Reason` code, or ``""`` (a restart, an old row).
    reason: str
    detail: str
    owner: str | None


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    message_id: str
    first_seen: float
    hostname: str | None
    detail: str
    deliveries: int


@dataclass(frozen=True, slots=True)
class FleetRestarts:
    """The restarts the fleet's rate limit counts now, and when the oldest leaves its
    window."""

    count: int
    oldest: float | None


@dataclass(frozen=True, slots=True)
class FleetView:
    """Everything the status page shows from the ledger, read in one snapshot; the parts
    that scan the tables (hosts in cooldown, dead letters, the rate limit's count: the
    schema has no index on time) may be those of an earlier read, of ``scanned_at``."""

    now: float
    daemons: list[DaemonRow]
    under_way: list[UnderWayRow]
    decisions: list[DecisionRow]
    cooldown: list[CooldownRow]
    #: Hosts in cooldown, ``cooldown`` holding the :data:`COOLDOWN` latest.
    cooldown_total: int
    dead_letters: list[DeadLetterRow]
    fleet_restarts: FleetRestarts | None = None
    scanned_at: float = 0.0


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the ledger knows that decides a new message for one host."""

    hostname: str
    #: When the host's last restart that counts began (see :class:`~mandrill.policy.Prior`),
    #: claims whose owner is gone included, as the next claim would resolve them.
    last_restart: float | None
    under_way: list[UnderWayRow] = field(default_factory=list)
    fleet_restarts: FleetRestarts | None = None
    #: With a limit per group: the host's group (as ``group`` named it) and its live claims.
    group: str | None = None
    group_under_way: int = 0


def counted_outcomes(rules: Rules) -> tuple[Outcome, ...]:
    """The outcomes that count for the interval rule: an unknown one too, unless retried."""
    return (Outcome.RESTARTED,) if rules.retry_unknown else (Outcome.RESTARTED, Outcome.UNKNOWN)


def fleet_view(
    cur: Cursor, d: Dialect, now: float, rules: Rules, *, earlier: FleetView | None = None,
    decisions: int = DECISIONS, dead_letters: int = DEAD_LETTERS, cooldown: int = COOLDOWN,
) -> FleetView:
    """The fleet now; with ``earlier``, the parts that scan the tables are taken from it
    rather than read again (their cost grows with the ledger, the others' does not)."""
    daemon_rows = daemons(cur, d)
    claims_rows = under_way(cur, d)
    recent = recent_decisions(cur, d, decisions)
    if earlier is not None:
        return FleetView(now, daemon_rows, claims_rows, recent, earlier.cooldown,
                         earlier.cooldown_total, earlier.dead_letters, earlier.fleet_restarts,
                         earlier.scanned_at)
    latest, total = cooldowns(cur, d, now - rules.min_interval, rules, cooldown)
    return FleetView(now, daemon_rows, claims_rows, recent, latest, total,
                     recent_dead_letters(cur, d, dead_letters),
                     fleet_restarts(cur, d, now, rules.rate_limit), now)


def daemons(cur: Cursor, d: Dialect, limit: int = DAEMONS) -> list[DaemonRow]:
    """The daemons heard from, latest first (a stopped one is kept for a week)."""
    cur.execute(
        d.sql(
            "SELECT instance_id, host, pid, backend, version, started, last_seen, stopped_at"
            " FROM instances ORDER BY last_seen DESC, instance_id LIMIT ?"
        ),
        (limit,),
    )
    return [DaemonRow(*row) for row in cur.fetchall()]


def under_way(cur: Cursor, d: Dialect, hostname: str | None = None) -> list[UnderWayRow]:
    """Restarts claimed and not finished (of one host), oldest first, with their owners'
    heartbeats."""
    host_clause, params = ("", ()) if hostname is None else (" AND hostname = ?", (hostname,))
    # The outcome as a literal and no join nor ORDER BY: SQLite then reads the partial index
    # restarts_under_way alone (a join or a sort makes it scan the table).
    cur.execute(
        d.sql(
            "SELECT id, hostname, message_id, decided_at, owner FROM restarts"
            f" WHERE outcome = '{Outcome.RESTARTING.value}'{host_clause}"
        ),
        params,
    )
    claimed = sorted(cur.fetchall())
    owners = sorted({owner for *_, owner in claimed if owner is not None})
    seen: dict[str, tuple[float, float | None]] = {}
    if owners:
        cur.execute(
            d.sql("SELECT instance_id, last_seen, stopped_at FROM instances"
                  f" WHERE instance_id {d.in_list}"),
            (d.list_param(owners),),
        )
        seen = {instance: (last, stopped) for instance, last, stopped in cur.fetchall()}
    return [
        UnderWayRow(int(row_id), host, message_id, since, owner,
                    *seen.get(owner or "", (None, None)))
        for row_id, host, message_id, since, owner in claimed
    ]


def cooldowns(
    cur: Cursor, d: Dialect, since: float, rules: Rules, limit: int = COOLDOWN
) -> tuple[list[CooldownRow], int]:
    """The ``limit`` hosts whose last counted restart began latest after ``since``, and
    how many hosts that is in all."""
    outcomes = counted_outcomes(rules)
    among = f"outcome IN ({', '.join('?' * len(outcomes))})"
    cur.execute(
        d.sql(
            f"SELECT hostname, MAX(decided_at) FROM restarts WHERE decided_at > ? AND {among}"
            " GROUP BY hostname ORDER BY 2 DESC, 1 LIMIT ?"
        ),
        (since, *outcomes, limit),
    )
    latest = [CooldownRow(host, last) for host, last in cur.fetchall()]
    if len(latest) < limit:
        return latest, len(latest)
    cur.execute(
        d.sql(f"SELECT COUNT(DISTINCT hostname) FROM restarts WHERE decided_at > ? AND {among}"),
        (since, *outcomes),
    )
    return latest, int(cur.fetchone()[0])


def recent_decisions(cur: Cursor, d: Dialect, limit: int = DECISIONS) -> list[DecisionRow]:
    """The latest decisions, in the order the ledger recorded them (newest first)."""
    cur.execute(
        d.sql(
            "SELECT id, decided_at, finished_at, hostname, message_id, outcome, reason, detail,"
            " owner FROM restarts ORDER BY id DESC LIMIT ?"
        ),
        (limit,),
    )
    return [DecisionRow(int(row[0]), *row[1:]) for row in cur.fetchall()]


def recent_dead_letters(cur: Cursor, d: Dialect, limit: int = DEAD_LETTERS) -> list[DeadLetterRow]:
    cur.execute(
        d.sql(
            "SELECT message_id, first_seen, hostname, reason, deliveries FROM messages"
            " WHERE status = 'dead_letter' ORDER BY first_seen DESC, message_id LIMIT ?"
        ),
        (limit,),
    )
    return [DeadLetterRow(mid, seen, host, detail, int(n))
            for mid, seen, host, detail, n in cur.fetchall()]


def fleet_restarts(
    cur: Cursor, d: Dialect, now: float, rate_limit: RateLimit | None
) -> FleetRestarts | None:
    """What the fleet's rate limit counts now (the claim path's count: restarts begun in
    the window, under way and of unknown outcome included); ``None`` without a limit."""
    if rate_limit is None:
        return None
    cur.execute(
        d.sql(
            "SELECT COUNT(*), MIN(decided_at) FROM restarts WHERE decided_at > ?"
            " AND outcome IN (?, ?, ?)"
        ),
        (now - rate_limit.window, Outcome.RESTARTED, Outcome.RESTARTING, Outcome.UNKNOWN),
    )
    count, oldest = cur.fetchone()
    return FleetRestarts(int(count), oldest)


def host_facts(cur: Cursor, d: Dialect, now: float, hostname: str, rules: Rules,
               instance_timeout: float, *, group: str | None = None) -> HostFacts:
    """What a claim on ``hostname`` would find now (see :func:`claims.claim_many
    <mandrill.ledger.claims.claim_many>`): its last counted restart, its claims under way,
    the fleet's count under a rate limit, and with ``rules.groups`` the live claims of
    ``group`` (the host's)."""
    outcomes = counted_outcomes(rules)
    cur.execute(
        d.sql(
            "SELECT MAX(decided_at) FROM restarts WHERE hostname = ? AND outcome IN"
            f" ({', '.join('?' * len(outcomes))})"
        ),
        (hostname, *outcomes),
    )
    (last,) = cur.fetchone()
    claimed = under_way(cur, d, hostname)
    if not rules.retry_unknown:
        # A claim whose owner is gone becomes unknown, counted, as the next claim sees it.
        for row in claimed:
            if row.orphaned(now, instance_timeout):
                last = row.since if last is None else max(last, row.since)
    fleet = fleet_restarts(cur, d, now, rules.rate_limit)
    if rules.groups is None or group is None:
        return HostFacts(hostname, last, claimed, fleet)
    orphaned = orphaned_at(now, instance_timeout)
    live = groups.UnderWay.read(cur, d, rules.groups, [group], orphaned)
    return HostFacts(hostname, last, claimed, fleet, group, live.count(group))


__all__ = [
    "CooldownRow", "DaemonRow", "DeadLetterRow", "DecisionRow", "FleetRestarts", "FleetView",
    "HostFacts", "UnderWayRow", "fleet_view", "host_facts",
]
