"""The ledger's schema, shared by SQLite and PostgreSQL: what differs between the two
(:class:`Dialect`), the numbered migrations, and :func:`migrate`, which brings a ledger to
:data:`SCHEMA_VERSION` inside the caller's transaction. The queries are in
:mod:`mandrill.ledger.sql`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mandrill.errors import LedgerError


class Cursor(Protocol):
    """The part of a DB-API cursor the ledger uses (sqlite3's and psycopg's both fit)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    @property
    def rowcount(self) -> int: ...


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
    #: Takes the host's lock if no other transaction holds it; False, waiting for
    #: nothing, if one does.
    try_lock_host: Callable[[Cursor, str], bool]
    #: A query with one parameter, a table name, whose first row's first column is true
    #: when that table exists.
    table_exists: str
    #: ``column {in_list}`` is true when the column's value is one of a list of strings
    #: passed as one parameter, ``list_param(values)``: one statement text whatever the
    #: list's length (prepared once, cached once).
    in_list: str
    list_param: Callable[[list[str]], Any]
    #: Takes the locks of several hosts, in the order given, in one round trip.
    lock_hosts: Callable[[Cursor, list[str]], None]
    #: The cursor's ``lastrowid`` is the id of the row just inserted (SQLite): cheaper than
    #: ``RETURNING id`` (measured: 7.4 -> 4.6 us an insert). Else ``RETURNING`` it is.
    #: There, the rows one ``executemany`` inserts also have consecutive ids (an
    #: ``AUTOINCREMENT`` key, under the transaction's write lock): the last one's id tells
    #: them all.
    has_lastrowid: bool = False
    #: The database server's own clock, in epoch seconds (PostgreSQL's
    #: ``clock_timestamp()``): one clock for every daemon of a fleet. ``None`` where the
    #: ledger is local to one machine (SQLite), which keeps that machine's clock.
    server_clock: Callable[[Cursor], float] | None = None

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


# -- schema versions ---------------------------------------------------------------------
#
# Version 0 is an empty database. Each migration takes the schema from the version before
# it to its own number; a fresh ledger runs them all, so a new ledger and an upgraded one
# are built by the same statements. Version 1 is the schema of mandrill before versions
# existed (it has no ``schema_version`` table; its ``messages`` table tells it apart).


