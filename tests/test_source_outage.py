"""A Pub/Sub outage, as an operator sees it: the daemon (a real process, on both backends)
against the real emulator behind a proxy that plays the outage (resets every connection).

Readiness follows Pub/Sub (``/readyz`` 503 with the source's reason, ``mandrill_ready`` 0),
at start too, while liveness stays; each outage is one line when it begins and one when it
ends; the daemon outlasts an outage up to ``--source-outage-limit``, and past it exits 1
with one line. Every wait is on the daemon's own log lines, never a sleep.
"""

from __future__ import annotations

import contextlib
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import datetime

import anyio
import pytest

from mandrill.sources.pubsub import setup_pubsub
from tests.fixtures.emulator import PubSubEmulator, PubSubNames
from tests.support.daemon import Daemon, LogLine, start
from tests.support.net import free_port
from tests.support.outage_proxy import OutageProxy

pytestmark = [pytest.mark.emulator, pytest.mark.slow]

BEGAN = "Pub/Sub unavailable: "
ENDED = "Pub/Sub recovered after "


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(port: int, path: str) -> tuple[int, str]:
    return await anyio.to_thread.run_sync(_get, f"http://127.0.0.1:{port}{path}")


async def ready_gauge(port: int) -> float:
    _, body = await get(port, "/metrics")
    (line,) = [line for line in body.splitlines() if line.startswith("mandrill_ready ")]
    return float(line.split()[1])


@contextlib.asynccontextmanager
async def daemon_behind(
    proxy: OutageProxy, names: PubSubNames, backend: str, port: int, tmp_path, *extra: str
) -> AsyncIterator[Daemon]:
    daemon = await start(
        [
            "run", "--source", "pubsub", "--project", names.project,
            "--subscription", names.subscription, "--backend", backend,
            "--ledger", str(tmp_path / "l.db"), "--metrics-addr", f"127.0.0.1:{port}",
            "--log-level", "debug", *extra,
        ],
        env={"PUBSUB_EMULATOR_HOST": proxy.address},
    )
    try:
        yield daemon
    finally:
        if daemon.process.returncode is None:
            daemon.process.kill()
        await daemon.process.aclose()


def warnings_about_pubsub(daemon: Daemon) -> list[str]:
    return [line["message"] for line in daemon.lines
            if line.get("level") in ("warning", "error") and "Pub/Sub" in line["message"]]


def at(line: LogLine) -> float:
    return datetime.fromisoformat(line["time"]).timestamp()


async def test_readiness_follows_pubsub_from_start_through_an_outage(
    pubsub_emulator: PubSubEmulator, pubsub_names: PubSubNames, backend_name: str, tmp_path
) -> None:
    names = pubsub_names
    await setup_pubsub(project=names.project, topic=names.topic,
                       subscription=names.subscription, backend=backend_name)
    subscription = f"projects/{names.project}/subscriptions/{names.subscription}"
    port = free_port()
    with OutageProxy(pubsub_emulator.host).running() as proxy:
        proxy.cut()  # Pub/Sub unreachable as the daemon starts
        async with daemon_behind(proxy, names, backend_name, port, tmp_path) as daemon:
            await daemon.wait_for_message(BEGAN + f"get subscription {subscription}:")
            # The probes answer during start-up retries: alive, not ready, and why.
            assert await get(port, "/healthz") == (200, "ok\n")
            status, reason = await get(port, "/readyz")
            assert status == 503
            assert reason.startswith(f"source not ready: get subscription {subscription}: ")
            assert await ready_gauge(port) == 0

            proxy.restore()
            await daemon.wait_for_message(ENDED)
            await daemon.wait_for_message("ready: consuming")
            assert await get(port, "/readyz") == (200, "ready\n")

            # An outage while it runs: the pull under way is cut.
            proxy.cut()
            await daemon.wait_for_message(BEGAN + f"pull from {subscription}:")
            status, reason = await get(port, "/readyz")
            assert status == 503
            assert reason.startswith(f"source not ready: pull from {subscription}: ")
            assert await ready_gauge(port) == 0
            assert await get(port, "/healthz") == (200, "ok\n")

            proxy.restore()
            await daemon.wait_for_message(ENDED)
            assert await get(port, "/readyz") == (200, "ready\n")
            assert await ready_gauge(port) == 1

            daemon.signal(signal.SIGTERM)
            assert await daemon.finish() == 0
    said = warnings_about_pubsub(daemon)
    # Each outage: one line as it began, one as it ended; nothing per failed attempt.
    assert [line.startswith(BEGAN) for line in said] == [True, False, True, False]
    assert [line.startswith(ENDED) for line in said] == [False, True, False, True]
    # The failed attempts themselves are at debug level (one or more per outage).
    retried = [line for line in daemon.lines
               if line.get("level") == "debug" and "failed, retrying in" in line["message"]]
    assert len(retried) >= 2


async def test_past_the_outage_limit_the_daemon_exits_1_with_one_line(
    pubsub_emulator: PubSubEmulator, pubsub_names: PubSubNames, backend_name: str, tmp_path
) -> None:
    names = pubsub_names
    await setup_pubsub(project=names.project, topic=names.topic,
                       subscription=names.subscription, backend=backend_name)
    port = free_port()
    limit = 2.0
    with OutageProxy(pubsub_emulator.host).running() as proxy:
        async with daemon_behind(proxy, names, backend_name, port, tmp_path,
                                 "--source-outage-limit", f"{limit:g}s") as daemon:
            await daemon.wait_for_message("ready: consuming")
            proxy.cut()
            began = await daemon.wait_for_message(BEGAN)
            assert (await get(port, "/readyz"))[0] == 503
            assert await daemon.finish() == 1
    errors = [line for line in daemon.lines if line.get("level") == "error"]
    assert len(errors) == 1, errors
    (stopped,) = errors
    assert stopped["message"].startswith(
        f"stopped: pull from projects/{names.project}/subscriptions/{names.subscription}:"
        f" Pub/Sub unavailable for {limit:.0f}s (--source-outage-limit {limit:g}s): "
    )
    # Not before the limit: the daemon's own clock, from the outage's first line.
    assert at(stopped) - at(began) >= limit
    # Between them, nothing about Pub/Sub: no line per failed attempt.
    assert warnings_about_pubsub(daemon) == [began["message"], stopped["message"]]
