"""Latency: publish → settle at a steady 1,000 msg/s on the emulator.

The talk's publisher (``publish_chaos`` at ``rate``) runs in the same process, on the same
event loop, as a task of ``serve()`` (the embedded-demo slot) or next to the bare loop. A
message's latency is the wall-clock time from its ``publishTime`` (stamped by the emulator
on this machine) to the moment the ack carrying it is handed to the client: it includes
the settler's batching delay (at most 10 ms), so it is a little worse than "when the
worker queued the ack". Messages published in the first ``warmup`` seconds are left out.

* ``mandrill``: ``serve()`` with the Pub/Sub source, SQLite file ledger, no-op restarter;
* ``bare``: pull(1000) + ack in a loop, no framework (on trio through the asyncio bridge):
  the floor the emulator and the client library allow.

mandrill pauses 5 ms after a pull that brought less than it asked for
(``service.SHORT_PULL_PAUSE``): a pull sent right after the last one usually finds nothing
and waits inside the emulator, which answers such a waiting pull up to ~50 ms after a
message arrives; measured here before it shipped, it took p99 from 78/104 ms to 35/33 ms.
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from collections.abc import Sequence

import anyio

from mandrill.ledger import open_ledger
from mandrill.message import Delivery
from mandrill.publisher import publish_chaos
from mandrill.restarters.simulated import SimulatedRestarter
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.sources.base import Source
from mandrill.sources.bridge import open_asyncio_bridge
from mandrill.sources.pubsub import open_pubsub_source, open_pubsub_topic
from mandrill.worker import WorkerSettings
from tests.benchmarks.common import BACKENDS, SEED, Results, progress, rotating, run_child
from tests.benchmarks.emulator import (
    PROJECT,
    ack_once,
    close_subscriber,
    fresh_topic,
    new_subscriber,
    pull_once,
)
from tests.benchmarks.inprocess import ledger_path

BENCHMARK = "latency"
CONTENDERS = (
    "asyncio/mandrill",
    "trio/mandrill",
    "asyncio/bare",
    "trio/bare",
)
P99_LIMIT_MS = 50.0

#: ``(published at, seconds to settle)`` per message.
Samples = list[tuple[float, float]]


class TimedSource:
    """A :class:`Source` that notes each delivery's publish time and, when its ack is sent,
    how long ago that was."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self.ack_deadline = source.ack_deadline
        self.keeps_dead_letters = source.keeps_dead_letters
        self._published: dict[str, float] = {}
        self.samples: Samples = []

    def problem(self) -> str | None:
        return self._source.problem()

    async def pull(self, max_messages: int) -> Sequence[Delivery]:
        deliveries = await self._source.pull(max_messages)
        for delivery in deliveries:
            self._published[delivery.ack_id] = delivery.publish_time
        return deliveries

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        now = time.time()
        for ack_id in ack_ids:
            published = self._published.pop(ack_id, None)
            if published is not None:
                self.samples.append((published, now - published))
        await self._source.acknowledge(ack_ids)

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        await self._source.modify_ack_deadline(ack_ids, seconds)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._source.dead_letter(delivery, reason)


async def mandrill_steady(
    backend: str, topic: str, subscription: str, count: int, rate: float
) -> Samples:
    async with (
        open_asyncio_bridge(backend) as bridge,
        open_pubsub_source(project=PROJECT, subscription=subscription, backend=backend,
                           bridge=bridge) as source,
        open_pubsub_topic(project=PROJECT, topic=topic, backend=backend, bridge=bridge) as sink,
    ):
        timed = TimedSource(source)
        publisher = functools.partial(
            publish_chaos, sink, count=count, rate=rate, rng=random.Random(SEED)
        )
        with ledger_path("file") as path:
            ledger = await open_ledger(path)
            try:
                await serve(
                    ServiceSettings(stop_after=count, handle_signals=False),
                    WorkerSettings(),
                    Parts(timed, ledger, SimulatedRestarter(0, 0), publisher=publisher),
                )
            finally:
                await ledger.aclose()
    return timed.samples


async def bare_steady(
    backend: str, topic: str, subscription: str, count: int, rate: float
) -> Samples:
    samples: Samples = []
    path = f"projects/{PROJECT}/subscriptions/{subscription}"
    async with open_asyncio_bridge(backend) as bridge:
        client = await bridge.call(new_subscriber)
        try:
            async with (
                open_pubsub_topic(project=PROJECT, topic=topic, backend=backend,
                                  bridge=bridge) as sink,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(functools.partial(
                    publish_chaos, sink, count=count, rate=rate, rng=random.Random(SEED)
                ))
                received = 0
                while received < count:
                    messages = await bridge.call(pull_once, client, path)
                    if not messages:
                        continue
                    now = time.time()
                    for message in messages:
                        published = message.publish_time.timestamp()
                        samples.append((published, now - published))
                    await bridge.call(ack_once, client, path, [m.ack_id for m in messages])
                    received += len(messages)
        finally:
            await bridge.call(close_subscriber, client)
    return samples


def measure(
    contender: str, topic: str, subscription: str, rate: float, seconds: float, warmup: float
) -> dict[str, float]:
    """Child process: p50 and p99 publish → settle, in milliseconds."""
    backend, name = contender.split("/")
    count = int(rate * (seconds + warmup))
    if name == "bare":
        steady = functools.partial(bare_steady, backend, topic, subscription, count, rate)
    else:
        steady = functools.partial(mandrill_steady, backend, topic, subscription, count, rate)
    samples = anyio.run(steady, backend=backend)
    return percentiles(samples, warmup)


def percentiles(samples: Samples, warmup: float) -> dict[str, float]:
    first = min(published for published, _ in samples)
    kept = sorted(latency for published, latency in samples if published >= first + warmup)
    cuts = statistics.quantiles(kept, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000, "count": len(kept)}


def run(results: Results, *, rate: float, seconds: float, warmup: float, rounds: int) -> None:
    """Needs a running emulator (see :func:`tests.benchmarks.emulator.running_emulator`)."""
    for number, contender in rotating(CONTENDERS, rounds):
        topic, (subscription,) = anyio.run(fresh_topic, 1, backend="asyncio")
        report = run_child("latency:measure", contender=contender, topic=topic,
                           subscription=subscription, rate=rate, seconds=seconds, warmup=warmup)
        backend, name = contender.split("/")
        for quantile in ("p50", "p99"):
            results.figure(BENCHMARK, backend, f"{name} {quantile}", "ms").samples.append(
                report[f"{quantile}_ms"]
            )
        progress(f"  latency round {number + 1}: {contender:<18} p50 {report['p50_ms']:6.1f} ms"
                 f"  p99 {report['p99_ms']:6.1f} ms  ({report['count']:.0f} messages)")
    for backend in BACKENDS:
        for quantile in ("p50", "p99"):
            bare = results.figure(BENCHMARK, backend, f"bare {quantile}", "ms")
            bare.ratio = 1.0
            results.figure(BENCHMARK, backend, f"mandrill {quantile}", "ms").compare(bare)
        p99 = results.figure(BENCHMARK, backend, "mandrill p99", "ms").median
        results.target(BENCHMARK, backend, f"p99 publish -> settle < {P99_LIMIT_MS:.0f} ms at"
                       f" {rate:.0f} msg/s", p99, P99_LIMIT_MS, "ms", higher_is_better=False)
    results.notes.append(
        f"latency: {rate:.0f} msg/s for {seconds:.0f} s after {warmup:.0f} s of warm-up,"
        f" medians of {rounds} rounds; settle = the ack handed to the client library."
    )

