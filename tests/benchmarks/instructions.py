"""Instructions per message of an in-process drain, counted by callgrind: repeatable on a
shared machine where times are not (the same count twice, whatever else is running).

    python -m tests.benchmarks.instructions [asyncio|trio] [SMALL LARGE] [--pubsub]

Drains ``SMALL`` and then ``LARGE`` messages (``serve()``, embedded broker, SQLite file
ledger, simulated restarts at latency 0; with ``--pubsub``, the Pub/Sub emulator's
subscription instead of the embedded broker, the emulator itself running outside
callgrind) under ``valgrind --tool=callgrind`` and prints
``(Ir(LARGE) - Ir(SMALL)) / (LARGE - SMALL)``: the instructions one more message costs, all
threads, start-up and shutdown cancelled out. Scheduling moves it by about ±1%. Each run
takes a few minutes (callgrind runs Python about 50x slower). Not part of ``tox -e bench``;
the README's figures of "instructions per message" come from it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio

from tests.benchmarks import emulator, inprocess
from tests.benchmarks.common import ROOT

TOTAL = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def drain(backend: str, messages: int) -> None:
    """The measured program: publish, then drain ``messages`` through ``serve()``."""
    broker = anyio.run(inprocess.filled_broker, messages, backend=backend)

    async def main() -> None:
        with inprocess.ledger_path("file") as path:
            await inprocess.run_mandrill(broker, path, messages)

    anyio.run(main, backend=backend)


def drain_pubsub(backend: str, subscription: str, messages: int) -> None:
    """The measured program with ``--pubsub``: drain a subscription that holds ``messages``."""
    emulator.drain_mandrill(backend, subscription, messages)


def instructions(backend: str, messages: int, *, pubsub: bool = False) -> int:
    """Instructions callgrind counts for a whole run of :func:`drain` (or, with ``pubsub``,
    :func:`drain_pubsub` of a fresh subscription) in a child process."""
    if pubsub:
        (subscription,) = anyio.run(emulator.prepare, messages, 1)
        call = f"drain_pubsub({backend!r}, {subscription!r}, {messages})"
    else:
        call = f"drain({backend!r}, {messages})"
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             "-c", f"from tests.benchmarks.instructions import drain, drain_pubsub; {call}"],
            cwd=ROOT, check=True, capture_output=True,
        )
        match = TOTAL.search(out.read_text(errors="replace"))
        assert match is not None, "no total in callgrind's output"
        return int(match.group(1))


def main(argv: list[str]) -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    pubsub = "--pubsub" in argv
    argv = [arg for arg in argv if arg != "--pubsub"]
    backend = argv[0] if argv else "asyncio"
    small, large = (int(argv[1]), int(argv[2])) if len(argv) > 2 else (2000, 6000)
    with emulator.running_emulator() if pubsub else contextlib.nullcontext():
        if pubsub:  # the JVM is slow until it has run a while (the figures drift otherwise)
            (warm_up,) = anyio.run(emulator.prepare, small, 1)
            drain_pubsub(backend, warm_up, small)
        counts = {n: instructions(backend, n, pubsub=pubsub) for n in (small, large)}
    per_message = (counts[large] - counts[small]) / (large - small)
    where = "Pub/Sub" if pubsub else "in-process"
    print(f"{where}, {backend}: {per_message / 1000:.1f}k instructions per message"
          f" (Ir {counts[small]:,} at {small:,}, {counts[large]:,} at {large:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
