"""Every claim has an owner: the faults that stranded or doubled a restart, end to end
through serve() (the real broker, real ledgers, a scripted restarter), on both backends.

Each test reproduces one finding of the issue "every claim has an owner"; the fault
doubles for PostgreSQL (a COMMIT's lost answer, a stall) are in ``tests/support/pg_proxy``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from mandrill.ledger import SQLLedger, open_ledger
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.shutdown import Shutdown
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import WorkerSettings
from tests.support.fakes import ScriptedRestarter, payloads

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


@pytest.mark.xfail(strict=True, reason="issue 18, finding 4: a restart interrupted after it began is 'cancelled'")
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
@pytest.mark.xfail(strict=True, reason="issue 18, finding 3: each daemon compares heartbeats with its own clock")
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
