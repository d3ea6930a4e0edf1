"""The ledger's SQL, shared by SQLite and PostgreSQL: one DB-API cursor in, plain data out.

Every function here runs inside a worker thread, inside a transaction the caller owns.
Queries are written with ``?`` placeholders; :class:`Dialect` adapts them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mandrill.ledger.base import Claim, HistoryRow, SavedMessage
from mandrill.message import Delivery, Message
from mandrill.policy import Decision, Outcome, Prior, RateLimit, Verdict, decide_restart


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases: placeholders, binary type, per-host locking."""

    name: str
    placeholder: str
    blob_type: str
    id_column: str
    #: Serialises restart decisions for one host across processes (no-op where the whole
    #: database is locked by the write transaction, as in SQLite).
    lock_host: Callable[[Cursor, str], None]

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


def schema(dialect: Dialect) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS messages (
            message_id TEXT PRIMARY KEY,
            instance_name TEXT,
            hostname TEXT,
            data {dialect.blob_type} NOT NULL,
            attributes TEXT NOT NULL,
            publish_time DOUBLE PRECISION,
            first_seen DOUBLE PRECISION NOT NULL,
            deliveries INTEGER NOT NULL DEFAULT 1,
            status TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
        f"""CREATE TABLE IF NOT EXISTS restarts (
            id {dialect.id_column},
            message_id TEXT NOT NULL,
            hostname TEXT NOT NULL,
            decided_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION,
            outcome TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX IF NOT EXISTS restarts_by_host ON restarts (hostname, decided_at)",
        "CREATE INDEX IF NOT EXISTS restarts_by_message ON restarts (message_id)",
        "CREATE INDEX IF NOT EXISTS messages_by_seen ON messages (first_seen)",
    ]


def save(cur: Cursor, d: Dialect, message: Message, now: float) -> None:
    cur.execute(
        d.sql(
            "INSERT INTO messages (message_id, instance_name, hostname, data, attributes,"
            " publish_time, first_seen, status) VALUES (?, ?, ?, ?, ?, ?, ?, 'received')"
            " ON CONFLICT (message_id) DO UPDATE SET deliveries = messages.deliveries + 1"
        ),
        (
            message.message_id,
            message.instance_name,
            message.hostname,
            message.data,
            json.dumps(dict(message.attributes)),
            message.publish_time.timestamp(),
            now,
        ),
    )


def dead_letter(cur: Cursor, d: Dialect, delivery: Delivery, now: float, reason: str) -> None:
    cur.execute(
        d.sql(
            "INSERT INTO messages (message_id, data, attributes, publish_time, first_seen,"
            " status, reason) VALUES (?, ?, ?, ?, ?, 'dead_letter', ?)"
            " ON CONFLICT (message_id) DO UPDATE SET status = 'dead_letter',"
            " reason = excluded.reason, deliveries = messages.deliveries + 1"
        ),
        (
            delivery.message_id,
            delivery.data,
            json.dumps(dict(delivery.attributes)),
            delivery.publish_time.timestamp(),
            now,
            reason,
        ),
    )


#: The lock name that serialises rate-limited decisions across the fleet. It sorts before
#: every ``host:`` and ``message:`` key, so batches always take it first (no deadlock).
FLEET_LOCK = "*fleet*"


def claim(
    cur: Cursor,
    d: Dialect,
    message: Message,
    now: float,
    min_interval: float,
    stale_after: float,
    rate_limit: RateLimit | None = None,
) -> Claim:
    if rate_limit is not None:
        d.lock_host(cur, FLEET_LOCK)
    d.lock_host(cur, message.hostname)
    # One round trip: this message's decisions, then one row (outcome NULL) with the host's
    # last restart or live claim.
    cur.execute(
        d.sql(
            "SELECT outcome, decided_at FROM restarts WHERE message_id = ?"
            " UNION ALL SELECT NULL, MAX(decided_at) FROM restarts WHERE hostname = ?"
            " AND (outcome = ? OR (outcome = ? AND decided_at > ?))"
        ),
        (
            message.message_id,
            message.hostname,
            Outcome.RESTARTED,
            Outcome.RESTARTING,
            now - stale_after,
        ),
    )
    last = None
    decisions = []
    for outcome, decided_at in cur.fetchall():
        if outcome is None:
            last = decided_at
        else:
            decisions.append((Outcome(outcome), decided_at))
    decisions.sort(key=lambda decision: decision[1])
    fleet = 0
    if rate_limit is not None:
        cur.execute(
            d.sql(
                "SELECT COUNT(*) FROM restarts WHERE decided_at > ? AND (outcome = ?"
                " OR (outcome = ? AND decided_at > ?))"
            ),
            (now - rate_limit.window, Outcome.RESTARTED, Outcome.RESTARTING, now - stale_after),
        )
        (fleet,) = cur.fetchone()
    prior = Prior(decisions, last, int(fleet))
    decision = decide_restart(prior, now, min_interval, stale_after, rate_limit)
    if decision.verdict is Verdict.RESTART:
        return Claim(decision, insert(cur, d, message, now, Outcome.RESTARTING, ""))
    if decision.verdict is Verdict.SKIP:
        insert(cur, d, message, now, Outcome.SKIPPED, decision.reason, finished=True)
    return Claim(decision, None)


def insert(
    cur: Cursor,
    d: Dialect,
    message: Message,
    now: float,
    outcome: Outcome,
    detail: str,
    *,
    finished: bool = False,
) -> int:
    cur.execute(
        d.sql(
            "INSERT INTO restarts (message_id, hostname, decided_at, finished_at, outcome, detail)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING id"
        ),
        (message.message_id, message.hostname, now, now if finished else None, outcome, detail),
    )
    (row_id,) = cur.fetchone()
    return int(row_id)


def finish(
    cur: Cursor, d: Dialect, restart_id: int, now: float, outcome: Outcome, detail: str
) -> None:
    cur.execute(
        # Only a live claim: a journaled outcome may be replayed twice (see ledger.journal).
        d.sql(
            "UPDATE restarts SET finished_at = ?, outcome = ?, detail = ?"
            " WHERE id = ? AND outcome = ?"
        ),
        (now, outcome, detail, restart_id, Outcome.RESTARTING),
    )


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
) -> list[SavedMessage]:
    where, params = _filters(hostname, since, until, status, time_column="first_seen")
    cur.execute(
        d.sql(
            "SELECT message_id, data, attributes, hostname, first_seen, status, reason"
            f" FROM messages{where} ORDER BY first_seen, message_id"
        ),
        params,
    )
    return [
        SavedMessage(mid, bytes(data), json.loads(attrs), host, seen, status, reason)
        for mid, data, attrs, host, seen, status, reason in cur.fetchall()
    ]


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


__all__ = ["Cursor", "Decision", "Dialect"]
