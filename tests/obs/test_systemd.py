"""systemd's notifications: READY=1 when ready, STOPPING=1 at the stop, watchdog pings from
the event loop (and none while it is blocked), read from a real datagram socket."""

from __future__ import annotations

import itertools
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from mandrill.ledger import open_ledger
from mandrill.obs.counters import Counters
from mandrill.obs.health import ServiceHealth
from mandrill.obs.metrics import Observability
from mandrill.obs.systemd import NotifySettings, SystemdNotifier, notify_settings
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.shutdown import Shutdown
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import WorkerSettings
from tests.support.daemon import start
from tests.support.fakes import ScriptedRestarter, payloads
from tests.support.systemd import NotifySocket, has


@pytest.fixture
def listener() -> Iterator[NotifySocket]:
    found = NotifySocket(f"@mandrill-test-{uuid.uuid4().hex}")
    yield found
    found.close()


# --- the environment ------------------------------------------------------------------------


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"NOTIFY_SOCKET": ""}, None),
    ({"NOTIFY_SOCKET": "/run/systemd/notify"}, NotifySettings("/run/systemd/notify")),
    ({"NOTIFY_SOCKET": "@name"}, NotifySettings("\0name")),
    ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000"}, NotifySettings("/n", 15.0)),
    ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"},
     NotifySettings("/n", 15.0)),
    # Meant for another process (ours forked it, say): no watchdog of ours.
    ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"},
     NotifySettings("/n")),
    ({"WATCHDOG_USEC": "30000000"}, None),
])
def test_settings_from_the_environment(environ, expected):
    assert notify_settings(environ, pid=42) == expected


@pytest.mark.parametrize(("environ", "error"), [
    ({"NOTIFY_SOCKET": "run/notify"}, "NOTIFY_SOCKET: 'run/notify' is not an absolute path"),
    ({"NOTIFY_SOCKET": "vsock:2:1"}, "NOTIFY_SOCKET: 'vsock:2:1' is not"),
    ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30s"}, "WATCHDOG_USEC: '30s' is not a positive"),
    ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "0"}, "WATCHDOG_USEC: '0' is not a positive"),
    ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "-5"}, "WATCHDOG_USEC: '-5' is not a positive"),
    ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "me"},
     "WATCHDOG_PID: 'me' is not a process id"),
])
def test_malformed_settings_are_one_line_errors(environ, error):
    with pytest.raises(ValueError, match="^" + error) as caught:
        notify_settings(environ, pid=42)
    assert "\n" not in str(caught.value)


# --- the notifier alone ---------------------------------------------------------------------


@asynccontextmanager
async def notifying(
    listener: NotifySocket, health: ServiceHealth, shutdown: Shutdown, interval: float | None
) -> AsyncIterator[SystemdNotifier]:
    notifier = SystemdNotifier(NotifySettings("\0" + listener.address[1:], interval),
                               health, shutdown)
    async with anyio.create_task_group() as group:
        await group.start(notifier.run)
        yield notifier
        group.cancel_scope.cancel()


