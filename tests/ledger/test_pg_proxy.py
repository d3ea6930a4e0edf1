"""The fault-injecting PostgreSQL proxy (tests/support/pg_proxy.py), driven with plain psycopg:
these tests are about the double, not about mandrill."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import anyio
import psycopg
import pytest

from tests.support.pg_proxy import PostgresFaultProxy

pytestmark = pytest.mark.postgres

#: Bound on anything that should happen (a thread finishing, a fault firing).
WAIT = 10.0
#: How long something that must NOT happen (a held commit finishing) is given to happen.
NOT_YET = 0.5


def make_proxy(admin_url: str) -> PostgresFaultProxy:
    parts = urlsplit(admin_url)
    return PostgresFaultProxy(f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}")


@pytest.fixture
def proxy(postgres_admin_url: str) -> Iterator[PostgresFaultProxy]:
    with make_proxy(postgres_admin_url).running() as running:
        yield running


@pytest.fixture
def table(postgres_admin_url: str) -> Iterator[str]:
    name = f"proxy_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (n int)")
    yield name
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")  # a connection left in a transaction
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def rows(url: str, table: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [n for (n,) in conn.execute(f"SELECT n FROM {table} ORDER BY n")]


class Background:
    """``fn`` in a thread of its own; ``join`` re-raises what it raised."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._fn = fn
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:
            self.error = exc

    def finished_within(self, seconds: float) -> bool:
        self.thread.join(seconds)
        return not self.thread.is_alive()

    def join(self) -> object:
        assert self.finished_within(WAIT), "the background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def test_url_points_at_the_proxy_and_keeps_the_rest(proxy: PostgresFaultProxy) -> None:
    url = proxy.url("postgresql://root@db.example:6543/test?schema=s1&application_name=x")
    parts = urlsplit(url)
    assert parts.netloc == f"root@{proxy.address}"
    assert parts.path == "/test"
    query = parse_qs(parts.query)
    assert query["schema"] == ["s1"]
    assert query["application_name"] == ["x"]
    assert query["sslmode"] == ["disable"]
    assert "sslmode=require" in proxy.url("postgresql://h/db?sslmode=require")


def test_forwards_transparently(proxy: PostgresFaultProxy, postgres_admin_url: str) -> None:
    name = f"proxy_{uuid.uuid4().hex[:16]}"
    try:
        with psycopg.connect(proxy.url(postgres_admin_url)) as conn:
            conn.execute(f"CREATE TABLE {name} (n int)")
            conn.execute(f"INSERT INTO {name} VALUES (%s), (%s)", (1, 2))
            conn.commit()
            assert [n for (n,) in conn.execute(f"SELECT n FROM {name} ORDER BY n")] == [1, 2]
        assert rows(postgres_admin_url, name) == [1, 2]
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {name}")


def test_drop_commit_answer_loses_the_answer_not_the_commit(
    proxy: PostgresFaultProxy, postgres_admin_url: str, table: str
) -> None:
    fault = proxy.drop_commit_answer(match=rf"INSERT INTO {table} VALUES \(1\)")
    with psycopg.connect(proxy.url(postgres_admin_url)) as conn:
        # Transactions that do not match go through untouched.
        conn.execute("SELECT 1")
        conn.commit()
        conn.execute(f"INSERT INTO {table} VALUES (0)")
        conn.commit()
        assert not fault.fired.is_set(), fault
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(psycopg.OperationalError):
            conn.commit()
    assert fault.fired.is_set(), fault
    assert fault.fired_count == 1, fault
    assert rows(postgres_admin_url, table) == [0, 1]
    # One-shot: the next matching transaction commits normally.
    with psycopg.connect(proxy.url(postgres_admin_url)) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        conn.commit()
    assert rows(postgres_admin_url, table) == [0, 1, 1]


def test_hold_commit_keeps_it_in_flight_until_released(
    proxy: PostgresFaultProxy, postgres_admin_url: str, table: str
) -> None:
    fault = proxy.hold_commit(match=f"insert into {table}")

    def insert_and_commit() -> None:
        with psycopg.connect(proxy.url(postgres_admin_url)) as conn:
            conn.execute("SELECT 1")
            conn.commit()  # a transaction that does not match: not held
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            conn.commit()

    call = Background(insert_and_commit)
    assert fault.fired.wait(WAIT), fault
    # Proving a negative: the held commit is given a short while to (wrongly) finish.
    assert not call.finished_within(NOT_YET)
    assert rows(postgres_admin_url, table) == []
    fault.release()
    call.join()
    assert rows(postgres_admin_url, table) == [1]


