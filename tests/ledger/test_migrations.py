"""Schema versions: a ledger written by an older mandrill is upgraded at start, in one
transaction; one written by a newer mandrill is refused with one line. The old ledger is
made with the exact DDL of ``sql.schema()`` at commit 6f6537b (the last without versions)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger import SCHEMA_VERSION, open_ledger
from mandrill.ledger.postgres import DIALECT as POSTGRES
from mandrill.ledger.postgres import connection_params
from mandrill.ledger.schema import MIGRATIONS
from mandrill.ledger.sqlite import DIALECT as SQLITE
from mandrill.policy import BreakerRule, Reason, Rules, Verdict
from tests.ledger import PUBLISHED, T0, Clock, decide_one, message, running, verdict
from tests.support.daemon import run_to_end


def schema_6f6537b(blob_type: str, id_column: str) -> list[str]:
    """``mandrill.ledger.sql.schema(dialect)`` as of commit 6f6537b, verbatim."""
    return [
        f"""CREATE TABLE IF NOT EXISTS messages (
            message_id TEXT PRIMARY KEY,
            instance_name TEXT,
            hostname TEXT,
            data {blob_type} NOT NULL,
            attributes TEXT NOT NULL,
            publish_time DOUBLE PRECISION,
            first_seen DOUBLE PRECISION NOT NULL,
            deliveries INTEGER NOT NULL DEFAULT 1,
            status TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
        f"""CREATE TABLE IF NOT EXISTS restarts (
            id {id_column},
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


#: What the old daemon wrote: a message restarted, one skipped, one dead-lettered, and a
#: claim left 'restarting' by a daemon that died.
OLD_MESSAGES = [
    ("m1", "web-1", "web-1.example.net", b'{"instance_name": "web-1"}', T0, 2, "received", ""),
    ("m2", "web-1", "web-1.example.net", b'{"instance_name": "web-1"}', T0 + 1, 1, "received",
     ""),
    ("bad", None, None, b"\xff", T0 + 2, 1, "dead_letter", "invalid: not JSON"),
    ("m3", "db-1", "db-1.example.net", b'{"instance_name": "db-1"}', T0 + 3, 1, "received", ""),
]
OLD_RESTARTS = [
    ("m1", "web-1.example.net", T0, T0 + 5, "restarted", "exit 0"),
    ("m2", "web-1.example.net", T0 + 1, T0 + 1, "skipped", "host restarted 1s ago"),
    ("m3", "db-1.example.net", T0 + 3, None, "restarting", ""),
]


class OldLedger:
    """A ledger as the old code left it, reached with plain DB-API (``?`` placeholders)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_postgres = url.startswith("postgresql://")

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        if self.is_postgres:
            params, schema = connection_params(self.url)
            with psycopg.connect(**params, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                yield conn
        else:
            with contextlib.closing(sqlite3.connect(self.url, isolation_level=None)) as conn:
                yield conn

    def run(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            if self.is_postgres:
                statement = statement.replace("?", "%s")
            cursor = conn.execute(statement, params)
            return list(cursor.fetchall()) if cursor.description else []

    def create(self) -> None:
        blob, ident = (
            ("BYTEA", "BIGSERIAL PRIMARY KEY") if self.is_postgres
            else ("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT")
        )
        for statement in schema_6f6537b(blob, ident):
            self.run(statement)
        for mid, instance, host, data, seen, deliveries, status, reason in OLD_MESSAGES:
            self.run(
                "INSERT INTO messages (message_id, instance_name, hostname, data, attributes,"
                " publish_time, first_seen, deliveries, status, reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                # Each message's own publish time, which its redeliveries carry too.
                (mid, instance, host, data, json.dumps({"origin": "old"}), PUBLISHED, seen,
                 deliveries, status, reason),
            )
        for row in OLD_RESTARTS:
            self.run(
                "INSERT INTO restarts (message_id, hostname, decided_at, finished_at, outcome,"
                " detail) VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def old_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> OldLedger:
    if request.param == "sqlite":
        return OldLedger(str(tmp_path / "old.db"))
    return OldLedger(request.getfixturevalue("postgres_url"))


async def test_an_old_ledger_is_upgraded_keeping_its_rows(old_ledger: OldLedger) -> None:
    await anyio.to_thread.run_sync(old_ledger.create)

    clock = Clock(T0 + 10)
    ledger = await open_ledger(
        old_ledger.url, subscription="projects/p/subscriptions/s", clock=clock,
        server_clock=False,
    )
    try:
        saved = await ledger.saved_messages()
        assert [(s.message_id, s.status, s.reason, s.data) for s in saved] == [
            (mid, status, reason, data) for mid, _, _, data, _, _, status, reason in OLD_MESSAGES
        ]
        assert saved[0].attributes == {"origin": "old"}
        history = await ledger.history()
        assert [(h.message_id, h.outcome, h.decided_at, h.finished_at, h.detail)
                for h in history] == [
            (mid, outcome, decided, finished, detail)
            for mid, _, decided, finished, outcome, detail in reversed(OLD_RESTARTS)
        ]
        assert await ledger.counts() == {
            "messages_received": 3, "deliveries_received": 4,
            "messages_dead_letter": 1, "deliveries_dead_letter": 1,
            "restarts_restarted": 1, "restarts_skipped": 1, "restarts_restarting": 1,
        }

        async with anyio.create_task_group() as tg:
            await tg.start(ledger.run)
            # Old rows belong to no known subscription: they match every one, so a
            # redelivery after the upgrade is still recognised.
            again = await decide_one(ledger, message("m1"))
            assert verdict(again) == (Verdict.DUPLICATE, "already restarted")
            # The old claim has no owner: the old daemon that made it is long gone.
            clock.now = T0 + 100
            await ledger._beat()  # this daemon's heartbeat, as it runs
            orphan = await decide_one(ledger, message("m3", "db-1"))
            assert verdict(orphan)[0] is Verdict.DUPLICATE
            tg.cancel_scope.cancel()
    finally:
        await ledger.aclose()

    columns = await anyio.to_thread.run_sync(
        old_ledger.run,
        "SELECT subscription, message_id, generation FROM messages ORDER BY first_seen",
    )
    assert columns == [("", "m1", 0), ("", "m2", 0), ("", "bad", 0), ("", "m3", 0),
                       ("projects/p/subscriptions/s", "m1", 0),
                       ("projects/p/subscriptions/s", "m3", 0)]
    owners = await anyio.to_thread.run_sync(
        old_ledger.run,
        "SELECT subscription, owner, outcome, reason, generation FROM restarts ORDER BY id",
    )
    assert owners == [
        ("", None, "restarted", "", 0),
        ("", None, "skipped", "", 0),
        ("", None, "unknown", "daemon_lost", 0),
    ]
    assert await anyio.to_thread.run_sync(
        old_ledger.run, "SELECT version FROM schema_version"
    ) == [(SCHEMA_VERSION,)]


async def test_an_upgrade_that_fails_changes_nothing(old_ledger: OldLedger) -> None:
    await anyio.to_thread.run_sync(old_ledger.create)
    # Something in the way of the last step of the upgrade: a table of that name.
    await anyio.to_thread.run_sync(old_ledger.run, "CREATE TABLE schema_version (x TEXT)")

    with pytest.raises(LedgerError):
        await open_ledger(old_ledger.url)

    # Still the old ledger, whole: the first steps were rolled back with the last.
    rows = await anyio.to_thread.run_sync(
        old_ledger.run, "SELECT message_id, deliveries FROM messages ORDER BY first_seen"
    )
    assert rows == [("m1", 2), ("m2", 1), ("bad", 1), ("m3", 1)]
    with pytest.raises((sqlite3.Error, psycopg.Error)):
        await anyio.to_thread.run_sync(old_ledger.run, "SELECT owner FROM restarts")


async def test_a_newer_ledger_is_refused(old_ledger: OldLedger) -> None:
    ledger = await open_ledger(old_ledger.url)
    await ledger.aclose()
    await anyio.to_thread.run_sync(old_ledger.run, "UPDATE schema_version SET version = 99")

    with pytest.raises(LedgerError) as caught:
        await open_ledger(old_ledger.url)
    assert str(caught.value).endswith(
        f"ledger schema version 99 is newer than this mandrill's ({SCHEMA_VERSION}):"
        " upgrade mandrill"
    )
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {"debug": True}), id="asyncio")]
)
async def test_the_cli_says_a_newer_ledger_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    ledger = await open_ledger(str(path))
    await ledger.aclose()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE schema_version SET version = 99")

    code, _, stderr = await run_to_end(
        ["history", "--ledger", str(path), "--log-format", "text"]
    )
    assert code != 0
    (line,) = stderr.strip().splitlines()
    assert f"ledger schema version 99 is newer than this mandrill's ({SCHEMA_VERSION})" in line


