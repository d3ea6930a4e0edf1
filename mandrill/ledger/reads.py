"""The ledger's read-only queries, for ``history``, ``replay`` and tests: one DB-API cursor
in, plain data out (what the daemon writes and decides: :mod:`mandrill.ledger.sql`)."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from mandrill.ledger.base import (
    ClaimRow,
    CooldownRow,
    DaemonRow,
    FleetStatus,
    HistoryRow,
    SavedMessage,
)
from mandrill.ledger.schema import Cursor, Dialect
from mandrill.policy import Outcome


def history(
    cur: Cursor, d: Dialect, hostname: str | None, since: float | None, limit: int
) -> list[HistoryRow]:
    where, params = _filters(hostname, since, None, None)
    cur.execute(
        d.sql(
            "SELECT hostname, message_id, decided_at, finished_at, outcome, detail FROM restarts"
            f"{where} ORDER BY decided_at DESC, id DESC LIMIT ?"
        ),
        (*params, limit),
    )
    return [HistoryRow(*row) for row in cur.fetchall()]


def history_of_outcomes(
    cur: Cursor,
    d: Dialect,
    hostname: str | None,
    since: float | None,
    outcomes: Collection[str],
    limit: int,
) -> list[HistoryRow]:
    """:func:`history` with only the decisions whose outcome is one of ``outcomes``."""
    where, params = _filters(hostname, since, None, None)
    among = f"outcome IN ({', '.join('?' * len(outcomes))})"
    where = f"{where} AND {among}" if where else f" WHERE {among}"
    cur.execute(
        d.sql(
            "SELECT hostname, message_id, decided_at, finished_at, outcome, detail FROM restarts"
            f"{where} ORDER BY decided_at DESC, id DESC LIMIT ?"
        ),
        (*params, *sorted(outcomes), limit),
    )
    return [HistoryRow(*row) for row in cur.fetchall()]


def saved_messages(
    cur: Cursor,
    d: Dialect,
    hostname: str | None,
    since: float | None,
    until: float | None,
    status: str | None,
    limit: int | None = None,
) -> list[SavedMessage]:
    """Messages as saved, oldest first; the first ``limit`` of them when given."""
    where, params = _filters(hostname, since, until, status, time_column="first_seen")
    if limit is not None:
        where += " ORDER BY first_seen, message_id LIMIT ?"
        params.append(limit)
    else:
        where += " ORDER BY first_seen, message_id"
    cur.execute(
        d.sql(
            "SELECT message_id, data, attributes, hostname, first_seen, status, reason"
            f" FROM messages{where}"
        ),
        params,
    )
    return [
        SavedMessage(mid, bytes(data), json.loads(attrs), host, seen, status, reason)
        for mid, data, attrs, host, seen, status, reason in cur.fetchall()
    ]


def fleet_status(
    cur: Cursor, d: Dialect, now: float, min_interval: float, retry_unknown: bool
) -> FleetStatus:
    """The daemons that have not stopped (alive or silent), the restart claims under way,
    and the hosts whose last restart that counts (a success; an unknown outcome too unless
    ``retry_unknown``) is more recent than ``min_interval`` at ``now``."""
    cur.execute(
        "SELECT instance_id, host, pid, started, last_seen, backend, version FROM instances"
        " WHERE stopped_at IS NULL ORDER BY host, started, instance_id"
    )
    daemons = [DaemonRow(*row) for row in cur.fetchall()]
    cur.execute(
        d.sql(
            "SELECT hostname, decided_at, owner, message_id FROM restarts WHERE outcome = ?"
            " ORDER BY decided_at, id"
        ),
        (Outcome.RESTARTING,),
    )
    claims = [ClaimRow(*row) for row in cur.fetchall()]
    counted = [Outcome.RESTARTED] if retry_unknown else [Outcome.RESTARTED, Outcome.UNKNOWN]
    cur.execute(
        d.sql(
            "SELECT hostname, MAX(decided_at) FROM restarts WHERE decided_at > ? AND outcome"
            f" IN ({', '.join('?' * len(counted))}) GROUP BY hostname"
        ),
        (now - min_interval, *counted),
    )
    cooldowns = sorted(
        (CooldownRow(host, last, last + min_interval) for host, last in cur.fetchall()),
        key=lambda row: (row.until, row.hostname),
    )
    return FleetStatus(now, daemons, claims, cooldowns)


def counts(cur: Cursor) -> dict[str, int]:
    cur.execute("SELECT outcome, COUNT(*) FROM restarts GROUP BY outcome")
    result = {f"restarts_{outcome}": int(n) for outcome, n in cur.fetchall()}
    cur.execute("SELECT status, COUNT(*), SUM(deliveries) FROM messages GROUP BY status")
    for status, n, deliveries in cur.fetchall():
        result[f"messages_{status}"] = int(n)
        result[f"deliveries_{status}"] = int(deliveries)
    return result


def _filters(
    hostname: str | None,
    since: float | None,
    until: float | None,
    status: str | None,
    time_column: str = "decided_at",
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for clause, value in (
        ("hostname = ?", hostname),
        (f"{time_column} >= ?", since),
        (f"{time_column} < ?", until),
        ("status = ?", status),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
