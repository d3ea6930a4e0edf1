"""Memory: peak RSS and RSS growth of ``serve()`` over many in-process messages.

A child process runs ``serve()`` on the embedded broker with a no-op restarter, fed by a
publisher that keeps the broker's backlog under 5,000 (so that queued input does not count
as growth), and reads ``/proc/self/status`` (``VmRSS``, ``VmHWM``) every quarter second.

* growth: RSS at the end minus RSS once the first 5% of the messages are done (start-up
  allocations, the first SQLite pages and the workers' stacks are not growth);
* peak: ``VmHWM`` at the end;
* the ledger's own size (``page_count * page_size``) is sampled too: with ``:memory:`` the
  database *is* process memory, and grows with every message by design.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import anyio

from mandrill.ledger import SQLLedger, open_ledger
from mandrill.message import encode_payload
from mandrill.obs.counters import Counters
from mandrill.publisher import random_instance_name
from mandrill.restarters.simulated import SimulatedRestarter
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import WorkerSettings
from tests.benchmarks.common import BACKENDS, SEED, Results, Stopwatch, progress, run_child
from tests.benchmarks.inprocess import ledger_path

BENCHMARK = "memory"
LEDGERS = ("file", ":memory:")
GROWTH_LIMIT_MB = 20.0
PEAK_LIMIT_MB = 150.0
BACKLOG = 5000
SAMPLE_SECONDS = 0.25
WARM_SHARE = 0.05
MB = 1024 * 1024


def status_bytes() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process, in bytes."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def bounded_feed(broker: MemoryBroker, count: int) -> Callable[[], Any]:
    """A publisher that keeps at most ``BACKLOG`` messages unacked in the broker."""
    rng = random.Random(SEED)

    async def feed() -> None:
        published = 0
        while published < count:
            if broker.backlog >= BACKLOG:
                await anyio.sleep(0.002)
                continue
            batch = min(1000, count - published)
            await broker.publish(
                [(encode_payload(random_instance_name(rng)), {}) for _ in range(batch)]
            )
            published += batch

    return feed


async def database_bytes(ledger: SQLLedger) -> int:
    def size(cur: Any) -> int:
        (pages,) = cur.execute("PRAGMA page_count").fetchone()
        (page_size,) = cur.execute("PRAGMA page_size").fetchone()
        return int(pages) * int(page_size)

    # The ledger has no public size; a read-only snapshot is safe next to the writer.
    return await ledger.read(lambda cur, _dialect, _now: size(cur))


def profile(backend: str, ledger: str, messages: int) -> dict[str, Any]:
    """Child process: RSS samples ``(done, rss, database bytes)`` and the summary."""

    async def main() -> dict[str, Any]:
        broker = MemoryBroker(ack_deadline=60)
        counters = Counters()
        samples: list[tuple[int, int, int]] = []
        with ledger_path(ledger) as path:
            store = await open_ledger(path)
            start_rss, _ = status_bytes()

            async def sample() -> None:
                while True:
                    rss, _ = status_bytes()
                    samples.append((counters.acked, rss, await database_bytes(store)))
                    await anyio.sleep(SAMPLE_SECONDS)

            parts = Parts(broker, store, SimulatedRestarter(0, 0),
                          publisher=bounded_feed(broker, messages))
            watch = Stopwatch()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                await serve(ServiceSettings(stop_after=messages, handle_signals=False),
                            WorkerSettings(), parts, counters=counters)
                tg.cancel_scope.cancel()
            timing = watch.stop()
            end_rss, peak = status_bytes()
            samples.append((counters.acked, end_rss, await database_bytes(store)))
            await store.aclose()
        return summarize(samples, start_rss, peak, messages, timing["seconds"])

    return anyio.run(main, backend=backend)


def summarize(
    samples: list[tuple[int, int, int]], start_rss: int, peak: int, messages: int, seconds: float
) -> dict[str, Any]:
    warm = next(s for s in samples if s[0] >= messages * WARM_SHARE)
    end = samples[-1]
    return {
        "messages": messages,
        "seconds": seconds,
        "start_mb": start_rss / MB,
        "warm_mb": warm[1] / MB,
        "end_mb": end[1] / MB,
        "peak_mb": peak / MB,
        "growth_mb": (end[1] - warm[1]) / MB,
        "database_growth_mb": (end[2] - warm[2]) / MB,
        "samples": [(done, rss / MB, db / MB) for done, rss, db in samples],
    }


def run(results: Results, *, messages: int) -> dict[str, Any]:
    """One run per backend and ledger (memory figures are not noisy: no rounds)."""
    runs: dict[str, Any] = {}
    for ledger in LEDGERS:
        for backend in BACKENDS:
            report = run_child("memory:profile", timeout=3600, backend=backend, ledger=ledger,
                               messages=messages)
            runs[f"{backend}/{ledger}"] = report
            progress(
                f"  memory {backend:<7} {ledger:<8} {messages} msgs in {report['seconds']:.0f}s:"
                f" peak {report['peak_mb']:.1f} MB, growth {report['growth_mb']:+.1f} MB"
                f" (database {report['database_growth_mb']:+.1f} MB)"
            )
            record(results, backend, ledger, report)
    results.notes.append(
        f"memory: {messages} messages per run; growth = RSS at the end - RSS after the first"
        f" {WARM_SHARE:.0%}; with the :memory: ledger the database itself lives in RSS."
    )
    return runs


def record(results: Results, backend: str, ledger: str, report: dict[str, Any]) -> None:
    growth = results.figure(BENCHMARK, backend, f"RSS growth, {ledger} ledger", "MB")
    growth.samples.append(report["growth_mb"])
    peak = results.figure(BENCHMARK, backend, f"peak RSS, {ledger} ledger", "MB")
    peak.samples.append(report["peak_mb"])
    if ledger == ":memory:":
        growth.note = f"of which the database: {report['database_growth_mb']:.1f} MB"
    count = report["messages"]
    results.target(BENCHMARK, backend, f"RSS growth < {GROWTH_LIMIT_MB:.0f} MB over {count}"
                   f" messages ({ledger} ledger)", report["growth_mb"], GROWTH_LIMIT_MB, "MB",
                   higher_is_better=False)
    results.target(BENCHMARK, backend, f"peak RSS < {PEAK_LIMIT_MB:.0f} MB ({ledger} ledger)",
                   report["peak_mb"], PEAK_LIMIT_MB, "MB", higher_is_better=False)
