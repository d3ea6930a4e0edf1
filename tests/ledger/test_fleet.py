"""Fleet mode: several daemons (ledger instances, each with its own connection) on one
PostgreSQL ledger."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter, defaultdict

import anyio
import psycopg
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger import SQLLedger
from mandrill.ledger.base import DeadLetterRecord, Decided
from mandrill.ledger.postgres import (
    PostgresDatabase,
    connection_params,
    lock_host,
    open_postgres_ledger,
)
from mandrill.message import Message
from mandrill.policy import Outcome, RateLimit, Reason, Rules, Verdict
from tests.ledger import HOUR, WEEK, decide, delivery, finish, message, running, verdict

pytestmark = pytest.mark.postgres

HOSTS = 50


async def test_each_host_restarts_once_across_daemons(postgres_url: str) -> None:
    # Every message reaches both daemons (Pub/Sub redelivers to whichever pulls), in a
    # random order, spread over many small transactions in both daemons at once.
    messages = [message(f"m{h}-{k}", f"host-{h}") for h in range(HOSTS) for k in range(4)]
    rng = random.Random(1)
    results: list[tuple[str, Decided]] = []
    async with running(postgres_url) as a, running(postgres_url) as b:
        jobs = [(ledger, m) for m in messages for ledger in (a, b)]
        rng.shuffle(jobs)

        async def claim(ledger: SQLLedger, batch: list[Message], delay: float) -> None:
            await anyio.sleep(delay)
            results.extend((msg.hostname, result)
                           for msg, result in zip(batch, await decide(ledger, *batch),
                                                  strict=True))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for start in range(0, len(jobs), 5):
                    ledger = jobs[start][0]
                    batch = [msg for owner, msg in jobs[start:start + 5] if owner is ledger]
                    tg.start_soon(claim, ledger, batch, rng.random() * 0.2)

        history = await a.history(limit=10_000)
        for ledger in (a, b):
            ledger.owned.settled(ledger.owned.claims())

    restarts = Counter(host for host, r in results if verdict(r)[0] is Verdict.RESTART)
    assert restarts == {f"host-{h}.example.net": 1 for h in range(HOSTS)}
    verdicts = Counter(verdict(r)[0] for _, r in results)
    # While the restart is under way, every other message for its host waits for it.
    assert set(verdicts) == {Verdict.RESTART, Verdict.BUSY}
    # The ledger agrees: one restarting row per host, nothing decided for the others yet.
    rows: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for row in history:
        rows[row.hostname][row.outcome] += 1
    assert len(rows) == HOSTS
    for counts in rows.values():
        assert counts == {"restarting": 1}


async def test_two_daemons_deciding_the_same_messages_in_opposite_orders_do_not_deadlock(
    postgres_url: str,
) -> None:
    # Both daemons get every message at once, in opposite orders: each transaction saves,
    # claims (under a fleet rate limit: the fleet lock too), and resolves, for many of the
    # same messages and hosts; outcomes and dead letters go in transactions of their own.
    # Every transaction must take its locks in one global order.
    rules = Rules(WEEK, RateLimit(100_000, HOUR))
    restarted: Counter[str] = Counter()
    decided: Counter[Verdict] = Counter()

    async def work(ledger: SQLLedger, batch: list[Message]) -> None:
        for msg, result in zip(batch, await decide(ledger, *batch, rules=rules), strict=True):
            decided[verdict(result)[0]] += 1
            if result.claim is not None:
                restarted[msg.hostname] += 1
                await finish(ledger, result, Outcome.RESTARTED)
                if msg.message_id.endswith("-0"):
                    await ledger.dead_letter([DeadLetterRecord(
                        delivery(msg.message_id, msg.instance_name), Reason.MAX_ATTEMPTS, "test"
                    )])

    rounds = 4
    async with running(postgres_url) as a, running(postgres_url) as b:
        for round_ in range(rounds):
            messages = [message(f"r{round_}-m{h}-{k}", f"r{round_}-host-{h}")
                        for h in range(HOSTS) for k in range(3)]
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for start in range(0, len(messages), 7):
                        tg.start_soon(work, a, messages[start:start + 7])
                        tg.start_soon(work, b, messages[::-1][start:start + 7])
        counts = await a.counts()

    assert restarted == {
        f"r{round_}-host-{h}.example.net": 1 for round_ in range(rounds) for h in range(HOSTS)
    }
    assert sum(decided.values()) == 2 * rounds * 3 * HOSTS
    assert counts["restarts_restarted"] == rounds * HOSTS
    assert counts.get("restarts_restarting", 0) == 0


async def test_broken_connection_fails_one_transaction_then_reconnects(
    postgres_url: str, postgres_admin_url: str
) -> None:
    name = f"victim-{uuid.uuid4().hex[:8]}"
    async with running(f"{postgres_url}&application_name={name}") as ledger:
        await finish(ledger, (await decide(ledger, message("m1")))[0], Outcome.RESTARTED)
        await anyio.to_thread.run_sync(terminate_backend, postgres_admin_url, name)

        with pytest.raises(LedgerError, match="terminating connection"):
            await decide(ledger, message("m2", "web-2"))
        (claimed,) = await decide(ledger, message("m3", "web-3"))
        assert verdict(claimed)[0] is Verdict.RESTART
        await finish(ledger, claimed, Outcome.RESTARTED)
        assert [s.message_id for s in await ledger.saved_messages()] == ["m1", "m3"]

        # Reads reconnect the same way.
        await anyio.to_thread.run_sync(terminate_backend, postgres_admin_url, name)
        with pytest.raises(LedgerError, match="ledger query failed: terminating connection"):
            await ledger.counts()
        assert (await ledger.counts())["messages_received"] == 2


def terminate_backend(admin_url: str, application_name: str) -> None:
    """Kill the named connection (as a server restart would) and wait until it is gone."""
    query = "FROM pg_stat_activity WHERE application_name = %s"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        killed = admin.execute(
            f"SELECT count(pg_terminate_backend(pid)) {query}", (application_name,)
        )
        assert killed.fetchone() == (1,)
        deadline = time.monotonic() + 5
        while admin.execute(f"SELECT pid {query}", (application_name,)).fetchone() is not None:
            assert time.monotonic() < deadline, "the terminated backend is still there"
            time.sleep(0.01)


async def test_a_lock_never_released_fails_the_transaction_instead_of_hanging(
    postgres_url: str,
) -> None:
    async with running(postgres_url):
        pass  # the schema exists before the lock is taken
    # A session that took a host's lock and hung, holding it (here: in a transaction).
    with psycopg.connect(postgres_url.split("?")[0]) as hung:
        lock_host(hung.cursor(), "web-1.example.net")
        # 300 ms instead of the default 30 s, through the URL (which overrides it).
        async with running(f"{postgres_url}&options=-cstatement_timeout%3D300") as ledger:
            with anyio.fail_after(10), pytest.raises(LedgerError, match="statement timeout"):
                await decide(ledger, message("m1", "web-1"))
            # Another host is not held up.
            (claimed,) = await decide(ledger, message("m2", "web-2"))
            assert verdict(claimed)[0] is Verdict.RESTART
            await finish(ledger, claimed, Outcome.RESTARTED)


def test_a_transactions_deadline_is_twice_the_statement_timeout(postgres_url: str) -> None:
    db = PostgresDatabase(f"{postgres_url}&options=-cstatement_timeout%3D1500")
    try:
        assert db.deadline == 3.0
    finally:
        db.close()
    db = PostgresDatabase(postgres_url)
    try:
        assert db.deadline == 60.0  # the default 30 s
    finally:
        db.close()


async def test_daemons_starting_together_create_the_schema_once(postgres_url: str) -> None:
    ledgers: list[SQLLedger] = []

    async def start() -> None:
        ledgers.append(await open_postgres_ledger(postgres_url))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(start)
    for ledger in ledgers:
        assert await ledger.counts() == {}
        await ledger.aclose()


async def test_unreachable_server_is_one_line_without_password() -> None:
    with pytest.raises(LedgerError) as caught:
        await open_postgres_ledger("postgresql://mandrill:s3cret@127.0.0.1:1/test")
    text = str(caught.value)
    assert text.startswith("cannot open PostgreSQL ledger postgresql://mandrill:***@127.0.0.1:1")
    assert "Connection refused" in text
    assert "\n" not in text
    assert "s3cret" not in text


async def test_bad_schema_name_is_refused() -> None:
    with pytest.raises(LedgerError, match="lower-case SQL identifier"):
        await open_postgres_ledger("postgresql://127.0.0.1/test?schema=Robert'); DROP")


def test_url_parameters() -> None:
    params, schema = connection_params(
        "postgresql://u@db:5433/ledger?schema=fleet&options=-cstatement_timeout%3D5s"
        "&connect_timeout=2"
    )
    assert schema == "fleet"
    # The URL's own statement_timeout comes after the default one: it wins.
    assert params["options"] == (
        "-cstatement_timeout=30s -cstatement_timeout=5s -csearch_path=fleet"
    )
    assert (params["host"], params["port"], params["dbname"]) == ("db", "5433", "ledger")
    assert params["connect_timeout"] == "2"
    assert params["application_name"] == "mandrill"
    assert connection_params("postgresql:///ledger")[1] is None
    # Passed through as written: libpq, unlike urllib, does not read "+" as a space.
    params, _ = connection_params("postgres://h/db?password=a+b%20c&options=-c%20x%3Dy")
    assert (params["password"], params["options"]) == ("a+b c", "-cstatement_timeout=30s -c x=y")
    assert connection_params("postgresql:///ledger")[0]["options"] == "-cstatement_timeout=30s"
