"""Claims owned by daemon instances: a claim whose owner stops heartbeating is resolved as
``unknown`` by another daemon; a daemon's own claim that no task of it holds is resolved by
its own sweep; a daemon that stops resolves its open claims itself; messages are keyed by
subscription. Two ledgers on one database stand for two daemons, each with a clock of its
own that the test moves (see ``tests.ledger``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger import SQLLedger
from mandrill.policy import UNKNOWN_DETAIL, Outcome, Reason, Rules, Verdict
from tests.ledger import (
    T0,
    WEEK,
    Clock,
    decide_one,
    finish,
    message,
    running,
    verdict,
)

TIMEOUT = 30.0


@asynccontextmanager
async def daemon(
    url: str,
    clock: Clock | Any,
    *,
    subscription: str = "projects/p/subscriptions/s",
    instance_timeout: float = TIMEOUT,
) -> AsyncIterator[SQLLedger]:
    """A ledger with its heartbeat running, like one daemon's."""
    async with running(url, clock, subscription=subscription,
                       instance_timeout=instance_timeout) as ledger:
        yield ledger


async def test_a_silent_daemons_claim_is_resolved_as_unknown(durable_url: str) -> None:
    dead, alive = Clock(), Clock()
    async with daemon(durable_url, dead) as a, daemon(durable_url, alive) as b:
        first = await decide_one(a, message("m1"))
        assert verdict(first)[0] is Verdict.RESTART
        # Within the bound, the claim holds: the message and its host wait (a is silent).
        alive.now = T0 + TIMEOUT - 1
        assert verdict(await decide_one(b, message("m1")))[0] is Verdict.BUSY
        assert verdict(await decide_one(b, message("m2")))[0] is Verdict.BUSY

        # a stops heartbeating (its clock stands still: its last heartbeat ages); b goes on.
        alive.now = T0 + TIMEOUT + 1
        await b._beat()
        again = await decide_one(b, message("m1"))
        assert verdict(again) == (Verdict.DUPLICATE, UNKNOWN_DETAIL)
        (row,) = await b.history()
        assert (row.outcome, row.finished_at) == ("unknown", alive.now)
        assert row.detail == (
            f"daemon {a.instance.instance_id} (last seen 31s ago) stopped mid-restart;"
            " the restart may or may not have happened"
        )
        # It counts as a restart of the host: never restart a host twice.
        other = await decide_one(b, message("m2"))
        assert verdict(other) == (Verdict.SKIP, "host restarted 31s ago")

        # The silent daemon was only paused: its real outcome replaces the guess.
        dead.now = T0 + 40
        await finish(a, first, Outcome.RESTARTED, "exit 0")
        assert [(h.message_id, h.outcome) for h in await b.history()] == [
            ("m2", "skipped"),
            ("m1", "restarted"),
        ]


async def test_an_operator_can_retry_hosts_whose_restart_is_unknown(durable_url: str) -> None:
    dead, alive = Clock(), Clock(T0 + TIMEOUT + 1)
    retrying = Rules(WEEK, retry_unknown=True)
    async with daemon(durable_url, dead) as a, daemon(durable_url, alive) as b:
        orphan = await decide_one(a, message("m1"))
        other = await decide_one(b, message("m2"), rules=retrying)
        # The unknown restart does not count for the host; m1 is still undecided...
        assert verdict(other)[0] is Verdict.RESTART
        await finish(b, other, Outcome.FAILED, "exit 1")
        # ...and counts as one failed attempt of its own message.
        retried = await decide_one(b, message("m1"), rules=retrying)
        assert verdict(retried)[0] is Verdict.RESTART
        assert retried.claim is not None
        assert retried.claim.failures == 1
        await finish(b, retried, Outcome.RESTARTED)
        assert orphan.claim is not None
        a.owned.settled([orphan.claim])  # a's task is gone with its claim: b resolved it


