"""Heavy logging from many tasks into a slow stream does not hold up the event loop."""

from __future__ import annotations

import gc
import io
import logging
import time
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