@pytest.mark.autojump
async def test_the_watchdog_is_pinged_every_half_of_its_timeout(listener, unit, anyio_backend):
    interval = 5 * unit
    virtual = "clock" in anyio_backend[1]
    shutdown = Shutdown()
    async with notifying(listener, ServiceHealth(shutdown=shutdown), shutdown, interval):
        pings = [await listener.wait_for(has("WATCHDOG=1")) for _ in range(5)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    for gap in gaps:
        # Exact on trio's mock clock; on asyncio's real one, never early and not much late.
        assert interval * 0.95 <= gap <= interval * (1.001 if virtual else 3), gaps


@pytest.mark.autojump
async def test_ready_once_serving_and_ready_then_stopping_at_the_request(listener):
    shutdown = Shutdown()
    health = ServiceHealth(shutdown=shutdown)
    problem: list[str] = ["connection refused"]
    async with notifying(listener, health, shutdown, None) as notifier:
        assert (await listener.receive())[1] == "STATUS=starting"
        health.set_serving({"ledger": lambda: problem[0] if problem else None})
        # Serving, but a part is not ready: /readyz says 503, so systemd waits too.
        _, status = await listener.receive()
        assert status == "STATUS=not ready: ledger not ready: connection refused"
        assert not notifier.ready_sent
        problem.clear()
        await listener.wait_for(has("READY=1"))
        assert health.ready() == (True, "ready")
        shutdown.request("SIGTERM")
        _, stopping = await listener.receive()
        assert stopping == "STOPPING=1\nSTATUS=stopping (SIGTERM)"
    assert listener.pending() == []  # said once


@pytest.mark.autojump
async def test_stopping_when_the_daemon_ends_without_a_request(listener):
    """A part failing ends serve() by cancellation: systemd still hears it stop."""
    shutdown = Shutdown()
    health = ServiceHealth(shutdown=shutdown)
    async with notifying(listener, health, shutdown, None):
        health.set_serving()
        await listener.wait_for(has("READY=1"))
    assert listener.pending() == ["STOPPING=1\nSTATUS=stopping"]


async def test_a_path_socket_and_one_that_went_away(caplog):
    """A socket path that vanishes (systemd restarted) fails the sends: logged once."""
    with tempfile.TemporaryDirectory() as directory:  # short: a socket path's limit is 108
        listener = NotifySocket(str(Path(directory) / "notify"))
        shutdown = Shutdown()
        health = ServiceHealth(shutdown=shutdown)
        notifier = SystemdNotifier(NotifySettings(listener.address), health, shutdown)
        async with anyio.create_task_group() as group:
            await group.start(notifier.run)
            assert (await listener.receive())[1] == "STATUS=starting"
            listener.close()
            health.set_serving()
            shutdown.request("test")
            await anyio.wait_all_tasks_blocked()
            group.cancel_scope.cancel()
    failures = [r for r in caplog.records if "systemd notification failed" in r.message]
    assert len(failures) == 1


async def test_a_blocked_event_loop_stops_the_pings(listener):
    """The pings come from the loop: while it is blocked (here by a deliberately blocking
    read of the socket itself, which must time out), none is sent; after, they resume."""
    interval = 0.02
    shutdown = Shutdown()
    async with notifying(listener, ServiceHealth(shutdown=shutdown), shutdown, interval):
        await listener.wait_for(has("WATCHDOG=1"))
        listener.pending()
        listener.sock.settimeout(interval * 10)
        try:
            with pytest.raises(TimeoutError):
                listener.sock.recv(4096)  # blocks the loop: no ping may arrive meanwhile
        finally:
            listener.sock.setblocking(False)
        await listener.wait_for(has("WATCHDOG=1"), seconds=5)


# --- serve() and mandrill run ---------------------------------------------------------------


async def test_serve_says_ready_pings_and_says_stopping(listener):
    ledger = await open_ledger(":memory:")
    broker = MemoryBroker()
    await broker.publish(payloads("web-1", "web-2"))
    interval = 0.05
    observability = Observability(
        Counters(), Shutdown(), slow_callback_ms=None, task_dump=False,
        systemd=NotifySettings("\0" + listener.address[1:], interval),
    )
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: serve(
                ServiceSettings(handle_signals=False), WorkerSettings(),
                Parts(broker, ledger, ScriptedRestarter()), observability=observability,
            ))
            await listener.wait_for(has("READY=1"))
            # Said when /readyz would first answer 200, not before.
            assert observability.health.ready() == (True, "ready")
            first = await listener.wait_for(has("WATCHDOG=1"))
            second = await listener.wait_for(has("WATCHDOG=1"))
            assert second - first >= interval * 0.95
            observability.shutdown.request("test")
            await listener.wait_for(has("STOPPING=1"))
    finally:
        await ledger.aclose()
    assert observability.counters.restarted == 2


@pytest.mark.slow
async def test_mandrill_run_notifies_systemd(listener, tmp_path, backend_name):
    daemon = await start(
        ["run", "--backend", backend_name, "--ledger", str(tmp_path / "l.db"), "--rate", "50"],
        env=listener.environment(watchdog_usec=100_000),
    )
    try:
        await listener.wait_for(has("READY=1"), seconds=30)
        await listener.wait_for(has("WATCHDOG=1"))
        daemon.signal(signal.SIGTERM)
        await listener.wait_for(has("STOPPING=1"))
    finally:
        with anyio.CancelScope(shield=True):
            code = await daemon.finish(30)
    assert code == 0
    assert any("watchdog pinged every 0.05s" in m for m in daemon.messages())


@pytest.mark.slow
async def test_mandrill_run_refuses_a_malformed_watchdog_usec(listener, tmp_path):
    daemon = await start(["run", "--ledger", str(tmp_path / "l.db")],
                         env={**listener.environment(), "WATCHDOG_USEC": "30s"})
    assert await daemon.finish(30) == 2
    assert any("WATCHDOG_USEC: '30s' is not a positive number" in m
               for m in daemon.messages())
