"""The writes of one batch, coalesced: one op per kind (message rows, claims, finishes) that
decides and writes for all of them, with the semantics of writing them one by one; a failing
item fails alone. Against every SQL ledger: SQLite (memory and file) and PostgreSQL."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger import SQLLedger, claims, sql
from mandrill.ledger.base import Claim
from mandrill.ledger.journal import OutcomeJournal
from mandrill.ledger.ops import Op, size
from mandrill.ledger.postgres import PostgresDatabase
from mandrill.ledger.sqlite import DIALECT as SQLITE
from mandrill.ledger.sqlite import SQLiteDatabase
from mandrill.policy import UNKNOWN_REASON, Outcome, RateLimit, Verdict
from tests.ledger import HOUR, T0, WEEK, delivery, message, writing

T = TypeVar("T")


class HeldDatabase:
    """A database whose batches can be held back (:meth:`hold`): the writer then waits in a
    thread with the batch it took, and what is queued meanwhile makes the next batch.
    ``batches`` counts the writes of every batch run (a gathered op's items each count);
    ``keys`` has the keys of its ops."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.batches: list[int] = []
        self.keys: list[list[str]] = []
        self._open = threading.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def try_run_batch(self, ops: list[Op[Any]]) -> bool:
        try_now = getattr(self.db, "try_run_batch", None)
        if not self._open.is_set() or try_now is None or not try_now(ops):
            return False
        self._ran(ops)
        return True

    def run_batch(self, ops: list[Op[Any]]) -> None:
        self._open.wait(10)
        self.db.run_batch(ops)
        self._ran(ops)

    def _ran(self, ops: list[Op[Any]]) -> None:
        self.batches.append(sum(map(size, ops)))
        self.keys.append([op.key for op in ops])

    def run_query(self, fn: Callable[[Any], T]) -> T:
        result: T = self.db.run_query(fn)
        return result

    def close(self) -> None:
        self.db.close()


def open_held(url: str, **options: Any) -> tuple[SQLLedger, HeldDatabase]:
    db: Any
    if url.startswith("postgresql://"):
        from mandrill.ledger.postgres import DIALECT as POSTGRES

        db, dialect = PostgresDatabase(url), POSTGRES
    else:
        from mandrill.ledger.sqlite import DIALECT as SQLITE

        db, dialect = SQLiteDatabase(url), SQLITE
    held = HeldDatabase(db)
    # No heartbeat during a test (it would join a batch): an hour between them.
    options.setdefault("instance_timeout", 6 * HOUR)
    return SQLLedger(held, dialect, **options), held


@asynccontextmanager
async def held_ledger(url: str, **options: Any) -> AsyncIterator[tuple[SQLLedger, HeldDatabase]]:
    ledger, held = await anyio.to_thread.run_sync(lambda: open_held(url, **options))
    async with writing(ledger):
        yield ledger, held


async def one_batch(
    ledger: SQLLedger, held: HeldDatabase, calls: list[Callable[[], Awaitable[Any]]]
) -> list[Any]:
    """Each call's result (its ``LedgerError`` if it failed), the writes of all of them
    queued in this order and committed in one batch."""
    results: list[Any] = [None] * len(calls)

    async def run(index: int, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            results[index] = await call()
        except LedgerError as exc:
            results[index] = exc

    held.hold()
    # The writer takes this one and waits with it: the calls below make the next batch.
    blocker = ledger.save(message("blocker"), T0)
    await anyio.wait_all_tasks_blocked()
    before = len(held.batches)
    try:
        async with anyio.create_task_group() as tg:
            for index, call in enumerate(calls):
                tg.start_soon(run, index, call)
                await anyio.wait_all_tasks_blocked()  # queued: the next one comes after it
            held.release()
    finally:
        held.release()
    await blocker
    assert held.batches[before:] == [1, len(calls)]
    return results


@pytest.fixture
async def ledger_and_db(ledger_url: str) -> AsyncIterator[tuple[SQLLedger, HeldDatabase]]:
    async with held_ledger(ledger_url, subscription="s") as opened:
        yield opened


def verdicts(claims: list[Claim]) -> list[tuple[Verdict, str]]:
    return [(c.decision.verdict, c.decision.reason) for c in claims]


async def test_same_host_twice_in_one_batch(
    ledger_and_db: tuple[SQLLedger, HeldDatabase],
) -> None:
    ledger, held = ledger_and_db
    first, second, other = await one_batch(ledger, held, [
        lambda: ledger.claim(message("m1"), T0, WEEK),
        lambda: ledger.claim(message("m2"), T0, WEEK),
        lambda: ledger.claim(message("m3", "db-1"), T0, WEEK),
    ])
    assert verdicts([first, second, other]) == [
        (Verdict.RESTART, ""),
        (Verdict.BUSY, "host is being restarted (message m1); waiting for it"),
        (Verdict.RESTART, ""),
    ]
    assert None not in (first.restart_id, other.restart_id)
    assert first.restart_id != other.restart_id
    assert second.restart_id is None
    # Each claim got its own row's id: finishing them records the right outcomes.
    await ledger.finish(first.restart_id, T0 + 1, Outcome.RESTARTED, "web")
    await ledger.finish(other.restart_id, T0 + 1, Outcome.FAILED, "db")
    assert sorted((h.message_id, h.outcome, h.detail) for h in await ledger.history()) == [
        ("m1", "restarted", "web"),
        ("m3", "failed", "db"),
    ]


async def test_same_message_twice_in_one_batch(
    ledger_and_db: tuple[SQLLedger, HeldDatabase],
) -> None:
    ledger, held = ledger_and_db
    restarted = await ledger.claim(message("m0"), T0 - HOUR, WEEK)
    assert restarted.restart_id is not None
    await ledger.finish(restarted.restart_id, T0 - HOUR, Outcome.RESTARTED, "")

    results = await one_batch(ledger, held, [
        lambda: ledger.save(message("m1", "db-1"), T0),
        lambda: ledger.claim(message("m1", "db-1"), T0, WEEK),
        lambda: ledger.save(message("m1", "db-1"), T0 + 1),
        lambda: ledger.claim(message("m1", "db-1"), T0 + 1, WEEK),
        # A skip, then the same message again: already decided.
        lambda: ledger.claim(message("m2"), T0, WEEK),
        lambda: ledger.claim(message("m2"), T0 + 1, WEEK),
    ])
    assert results[0] is None
    assert results[2] is None
    assert verdicts(results[1::2][:2] + results[4:]) == [
        (Verdict.RESTART, ""),
        (Verdict.BUSY, "a restart for this message is under way"),
        (Verdict.SKIP, "host restarted 1h ago"),
        (Verdict.DUPLICATE, "already skipped"),
    ]
    assert await ledger.counts() == {
        "messages_received": 2,  # m1 and one_batch's blocker
        "deliveries_received": 3,
        "restarts_restarted": 1,
        "restarts_restarting": 1,
        "restarts_skipped": 1,
    }


async def test_claims_with_and_without_a_rate_limit_in_one_batch(
    ledger_and_db: tuple[SQLLedger, HeldDatabase],
) -> None:
    ledger, held = ledger_and_db
    limit = RateLimit(2, HOUR)
    earlier = await ledger.claim(message("m0", "old"), T0 - 2 * HOUR, WEEK)  # out of the window
    assert earlier.decision.verdict is Verdict.RESTART
    results = await one_batch(ledger, held, [
        lambda: ledger.claim(message("m1", "a"), T0, WEEK, limit),
        lambda: ledger.claim(message("m2", "b"), T0, WEEK),
        lambda: ledger.claim(message("m3", "c"), T0, WEEK, limit),
        lambda: ledger.claim(message("m4", "d"), T0, WEEK),
        # Its own window is shorter: only the restarts of the last minute count.
        lambda: ledger.claim(message("m5", "e"), T0 + 59, WEEK, RateLimit(2, 60)),
        lambda: ledger.claim(message("m6", "f"), T0 + 61, WEEK, RateLimit(2, 60)),
    ])
    assert verdicts(results) == [
        (Verdict.RESTART, ""),
        (Verdict.RESTART, ""),  # no limit of its own
        (Verdict.SKIP, "fleet rate limit: 2 restarts in the last 1h (limit 2)"),
        (Verdict.RESTART, ""),
        (Verdict.SKIP, "fleet rate limit: 3 restarts in the last 1m (limit 2)"),
        (Verdict.RESTART, ""),
    ]


async def test_a_batch_decides_as_its_claims_would_one_by_one(ledger_url: str) -> None:
    """A mix of everything (orphans, retries, limits, repeats) in one batch, then the same
    claims on the same ledger state one batch each: the same decisions, the same rows."""
    limit = RateLimit(3, HOUR)
    claims = [
        (message("m1", "a"), T0, None, False),
        (message("m2", "a"), T0 + 1, None, False),
        (message("m3", "orphaned"), T0, None, False),
        (message("m4", "orphaned"), T0 + 1, None, False),
        (message("m5", "orphaned-2"), T0, None, True),
        (message("m6", "orphaned-2"), T0, limit, True),
        (message("m-failed", "b"), T0, limit, False),
        (message("m-failed", "b"), T0, limit, False),
        (message("m-restarted", "c"), T0, None, False),
        (message("m7", "c"), T0, limit, False),
        (message("m8", "d"), T0, limit, False),
        (message("m9", "e"), T0, limit, False),
        (message("m-orphan", "orphaned"), T0 + 2, None, False),
    ]

    async def prepare(ledger: SQLLedger) -> None:
        # A claim by a daemon that never heartbeated on each of two hosts (orphans).
        def orphans(cur: Any) -> None:
            for host in ("orphaned", "orphaned-2"):
                sql.insert(cur, ledger._dialect, "s", message("m-orphan", host), T0 - HOUR,
                           Outcome.RESTARTING, "", owner="ghost")
        await ledger._batcher.submit(orphans)
        failed = await ledger.claim(message("m-failed", "b"), T0 - 3 * HOUR, 0)
        assert failed.restart_id is not None
        await ledger.finish(failed.restart_id, T0 - 3 * HOUR, Outcome.FAILED, "exit 1")
        done = await ledger.claim(message("m-restarted", "c"), T0 - 3 * HOUR, 0)
        assert done.restart_id is not None
        await ledger.finish(done.restart_id, T0 - 3 * HOUR, Outcome.RESTARTED, "")

    def call(ledger: SQLLedger, args: Any) -> Callable[[], Awaitable[Claim]]:
        msg, now, rate_limit, retry_unknown = args
        return lambda: ledger.claim(msg, now, HOUR, rate_limit, retry_unknown=retry_unknown)

    async def rows(ledger: SQLLedger) -> list[tuple[Any, ...]]:
        history = await ledger.history(limit=1000)
        return sorted((h.message_id, h.hostname, h.outcome, h.detail, h.decided_at,
                       h.finished_at) for h in history)

    def clear(cur: Any) -> None:
        cur.execute("DELETE FROM restarts")

    async with held_ledger(ledger_url, subscription="s") as (ledger, held):
        await prepare(ledger)
        together = await one_batch(ledger, held, [call(ledger, args) for args in claims])
        together_rows = await rows(ledger)
        # The same again, one batch each.
        await ledger._batcher.submit(clear)
        await prepare(ledger)
        one_by_one = [await call(ledger, args)() for args in claims]
        one_by_one_rows = await rows(ledger)

    assert verdicts(together) == verdicts(one_by_one)
    assert [c.decision.failures for c in together] == [c.decision.failures for c in one_by_one]
    assert [c.restart_id is None for c in together] == [c.restart_id is None for c in one_by_one]
    assert together_rows == one_by_one_rows
    assert {v for v, _ in verdicts(together)} == {
        Verdict.RESTART, Verdict.BUSY, Verdict.SKIP, Verdict.DUPLICATE
    }
    assert (Verdict.DUPLICATE, UNKNOWN_REASON) in verdicts(together)


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

    await ledger._batcher.submit(create)


async def test_a_failing_item_fails_alone(
    ledger_and_db: tuple[SQLLedger, HeldDatabase], ledger_url: str
) -> None:
    ledger, held = ledger_and_db
    await add_poison(ledger, ledger_url)
    claimed = [await ledger.claim(message(f"f{i}", f"f{i}"), T0, WEEK) for i in range(3)]
    ids = [c.restart_id for c in claimed if c.restart_id is not None]
    assert len(ids) == 3

    results = await one_batch(ledger, held, [
        lambda: ledger.save(message("m1"), T0),
        lambda: ledger.save(message("poison-1"), T0),
        lambda: ledger.dead_letter(delivery("m2"), T0, "bad"),
        lambda: ledger.claim(message("m1"), T0, WEEK),
        lambda: ledger.claim(message("poison-1", "db-1"), T0, WEEK),
        lambda: ledger.claim(message("m3"), T0, WEEK),  # sees m1's claim
        lambda: ledger.claim(message("m4", "db-1"), T0, WEEK),  # not the poisoned one's
        lambda: ledger.finish(ids[0], T0 + 1, Outcome.RESTARTED, "ok"),
        lambda: ledger.finish(ids[1], T0 + 1, Outcome.FAILED, "poison"),
        lambda: ledger.finish(ids[2], T0 + 1, Outcome.FAILED, "exit 1"),
    ])

    saves = results[:3]
    assert saves[0] is None
    assert saves[2] is None
    assert isinstance(saves[1], LedgerError)
    assert "poisoned" in str(saves[1])
    claims = results[3:7]
    assert isinstance(claims[1], LedgerError)
    assert "poisoned" in str(claims[1])
    assert verdicts([claims[0], claims[2], claims[3]]) == [
        (Verdict.RESTART, ""),
        (Verdict.BUSY, "host is being restarted (message m1); waiting for it"),
        (Verdict.RESTART, ""),
    ]
    finishes = results[7:]
    assert finishes[0] is None
    assert finishes[2] is None
    assert isinstance(finishes[1], LedgerError)
    assert "poisoned" in str(finishes[1])

    saved = await ledger.saved_messages()
    assert sorted((s.message_id, s.status) for s in saved) == [
        ("blocker", "received"), ("m1", "received"), ("m2", "dead_letter")
    ]
    outcomes = {(h.message_id, h.outcome) for h in await ledger.history()}
    assert outcomes == {
        ("f0", "restarted"), ("f1", "restarting"), ("f2", "failed"),
        ("m1", "restarting"), ("m4", "restarting"),
    }


async def test_saves_and_dead_letters_of_one_message_in_one_batch(
    ledger_and_db: tuple[SQLLedger, HeldDatabase],
) -> None:
    ledger, held = ledger_and_db
    await one_batch(ledger, held, [
        lambda: ledger.save(message("m2"), T0),
        lambda: ledger.dead_letter(delivery("m2"), T0 + 1, "too many failed restarts"),
        lambda: ledger.save(message("m2"), T0 + 2),  # a redelivery: stays a dead letter
        lambda: ledger.dead_letter(delivery("m1"), T0, "bad"),
        lambda: ledger.save(message("m1"), T0 + 1),
    ])
    saved = {s.message_id: s for s in await ledger.saved_messages(status="dead_letter")}
    assert {k: (s.status, s.reason, s.first_seen, s.hostname) for k, s in saved.items()} == {
        "m1": ("dead_letter", "bad", T0, None),
        "m2": ("dead_letter", "too many failed restarts", T0, "web-1.example.net"),
    }
    assert await ledger.counts() == {
        "messages_dead_letter": 2,
        "deliveries_dead_letter": 5,
        "messages_received": 1,  # one_batch's blocker
        "deliveries_received": 1,
    }


async def test_finish_is_queued_when_called(
    ledger_and_db: tuple[SQLLedger, HeldDatabase],
) -> None:
    ledger, _ = ledger_and_db
    claim = await ledger.claim(message("m1"), T0, WEEK)
    assert claim.restart_id is not None
    finished = ledger.finish(claim.restart_id, T0 + 1, Outcome.RESTARTED, "ok")
    await ledger.drain()  # committed without being awaited
    ((_, outcome),) = [(h.message_id, h.outcome) for h in await ledger.history()]
    assert outcome == "restarted"
    # Awaited after its batch: returns at once (no checkpoint, so even when cancelled).
    with anyio.CancelScope() as scope:
        scope.cancel()
        await finished
    assert not scope.cancelled_caught


async def test_finish_awaited_before_its_batch_waits_for_it(
    ledger_and_db: tuple[SQLLedger, HeldDatabase],
) -> None:
    ledger, held = ledger_and_db
    claim = await ledger.claim(message("m1"), T0, WEEK)
    restart_id = claim.restart_id
    assert restart_id is not None
    (result,) = await one_batch(ledger, held, [
        lambda: ledger.finish(restart_id, T0 + 1, Outcome.FAILED, "exit 1"),
    ])
    assert result is None
    assert [h.outcome for h in await ledger.history()] == ["failed"]


async def test_an_outcome_counts_for_a_claim_queued_after_it_in_the_same_batch(
    ledger_and_db: tuple[SQLLedger, HeldDatabase],
) -> None:
    # The batch's claims op is opened (by another host's claim) before the outcome comes:
    # the outcome must still be written before the claims run, or the host reads as busy.
    ledger, held = ledger_and_db
    claim = await ledger.claim(message("m1", "web-1"), T0, WEEK)
    restart_id = claim.restart_id
    assert restart_id is not None
    _, _, later = await one_batch(ledger, held, [
        lambda: ledger.claim(message("m9", "web-9"), T0 + 1, WEEK),
        lambda: ledger.finish(restart_id, T0 + 1, Outcome.RESTARTED, "ok"),
        lambda: ledger.claim(message("m2", "web-1"), T0 + 2, WEEK),
    ])
    assert later.decision.verdict is Verdict.SKIP, later  # restarted just now, not busy


async def test_finish_with_a_journal(durable_url: str, tmp_path: Path) -> None:
    journal = OutcomeJournal(tmp_path / "outcomes.jsonl", "ledger-a")
    async with held_ledger(durable_url, journal=journal) as (ledger, _):
        await add_poison(ledger, durable_url)
        claims = [await ledger.claim(message(f"m{i}", f"h{i}"), T0, WEEK) for i in range(2)]
        ids = [c.restart_id for c in claims if c.restart_id is not None]
        ok = ledger.finish(ids[0], T0 + 1, Outcome.RESTARTED, "")
        kept = ledger.finish(ids[1], T0 + 1, Outcome.FAILED, "poison")
        await ledger.drain()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await ok  # committed: returns at once
        assert not scope.cancelled_caught
        await kept  # the ledger refused it: kept in the journal
        assert [e.restart_id for e in await journal.entries()] == [ids[1]]


def test_claims_lock_the_fleet_then_their_hosts_in_name_order() -> None:
    """The global lock order (see mandrill.ledger.postgres) inside one gathered claim op."""
    locked: list[list[str]] = []
    dialect = dataclasses.replace(
        SQLITE, lock_hosts=lambda cur, hosts: locked.append(list(hosts))
    )
    owner = claims.Owner("me", "s", T0 - HOUR)
    requests = [
        claims.ClaimRequest(owner, message("m1", "web-2"), T0, WEEK, None, False),
        claims.ClaimRequest(owner, message("m2", "web-1"), T0, WEEK, RateLimit(5, HOUR), False),
        claims.ClaimRequest(owner, message("m3", "web-2"), T0, WEEK, None, False),
    ]
    db = SQLiteDatabase(":memory:")
    try:
        decided = db.run_query(lambda cur: claims.claim_many(cur, dialect, requests))
    finally:
        db.close()
    assert [c.decision.verdict for c in decided] == [
        Verdict.RESTART, Verdict.RESTART, Verdict.BUSY
    ]
    assert locked == [[claims.FLEET_LOCK, "web-1.example.net", "web-2.example.net"]]


async def test_a_batch_orders_its_gathered_ops_by_their_first_lock(
    ledger_and_db: tuple[SQLLedger, HeldDatabase],
) -> None:
    ledger, held = ledger_and_db
    claim = await ledger.claim(message("m0", "db-9"), T0, WEEK)
    assert claim.restart_id is not None
    restart_id = claim.restart_id
    await one_batch(ledger, held, [
        lambda: ledger.save(message("m2", "web-2"), T0),
        lambda: ledger.claim(message("m2", "web-2"), T0, WEEK),
        lambda: ledger.dead_letter(delivery("m1"), T0, "bad"),
        lambda: ledger.claim(message("m1", "web-1"), T0, WEEK, RateLimit(5, HOUR)),
        lambda: ledger.finish(restart_id, T0, Outcome.RESTARTED, ""),
    ])
    # The fleet lock, then hosts, then message rows; finishes lock no name.
    assert sorted(held.keys[-1]) == ["", "*fleet*host:web-1.example.net", "message:m1"]