async def test_a_stopping_daemon_resolves_its_own_open_claims(durable_url: str) -> None:
    # A daemon that stops with claims open (a restart interrupted after it began, a claim
    # never started) says what became of them: its peers need not wait for its heartbeat
    # to age, and need not guess. One that began is unknown (counted); one that never
    # began is cancelled (not counted: the next message restarts the host).
    clock = Clock()
    async with daemon(durable_url, clock) as a:
        began = await decide_one(a, message("m1", "web-1"))
        await decide_one(a, message("m2", "web-2"))
        assert began.claim is not None
        began.claim.began = True
    async with daemon(durable_url, clock) as b:
        rows = {h.message_id: (h.outcome, h.detail) for h in await b.history()}
        assert rows["m1"][0] == "unknown"
        assert "interrupted after it began (its daemon stopped)" in rows["m1"][1]
        assert rows["m2"][0] == "cancelled"
        assert "the restart never began" in rows["m2"][1]
        assert verdict(await decide_one(b, message("m1")))[0] is Verdict.DUPLICATE
        assert verdict(await decide_one(b, message("m3", "web-1")))[0] is Verdict.SKIP
        again = await decide_one(b, message("m2", "web-2"))
        assert verdict(again)[0] is Verdict.RESTART  # cancelled: decided anew
        await finish(b, again, Outcome.RESTARTED)


async def test_a_claim_no_task_holds_is_resolved_by_its_own_daemons_sweep(
    durable_url: str,
) -> None:
    # A decision committed whose caller never learnt it (a COMMIT's answer lost, a decider
    # cancelled mid-commit): the claim is this daemon's, alive, and nobody holds it. The
    # daemon's next sweep resolves it as cancelled (its restart never began), so that
    # neither its host nor its message waits for ever.
    clock = Clock()
    async with daemon(durable_url, clock, instance_timeout=0.3) as a:
        lost = await decide_one(a, message("m1"))
        assert lost.claim is not None
        a.owned.settled([lost.claim])  # as if its decision's answer never came
        with anyio.fail_after(10):
            # Polled: the sweep (every 50 ms here) tells nobody in-process.
            while [h.outcome for h in await a.history()] != ["cancelled"]:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        (row,) = await a.history()
        assert "the restart never began (its daemon lost track of the claim" in row.detail
        retried = await decide_one(a, message("m1"))
        assert verdict(retried)[0] is Verdict.RESTART
        # A claim that is held is left alone by the same sweeps.
        await anyio.sleep(0.2)
        assert [h.outcome for h in await a.history()] == ["restarting", "cancelled"]
        await finish(a, retried, Outcome.RESTARTED)


async def test_the_heartbeat_keeps_a_working_daemons_claim(durable_url: str) -> None:
    timeout = 0.3
    async with daemon(durable_url, time.time, instance_timeout=timeout) as a, \
            daemon(durable_url, time.time, instance_timeout=timeout) as b:
        claimed = await decide_one(a, message("m1"))
        # The passage of time is the point: without a's heartbeats (every 50 ms), its
        # claim would be taken for a dead daemon's five times over.
        await anyio.sleep(5 * timeout)
        busy = await decide_one(b, message("m1"))
        assert verdict(busy)[0] is Verdict.BUSY
        (row,) = await b.history()
        assert row.outcome == "restarting"
        await finish(a, claimed, Outcome.RESTARTED)


async def test_messages_are_keyed_by_subscription(durable_url: str) -> None:
    clock = Clock()
    async with daemon(durable_url, clock, subscription="projects/p/subscriptions/one") as a, \
            daemon(durable_url, clock, subscription="projects/p/subscriptions/two") as b:
        # Two messages that share an id, not one delivered twice.
        first = await decide_one(a, message("1", "web-1"))
        second = await decide_one(b, message("1", "web-2"))
        assert verdict(first)[0] is verdict(second)[0] is Verdict.RESTART
        saved = await a.saved_messages()
        assert sorted((s.message_id, s.hostname) for s in saved) == [
            ("1", "web-1.example.net"),
            ("1", "web-2.example.net"),
        ]
        assert (await a.counts())["deliveries_received"] == 2
        await finish(a, first, Outcome.RESTARTED)
        await finish(b, second, Outcome.RESTARTED)


