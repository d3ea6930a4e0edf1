"""Claims owned by daemon instances: a claim whose owner stops heartbeating is resolved as
``unknown`` by another daemon; messages are keyed by subscription. Two ledgers on one
database stand for two daemons, each with a wall clock of its own that the test moves."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from mandrill.ledger import SQLLedger, open_ledger
from mandrill.policy import UNKNOWN_REASON, Outcome, Verdict
from tests.ledger import T0, WEEK, message, writing

TIMEOUT = 30.0


@dataclass
class Clock:
    """A wall clock the test sets."""

    now: float = T0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def daemon(
    url: str,
    clock: Callable[[], float],
    *,
    subscription: str = "projects/p/subscriptions/s",
    instance_timeout: float = TIMEOUT,
) -> AsyncIterator[SQLLedger]:
    """A ledger with its writer (and heartbeat) running, like one daemon's."""
    ledger = await open_ledger(
        url, subscription=subscription, instance_timeout=instance_timeout, clock=clock
    )
    async with writing(ledger):
        yield ledger


async def test_a_silent_daemons_claim_is_resolved_as_unknown(durable_url: str) -> None:
    dead, alive = Clock(), Clock()
    async with daemon(durable_url, dead) as a, daemon(durable_url, alive) as b:
        first = await a.claim(message("m1"), T0, WEEK)
        assert first.decision.verdict is Verdict.RESTART
        # Within the bound, the claim holds: the message and its host wait.
        alive.now = T0 + TIMEOUT - 1
        assert (await b.claim(message("m1"), alive.now, WEEK)).decision.verdict is Verdict.BUSY
        assert (await b.claim(message("m2"), alive.now, WEEK)).decision.verdict is Verdict.BUSY

        # a stops heartbeating (its clock stands still: its last heartbeat ages).
        alive.now = T0 + TIMEOUT + 1
        again = await b.claim(message("m1"), alive.now, WEEK)
        assert (again.decision.verdict, again.decision.reason) == (
            Verdict.DUPLICATE,
            UNKNOWN_REASON,
        )
        (row,) = await b.history()
        assert (row.outcome, row.finished_at) == ("unknown", alive.now)
        assert row.detail == (
            f"daemon {a.instance.instance_id} (last seen 31s ago) stopped mid-restart;"
            " the restart may or may not have happened"
        )
        # It counts as a restart of the host: never restart a host twice.
        other = await b.claim(message("m2"), alive.now, WEEK)
        assert (other.decision.verdict, other.decision.reason) == (
            Verdict.SKIP,
            "host restarted 31s ago",
        )

        # The silent daemon was only paused: its real outcome replaces the guess.
        assert first.restart_id is not None
        await a.finish(first.restart_id, T0 + 40, Outcome.RESTARTED, "exit 0")
        assert [(h.message_id, h.outcome) for h in await b.history()] == [
            ("m2", "skipped"),
            ("m1", "restarted"),
        ]


async def test_an_operator_can_retry_hosts_whose_restart_is_unknown(durable_url: str) -> None:
    dead, alive = Clock(), Clock(T0 + TIMEOUT + 1)
    async with daemon(durable_url, dead) as a, daemon(durable_url, alive) as b:
        await a.claim(message("m1"), T0, WEEK)
        other = await b.claim(message("m2"), alive.now, WEEK, retry_unknown=True)
        # The unknown restart does not count for the host; m1 is still undecided...
        assert other.decision.verdict is Verdict.RESTART
        assert other.restart_id is not None
        await b.finish(other.restart_id, alive.now, Outcome.FAILED, "exit 1")
        # ...and counts as one failed attempt of its own message.
        retried = await b.claim(message("m1"), alive.now, WEEK, retry_unknown=True)
        assert (retried.decision.verdict, retried.decision.failures) == (Verdict.RESTART, 1)


async def test_a_stopped_daemons_claim_needs_no_timeout(durable_url: str) -> None:
    # A daemon that stops with a claim open (its outcome could not be recorded) says so:
    # the claim is resolved at once, not after the heartbeat bound.
    clock = Clock()
    async with daemon(durable_url, clock) as a:
        await a.claim(message("m1"), T0, WEEK)
    async with daemon(durable_url, clock) as b:
        again = await b.claim(message("m1"), T0 + 1, WEEK)
        assert again.decision.verdict is Verdict.DUPLICATE
        (row,) = await b.history()
        assert row.outcome == "unknown"


async def test_the_heartbeat_keeps_a_working_daemons_claim(durable_url: str) -> None:
    timeout = 0.3
    async with daemon(durable_url, time.time, instance_timeout=timeout) as a, \
            daemon(durable_url, time.time, instance_timeout=timeout) as b:
        await a.claim(message("m1"), time.time(), WEEK)
        # The passage of time is the point: without a's heartbeats (every 50 ms), its
        # claim would be taken for a dead daemon's five times over.
        await anyio.sleep(5 * timeout)
        busy = await b.claim(message("m1"), time.time(), WEEK)
        assert busy.decision.verdict is Verdict.BUSY
        (row,) = await b.history()
        assert row.outcome == "restarting"


async def test_messages_are_keyed_by_subscription(durable_url: str) -> None:
    clock = Clock()
    async with daemon(durable_url, clock, subscription="projects/p/subscriptions/one") as a, \
            daemon(durable_url, clock, subscription="projects/p/subscriptions/two") as b:
        await a.save(message("1", "web-1"), T0)
        await b.save(message("1", "web-2"), T0)
        # Two messages that share an id, not one delivered twice.
        assert (await a.claim(message("1", "web-1"), T0, WEEK)).decision.verdict is (
            Verdict.RESTART
        )
        assert (await b.claim(message("1", "web-2"), T0, WEEK)).decision.verdict is (
            Verdict.RESTART
        )
        saved = await a.saved_messages()
        assert sorted((s.message_id, s.hostname) for s in saved) == [
            ("1", "web-1.example.net"),
            ("1", "web-2.example.net"),
        ]
        assert (await a.counts())["deliveries_received"] == 2


async def test_any_daemons_heartbeat_resolves_orphans_without_a_message(
    durable_url: str,
) -> None:
    # No message for the host comes again: the record is right all the same.
    dead, alive = Clock(), Clock(T0 + 1)
    async with daemon(durable_url, dead, instance_timeout=0.3) as a, \
            daemon(durable_url, alive, instance_timeout=0.3) as b:
        await a.claim(message("m1"), T0, WEEK)
        with anyio.fail_after(10):
            # Polled: another daemon's heartbeat (every 50 ms here) tells nobody in-process.
            while [h.outcome for h in await b.history()] != ["unknown"]:  # noqa: ASYNC110
                await anyio.sleep(0.02)
