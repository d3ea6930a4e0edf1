"""The README's shutdown bounds, as a user meets them: ``mandrill run`` as a real process on
the emulator behind a proxy that stops answering settlement requests, on both backends.

    SIGTERM               -> exit within --grace + --settle-timeout + 1 s
    SIGTERM, SIGTERM      -> exit within --settle-timeout + 1 s after the second
    a part failing at start-up -> one line and a non-zero exit, never a hang
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import time

import anyio
import psycopg
import pytest

from tests.fixtures.emulator import PubSubEmulator, PubSubNames
from tests.support import daemon
from tests.support.fakes import payloads
from tests.support.holding_proxy import HoldingProxy
from tests.test_pubsub_service import prepare, publish

pytestmark = [pytest.mark.emulator, pytest.mark.slow]

GRACE = 1.0
SETTLE = 2.0
#: The README's promise on top of grace and settle timeout.
PROMISE = 1.0
SETTLEMENT = r":acknowledge|:modifyAckDeadline"


def run_args(names: PubSubNames, backend: str, tmp_path, grace: float) -> list[str]:
    return [
        "run", "--source", "pubsub", "--project", names.project,
        "--subscription", names.subscription, "--backend", backend,
        "--ledger", str(tmp_path / "ledger.db"), "--grace", f"{grace}s",
        "--settle-timeout", f"{SETTLE}s", "--restart-latency", "60s",
        "--restart-failure-rate", "0", "--max-in-flight", "4",
    ]


async def held_daemon(
    names: PubSubNames, backend: str, tmp_path, emulator: PubSubEmulator, proxy: HoldingProxy,
    *, grace: float,
) -> daemon.Daemon:
    """A daemon holding four messages mid-restart, with settlement no longer answered."""
    await prepare(names, backend)
    await publish(names, backend, payloads(*(f"held-{i}" for i in range(4))))
    process = await daemon.start(
        run_args(names, backend, tmp_path, grace), env={"PUBSUB_EMULATOR_HOST": proxy.address}
    )
    await process.wait_for_message("ready: consuming")
    await wait_until_held(tmp_path, 4)
    proxy.holding.set()
    return process


async def wait_until_held(tmp_path, count: int) -> None:
    """Until ``count`` restarts are under way (the simulated restarter logs nothing
    before it is done; the ledger says so at once)."""
    with anyio.fail_after(30):
        while True:
            try:
                with sqlite3.connect(tmp_path / "ledger.db") as conn:
                    (claims,) = conn.execute(
                        "SELECT COUNT(*) FROM restarts WHERE outcome = 'restarting'"
                    ).fetchone()
            except sqlite3.OperationalError:
                claims = 0
            if claims >= count:
                return
            await anyio.sleep(0.05)


async def test_sigterm_exits_within_grace_settle_and_one_second(
    pubsub_names, pubsub_emulator, backend_name, tmp_path
):
    with HoldingProxy(pubsub_emulator.host, SETTLEMENT).running() as proxy:
        process = await held_daemon(
            pubsub_names, backend_name, tmp_path, pubsub_emulator, proxy, grace=GRACE
        )
        sent = time.monotonic()
        process.signal(signal.SIGTERM)
        code = await process.finish(seconds=60)
        elapsed = time.monotonic() - sent
        assert proxy.held >= 1  # the final settlement was tried, and never answered
    assert code == 0
    assert elapsed <= GRACE + SETTLE + PROMISE, process.messages()[-5:]
    unsettled = [m for m in process.messages() if "not sent" in m]
    assert len(unsettled) == 1
    assert "4 settlements not sent" in unsettled[0]


async def test_a_second_signal_exits_within_settle_and_one_second(
    pubsub_names, pubsub_emulator, backend_name, tmp_path
):
    with HoldingProxy(pubsub_emulator.host, SETTLEMENT).running() as proxy:
        process = await held_daemon(
            pubsub_names, backend_name, tmp_path, pubsub_emulator, proxy, grace=3600
        )
        process.signal(signal.SIGTERM)
        await process.wait_for_message("stopped pulling")
        sent = time.monotonic()
        process.signal(signal.SIGTERM)
        code = await process.finish(seconds=60)
        elapsed = time.monotonic() - sent
    assert code == 0
    assert elapsed <= SETTLE + PROMISE, process.messages()[-5:]


async def test_a_part_failing_at_start_up_exits_with_one_line(backend_name, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        code, _, err = await daemon.run_to_end([
            "run", "--backend", backend_name, "--ledger", str(tmp_path / "l.db"),
            "--metrics-addr", f"127.0.0.1:{port}", "--log-format", "text",
        ], seconds=30)
    assert code == 2  # a setting that cannot work here, as a bad flag
    assert time.monotonic() - started < 10
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert f"--metrics-addr 127.0.0.1:{port}: cannot listen" in errors[0]
    assert "Traceback" not in err


@pytest.mark.postgres
async def test_a_forced_stop_is_not_held_by_a_hung_postgresql_ledger(
    postgres_url, backend_name, tmp_path
):
    # A lock held by a hung session and a long statement_timeout: every write waits. The
    # daemon must not wait for them (nor its interpreter for the thread stuck in one).
    url = f"{postgres_url}&options=-cstatement_timeout%3D600s"
    process = await daemon.start([
        "run", "--backend", backend_name, "--ledger", url, "--rate", "50",
        "--restart-latency", "0s", "--grace", "60s", "--settle-timeout", f"{SETTLE}s",
    ])
    await process.wait_for(lambda line: line.get("message", "").startswith("restarted "))
    schema = postgres_url.rsplit("schema=", 1)[1]
    with psycopg.connect(postgres_url.split("?", 1)[0]) as hung:
        hung.execute(f'LOCK TABLE "{schema}".restarts IN ACCESS EXCLUSIVE MODE')
        await anyio.sleep(0.5)  # let the daemon's writes pile up behind the lock
        process.signal(signal.SIGTERM)
        await process.wait_for_message("stopped pulling")
        sent = time.monotonic()
        process.signal(signal.SIGTERM)
        code = await process.finish(seconds=60)
        elapsed = time.monotonic() - sent
        hung.rollback()
    assert code == 0
    assert elapsed <= SETTLE + PROMISE, process.messages()[-5:]
