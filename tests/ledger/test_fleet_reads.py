"""The status page's reads (mandrill.ledger.fleet), on SQLite and PostgreSQL, through the
ledger's read connection."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from functools import partial

import anyio
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger import SQLLedger
from mandrill.ledger.base import DeadLetterRecord, Request
from mandrill.ledger.fleet import FleetView, fleet_view, host_facts
from mandrill.ledger.reader import Reads
from mandrill.message import Delivery
from mandrill.policy import Outcome, RateLimit, Reason, Refusal, Rules
from mandrill.version import version
from tests.ledger import HOUR, T0, WEEK, Clock, decide_one, delivery, finish, message, running


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(ledger_url: str, clock: Clock) -> AsyncIterator[SQLLedger]:
    async with running(ledger_url, clock, backend="trio") as opened:
        yield opened


RULES = Rules(WEEK, RateLimit(10, HOUR))


async def view(ledger: SQLLedger, rules: Rules = RULES) -> FleetView:
    return await ledger.read(lambda cur, d, now: fleet_view(cur, d, now, rules))


async def test_the_fleet_as_the_ledger_records_it(ledger: SQLLedger, clock: Clock) -> None:
    restarted = await decide_one(ledger, message("m1", "web-1"), RULES)
    await finish(ledger, restarted, Outcome.RESTARTED, "ok")
    clock.now = T0 + 60
    under_way = await decide_one(ledger, message("m2", "web-2"), RULES)
    assert under_way.claim is not None
    skipped = await ledger.decide(
        [Request(message("m3", "db-1"), Refusal(Reason.EXCLUDED, "host excluded by 'db-*'"))],
        RULES,
    )
    assert skipped[0].decision is not None
    clock.now = T0 + 120
    await decide_one(ledger, message("m4", "web-1"), RULES)  # a skip: the interval
    bad = Delivery("ack-x", "m5", b"<not json>", {}, T0)
    await ledger.dead_letter([DeadLetterRecord(bad, Reason.INVALID, "invalid: <not json>")])

    fleet = await view(ledger)

    assert fleet.now == T0 + 120
    (daemon,) = fleet.daemons
    assert daemon.instance_id == ledger.instance.instance_id
    assert (daemon.backend, daemon.version) == ("trio", version())
    assert daemon.state(fleet.now, 30) == "running"
    assert daemon.state(fleet.now + 31, 30) == "silent"
    (claim,) = fleet.under_way
    assert (claim.hostname, claim.message_id, claim.since) == ("web-2.example.net", "m2", T0 + 60)
    assert claim.owner == ledger.instance.instance_id
    assert not claim.orphaned(fleet.now, 30)
    # web-2's restart under way is not a restart yet; web-1's counts until a week is up.
    assert [(row.hostname, row.last_restart) for row in fleet.cooldown] == [
        ("web-1.example.net", T0)
    ]
    assert fleet.cooldown_total == 1
    assert [(row.message_id, row.outcome, row.reason) for row in fleet.decisions] == [
        ("m4", "skipped", "interval"),
        ("m3", "skipped", "excluded"),
        ("m2", "restarting", ""),
        ("m1", "restarted", ""),
    ]
    (letter,) = fleet.dead_letters
    assert (letter.message_id, letter.detail) == ("m5", "invalid: <not json>")
    assert fleet.fleet_restarts is not None
    assert (fleet.fleet_restarts.count, fleet.fleet_restarts.oldest) == (2, T0)


async def test_cooldown_ends_with_the_interval_and_unknown_counts_unless_retried(
    ledger: SQLLedger, clock: Clock
) -> None:
    await finish(ledger, await decide_one(ledger, message("m1", "a")), Outcome.RESTARTED)
    clock.now = T0 + HOUR
    await finish(ledger, await decide_one(ledger, message("m2", "b")), Outcome.UNKNOWN)
    assert [row.hostname for row in (await view(ledger)).cooldown] == [
        "b.example.net", "a.example.net"
    ]
    retrying = Rules(WEEK, retry_unknown=True)
    assert [row.hostname for row in (await view(ledger, retrying)).cooldown] == ["a.example.net"]
    clock.now = T0 + WEEK + 1
    assert [row.hostname for row in (await view(ledger)).cooldown] == ["b.example.net"]


async def test_host_facts_are_what_a_claim_would_find(ledger: SQLLedger, clock: Clock) -> None:
    await finish(ledger, await decide_one(ledger, message("m1", "a")), Outcome.RESTARTED)
    clock.now = T0 + 60
    claim = await decide_one(ledger, message("m2", "b"))
    read = partial(host_facts, rules=RULES, instance_timeout=30)
    a = await ledger.read(lambda cur, d, now: read(cur, d, now, "a.example.net"))
    b = await ledger.read(lambda cur, d, now: read(cur, d, now, "b.example.net"))
    assert (a.last_restart, a.under_way) == (T0, [])
    assert b.last_restart is None
    assert [(row.message_id, row.owner) for row in b.under_way] == [
        ("m2", ledger.instance.instance_id)
    ]
    assert claim.claim is not None
    # The rate limit's count: restarts begun within its window, under way included.
    assert b.fleet_restarts is not None
    assert (b.fleet_restarts.count, b.fleet_restarts.oldest) == (2, T0)


async def test_a_dead_daemons_claim_counts_as_the_next_claim_would_count_it(
    durable_url: str, clock: Clock
) -> None:
    async with running(durable_url, clock) as gone:
        claim = await decide_one(gone, message("m1", "a"))
        assert claim.claim is not None
        gone.owned.settled([claim.claim])  # its stop must not resolve it: it "dies"
        async with running(durable_url, clock) as alive:
            clock.now = T0 + 60  # past the instance timeout
            await alive._beat()
            facts = await alive.read(
                lambda cur, d, now: host_facts(cur, d, now, "a.example.net", RULES, 30)
            )
    (row,) = facts.under_way
    assert row.orphaned(T0 + 60, 30)
    assert facts.last_restart == T0


async def test_a_read_does_not_wait_for_the_message_paths_transactions(
    durable_url: str, clock: Clock
) -> None:
    """The status page reads on a connection of its own: a transaction that holds the
    message path's connection (here: its lock) does not hold the page up."""
    async with running(durable_url, clock) as ledger:
        await finish(ledger, await decide_one(ledger, message("m1", "a")), Outcome.RESTARTED)
        async with ledger._tx._lock:
            with anyio.fail_after(5):
                fleet = await view(ledger)
    assert [row.message_id for row in fleet.decisions] == ["m1"]


