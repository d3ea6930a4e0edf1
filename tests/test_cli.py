"""The ``mandrill`` command as a real process, on the backend of the test run."""

from __future__ import annotations

import json
import signal
import sqlite3

import anyio
import pytest

from tests.support.daemon import run_to_end, start

pytestmark = pytest.mark.slow


def settled_messages(db: str) -> int:
    """Messages with a final decision, or dead-lettered (a message whose restart keeps
    failing ends there after ``--max-attempts``: rare at a 10% failure rate, not never)."""
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM messages AS m WHERE m.status = 'dead_letter' OR EXISTS"
            " (SELECT 1 FROM restarts AS r WHERE r.message_id = m.message_id"
            " AND r.outcome IN ('restarted', 'skipped'))"
        ).fetchone()
    return int(count)


def summary(daemon) -> str:
    return next(m for m in reversed(daemon.messages()) if m.startswith("stopped ("))


async def test_run_count_processes_every_message_and_exits_0(tmp_path, backend_name):
    db = str(tmp_path / "ledger.db")
    daemon = await start([
        "run", "--backend", backend_name, "--count", "500", "--rate", "0",
        "--restart-latency", "10ms", "--restart-failure-rate", "0.1", "--ledger", db,
    ])
    assert await daemon.finish(60) == 0
    assert "processed 500 messages" in summary(daemon)
    assert summary(daemon).endswith("unsettled 0")
    assert settled_messages(db) == 500


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
async def test_a_signal_mid_flight_stops_gracefully(tmp_path, backend_name, signum):
    grace = 3.0
    daemon = await start([
        "run", "--backend", backend_name, "--rate", "100", "--restart-latency", "1s",
        "--grace", f"{grace}s", "--ledger", str(tmp_path / "ledger.db"),
    ])
    # The 10th restart, not the first: that one may come so early (a latency draw near 0)
    # that nothing else has been published yet.
    for _ in range(10):
        await daemon.wait_for_message("restarted ")
    signalled = anyio.current_time()
    daemon.signal(signum)
    assert await daemon.finish(grace + 10) == 0
    assert anyio.current_time() - signalled < grace + 1
    assert f"stopped ({signum.name})" in summary(daemon)
    assert summary(daemon).endswith("unsettled 0")
    stopped = next(m for m in daemon.messages() if m.startswith("stopped pulling"))
    assert not stopped.startswith("stopped pulling; 0 in flight")


async def test_a_second_signal_cancels_the_grace(tmp_path, backend_name):
    daemon = await start([
        "run", "--backend", backend_name, "--rate", "100", "--restart-latency", "60s",
        "--grace", "120s", "--ledger", str(tmp_path / "ledger.db"),
    ])
    await daemon.wait_for_message("restarted ")
    daemon.signal(signal.SIGTERM)
    await daemon.wait_for_message("stopped pulling")
    forced = anyio.current_time()
    daemon.signal(signal.SIGTERM)
    assert await daemon.finish(30) == 0
    assert anyio.current_time() - forced < 5
    assert summary(daemon).endswith("unsettled 0")
    assert any("nacked" in m and "still held" in m for m in daemon.messages())


async def test_sigquit_keeps_its_default_behaviour(tmp_path, backend_name):
    daemon = await start([
        "run", "--backend", backend_name, "--ledger", str(tmp_path / "ledger.db"),
    ])
    await daemon.wait_for_message("ready")
    daemon.signal(signal.SIGQUIT)
    assert await daemon.finish(30) == -signal.SIGQUIT


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--max-in-flight", "0"], "--max-in-flight: '0' must be at least 1"),
        (["run", "--backend", "curio"], "--backend: 'curio' is not one of asyncio, trio"),
        (["run", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["run", "--domain", "bad domain"], "--domain:"),
        (["explode"], "invalid choice: 'explode'"),
        (["run", "--config", "/nonexistent.toml"], "cannot read config file"),
    ],
)
async def test_bad_input_exits_2_with_one_line(args, expected):
    code, _, err = await run_to_end(args)
    assert code == 2
    assert err.count("\n") == 1
    assert expected in err
    assert err.startswith("mandrill: error: ")


async def test_history_lists_what_run_did(tmp_path, backend_name):
    db = str(tmp_path / "ledger.db")
    code, _, _ = await run_to_end([
        "run", "--backend", backend_name, "--count", "20", "--rate", "0",
        "--restart-latency", "0s", "--restart-failure-rate", "0", "--ledger", db,
    ])
    assert code == 0
    code, out, _ = await run_to_end(["history", "--ledger", db, "--json", "--limit", "100"])
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 20
    assert {row["outcome"] for row in rows} <= {"restarted", "skipped"}
    assert all(row["host"].endswith(".example.net") for row in rows)


async def test_history_of_a_missing_ledger_is_an_error(tmp_path):
    code, _, err = await run_to_end(["history", "--ledger", str(tmp_path / "typo.db")])
    assert code == 2
    assert err.strip().endswith(f"--ledger: no ledger at {tmp_path / 'typo.db'}")
    assert not (tmp_path / "typo.db").exists()
