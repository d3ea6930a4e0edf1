"""What every benchmark shares: child processes, rotating rounds, medians, figures, targets."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("asyncio", "trio")
#: Payloads for the in-process benchmarks come from a seeded generator: same input each run.
SEED = 20261124


#: What a timed child reports: wall-clock and CPU (all threads) seconds.
Timing = dict[str, float]


class Stopwatch:
    """Wall-clock and process CPU time from creation to :meth:`stop`."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def stop(self) -> Timing:
        return {
            "seconds": time.perf_counter() - self._wall,
            "cpu": time.process_time() - self._cpu,
        }


class BenchmarkError(RuntimeError):
    """A measurement failed (its child process exited non-zero or timed out)."""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_child(function: str, *, timeout: float = 300, **arguments: Any) -> Any:
    """Call ``tests.benchmarks.MODULE:FUNCTION(**arguments)`` in a fresh Python process and
    return its (JSON) result."""
    command = [sys.executable, "-m", "tests.benchmarks.child", function, json.dumps(arguments)]
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"{function}({arguments}) took longer than {timeout:.0f}s") from exc
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-12:])
        raise BenchmarkError(f"{function}({arguments}) exited {done.returncode}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rotating(contenders: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """``(round, contender)`` pairs; each round starts one contender later than the last,
    so that no contender always runs first (on a cold cache) or last (on a hot machine)."""
    names = list(contenders)
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            yield number, name


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Figure:
    """One contender's samples in one benchmark on one backend."""

    benchmark: str
    backend: str
    contender: str
    unit: str
    samples: list[float] = field(default_factory=list)
    #: ``contender`` / ``baseline`` by median (for times: how many times slower).
    ratio: float | None = None
    baseline: str = ""
    note: str = ""

    @property
    def median(self) -> float:
        return median(self.samples)

    def compare(self, baseline: Figure) -> Figure:
        self.ratio = self.median / baseline.median
        self.baseline = f"{baseline.contender} ({baseline.backend})"
        return self

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median}


@dataclass
class Target:
    """A goal from the issue, checked against one figure."""

    benchmark: str
    backend: str
    goal: str
    value: float
    limit: float
    unit: str
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if self.higher_is_better:
            return self.value >= self.limit
        return self.value <= self.limit

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def figure(self, benchmark: str, backend: str, contender: str, unit: str) -> Figure:
        for existing in self.figures:
            if (existing.benchmark, existing.backend, existing.contender) == (
                benchmark,
                backend,
                contender,
            ):
                return existing
        created = Figure(benchmark, backend, contender, unit)
        self.figures.append(created)
        return created

    def target(
        self,
        benchmark: str,
        backend: str,
        goal: str,
        value: float,
        limit: float,
        unit: str,
        *,
        higher_is_better: bool,
    ) -> Target:
        target = Target(benchmark, backend, goal, value, limit, unit, higher_is_better)
        self.targets.append(target)
        return target