def _v1(d: Dialect) -> list[str]:
    return [
        f"""CREATE TABLE messages (
            message_id TEXT PRIMARY KEY,
            instance_name TEXT,
            hostname TEXT,
            data {d.blob_type} NOT NULL,
            attributes TEXT NOT NULL,
            publish_time DOUBLE PRECISION,
            first_seen DOUBLE PRECISION NOT NULL,
            deliveries INTEGER NOT NULL DEFAULT 1,
            status TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
        f"""CREATE TABLE restarts (
            id {d.id_column},
            message_id TEXT NOT NULL,
            hostname TEXT NOT NULL,
            decided_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION,
            outcome TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX restarts_by_host ON restarts (hostname, decided_at)",
        "CREATE INDEX restarts_by_message ON restarts (message_id)",
        "CREATE INDEX messages_by_seen ON messages (first_seen)",
    ]


def _v2(d: Dialect) -> list[str]:
    """Messages keyed by (subscription, message id); restart claims owned by a daemon
    instance that proves it is alive (``instances``). Rows from before have subscription
    ``''``: a message id of unknown subscription, matched by every subscription."""
    if d.name == "sqlite":
        # SQLite cannot change a primary key: the table is rebuilt.
        messages = [
            f"""CREATE TABLE messages_v2 (
                subscription TEXT NOT NULL DEFAULT '',
                message_id TEXT NOT NULL,
                instance_name TEXT,
                hostname TEXT,
                data {d.blob_type} NOT NULL,
                attributes TEXT NOT NULL,
                publish_time DOUBLE PRECISION,
                first_seen DOUBLE PRECISION NOT NULL,
                deliveries INTEGER NOT NULL DEFAULT 1,
                status TEXT NOT NULL,
                reason TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (subscription, message_id)
            )""",
            "INSERT INTO messages_v2 (message_id, instance_name, hostname, data, attributes,"
            " publish_time, first_seen, deliveries, status, reason) SELECT message_id,"
            " instance_name, hostname, data, attributes, publish_time, first_seen, deliveries,"
            " status, reason FROM messages",
            "DROP TABLE messages",
            "ALTER TABLE messages_v2 RENAME TO messages",
            "CREATE INDEX messages_by_seen ON messages (first_seen)",
        ]
    else:
        messages = [
            "ALTER TABLE messages ADD COLUMN subscription TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE messages DROP CONSTRAINT messages_pkey",
            "ALTER TABLE messages ADD PRIMARY KEY (subscription, message_id)",
        ]
    return [
        *messages,
        "ALTER TABLE restarts ADD COLUMN subscription TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE restarts ADD COLUMN owner TEXT",
        """CREATE TABLE instances (
            instance_id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL,
            stopped_at DOUBLE PRECISION
        )""",
        # The claims under way, few at any time among all the restarts ever decided: found
        # by every claim on their host and by every heartbeat's sweep.
        "CREATE INDEX restarts_under_way ON restarts (hostname) WHERE outcome = 'restarting'",
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "INSERT INTO schema_version (version) VALUES (1)",
    ]


def _v3(d: Dialect) -> list[str]:
    """Each decision's reason as a code (``mandrill.policy.Reason``; its sentence stays in
    ``detail``), and each daemon's backend and version (for the fleet's status)."""
    return [
        "ALTER TABLE restarts ADD COLUMN reason TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE instances ADD COLUMN backend TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE instances ADD COLUMN version TEXT NOT NULL DEFAULT ''",
    ]


def _v4(d: Dialect) -> list[str]:
    """Messages keyed by (subscription, message id, generation): a message id the ledger
    already holds for another message (a restarted emulator numbers its messages from 1
    again) is saved beside it as the next generation, and its restarts name that generation
    (see :mod:`mandrill.ledger.generations`). Every row from before is generation 0."""
    if d.name == "sqlite":
        # SQLite cannot change a primary key: the table is rebuilt.
        columns = (
            "subscription, message_id, instance_name, hostname, data, attributes,"
            " publish_time, first_seen, deliveries, status, reason"
        )
        messages = [
            f"""CREATE TABLE messages_v4 (
                subscription TEXT NOT NULL DEFAULT '',
                message_id TEXT NOT NULL,
                generation INTEGER NOT NULL DEFAULT 0,
                instance_name TEXT,
                hostname TEXT,
                data {d.blob_type} NOT NULL,
                attributes TEXT NOT NULL,
                publish_time DOUBLE PRECISION,
                first_seen DOUBLE PRECISION NOT NULL,
                deliveries INTEGER NOT NULL DEFAULT 1,
                status TEXT NOT NULL,
                reason TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (subscription, message_id, generation)
            )""",
            f"INSERT INTO messages_v4 ({columns}) SELECT {columns} FROM messages",
            "DROP TABLE messages",
            "ALTER TABLE messages_v4 RENAME TO messages",
            "CREATE INDEX messages_by_seen ON messages (first_seen)",
        ]
    else:
        messages = [
            "ALTER TABLE messages ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE messages DROP CONSTRAINT messages_pkey",
            "ALTER TABLE messages ADD PRIMARY KEY (subscription, message_id, generation)",
        ]
    return [
        *messages,
        "ALTER TABLE restarts ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
    ]


def _v5(d: Dialect) -> list[str]:
    """The fleet's restart-storm breaker: a row each time it opened (``closed_at`` NULL
    while open), and the recent failed and unknown restarts it counts, found by their
    end; each decision's group of hosts (``--group-by``; NULL without), and the claims
    under way in each group, counted by every claim in it."""
    return [
        "ALTER TABLE restarts ADD COLUMN group_name TEXT",
        "CREATE INDEX restarts_under_way_by_group ON restarts (group_name)"
        " WHERE outcome = 'restarting'",
        f"""CREATE TABLE breakers (
            id {d.id_column},
            opened_at DOUBLE PRECISION NOT NULL,
            opened_by TEXT NOT NULL,
            why TEXT NOT NULL,
            closed_at DOUBLE PRECISION,
            closed_by TEXT
        )""",
        # Literal outcomes: SQLite uses a partial index only for a query that names them so.
        "CREATE INDEX restarts_gone_wrong ON restarts (finished_at)"
        " WHERE outcome IN ('failed', 'unknown')",
    ]


def _v6(d: Dialect) -> list[str]:
    """The index of claims under way by group holds only the rows that have a group:
    without ``--group-by`` (every row's group NULL) each claim and each outcome no longer
    writes it (measured: 3.7k fewer instructions a message on a Pub/Sub drain)."""
    return [
        "DROP INDEX restarts_under_way_by_group",
        "CREATE INDEX restarts_under_way_by_group ON restarts (group_name)"
        " WHERE outcome = 'restarting' AND group_name IS NOT NULL",
    ]


#: Migration ``n`` (``MIGRATIONS[n - 1]``) takes the schema from version ``n - 1`` to ``n``.
MIGRATIONS: tuple[Callable[[Dialect], list[str]], ...] = (_v1, _v2, _v3, _v4, _v5, _v6)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(cur: Cursor, d: Dialect) -> int:
    """The version of the schema the cursor's database has (0: none yet)."""
    cur.execute(d.sql(d.table_exists), ("schema_version",))
    if cur.fetchone()[0]:
        cur.execute("SELECT MAX(version) FROM schema_version")
        (version,) = cur.fetchone()
        return int(version or 0)
    cur.execute(d.sql(d.table_exists), ("messages",))
    return 1 if cur.fetchone()[0] else 0


def migrate(cur: Cursor, d: Dialect) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`, inside the caller's transaction (all of
    it or nothing); returns the version found. Raises :class:`LedgerError` for a ledger
    written by a newer mandrill, changing nothing."""
    found = schema_version(cur, d)
    if found > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger schema version {found} is newer than this mandrill's"
            f" ({SCHEMA_VERSION}): upgrade mandrill"
        )
    for migration in MIGRATIONS[found:]:
        for statement in migration(d):
            cur.execute(statement)
    if found < SCHEMA_VERSION:
        cur.execute(d.sql("UPDATE schema_version SET version = ?"), (SCHEMA_VERSION,))
    return found
