"""PostgreSQL: the ledger a fleet of daemons on one subscription shares (``postgresql://``).

psycopg's *synchronous* connection is used from anyio worker threads, one call at a time
(see :class:`~mandrill.ledger.transactions.Transactions`): that works the same on asyncio
and trio, where psycopg's async API is asyncio-only.

Correctness across daemons rests on three things:

* **Per-host serialisation.** :func:`lock_hosts` takes transaction-scoped advisory locks
  named after the hosts before a decision reads their restarts; a lock is released only by
  the commit that makes the claim's ``restarting`` row visible, so a second daemon deciding
  on the same host waits and then sees it (READ COMMITTED takes a new snapshot per
  statement, so the statements after the lock see what committed while it waited).
* **No deadlocks between transactions.** A decision takes several locks: host locks, and
  ``messages`` row locks (the upserts of saves, which two daemons do when Pub/Sub redelivers
  a message to the other one), and row locks on other daemons' claims it resolves. Two
  daemons taking the same locks in opposite orders would deadlock (PostgreSQL notices only
  after ``deadlock_timeout`` and aborts one). So every transaction takes its locks in one
  global order: the fleet lock (with a rate limit), hosts by name, message rows by message
  id, restart rows by id (:meth:`SQLLedger._decide
  <mandrill.ledger.sqlledger.SQLLedger._decide>`); a transaction that takes only some of
  them keeps the order. A heartbeat's sweep only takes host locks that are free, never
  waiting for one.
* **One clock.** Every time the ledger writes or compares (claims, heartbeats, a daemon's
  silence) is the server's ``clock_timestamp()``, not a daemon's own clock, which may run
  ahead or behind its peers'.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import anyio
import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from mandrill.errors import LedgerError, describe
from mandrill.ledger import schema, sql
from mandrill.ledger.journal import OutcomeJournal
from mandrill.ledger.sqlledger import SQLLedger

T = TypeVar("T")

#: libpq settings used unless the URL gives its own. Keepalives make a query on a dead
#: server fail within about a minute: the worker thread running it cannot be cancelled,
#: so without them a vanished server could hold up shutdown for the kernel's ~2 hours.
DEFAULT_PARAMS = {
    "connect_timeout": "10",
    "application_name": "mandrill",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}

#: Server-side bound on every statement (a lock wait included): a ledger wedged by a lock
#: that is never released (a hung session, an administrator's ``LOCK TABLE``) then fails
#: like an unreachable one — outage logged, messages handed back, exit past
#: ``--ledger-outage-limit`` — instead of silently holding every message. First in
#: ``options``, so a ``-cstatement_timeout=…`` in the URL overrides it (the last one wins).
DEFAULT_OPTIONS = "-cstatement_timeout=30s"
#: A transaction's deadline, in statement timeouts: past it, it counts as stalled (a server
#: or a network that stopped answering cannot time a statement out).
DEADLINE_STATEMENT_TIMEOUTS = 2
#: The deadline where the statement timeout is off (0).
DEFAULT_DEADLINE = 60.0

#: Unquoted identifiers only: ``search_path`` lower-cases what ``CREATE SCHEMA`` would not.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

#: Advisory lock key prefix for hosts, so as not to collide with other applications' keys.
_HOST_LOCK_PREFIX = "mandrill:host:"
#: Serialises schema creation: concurrent ``CREATE TABLE IF NOT EXISTS`` of the same table
#: can fail in PostgreSQL (a unique violation in the catalogue) when daemons start at once.
_SCHEMA_LOCK = "mandrill:schema"


def lock_host(cur: sql.Cursor, hostname: str) -> None:
    """Block until this transaction holds the host's lock (released at commit or rollback)."""
    cur.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (_HOST_LOCK_PREFIX + hostname,)
    )


def lock_hosts(cur: sql.Cursor, hostnames: list[str]) -> None:
    """:func:`lock_host` for each host, in the order given, in one statement (a function
    scan returns its array's elements in order, and the locks are taken row by row)."""
    if hostnames:
        cur.execute(
            "SELECT count(pg_advisory_xact_lock(hashtextextended(%s || h, 0)))"
            " FROM unnest(%s::text[]) AS h",
            (_HOST_LOCK_PREFIX, hostnames),
        )


