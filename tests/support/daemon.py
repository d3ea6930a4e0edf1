"""Drive ``mandrill`` as a real process: start it, read its JSON log lines, signal it."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

LogLine = dict[str, Any]


def mandrill_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "mandrill", *args]


class Daemon:
    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stderr is not None
        self._stderr = BufferedByteReceiveStream(process.stderr)
        self.lines: list[LogLine] = []

    async def wait_for(self, predicate: Callable[[LogLine], bool], seconds: float = 30) -> LogLine:
        """Read log lines until one matches; fails if the process ends first."""
        with anyio.fail_after(seconds):
            while True:
                line = await self._next_line()
                if line is None:
                    raise AssertionError(f"process ended before the line; log: {self.lines[-5:]}")
                if predicate(line):
                    return line

    async def wait_for_message(self, text: str, seconds: float = 30) -> LogLine:
        return await self.wait_for(lambda line: text in line.get("message", ""), seconds)

    async def finish(self, seconds: float = 30) -> int:
        """Read the rest of the log and wait for the exit code."""
        with anyio.fail_after(seconds):
            while await self._next_line() is not None:
                pass
            return await self.process.wait()

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def messages(self) -> list[str]:
        return [line.get("message", "") for line in self.lines]

    async def _next_line(self) -> LogLine | None:
        try:
            raw = await self._stderr.receive_until(b"\n", 1 << 20)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            return None
        text = raw.decode()
        try:
            line: LogLine = json.loads(text)
        except json.JSONDecodeError:
            line = {"message": text, "level": "raw"}
        self.lines.append(line)
        return line


async def start(args: Sequence[str], env: dict[str, str] | None = None) -> Daemon:
    environment = {**os.environ, **(env or {})}
    process = await anyio.open_process(
        mandrill_argv(*args, "--log-format", "json"),
        env=environment,
        stdin=None,
        stdout=None,
    )
    return Daemon(process)


async def run_to_end(
    args: Sequence[str], seconds: float = 60, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run a command to completion (``env`` added to this one's); returns (exit code,
    stdout, stderr)."""
    environment = {**os.environ, **(env or {})}
    with anyio.fail_after(seconds):
        result = await anyio.run_process(mandrill_argv(*args), check=False, env=environment)
    return result.returncode, result.stdout.decode(), result.stderr.decode()
