"""What ``--debug`` turns on, per backend.

* asyncio: the loop's debug mode (``anyio.run(..., backend_options={"debug": True})``):
  never-awaited coroutines with where they were created, non-thread-safe calls, and
  asyncio's own "Executing <Task …> took 0.2 seconds" warning for every step longer than
  ``loop.slow_callback_duration``, which :func:`watch_slow_steps` lowers to the
  ``--slow-callback-ms`` threshold. Costly: not for production throughput.
* trio: a :class:`SlowStepInstrument` times every task step and logs the task's name and
  where it now waits when one step ran longer than the threshold.

Without ``--debug`` the lag probe's watchdog (:mod:`mandrill.obs.lag`) still names a task
that blocks the loop, on both backends, at no cost per step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import Any

import anyio
import sniffio
import trio
from anyio.abc import TaskStatus

from mandrill.obs.lag import DEFAULT_SLOW_CALLBACK_MS

log = logging.getLogger(__name__)

#: ``--slow-callback-ms`` when ``--debug`` is given without it.
DEBUG_SLOW_CALLBACK_MS = 20.0


def backend_options(backend: str, debug: bool) -> dict[str, Any]:
    """The ``backend_options`` for ``anyio.run`` (asyncio's debug mode; nothing on trio)."""
    if backend == "asyncio" and debug:
        return {"debug": True}
    return {}


def slow_callback_ms(debug: bool, configured: float | None) -> float:
    """The slow-step threshold: the configured one, else lower under ``--debug``."""
    if configured is not None:
        return configured
    return DEBUG_SLOW_CALLBACK_MS if debug else DEFAULT_SLOW_CALLBACK_MS


class SlowStepInstrument(trio.abc.Instrument):
    """Logs every trio task step longer than ``threshold`` seconds, with the task's name.

    The stack shown is where the task waits *after* the step (trio calls the hook once
    the step has returned); the watchdog of :mod:`mandrill.obs.lag` shows where it blocked.
    Runs on every step: for debugging, not for production.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        #: When the step under way began; ``None`` outside a timed step. The instrument is
        #: added in the middle of a step (its installer's), whose end has no start to
        #: measure from: without this it was measured from perf_counter's zero (minutes
        #: or days, a bogus "slow step" at every --debug start).
        self._started: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return
        elapsed = time.perf_counter() - self._started
        self._started = None
        if elapsed >= self.threshold:
            stack = traceback.StackSummary.extract(task.iter_await_frames())
            log.warning(
                "task %r ran %.0f ms without awaiting (threshold %.0f ms); now waiting at:\n%s",
                task.name,
                elapsed * 1000,
                self.threshold * 1000,
                "".join(stack.format()).rstrip(),
            )


async def watch_slow_steps(
    threshold_ms: float, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Report steps longer than ``threshold_ms`` until cancelled (a ``--debug`` service).

    On trio, installs a :class:`SlowStepInstrument`; on asyncio, sets the running loop's
    ``slow_callback_duration`` (reported by asyncio only in debug mode, see
    :func:`backend_options`). Both are undone at cancellation. Never returns.
    """
    threshold = threshold_ms / 1000
    if sniffio.current_async_library() == "trio":
        instrument = SlowStepInstrument(threshold)
        trio.lowlevel.add_instrument(instrument)
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            trio.lowlevel.remove_instrument(instrument)
    else:
        loop = asyncio.get_running_loop()
        previous = loop.slow_callback_duration
        loop.slow_callback_duration = threshold
        if not loop.get_debug():
            log.info("asyncio reports slow steps only in debug mode (--debug)")
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            loop.slow_callback_duration = previous
