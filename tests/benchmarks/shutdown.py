"""Shutdown latency: SIGTERM → exit of a real ``mandrill run`` process.

The daemon runs the embedded demo with restarts that never finish (``--restart-latency
1h``), so every delivery it takes stays held: ``--count 0`` held means nothing published
(``--no-publish``), ``--count 1000`` with ``--max-in-flight 1000 --rate 0`` means all 1,000
held (seen on ``/metrics``, ``mandrill_messages_in_flight``). Then SIGTERM with ``--grace
0``; the figure is the wall time from the signal to the process's exit, nothing subtracted.
The run must log that it settled every held message and left nothing unsettled: since
issue 18 a restart cut short after it began is recorded ``unknown`` and acked (counted as
done), so the held messages are acked, not nacked.

Baseline: a bare ``python -c "import mandrill.cli; …"`` process killed by SIGTERM's default
action (what exiting costs the interpreter at all).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.benchmarks.common import BACKENDS, ROOT, BenchmarkError, Results, progress, rotating
from tests.support.net import free_port

BENCHMARK = "shutdown"
HELD = (0, 1000)
LIMITS = {0: 0.5, 1000: 1.0}
#: How long the daemon may take to start and take its messages.
READY_SECONDS = 60.0
EXIT_SECONDS = 30.0


def _in_flight(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("mandrill_messages_in_flight "):
            return int(float(line.split()[1]))
    return None


def _exit_time(process: subprocess.Popen[bytes]) -> float:
    """Send SIGTERM; the seconds until the process has exited (blocking ``waitpid``)."""
    started = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise BenchmarkError(f"no exit within {EXIT_SECONDS:.0f}s of SIGTERM") from None
    return time.perf_counter() - started


def daemon_shutdown(backend: str, held: int, directory: str) -> float:
    """Start ``mandrill run``, wait until ``held`` deliveries are held, SIGTERM it."""
    port = free_port()
    log_path = Path(directory) / f"mandrill-{backend}-{held}.log"
    # Seed 0 draws 1,000 distinct host names: none is skipped as restarted already.
    publish = ["--count", str(held), "--rate", "0", "--seed", "0"] if held else ["--no-publish"]
    command = [
        sys.executable, "-m", "mandrill", "run",
        "--backend", backend,
        "--ledger", str(Path(directory) / f"ledger-{backend}-{held}-{time.time_ns()}.db"),
        "--restart-latency", "1h",
        "--restart-failure-rate", "0",
        "--max-in-flight", "1000",
        "--grace", "0",
        "--metrics-addr", f"127.0.0.1:{port}",
        "--log-format", "json",
        *publish,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while _in_flight(port) != held:
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError(f"daemon never held {held} messages; log {log_path}")
            time.sleep(0.05)
        time.sleep(0.2)  # let the last claims commit: a steady state, not a burst
        seconds = _exit_time(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    _check_log(log_path, held, process.returncode)
    return seconds


def _check_log(path: Path, held: int, returncode: int) -> None:
    messages = []
    for raw in path.read_text().splitlines():
        try:
            messages.append(json.loads(raw).get("message", ""))
        except json.JSONDecodeError:
            messages.append(raw)
    if returncode != 0:
        raise BenchmarkError(f"daemon exited {returncode}; log {path}")
    summary = next((m for m in messages if m.startswith("stopped (")), "")
    settled = sum(int(n) for n in re.findall(r"\b(?:acked|nacked) (\d+)", summary))
    if settled != held or "unsettled 0" not in summary:
        raise BenchmarkError(f"the daemon did not settle all {held} held messages: {summary!r}")


def bare_exit() -> float:
    """A Python process that imported mandrill.cli, killed by SIGTERM's default action."""
    code = "import sys, time, mandrill.cli; print('ready', flush=True); time.sleep(60)"
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    process.stdout.readline()
    try:
        return _exit_time(process)
    finally:
        process.stdout.close()


def run(results: Results, *, rounds: int) -> None:
    keys = ["bare/-"] + [f"{backend}/{held}" for backend in BACKENDS for held in HELD]
    with tempfile.TemporaryDirectory(prefix="bench-shutdown-") as directory:
        for number, key in rotating(keys, rounds):
            backend, held = key.split("/")
            if backend == "bare":
                seconds = bare_exit()
                for each in BACKENDS:
                    results.figure(BENCHMARK, each, "bare python", "s").samples.append(seconds)
            else:
                seconds = daemon_shutdown(backend, int(held), directory)
                contender = f"{held} held"
                results.figure(BENCHMARK, backend, contender, "s").samples.append(seconds)
            progress(f"  shutdown round {number + 1}: {key:<14} {seconds * 1000:7.0f} ms")
    for backend in BACKENDS:
        bare = results.figure(BENCHMARK, backend, "bare python", "s")
        bare.ratio = 1.0
        for held in HELD:
            figure = results.figure(BENCHMARK, backend, f"{held} held", "s").compare(bare)
            results.target(BENCHMARK, backend, f"SIGTERM -> exit, {held} held <= {LIMITS[held]} s",
                           figure.median, LIMITS[held], "s", higher_is_better=False)
    results.notes.append(
        "shutdown: `mandrill run` (embedded broker, SQLite file ledger, --grace 0,"
        " --restart-latency 1h so deliveries stay held); wall time from SIGTERM to exit."
    )
