"""``mandrill replay`` as a real process against the emulator, on SQLite and PostgreSQL:
what it refuses, what ``--dry-run`` lists, and ``--limit``."""

from __future__ import annotations

import json

import anyio
import pytest

from mandrill.sources.pubsub import open_pubsub_source, setup_pubsub
from tests.fixtures.emulator import PubSubNames
from tests.ledger import T0, Clock, decide, message, running
from tests.ledger.conftest import POSTGRES, url_for
from tests.support.daemon import run_to_end

pytestmark = [pytest.mark.emulator, pytest.mark.slow]

HOSTS = ("web-1", "web-2", "db-1", "db-2")


@pytest.fixture(params=["sqlite-file", POSTGRES])
async def saved(request, tmp_path) -> str:
    """A ledger that saved four messages, ``m0`` … ``m3`` (``HOSTS``), one second apart."""
    url = url_for(request.param, request, tmp_path)
    clock = Clock()
    async with running(url, clock) as ledger:
        for n, host in enumerate(HOSTS):
            clock.now = T0 + n
            await decide(ledger, message(f"m{n}", host))
    return url


async def test_replay_without_a_filter_is_refused(saved, pubsub_names, backend_name):
    code, out, err = await run_to_end([
        "replay", "--backend", backend_name, "--project", pubsub_names.project,
        "--topic", pubsub_names.topic, "--ledger", saved,
    ])
    assert code == 2
    assert out == ""
    assert err == (
        "mandrill: error: replay: no --host, --since or --until given: pass --all to replay"
        " every saved message (try --dry-run first)\n"
    )


async def test_a_dry_run_lists_and_publishes_nothing(saved, backend_name):
    """No project and no topic: a replay that tried to publish could not (exit 2)."""
    code, out, err = await run_to_end(
        ["replay", "--backend", backend_name, "--ledger", saved, "--dry-run", "--all",
         "--log-format", "json"],
        env={"MANDRILL_PROJECT": ""},
    )
    assert code == 0, err
    header, *rows = [line.split("\t") for line in out.splitlines()]
    assert header == ["first seen (UTC)", "host", "message", "reason"]
    assert [row[2] for row in rows] == ["m0", "m1", "m2", "m3"]
    assert [row[1] for row in rows] == [f"{host}.example.net" for host in HOSTS]
    (said,) = [json.loads(line)["message"] for line in err.splitlines()]
    assert said == "dry run: 4 messages would be replayed to mandrill; none was"

    code, out, _ = await run_to_end(
        ["replay", "--backend", backend_name, "--ledger", saved, "--dry-run",
         "--host", "db-2", "--limit", "5"],
        env={"MANDRILL_PROJECT": ""},
    )
    assert code == 0
    assert [line.split("\t")[2] for line in out.splitlines()[1:]] == ["m3"]


async def test_limit_replays_the_oldest(saved, pubsub_names: PubSubNames, backend_name):
    names = pubsub_names
    await setup_pubsub(project=names.project, topic=names.topic,
                       subscription=names.subscription, backend=backend_name)
    code, out, err = await run_to_end([
        "replay", "--backend", backend_name, "--project", names.project, "--topic",
        names.topic, "--ledger", saved, "--all", "--limit", "2",
    ])
    assert code == 0, err
    assert out.strip() == "2"
    replayed: list[str] = []
    async with open_pubsub_source(
        project=names.project, subscription=names.subscription, backend=backend_name
    ) as source:
        with anyio.fail_after(15):
            while len(replayed) < 2:
                pulled = await source.pull(10)
                await source.acknowledge([d.ack_id for d in pulled])
                replayed += [d.attributes["mandrill_replay_of"] for d in pulled]
    assert sorted(replayed) == ["m0", "m1"]


async def test_a_bad_limit_is_one_line(saved):
    code, _, err = await run_to_end(
        ["replay", "--ledger", saved, "--all", "--dry-run", "--limit", "0"]
    )
    assert code == 2
    assert err == "mandrill: error: --limit: '0' must be at least 1\n"
