"""SQLite: the embedded default ledger (one file, or ``:memory:``)."""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from mandrill.errors import LedgerError, LedgerPathError
from mandrill.ledger import schema, sql
from mandrill.ledger.journal import OutcomeJournal
from mandrill.ledger.sqlledger import SQLLedger

T = TypeVar("T")

#: A write waits this long for another process's lock before the transaction fails.
BUSY_TIMEOUT_MS = 5000

DIALECT = sql.Dialect(
    name="sqlite",
    placeholder="?",
    blob_type="BLOB",
    id_column="INTEGER PRIMARY KEY AUTOINCREMENT",
    # BEGIN IMMEDIATE already locks the whole database for the batch.
    lock_host=lambda cur, host: None,
    try_lock_host=lambda cur, host: True,
    table_exists="SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
    in_list="IN (SELECT value FROM json_each(?))",
    list_param=json.dumps,
    lock_hosts=lambda cur, hosts: None,
    has_lastrowid=True,
)


class SQLiteDatabase:
    """One connection, used by one thread at a time (see
    :class:`~mandrill.ledger.transactions.Transactions`): anyio's worker threads, or the
    event loop's own thread for :meth:`try_transaction_now`."""

    #: A transaction waits up to the busy timeout for another process's lock: twice that,
    #: and it is stalled (a file system that stopped answering).
    deadline = 2 * BUSY_TIMEOUT_MS / 1000

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        #: Whether a batch can run without waiting for another connection: always in
        #: memory; for a file, in WAL mode only (then only BEGIN IMMEDIATE can wait, for
        #: another writer; in a rollback journal COMMIT waits for readers too).
        self.inline = path == ":memory:"
        try:
            if path != ":memory:":
                self.inline = self._write_ahead_log()
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _write_ahead_log(self) -> bool:
        """Put the file in WAL mode (it stays so); True if it is. Another connection
        starting at the same moment may hold the lock this needs, and SQLite does not call
        its busy handler for a journal mode change: retried within the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                (mode,) = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # a worker thread: opening blocks it anyway
        self._conn.execute("PRAGMA synchronous = NORMAL")
        return str(mode).lower() == "wal"

    def _migrate(self) -> None:
        """Create or upgrade the schema in one transaction (an older mandrill's ledger);
        raises :class:`LedgerError` for a newer one's."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")  # two daemons starting at once: one migrates
        try:
            schema.migrate(cur, DIALECT)
            cur.execute("COMMIT")
        except BaseException:
            self._conn.rollback()
            raise

    def try_transaction_now(self, work: Callable[[Any], T]) -> tuple[bool, T | None]:
        """Run the transaction now, on the calling thread (the event loop's), unless that
        could block: another connection holding the write lock (tried without waiting), or
        a rollback journal. Returns ``(False, None)``, with nothing changed, for
        :meth:`transaction` in a worker thread to do it.

        A SQLite transaction is CPU work in short C calls that release the GIL between
        Python steps: in a worker thread it cannot run beside the event loop, and while the
        loop is busy every statement waits for the GIL again (up to the 5 ms switch
        interval). Measured under load: batches 5-10x faster, p99 publish -> settle about
        3x lower. The decider bounds a transaction's size, so the loop is not held long.
        """
        if not self.inline:
            return False, None
        self._conn.execute("PRAGMA busy_timeout = 0")
        try:
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    return False, None
                raise
            return True, self._commit(cur, work)
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def transaction(self, work: Callable[[Any], T]) -> T:
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        return self._commit(cur, work)

    def _commit(self, cur: sqlite3.Cursor, work: Callable[[Any], T]) -> T:
        try:
            result = work(cur)
            cur.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.rollback()
            raise
        return result

    def query(self, fn: Callable[[Any], T]) -> T:
        return fn(self._conn.cursor())

    def close(self) -> None:
        self._conn.close()

    def reader(self) -> SQLiteReader | None:
        """A connection of its own for reads (``None`` for ``:memory:``, a database no
        other connection sees): in WAL mode, reads and writes do not wait for each other."""
        return None if self._path == ":memory:" else SQLiteReader(self._path)


class SQLiteReader:
    """A read-only connection to the ledger's file, opened by its first read (see
    :mod:`mandrill.ledger.reader`)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def read(self, fn: Callable[[Any], T]) -> T:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only = ON")
            self._conn = conn
        cur = self._conn.cursor()
        cur.execute("BEGIN")  # one snapshot for every query of the read
        try:
            return fn(cur)
        finally:
            cur.execute("COMMIT")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _busy(error: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY: another connection holds the lock."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


async def open_sqlite_ledger(
    path: str,
    *,
    outage_limit: float = float("inf"),
    journal: OutcomeJournal | None = None,
    **options: Any,
) -> SQLLedger:
    """Open (and create, or upgrade) a SQLite ledger; ``options`` go to
    :class:`SQLLedger`. Raises :class:`LedgerError` if it cannot, or if the file is a
    newer mandrill's ledger."""
    try:
        db = await anyio.to_thread.run_sync(SQLiteDatabase, path)
    except sqlite3.Error as exc:
        problem = await anyio.to_thread.run_sync(path_problem, path)
        if problem is not None:
            raise LedgerPathError(f"SQLite ledger {path}: {problem}") from exc
        raise LedgerError(f"cannot open SQLite ledger {path!r}: {exc}") from exc
    except LedgerError as exc:
        raise LedgerError(f"SQLite ledger {path!r}: {exc}") from None
    return SQLLedger(db, DIALECT, outage_limit=outage_limit, journal=journal, **options)


#: The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def path_problem(path: str) -> str | None:
    """Why SQLite cannot use ``path`` as a ledger, found by trying as this process (root
    included: permission bits do not stop it, a read-only mount does), in one line; ``None``
    if nothing about the path explains it. Called once opening failed: the probes (a read,
    an open for writing, a temporary file beside it) cost nothing on the way to success.
    """
    if path == ":memory:":
        return None
    absolute = os.path.abspath(path)
    directory = os.path.dirname(absolute)
    if os.path.isdir(absolute):
        return "is a directory, not a file"
    missing = _missing_directory(directory)
    if missing is not None:
        return missing
    if os.path.lexists(absolute):
        try:
            with open(absolute, "rb") as file:
                header = file.read(len(SQLITE_HEADER))
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if header and header != SQLITE_HEADER:
            return "is not a SQLite database"
        try:
            os.close(os.open(absolute, os.O_RDWR))
        except OSError as exc:
            return f"cannot be written ({exc.strerror})"
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return (
            f"directory {directory} is not writable ({exc.strerror}): SQLite keeps its"
            " journal beside the ledger"
        )
    return None


def _missing_directory(directory: str) -> str | None:
    """Why ``directory`` cannot hold the ledger: it or a parent is missing, or a file."""
    parent = directory
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    if parent != directory:
        return f"directory {directory} does not exist"
    return None
