"""The reliability scenarios, small, in the regular suite: real daemons (``--backend`` as
the test's), the session's emulator, PostgreSQL for the fleet ones.

Each test runs one scenario of :mod:`tests.reliability.scenarios` at scale 1 and checks
the promise (nothing lost, nothing restarted twice; no crash is checked by the scenario).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from mandrill.ledger import open_ledger
from tests.fixtures.emulator import PubSubEmulator, find_launcher
from tests.reliability import scenarios
from tests.reliability.harness import (
    LedgerRef,
    Misjudged,
    PubSubNames,
    eventually,
    instance_payload,
    plain_errors,
    run_args,
    running_daemon,
)
from tests.reliability.scenarios import COMMON, DRAIN_SECONDS, START_SECONDS, Env

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def launcher() -> Path:
    return find_launcher()


@pytest.fixture
def env(
    pubsub_emulator: PubSubEmulator,
    postgres_admin_url: str,
    tmp_path: Path,
    backend_name: str,
    launcher: Path,
) -> Env:
    return Env(
        emulator=pubsub_emulator.host,
        postgres_admin_url=postgres_admin_url,
        workdir=tmp_path,
        harness_backend=backend_name,
        launcher=launcher,
    )


# -- the scenarios ----------------------------------------------------------------------------


@pytest.mark.postgres
async def test_sigkill_while_holding(env: Env, backend_name: str) -> None:
    with plain_errors():
        result = await scenarios.sigkill_while_holding(env, backend_name, 1)
    result.check()
    assert result.notes["stranded_claims"] > 0, "nothing was held mid-restart at the kill"


@pytest.mark.postgres
async def test_sigkill_mid_restart(env: Env, backend_name: str) -> None:
    with plain_errors():
        result = await scenarios.sigkill_mid_restart(env, backend_name, 1)
    result.check()


async def test_sigterm_loop(env: Env, backend_name: str) -> None:
    with plain_errors():
        result = await scenarios.sigterm_loop(env, backend_name, 1)
    result.check()
    assert result.notes["interrupted_restarts"] > 0, "no stop cut a restart short"


async def test_emulator_outage(env: Env, backend_name: str) -> None:
    with plain_errors():
        result = await scenarios.emulator_outage(env, backend_name, 1)
    result.check()


@pytest.mark.postgres
async def test_ledger_outage_shorter_than_the_limit(env: Env, backend_name: str) -> None:
    with plain_errors():
        result = await scenarios.ledger_outage_recovers(env, backend_name, 1)
    result.check()


@pytest.mark.postgres
async def test_ledger_outage_longer_than_the_limit(env: Env, backend_name: str) -> None:
    with plain_errors():
        result = await scenarios.ledger_outage_exits(env, backend_name, 1)
    result.check()


async def test_poison_message(env: Env, backend_name: str) -> None:
    with plain_errors():
        result = await scenarios.poison_message(env, backend_name, 1)
    result.check()


async def test_bad_input(env: Env, backend_name: str) -> None:
    with plain_errors():
        result = await scenarios.bad_input(env, backend_name, 1)
    result.check()


async def test_load(env: Env, backend_name: str) -> None:
    with plain_errors():
        result = await scenarios.load(env, backend_name, 1)
    result.check()
    assert result.notes["rss_growth_mb"] < 50, result.notes
    assert result.notes["max_s"] < 5, result.notes


# -- known bugs, one probe each -------------------------------------------------------------
#
# What these pin down does not depend on the event loop (a parser, a ledger rule, a flag),
# so they run on asyncio only, to keep the file's time down.

ASYNCIO_ONLY = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {"debug": True}), id="asyncio")]
)


async def _run_until_processed(env: Env, backend: str, data: list[bytes], name: str) -> tuple:
    names = PubSubNames.fresh(name)
    await env.pubsub.setup(names)
    ids = await env.pubsub.publish(names, [(payload, {}) for payload in data])
    ledger = LedgerRef(str(env.path(name, ".db")))
    args = run_args(backend=backend, names=names, ledger=ledger.url,
                    extra=[*COMMON, "--restart-latency", "0s"])
    async with running_daemon(args, emulator=env.emulator) as daemon:
        facts = await ledger.wait_processed(ids, seconds=DRAIN_SECONDS, daemons=[daemon])
        assert await daemon.stop() == 0, daemon.tail()
    return ids, facts


@ASYNCIO_ONLY
async def test_a_json_integer_too_long_for_python_is_dead_lettered(
    env: Env, backend_name: str
) -> None:
    huge_int = b'{"instance_name": "cattle-1", "n": 1' + b"0" * 5000 + b"}"
    ids, facts = await _run_until_processed(
        env, backend_name, [instance_payload("before-1"), huge_int, instance_payload("after-1")],
        "bigint",
    )
    assert facts.messages[ids[1]][0] == "dead_letter"


@ASYNCIO_ONLY
async def test_an_instance_name_ending_in_a_newline_is_dead_lettered(
    env: Env, backend_name: str
) -> None:
    ids, facts = await _run_until_processed(
        env, backend_name, [json.dumps({"instance_name": "cattle-1\n"}).encode()], "newline"
    )
    status, reason, _ = facts.messages[ids[0]]
    if status != "dead_letter":
        raise Misjudged(f"taken for valid: {facts.decisions.get(ids[0])}")
    assert reason.startswith("invalid: ")


async def _ledger_with_claim(path: Path, message_id: str, hostname: str, age: float) -> None:
    """A ledger in which a daemon claimed ``message_id`` ``age`` seconds ago and then died."""
    ledger = await open_ledger(str(path))  # creates the tables
    await ledger.aclose()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO restarts (message_id, hostname, decided_at, outcome)"
            " VALUES (?, ?, ?, 'restarting')",
            (message_id, hostname, time.time() - age),
        )


@ASYNCIO_ONLY
async def test_a_dead_daemons_claim_is_resolved_after_the_instance_timeout(
    env: Env, backend_name: str
) -> None:
    names = PubSubNames.fresh("stale")
    await env.pubsub.setup(names)
    (mid,) = await env.pubsub.publish(names, [(instance_payload("stale-1"), {})])
    ledger = LedgerRef(str(env.path("stale", ".db")))
    await _ledger_with_claim(Path(ledger.url), mid, "stale-1.example.net", age=30)
    args = run_args(backend=backend_name, names=names, ledger=ledger.url, extra=[
        *COMMON, "--restart-latency", "0s", "--instance-timeout", "10s",
    ])
    async with running_daemon(args, emulator=env.emulator) as daemon:
        await daemon.wait_for_message("ready: consuming", seconds=START_SECONDS)
        facts = await ledger.wait_processed([mid], seconds=DRAIN_SECONDS, daemons=[daemon])
        assert await daemon.stop() == 0
    # Settled with the record of why: not restarted a second time.
    assert facts.outcomes(mid) == ["unknown"]


@ASYNCIO_ONLY
async def test_a_second_message_for_a_host_under_restart_waits_for_its_outcome(
    env: Env, backend_name: str
) -> None:
    # Issue 10, bug 1, as reported: two messages for one host, restarts that always fail.
    # The second was skipped as "host restarted 0s ago" while the first restart was under
    # way, and the host was never restarted. It now waits, and gets its own attempts.
    names = PubSubNames.fresh("busyhost")
    await env.pubsub.setup(names)
    ids = await env.pubsub.publish(names, [(instance_payload("cattle-fail"), {})] * 2)
    ledger = LedgerRef(str(env.path("busyhost", ".db")))
    args = run_args(backend=backend_name, names=names, ledger=ledger.url, extra=[
        "--restart-failure-rate", "1", "--restart-latency", "1s", "--max-attempts", "2",
        "--count", "2",
    ])
    async with running_daemon(args, emulator=env.emulator) as daemon:
        assert await daemon.exit_code(seconds=DRAIN_SECONDS) == 0, daemon.tail()
    facts = await ledger.facts()
    for mid in ids:
        assert facts.outcomes(mid) == ["failed", "failed"], facts.decisions
        assert facts.messages[mid][:2] == ("dead_letter", "restart failed 2 times")


class Spinning(AssertionError):
    """A message is redelivered and nacked over and over with no pause."""


@ASYNCIO_ONLY
async def test_a_message_claimed_elsewhere_is_not_spun_on(env: Env, backend_name: str) -> None:
    names = PubSubNames.fresh("busy")
    await env.pubsub.setup(names)
    (mid,) = await env.pubsub.publish(names, [(instance_payload("busy-1"), {})])
    ledger = LedgerRef(str(env.path("busy", ".db")))
    await _ledger_with_claim(Path(ledger.url), mid, "busy-1.example.net", age=0)
    args = run_args(backend=backend_name, names=names, ledger=ledger.url,
                    extra=[*COMMON, "--restart-latency", "0s"])
    async with running_daemon(args, emulator=env.emulator) as daemon:
        async def delivered() -> int | None:
            facts = await ledger.facts()
            return facts.messages.get(mid, ("", "", 0))[2] or None

        await eventually(delivered, seconds=START_SECONDS, what="a first delivery")
        # A measuring window, left early once the count says it all.
        window = 3.0
        deadline = anyio.current_time() + window
        deliveries = 0
        while deliveries <= SPIN_LIMIT and anyio.current_time() < deadline:
            deliveries = await delivered() or 0
            await anyio.sleep(0.1)
        assert await daemon.stop() == 0
    if deliveries > SPIN_LIMIT:
        raise Spinning(f"delivered {deliveries} times within {window:.0f} s")


#: Deliveries of one message within a few seconds that count as spinning on it.
SPIN_LIMIT = 10