def test_stall_holds_every_connection_until_released(
    proxy: PostgresFaultProxy, postgres_admin_url: str
) -> None:
    url = proxy.url(postgres_admin_url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        fault = proxy.stall()
        assert fault.fired.is_set()
        query = Background(lambda: conn.execute("SELECT 1").fetchone())

        def connect_and_query() -> object:
            with psycopg.connect(url, autocommit=True) as fresh:
                return fresh.execute("SELECT 2").fetchone()

        fresh = Background(connect_and_query)
        # Proving a negative: neither is given more than a short while to (wrongly) answer.
        assert not query.finished_within(NOT_YET)
        assert not fresh.finished_within(0)
        fault.release()
        assert query.join() == (1,)
        assert fresh.join() == (2,)
        assert conn.execute("SELECT 3").fetchone() == (3,)


@pytest.mark.parametrize("commit_as", ["simple", "extended", "prepared"])
def test_extended_protocol_statements_are_matched(
    proxy: PostgresFaultProxy, postgres_admin_url: str, table: str, commit_as: str
) -> None:
    """A parametrized INSERT goes as Parse/Bind/Execute; COMMIT as a simple Query, as an
    unnamed Parse, or (psycopg prepares a query from its 6th run) as a Bind of a named
    statement."""
    fault = proxy.drop_commit_answer(match=f"INSERT INTO {table}")
    with psycopg.connect(proxy.url(postgres_admin_url), autocommit=True) as conn:
        cur = conn.cursor()
        if commit_as == "prepared":
            cur.execute("BEGIN")
            cur.execute("COMMIT", prepare=True)  # prepared now, in a transaction that matches not
        cur.execute("BEGIN")
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
        # Binary results need the extended protocol; text ones without parameters do not.
        binary, prepare = commit_as != "simple", commit_as == "prepared"
        with pytest.raises(psycopg.OperationalError):
            cur.execute("COMMIT", binary=binary, prepare=prepare)
    assert fault.fired.is_set(), fault
    assert rows(postgres_admin_url, table) == [1]


def test_reset_releases_and_disarms(
    proxy: PostgresFaultProxy, postgres_admin_url: str, table: str
) -> None:
    held = proxy.hold_commit()
    armed = proxy.drop_commit_answer()
    with psycopg.connect(proxy.url(postgres_admin_url)) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        call = Background(conn.commit)
        assert held.fired.wait(WAIT), held
        proxy.reset()
        call.join()
        conn.execute(f"INSERT INTO {table} VALUES (2)")
        conn.commit()
    assert not armed.fired.is_set(), armed
    assert rows(postgres_admin_url, table) == [1, 2]


def test_stopping_closes_connections_and_ends_threads(postgres_admin_url: str) -> None:
    proxy = make_proxy(postgres_admin_url)
    with proxy.running():
        conn = psycopg.connect(proxy.url(postgres_admin_url), autocommit=True)
        conn.execute("SELECT 1")
        proxy.stall()  # a stalled connection must not hold the stop up
    try:
        assert not [t for t in threading.enumerate() if t.name.startswith("pg-proxy")]
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()


async def test_wait_fired_from_async_code(
    proxy: PostgresFaultProxy, postgres_admin_url: str, table: str
) -> None:
    fault = proxy.hold_commit(match=f"INSERT INTO {table}")

    def insert_and_commit() -> None:
        with psycopg.connect(proxy.url(postgres_admin_url)) as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            conn.commit()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, insert_and_commit)
            await fault.wait_fired(WAIT)
            assert await anyio.to_thread.run_sync(rows, postgres_admin_url, table) == []
            fault.release()
    assert await anyio.to_thread.run_sync(rows, postgres_admin_url, table) == [1]
    with pytest.raises(TimeoutError):
        await proxy.hold_commit(match="never run").wait_fired(0.1)
