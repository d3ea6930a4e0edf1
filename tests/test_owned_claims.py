"""Every claim has an owner: the faults that stranded or doubled a restart, end to end
through serve() (the real broker, real ledgers, a scripted restarter), on both backends.

Each test reproduces one finding of the issue "every claim has an owner"; the fault
doubles for PostgreSQL (a COMMIT's lost answer, a stall) are in ``tests/support/pg_proxy``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger import SQLLedger, open_ledger
from mandrill.policy import DEFER_SECONDS
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.shutdown import Shutdown
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import WorkerSettings
from tests.support.fakes import ScriptedRestarter, payloads
from tests.support.pg_proxy import PostgresFaultProxy

DAY = 86400.0


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SQLLedger]:
    ledger = await open_ledger(str(tmp_path / "ledger.db"))
    yield ledger
    await ledger.aclose()


def daemon(
    broker: MemoryBroker, ledger: Any, restarter: Any, *, shutdown: Shutdown | None = None,
    worker: WorkerSettings | None = None, **settings: Any,
) -> partial[Any]:
    """serve() as one daemon of a test, to start in a task group or await."""
    return partial(
        serve,
        ServiceSettings(handle_signals=False, **settings),
        worker or WorkerSettings(),
        Parts(broker, ledger, restarter),
        shutdown=shutdown,
    )


async def test_a_restart_interrupted_by_shutdown_counts_as_unknown(ledger: SQLLedger) -> None:
    # SIGTERM while a restart outlasts --grace: the restart began, so it may have happened.
    # Counted as one (as for a daemon SIGKILLed at the same point), the host is not
    # restarted again within its interval: before, the outcome was 'cancelled', which the
    # interval rule read as "did not happen", and the redelivery restarted the host again.
    broker = MemoryBroker(ack_deadline=600)
    await broker.publish(payloads("db-1"))
    interrupted = ScriptedRestarter(block=["db-1"])
    shutdown = Shutdown()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon(broker, ledger, interrupted, shutdown=shutdown, grace=0.05))
            await interrupted.started.wait()
            shutdown.request("SIGTERM")
    (row,) = await ledger.history(hostname="db-1.example.net")
    assert row.outcome == "unknown"
    assert "interrupted" in row.detail

    # Another request for the host, to the next daemon: within the interval, skipped.
    await broker.publish(payloads("db-1"))
    later = ScriptedRestarter()
    with anyio.fail_after(20):
        await daemon(broker, ledger, later, stop_after=1)()
    assert later.calls["db-1"] == 0
    assert [row.outcome for row in await ledger.history(hostname="db-1.example.net")] == [
        "skipped", "unknown",
    ]


@pytest.mark.postgres
async def test_a_daemon_whose_clock_runs_ahead_keeps_its_peers_claims(postgres_url: str) -> None:
    # Two daemons on one PostgreSQL ledger; b's clock runs 28 s ahead (of a 30 s instance
    # timeout, scaled down here to 3 s). The fleet's liveness is judged on the database's
    # clock: b must not take a's running restart for a dead daemon's. Before, b compared
    # a's heartbeats (a's clock) with its own clock, and resolved the claim as 'unknown'.
    timeout = 3.0

    def ahead() -> float:
        return time.time() + 0.93 * timeout

    a_ledger = await open_ledger(postgres_url, instance_timeout=timeout)
    b_ledger = await open_ledger(postgres_url, instance_timeout=timeout, clock=ahead)
    broker = MemoryBroker(ack_deadline=600)
    await broker.publish(payloads("db-1"))
    restarting = ScriptedRestarter(block=["db-1"])
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon(broker, a_ledger, restarting, max_in_flight=1))
                await restarting.started.wait()
                tg.start_soon(daemon(
                    broker, b_ledger, ScriptedRestarter(),
                    worker=WorkerSettings(wall_clock=ahead),
                ))
                # The passage of time is the point: b's heartbeat sweeps every timeout / 6.
                await anyio.sleep(2 * timeout)
                (row,) = await a_ledger.history(hostname="db-1.example.net")
                assert row.outcome == "restarting", row.detail
                tg.cancel_scope.cancel()
    finally:
        await a_ledger.aclose()
        await b_ledger.aclose()


class QuickDeferrals(MemoryBroker):
    """The real broker, where a message handed back for later (10 s: its host is busy,
    or the ledger could not decide) comes back after a tenth of a second instead: the
    tests below wait for what happens when it comes back, not for the pause."""

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        quick = 0.1 if seconds == DEFER_SECONDS else seconds
        await super().modify_ack_deadline(ack_ids, quick)


CLAIMS = "INSERT INTO restarts"  # the transaction that claims restarts


@pytest.mark.postgres
async def test_a_forced_stop_while_claims_commit_strands_no_host(postgres_url: str) -> None:
    # A second signal while the claims' transaction is in flight: the claims commit after
    # their workers are cancelled. Before, they stayed 'restarting', the messages were
    # nacked, and the next daemon took the redeliveries for restarts of unknown outcome,
    # counted as done: the hosts were never restarted. Now the stopping daemon resolves
    # claims that never began as cancelled, and the next daemon restarts the hosts.
    hosts = ("web-1", "web-2", "web-3")
    broker = MemoryBroker(ack_deadline=600)
    await broker.publish(payloads(*hosts))
    first, second = ScriptedRestarter(), ScriptedRestarter()
    with PostgresFaultProxy().running() as proxy:
        ledger = await open_ledger(proxy.url(postgres_url))
        held = proxy.hold_commit(match=CLAIMS)
        shutdown = Shutdown()
        try:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(daemon(broker, ledger, first, shutdown=shutdown))
                    await held.wait_fired()
                    shutdown.force("SIGTERM, twice")
                    await anyio.lowlevel.checkpoint()
                    held.release()
        finally:
            await ledger.aclose()
    ledger = await open_ledger(postgres_url)
    try:
        with anyio.fail_after(30):
            await daemon(broker, ledger, second, stop_after=len(hosts))()
        history = await ledger.history()
    finally:
        await ledger.aclose()
    assert sum(first.calls.values()) == 0
    assert second.calls == {host: 1 for host in hosts}
    assert sorted(row.outcome for row in history) == ["cancelled"] * 3 + ["restarted"] * 3


@pytest.mark.postgres
async def test_a_lost_commit_answer_does_not_block_the_host(postgres_url: str) -> None:
    # The claim's COMMIT reaches PostgreSQL; the connection drops before its answer. The
    # daemon takes the decision for not written and hands the message back, but the claim
    # is committed, under its own name. Before, it stayed 'restarting' for as long as the
    # daemon lived, and every message for the host waited for it; now the daemon finds
    # the claim that no task of it holds and resolves it (cancelled: it never began).
    broker = QuickDeferrals(ack_deadline=600)
    await broker.publish(payloads("web-1"))
    restarter = ScriptedRestarter()
    with PostgresFaultProxy().running() as proxy:
        ledger = await open_ledger(proxy.url(postgres_url), instance_timeout=1.2)
        lost = proxy.drop_commit_answer(match=CLAIMS)
        try:
            with anyio.fail_after(30):
                await daemon(broker, ledger, restarter, stop_after=1)()
            assert lost.fired.is_set()
            history = await ledger.history()
        finally:
            await ledger.aclose()
    assert restarter.calls == {"web-1": 1}
    assert [row.outcome for row in history] == ["restarted", "cancelled"]


@pytest.mark.postgres
async def test_a_ledger_that_stops_answering_is_an_outage(postgres_url: str) -> None:
    # A frozen server: bytes held, TCP up. Before, nothing noticed: no log line, the
    # ledger reported healthy, the outage limit never fired. Now a transaction that does
    # not answer within twice the statement timeout (1 s here) is an outage: not ready,
    # and the daemon stops (exit 1) past the outage limit, nothing acked meanwhile.
    broker = MemoryBroker(ack_deadline=600)
    with PostgresFaultProxy().running() as proxy:
        url = proxy.url(postgres_url) + "&options=-cstatement_timeout%3D1s"
        ledger = await open_ledger(url, instance_timeout=1.2, outage_limit=3)

        async def stall_while_serving() -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(daemon(broker, ledger, ScriptedRestarter()))
                proxy.stall()
                await broker.publish(payloads("web-1"))
                while ledger.healthy():  # noqa: ASYNC110 - the ledger has no event for it
                    await anyio.sleep(0.05)
                assert "answer" in (ledger.problem() or "")
                assert broker.stats.acked == 0
                await anyio.sleep_forever()  # serve() must end this, by raising

        try:
            with pytest.raises(BaseExceptionGroup) as stopped, anyio.fail_after(30):
                await stall_while_serving()
        finally:
            proxy.reset()
            await ledger.aclose()
    assert stopped.group_contains(LedgerError, match="ledger unavailable", depth=None)
    assert broker.stats.acked == 0
