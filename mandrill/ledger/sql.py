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

from mandrill.ledger.schema import Cursor, Dialect
from mandrill.message import Delivery, Message
from mandrill.policy import Outcome, Reason

#: Outcomes as the ledger stores them. Parameters are plain ``str``, never the enum: the
#: sqlite3 module binds an exact ``int``, ``float`` or ``str`` directly and anything else
#: (an enum member, ``None``, ``bytes``) through its adaptation protocol, about 3.5k
#: instructions a parameter (callgrind), several times a message.
RESTARTING, UNKNOWN = Outcome.RESTARTING.value, Outcome.UNKNOWN.value

# -- messages ------------------------------------------------------------------------------


#: Every message row a batch writes, saves and dead letters alike, is one execution of this
#: upsert (``executemany``). A save inserts ``received`` and, for a message already there,
#: only counts the delivery; a dead letter inserts or turns the message into
#: ``dead_letter`` with its reason. A row whose id and generation the ledger holds for
#: another message (another payload or publish time, as
#: :func:`mandrill.ledger.generations.identify` compares them) is not written: the rows
#: written are the statement's row count.
_WRITE_MESSAGE = (
    "INSERT INTO messages (subscription, message_id, generation, instance_name, hostname,"
    " data, attributes, publish_time, first_seen, status, reason)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (subscription, message_id, generation)"
    " DO UPDATE SET deliveries = messages.deliveries + 1,"
    " status = CASE WHEN excluded.status = 'dead_letter' THEN excluded.status"
    " ELSE messages.status END,"
    " reason = CASE WHEN excluded.status = 'dead_letter' THEN excluded.reason"
    " ELSE messages.reason END"
    " WHERE messages.data = excluded.data AND (messages.publish_time IS NULL"
    " OR excluded.publish_time IS NULL OR messages.publish_time = excluded.publish_time)"
)

#: A row of :data:`_WRITE_MESSAGE`'s parameters (:func:`message_row`, :func:`dead_letter_row`).
MessageRow = tuple[str, str, int, str | None, str | None, bytes, str, float, float, str, str]


def message_row(
    subscription: str, message: Message, now: float, generation: int = 0
) -> MessageRow:
    """The row that saves a message (a delivery of it), the ``generation`` of its id
    (see :mod:`mandrill.ledger.generations`)."""
    return (
        subscription,
        message.message_id,
        generation,
        message.instance_name,
        message.hostname,
        message.data,
        _attributes_json(message.attributes),
        message.publish_time,
        now,
        "received",
        "",
    )


def dead_letter_row(
    subscription: str, delivery: Delivery, now: float, reason: str, generation: int = 0
) -> MessageRow:
    """The row that keeps a delivery that will never be processed, with the reason."""
    return (
        subscription,
        delivery.message_id,
        generation,
        None,
        None,
        delivery.data,
        _attributes_json(delivery.attributes),
        delivery.publish_time,
        now,
        "dead_letter",
        reason,
    )


def write_messages(cur: Cursor, d: Dialect, rows: list[MessageRow]) -> list[bool]:
    """Write message rows (saves and dead letters) with one ``executemany``, in message id
    order: the row locks a PostgreSQL upsert takes are then taken in one global order by
    every daemon (two rows of one message keep the order they came in). Each result is
    true when every row was written: false for all when one was not (its id and
    generation hold another message), since a batch's row count does not say which."""
    if len(rows) > 1:
        rows = sorted(rows, key=_message_key)
    cur.executemany(d.sql(_WRITE_MESSAGE), rows)
    return [cur.rowcount == len(rows)] * len(rows)


def _message_key(row: MessageRow) -> tuple[str, int]:
    return row[1], row[2]


def _attributes_json(attributes: Mapping[str, str]) -> str:
    # Most messages have none: spare the encoder.
    return json.dumps(dict(attributes)) if attributes else "{}"


# -- daemon instances ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    """The daemon a ledger writes for: restart claims name it as their owner, and its
    heartbeat (``last_seen``) proves they are still being worked on. ``backend`` and
    ``version`` are for people reading the fleet's status."""

    instance_id: str
    host: str
    pid: int
    backend: str = ""
    version: str = ""


def heartbeat(cur: Cursor, d: Dialect, instance: Instance, now: float) -> None:
    """Say that ``instance`` is alive at ``now`` (registering it, started at ``now``, the
    first time)."""
    cur.execute(
        d.sql(
            "INSERT INTO instances (instance_id, host, pid, started, last_seen, backend, version)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (instance_id)"
            " DO UPDATE SET last_seen = excluded.last_seen, stopped_at = NULL"
        ),
        (instance.instance_id, instance.host, instance.pid, now, now, instance.backend,
         instance.version),
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
        (before, RESTARTING),
    )


# -- restarts ------------------------------------------------------------------------------


