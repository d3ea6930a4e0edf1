"""Measure the ways of running gcloud-aio-pubsub under each backend (not a pytest test).

Drains N pre-published messages with a serial ``pull(1000)`` + ``acknowledge`` loop through
mandrill's :class:`~mandrill.sources.pubsub.PubSubSource` on:

* ``asyncio``: asyncio, gcloud-aio awaited directly;
* ``trio+portal``: trio, through :class:`~mandrill.sources.bridge.AsyncioBridge` (an asyncio
  loop in a thread of its own behind an anyio blocking portal);
* ``trio+trio-asyncio``: trio, through ``trio_asyncio.open_loop`` + ``aio_as_trio`` (one
  thread);
* ``trio+loop-thread``: a variant of the portal bridge measured for comparison: the same
  asyncio thread, but calls are handed over with ``asyncio.run_coroutine_threadsafe`` and
  trio is woken by its token from the future's done-callback, with no worker thread.

It also times a no-op call through each bridge (the fixed cost of one hop).

The emulator is warmed first (the JVM is slow until it has run a while), the contenders take
turns in a rotating order, each round on a fresh subscription, and medians are reported.

    python tests/benchmarks/bridge_candidates.py --messages 20000 --rounds 3

The emulator answers a pull with at most 100 messages, whatever ``maxMessages`` says, so a
drain makes two calls per 100 messages. Starts its own emulator unless ``--host`` names a
running one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import anyio
import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mandrill.message import encode_payload
from mandrill.sources.bridge import open_asyncio_bridge
from mandrill.sources.pubsub import (
    open_pubsub_source,
    open_pubsub_topic,
    setup_pubsub,
)
from tests.fixtures.emulator import find_launcher, start_emulator, stop_emulator

T = TypeVar("T")
PROJECT = "bench"


class TrioAsyncioBridge:
    """``AsyncioBridge.call`` over trio-asyncio; use inside ``trio_asyncio.open_loop()``."""

    threaded = False

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await trio_asyncio.aio_as_trio(fn)(*args)


class LoopThreadBridge:
    """``AsyncioBridge.call`` with one hop each way: no worker thread, no blocking start."""

    threaded = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._token = trio.lowlevel.current_trio_token()

    async def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        future = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        done = trio.Event()
        future.add_done_callback(lambda _: self._token.run_sync_soon(done.set))
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()


@contextlib.asynccontextmanager
async def open_loop_thread_bridge() -> AsyncIterator[LoopThreadBridge]:
    portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
    portal = await anyio.to_thread.run_sync(portal_cm.__enter__)
    try:
        yield LoopThreadBridge(portal.call(asyncio.get_running_loop))
    finally:
        await anyio.to_thread.run_sync(portal_cm.__exit__, None, None, None)


@contextlib.asynccontextmanager
async def open_trio_asyncio_bridge() -> AsyncIterator[TrioAsyncioBridge]:
    async with trio_asyncio.open_loop():
        yield TrioAsyncioBridge()


async def prepare(count: int) -> str:
    """A fresh subscription with ``count`` messages waiting (runs on asyncio)."""
    suffix = uuid.uuid4().hex[:10]
    topic, subscription = f"topic-{suffix}", f"sub-{suffix}"
    await setup_pubsub(
        project=PROJECT,
        topic=topic,
        subscription=subscription,
        backend="asyncio",
        ack_deadline=60,
    )
    async with open_pubsub_topic(project=PROJECT, topic=topic, backend="asyncio") as sink:
        await sink.publish([(encode_payload(f"host-{i}"), {}) for i in range(count)])
    return subscription


async def drain(subscription: str, count: int, backend: str, bridge: Any = None) -> float:
    """Pull and ack until ``count`` messages came; returns the seconds it took."""
    async with open_pubsub_source(
        project=PROJECT, subscription=subscription, backend=backend, bridge=bridge
    ) as source:
        received = 0
        started = time.perf_counter()
        while received < count:
            deliveries = await source.pull(1000)
            await source.acknowledge([d.ack_id for d in deliveries])
            received += len(deliveries)
        return time.perf_counter() - started


async def drain_trio_asyncio(subscription: str, count: int) -> float:
    async with open_trio_asyncio_bridge() as bridge:
        return await drain(subscription, count, "trio", bridge)


async def drain_loop_thread(subscription: str, count: int) -> float:
    async with open_loop_thread_bridge() as bridge:
        return await drain(subscription, count, "trio", bridge)


def run_asyncio(subscription: str, count: int) -> float:
    return anyio.run(drain, subscription, count, "asyncio", backend="asyncio")


def run_trio_portal(subscription: str, count: int) -> float:
    return anyio.run(drain, subscription, count, "trio", backend="trio")


def run_trio_asyncio(subscription: str, count: int) -> float:
    return trio.run(drain_trio_asyncio, subscription, count)


def run_loop_thread(subscription: str, count: int) -> float:
    return trio.run(drain_loop_thread, subscription, count)


CONTENDERS: dict[str, Callable[[str, int], float]] = {
    "asyncio": run_asyncio,
    "trio+portal": run_trio_portal,
    "trio+trio-asyncio": run_trio_asyncio,
    "trio+loop-thread": run_loop_thread,
}


async def _noop() -> None:
    pass


async def hop_cost(bridge_cm: contextlib.AbstractAsyncContextManager[Any], calls: int) -> float:
    """Microseconds per no-op call through a bridge."""
    async with bridge_cm as bridge:
        started = time.perf_counter()
        for _ in range(calls):
            await bridge.call(_noop)
        return (time.perf_counter() - started) / calls * 1e6


def hop_costs(calls: int) -> dict[str, float]:
    return {
        "asyncio": anyio.run(hop_cost, open_asyncio_bridge("asyncio"), calls, backend="asyncio"),
        "trio+portal": anyio.run(hop_cost, open_asyncio_bridge("trio"), calls, backend="trio"),
        "trio+trio-asyncio": trio.run(hop_cost, open_trio_asyncio_bridge(), calls),
        "trio+loop-thread": trio.run(hop_cost, open_loop_thread_bridge(), calls),
    }


def measure(name: str, count: int) -> float:
    """Messages per second of one drain of ``count`` fresh messages."""
    subscription = anyio.run(prepare, count, backend="asyncio")
    return count / CONTENDERS[name](subscription, count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20_000, help="messages per warm-up drain")
    parser.add_argument("--host", help="a running emulator's host:port (default: start one)")
    args = parser.parse_args()

    process = None
    if args.host:
        os.environ["PUBSUB_EMULATOR_HOST"] = args.host
    else:
        log_path = Path(tempfile.mkdtemp(prefix="bench-emulator-")) / "emulator.log"
        process, host = start_emulator(find_launcher(), log_path)
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        print(f"emulator on {host}, log {log_path}")
    names = list(CONTENDERS)
    rates: dict[str, list[float]] = {name: [] for name in names}
    try:
        print(f"warming up: {args.warmup} messages per contender")
        for name in names:
            measure(name, args.warmup)
        for round_no in range(args.rounds):
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                rate = measure(name, args.messages)
                rates[name].append(rate)
                print(f"round {round_no + 1}: {name:<18} {rate:8.0f} msg/s", flush=True)
    finally:
        if process is not None:
            stop_emulator(process)

    costs = hop_costs(3000)
    base = statistics.median(rates["asyncio"])
    print(f"\n{args.messages} messages, median of {args.rounds} rounds (serial pull 1000 + ack):")
    for name in names:
        median = statistics.median(rates[name])
        spread = ", ".join(f"{r:.0f}" for r in rates[name])
        print(
            f"  {name:<18} {median:8.0f} msg/s  {median / base:5.2f} x asyncio"
            f"  no-op call {costs[name]:5.0f} us  ({spread})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
