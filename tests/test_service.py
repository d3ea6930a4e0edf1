"""serve() end to end in-process: the real broker, the real SQLite ledger, a scripted
restarter. Every test runs under asyncio and trio."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from mandrill.errors import SourceError
from mandrill.ledger import SQLLedger, open_ledger
from mandrill.message import encode_payload
from mandrill.obs.collector import build_registry
from mandrill.obs.counters import Counters
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.shutdown import Shutdown
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import WorkerSettings
from tests.support.fakes import (
    LosesFirstAcks,
    ScriptedRestarter,
    SlowSettlement,
    payloads,
)

DAY = 86400.0


@pytest.fixture
async def ledger() -> AsyncIterator[SQLLedger]:
    ledger = await open_ledger(":memory:")
    yield ledger
    await ledger.aclose()


async def run(
    broker: MemoryBroker,
    ledger: Any,
    restarter: Any,
    *,
    stop_after: int | None,
    shutdown: Shutdown | None = None,
    worker: WorkerSettings | None = None,
    counters: Counters | None = None,
    **settings: Any,
) -> Counters:
    settings.setdefault("grace", 1.0)
    with anyio.fail_after(20):
        return await serve(
            ServiceSettings(handle_signals=False, stop_after=stop_after, **settings),
            worker or WorkerSettings(),
            Parts(broker, ledger, restarter),
            shutdown=shutdown,
            counters=counters,
        )


async def test_every_message_is_restarted_and_acked(ledger):
    broker = MemoryBroker()
    await broker.publish(payloads(*(f"host-{i}" for i in range(50))))
    restarter = ScriptedRestarter()
    counters = await run(broker, ledger, restarter, stop_after=50)
    assert counters.restarted == counters.acked == 50
    assert broker.backlog == 0
    assert sum(restarter.calls.values()) == 50
    assert (await ledger.counts())["restarts_restarted"] == 50


async def test_failed_restart_is_redelivered_then_succeeds(ledger):
    broker = MemoryBroker()
    await broker.publish(payloads("flaky"))
    restarter = ScriptedRestarter(fail_first={"flaky": 1})
    counters = await run(broker, ledger, restarter, stop_after=1)
    assert restarter.calls["flaky"] == 2
    assert (counters.nacked, counters.acked, counters.restarted) == (1, 1, 1)
    assert broker.stats.redelivered == 1
    counts = await ledger.counts()
    assert counts["restarts_failed"] == 1
    assert counts["restarts_restarted"] == 1
    assert counts["deliveries_received"] == 2


async def test_a_failed_save_is_logged_and_still_acked(ledger):
    # The database refuses the message's row (as a full disk would): the talk's rule is
    # that a failed save is logged, not retried, and the restart goes on.
    def refuse_saves(cur):
        cur.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages"
                    " BEGIN SELECT RAISE(ABORT, 'disk full (simulated)'); END")

    await ledger._tx.run(refuse_saves)
    broker = MemoryBroker()
    await broker.publish(payloads("web-1"))
    counters = await run(broker, ledger, ScriptedRestarter(), stop_after=1)
    assert (counters.save_failed, counters.restarted, counters.acked) == (1, 1, 1)
    assert broker.backlog == 0


async def test_invalid_payloads_are_dead_lettered_and_the_service_goes_on(ledger):
    broker = MemoryBroker()
    bad = [b"not json", b"[]", b'{"instance_name": "; rm -rf /"}', b"\xff" * 10]
    await broker.publish([(data, {}) for data in bad])
    await broker.publish(payloads("good-1", "good-2"))
    counters = await run(broker, ledger, ScriptedRestarter(), stop_after=6)
    assert counters.dead_lettered == 4
    assert counters.restarted == 2
    reasons = [dead.reason for dead in broker.dead_letters]
    assert all(reason.startswith("invalid: ") for reason in reasons)
    assert any("not a valid host label" in reason for reason in reasons)
    saved = await ledger.saved_messages(status="dead_letter")
    assert sorted(m.data for m in saved) == sorted(bad)
    assert broker.backlog == 0


async def test_a_host_is_not_restarted_twice_within_the_interval(ledger):
    broker = MemoryBroker()
    await broker.publish(payloads("db-1", "db-1"))
    restarter = ScriptedRestarter()
    # The second may come while the first's outcome is being recorded (its slot is freed
    # as the outcome is handed on): it then waits for it, handed back for 0.2 s.
    counters = await run(broker, ledger, restarter, stop_after=2, max_in_flight=1, defer=0.2)
    assert restarter.calls["db-1"] == 1
    assert (counters.restarted, counters.skipped) == (1, 1)
    rows = await ledger.history(hostname="db-1.example.net")
    assert [row.outcome for row in rows] == ["skipped", "restarted"]
    assert rows[0].detail.startswith("host restarted")


async def test_a_host_is_restarted_again_once_the_interval_has_passed():
    broker = MemoryBroker()
    restarter = ScriptedRestarter()
    clock = {"now": time.time() - 8 * DAY}
    ledger = await open_ledger(":memory:", clock=lambda: clock["now"])
    await broker.publish(payloads("db-1"))
    await run(broker, ledger, restarter, stop_after=1)
    clock["now"] += 8 * DAY  # eight days later
    await broker.publish(payloads("db-1"))
    counters = await run(broker, ledger, restarter, stop_after=1)
    await ledger.aclose()
    assert counters.restarted == 1
    assert restarter.calls["db-1"] == 2


async def test_a_redelivered_message_does_not_restart_its_host_twice(ledger):
    # The first ack is lost, so the broker redelivers a message that was already done.
    broker = LosesFirstAcks(1, ack_deadline=0.3, pull_wait=0.05)
    await broker.publish(payloads("api-1"))
    restarter = ScriptedRestarter()
    counters = await run(broker, ledger, restarter, stop_after=2)
    assert restarter.calls["api-1"] == 1
    assert counters.duplicates == 1
    assert broker.backlog == 0


async def test_the_lease_keeper_holds_a_slow_message(ledger):
    broker = MemoryBroker(ack_deadline=0.2, pull_wait=0.05)
    await broker.publish(payloads("slow-1"))
    restarter = ScriptedRestarter(latency=1.0)  # five ack deadlines
    counters = await run(broker, ledger, restarter, stop_after=1)
    assert broker.stats.redelivered == 0
    assert broker.stats.expired == 0
    assert counters.lease_extensions >= 3
    assert restarter.calls["slow-1"] == 1


async def test_a_poison_message_is_dead_lettered_after_max_attempts(ledger, caplog):
    caplog.set_level(logging.WARNING, "mandrill.worker")
    broker = MemoryBroker()
    await broker.publish(payloads("cursed"))
    restarter = ScriptedRestarter(always_fail=["cursed"])
    worker = WorkerSettings(max_attempts=3)
    counters = await run(broker, ledger, restarter, stop_after=1, worker=worker)
    assert restarter.calls["cursed"] == 3
    assert [dead.reason for dead in broker.dead_letters] == ["restart failed 3 times"]
    assert counters.dead_lettered == 1
    assert broker.backlog == 0
    assert "restart of cursed.example.net failed 3 times; dead-lettering it" in caplog.text


async def test_backpressure_bounds_what_is_pulled(ledger):
    broker = MemoryBroker()
    await broker.publish(payloads(*(f"stuck-{i}" for i in range(10))))
    restarter = ScriptedRestarter(block=[f"stuck-{i}" for i in range(10)])
    shutdown = Shutdown()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run(broker, ledger, restarter, stop_after=None,
                                  shutdown=shutdown, max_in_flight=3, grace=0))
        await restarter.started.wait()
        await anyio.wait_all_tasks_blocked()
        assert broker.stats.delivered == 3
        shutdown.request("test")
    # The three restarts began: cut short by the end of the grace, they count as done.
    assert broker.stats.acked == 3
    assert broker.backlog == 7


async def test_a_restart_cut_short_by_the_grace_counts_as_unknown(ledger):
    # It began, so it may have happened: recorded 'unknown' and counted, as for a daemon
    # killed at that point; its message is settled, not restarted again.
    broker = MemoryBroker(ack_deadline=600)
    await broker.publish(payloads("hung"))
    restarter = ScriptedRestarter(block=["hung"])
    shutdown = Shutdown()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run(broker, ledger, restarter, stop_after=None,
                                  shutdown=shutdown, grace=0.05))
        await restarter.started.wait()
        shutdown.request("test")
    assert (broker.stats.acked, broker.stats.nacked, broker.backlog) == (1, 0, 0)
    assert (await ledger.counts())["restarts_unknown"] == 1


async def test_with_retry_unknown_a_restart_cut_short_is_redelivered(ledger):
    broker = MemoryBroker(ack_deadline=600)
    await broker.publish(payloads("hung"))
    restarter = ScriptedRestarter(block=["hung"])
    shutdown = Shutdown()
    retrying = WorkerSettings(retry_unknown=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run(broker, ledger, restarter, stop_after=None,
                                  shutdown=shutdown, grace=0.05, worker=retrying))
        await restarter.started.wait()
        shutdown.request("test")
    # Nacked, not left to its 600 s lease: ready for immediate redelivery.
    assert (broker.stats.nacked, broker.backlog) == (1, 1)
    assert (await broker.pull(1))[0].delivery_attempt == 2
    assert (await ledger.counts())["restarts_unknown"] == 1


async def test_claims_not_started_at_shutdown_are_cancelled_and_redelivered(ledger):
    # One worker (--max-concurrent-restarts 1), three claims: two wait for it when the
    # shutdown begins. They never began: recorded 'cancelled' (not counted), nacked.
    broker = MemoryBroker(ack_deadline=600)
    await broker.publish(payloads("first", "second", "third"))
    restarter = ScriptedRestarter(block=["first"])
    shutdown = Shutdown()
    one_at_a_time = WorkerSettings(max_concurrent_restarts=1)
    counters = Counters()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run(broker, ledger, restarter, stop_after=None, counters=counters,
                                  shutdown=shutdown, grace=0.05, worker=one_at_a_time))
        await restarter.started.wait()
        await anyio.wait_all_tasks_blocked()
        shutdown.request("test")
    assert restarter.calls == {"first": 1}
    assert (broker.stats.acked, broker.stats.nacked, broker.backlog) == (1, 2, 2)
    outcomes = {row.message_id[-1]: row.outcome for row in await ledger.history()}
    assert sorted(outcomes.values()) == ["cancelled", "cancelled", "unknown"]
    # And in mandrill_restarts_total, by outcome.
    registry = build_registry(counters, in_flight=lambda: 0)
    (restarts,) = [f for f in registry.collect() if f.name == "mandrill_restarts"]
    by_outcome = {s.labels["outcome"]: s.value for s in restarts.samples
                  if s.name == "mandrill_restarts_total"}
    assert (by_outcome["unknown"], by_outcome["cancelled"]) == (1, 2)


async def test_shielded_settlement_completes_while_the_caller_is_cancelled(ledger):
    # Settlement requests take 50 ms each; the scope around serve() is cancelled while
    # five messages are held. The shield must still carry their nacks through.
    broker = SlowSettlement(0.05, ack_deadline=600)
    hosts = [f"held-{i}" for i in range(5)]
    await broker.publish(payloads(*hosts))
    restarter = ScriptedRestarter(block=hosts)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run(broker, ledger, restarter, stop_after=None))
            await restarter.started.wait()
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    # Interrupted after they began: counted, and acked.
    assert broker.stats.acked == 5
    assert broker.backlog == 0
    assert (await ledger.counts())["restarts_unknown"] == 5


async def test_a_second_request_forces_the_grace_short(ledger):
    broker = MemoryBroker(ack_deadline=600)
    await broker.publish(payloads("hung"))
    restarter = ScriptedRestarter(block=["hung"])
    shutdown = Shutdown()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run(broker, ledger, restarter, stop_after=None,
                                  shutdown=shutdown, grace=3600))
        await restarter.started.wait()
        shutdown.request("first")
        await anyio.wait_all_tasks_blocked()
        assert broker.stats.acked == 0  # still within its hour of grace
        shutdown.force("second")
    assert broker.stats.acked == 1  # interrupted: unknown, counted


class BrokenSource(MemoryBroker):
    async def pull(self, max_messages: int) -> list:  # type: ignore[override]
        if self.stats.delivered:
            raise SourceError("subscription deleted")
        return await super().pull(max_messages)


async def test_a_source_failure_stops_the_service_and_settles_what_is_held(ledger):
    broker = BrokenSource(ack_deadline=600)
    await broker.publish([(encode_payload("held"), {})])
    restarter = ScriptedRestarter(block=["held"])
    with pytest.raises(ExceptionGroup) as info:
        await run(broker, ledger, restarter, stop_after=None)
    assert info.group_contains(SourceError, match="subscription deleted")
    assert broker.stats.acked == 1  # its restart, interrupted, counts as done
    assert (await ledger.counts())["restarts_unknown"] == 1


class CountsConcurrency(ScriptedRestarter):
    def __init__(self) -> None:
        super().__init__(latency=0.05)
        self.running = 0
        self.peak = 0

    async def restart(self, message: Any) -> str:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            return await super().restart(message)
        finally:
            self.running -= 1


async def test_max_concurrent_restarts_is_respected(ledger):
    broker = MemoryBroker()
    await broker.publish(payloads(*(f"host-{i}" for i in range(12))))
    restarter = CountsConcurrency()
    worker = WorkerSettings(max_concurrent_restarts=2)
    counters = await run(broker, ledger, restarter, stop_after=12, worker=worker)
    assert counters.restarted == 12
    assert restarter.peak == 2


async def test_dry_run_decides_and_records_but_restarts_nothing(ledger):
    broker = MemoryBroker()
    await broker.publish(payloads("web-1", "web-2"))
    restarter = ScriptedRestarter()
    counters = await run(broker, ledger, restarter, stop_after=2,
                         worker=WorkerSettings(dry_run=True))
    assert sum(restarter.calls.values()) == 0
    assert counters.dry_run == 2
    assert "DRY RUN: 2 restarts would have happened" in counters.summary()
    assert (await ledger.counts())["restarts_dry_run"] == 2


async def test_observability_and_a_shutdown_of_another_are_refused(ledger):
    from mandrill.obs.metrics import Observability

    observability = Observability(counters=Counters(), shutdown=Shutdown(), slow_callback_ms=None)
    with pytest.raises(ValueError, match="observability brings its own"):
        await serve(
            ServiceSettings(handle_signals=False), WorkerSettings(),
            Parts(MemoryBroker(), ledger, ScriptedRestarter()),
            shutdown=Shutdown(), observability=observability,
        )
