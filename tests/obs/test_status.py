"""The status page served in process: the board's cache, the routes, the HTML's promises
(nothing external, everything escaped), on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest

from mandrill import config
from mandrill.controls import Controls
from mandrill.errors import ConfigError, LedgerError
from mandrill.ledger import SQLLedger
from mandrill.ledger.base import DeadLetterRecord
from mandrill.message import Delivery
from mandrill.obs.counters import Counters
from mandrill.obs.health import ServiceHealth
from mandrill.obs.http import serve_http
from mandrill.obs.metrics import Observability
from mandrill.obs.status import StatusBoard
from mandrill.obs.status_html import render_status
from mandrill.policy import Outcome, RateLimit, Reason, Rules
from mandrill.safety import SafetyControls, TimeWindow, parse_hours
from mandrill.shutdown import Shutdown
from tests.ledger import HOUR, T0, WEEK, Clock, decide_one, finish, message, running
from tests.ledger.conftest import POSTGRES, url_for

CONTROLS = Controls(
    rules=Rules(WEEK, RateLimit(50, HOUR)),
    safety=SafetyControls(exclude=("db-*",), window=TimeWindow(hours=parse_hours("06:00-20:00"))),
    dry_run=True,
)


@pytest.fixture(params=["sqlite-memory", "sqlite-file", POSTGRES])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SQLLedger]:
    clock = Clock()
    async with running(url_for(request.param, request, tmp_path), clock,
                       backend="asyncio") as opened:
        await finish(opened, await decide_one(opened, message("m1", "web-1")),
                     Outcome.RESTARTED)
        clock.now = T0 + 60
        await decide_one(opened, message("m2", "web-1"))  # skipped: interval
        await decide_one(opened, message("m3", "web-2"))  # under way
        evil = Delivery("ack", "m4", b"x", {}, T0)
        await opened.dead_letter([DeadLetterRecord(
            evil, Reason.INVALID, "invalid: <script>alert(1)</script> & more"
        )])
        yield opened


def board_for(ledger: SQLLedger, controls: Controls = CONTROLS, **options) -> StatusBoard:
    return StatusBoard(ledger, controls, instance_id=ledger.instance.instance_id,
                       backend="asyncio", version="9.9", wall_clock=lambda: T0, **options)


@asynccontextmanager
async def serving(board: StatusBoard | None, registry=None) -> AsyncIterator[httpx.AsyncClient]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve_http, "127.0.0.1:0", registry, ServiceHealth(),
                                      status=board, flag="--status-addr"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
        tg.cancel_scope.cancel()


async def test_the_json_has_the_fleet_and_the_controls(ledger: SQLLedger) -> None:
    async with serving(board_for(ledger)) as client:
        response = await client.get("/status.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert data["dry_run"] is True
    assert data["generated_at"] == "2027-01-15T08:01:00+00:00"
    (daemon,) = data["daemons"]
    assert (daemon["instance_id"], daemon["backend"], daemon["state"], daemon["this"]) == (
        ledger.instance.instance_id, "asyncio", "running", True
    )
    assert [(row["host"], row["owner"]) for row in data["under_way"]] == [
        ("web-2.example.net", ledger.instance.instance_id)
    ]
    assert data["cooldown"] == {"total": 1, "hosts": [{
        "host": "web-1.example.net", "last_restart": "2027-01-15T08:00:00+00:00",
        "eligible_at": "2027-01-22T08:00:00+00:00", "eligible_in": "6d 23h 59m",
    }]}
    assert [(row["host"], row["outcome"], row["reason"]) for row in data["decisions"]] == [
        ("web-2.example.net", "restarting", ""),
        ("web-1.example.net", "skipped", "interval"),
        ("web-1.example.net", "restarted", ""),
    ]
    assert data["dead_letters"][0]["message_id"] == "m4"
    controls = data["controls"]
    assert controls["exclude"] == ["db-*"]
    assert controls["window"]["open"] is True
    assert controls["rate_limit"] == {"restarts": 50, "window": "1h", "window_seconds": HOUR}
    assert controls["rate_limit_used"] == 2
    assert data["breaker"] is None


async def test_the_html_loads_nothing_external_and_escapes_everything(
    ledger: SQLLedger,
) -> None:
    async with serving(board_for(ledger)) as client:
        response = await client.get("/status")
        base = str(client.base_url).rstrip("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.text
    urls = re.findall(r"https?://[^\s\"'<>)]+", page)
    assert all(url.startswith(base) for url in urls), urls
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", page)
    assert "@import" not in page
    assert "url(" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert '<meta http-equiv="refresh" content="2">' in page
    assert 'id="dry-run"' in page
    assert '<code class="reason">interval</code>' in page
    assert 'href="/explain?host=web-1.example.net"' in page


async def test_no_banner_without_a_dry_run_and_the_refresh_can_be_chosen(
    ledger: SQLLedger,
) -> None:
    live = Controls(rules=Rules(WEEK))
    async with serving(board_for(ledger, live)) as client:
        page = (await client.get("/status")).text
        still = (await client.get("/status", params={"refresh": "0"})).text
        slow = (await client.get("/status", params={"refresh": "30"})).text
        bad = await client.get("/status", params={"refresh": "-1"})
    assert "DRY RUN" not in page
    assert "http-equiv" not in still
    assert '<meta http-equiv="refresh" content="30">' in slow
    assert bad.status_code == 400
    assert "refresh must be a number of seconds" in bad.text


async def test_many_clients_at_once_cost_one_read(ledger: SQLLedger) -> None:
    board = board_for(ledger, max_age=60)
    statuses: list[int] = []

    async def fetch(client: httpx.AsyncClient, path: str) -> None:
        statuses.append((await client.get(path)).status_code)

    async with serving(board) as client, anyio.create_task_group() as tg:
        for path in ("/status", "/status.json") * 6:  # within the server's 16 connections
            tg.start_soon(fetch, client, path)
    assert statuses == [200] * 12
    assert board.reads == 1
    assert board.scans == 1
    board.max_age = 0
    for _ in range(3):
        await board.snapshot()
    assert board.reads == 4
    # The parts that scan the tables are kept for scan_max_age (here, 60 s).
    assert board.scans == 1
    board.scan_max_age = 0
    await board.snapshot()
    assert board.scans == 2


async def test_explain_on_the_status_server(ledger: SQLLedger) -> None:
    async with serving(board_for(ledger)) as client:
        found = (await client.get("/explain.json", params={"host": "web-1"})).json()
        page = await client.get("/explain", params={"host": "db-1"})
        form = await client.get("/explain")
        bad = await client.get("/explain.json", params={"host": "web_1"})
        bad_page = await client.get("/explain", params={"host": "<b>"})
        missing = await client.get("/explain.json")
    assert found["would_restart"] is False
    assert [f["reason"] for f in found["findings"]] == ["interval"]
    assert page.status_code == 200
    assert "would NOT be restarted now" in page.text
    assert '<code class="reason">excluded</code>' in page.text
    assert form.status_code == 200
    assert '<form action="/explain"' in form.text
    assert bad.status_code == 400
    assert bad.text == ("'web_1' is not an instance name or a hostname (an RFC 1123 label,"
                        " or LABEL.example.net)\n")
    assert bad_page.status_code == 400
    assert "&lt;b&gt;" in bad_page.text
    assert "<b>" not in bad_page.text
    assert missing.status_code == 400


async def test_a_ledger_that_cannot_be_read_is_a_503_and_the_server_goes_on() -> None:
    class Down:
        async def read(self, fn):
            raise LedgerError("ledger read did not answer within 60s")

    board = StatusBoard(Down(), CONTROLS)  # type: ignore[arg-type]
    async with serving(board) as client:
        first = await client.get("/status")
        health = await client.get("/healthz")
    assert first.status_code == 503
    assert first.text == "cannot read the ledger: ledger read did not answer within 60s\n"
    assert health.status_code == 200


async def test_the_status_server_alone_serves_no_metrics(ledger: SQLLedger) -> None:
    async with serving(board_for(ledger)) as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200
        root = await client.get("/")
    assert (root.status_code, root.headers["location"]) == (302, "/status")


async def test_a_metrics_server_without_a_board_has_no_status_page() -> None:
    async with serving(None) as client:
        assert (await client.get("/status")).status_code == 404


def test_the_breaker_has_its_place_on_the_page() -> None:
    from mandrill.ledger.fleet import FleetView
    from mandrill.obs.status import Snapshot

    fleet = FleetView(T0, [], [], [], [], 0, [])
    plain = Snapshot(fleet, CONTROLS, "", "", "", datetime.now(UTC))
    tripped = Snapshot(fleet, CONTROLS, "", "", "", plain.wall_time,
                       breaker={"state": "open", "since": "2027-01-15T08:00:00+00:00"})
    assert "<td>breaker</td><td>not configured</td>" in render_status(plain)
    assert "state: open" in render_status(tripped)
    assert tripped.to_json()["breaker"]["state"] == "open"


# --- the setting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "env", "toml", "message"),
    [
        ({"status_addr": "nowhere"}, {}, None, "--status-addr: 'nowhere' has no port"),
        ({}, {"MANDRILL_STATUS_ADDR": "::1:80"}, None, "MANDRILL_STATUS_ADDR: '::1:80': put"),
        ({}, {}, 'status_addr = "h:99999"', "status_addr: 'h:99999': the port must be"),
    ],
)
def test_status_addr_is_validated_like_metrics_addr(tmp_path, flags, env, toml, message):
    path = None
    if toml is not None:
        path = tmp_path / "m.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load("run", flags, env, str(path) if path else None)


def test_status_addr_from_every_source(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('status-addr = "127.0.0.1:9465"\n')
    assert config.load("run", {}, {}, str(path))["status_addr"] == "127.0.0.1:9465"
    env = {"MANDRILL_STATUS_ADDR": "[::1]:9466"}
    assert config.load("run", {}, env, str(path))["status_addr"] == "[::1]:9466"
    assert config.load("run", {}, {})["status_addr"] is None


def test_the_page_costs_nothing_when_off() -> None:
    """Without --status-addr or --metrics-addr no board is built (commands.run asks
    ``wants_status``) and no task serves one."""
    off = Observability(counters=Counters(), shutdown=Shutdown())
    assert not off.wants_status
    assert [name for name, _ in off.probes(in_flight=lambda: 0)] == ["lag probe", "task dump"]
    metrics = Observability(counters=Counters(), shutdown=Shutdown(),
                            metrics_addr="127.0.0.1:0")
    assert metrics.wants_status
    status = Observability(counters=Counters(), shutdown=Shutdown(), status_addr="127.0.0.1:0")
    status.status = object()  # type: ignore[assignment]
    assert status.wants_status
    assert [name for name, _ in status.probes(in_flight=lambda: 0)] == [
        "lag probe", "task dump", "status server"
    ]
