"""The fleet's restart-storm breaker, in the ledger: it opens when too many restarts failed
(or ended unknown) within its window, fleet-wide; while open, every daemon's restarts are
deferred (configured for the breaker or not); ``resume`` closes it, with who and when, and
what was counted before does not open it again. Against SQLite (memory, file) and
PostgreSQL; two daemons on one SQLite file or one PostgreSQL schema."""

from __future__ import annotations

import pytest

from mandrill.ledger import SQLLedger
from mandrill.ledger.base import Decided
from mandrill.policy import BreakerRule, Outcome, Reason, Rules, Verdict, settlement_for
from mandrill.policy import Settlement as S
from tests.ledger import HOUR, T0, WEEK, Clock, decide_one, finish, message, running

#: At most 2 failures in an hour.
FAILURES = Rules(WEEK, breaker=BreakerRule(2, None, HOUR))
#: At most 1 unknown outcome in an hour.
UNKNOWN = Rules(WEEK, breaker=BreakerRule(None, 1, HOUR))


async def restart_ending(
    ledger: SQLLedger, name: str, outcome: Outcome, rules: Rules
) -> None:
    """A restart of host ``name`` (message ``name``), claimed and ended with ``outcome``."""
    decided = await decide_one(ledger, message(name, name), rules)
    assert decided.decision is not None
    assert decided.decision.verdict is Verdict.RESTART, decided.decision
    await finish(ledger, decided, outcome)


def held_by_breaker(decided: Decided) -> bool:
    decision = decided.decision
    assert decision is not None, decided.error
    if decision.reason is not Reason.BREAKER_OPEN:
        return False
    assert decision.verdict is Verdict.BUSY
    assert settlement_for(decision) is S.DEFER  # deferred, not acked: it comes back
    assert decided.claim is None
    return True


async def test_failures_within_the_window_open_it(ledger_url: str) -> None:
    clock = Clock(T0 - 2 * HOUR)
    async with running(ledger_url, clock) as ledger:
        await restart_ending(ledger, "old", Outcome.FAILED, FAILURES)  # outside the window
        clock.now = T0 - HOUR / 2
        await restart_ending(ledger, "a", Outcome.FAILED, FAILURES)
        await restart_ending(ledger, "b", Outcome.FAILED, FAILURES)
        await restart_ending(ledger, "c", Outcome.RESTARTED, FAILURES)
        await restart_ending(ledger, "d", Outcome.DRY_RUN, FAILURES)
        clock.now = T0
        # Three failures, but one of them over an hour ago: two in the window, the limit.
        assert ledger.breaker() is None
        await restart_ending(ledger, "e", Outcome.FAILED, FAILURES)
        assert ledger.breaker_opened() is None

        # The third failure within the hour: the next claim opens the breaker.
        clock.now = T0 + 1
        held = await decide_one(ledger, message("m1", "f"), FAILURES)
        assert held_by_breaker(held)
        opened = ledger.breaker_opened()
        assert opened is not None
        assert opened.why == "3 restarts failed in the last 1h (limit 2)"
        assert (opened.opened_at, opened.opened_by) == (T0 + 1, ledger.instance.instance_id)
        assert ledger.breaker() == opened
        assert await ledger.breaker_status() == opened
        assert held.decision is not None
        assert held.decision.detail == (
            "restart-storm breaker open since 2027-01-15T08:00:01+00:00: 3 restarts failed"
            " in the last 1h (limit 2); restarts wait for `mandrill resume`"
        )
        # Nothing recorded for the message: it is decided again when it comes back.
        assert {h.message_id for h in await ledger.history()} == {"old", "a", "b", "c", "d", "e"}

        # It stays open however long, until resumed; announced once.
        clock.now = T0 + WEEK
        assert held_by_breaker(await decide_one(ledger, message("m1", "f"), FAILURES))
        assert ledger.breaker_opened() is None
        # What is no restart goes on as before: a duplicate is still a duplicate.
        again = await decide_one(ledger, message("c", "c"), FAILURES)
        assert again.decision is not None
        assert again.decision.verdict is Verdict.DUPLICATE