def try_lock_host(cur: sql.Cursor, hostname: str) -> bool:
    """Take the host's lock if it is free (released at commit or rollback); never waits."""
    cur.execute(
        "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
        (_HOST_LOCK_PREFIX + hostname,),
    )
    return bool(cur.fetchone()[0])


def server_clock(cur: sql.Cursor) -> float:
    """The server's time now, in epoch seconds (``clock_timestamp()``: the time of the call,
    not of the transaction's start)."""
    cur.execute("SELECT extract(epoch from clock_timestamp())")
    return float(cur.fetchone()[0])


DIALECT = sql.Dialect(
    name="postgresql",
    placeholder="%s",
    blob_type="BYTEA",
    id_column="BIGSERIAL PRIMARY KEY",
    lock_host=lock_host,
    try_lock_host=try_lock_host,
    in_list="= ANY(?)",
    list_param=list,
    lock_hosts=lock_hosts,
    # In the connection's search_path, as every other statement.
    table_exists="SELECT to_regclass(?) IS NOT NULL",
    server_clock=server_clock,
)


def connection_params(url: str) -> tuple[dict[str, Any], str | None]:
    """Split a ``postgresql://`` URL into libpq parameters and the ``schema`` it names.

    ``schema`` is mandrill's own query parameter (libpq rejects it); it becomes the
    connection's ``search_path``, overriding one set in ``options``. Any other libpq
    parameter is passed through. Raises ``ValueError`` for a bad schema name and
    :class:`psycopg.ProgrammingError` for a URL libpq cannot parse.
    """
    # The other parameters go to libpq exactly as written: decoding and re-encoding them
    # would change them (libpq reads ``+`` as a plus, urllib as a space), and a urlsplit
    # round trip turns ``postgresql:///db`` into ``postgresql:/db``.
    base, _, query = url.partition("?")
    schemas: list[str] = []
    rest: list[str] = []
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if unquote(key) == "schema":
            schemas.append(unquote(value))
        else:
            rest.append(item)
    params: dict[str, Any] = conninfo_to_dict("?".join([base, "&".join(rest)]) if rest else base)
    for key, value in DEFAULT_PARAMS.items():
        params.setdefault(key, value)
    params["options"] = " ".join(filter(None, [DEFAULT_OPTIONS, params.get("options")]))
    if not schemas:
        return params, None
    schema = schemas[-1]
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(
            f"schema {schema!r} must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, ≤ 63)"
        )
    # libpq applies ``-c`` options in order, so the last search_path wins.
    params["options"] = " ".join(filter(None, [params.get("options"), f"-csearch_path={schema}"]))
    return params, schema


