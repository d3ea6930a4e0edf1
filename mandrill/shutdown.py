"""Shutdown requests: from signals, from ``--count`` being reached, or from a test."""

from __future__ import annotations

import logging
import math
import signal

import anyio
from anyio.abc import TaskStatus

log = logging.getLogger(__name__)

#: Signals that stop the daemon gracefully; any other keeps its default behaviour.
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Shutdown:
    """Two stages: ``requested`` starts the graceful stop, ``forced`` skips the grace.

    ``settle_by`` is when everything still held must be settled (``current_time()``
    seconds; infinite until the service sets it at the first signal, and earlier at a
    forced stop): a cancelled task's last words (:meth:`last_words`) never run past it.
    """

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.forced = anyio.Event()
        self.reason = ""
        self.settle_by = math.inf

    def settle_within(self, seconds: float) -> None:
        """Everything held must be settled ``seconds`` from now at the latest (a deadline
        already set earlier stays)."""
        self.settle_by = min(self.settle_by, anyio.current_time() + seconds)

    def last_words(self, seconds: float) -> anyio.CancelScope:
        """A shielded scope for what a cancelled task must still do (record that its
        restart was cancelled): at most ``seconds``, and never past ``settle_by``."""
        return anyio.CancelScope(
            shield=True, deadline=min(anyio.current_time() + seconds, self.settle_by)
        )

    def request(self, reason: str) -> None:
        if not self.requested.is_set():
            self.reason = reason
            self.requested.set()

    def force(self, reason: str) -> None:
        self.request(reason)
        self.forced.set()


async def watch_signals(
    shutdown: Shutdown, grace: float, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Turn SIGINT/SIGTERM/SIGHUP into shutdown requests; the second one forces.

    Installing our own SIGINT handler makes both backends behave alike: trio would
    otherwise raise ``KeyboardInterrupt`` wherever the program is, asyncio cancel the
    main task. Ready (handlers installed) when ``task_status.started()`` is reported.
    """
    with anyio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if not shutdown.requested.is_set():
                log.warning(
                    "%s received: stopping (grace %.1fs); send it again to stop at once",
                    name,
                    grace,
                )
                shutdown.request(name)
            else:
                log.warning("%s received again: cancelling in-flight work now", name)
                shutdown.force(name)
