"""Shutdown is bounded whatever the world does: a source whose settlement never answers, a
ledger whose writes never finish, a part that fails or a caller that cancels during
start-up. serve() returns within ``grace + settle_timeout`` (plus slack) on both backends.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

import anyio
import pytest
from anyio.abc import TaskStatus

from mandrill.errors import LedgerError
from mandrill.ledger.sqlite import DIALECT, SQLiteDatabase
from mandrill.ledger.sqlledger import SQLLedger
from mandrill.obs.counters import Counters
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.shutdown import Shutdown
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import WorkerSettings
from tests.support.fakes import ScriptedRestarter, payloads

T = TypeVar("T")
GRACE = 0.3
SETTLE = 0.6
#: Scheduling slack for a loaded 2-core machine; the promise to users is one second.
SLACK = 1.0


class SettlementNeverAnswers(MemoryBroker):
    """Pulls work; acknowledge and modifyAckDeadline hang, as behind a proxy that holds them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settlement_requests = 0

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        self.settlement_requests += 1
        await anyio.sleep_forever()

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        self.settlement_requests += 1
        await anyio.sleep_forever()


class HangingDatabase(SQLiteDatabase):
    """A real SQLite database whose writes, once ``hang`` is set, never finish (until the
    test releases them at teardown): a ledger server that stopped answering."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.hang = threading.Event()
        self.release = threading.Event()
        self.stuck = threading.Event()

    def try_transaction_now(self, work: Callable[[Any], T]) -> tuple[bool, T | None]:
        return (False, None) if self.hang.is_set() else super().try_transaction_now(work)

    def transaction(self, work: Callable[[Any], T]) -> T:
        if self.hang.is_set():
            self.stuck.set()
            self.release.wait(60)
            raise LedgerError("released by the test")
        return super().transaction(work)


@pytest.fixture
def hanging_db() -> Iterator[HangingDatabase]:
    db = HangingDatabase()
    yield db
    db.release.set()


@pytest.fixture
async def ledger() -> AsyncIterator[SQLLedger]:
    ledger = SQLLedger(SQLiteDatabase(":memory:"), DIALECT)
    yield ledger
    await ledger.aclose()


def settings(**overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {"handle_signals": False, "grace": GRACE, "settle_timeout": SETTLE}
    return ServiceSettings(**{**values, **overrides})


async def serve_until(
    shutdown: Shutdown,
    parts: Parts,
    service: ServiceSettings,
    *,
    task_status: TaskStatus[Shutdown] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """serve(), reported started once it consumes."""
    await serve(service, WorkerSettings(), parts, shutdown=shutdown, task_status=task_status)


async def test_sigterm_with_settlement_never_answering_returns_within_grace_and_settle(ledger):
    broker = SettlementNeverAnswers(ack_deadline=600)
    hosts = [f"held-{i}" for i in range(3)]
    await broker.publish(payloads(*hosts))
    restarter = ScriptedRestarter(block=hosts)
    shutdown = Shutdown()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(serve_until, shutdown, Parts(broker, ledger, restarter), settings())
            await restarter.started.wait()
            await anyio.wait_all_tasks_blocked()
            started = anyio.current_time()
            shutdown.request("SIGTERM")
    elapsed = anyio.current_time() - started
    assert elapsed <= GRACE + SETTLE + SLACK
    assert broker.settlement_requests >= 1  # it tried, and gave up at the deadline


async def test_forced_stop_with_settlement_never_answering_returns_within_settle(ledger):
    broker = SettlementNeverAnswers(ack_deadline=600)
    await broker.publish(payloads("held"))
    restarter = ScriptedRestarter(block=["held"])
    shutdown = Shutdown()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(
                serve_until, shutdown, Parts(broker, ledger, restarter), settings(grace=3600)
            )
            await restarter.started.wait()
            shutdown.request("SIGTERM")
            await anyio.wait_all_tasks_blocked()
            started = anyio.current_time()
            shutdown.force("SIGTERM again")
    assert anyio.current_time() - started <= SETTLE + SLACK


async def test_forced_stop_with_ledger_writes_never_finishing_returns_within_settle(hanging_db):
    ledger = SQLLedger(hanging_db, DIALECT)
    broker = MemoryBroker(ack_deadline=600)
    shutdown = Shutdown()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(
                serve_until,
                shutdown,
                Parts(broker, ledger, ScriptedRestarter()),
                settings(grace=3600),
            )
            hanging_db.hang.set()
            await broker.publish(payloads("web-1"))  # its save and claim never commit
            await anyio.to_thread.run_sync(hanging_db.stuck.wait)
            shutdown.request("SIGTERM")
            started = anyio.current_time()
            shutdown.force("SIGTERM again")
    assert anyio.current_time() - started <= SETTLE + SLACK
    with anyio.fail_after(SLACK):
        await ledger.aclose()  # does not wait for the stuck write either


async def test_sigterm_with_ledger_writes_never_finishing_returns_within_grace_and_settle(
    hanging_db,
):
    ledger = SQLLedger(hanging_db, DIALECT)
    broker = MemoryBroker(ack_deadline=600)
    shutdown = Shutdown()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(
                serve_until, shutdown, Parts(broker, ledger, ScriptedRestarter()), settings()
            )
            hanging_db.hang.set()
            await broker.publish(payloads("web-1", "web-2"))
            await anyio.to_thread.run_sync(hanging_db.stuck.wait)
            started = anyio.current_time()
            shutdown.request("SIGTERM")
    assert anyio.current_time() - started <= GRACE + SETTLE + SLACK
    assert broker.stats.nacked == 2  # handed back for redelivery: nothing lost


async def test_a_signal_while_the_ledger_hangs_at_start_up_is_not_held(hanging_db):
    ledger = SQLLedger(hanging_db, DIALECT)
    hanging_db.hang.set()  # registering this daemon instance never commits
    shutdown = Shutdown()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_until, shutdown, Parts(MemoryBroker(), ledger,
                                                       ScriptedRestarter()), settings())
            await anyio.to_thread.run_sync(hanging_db.stuck.wait)
            started = anyio.current_time()
            shutdown.request("SIGTERM")
    assert anyio.current_time() - started <= SETTLE + SLACK


class FailsAtStart:
    async def __call__(self, *, task_status: TaskStatus[None]) -> None:
        raise RuntimeError("metrics port taken")


async def test_a_part_failing_during_start_up_raises_at_once(ledger):
    parts = Parts(MemoryBroker(), ledger, ScriptedRestarter(), companions=[FailsAtStart()])
    with anyio.fail_after(SETTLE + SLACK), pytest.raises(ExceptionGroup) as caught:
        await serve(settings(), WorkerSettings(), parts)
    assert caught.group_contains(RuntimeError, match="metrics port taken")


class NeverReady:
    def __init__(self) -> None:
        self.waiting = anyio.Event()

    async def __call__(self, *, task_status: TaskStatus[None]) -> None:
        self.waiting.set()
        await anyio.sleep_forever()


async def test_a_caller_cancelling_during_start_up_is_not_held(ledger):
    never = NeverReady()
    parts = Parts(MemoryBroker(), ledger, ScriptedRestarter(), companions=[never])
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, settings(), WorkerSettings(), parts)
            await never.waiting.wait()
            started = anyio.current_time()
            tg.cancel_scope.cancel()
    assert anyio.current_time() - started <= SETTLE + SLACK


async def test_what_could_not_be_settled_is_logged_with_a_count(ledger, caplog):
    broker = SettlementNeverAnswers(ack_deadline=600)
    hosts = [f"held-{i}" for i in range(4)]
    await broker.publish(payloads(*hosts))
    restarter = ScriptedRestarter(block=hosts)
    shutdown = Shutdown()
    counters = Counters()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: serve(
                    settings(), WorkerSettings(), Parts(broker, ledger, restarter),
                    shutdown=shutdown, counters=counters,
                )
            )
            await restarter.started.wait()
            await anyio.wait_all_tasks_blocked()
            shutdown.request("SIGTERM")
    lines = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert lines, caplog.text
    assert "4 " in lines[0]
    assert "redeliver" in lines[0]
