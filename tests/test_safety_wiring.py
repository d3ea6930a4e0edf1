"""The real restarters and safety controls through the CLI, as an operator runs them."""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.support.daemon import run_to_end

pytestmark = pytest.mark.slow

RECORDER = """\
import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(sys.argv[2:]) + "\\n")
"""


def outcomes(db: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT outcome, detail FROM restarts ORDER BY id").fetchall()


def command_run(tmp_path, backend_name, *extra: str) -> list[str]:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    record = tmp_path / "argv.jsonl"
    return [
        "run", "--backend", backend_name, "--count", "5", "--rate", "0",
        "--ledger", str(tmp_path / "ledger.db"), "--restarter", "command",
        "--restart-command", f"{sys.executable} {script} {record} {{hostname}}", *extra,
    ]


async def test_the_command_restarter_dry_runs_by_default(tmp_path, backend_name):
    code, _, err = await run_to_end(command_run(tmp_path, backend_name))
    assert code == 0
    assert not (tmp_path / "argv.jsonl").exists()
    assert "DRY RUN: no host will be restarted" in err
    assert "DRY RUN: 5 restarts would have happened" in err
    assert [o for o, _ in outcomes(str(tmp_path / "ledger.db"))] == ["dry_run"] * 5


async def test_live_really_runs_the_command(tmp_path, backend_name):
    code, _, err = await run_to_end(command_run(tmp_path, backend_name, "--live"))
    assert code == 0, err
    calls = [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
    assert len(calls) == 5
    assert all(args[0].endswith(".example.net") for args in calls)
    assert {o for o, _ in outcomes(str(tmp_path / "ledger.db"))} == {"restarted"}


async def test_excluded_hosts_are_skipped_with_the_reason(tmp_path, backend_name):
    code, _, err = await run_to_end(
        command_run(tmp_path, backend_name, "--live", "--exclude", "cattle-*")
    )
    assert code == 0, err
    assert not (tmp_path / "argv.jsonl").exists()
    rows = outcomes(str(tmp_path / "ledger.db"))
    assert len(rows) == 5
    assert all(o == "skipped" and "cattle-*" in d for o, d in rows)
    _, out, _ = await run_to_end(["history", "--ledger", str(tmp_path / "ledger.db"), "--json"])
    assert all("cattle-*" in json.loads(line)["detail"] for line in out.splitlines())


async def test_a_closed_time_window_skips_every_restart(tmp_path, backend_name):
    # An hours window of one minute that is never now: 00:00-00:01 on a day excluded.
    code, _, err = await run_to_end(
        command_run(tmp_path, backend_name, "--live", "--weekdays", "mon", "--hours",
                    "00:00-00:01", "--timezone", "Pacific/Kiritimati")
    )
    assert code == 0, err
    rows = outcomes(str(tmp_path / "ledger.db"))
    assert rows
    assert all(o == "skipped" and d.startswith("outside allowed") for o, d in rows)


async def test_the_fleet_rate_limit_caps_restarts(tmp_path, backend_name):
    code, _, err = await run_to_end([
        "run", "--backend", backend_name, "--count", "10", "--rate", "0",
        "--restart-latency", "0s", "--restart-failure-rate", "0",
        "--max-restarts", "3", "--max-restarts-window", "1h",
        "--ledger", str(tmp_path / "ledger.db"),
    ])
    assert code == 0, err
    rows = outcomes(str(tmp_path / "ledger.db"))
    assert [o for o, _ in rows].count("restarted") == 3
    assert sum(d.startswith("fleet rate limit") for _, d in rows) == 7


async def test_notifications_reach_a_receiver(tmp_path, backend_name):
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, _, err = await run_to_end([
            "run", "--backend", backend_name, "--count", "5", "--rate", "0",
            "--restart-latency", "0s", "--restart-failure-rate", "0", "--grace", "2s",
            "--ledger", str(tmp_path / "ledger.db"),
            "--notify-url", f"http://127.0.0.1:{server.server_port}/hook",
        ])
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert code == 0, err
    assert received
    assert {"host", "message_id", "outcome", "detail", "time"} <= set(received[0])
    assert received[0]["outcome"] in ("restarted", "skipped")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--restarter", "command"], "--restart-command is required with --restarter command"),
        (["--restarter", "command", "--restart-command", "{hostname} x"], "--restart-command:"),
        (["--weekdays", "someday"], "--weekdays: unknown weekday"),
        (["--notify-url", "ftp://x"], "--notify-url:"),
    ],
)
async def test_bad_restarter_settings_exit_2(tmp_path, args, expected):
    code, _, err = await run_to_end(["run", "--ledger", str(tmp_path / "l.db"), *args])
    assert code == 2, err
    assert expected in err
