"""An operator's view of a running daemon: metrics, health, the task dump, the profile."""

from __future__ import annotations

import json
import pstats
import signal
import urllib.error
import urllib.request

import anyio
import pytest

from tests.support.daemon import start
from tests.support.net import free_port

pytestmark = pytest.mark.slow


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


async def test_an_operator_can_see_what_the_daemon_does(tmp_path, backend_name):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    profile = tmp_path / "run.prof"
    daemon = await start([
        "run", "--backend", backend_name, "--ledger", str(tmp_path / "l.db"),
        "--metrics-addr", f"127.0.0.1:{port}", "--rate", "200", "--restart-latency", "2s",
        "--restart-failure-rate", "0", "--grace", "30s", "--profile", str(profile),
    ])
    await daemon.wait_for_message("restarted ")
    status, body = await anyio.to_thread.run_sync(get, base + "/metrics")
    assert status == 200
    assert metric(body, "mandrill_messages_received_total") > 0
    assert metric(body, "mandrill_restarts_total{outcome=\"restarted\"}") > 0
    assert metric(body, "mandrill_messages_in_flight") > 0
    assert metric(body, "mandrill_messages_in_flight_limit") == 256
    assert metric(body, "process_resident_memory_bytes") > 0
    assert (await anyio.to_thread.run_sync(get, base + "/healthz"))[0] == 200
    assert (await anyio.to_thread.run_sync(get, base + "/readyz"))[0] == 200

    daemon.signal(signal.SIGUSR1)
    dump = (await daemon.wait_for_message("task tree"))["message"]
    assert "consumer" in dump
    assert "worker-" in dump

    daemon.signal(signal.SIGTERM)
    await daemon.wait_for_message("stopped pulling")
    status, reason = await anyio.to_thread.run_sync(get, base + "/readyz")
    assert status == 503
    assert "shutting down (SIGTERM)" in reason
    daemon.signal(signal.SIGTERM)
    assert await daemon.finish(30) == 0
    assert pstats.Stats(str(profile)).total_calls > 0


async def test_a_bad_metrics_address_exits_2(tmp_path):
    from tests.support.daemon import run_to_end

    code, _, err = await run_to_end(["run", "--metrics-addr", "nowhere", "--ledger",
                                     str(tmp_path / "l.db")])
    assert code == 2
    assert err.startswith("mandrill: error: --metrics-addr:")


async def test_debug_logs_are_all_json_with_a_severity(tmp_path, backend_name):
    """asyncio's own debug-mode lines come through mandrill's formatter, and trio's step
    timing reports no bogus step at start (the one in which it is installed)."""
    from tests.support.daemon import run_to_end

    code, _, err = await run_to_end([
        "run", "--backend", backend_name, "--debug", "--log-format", "json", "--count", "20",
        "--rate", "0", "--restart-latency", "0s", "--ledger", str(tmp_path / "l.db"),
    ])
    assert code == 0
    lines = [json.loads(line) for line in err.splitlines()]
    assert all(line["severity"] in {"DEBUG", "INFO", "WARNING", "ERROR"} for line in lines)
    if backend_name == "asyncio":
        assert any(line["logger"] == "asyncio" and line["severity"] == "DEBUG"
                   for line in lines)
    slow = [line["message"] for line in lines if "without awaiting" in line["message"]]
    assert not any("'slow steps'" in message for message in slow), slow
