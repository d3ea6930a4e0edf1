"""The decisions of one transaction: many messages saved and decided together, with the
semantics of deciding them one by one; one failing item fails alone; the locks taken
first, in one global order. Against every SQL ledger: SQLite (memory and file) and
PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest

from mandrill.ledger import SQLLedger, claims, sql
from mandrill.ledger.base import Decided, Finish, Request
from mandrill.ledger.sqlite import DIALECT as SQLITE
from mandrill.ledger.sqlite import SQLiteDatabase
from mandrill.policy import UNKNOWN_DETAIL, Outcome, RateLimit, Rules, Verdict
from tests.ledger import HOUR, T0, WEEK, Clock, decide, finish, message, running, verdict


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(ledger_url: str, clock: Clock) -> AsyncIterator[SQLLedger]:
    async with running(ledger_url, clock, subscription="s") as opened:
        yield opened


def verdicts(results: list[Decided]) -> list[tuple[Verdict, str]]:
    return [verdict(result) for result in results]


async def test_same_host_twice_in_one_transaction(ledger: SQLLedger) -> None:
    first, second, other = await decide(
        ledger, message("m1"), message("m2"), message("m3", "db-1")
    )
    assert verdicts([first, second, other]) == [
        (Verdict.RESTART, ""),
        (Verdict.BUSY, "host is being restarted (message m1); waiting for it"),
        (Verdict.RESTART, ""),
    ]
    assert first.claim is not None
    assert other.claim is not None
    assert first.claim.restart_id != other.claim.restart_id
    assert second.claim is None
    # Each claim got its own row's id: finishing them records the right outcomes.
    await finish(ledger, first, Outcome.RESTARTED, "web")
    await finish(ledger, other, Outcome.FAILED, "db")
    assert sorted((h.message_id, h.outcome, h.detail) for h in await ledger.history()) == [
        ("m1", "restarted", "web"),
        ("m3", "failed", "db"),
    ]


async def test_same_message_twice_in_one_transaction(ledger: SQLLedger, clock: Clock) -> None:
    clock.now = T0 - HOUR
    await finish(ledger, (await decide(ledger, message("m0")))[0], Outcome.RESTARTED)

    clock.now = T0
    results = await decide(
        ledger, message("m1", "db-1"), message("m1", "db-1"), message("m2"), message("m2")
    )
    assert verdicts(results) == [
        (Verdict.RESTART, ""),
        (Verdict.BUSY, "a restart for this message is under way"),
        (Verdict.SKIP, "host restarted 1h ago"),
        (Verdict.DUPLICATE, "already skipped"),
    ]
    counts = await ledger.counts()
    assert (counts["messages_received"], counts["deliveries_received"]) == (3, 5)
    await finish(ledger, results[0], Outcome.RESTARTED)


async def test_the_fleet_rate_limit_counts_the_claims_of_the_same_transaction(
    ledger: SQLLedger, clock: Clock
) -> None:
    limited = Rules(WEEK, RateLimit(2, HOUR))
    clock.now = T0 - 2 * HOUR  # out of the window
    (earlier,) = await decide(ledger, message("m0", "old"), rules=limited)
    await finish(ledger, earlier, Outcome.RESTARTED)
    clock.now = T0
    results = await decide(
        ledger, message("m1", "a"), message("m2", "b"), message("m3", "c"), rules=limited
    )
    assert verdicts(results) == [
        (Verdict.RESTART, ""),
        (Verdict.RESTART, ""),
        (Verdict.SKIP, "fleet rate limit: 2 restarts in the last 1h (limit 2)"),
    ]
    for result in results[:2]:
        await finish(ledger, result, Outcome.RESTARTED)


async def test_a_transaction_decides_as_its_messages_would_one_by_one(
    ledger_url: str,
) -> None:
    """A mix of everything (orphans, retries, limits, repeats) in one transaction, then the
    same messages on the same ledger state one transaction each: the same decisions, the
    same rows."""
    messages = [
        message("m1", "a"), message("m2", "a"),
        message("m3", "orphaned"), message("m4", "orphaned"),
        message("m-failed", "b"), message("m-failed", "b"),
        message("m-restarted", "c"), message("m7", "c"),
        message("m8", "d"), message("m9", "e"),
        message("m-orphan", "orphaned"),
    ]
    rules = Rules(HOUR, RateLimit(4, HOUR))

    async def prepare(ledger: SQLLedger, clock: Clock) -> None:
        # A claim by a daemon that never heartbeated (an orphan), then a failed restart
        # and a successful one, hours ago.
        def orphans(cur: Any) -> None:
            sql.insert_many(cur, ledger._d, [sql.restart_row(
                "s", message("m-orphan", "orphaned"), T0 - HOUR, Outcome.RESTARTING, "",
                finished=False, owner="ghost",
            )])
        await ledger._tx.run(orphans)
        clock.now = T0 - 3 * HOUR
        failed, done = await decide(ledger, message("m-failed", "b"),
                                    message("m-restarted", "c"), rules=Rules(0))
        await finish(ledger, failed, Outcome.FAILED, "exit 1")
        await finish(ledger, done, Outcome.RESTARTED)
        clock.now = T0

    async def rows(ledger: SQLLedger) -> list[tuple[Any, ...]]:
        return sorted((h.message_id, h.hostname, h.outcome, h.detail, h.decided_at,
                       h.finished_at) for h in await ledger.history(limit=1000))

    def clear(cur: Any) -> None:
        cur.execute("DELETE FROM restarts")

    clock = Clock()
    async with running(ledger_url, clock, subscription="s") as ledger:
        await prepare(ledger, clock)
        together = await decide(ledger, *messages, rules=rules)
        together_rows = await rows(ledger)
        # The same again, one transaction each.
        ledger.owned.release(held for held in ledger.owned.held())
        ledger.owned.settled(ledger.owned.claims())
        await ledger._tx.run(clear)
        await prepare(ledger, clock)
        one_by_one = [(await decide(ledger, msg, rules=rules))[0] for msg in messages]
        one_by_one_rows = await rows(ledger)
        ledger.owned.settled(ledger.owned.claims())

    assert verdicts(together) == verdicts(one_by_one)
    failures = [(r.claim.failures if r.claim else None) for r in together]
    assert failures == [(r.claim.failures if r.claim else None) for r in one_by_one]
    assert together_rows == one_by_one_rows
    assert {v for v, _ in verdicts(together)} == {
        Verdict.RESTART, Verdict.BUSY, Verdict.SKIP, Verdict.DUPLICATE
    }
    assert (Verdict.DUPLICATE, UNKNOWN_DETAIL) in verdicts(together)


async def add_poison(ledger: SQLLedger, url: str) -> None:
    """Make the database refuse message rows and restarts of messages named ``poison…``,
    and outcomes with the detail ``poison``."""
    if url.startswith("postgresql://"):
        statements = [
            "CREATE FUNCTION poison_insert() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN IF NEW.message_id LIKE 'poison%' THEN RAISE EXCEPTION 'poisoned';"
            " END IF; RETURN NEW; END $$",
            "CREATE FUNCTION poison_update() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN IF NEW.detail = 'poison' THEN RAISE EXCEPTION 'poisoned';"
            " END IF; RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON messages"
            " FOR EACH ROW EXECUTE FUNCTION poison_insert()",
            "CREATE TRIGGER poison BEFORE INSERT ON restarts"
            " FOR EACH ROW EXECUTE FUNCTION poison_insert()",
            "CREATE TRIGGER poison_outcome BEFORE UPDATE ON restarts"
            " FOR EACH ROW EXECUTE FUNCTION poison_update()",
        ]
    else:
        statements = [
            "CREATE TRIGGER poison_message BEFORE INSERT ON messages"
            " WHEN NEW.message_id LIKE 'poison%' BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
            "CREATE TRIGGER poison_restart BEFORE INSERT ON restarts"
            " WHEN NEW.message_id LIKE 'poison%' BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
            "CREATE TRIGGER poison_outcome BEFORE UPDATE ON restarts"
            " WHEN NEW.detail = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
        ]

    def create(cur: Any) -> None:
        for statement in statements:
            cur.execute(statement)

    await ledger._tx.run(create)


async def test_a_failing_item_fails_alone(ledger: SQLLedger, ledger_url: str) -> None:
    await add_poison(ledger, ledger_url)
    results = await decide(
        ledger,
        message("m1"),
        message("poison-1", "db-1"),
        message("m3"),  # sees m1's claim
        message("m4", "db-1"),  # not the poisoned one's
    )
    first, poisoned, waiting, other = results
    assert verdicts([first, waiting, other]) == [
        (Verdict.RESTART, ""),
        (Verdict.BUSY, "host is being restarted (message m1); waiting for it"),
        (Verdict.RESTART, ""),
    ]
    assert (poisoned.decision, poisoned.claim, poisoned.saved) == (None, None, False)
    assert "poisoned" in poisoned.error
    assert [r.saved for r in results] == [True, False, True, True]
    assert "poison-1" not in ledger.owned.held()  # its reservation let go

    # An outcome the database refuses fails its transaction: kept (here, in memory), and
    # written later; its batch-mates too, with it.
    assert first.claim is not None
    assert other.claim is not None
    kept = await ledger.finish([Finish(first.claim, Outcome.RESTARTED, "ok"),
                                Finish(other.claim, Outcome.FAILED, "poison")])
    assert kept == [False, False]
    outcomes = {(h.message_id, h.outcome) for h in await ledger.history()}
    assert outcomes == {("m1", "restarting"), ("m4", "restarting")}
    ledger.owned.settled([first.claim, other.claim])
    ledger._unrecorded.clear()


def test_decisions_lock_the_fleet_then_their_hosts_before_anything_else() -> None:
    """The global lock order (see mandrill.ledger.postgres): every lock a decision needs is
    taken first, the fleet's, then the hosts' in name order, before any row is written."""
    statements: list[str] = []
    dialect = dataclasses.replace(
        SQLITE, lock_hosts=lambda cur, hosts: statements.append(f"LOCK {' '.join(hosts)}")
    )

    class Recording:
        def __init__(self, cur: Any) -> None:
            self._cur = cur

        def execute(self, text: str, *args: Any) -> Any:
            statements.append(" ".join(text.split()[:3]))
            return self._cur.execute(text, *args)

        def executemany(self, text: str, *args: Any) -> Any:
            statements.append(" ".join(text.split()[:3]))
            return self._cur.executemany(text, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cur, name)

    db = SQLiteDatabase(":memory:")
    ledger = SQLLedger(db, dialect, subscription="s", clock=Clock())
    requests = [message("m1", "web-2"), message("m2", "web-1"), message("m3", "web-2")]
    try:
        db.transaction(partial(ledger._sweep, forget=False))  # its heartbeat: alive
        decided, _, _ = db.transaction(lambda cur: ledger._decide(
            [Request(msg) for msg in requests], Rules(WEEK, RateLimit(5, HOUR)), Recording(cur)
        ))
    finally:
        db.close()
    assert [d.decision.verdict for d in decided if d.decision] == [
        Verdict.RESTART, Verdict.RESTART, Verdict.BUSY
    ]
    assert statements[0] == f"LOCK {claims.FLEET_LOCK} web-1.example.net web-2.example.net"
    # Then the message rows (their row locks), in a savepoint of their own: new ids, so
    # nothing is read under them (tests/ledger/test_reused_ids.py).
    assert statements[1:3] == ["SAVEPOINT part", "INSERT INTO messages"]
    assert not any(statement.startswith("SELECT message_id, generation")
                   for statement in statements)
