"""The status page of a working fleet: two daemons as real processes (one on asyncio, one on
trio) on one PostgreSQL ledger; its JSON read with httpx, its HTML in a real headless
Chromium while both work."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import browser
from tests.support.daemon import Daemon, start
from tests.support.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

#: Both daemons publish the same hosts in the same order (the embedded demo's publisher).
COMMON = ["--source", "memory", "--seed", "11", "--rate", "20", "--exclude", "cattle-0*",
          "--max-restarts", "1000", "--restart-failure-rate", "0.2"]


@asynccontextmanager
async def fleet(postgres_url: str) -> AsyncIterator[tuple[Daemon, int, Daemon, int]]:
    """A live trio daemon serving its status beside its metrics, then, once it has
    restarted hosts, a dry-run asyncio daemon with a status server of its own (it meets
    those hosts in cooldown). Both stop gracefully (exit 0) at the end."""
    live_port, dry_port = free_port(), free_port()
    live = await start(["run", "--backend", "trio", "--ledger", postgres_url, *COMMON,
                        "--restart-latency", "2s", "--metrics-addr", f"127.0.0.1:{live_port}"])
    daemons = [live]
    try:
        await live.wait_for_message("restarted ")
        dry = await start(["run", "--backend", "asyncio", "--ledger", postgres_url, *COMMON,
                           "--dry-run", "--status-addr", f"127.0.0.1:{dry_port}"])
        daemons.append(dry)
        await dry.wait_for(lambda line: "skipped" in line.get("message", "")
                           and "host restarted" in line["message"])
        yield live, live_port, dry, dry_port
        for daemon in daemons:
            daemon.signal(signal.SIGTERM)
        for daemon in daemons:
            assert await daemon.finish(40) == 0
    finally:
        for daemon in daemons:
            if daemon.process.returncode is None:
                daemon.process.kill()
                await daemon.process.wait()


async def status_of(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{port}/status.json")
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


async def test_any_daemon_shows_the_whole_fleet(postgres_url: str) -> None:
    async with fleet(postgres_url) as (_, live_port, _, dry_port):
        live, dry = await status_of(live_port), await status_of(dry_port)
        async with httpx.AsyncClient(timeout=10) as client:
            explained = (await client.get(f"http://127.0.0.1:{dry_port}/explain.json",
                                          params={"host": "cattle-0abc"})).json()
    assert (live["dry_run"], dry["dry_run"]) == (False, True)
    for status in (live, dry):
        running = {row["backend"]: row for row in status["daemons"] if row["state"] == "running"}
        assert set(running) == {"asyncio", "trio"}
        assert [row["instance_id"] for row in status["daemons"] if row["this"]] == [
            status["daemon"]["instance_id"]
        ]
    trio_id = live["daemon"]["instance_id"]
    # The live daemon's restarts take 2 s: some are under way, held by it, seen by both.
    assert any(row["owner"] == trio_id for row in dry["under_way"] + live["under_way"])
    assert dry["cooldown"]["total"] > 0
    reasons = {row["reason"] for row in dry["decisions"] + live["decisions"]}
    assert {"interval", "excluded"} & reasons
    assert explained["findings"][0]["reason"] == "excluded"


async def test_the_page_in_a_real_browser(postgres_url: str, tmp_path: Path) -> None:
    chromium = browser.chromium()
    async with fleet(postgres_url) as (_, live_port, dry, dry_port):
        url = f"http://127.0.0.1:{dry_port}/status"
        dom = await browser.dump_dom(chromium, url, tmp_path / "profile")
        shot = tmp_path / "status.png"
        await browser.screenshot(chromium, url, shot, tmp_path / "profile")
        live = await status_of(live_port)
        # The host the dry daemon met in cooldown: which of the fleet's 40 decisions a second
        # are the page's last 25 depends on the moment, but why this host waits does not.
        skipped = next(line for line in dry.lines if "host restarted" in line.get("message", ""))
        host = skipped["message"].split()[1].rstrip(":")
        why = await browser.dump_dom(chromium, f"http://127.0.0.1:{dry_port}/explain?host={host}",
                                     tmp_path / "profile")
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert 'id="dry-run"' in dom
    assert "DRY RUN: this daemon decides and records" in dom
    assert live["daemon"]["instance_id"] in dom
    assert "(this one)" in dom
    for text in ("<td>trio</td>", "<td>asyncio</td>", '<section id="under-way">',
                 '<section id="cooldown">', '<section id="controls">', "cattle-0*"):
        assert text in dom, text
    assert '<section id="decisions">' in dom
    assert 'class="outcome-' in dom
    assert host in why
    assert '<code class="reason">interval</code>' in why
    assert '<meta http-equiv="refresh" content="2">' in dom
