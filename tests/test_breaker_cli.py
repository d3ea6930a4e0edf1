"""The restart-storm breaker as an operator meets it: a daemon whose restarts all fail opens
it (logged, notified once, ``mandrill_breaker_open`` 1), ``mandrill resume`` closes it with
who and when, and the daemon sees it closed; ``resume``'s own errors in one line."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import run_to_end, start
from tests.support.net import free_port

pytestmark = pytest.mark.slow

WHY = re.compile(r"[3-9]\d* restarts failed in the last 1h \(limit 2\)")


def breaker_rows(db: str) -> list[tuple[str, str | None, bool]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT why, closed_by, closed_at IS NOT NULL FROM breakers ORDER BY id"
        ).fetchall()
    return [(why, by, bool(closed)) for why, by, closed in rows]


async def breaker_gauge(port: int) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    (family,) = (f for f in text_string_to_metric_families(text)
                 if f.name == "mandrill_breaker_open")
    return float(family.samples[0].value)


async def test_a_storm_opens_it_and_resume_closes_it(tmp_path, backend_name):
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    db, port = str(tmp_path / "ledger.db"), free_port()
    try:
        daemon = await start([
            "run", "--backend", backend_name, "--rate", "50", "--restart-latency", "0s",
            "--restart-failure-rate", "1", "--breaker-failures", "2", "--breaker-window", "1h",
            "--instance-timeout", "3s", "--metrics-addr", f"127.0.0.1:{port}",
            "--notify-url", f"http://127.0.0.1:{server.server_port}/hook", "--ledger", db,
        ])
        opened = await daemon.wait_for_message("restart-storm breaker opened")
        assert opened["level"] == "error"
        # More than 2: as many as had failed when the next claim came (restarts run at once).
        assert WHY.search(opened["message"])
        assert await breaker_gauge(port) == 1

        code, out, err = await run_to_end(["resume", "--ledger", db, "--by", "alice"])
        assert code == 0, err
        assert out.startswith("restart-storm breaker closed by alice at ")
        assert WHY.search(out)
        # The daemon reads it closed (a heartbeat, or its next decision).
        await daemon.wait_for_message("restart-storm breaker closed by alice")
        daemon.signal(signal.SIGTERM)
        assert await daemon.finish(30) == 0
    finally:
        server.shutdown()
        thread.join()
        server.server_close()

    rows = breaker_rows(db)
    assert rows[0][1:] == ("alice", True)
    assert all(WHY.fullmatch(why) for why, _, _ in rows)
    # One notification for each opening, whatever the messages held back meanwhile.
    notified = [n for n in received if n["outcome"] == "breaker_open"]
    assert len(notified) == len(rows)
    assert (notified[0]["host"], notified[0]["message_id"]) == ("", "")
    assert WHY.match(notified[0]["detail"])


async def test_resume_of_a_closed_breaker_says_so_and_takes_user(tmp_path):
    db = str(tmp_path / "ledger.db")
    code, _, err = await run_to_end(["run", "--count", "3", "--rate", "0", "--ledger", db,
                                     "--restart-latency", "0s"])
    assert code == 0, err
    code, out, err = await run_to_end(["resume", "--ledger", db], env={"USER": "bob"})
    assert (code, out) == (0, "the restart-storm breaker is not open: nothing to resume\n"), err


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {"USER": ""}, "--by is required: $USER is not set"),
        (["--by", " "], {}, "--by: must not be empty"),
        (["--by", "a\tb"], {}, "--by: 'a\\tb' is not a name of at most 200 printable"),
    ],
)
async def test_resume_errors_are_one_line(tmp_path, args, env, expected):
    db = tmp_path / "ledger.db"
    sqlite3.connect(db).close()
    code, _, err = await run_to_end(["resume", "--ledger", str(db), *args], env=env)
    assert code == 2
    assert err.startswith(f"mandrill: error: {expected}")
    assert err.count("\n") == 1


async def test_resume_of_a_missing_ledger_is_an_error(tmp_path):
    code, _, err = await run_to_end(["resume", "--ledger", str(tmp_path / "typo.db"),
                                     "--by", "alice"])
    assert code == 2
    assert err.strip().endswith(f"--ledger: no ledger at {tmp_path / 'typo.db'}")
