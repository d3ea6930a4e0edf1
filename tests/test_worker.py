"""The worker, directly: one delivery from the real broker through the real SQLite ledger,
and what it queues for settlement (the settler's requests, as the broker receives them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
import pytest

from mandrill.holdings import Holdings
from mandrill.ledger.sqlite import DIALECT, SQLiteDatabase
from mandrill.ledger.sqlledger import SQLLedger
from mandrill.message import Delivery
from mandrill.obs.counters import Counters
from mandrill.policy import defer_seconds
from mandrill.settler import Settler
from mandrill.shutdown import Shutdown
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import Worker, WorkerSettings
from tests.ledger import writing
from tests.support.fakes import ScriptedRestarter, payloads


class RecordingBroker(MemoryBroker):
    """The real broker, recording each lease change it is asked for."""

    def __init__(self) -> None:
        super().__init__(ack_deadline=600)
        self.deadlines: list[tuple[list[str], float]] = []

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        self.deadlines.append((list(ack_ids), seconds))
        await super().modify_ack_deadline(ack_ids, seconds)


@dataclass
class Bench:
    broker: RecordingBroker
    ledger: SQLLedger
    settler: Settler
    counters: Counters
    holdings: Holdings

    def worker(self, restarter: ScriptedRestarter, **settings: object) -> Worker:
        return self.worker_with(restarter, Shutdown(), **settings)

    def worker_with(
        self, restarter: ScriptedRestarter, shutdown: Shutdown, **settings: object
    ) -> Worker:
        return Worker(
            source=self.broker, ledger=self.ledger, restarter=restarter, settler=self.settler,
            counters=self.counters, settings=WorkerSettings(**settings),  # type: ignore[arg-type]
            shutdown=shutdown,
        )

    async def deliveries(self, *hosts: str) -> list[Delivery]:
        await self.broker.publish(payloads(*hosts))
        pulled = await self.broker.pull(len(hosts))
        for delivery in pulled:
            self.holdings.add(delivery, anyio.current_time(), 600)
        return pulled


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    broker = RecordingBroker()
    ledger = SQLLedger(SQLiteDatabase(":memory:"), DIALECT)
    holdings = Holdings(16)
    counters = Counters()
    async with writing(ledger):
        yield Bench(broker, ledger, Settler(broker, holdings, counters), counters, holdings)


async def test_a_restart_is_recorded_and_acked(bench):
    (delivery,) = await bench.deliveries("web-1")
    await bench.worker(ScriptedRestarter()).handle(delivery)
    await bench.settler.flush()
    assert bench.broker.stats.acked == 1
    assert len(bench.holdings) == 0  # the in-flight slot is free at once
    assert (await bench.ledger.counts())["restarts_restarted"] == 1


async def test_an_invalid_payload_is_dead_lettered_with_its_reason(bench):
    await bench.broker.publish([(b"{not json", {})])
    (delivery,) = await bench.broker.pull(1)
    await bench.worker(ScriptedRestarter()).handle(delivery)
    await bench.settler.flush()
    (dead,) = bench.broker.dead_letters
    assert dead.reason.startswith("invalid: payload is not JSON")
    assert bench.broker.stats.acked == 1
    assert (await bench.ledger.saved_messages(status="dead_letter"))[0].data == b"{not json"


async def test_a_failed_restart_is_nacked_then_dead_lettered_after_max_attempts(bench):
    restarter = ScriptedRestarter(always_fail=["flaky"])
    worker = bench.worker(restarter, max_attempts=2)
    (first,) = await bench.deliveries("flaky")
    await worker.handle(first)
    await bench.settler.flush()
    assert bench.broker.deadlines == [([first.ack_id], 0)]  # nacked: redelivered at once
    (second,) = await bench.broker.pull(1)
    bench.holdings.add(second, anyio.current_time(), 600)
    await worker.handle(second)
    await bench.settler.flush()
    assert [dead.reason for dead in bench.broker.dead_letters] == ["restart failed 2 times"]


async def test_a_message_for_a_host_under_restart_is_deferred(bench):
    restarter = ScriptedRestarter(block=["db-1"])
    worker = bench.worker(restarter)
    first, second = await bench.deliveries("db-1", "db-1")
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.handle, first)
        await restarter.started.wait()
        await worker.handle(second)  # the host's restart is still under way
        tg.cancel_scope.cancel()
    await bench.settler.flush()
    assert ([second.ack_id], defer_seconds(second.delivery_attempt)) in bench.broker.deadlines
    assert bench.counters.deferred == 1


async def test_a_cancelled_restart_records_no_later_than_the_settle_deadline(bench):
    restarter = ScriptedRestarter(block=["db-1", "db-2"])
    shutdown = Shutdown()
    worker = bench.worker_with(restarter, shutdown)
    (delivery,) = await bench.deliveries("db-1")
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.handle, delivery)
        await restarter.started.wait()
        tg.cancel_scope.cancel()
    assert (await bench.ledger.counts())["restarts_cancelled"] == 1

    # With the settle deadline already past, the cancelled worker does not wait for the
    # ledger (tests/test_shutdown_bounds.py hangs it); its record is queued all the same,
    # and the ledger writer, which outlives the workers, commits it.
    shutdown.settle_by = anyio.current_time()
    (late,) = await bench.deliveries("db-2")
    restarter.started = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.handle, late)
        await restarter.started.wait()
        tg.cancel_scope.cancel()
    await bench.ledger.drain()
    assert (await bench.ledger.counts())["restarts_cancelled"] == 2


async def test_the_worker_does_not_wait_for_the_outcome_the_ack_does(bench):
    # The outcome's write is queued and handed to the settler: the worker moves on to its
    # next delivery, and the ack goes out only once the outcome is committed.
    (delivery,) = await bench.deliveries("web-1")
    await bench.worker(ScriptedRestarter()).handle(delivery)
    assert bench.settler.pending == 1  # waiting for its outcome's write, with the settler
    assert len(bench.holdings) == 0  # its in-flight slot is free already
    await bench.settler.flush()
    assert (await bench.ledger.counts())["restarts_restarted"] == 1
    assert bench.broker.stats.acked == 1
