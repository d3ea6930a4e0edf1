"""serve() and the CLI against the real Pub/Sub emulator, on both backends."""

from __future__ import annotations

import sqlite3

import anyio
import pytest

from mandrill import config
from mandrill.ledger import open_ledger
from mandrill.message import encode_payload
from mandrill.parts import open_parts
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.shutdown import Shutdown
from mandrill.sources import bridge as bridge_module
from mandrill.sources.pubsub import (
    DEAD_LETTER_REASON_ATTRIBUTE,
    open_pubsub_source,
    open_pubsub_topic,
    setup_pubsub,
)
from mandrill.worker import WorkerSettings
from tests.fixtures.emulator import PubSubNames
from tests.fixtures.metadata import hide_credentials
from tests.support.daemon import run_to_end
from tests.support.fakes import ScriptedRestarter, payloads

pytestmark = pytest.mark.emulator


async def prepare(names: PubSubNames, backend: str, *, dead_letters: bool = False) -> None:
    await setup_pubsub(
        project=names.project, topic=names.topic, subscription=names.subscription,
        backend=backend, ack_deadline=60,
        dead_letter_topic=names.dead_letter_topic if dead_letters else None,
    )


async def publish(names: PubSubNames, backend: str, messages) -> None:
    async with open_pubsub_topic(project=names.project, topic=names.topic, backend=backend) as t:
        await t.publish(messages)


async def test_a_failed_restart_is_redelivered_by_pubsub_then_succeeds(pubsub_names, backend_name):
    await prepare(pubsub_names, backend_name)
    await publish(pubsub_names, backend_name, payloads("flaky-1"))
    restarter = ScriptedRestarter(fail_first={"flaky-1": 1})
    ledger = await open_ledger(":memory:")
    async with open_pubsub_source(
        project=pubsub_names.project, subscription=pubsub_names.subscription,
        backend=backend_name,
    ) as source:
        with anyio.fail_after(30):
            counters = await serve(
                ServiceSettings(handle_signals=False, stop_after=1, grace=1),
                WorkerSettings(), Parts(source, ledger, restarter),
            )
    counts = await ledger.counts()
    await ledger.aclose()
    assert restarter.calls["flaky-1"] == 2
    assert (counters.nacked, counters.acked) == (1, 1)
    assert counts["restarts_failed"] == 1
    assert counts["restarts_restarted"] == 1


async def test_nacked_at_shutdown_the_message_goes_to_the_next_consumer_at_once(
    pubsub_names, backend_name
):
    await prepare(pubsub_names, backend_name)  # 60 s ack deadline
    await publish(pubsub_names, backend_name, payloads("held-1"))
    restarter = ScriptedRestarter(block=["held-1"])
    ledger = await open_ledger(":memory:")
    shutdown = Shutdown()
    async with (
        open_pubsub_source(
            project=pubsub_names.project, subscription=pubsub_names.subscription,
            backend=backend_name,
        ) as source,
        anyio.create_task_group() as tg,
    ):
        # max_in_flight=1: no pull is outstanding while the message is held. The
        # emulator (unlike Pub/Sub) may hand a nacked message to a pull its client has
        # abandoned, which delays its redelivery by an ack deadline. With --retry-unknown,
        # a restart cut short by the shutdown is handed back (else it counts as done).
        tg.start_soon(lambda: serve(
            ServiceSettings(handle_signals=False, grace=0.1, max_in_flight=1),
            WorkerSettings(retry_unknown=True),
            Parts(source, ledger, restarter), shutdown=shutdown,
        ))
        with anyio.fail_after(30):
            await restarter.started.wait()
        shutdown.request("test")
    await ledger.aclose()
    # A second daemon gets it well within the 60 s ack deadline: it was nacked.
    async with open_pubsub_source(
        project=pubsub_names.project, subscription=pubsub_names.subscription,
        backend=backend_name,
    ) as second:
        with anyio.fail_after(15):
            deliveries = await second.pull(10)
        assert [d.data for d in deliveries] == [encode_payload("held-1")]
        assert deliveries[0].message_id
        await second.acknowledge([d.ack_id for d in deliveries])


async def test_invalid_payloads_go_to_the_dead_letter_topic(pubsub_names, backend_name):
    await prepare(pubsub_names, backend_name, dead_letters=True)
    await publish(pubsub_names, backend_name, [(b"{not json", {"origin": "test"})])
    await publish(pubsub_names, backend_name, payloads("good-1"))
    ledger = await open_ledger(":memory:")
    async with open_pubsub_source(
        project=pubsub_names.project, subscription=pubsub_names.subscription,
        backend=backend_name, dead_letter_topic=pubsub_names.dead_letter_topic,
    ) as source:
        with anyio.fail_after(30):
            counters = await serve(
                ServiceSettings(handle_signals=False, stop_after=2, grace=1),
                WorkerSettings(), Parts(source, ledger, ScriptedRestarter()),
            )
    await ledger.aclose()
    assert (counters.dead_lettered, counters.restarted) == (1, 1)
    async with open_pubsub_source(
        project=pubsub_names.project, subscription=f"{pubsub_names.dead_letter_topic}-sub",
        backend=backend_name,
    ) as dead:
        with anyio.fail_after(15):
            (letter,) = await dead.pull(10)
        await dead.acknowledge([letter.ack_id])
    assert letter.data == b"{not json"
    assert letter.attributes["origin"] == "test"
    reason = letter.attributes[DEAD_LETTER_REASON_ATTRIBUTE]
    assert reason.startswith("invalid: payload is not JSON")


