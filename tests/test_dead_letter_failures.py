"""Dead letters that cannot be published are the message's failure, not the daemon's: the
real emulator (a dead-letter topic deleted under a running daemon), and a double of real
Pub/Sub's publish limits in front of it (the emulator takes 101 attributes; Pub/Sub answers
HTTP 400). Both backends."""

from __future__ import annotations

import anyio
import httpx
import pytest

from mandrill.ledger import open_ledger
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.sources.limits import MAX_ATTRIBUTES
from mandrill.sources.pubsub import (
    DEAD_LETTER_REASON_ATTRIBUTE,
    open_pubsub_source,
    open_pubsub_topic,
    setup_pubsub,
)
from mandrill.worker import WorkerSettings
from tests.fixtures.emulator import PubSubEmulator, PubSubNames
from tests.support.daemon import run_to_end
from tests.support.fakes import ScriptedRestarter, payloads
from tests.support.holding_proxy import HoldingProxy
from tests.support.pubsub_limits import refuse_over_limits

pytestmark = pytest.mark.emulator

#: Where mandrill names what it had to cut from a dead letter's attributes.
CUT_ATTRIBUTE = "mandrill_attributes_cut"


async def prepare(names: PubSubNames, backend: str) -> None:
    await setup_pubsub(
        project=names.project, topic=names.topic, subscription=names.subscription,
        backend=backend, ack_deadline=60, dead_letter_topic=names.dead_letter_topic,
    )


async def publish(names: PubSubNames, backend: str, messages) -> None:
    async with open_pubsub_topic(project=names.project, topic=names.topic, backend=backend) as t:
        await t.publish(messages)


async def test_a_dead_letter_topic_gone_fails_the_message_not_the_daemon(
    pubsub_emulator: PubSubEmulator, pubsub_names: PubSubNames, backend_name: str
) -> None:
    # The dead-letter topic is deleted under a running daemon (HTTP 404 on publish). Before,
    # the daemon stopped, and so did every daemon that pulled the message after it; and
    # the ledger said 'dead_letter' for a message published nowhere. Now the message is
    # handed back (Pub/Sub's dead-letter policy takes it from there) and the daemon goes on.
    names = pubsub_names
    await prepare(names, backend_name)
    ledger = await open_ledger(":memory:")
    async with open_pubsub_source(
        project=names.project, subscription=names.subscription, backend=backend_name,
        dead_letter_topic=names.dead_letter_topic,
    ) as source:
        async with httpx.AsyncClient() as http:
            gone = await http.delete(
                f"{pubsub_emulator.url}/v1/projects/{names.project}/topics/"
                f"{names.dead_letter_topic}"
            )
            assert gone.status_code == 200, gone.text
        await publish(names, backend_name, [(b"{not json", {})])
        await publish(names, backend_name, payloads("good-1"))
        with anyio.fail_after(30):
            counters = await serve(
                ServiceSettings(handle_signals=False, stop_after=1, grace=2),
                WorkerSettings(), Parts(source, ledger, ScriptedRestarter()),
            )
    saved = await ledger.saved_messages(status="dead_letter")
    await ledger.aclose()
    assert counters.restarted == 1
    assert counters.dead_lettered == 0
    assert counters.dead_letter_failures >= 1
    assert saved == []  # published nowhere: not recorded as a dead letter


async def test_a_dead_letter_is_published_within_pubsubs_limits(
    pubsub_emulator: PubSubEmulator, pubsub_names: PubSubNames, backend_name: str
) -> None:
    # An invalid message with 99 attributes: mandrill adds its own to the dead letter.
    # Before, it republished 101 (over the limit of 100: HTTP 400 from Pub/Sub) and stopped.
    # Now what does not fit is cut, and named in an attribute of the dead letter.
    names = pubsub_names
    await prepare(names, backend_name)
    attributes = {f"key-{number:02d}": "x" for number in range(99)}
    await publish(names, backend_name, [(b"{not json", attributes)])
    ledger = await open_ledger(":memory:")
    with HoldingProxy(pubsub_emulator.host, refuse=refuse_over_limits).running() as limits:
        async with open_pubsub_source(
            project=names.project, subscription=names.subscription, backend=backend_name,
            dead_letter_topic=names.dead_letter_topic, emulator_host=limits.address,
        ) as source:
            with anyio.fail_after(30):
                counters = await serve(
                    ServiceSettings(handle_signals=False, stop_after=1, grace=1),
                    WorkerSettings(), Parts(source, ledger, ScriptedRestarter()),
                )
    await ledger.aclose()
    assert (counters.dead_lettered, limits.refused) == (1, 0)
    async with open_pubsub_source(
        project=names.project, subscription=names.dead_letter_subscription,
        backend=backend_name,
    ) as dead:
        with anyio.fail_after(15):
            (letter,) = await dead.pull(10)
        await dead.acknowledge([letter.ack_id])
    assert len(letter.attributes) == MAX_ATTRIBUTES
    assert letter.attributes[DEAD_LETTER_REASON_ATTRIBUTE].startswith("invalid:")
    kept = {key for key in attributes if key in letter.attributes}
    cut = set(attributes) - kept
    assert cut
    assert letter.attributes[CUT_ATTRIBUTE] == ",".join(sorted(cut))


@pytest.mark.slow
async def test_a_missing_dead_letter_topic_stops_the_daemon_at_start(
    pubsub_names: PubSubNames, backend_name: str, tmp_path
) -> None:
    names = pubsub_names
    await setup_pubsub(project=names.project, topic=names.topic,
                       subscription=names.subscription, backend=backend_name)
    code, _, err = await run_to_end([
        "run", "--source", "pubsub", "--project", names.project, "--backend", backend_name,
        "--subscription", names.subscription, "--dead-letter-topic", "no-such-topic",
        "--ledger", str(tmp_path / "l.db"), "--log-format", "text",
    ])
    assert code == 2, err
    lines = [line for line in err.splitlines() if "no-such-topic" in line]
    assert len(lines) == 1, err
    assert "does not exist" in lines[0]
    assert "Traceback" not in err
