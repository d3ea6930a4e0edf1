"""In-process throughput: the embedded broker drained by ``serve()`` and by two naive shapes.

Every contender drains the same N pre-published messages from a :class:`MemoryBroker` with
at most 256 in flight and does, per message: parse it, write it to a SQLite ledger from a
worker thread, run a no-op restart (``SimulatedRestarter(0, 0)``), and ack it to the broker.

* ``mandrill``: ``serve()`` with the SQLite ledger: batched ledger writes (the message, and
  also the restart decision and its outcome), batched acks, lease keeping;
* ``anyio-nested``: the naive anyio pattern, one task per message that opens a nested task
  group (save ∥ restart), then acks that one message; each save is its own thread hop and
  its own transaction (one INSERT, autocommit) on one connection;
* ``native-nested``: the same shape with ``asyncio.TaskGroup`` + ``loop.run_in_executor``
  on a one-thread executor, or a trio nursery + ``trio.to_thread.run_sync``.

The naive shapes do less than ``mandrill`` (no restart decision, no outcome row, no leases):
the comparison favours them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio

from mandrill.ledger import open_ledger, schema, sql
from mandrill.ledger.sqlite import BUSY_TIMEOUT_MS, DIALECT
from mandrill.message import Delivery, Message, encode_payload, parse_delivery
from mandrill.publisher import random_instance_name
from mandrill.restarters.simulated import SimulatedRestarter
from mandrill.service import MAX_PULL, Parts, ServiceSettings, serve
from mandrill.sources.base import Source
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import WorkerSettings
from tests.benchmarks.common import (
    BACKENDS,
    SEED,
    Results,
    Stopwatch,
    Timing,
    progress,
    rotating,
    run_child,
)

BENCHMARK = "in-process"
#: CPU time (all threads) per message: steadier than wall time on a shared machine.
CPU_BENCHMARK = "in-process CPU"
CONTENDERS = ("mandrill", "anyio-nested", "native-nested")
IN_FLIGHT = 256
TARGET_VS_NATIVE = 1.5


# -- input and ledgers --------------------------------------------------------------------


async def filled_broker(count: int) -> MemoryBroker:
    """A broker holding ``count`` chaos messages (the talk's random ``cattle-xxxx`` names),
    each for a host of its own: two messages for one host within the in-flight window make
    the second wait 10 s by design (the host is busy), which would time the deferral instead
    of the daemon (seen in 2 of 3 trio rounds of 10,000 messages, ~21 such pairs)."""
    rng = random.Random(SEED)
    names: list[str] = []
    seen: set[str] = set()
    for index in range(count):
        name = random_instance_name(rng)
        if name in seen:
            name += f"-{index}"
        seen.add(name)
        names.append(name)
    broker = MemoryBroker(ack_deadline=60)
    for start in range(0, count, 1000):
        await broker.publish([(encode_payload(name), {}) for name in names[start:start + 1000]])
    return broker


@contextlib.contextmanager
def ledger_path(kind: str) -> Iterator[str]:
    """``:memory:``, or a fresh SQLite file (mandrill's default) in a temporary directory."""
    if kind == ":memory:":
        yield kind
        return
    with tempfile.TemporaryDirectory(prefix="mandrill-bench-") as directory:
        yield str(Path(directory) / "ledger.db")


class PerMessageStore:
    """The naive ledger: mandrill's schema and message-row statement, one transaction each."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if path != ":memory:":
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
        schema.migrate(self._conn.cursor(), DIALECT)

    def save(self, message: Message) -> None:
        """Runs in a worker thread, one call at a time."""
        row = sql.message_row("", message, time.time())
        sql.write_messages(self._conn.cursor(), DIALECT, [row])

    def close(self) -> None:
        self._conn.close()


# -- the contenders -----------------------------------------------------------------------


async def run_mandrill(broker: MemoryBroker, path: str, count: int) -> Timing:
    return await drain_with_serve(broker, path, count, max_in_flight=IN_FLIGHT)


async def drain_with_serve(source: Source, path: str, count: int, *, max_in_flight: int) -> Timing:
    """The time ``serve()`` takes to settle ``count`` messages from ``source``, with a
    SQLite ledger at ``path`` and a no-op restarter (also the emulator benchmark's)."""
    ledger = await open_ledger(path)
    try:
        watch = Stopwatch()
        counters = await serve(
            ServiceSettings(max_in_flight=max_in_flight, stop_after=count, handle_signals=False),
            WorkerSettings(),
            Parts(source, ledger, SimulatedRestarter(0, 0)),
        )
        elapsed = watch.stop()
    finally:
        await ledger.aclose()
    if counters.acked < count:
        raise RuntimeError(f"mandrill acked {counters.acked} of {count}")
    return elapsed


async def pull_each(
    broker: MemoryBroker, count: int, take_slot: Callable[[], Awaitable[Any]]
) -> AsyncIterator[Delivery]:
    """The naive consumer: pull in bulk, then wait for a free slot before each delivery."""
    pulled = 0
    while pulled < count:
        deliveries = await broker.pull(min(MAX_PULL, count - pulled))
        pulled += len(deliveries)
        for delivery in deliveries:
            await take_slot()
            yield delivery


async def run_anyio_nested(broker: MemoryBroker, path: str, count: int) -> Timing:
    store = PerMessageStore(path)
    restarter = SimulatedRestarter(0, 0)
    slots = anyio.Semaphore(IN_FLIGHT)
    connection = anyio.CapacityLimiter(1)

    async def save(message: Message) -> None:
        await anyio.to_thread.run_sync(store.save, message, limiter=connection)

    async def handle(delivery: Delivery) -> None:
        try:
            message = parse_delivery(delivery)
            async with anyio.create_task_group() as tg:
                tg.start_soon(save, message)
                tg.start_soon(restarter.restart, message)
            await broker.acknowledge([delivery.ack_id])
        finally:
            slots.release()

    watch = Stopwatch()
    async with anyio.create_task_group() as tg:
        async for delivery in pull_each(broker, count, slots.acquire):
            tg.start_soon(handle, delivery)
    elapsed = watch.stop()
    store.close()
    return elapsed


async def run_native_asyncio(broker: MemoryBroker, path: str, count: int) -> Timing:
    store = PerMessageStore(path)
    restarter = SimulatedRestarter(0, 0)
    slots = asyncio.Semaphore(IN_FLIGHT)
    loop = asyncio.get_running_loop()

    with ThreadPoolExecutor(1) as connection:

        async def save(message: Message) -> None:
            await loop.run_in_executor(connection, store.save, message)

        async def handle(delivery: Delivery) -> None:
            try:
                message = parse_delivery(delivery)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(save(message))
                    tg.create_task(restarter.restart(message))
                await broker.acknowledge([delivery.ack_id])
            finally:
                slots.release()

        watch = Stopwatch()
        async with asyncio.TaskGroup() as tg:
            async for delivery in pull_each(broker, count, slots.acquire):
                tg.create_task(handle(delivery))
        elapsed = watch.stop()
    store.close()
    return elapsed


async def run_native_trio(broker: MemoryBroker, path: str, count: int) -> Timing:
    import trio

    store = PerMessageStore(path)
    restarter = SimulatedRestarter(0, 0)
    slots = trio.Semaphore(IN_FLIGHT)
    connection = trio.CapacityLimiter(1)

    async def save(message: Message) -> None:
        await trio.to_thread.run_sync(store.save, message, limiter=connection)

    async def handle(delivery: Delivery) -> None:
        try:
            message = parse_delivery(delivery)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(save, message)
                nursery.start_soon(restarter.restart, message)
            await broker.acknowledge([delivery.ack_id])
        finally:
            slots.release()

    watch = Stopwatch()
    async with trio.open_nursery() as nursery:
        async for delivery in pull_each(broker, count, slots.acquire):
            nursery.start_soon(handle, delivery)
    elapsed = watch.stop()
    store.close()
    return elapsed


RUNNERS: dict[tuple[str, str], Callable[[MemoryBroker, str, int], Awaitable[Timing]]] = {
    ("mandrill", "asyncio"): run_mandrill,
    ("mandrill", "trio"): run_mandrill,
    ("anyio-nested", "asyncio"): run_anyio_nested,
    ("anyio-nested", "trio"): run_anyio_nested,
    ("native-nested", "asyncio"): run_native_asyncio,
    ("native-nested", "trio"): run_native_trio,
}


def measure(contender: str, backend: str, messages: int, ledger: str) -> Timing:
    """Child process: the time ``contender`` takes to drain ``messages`` on ``backend``."""

    async def main() -> Timing:
        broker = await filled_broker(messages)
        with ledger_path(ledger) as path:
            return await RUNNERS[contender, backend](broker, path, messages)

    return anyio.run(main, backend=backend)


# -- the benchmark ------------------------------------------------------------------------


def run(results: Results, *, messages: int, rounds: int, ledger: str) -> None:
    keys = [f"{backend}/{contender}" for backend in BACKENDS for contender in CONTENDERS]
    for number, key in rotating(keys, rounds):
        backend, contender = key.split("/")
        timing = run_child(
            "inprocess:measure",
            contender=contender,
            backend=backend,
            messages=messages,
            ledger=ledger,
        )
        rate = messages / timing["seconds"]
        cpu = timing["cpu"] / messages * 1e6
        results.figure(BENCHMARK, backend, contender, "msg/s").samples.append(rate)
        results.figure(CPU_BENCHMARK, backend, contender, "us/msg").samples.append(cpu)
        progress(f"  in-process round {number + 1}: {key:<22} {rate:8.0f} msg/s"
                 f"  {cpu:6.0f} us CPU/msg")
    for backend in BACKENDS:
        native = results.figure(BENCHMARK, backend, "native-nested", "msg/s")
        native.ratio = 1.0
        results.figure(BENCHMARK, backend, "anyio-nested", "msg/s").compare(native)
        ours = results.figure(BENCHMARK, backend, "mandrill", "msg/s").compare(native)
        native_cpu = results.figure(CPU_BENCHMARK, backend, "native-nested", "us/msg")
        native_cpu.ratio = 1.0
        for contender in ("anyio-nested", "mandrill"):
            results.figure(CPU_BENCHMARK, backend, contender, "us/msg").compare(native_cpu)
        assert ours.ratio is not None
        results.target(
            BENCHMARK,
            backend,
            f"mandrill >= {TARGET_VS_NATIVE}x native nested task group",
            ours.ratio,
            TARGET_VS_NATIVE,
            "x",
            higher_is_better=True,
        )
    results.notes.append(
        f"in-process: {messages} messages, {IN_FLIGHT} in flight, ledger {ledger},"
        " no-op restarter; the naive shapes write one INSERT per message (autocommit) and"
        " ack one message per call; mandrill also claims and finishes each restart."
    )
