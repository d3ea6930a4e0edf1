"""Run the benchmarks: ``python -m tests.benchmarks [--only NAME,…] [options]``.

Prints a table of medians and ratios and a PASS/FAIL line per target, and writes
``bench-results/bench-<time>.json`` and ``.png``. The defaults fit in about 10 minutes on a
2-core machine; ``--memory-messages 1000000`` is the issue's full memory run (minutes more).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from tests.benchmarks import emulator, inflight, inprocess, latency, memory, report, shutdown
from tests.benchmarks.common import ROOT, Results, progress

BENCHMARKS = ("inprocess", "shutdown", "memory", "emulator", "inflight", "latency")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of throughput contenders")
    parser.add_argument("--messages", type=int, default=20_000,
                        help="messages per emulator drain")
    parser.add_argument("--warmup", type=int, default=20_000,
                        help="messages per contender in the emulator's warm-up round")
    parser.add_argument("--inprocess-messages", type=int, default=10_000)
    parser.add_argument("--ledger", default="file", choices=("file", ":memory:"),
                        help="SQLite ledger of the in-process benchmark")
    parser.add_argument("--memory-messages", type=int, default=100_000,
                        help="messages per memory run (the issue asks 1,000,000: slower)")
    parser.add_argument("--shutdown-rounds", type=int, default=3)
    parser.add_argument("--inflight-rounds", type=int, default=1,
                        help="rounds of the max-in-flight curve (each point a few seconds)")
    parser.add_argument("--latency-rate", type=float, default=1000.0)
    parser.add_argument("--latency-seconds", type=float, default=6.0)
    parser.add_argument("--latency-warmup", type=float, default=2.0)
    parser.add_argument("--latency-rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    arguments = parser.parse_args(argv)
    unknown = set(arguments.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    chosen = arguments.only.split(",")
    results = Results()
    extra: dict[str, Any] = {}
    started = time.perf_counter()
    if "inprocess" in chosen:
        progress("in-process throughput")
        inprocess.run(results, messages=arguments.inprocess_messages, rounds=arguments.rounds,
                      ledger=arguments.ledger)
    if "shutdown" in chosen:
        progress("shutdown latency")
        shutdown.run(results, rounds=arguments.shutdown_rounds)
    if "memory" in chosen:
        progress("memory")
        extra["memory_runs"] = memory.run(results, messages=arguments.memory_messages)
    if {"emulator", "inflight", "latency"} & set(chosen):
        with emulator.running_emulator():
            if "emulator" in chosen:
                progress("emulator throughput")
                emulator.run(results, messages=arguments.messages, rounds=arguments.rounds,
                             warmup=arguments.warmup)
            if "inflight" in chosen:
                progress("throughput against --max-in-flight (restart latency 0.5 s)")
                extra["recommended_max_in_flight"] = inflight.run(
                    results, rounds=arguments.inflight_rounds
                )
            if "latency" in chosen:
                progress("latency")
                latency.run(results, rate=arguments.latency_rate,
                            seconds=arguments.latency_seconds,
                            warmup=arguments.latency_warmup, rounds=arguments.latency_rounds)
    results.notes.append(f"total time {time.perf_counter() - started:.0f} s")

    arguments.out.mkdir(parents=True, exist_ok=True)
    stem = arguments.out / time.strftime("bench-%Y%m%d-%H%M%S")
    report.write_json(results, stem.with_suffix(".json"),
                      {k: str(v) for k, v in vars(arguments).items()}, extra)
    report.write_chart(results, stem.with_suffix(".png"))
    print(report.text(results))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    failed = [target for target in results.targets if not target.passed]
    return 1 if failed and arguments.strict else 0


if __name__ == "__main__":
    sys.exit(main())