class PostgresDatabase:
    """A :class:`~mandrill.ledger.transactions.Database` over one psycopg connection.

    Every method blocks on the network and must run in a worker thread, one call at a time;
    none can be cancelled part-way. A batch or query that fails because the connection broke
    (server restarted, backend terminated) raises; the next call connects afresh, so an
    outage costs the batches that ran into it and ends with the first one after it.
    """

    def __init__(self, url: str) -> None:
        """Connect and create the schema if needed; raises :class:`psycopg.Error` (or
        ``ValueError`` for a bad ``schema``) if it cannot."""
        self._params, self._schema = connection_params(url)
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._closed = False
        self.deadline = DEFAULT_DEADLINE
        try:
            self._create_schema()
            self.deadline = self._deadline()
        except BaseException:
            self.close()
            raise

    def _deadline(self) -> float:
        """Twice the connection's statement timeout (the URL may set its own)."""
        with self._connection().cursor() as cur:
            cur.execute("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
            (setting,) = cur.fetchone() or ("0",)
            milliseconds = float(setting)
        if milliseconds <= 0:
            return DEFAULT_DEADLINE
        return DEADLINE_STATEMENT_TIMEOUTS * milliseconds / 1000

    def transaction(self, work: Callable[[Any], T]) -> T:
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                cur.execute("BEGIN")
                result = work(cur)
                cur.execute("COMMIT")
        except BaseException:
            # The server rolls back what was not committed when the connection closes; a
            # fresh connection for the next transaction is simpler than working out whether
            # this one is still usable (a COMMIT whose answer was lost, a broken socket).
            self._discard()
            raise
        return result

    def query(self, fn: Callable[[Any], T]) -> T:
        # Autocommit: each statement of a read is its own transaction, so no snapshot or
        # lock outlives the call.
        with self._connection().cursor() as cur:
            return fn(cur)

    def close(self) -> None:
        self._closed = True
        self._discard()

    def _connection(self) -> psycopg.Connection[TupleRow]:
        if self._closed:
            raise LedgerError("ledger is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._discard()
        self._conn = psycopg.connect(**self._params, autocommit=True)
        return self._conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def reader(self) -> PostgresReader:
        """A connection of its own for reads: they never wait behind this one's
        transactions (see :mod:`mandrill.ledger.reader`)."""
        return PostgresReader(self._params)

    def _create_schema(self) -> None:
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (_SCHEMA_LOCK,))
            if self._schema is not None:
                cur.execute(
                    pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                        pgsql.Identifier(self._schema)
                    )
                )
            # In the same transaction as the lock: an older ledger is upgraded all at
            # once or not at all, and a daemon starting meanwhile waits, then sees it done.
            schema.migrate(cur, DIALECT)


class PostgresReader:
    """A connection for reads, opened by the first one; each read is one read-only
    REPEATABLE READ transaction, so that the queries of one page see one snapshot. A read
    that fails drops the connection: the next one connects afresh."""

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = params
        self._conn: psycopg.Connection[TupleRow] | None = None

    def read(self, fn: Callable[[Any], T]) -> T:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(**self._params, autocommit=True)
        try:
            with self._conn.cursor() as cur:
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                result = fn(cur)
                cur.execute("COMMIT")
        except BaseException:
            self.close()
            raise
        return result

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


async def open_postgres_ledger(
    url: str,
    *,
    outage_limit: float = math.inf,
    journal: OutcomeJournal | None = None,
    **options: Any,
) -> SQLLedger:
    """Connect to a PostgreSQL ledger, creating its tables (and schema) if missing, or
    upgrading those of an older mandrill (one transaction); ``options`` go to
    :class:`SQLLedger`.

    ``url`` is a libpq URL, ``postgresql://user:password@host:port/dbname?param=value``;
    every libpq parameter is accepted (``options=-csearch_path%3Dname`` among them, for a
    schema that already exists). mandrill adds ``schema=name``: use (and create) that
    schema, a lower-case identifier; several daemons, or tests, can thus share a database
    without sharing a ledger. Defaults: ``connect_timeout=10``, ``application_name=mandrill``
    TCP keepalives (see :data:`DEFAULT_PARAMS`) and a 30 s ``statement_timeout``
    (:data:`DEFAULT_OPTIONS`).

    Blocks a worker thread for up to ``connect_timeout`` and is not cancellable sooner.
    Raises :class:`LedgerError` (one line, no password) if it cannot connect or create the
    schema, or if the ledger is a newer mandrill's.
    """
    try:
        db = await anyio.to_thread.run_sync(PostgresDatabase, url)
    except (psycopg.Error, ValueError) as exc:
        raise LedgerError(
            f"cannot open PostgreSQL ledger {redact(url)}: {describe(exc)}"
        ) from exc
    except LedgerError as exc:
        raise LedgerError(f"PostgreSQL ledger {redact(url)}: {exc}") from None
    return SQLLedger(db, DIALECT, outage_limit=outage_limit, journal=journal, **options)


def redact(url: str) -> str:
    """The URL without its password."""
    password = urlsplit(url).password
    return url if password is None else url.replace(f":{password}@", ":***@", 1)




__all__ = [
    "DIALECT",
    "PostgresDatabase",
    "connection_params",
    "lock_host",
    "open_postgres_ledger",
    "redact",
]