async def test_a_read_that_fails_is_a_ledger_error(ledger: SQLLedger) -> None:
    def broken(cur, d, now):
        cur.execute("SELECT no_such_column FROM restarts")

    with pytest.raises(LedgerError, match=r"ledger (read|query) failed: .*no_such_column"):
        await ledger.read(broken)
    # The connection is still usable (PostgreSQL: a fresh one).
    assert (await view(ledger)).decisions == []


async def test_a_dead_letter_is_listed_with_why(ledger: SQLLedger) -> None:
    await ledger.dead_letter([DeadLetterRecord(delivery("m9", "web-9"), Reason.MAX_ATTEMPTS,
                                               "failed 5 times")])
    (letter,) = (await view(ledger)).dead_letters
    assert (letter.message_id, letter.detail, letter.deliveries) == ("m9", "failed 5 times", 1)


async def test_a_read_that_hangs_fails_by_its_deadline_and_the_next_ones_say_why() -> None:
    release, finished = threading.Event(), threading.Event()

    class Hanging:
        def read(self, fn):
            try:
                release.wait(10)
                return fn(None)
            finally:
                finished.set()

        def close(self) -> None:
            pass

    reads = Reads(Hanging(), deadline=0.2)
    with pytest.raises(LedgerError, match=r"did not answer within 0\.2s"):
        await reads.run(lambda cur: 1)
    with pytest.raises(LedgerError, match="an earlier read is still waiting"):
        await reads.run(lambda cur: 1)
    release.set()
    # Once the abandoned read's thread has returned, the connection serves again.
    assert await anyio.to_thread.run_sync(finished.wait, 5)
    assert await reads.run(lambda cur: 2) == 2
