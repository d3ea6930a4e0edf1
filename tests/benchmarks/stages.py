"""CPU per message by stage: sample the stacks of a drain, then classify them.

    python -m tests.benchmarks.stages pubsub|memory asyncio|trio [MESSAGES]

(``pubsub`` needs ``PUBSUB_EMULATOR_HOST``.) ``SIGPROF`` samples the event loop's thread
(the main one) every ``INTERVAL`` seconds of CPU time: the awaiting coroutines are on the
running task's stack. Samples of the thread waiting (in ``epoll``) are dropped; the other
threads' CPU time (on trio the asyncio bridge thread, which runs the HTTP client; SQLite
worker threads) is the process's CPU time less the main thread's, one line of its own.
(A sampler thread with ``sys._current_frames`` would be biased: it gets the GIL first
where the loop's thread releases it, at every SQL statement and socket call.)

Each sample is given to the stage of the innermost frame that names one (``RULES``, first
match from the leaf up); samples with none are the event loop's own work (scheduling,
waking tasks, polling). Start-up (imports) is left out. The shares are scaled to the
drain's measured CPU time, so the table reads in microseconds per message. Not part of
``tox -e bench``; the README's stage table was made with it.
"""

from __future__ import annotations

import collections
import contextlib
import re
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType

import anyio

#: Seconds of CPU time between samples.
INTERVAL = 0.0005
#: A leaf frame matching this is a thread waiting, not working: not counted.
IDLE = re.compile(r"/(selectors|threading|queue)\.py:|get_events \(.*trio|stages\.py:")

#: ``(stage, pattern)``: a frame matching ``pattern`` (``function (file:line)``) belongs to
#: ``stage``. Checked from the leaf frame up; the first frame that matches any rule decides.
RULES: tuple[tuple[str, str], ...] = (
    ("logging", r"\(logging/|obs/logs\.py"),
    ("ledger: SQL (in the batch)", r"ledger/(sql|claims|sqlite|postgres)\.py"),
    ("ledger: queueing, waiting for the batch", r"ledger/(batch|ops|sqlledger)\.py"),
    ("decision (policy)", r"mandrill/policy\.py"),
    ("restart (simulated, latency 0)", r"restarters/"),
    ("settlement (batched acks)",
     r"settler\.py|acknowledge \(gcloud|SubscriberClient\.acknowledge"),
    ("leases", r"lease\.py|holdings\.py|modify_ack_deadline \(gcloud"),
    ("parse and validate", r"mandrill/message\.py"),
    ("pull and decode (HTTP, JSON, Delivery)",
     r"_pull_once|PubSubSource\.pull|_to_delivery|SubscriberClient\.pull|subscriber_message"),
    ("bridge (trio <-> asyncio thread)", r"mandrill/sources/bridge\.py|asyncio/futures\.py"
     r"|run_coroutine_threadsafe"),
    ("HTTP client (aiohttp), unattributed", r"aiohttp/"),
    ("hand-over to workers (stream, consumer)", r"service\.py|anyio/streams/memory\.py"),
    ("worker (the per-message coroutine)", r"mandrill/worker\.py|obs/counters\.py"),
)
EVENT_LOOP = "event loop (scheduling, waking tasks, I/O polling)"
STARTUP = re.compile(r"importlib")


def _frames(frame: FrameType | None) -> str:
    names = []
    while frame is not None:
        code = frame.f_code
        names.append(f"{code.co_qualname} ({code.co_filename}:{frame.f_lineno})")
        frame = frame.f_back
    return ";".join(reversed(names))


@contextlib.contextmanager
def sampling() -> Iterator[collections.Counter[str]]:
    """Sample the main thread's stack every ``INTERVAL`` seconds of the process's CPU time
    (``SIGPROF``) while the block runs; yields the counts of ``stack`` strings (root first,
    ``;``-separated). The handler runs between two bytecodes, so the time of a C call
    (an SQL statement, a socket send) goes to the Python frame that made it."""
    counts: collections.Counter[str] = collections.Counter()

    def sample(signum: int, frame: FrameType | None) -> None:
        stack = _frames(frame)
        if not IDLE.search(stack.rsplit(";", 1)[-1]):
            counts[stack] += 1

    previous = signal.signal(signal.SIGPROF, sample)
    signal.setitimer(signal.ITIMER_PROF, INTERVAL, INTERVAL)
    try:
        yield counts
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, previous)


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for stage, pattern in RULES:
            if re.search(pattern, frame):
                return stage
    return EVENT_LOOP


def breakdown(samples: collections.Counter[str]) -> tuple[collections.Counter[str], int]:
    counts: collections.Counter[str] = collections.Counter()
    for stack, number in samples.items():
        if not STARTUP.search(stack):
            counts[classify(stack)] += number
    return counts, sum(counts.values())


def table(samples: collections.Counter[str], messages: int, main_cpu: float,
          other_cpu: float) -> str:
    """Stages of the main thread (its CPU split by samples), then the other threads."""
    counts, total = breakdown(samples)
    main_us = main_cpu / messages * 1e6
    other_us = other_cpu / messages * 1e6
    rows = ["| stage | us/msg | share |", "|---|---|---|"]
    for stage, count in counts.most_common():
        us = count / total * main_us
        rows.append(f"| {stage} | {us:.1f} | {us / (main_us + other_us):.0%} |")
    rows.append(f"| other threads (trio: the asyncio bridge thread; SQLite threads) |"
                f" {other_us:.1f} | {other_us / (main_us + other_us):.0%} |")
    rows.append(f"| total ({total} samples) | {main_us + other_us:.1f} | 100% |")
    return "\n".join(rows)


def drain(
    source: str, backend: str, messages: int
) -> tuple[collections.Counter[str], float, float]:
    """Drain ``messages`` (published first, not sampled) as the benchmarks do; returns the
    samples, and the CPU seconds of the main thread and of the others (measured in a run
    of its own, unsampled)."""
    from tests.benchmarks import emulator, inprocess

    def once(sampled: bool) -> tuple[collections.Counter[str], float, float]:
        if source == "pubsub":
            (subscription,) = anyio.run(emulator.prepare, messages, 1, backend="asyncio")
            run = lambda: emulator.drain_mandrill(backend, subscription, messages)  # noqa: E731
        else:
            broker = anyio.run(inprocess.filled_broker, messages, backend=backend)

            async def main() -> dict[str, float]:
                with inprocess.ledger_path("file") as path:
                    return await inprocess.run_mandrill(broker, path, messages)

            run = lambda: anyio.run(main, backend=backend)  # noqa: E731
        if not sampled:
            started = time.thread_time()
            cpu = run()["cpu"]
            main_cpu = time.thread_time() - started
            return collections.Counter(), main_cpu, cpu - main_cpu
        with sampling() as counts:
            run()
        return counts, 0.0, 0.0

    _, main, other = once(sampled=False)
    counts, _, _ = once(sampled=True)
    return counts, main, other


if __name__ == "__main__":
    source, backend = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 20_000
    samples, main, other = drain(source, backend, count)
    print(f"{source} {backend}: {count} messages, {(main + other) / count * 1e6:.1f} us CPU/msg")
    print(table(samples, count, main, other))