@pytest.mark.parametrize("version", [3, 4, 5])
async def test_an_older_ledger_gains_the_breaker_and_groups(
    old_ledger: OldLedger, version: int
) -> None:
    """The ledger of the mandrill before the breaker (schema v3, before message
    generations too; or v4, with them; or v5, whose index of claims by group held every
    claim): migrated through every later version to the latest, its
    rows kept (generation 0), the breaker's table added (closed), its restarts counted by
    the breaker from then on; the group column added."""
    dialect = POSTGRES if old_ledger.is_postgres else SQLITE

    def create_old() -> None:
        for migration in MIGRATIONS[:version]:
            for statement in migration(dialect):
                old_ledger.run(statement)
        old_ledger.run(f"UPDATE schema_version SET version = {version}")
        old_ledger.run(
            "INSERT INTO restarts (subscription, message_id, hostname, decided_at, finished_at,"
            " outcome, detail, owner, reason) VALUES ('s', 'm1', 'web-1.example.net', ?, ?,"
            " 'failed', 'exit 1', NULL, '')",
            (T0, T0 + 1),
        )

    await anyio.to_thread.run_sync(create_old)
    assert SCHEMA_VERSION == len(MIGRATIONS) == 6
    rule = Rules(3600.0, breaker=BreakerRule(0, None, 3600.0))
    async with running(old_ledger.url, Clock(T0 + 2), subscription="s") as ledger:
        assert await ledger.breaker_status() is None
        (row,) = await ledger.history()
        assert (row.message_id, row.outcome, row.detail) == ("m1", "failed", "exit 1")
        held = await decide_one(ledger, message("m2", "db-1"), rule)
        assert held.decision is not None
        assert held.decision.reason is Reason.BREAKER_OPEN
    # The generation (v4) and group (v5) columns, 0 and empty on the rows from before.
    assert await anyio.to_thread.run_sync(
        old_ledger.run, "SELECT message_id, generation, group_name FROM restarts"
    ) == [("m1", 0, None)]
    assert await anyio.to_thread.run_sync(
        old_ledger.run, "SELECT version FROM schema_version"
    ) == [(SCHEMA_VERSION,)]
