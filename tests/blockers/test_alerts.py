"""The alerts blocker against a real Prometheus (Debian's, started by the session's fixture
with an always-firing rule) and against fakes that answer wrong, or not at all: every
failure blocks."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import anyio
import pytest

from mandrill.blockers import Block, Blockers, ask
from mandrill.blockers.alerts import AlertsBlocker
from mandrill.blockers.matchers import parse_alerts_url, parse_filter
from mandrill.message import Message
from tests.fixtures.prometheus import FIRING, PENDING, RunningPrometheus
from tests.support.fake_http import FakeHttpServer, serving
from tests.support.net import free_port

HOST = Message("m-1", "web-1", "web-1.example.net",
               datetime(2026, 1, 1, tzinfo=UTC).timestamp(), None)


async def check(url: str, alert_filter: str = "", time_limit: float = 5.0) -> Block | None:
    blocker = AlertsBlocker(parse_alerts_url(url), parse_filter(alert_filter),
                            time_limit=time_limit)
    async with blocker:
        return await ask(blocker, HOST)


# --- a real Prometheus --------------------------------------------------------------------


async def test_a_firing_alert_blocks_with_its_name(prometheus: RunningPrometheus):
    block = await check(prometheus.alerts_url)
    assert block is not None
    assert not block.error
    assert block.blocker == "alerts"
    assert FIRING in block.reason
    assert PENDING not in block.reason  # pending is not firing
    assert f"1 firing alert at {prometheus.alerts_url}" in block.reason


@pytest.mark.parametrize("alert_filter", [
    f'alertname="{FIRING}"',
    'alertname=~"MandrillTest.*",severity="critical"',
    '{team="infra", severity!="info"}',
])
async def test_a_matching_filter_blocks(prometheus: RunningPrometheus, alert_filter: str):
    block = await check(f"prometheus+{prometheus.base}", alert_filter)
    assert block is not None
    assert FIRING in block.reason


@pytest.mark.parametrize("alert_filter", [
    'alertname="NodeDown"',
    'severity="warning"',
    f'alertname="{PENDING}"',  # known to Prometheus, but only pending
    'alertname!~"MandrillTest.*"',
    'instance=~"{hostname}(:[0-9]+)?"',  # no alert about this host
])
async def test_a_filter_that_matches_no_firing_alert_lets_the_restart_go_ahead(
    prometheus: RunningPrometheus, alert_filter: str
):
    assert await check(prometheus.alerts_url, alert_filter) is None


# --- fakes: every failure blocks -----------------------------------------------------------


async def test_an_http_error_blocks():
    async with serving(FakeHttpServer(status=500, body=b"internal trouble")) as fake:
        block = await check(fake.url("/api/v1/alerts"))
    assert block is not None
    assert block.error
    assert "cannot tell, so blocking: HTTP 500" in block.reason
    assert "internal trouble" in block.reason
    assert fake.requests == ["GET /api/v1/alerts HTTP/1.1"]


async def test_a_server_that_hangs_blocks_at_the_time_limit():
    async with serving(FakeHttpServer(hang=True)) as fake:
        started = anyio.current_time()
        block = await check(fake.url("/api/v1/alerts"), time_limit=0.3)
        took = anyio.current_time() - started
    assert block is not None
    assert block.error
    assert "no answer from" in block.reason
    assert "within 0.3s" in block.reason
    assert 0.3 <= took < 3


async def test_an_unreachable_server_blocks():
    block = await check(f"http://127.0.0.1:{free_port()}/api/v1/alerts")
    assert block is not None
    assert block.error
    assert "cannot reach http://127.0.0.1:" in block.reason


@pytest.mark.parametrize(("body", "why"), [
    (b"<html>not json</html>", "unexpected answer"),
    (b'{"status": "error", "error": "query timed out"}', "query timed out"),
    (b'{"status": "success", "data": {"alerts": {}}}', "expected a list of alerts"),
    (b'{"status": "success", "data": {"alerts": [{"state": "firing", "labels": [1]}]}}',
     "labels are not a map"),
    (b'{"status": "success", "data": {}}', "unexpected answer"),
    (b"[]", "unexpected answer"),  # Alertmanager's shape from a Prometheus URL
])
async def test_an_answer_of_the_wrong_shape_blocks(body: bytes, why: str):
    async with serving(FakeHttpServer(body=body)) as fake:
        block = await check(fake.url("/api/v1/alerts"))
    assert block is not None
    assert block.error
    assert why in block.reason


def alertmanager_alert(name: str, state: str, **labels: str) -> dict[str, object]:
    return {"labels": {"alertname": name, **labels}, "annotations": {},
            "status": {"state": state, "silencedBy": [], "inhibitedBy": []}}


async def test_alertmanager_active_alerts_block_and_silenced_ones_do_not():
    body = json.dumps([
        alertmanager_alert("DiskFull", "active", severity="critical"),
        alertmanager_alert("NodeDown", "suppressed", severity="critical"),
        alertmanager_alert("Watchdog", "active", severity="none"),
    ]).encode()
    async with serving(FakeHttpServer(body=body)) as fake:
        url = f"alertmanager+{fake.url()}"
        block = await check(url, 'severity="critical"')
        assert block is not None
        assert not block.error
        assert "DiskFull" in block.reason
        assert "NodeDown" not in block.reason
        assert await check(url, 'alertname="NodeDown"') is None
    assert fake.requests[0] == "GET /api/v2/alerts HTTP/1.1"


async def test_blockers_ask_in_order_and_every_lists_each_no():
    async with serving(FakeHttpServer(status=503)) as fake:
        broken = AlertsBlocker(parse_alerts_url(fake.url("/api/v1/alerts")), parse_filter(""),
                               time_limit=5)
        async with broken:
            blockers = Blockers([broken, broken])
            first = await blockers.first(HOST)
            assert first is not None
            assert len(fake.requests) == 1  # the first no ends the asking
            assert len(await blockers.every(HOST)) == 2
    assert await Blockers([]).first(HOST) is None
    assert not Blockers([])
