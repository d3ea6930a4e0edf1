"""``kill -USR1 <pid>``: log the live task tree, each task with the stack it waits in.

The tree comes from :func:`anyio.get_running_tasks`, which gives every task's name and
parent on both backends (on asyncio, tasks not started by anyio have no known parent and
appear at the top level). A task's stack is read by following its coroutine's ``await``
chain (``cr_await``), the way ``trio.lowlevel.Task.iter_await_frames`` does: the innermost
frame is the line the task is suspended at. Threads (``to_thread`` workers, the log writer,
the lag watchdog) follow with their stacks, since a stuck daemon often waits on one.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import sysconfig
import threading
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from types import FrameType

import anyio
import sniffio
from anyio.abc import TaskStatus

log = logging.getLogger(__name__)

def format_task_tree(*, full: bool = False) -> str:
    """The running tasks as an indented tree, each with its await stack, then the threads.

    Sibling tasks without children waiting at the same line are listed once, as a group.
    Runs of library frames (stdlib, site-packages) are shortened to their first frame
    (the call the program made into the library) unless ``full``. Call it from the event
    loop's thread (it reads the loop's task structures); it does not await, block or raise.
    """
    caller = sys._getframe(1)
    tasks = anyio.get_running_tasks()
    current = anyio.get_current_task().id
    by_id = {task.id: task for task in tasks}
    children: defaultdict[int | None, list[anyio.TaskInfo]] = defaultdict(list)
    for task in tasks:
        parent = task.parent_id if task.parent_id in by_id else None
        children[parent].append(task)
    lines = [
        f"task tree at {datetime.now().isoformat(timespec='seconds')}"
        f" ({sniffio.current_async_library()}, {len(tasks)} tasks):"
    ]

    def stack_of(task: anyio.TaskInfo) -> list[str]:
        if task.id == current:
            return list(_format_stack(_running_frames(task.coro, caller), full))
        return list(_format_stack(list(_await_frames(task.coro)), full))

    def add_all(siblings: list[anyio.TaskInfo], depth: int) -> None:
        # Siblings without children that wait at the same place (256 idle workers) are
        # shown once, as a group.
        groups: dict[tuple[str, ...], list[anyio.TaskInfo]] = {}
        shown: list[tuple[list[anyio.TaskInfo], list[str]]] = []
        for task in sorted(siblings, key=_natural):
            stack = stack_of(task)
            if children[task.id] or task.id == current:
                shown.append(([task], stack))
                continue
            key = tuple(stack)
            if key not in groups:
                groups[key] = []
                shown.append((groups[key], stack))
            groups[key].append(task)
        indent = "  " * depth
        for group, stack in shown:
            first = group[0]
            flags = " (cancel pending)" if first.has_pending_cancellation() else ""
            if first.id == current:
                flags += " (this task: dumping)"
            names = [task.name or "<unnamed>" for task in group]
            label = ", ".join(names[:3] if len(names) > 4 else names)
            if len(names) > 4:
                label += f" and {len(names) - 3} more"
            if len(names) > 1:
                label += f" ({len(names)} tasks, same stack)"
            lines.append(f"{indent}- {label}{flags}")
            lines.extend(f"{indent}  | {line}" for line in stack)
            add_all(children[first.id], depth + 1)

    add_all(children[None], 0)
    lines.extend(_thread_stacks(full))
    return "\n".join(lines)


async def dump_tasks_on_signal(
    *,
    signum: signal.Signals | None = None,
    write: Callable[[str], None] | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """On each ``signum`` (SIGUSR1), pass :func:`format_task_tree` to ``write``.

    ``write`` defaults to one WARNING record on the ``mandrill.obs.taskdump`` logger.
    Ready once the handler is installed; runs until cancelled. On the asyncio backend and
    on trio the signal receiver must be opened in the main thread.
    """
    number = signum if signum is not None else signal.SIGUSR1
    emit = write if write is not None else _log_dump
    with anyio.open_signal_receiver(number) as signals:
        task_status.started()
        async for _ in signals:
            emit(format_task_tree())


def _log_dump(text: str) -> None:
    log.warning("%s", text)


def _await_frames(coro: object) -> Iterator[tuple[FrameType, int]]:
    """The frames of a coroutine's await chain, outermost first."""
    while coro is not None:
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if not isinstance(frame, FrameType):
            return
        yield frame, frame.f_lineno or 0
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )


def _running_frames(coro: object, caller: FrameType) -> list[tuple[FrameType, int]]:
    """The live stack of the task running now, from its coroutine's frame to ``caller``."""
    return frames_between(getattr(coro, "cr_frame", None), caller)


def frames_between(
    outer: FrameType | None, inner: FrameType
) -> list[tuple[FrameType, int]]:
    """``(frame, line)`` from ``outer`` down to ``inner``, outermost first (from the bottom of
    the stack when ``outer`` is not above ``inner``)."""
    frames: list[tuple[FrameType, int]] = []
    frame: FrameType | None = inner
    while frame is not None:
        frames.append((frame, frame.f_lineno or 0))
        if frame is outer:
            break
        frame = frame.f_back
    return frames[::-1]


def _thread_stacks(full: bool) -> Iterator[str]:
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    current = threading.get_ident()
    for ident, top in sys._current_frames().items():
        if ident == current:
            continue
        frames: list[tuple[FrameType, int]] = []
        frame: FrameType | None = top
        while frame is not None:
            frames.append((frame, frame.f_lineno or 0))
            frame = frame.f_back
        yield f"thread {names.get(ident, ident)!r}:"
        # A thread's innermost frame is where it blocks (a lock, a socket, SQLite): keep it.
        lines = _format_stack(frames[::-1], full, keep_innermost=True)
        yield from (f"  | {line}" for line in lines)


def _format_stack(
    frames: list[tuple[FrameType, int]], full: bool, *, keep_innermost: bool = False
) -> Iterator[str]:
    """Lines of a stack (outermost first); each run of library frames kept to its first
    frame (the program's call into the library), and the innermost if asked."""
    summaries = traceback.StackSummary.extract(frames)
    skipped = 0
    previous_was_library = False
    for index, summary in enumerate(summaries):
        library = not full and _is_library(summary.filename)
        innermost = keep_innermost and index == len(summaries) - 1
        if library and previous_was_library and not innermost:
            skipped += 1
            continue
        if skipped:
            yield _skipped(skipped)
            skipped = 0
        previous_was_library = library
        yield f'  File "{summary.filename}", line {summary.lineno}, in {summary.name}'
        if summary.line:
            yield f"    {summary.line}"
    if skipped:
        yield _skipped(skipped)


def _skipped(count: int) -> str:
    return f"  ... {count} library frame{'s' if count > 1 else ''}"


def _library_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    found = {os.path.join(paths[key], "") for key in ("stdlib", "platstdlib", "purelib",
                                                      "platlib") if key in paths}
    return tuple(sorted(found))


_LIBRARY = _library_prefixes()
# This package counts as the program's own code even when installed in site-packages.
_OWN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "")


def _is_library(filename: str) -> bool:
    return filename.startswith(_LIBRARY) and not filename.startswith(_OWN)


def _natural(task: anyio.TaskInfo) -> list[int | str]:
    """Sort key putting ``worker-2`` before ``worker-10``."""
    parts = re.split(r"(\d+)", task.name or "")
    return [int(part) if part.isdigit() else part for part in parts]