@pytest.mark.slow
async def test_setup_publish_run_through_the_cli(pubsub_names, backend_name, tmp_path):
    names = pubsub_names
    common = ["--project", names.project, "--topic", names.topic, "--backend", backend_name]
    for _ in range(2):  # setup is idempotent
        code, _, err = await run_to_end([
            "setup", *common, "--subscription", names.subscription,
            "--dead-letter-topic", names.dead_letter_topic,
        ])
        assert code == 0, err
    code, _, err = await run_to_end(["publish", *common, "--count", "1000", "--rate", "0"])
    assert code == 0, err
    db = str(tmp_path / "ledger.db")
    code, _, err = await run_to_end([
        "run", "--source", "pubsub", "--project", names.project, "--backend", backend_name,
        "--subscription", names.subscription, "--count", "1000", "--ledger", db,
        "--restart-latency", "0s", "--restart-failure-rate", "0", "--log-format", "json",
    ], seconds=120)
    assert code == 0, err
    assert "unsettled 0" in err
    with sqlite3.connect(db) as conn:
        (messages,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
        (decided,) = conn.execute(
            "SELECT COUNT(DISTINCT message_id) FROM restarts WHERE outcome IN"
            " ('restarted', 'skipped')"
        ).fetchone()
    assert messages == decided == 1000


@pytest.mark.slow
async def test_a_missing_subscription_exits_1_with_one_line(pubsub_names, backend_name, tmp_path):
    code, _, err = await run_to_end([
        "run", "--source", "pubsub", "--project", pubsub_names.project, "--backend", backend_name,
        "--subscription", "no-such-subscription", "--ledger", str(tmp_path / "l.db"),
        "--log-format", "text",
    ])
    assert code == 1
    lines = [line for line in err.splitlines() if "stopped:" in line]
    assert len(lines) == 1
    assert "not found" in lines[0]
    assert "Traceback" not in err


@pytest.mark.slow
async def test_replay_republishes_what_the_ledger_saved(pubsub_names, backend_name, tmp_path):
    names = pubsub_names
    await prepare(names, backend_name)
    await publish(names, backend_name, payloads("web-1", "web-2", "db-1"))
    db = str(tmp_path / "ledger.db")
    common = ["--project", names.project, "--backend", backend_name]
    code, _, err = await run_to_end([
        "run", "--source", "pubsub", *common, "--subscription", names.subscription,
        "--count", "3", "--ledger", db, "--restart-latency", "0s",
        "--restart-failure-rate", "0",
    ])
    assert code == 0, err
    # Read the replay through a new subscription: the emulator may hand messages on the
    # first one to the pull the daemon abandoned when it stopped (an emulator quirk).
    replays = f"{names.subscription}-replays"
    await setup_pubsub(project=names.project, topic=names.topic, subscription=replays,
                       backend=backend_name)
    code, out, err = await run_to_end([
        "replay", *common, "--topic", names.topic, "--ledger", db,
        "--host", "web-2.example.net",
    ])
    assert code == 0, err
    assert out.strip() == "1"
    async with open_pubsub_source(
        project=names.project, subscription=replays, backend=backend_name
    ) as source:
        with anyio.fail_after(15):
            (replayed,) = await source.pull(10)
        await source.acknowledge([replayed.ack_id])
    assert replayed.data == encode_payload("web-2")
    assert "mandrill_replay_of" in replayed.attributes
    # An instance name works too, completed with --domain as the daemon does.
    code, out, err = await run_to_end([
        "replay", *common, "--topic", names.topic, "--ledger", db, "--host", "db-1",
    ])
    assert (code, out.strip()) == (0, "1"), err


async def test_pubsub_and_the_gce_restarter_share_one_bridge(
    pubsub_names, backend_name, monkeypatch, tmp_path
):
    # On trio each bridge is an asyncio thread of its own: count the threads started.
    await prepare(pubsub_names, backend_name)
    hide_credentials(monkeypatch, tmp_path)
    threads = []
    start_portal = bridge_module.start_blocking_portal

    def counting_start(*args, **kwargs):
        threads.append(args)
        return start_portal(*args, **kwargs)

    monkeypatch.setattr(bridge_module, "start_blocking_portal", counting_start)
    flags = {
        "source": "pubsub", "project": pubsub_names.project,
        "subscription": pubsub_names.subscription, "restarter": "gce",
        "gce_project": "my-project", "gce_zone": "europe-west1-b", "backend": backend_name,
        "ledger": str(tmp_path / "l.db"),
    }
    cfg = config.command_config("run", flags, {})
    async with open_parts(cfg) as parts:
        assert parts.source._bridge is parts.restarter._bridge
    assert len(threads) == (1 if backend_name == "trio" else 0)


async def test_setup_and_publish_take_the_project_from_google_cloud_project(
    pubsub_names, backend_name
):
    names = pubsub_names
    env = {"GOOGLE_CLOUD_PROJECT": names.project, "MANDRILL_PROJECT": ""}
    common = ["--topic", names.topic, "--backend", backend_name, "--log-format", "text"]
    code, _, err = await run_to_end(["setup", *common, "--subscription", names.subscription],
                                    env=env)
    assert code == 0, err
    assert f"--project not given: project {names.project}, from GOOGLE_CLOUD_PROJECT" in err
    code, _, err = await run_to_end(["publish", *common, "--count", "3", "--rate", "0"],
                                    env=env)
    assert code == 0, err
