"""Heavy logging from many tasks into a slow stream does not hold up the event loop."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from mandrill.obs.lag import LagProbe
from mandrill.obs.logs import configured_logging

TASKS = 50
LINES = 200


class SlowStream(io.TextIOBase):
    """A stream whose every write takes 1 ms (a slow terminal, a full pipe), until told."""

    def __init__(self) -> None:
        self.slow = True
        self.lines = 0

    def write(self, text: str) -> int:
        if self.slow:
            time.sleep(0.001)
        self.lines += text.count("\n")
        return len(text)

    def isatty(self) -> bool:
        return False


@pytest.fixture(
    params=[pytest.param(("asyncio", {}), id="asyncio"), pytest.param(("trio", {}), id="trio")]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Both backends, but asyncio without debug mode: debug mode captures a stack for every
    callback it schedules, which costs more per step than the logging measured here."""
    return request.param


@pytest.fixture
def no_gc_pauses():
    """A full collection of pytest's heap alone can pause the loop for 30 to 50 ms: not
    what this test measures (the records are freed by reference counting anyway)."""
    gc.disable()
    yield
    gc.enable()


@pytest.fixture
def mandrill_logger():
    """configured_logging leaves level and propagation changed: restore them for others."""
    logger = logging.getLogger("mandrill")
    saved = logger.level, logger.propagate, list(logger.handlers)
    yield logger
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


async def chatty(number: int) -> None:
    log = logging.getLogger("mandrill.test.chatty")
    for line in range(LINES):
        log.info("task %d says line %d", number, line, extra={"message_id": f"m{number}"})
        if line % 2 == 1:
            await anyio.lowlevel.checkpoint()


@pytest.mark.usefixtures("no_gc_pauses", "mandrill_logger")
async def test_logging_from_many_tasks_to_a_slow_stream_does_not_block():
    stream = SlowStream()
    probe = LagProbe(interval=0.005, slow_callback_ms=None)
    with configured_logging("json", "info", stream):
        async with anyio.create_task_group() as tg:
            await tg.start(probe.run)
            started = anyio.current_time()
            async with anyio.create_task_group() as loggers:
                for number in range(TASKS):
                    loggers.start_soon(chatty, number, name=f"logger-{number}")
            elapsed = anyio.current_time() - started
            # One more beat, so that the last stretch of logging is measured too.
            beats = probe.beats
            with anyio.fail_after(5):
                while probe.beats <= beats:  # noqa: ASYNC110 - the probe has no event
                    await anyio.sleep(probe.interval)
            max_lag = probe.max_lag
            tg.cancel_scope.cancel()
        # Written synchronously, the lines would have taken TASKS * LINES ms (10 s) of the
        # loop's time; the writer thread takes them instead. Let it finish quickly now.
        stream.slow = False
    assert max_lag < 0.05
    assert elapsed < TASKS * LINES * 0.001 / 2
    assert stream.lines == TASKS * LINES


class Lines(io.StringIO):
    def isatty(self) -> bool:
        return False

    def documents(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines()]


@pytest.mark.usefixtures("mandrill_logger")
def test_json_lines_carry_cloud_logging_severity_and_every_extra_field():
    stream = Lines()
    log = logging.getLogger("mandrill.test.severity")
    with configured_logging("json", "debug", stream):
        log.debug("d")
        log.info("i", extra={"message_id": "m1", "host": "h.example.net", "attempt": 3})
        log.warning("w", extra={"when": datetime(2026, 1, 1, tzinfo=UTC)})
        log.error("e")
        log.critical("c")
        log.log(25, "between info and warning")
    documents = stream.documents()
    assert [d["severity"] for d in documents] == [
        "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "INFO",
    ]
    assert [d["level"] for d in documents][:5] == ["debug", "info", "warning", "error",
                                                   "critical"]
    assert documents[1] | {"time": ""} == {
        "time": "", "severity": "INFO", "level": "info", "logger": "mandrill.test.severity",
        "message": "i", "message_id": "m1", "host": "h.example.net", "attempt": 3,
    }
    assert documents[2]["when"] == "2026-01-01 00:00:00+00:00"


@pytest.mark.usefixtures("mandrill_logger")
def test_asyncio_debug_lines_go_through_the_same_formatter():
    asyncio_logger = logging.getLogger("asyncio")
    saved = asyncio_logger.level, asyncio_logger.propagate

    async def block() -> None:
        time.sleep(0.15)  # noqa: ASYNC251 - longer than asyncio's 0.1 s slow-callback bound

    stream = Lines()
    with configured_logging("json", "info", stream):
        asyncio.run(block(), debug=True)
    slow = [d for d in stream.documents() if d["logger"] == "asyncio"]
    assert any("took" in d["message"] and d["severity"] == "WARNING" for d in slow), slow
    assert (asyncio_logger.level, asyncio_logger.propagate) == saved
