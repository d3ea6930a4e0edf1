"""Event-loop lag, and which task holds the loop when it does not answer: on both backends.

Two parts, one owner (:meth:`LagProbe.run`):

* **The probe task** sleeps ``interval`` with :func:`anyio.sleep` and measures how much
  later than asked it woke up (:func:`anyio.current_time`). That oversleep is the *lag*:
  the latest value and the maximum over the last minute are exported as gauges, and
  ``/healthz`` fails when the probe's last beat is too old.
* **A watchdog thread** samples the loop thread's stack with :func:`sys._current_frames`
  every few milliseconds. When one task has held the loop without awaiting (one step)
  for longer than ``slow_callback_ms`` while the probe's timer is overdue, it logs a
  warning naming the task and the exact stack of the code that blocks, *while it is
  blocking*: a loop stuck for good is reported too, which no after-the-fact hook can do.

Why a thread rather than each backend's own tool: asyncio's debug mode
(``loop.slow_callback_duration``) and a ``trio.abc.Instrument`` timing each step both
report after the step has returned, show where the task resumed waiting rather than the
line that blocked, and cost something on every step (asyncio's debug mode a lot). The
thread costs nothing on the hot path, works the same on asyncio and trio, and names the
blocking line. Those tools stay available behind ``--debug`` (:mod:`mandrill.obs.debug`).

Limits: only code running inside a task is named (a blocking plain callback, say an
asyncio ``call_soon`` handler, shows up as lag only); a loop that is merely *busy* with
many short steps is lag, not a stall, and is not blamed on whichever task happens to run.

The thread is owned: :meth:`LagProbe.run` starts it and stops and joins it in ``finally``,
so it never outlives the task, nor the task group that started the task.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskStatus

from mandrill.obs.taskdump import frames_between

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.1
DEFAULT_SLOW_CALLBACK_MS = 100.0
#: How often a loop that stays blocked is reported again.
REPEAT_AFTER = 5.0
#: The window of :attr:`LagProbe.max_lag`, in seconds.
MAX_WINDOW = 60.0

_COROUTINE_FLAGS = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR

#: Given the outermost coroutine frame on the loop thread's stack, the name of its task.
TaskNamer = Callable[[FrameType], "str | None"]


@dataclass(frozen=True, slots=True)
class Stall:
    """One report of a task holding the loop: who, for how long so far, and where."""

    task: str | None
    held: float
    stack: str


#: The watchdog thread's name while it runs.
WATCHDOG_THREAD_NAME = "mandrill-loop-watchdog"


class LagProbe:
    """Measures event-loop lag; its watchdog names the task that blocks the loop.

    Create one per service; start :meth:`run` in the service's task group. The attributes
    are read by the metrics collector and the health check on the loop thread.
    ``slow_callback_ms`` of ``None`` or ``0`` turns the watchdog (and its thread) off.
    """

    def __init__(
        self,
        *,
        interval: float = DEFAULT_INTERVAL,
        slow_callback_ms: float | None = DEFAULT_SLOW_CALLBACK_MS,
        repeat_after: float = REPEAT_AFTER,
    ) -> None:
        if interval <= 0:
            raise ValueError("the lag probe's interval must be positive")
        self.interval = interval
        self.threshold = slow_callback_ms / 1000 if slow_callback_ms else None
        self.repeat_after = repeat_after
        #: Oversleep of the last beat, seconds.
        self.latest = 0.0
        #: Beats since start.
        self.beats = 0
        #: Stalls reported by the watchdog since start (each stall once).
        self.stalls_total = 0
        #: The most recent reports, newest last.
        self.stalls: deque[Stall] = deque(maxlen=16)
        self._last_beat: float | None = None
        self._due = math.inf
        self._window_start = 0.0
        self._window_max = 0.0
        self._previous_max = 0.0

    @property
    def max_lag(self) -> float:
        """The largest lag seen in the last 30 to 60 seconds."""
        return max(self._window_max, self._previous_max)

    def beat_age(self) -> float | None:
        """Seconds since the probe last woke up, or ``None`` if it is not running."""
        if self._last_beat is None:
            return None
        return time.monotonic() - self._last_beat

    def alive(self, bound: float) -> bool:
        """False if the probe runs but has not woken up within ``interval + bound``."""
        age = self.beat_age()
        return age is None or age <= self.interval + bound

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Probe until cancelled. Ready once the watchdog runs; never returns.

        The watchdog runs in a worker thread owned by this task's task group; cancellation
        stops it and waits for it (at most one of its ticks, a few milliseconds).
        """
        namer = _task_namer()
        self._last_beat = time.monotonic()
        self._window_start = self._last_beat
        try:
            async with self._watchdog(threading.get_ident(), namer):
                task_status.started()
                while True:
                    started = anyio.current_time()
                    self._due = time.monotonic() + self.interval
                    await anyio.sleep(self.interval)
                    self._record(max(0.0, anyio.current_time() - started - self.interval))
        finally:
            self._last_beat = None
            self._due = math.inf

    def _record(self, lag: float) -> None:
        now = time.monotonic()
        self._last_beat = now
        self.latest = lag
        self.beats += 1
        if now - self._window_start >= MAX_WINDOW / 2:
            self._previous_max, self._window_max = self._window_max, 0.0
            self._window_start = now
        self._window_max = max(self._window_max, lag)

    @asynccontextmanager
    async def _watchdog(self, loop_thread: int, namer: TaskNamer) -> AsyncIterator[None]:
        if self.threshold is None:
            yield
            return
        stop = threading.Event()
        running = anyio.Event()
        async with anyio.create_task_group() as group:
            # Its own limiter: the watchdog must not wait for, nor take, a pool slot that
            # the ledger or the asyncio bridge needs.
            group.start_soon(
                partial(
                    anyio.to_thread.run_sync,
                    self._watch,
                    loop_thread,
                    namer,
                    self.threshold,
                    stop,
                    partial(anyio.from_thread.run_sync, running.set),
                    limiter=anyio.CapacityLimiter(1),
                ),
                name="loop watchdog",
            )
            try:
                await running.wait()
                yield
            finally:
                stop.set()

    def _watch(
        self,
        loop_thread: int,
        namer: TaskNamer,
        threshold: float,
        stop: threading.Event,
        report_running: Callable[[], object],
    ) -> None:
        """The watchdog thread's body: sample, and report a task that holds the loop.

        Named while it runs (a pool thread), so thread dumps and tests can find it.
        """
        thread = threading.current_thread()
        pool_name, thread.name = thread.name, WATCHDOG_THREAD_NAME
        report_running()
        try:
            self._sample(loop_thread, namer, threshold, stop)
        finally:
            thread.name = pool_name

    def _sample(
        self, loop_thread: int, namer: TaskNamer, threshold: float, stop: threading.Event
    ) -> None:
        tick = min(max(threshold / 4, 0.005), 0.025)
        # A step is the same task frame on the stack with no probe beat in between (a
        # beat means the loop went round, so a task seen again is in a later step).
        step: tuple[FrameType | None, float | None] = (None, None)
        since = 0.0
        reported_at: float | None = None
        while not stop.wait(tick):
            now = time.monotonic()
            top = sys._current_frames().get(loop_thread)
            task_frame = _outermost_coroutine(top)
            beat = self._last_beat
            if task_frame is not step[0] or beat != step[1]:
                step, since, reported_at = (task_frame, beat), now, None
            elif (
                task_frame is not None
                and top is not None
                and now - since >= threshold
                and now >= self._due
                and (reported_at is None or now - reported_at >= self.repeat_after)
            ):
                try:
                    self._report(top, task_frame, namer, now - since, first=reported_at is None)
                except Exception:  # a bug here must not end the watchdog silently
                    log.exception("the event-loop watchdog failed to report a stall")
                reported_at = now
            # Only the step's own frame stays referenced while sleeping (for the identity
            # check); the rest of the loop thread's stack, with its locals, is let go.
            del top, task_frame

    def _report(
        self, top: FrameType, task_frame: FrameType, namer: TaskNamer, held: float, *, first: bool
    ) -> None:
        stack = "".join(_task_stack(top, task_frame).format())
        try:
            name = namer(task_frame)
        except Exception:  # the loop thread may change the task tree while we read it
            name = None
        if first:
            self.stalls_total += 1
        self.stalls.append(Stall(name, held, stack))
        log.warning(
            "event loop blocked for %.0f ms (threshold %.0f ms) by task %s, at:\n%s",
            held * 1000,
            (self.threshold or 0) * 1000,
            repr(name) if name else "(unknown)",
            stack.rstrip(),
        )


