"""Blockers through the CLI, as an operator runs them: ``mandrill run`` against the real
Prometheus of the session's fixture, and with a command."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.fixtures.prometheus import FIRING, RunningPrometheus
from tests.support.daemon import run_to_end, start
from tests.support.net import free_port

pytestmark = pytest.mark.slow


def rows(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT outcome, reason, detail FROM restarts ORDER BY id").fetchall()


def run_args(tmp_path: Path, backend_name: str, *extra: str) -> list[str]:
    return ["run", "--backend", backend_name, "--count", "2", "--rate", "0",
            "--restart-latency", "0s", "--restart-failure-rate", "0",
            "--ledger", str(tmp_path / "ledger.db"), *extra]


async def blocked_run(args: list[str]) -> list[str]:
    """Run the daemon until it logs a blocked restart, then stop it; its log messages."""
    daemon = await start(args)
    try:
        await daemon.wait_for_message("blocked by", seconds=30)
    finally:
        daemon.signal(signal.SIGTERM)
        await daemon.finish()
    return daemon.messages()


@pytest.mark.parametrize("url", ["alerts_url", "base"])
async def test_a_firing_alert_defers_every_restart_with_its_name(
    prometheus: RunningPrometheus, tmp_path: Path, backend_name: str, url: str
):
    given = prometheus.alerts_url if url == "alerts_url" else f"prometheus+{prometheus.base}"
    messages = await blocked_run(run_args(
        tmp_path, backend_name, "--block-on-alerts", given,
        "--block-alert-filter", 'severity="critical"',
    ))
    assert any(f"blocked by alerts: 1 firing alert at {prometheus.alerts_url}: {FIRING}" in m
               for m in messages)
    found = rows(tmp_path / "ledger.db")
    assert found
    for outcome, reason, detail in found:
        assert (outcome, reason) == ("cancelled", "blocked")
        assert FIRING in detail
        assert detail.endswith("not started, the message comes back later")


@pytest.mark.postgres
async def test_a_blocked_restart_is_recorded_in_a_fleet_ledger(
    prometheus: RunningPrometheus, tmp_path: Path, backend_name: str, postgres_url: str
):
    await blocked_run([*run_args(tmp_path, backend_name, "--block-on-alerts",
                                 prometheus.alerts_url), "--ledger", postgres_url])
    code, out, err = await run_to_end(["history", "--ledger", postgres_url, "--json"])
    assert code == 0, err
    history = [json.loads(line) for line in out.splitlines()]
    assert history
    for row in history:
        assert row["outcome"] == "cancelled"
        assert f"blocked by alerts: 1 firing alert at {prometheus.alerts_url}: {FIRING}" in (
            row["detail"])


async def test_a_filter_no_firing_alert_matches_lets_restarts_go_ahead(
    prometheus: RunningPrometheus, tmp_path: Path, backend_name: str
):
    code, _, err = await run_to_end(run_args(
        tmp_path, backend_name, "--block-on-alerts", prometheus.alerts_url,
        "--block-alert-filter", 'alertname="NodeDown"',
    ))
    assert code == 0, err
    assert [outcome for outcome, _, _ in rows(tmp_path / "ledger.db")] == ["restarted"] * 2


async def test_a_command_that_says_no_defers_and_one_that_says_yes_does_not(
    tmp_path: Path, backend_name: str
):
    for name in ("no", "yes"):
        (tmp_path / name).mkdir()
    messages = await blocked_run(run_args(tmp_path / "no", backend_name,
                                          "--block-on-command", "false"))
    assert any("blocked by command: 'false' exit 1" in m for m in messages)
    assert {(o, r) for o, r, _ in rows(tmp_path / "no" / "ledger.db")} == {
        ("cancelled", "blocked")}
    code, _, err = await run_to_end(run_args(tmp_path / "yes", backend_name,
                                             "--block-on-command", "true {hostname}"))
    assert code == 0, err
    assert [o for o, _, _ in rows(tmp_path / "yes" / "ledger.db")] == ["restarted"] * 2


async def test_an_unreachable_alerts_server_blocks(tmp_path: Path, backend_name: str):
    messages = await blocked_run(run_args(
        tmp_path, backend_name, "--block-on-alerts",
        f"http://127.0.0.1:{free_port()}/api/v2/alerts",
    ))
    assert any("blocked by alerts: cannot tell, so blocking: cannot reach" in m
               for m in messages)


async def test_bad_blocker_settings_exit_2_with_one_line(tmp_path: Path):
    code, _, err = await run_to_end(["run", "--ledger", str(tmp_path / "l.db"),
                                     "--block-alert-filter", "severity"])
    assert code == 2
    assert "--block-alert-filter: cannot read 'severity'" in err
    assert len(err.strip().splitlines()) == 1