async def test_unknown_outcomes_open_it(ledger_url: str) -> None:
    clock = Clock()
    async with running(ledger_url, clock) as ledger:
        for name in ("a", "b", "c"):
            await restart_ending(ledger, name, Outcome.FAILED, UNKNOWN)  # not counted
        await restart_ending(ledger, "d", Outcome.UNKNOWN, UNKNOWN)
        clock.now += HOUR + 1  # d's end leaves the window
        await restart_ending(ledger, "e", Outcome.UNKNOWN, UNKNOWN)
        assert ledger.breaker() is None
        clock.now += 1
        await restart_ending(ledger, "f", Outcome.UNKNOWN, UNKNOWN)

        assert held_by_breaker(await decide_one(ledger, message("m1", "g"), UNKNOWN))
        opened = ledger.breaker_opened()
        assert opened is not None
        assert opened.why == (
            "2 restarts ended with an unknown outcome in the last 1h (limit 1)"
        )


async def test_a_limit_of_zero_opens_at_the_first_failure(ledger_url: str) -> None:
    rules = Rules(WEEK, breaker=BreakerRule(0, 0, HOUR))
    async with running(ledger_url, Clock()) as ledger:
        await restart_ending(ledger, "a", Outcome.FAILED, rules)
        assert held_by_breaker(await decide_one(ledger, message("m1", "b"), rules))


async def test_it_holds_every_daemon_until_resumed(durable_url: str) -> None:
    """Two daemons on one ledger: the one whose decision opened it announces it; the other,
    with the breaker's settings or without, defers its restarts too, and sees it open at
    its heartbeat; ``resume`` closes it for both, with who and when."""
    clock = Clock()
    async with running(durable_url, clock) as a, running(durable_url, clock) as b:
        for name in ("x", "y"):
            await restart_ending(a, name, Outcome.FAILED, FAILURES)
        await restart_ending(b, "z", Outcome.FAILED, FAILURES)  # the fleet's third

        clock.now += 1
        assert held_by_breaker(await decide_one(a, message("m1", "h1"), FAILURES))
        opened = a.breaker_opened()
        assert opened is not None
        assert opened.opened_by == a.instance.instance_id
        assert opened.why == "3 restarts failed in the last 1h (limit 2)"

        assert b.breaker() is None  # not read yet
        await b._beat()  # its heartbeat reads it (for mandrill_breaker_open)
        assert b.breaker() == opened
        # b decides under the breaker's rule, and under none: held back either way, and
        # only a announced it.
        for rules in (FAILURES, Rules(WEEK)):
            assert held_by_breaker(await decide_one(b, message("m2", "h2"), rules))
            assert b.breaker_opened() is None
        assert held_by_breaker(await decide_one(a, message("m1", "h1"), FAILURES))

        clock.now += 60
        closed = await b.resume("alice")
        assert closed is not None
        assert (closed.id, closed.closed_at, closed.closed_by) == (opened.id, clock.now, "alice")
        assert await a.breaker_status() is None
        assert await b.resume("bob") is None  # not open: nothing to close

        # Both restart again; the failures counted before the resume do not count again.
        clock.now += 1
        for ledger, name in ((a, "m1"), (b, "m2")):
            decided = await decide_one(ledger, message(name, "h" + name[1]), FAILURES)
            assert decided.decision is not None
            assert decided.decision.verdict is Verdict.RESTART
            await finish(ledger, decided, Outcome.FAILED)
        assert a.breaker() is None
        assert a.breaker_opened() is None
        assert b.breaker_opened() is None

        # Failures after the resume count: one more, and it opens again (a new row).
        await restart_ending(b, "w", Outcome.FAILED, FAILURES)
        assert held_by_breaker(await decide_one(b, message("m3", "h3"), FAILURES))
        reopened = b.breaker_opened()
        assert reopened is not None
        assert reopened.id != opened.id
        assert reopened.opened_by == b.instance.instance_id


@pytest.mark.parametrize("kind", ["no breaker", "breaker"])
async def test_an_empty_ledger_has_no_breaker(ledger_url: str, kind: str) -> None:
    rules = FAILURES if kind == "breaker" else Rules(WEEK)
    async with running(ledger_url, Clock()) as ledger:
        decided = await decide_one(ledger, message("m1"), rules)
        assert decided.decision is not None
        assert decided.decision.verdict is Verdict.RESTART
        assert ledger.breaker() is None
        assert await ledger.breaker_status() is None
        assert await ledger.resume("alice") is None
        await finish(ledger, decided, Outcome.RESTARTED)