def _outermost_coroutine(frame: FrameType | None) -> FrameType | None:
    """The running task's own frame: the outermost coroutine frame on a stack."""
    outermost = None
    while frame is not None:
        if frame.f_code.co_flags & _COROUTINE_FLAGS:
            outermost = frame
        frame = frame.f_back
    return outermost


def _task_stack(top: FrameType, task_frame: FrameType) -> traceback.StackSummary:
    """The frames from the task's own frame down to the one running now (outermost first)."""
    return traceback.StackSummary.extract(frames_between(task_frame, top))


def _task_namer() -> TaskNamer:
    """How the watchdog thread names a task; built on the loop thread for its backend.

    Read from another thread while the loop is blocked, when its task structures do not
    change (if blocking code does change them, naming fails and the stall is reported
    without a name).
    """
    if sniffio.current_async_library() == "trio":
        import trio

        root = trio.lowlevel.current_root_task()

        def trio_name(frame: FrameType) -> str | None:
            pending = [root] if root is not None else []
            while pending:
                task = pending.pop()
                if getattr(task.coro, "cr_frame", None) is frame:
                    return task.name
                for nursery in list(task.child_nurseries):
                    pending.extend(list(nursery.child_tasks))
            return None

        return trio_name

    loop = asyncio.get_running_loop()

    def asyncio_name(frame: FrameType) -> str | None:
        task: asyncio.Task[Any] | None = asyncio.current_task(loop)
        return task.get_name() if task is not None else None

    return asyncio_name