async def test_any_daemons_heartbeat_resolves_orphans_without_a_message(
    durable_url: str,
) -> None:
    # No message for the host comes again: the record is right all the same.
    dead, alive = Clock(), Clock(T0 + 1)
    async with daemon(durable_url, dead, instance_timeout=0.3) as a, \
            daemon(durable_url, alive, instance_timeout=0.3) as b:
        orphan = await decide_one(a, message("m1"))
        with anyio.fail_after(10):
            # Polled: another daemon's heartbeat (every 50 ms here) tells nobody in-process.
            while [h.outcome for h in await b.history()] != ["unknown"]:
                alive.now += 0.05
                await anyio.sleep(0.02)
        (row,) = await b.history()
        assert row.detail.startswith(f"daemon {a.instance.instance_id}")
        assert orphan.claim is not None
        a.owned.settled([orphan.claim])


async def test_reasons_are_recorded_as_codes(durable_url: str) -> None:
    clock = Clock()
    async with daemon(durable_url, clock) as a:
        first = await decide_one(a, message("m1"))
        await finish(a, first, Outcome.RESTARTED)
        await decide_one(a, message("m2"))

        def reasons(cur: Any) -> list[tuple[str, str]]:
            cur.execute("SELECT message_id, reason FROM restarts ORDER BY id")
            return [tuple(row) for row in cur.fetchall()]

        assert await a._tx.query(reasons) == [("m1", ""), ("m2", Reason.INTERVAL.value)]


async def test_a_daemon_cut_off_itself_does_not_judge_its_peers_silence(durable_url: str) -> None:
    # An outage cut both daemons off the ledger for longer than the instance timeout (a
    # stalled server). The first to reach it again must not take the other, just as silent
    # through no fault of its own, for dead, and resolve its claims as unknown (counted:
    # their hosts never restarted): it judges only once it has been connected itself.
    clock = Clock()
    async with daemon(durable_url, clock) as a, daemon(durable_url, clock) as b:
        claimed = await decide_one(a, message("m1"))
        assert claimed.claim is not None
        clock.now = T0 + TIMEOUT + 5  # both silent since T0
        with pytest.raises(LedgerError, match="has not heartbeated"):
            await decide_one(b, message("m2"), beat=False)  # handed back, nothing judged
        await b._beat()  # b is back: its sweep leaves a's claim alone too
        assert [h.outcome for h in await b.history()] == ["restarting"]
        # a is back as well, just after: its claim stands, and its restart goes on.
        clock.now += 1
        await a._beat()
        assert verdict(await decide_one(b, message("m2"), beat=False))[0] is Verdict.BUSY
        await finish(a, claimed, Outcome.RESTARTED)

        # A peer that stays silent while b is connected is judged as before.
        other = await decide_one(a, message("m3", "web-3"))
        assert other.claim is not None
        clock.now += TIMEOUT + 1
        await b._beat()  # b connected at clock.now; a silent for the whole timeout
        clock.now += 1
        await b._beat()
        outcomes = {h.message_id: h.outcome for h in await b.history()}
        assert outcomes["m3"] == "unknown"
        a.owned.settled([other.claim])


async def test_a_daemon_cut_off_claims_nothing_until_it_has_heartbeated(durable_url: str) -> None:
    # Its decision reached the ledger only after an outage longer than half the timeout (a
    # stalled connection, a paused process): claims made now would be orphans at birth, for
    # a peer to resolve as unknown (counted, never begun). It claims nothing until its
    # heartbeat says it is alive; the messages come back, and are decided then.
    clock = Clock()
    async with daemon(durable_url, clock) as a:
        clock.now = T0 + TIMEOUT / 2 + 1
        with pytest.raises(LedgerError, match="has not heartbeated"):
            await decide_one(a, message("m1"), beat=False)
        assert await a.history() == []
        await a._beat()
        claimed = await decide_one(a, message("m1"))
        assert verdict(claimed)[0] is Verdict.RESTART
        await finish(a, claimed, Outcome.RESTARTED)
