"""systemd's notification protocol (``Type=notify``), with the standard library alone.

Under systemd, ``NOTIFY_SOCKET`` names a datagram socket (a path, or ``@name`` in the
abstract namespace). :class:`SystemdNotifier` sends on it ``READY=1`` once the daemon is
ready (``/readyz`` would answer 200), ``STOPPING=1`` as it begins to stop, ``STATUS=``
lines for ``systemctl status``, and, when the unit sets ``WatchdogSec=`` (systemd passes
``WATCHDOG_USEC``), ``WATCHDOG=1`` every half of it. The pings come from a task on the
event loop: a loop that is stuck stops pinging, and systemd restarts the daemon.

Sending never blocks: a datagram the socket cannot take now is dropped (the next ping
follows), and a failure is logged once, not at every ping.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from mandrill.obs.health import ServiceHealth
    from mandrill.shutdown import Shutdown

log = logging.getLogger(__name__)

#: The environment systemd gives a ``Type=notify`` service.
NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
ENVIRONMENT = (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID)

#: While serving but not ready (a part's check finds a problem), how often readiness is
#: asked again: nothing announces that a check's answer changed.
READINESS_POLL = 0.5


@dataclass(frozen=True)
class NotifySettings:
    #: A filesystem path, or an abstract name starting with NUL.
    address: str
    #: Seconds between watchdog pings (half of ``WATCHDOG_USEC``); None: no watchdog.
    watchdog_interval: float | None = None


def notify_settings(environ: Mapping[str, str], pid: int) -> NotifySettings | None:
    """The settings systemd's variables describe for process ``pid``; None without
    ``NOTIFY_SOCKET``. Watchdog variables meant for another process (``WATCHDOG_PID``)
    are ignored. Raises ``ValueError`` (one line) for a malformed value."""
    where = environ.get(NOTIFY_SOCKET, "")
    if not where:
        return None
    if where.startswith("@"):
        address = "\0" + where[1:]
    elif where.startswith("/"):
        address = where
    else:
        raise ValueError(
            f"{NOTIFY_SOCKET}: {where!r} is not an absolute path nor an @abstract socket name"
        )
    return NotifySettings(address, _watchdog_interval(environ, pid))


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    watched = environ.get(WATCHDOG_PID)
    if watched is not None:
        if not (watched.isascii() and watched.isdigit() and int(watched) > 0):
            raise ValueError(f"{WATCHDOG_PID}: {watched!r} is not a process id")
        if int(watched) != pid:
            return None
    usec = environ.get(WATCHDOG_USEC)
    if usec is None:
        return None
    if not (usec.isascii() and usec.isdigit() and int(usec) > 0):
        raise ValueError(f"{WATCHDOG_USEC}: {usec!r} is not a positive number of microseconds")
    return int(usec) / 2e6


class SystemdNotifier:
    """Tells systemd how the daemon is: see the module's docstring. ``health`` says when
    the daemon is ready, ``shutdown`` when it stops."""

    def __init__(
        self, settings: NotifySettings, health: ServiceHealth, shutdown: Shutdown
    ) -> None:
        self.settings = settings
        self._health = health
        self._shutdown = shutdown
        self._socket: socket.socket | None = None
        self._failing = False
        self.ready_sent = False
        self.stopping_sent = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled (the end of ``serve()``): ready, then stopping, pinging the
        watchdog all along. Says ``STOPPING=1`` on the way out if a failure ended the
        daemon before any shutdown request."""
        with self._open():
            try:
                async with anyio.create_task_group() as group:
                    if self.settings.watchdog_interval is not None:
                        group.start_soon(self._ping, self.settings.watchdog_interval,
                                         name="systemd watchdog")
                    task_status.started()
                    self.send("STATUS=starting")
                    await self._announce_ready()
                    await self._shutdown.requested.wait()
                    self._announce_stopping()
            finally:
                self._announce_stopping()

    async def _announce_ready(self) -> None:
        await _first(self._health.wait_serving, self._shutdown.requested.wait)
        said = ""
        while not self._shutdown.requested.is_set():
            ready, reason = self._health.ready()
            if ready:
                self.send("READY=1\nSTATUS=ready")
                self.ready_sent = True
                return
            if reason != said:
                self.send(f"STATUS=not ready: {reason}")
                said = reason
            with anyio.move_on_after(READINESS_POLL):
                await self._shutdown.requested.wait()

    def _announce_stopping(self) -> None:
        if not self.stopping_sent:
            self.stopping_sent = True
            reason = self._shutdown.reason
            self.send("STOPPING=1\nSTATUS=stopping" + (f" ({reason})" if reason else ""))

    async def _ping(self, interval: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await anyio.sleep(interval)

    def send(self, state: str) -> None:
        """Send ``state`` (``KEY=value`` lines) now, without blocking; a failure is logged
        (once, until a send succeeds again) and otherwise ignored."""
        assert self._socket is not None, "send() outside run()"
        try:
            self._socket.sendto(state.encode(), self.settings.address)
        except OSError as exc:
            if not self._failing:
                log.warning("systemd notification failed (%s); retrying at the next one", exc)
            self._failing = True
            return
        if self._failing:
            log.info("systemd notifications are going through again")
        self._failing = False

    @contextlib.contextmanager
    def _open(self) -> Iterator[None]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            self._socket = sock
            try:
                yield
            finally:
                self._socket = None


async def _first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as one of ``waits`` returns (the others are cancelled)."""
    async with anyio.create_task_group() as group:

        async def then_stop(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            group.cancel_scope.cancel()

        for wait in waits:
            group.start_soon(then_stop, wait)