_INSERT_RESTART = (
    "INSERT INTO restarts (subscription, message_id, hostname, decided_at, finished_at,"
    " outcome, detail, owner, reason, generation, group_name)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def restart_row(
    subscription: str, message: Message, now: float, outcome: Outcome, detail: str, *,
    finished: bool, owner: str | None, reason: Reason | None = None, generation: int = 0,
    group: str | None = None,
) -> tuple[Any, ...]:
    """A row of :data:`_INSERT_RESTART`: a claim (``finished`` false, with its ``owner``)
    or a decision that is final at once (a skip), for the ``generation`` of its message's
    id; ``group``, the host's group (with ``--group-by``)."""
    return (subscription, message.message_id, message.hostname, now,
            now if finished else None, str(outcome), detail, owner, _code(reason),
            generation, group)


def insert_many(cur: Cursor, d: Dialect, rows: list[tuple[Any, ...]]) -> list[int]:
    """Insert restart rows (:func:`restart_row`); returns their ids, in order."""
    return _insert(cur, d, _INSERT_RESTART, rows)


#: A claim: ``restarting`` as a literal and no ``NULL`` parameters (``finished_at``, and
#: ``group_name`` without groups), which sqlite3 would adapt (see :data:`RESTARTING`).
_INSERT_CLAIM = (
    "INSERT INTO restarts (subscription, message_id, hostname, decided_at, owner, generation,"
    " outcome{group_column}) VALUES (?, ?, ?, ?, ?, ?, '" + RESTARTING + "'{group_value})"
)
_INSERT_CLAIM_UNGROUPED = _INSERT_CLAIM.format(group_column="", group_value="")
_INSERT_CLAIM_GROUPED = _INSERT_CLAIM.format(group_column=", group_name", group_value=", ?")


def insert_claims(
    cur: Cursor, d: Dialect, rows: list[tuple[Any, ...]], *, grouped: bool
) -> list[int]:
    """Insert claims, rows of ``(subscription, message_id, hostname, decided_at, owner,
    generation)`` and, when ``grouped``, ``group_name``; returns their ids, in order."""
    return _insert(cur, d, _INSERT_CLAIM_GROUPED if grouped else _INSERT_CLAIM_UNGROUPED, rows)


def _insert(cur: Cursor, d: Dialect, statement: str, rows: list[tuple[Any, ...]]) -> list[int]:
    if not rows:
        return []
    if d.has_lastrowid:
        if len(rows) == 1:
            cur.execute(d.sql(statement), rows[0])
            return [int(cast(Any, cur).lastrowid)]  # SQLite's cursor: not in the protocol
        # Consecutive ids (see Dialect.has_lastrowid): the last one tells them all.
        cur.executemany(d.sql(statement), rows)
        cur.execute("SELECT last_insert_rowid()")
        (last,) = cur.fetchone()
        return list(range(int(last) - len(rows) + 1, int(last) + 1))
    cast(Any, cur).executemany(d.sql(statement + " RETURNING id"), rows, returning=True)
    ids = []
    while True:
        (row_id,) = cur.fetchone()
        ids.append(int(row_id))
        if not cast(Any, cur).nextset():
            return ids


_FINISH = (
    # A live claim, or one another daemon resolved as unknown while this one could not
    # heartbeat (a ledger outage, a pause): the real outcome replaces the guess. Never
    # a final one: a journaled outcome may be replayed twice (see ledger.journal).
    "UPDATE restarts SET finished_at = ?, outcome = ?, detail = ?, reason = ?"
    " WHERE id = ? AND outcome IN (?, ?)"
)

#: A row of :data:`_FINISH`'s parameters (:func:`finish_row`).
FinishRow = tuple[float, str, str, str, int, str, str]


def finish_row(
    restart_id: int, now: float, outcome: Outcome, detail: str, reason: str | None = None
) -> FinishRow:
    """``reason``: a :class:`~mandrill.policy.Reason` code, or none."""
    return (now, str(outcome), detail, _code(reason), restart_id, RESTARTING, UNKNOWN)


def finish_many(cur: Cursor, d: Dialect, rows: list[FinishRow]) -> list[None]:
    """Record how claimed restarts ended, with one ``executemany``, in id order (the row
    locks PostgreSQL takes, in one global order)."""
    if len(rows) > 1:
        rows = sorted(rows, key=_restart_id)
    cur.executemany(d.sql(_FINISH), rows)
    return [None] * len(rows)


def _restart_id(row: FinishRow) -> int:
    return row[4]


def _code(reason: str | None) -> str:
    """A reason code as a plain ``str`` (see :data:`RESTARTING`), ``""`` for none."""
    return str(reason) if reason else ""


__all__ = ["RESTARTING", "UNKNOWN", "Cursor", "Dialect", "Instance"]
