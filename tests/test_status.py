"""``mandrill status`` as a real process, on SQLite and PostgreSQL: the daemons alive
(and silent), the restarts under way, the hosts in cooldown until when."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from mandrill.ledger import open_ledger
from mandrill.policy import Outcome
from tests.ledger import Clock, decide_one, finish, message, running
from tests.ledger.conftest import POSTGRES, url_for
from tests.support.daemon import run_to_end

pytestmark = pytest.mark.slow

HOUR = 3600.0


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


@pytest.fixture(params=["sqlite-file", POSTGRES])
def url(request, tmp_path) -> str:
    return url_for(request.param, request, tmp_path)


async def status(url: str, *extra: str) -> list[dict]:
    code, out, err = await run_to_end(["status", "--ledger", url, "--json", *extra])
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_status_shows_the_fleet(url, backend_name):
    # A daemon that went silent an hour ago, without stopping (killed).
    silent = await open_ledger(url, clock=Clock(time.time() - HOUR), server_clock=False,
                               backend="trio")
    await silent._beat()
    await silent.aclose()
    clock = Clock(time.time())
    restarted_at = clock.now - 2 * HOUR
    async with running(url, clock, backend=backend_name) as ledger:
        clock.now = restarted_at
        done = await decide_one(ledger, message("m1", "web-1"))
        await finish(ledger, done, Outcome.RESTARTED)
        clock.now = restarted_at + 60
        await decide_one(ledger, message("m2", "web-2"))  # claimed, under way
        clock.now = time.time()
        await ledger._beat()

        rows = await status(url)
        daemons = [row for row in rows if row["kind"] == "daemon"]
        assert sorted((d["state"], d["backend"]) for d in daemons) == [
            ("alive", backend_name), ("silent", "trio")
        ]
        (alive,) = [d for d in daemons if d["state"] == "alive"]
        assert alive["instance"] == ledger.instance.instance_id
        assert alive["version"] == ledger.instance.version
        assert alive["heartbeat_age"] < 30
        (claim,) = [row for row in rows if row["kind"] == "claim"]
        assert claim == {"kind": "claim", "host": "web-2.example.net",
                         "since": iso(restarted_at + 60), "owner": ledger.instance.instance_id,
                         "message_id": "m2"}
        (cooldown,) = [row for row in rows if row["kind"] == "cooldown"]
        assert cooldown == {"kind": "cooldown", "host": "web-1.example.net",
                            "last_restart": iso(restarted_at),
                            "until": iso(restarted_at + 7 * 86400)}

        # The daemons' own settings decide who is alive and who is in cooldown.
        rows = await status(url, "--min-restart-interval", "1h", "--instance-timeout", "2h")
        assert [row["kind"] for row in rows] == ["daemon", "daemon", "claim"]
        assert {row["state"] for row in rows if row["kind"] == "daemon"} == {"alive"}

        code, out, err = await run_to_end(["status", "--ledger", url])
        assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "daemons: 1 alive, 1 silent"
    assert "restarts under way: 1" in lines
    assert "hosts in cooldown: 1" in lines
    assert any(line.startswith("web-1.example.net\t") and "(in 6d 21h" in line
               for line in lines)
    # Stopped, the daemon is gone from the list, its claim resolved.
    rows = await status(url)
    assert [(row["kind"], row.get("state")) for row in rows] == [
        ("daemon", "silent"), ("cooldown", None)
    ]


async def test_status_of_a_missing_ledger_is_an_error(tmp_path):
    code, _, err = await run_to_end(["status", "--ledger", str(tmp_path / "typo.db")])
    assert code == 2
    assert err == f"mandrill: error: --ledger: no ledger at {tmp_path / 'typo.db'}\n"
