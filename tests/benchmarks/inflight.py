"""Throughput against ``--max-in-flight`` with a realistic restart latency, on the emulator.

``serve()`` drains pre-published messages with the simulated restarter at
``--restart-latency 0.5s`` (each restart sleeps a uniform random time in 0..0.5 s, 0.25 s
on average, as ``mandrill run`` does), the Pub/Sub source and a SQLite file ledger, once
per in-flight bound. With restarts that slow, throughput is bound by how many are under
way at once (Little's law: at most ``in_flight / 0.25 s``); the curve shows where the
daemon's own cost takes over. Each point drains ``16 x in_flight`` messages (within
``MIN_MESSAGES`` .. ``MAX_MESSAGES``), so every point lasts a few seconds.

Memory per held message: the peak RSS of each run (a fresh process) against its in-flight
bound; the slope of a least-squares line through the points is what one more message held
costs (its delivery, its long-lived worker task, its lease and ledger rows in flight).

The recommended default is the largest bound whose throughput is still ``GOOD_SHARE`` of
what Little's law allows: up to it the restarts set the pace; past it the daemon's own CPU
does, and more held messages only cost memory (and, near the knee, latency).
"""

from __future__ import annotations

import statistics

import anyio

from mandrill.ledger import open_ledger
from mandrill.restarters.simulated import SimulatedRestarter
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.sources.pubsub import open_pubsub_source
from mandrill.worker import WorkerSettings
from tests.benchmarks.common import Results, Stopwatch, Timing, progress, run_child
from tests.benchmarks.emulator import PROJECT, prepare
from tests.benchmarks.inprocess import ledger_path
from tests.benchmarks.memory import MB, status_bytes

BENCHMARK = "max-in-flight"
MEMORY_BENCHMARK = "memory per held message"
IN_FLIGHT = (16, 64, 256, 1024, 2048, 4096)
RESTART_LATENCY = 0.5
MIN_MESSAGES = 512
MAX_MESSAGES = 20_000
GOOD_SHARE = 0.8
BACKEND = "asyncio"


def messages_for(in_flight: int) -> int:
    return min(MAX_MESSAGES, max(MIN_MESSAGES, 16 * in_flight))


def drain(backend: str, subscription: str, messages: int, in_flight: int) -> Timing:
    """Child process: drain ``messages`` with ``in_flight`` at most; time and peak RSS."""

    async def main() -> Timing:
        with ledger_path("file") as path:
            async with open_pubsub_source(
                project=PROJECT, subscription=subscription, backend=backend
            ) as source:
                ledger = await open_ledger(path)
                try:
                    watch = Stopwatch()
                    counters = await serve(
                        ServiceSettings(max_in_flight=in_flight, stop_after=messages,
                                        handle_signals=False),
                        WorkerSettings(),
                        Parts(source, ledger, SimulatedRestarter(RESTART_LATENCY, 0)),
                    )
                    elapsed = watch.stop()
                finally:
                    await ledger.aclose()
        if counters.acked < messages:
            raise RuntimeError(f"mandrill acked {counters.acked} of {messages}")
        _, peak = status_bytes()
        return {**elapsed, "peak_bytes": float(peak)}

    return anyio.run(main, backend=backend)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points."""
    xs, ys = zip(*points, strict=True)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return num / sum((x - mean_x) ** 2 for x in xs)


def run(results: Results, *, rounds: int, backend: str = BACKEND) -> int:
    """Needs a running emulator; returns the recommended in-flight bound."""
    peaks: list[tuple[float, float]] = []
    for number in range(rounds):
        # Alternate the order of the points from round to round.
        order = IN_FLIGHT if number % 2 == 0 else tuple(reversed(IN_FLIGHT))
        for in_flight in order:
            messages = messages_for(in_flight)
            (subscription,) = anyio.run(prepare, messages, 1, backend="asyncio")
            timing = run_child("inflight:drain", backend=backend, subscription=subscription,
                               messages=messages, in_flight=in_flight)
            rate = messages / timing["seconds"]
            results.figure(BENCHMARK, backend, f"{in_flight:>4} in flight", "msg/s").samples.append(
                rate
            )
            peaks.append((float(in_flight), timing["peak_bytes"]))
            progress(f"  in-flight round {number + 1}: {in_flight:>5} in flight {rate:8.0f} msg/s"
                     f"  peak RSS {timing['peak_bytes'] / MB:6.1f} MB")
    rates = {n: results.figure(BENCHMARK, backend, f"{n:>4} in flight", "msg/s").median
             for n in IN_FLIGHT}
    best = max(rates.values())
    for n in IN_FLIGHT:
        figure = results.figure(BENCHMARK, backend, f"{n:>4} in flight", "msg/s")
        figure.ratio = rates[n] / best
        figure.baseline = "the best point"
        figure.note = f"Little's law bound {n / (RESTART_LATENCY / 2):,.0f} msg/s"
    per_held = slope(peaks) / 1024
    results.figure(MEMORY_BENCHMARK, backend, "peak RSS per held message", "KB").samples.append(
        per_held
    )
    bounded = [n for n in IN_FLIGHT if rates[n] >= GOOD_SHARE * n / (RESTART_LATENCY / 2)]
    recommended = max(bounded, default=IN_FLIGHT[0])
    results.notes.append(
        f"max-in-flight: restart latency uniform 0..{RESTART_LATENCY} s, Pub/Sub emulator,"
        f" {backend}, medians of {rounds}; memory per held message {per_held:.1f} KB (slope of"
        f" peak RSS over the bound); recommended --max-in-flight: {recommended} (the largest"
        f" still at {GOOD_SHARE:.0%} of its Little's law bound)"
    )
    return recommended
