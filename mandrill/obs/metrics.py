"""What ``run`` turns on to watch the daemon (:class:`Observability`): the lag probe, the
task dump, the slow-step watchdog, the metrics server, the status page and systemd's
notifications: the probes ``serve()`` starts.

The pieces live beside it: :mod:`~mandrill.obs.collector` (the Prometheus view of the
counters), :mod:`~mandrill.obs.http` (the server), :mod:`~mandrill.obs.health` (the
probes' answers), :mod:`~mandrill.obs.address` (``--metrics-addr``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from mandrill.obs.collector import build_registry
from mandrill.obs.counters import Counters
from mandrill.obs.debug import watch_slow_steps
from mandrill.obs.health import Health, ServiceHealth
from mandrill.obs.http import StatusSource, serve_http
from mandrill.obs.lag import DEFAULT_SLOW_CALLBACK_MS, LagProbe
from mandrill.obs.systemd import NotifySettings, SystemdNotifier
from mandrill.obs.taskdump import dump_tasks_on_signal

if TYPE_CHECKING:
    from mandrill.obs.status import StatusBoard
    from mandrill.shutdown import Shutdown


def metrics_task(
    addr: str,
    counters: Counters,
    *,
    in_flight: Callable[[], int],
    health: Health,
    in_flight_limit: int | None = None,
    probe: LagProbe | None = None,
    breaker_open: Callable[[], bool] | None = None,
    backend: str | None = None,
    status: StatusSource | None = None,
) -> Callable[..., Any]:
    """A task for ``root.start``: a fresh registry over ``counters`` and its server (with
    the status page, given a ``status`` board)."""
    registry = build_registry(counters, in_flight=in_flight, in_flight_limit=in_flight_limit,
                              probe=probe, health=health, breaker_open=breaker_open,
                              backend=backend)
    return partial(serve_http, addr, registry, health, status=status)


#: The name of the metrics server's task.
METRICS_SERVER = "metrics server"


def _none_in_flight() -> int:
    return 0


def _not_open() -> bool:
    return False


@dataclass
class Observability:
    """Everything ``run`` turns on to watch the daemon, built once from the configuration.

    ``serve()`` starts :meth:`probes` in its outer task group (it owns what ``in_flight``
    counts) and calls ``health.set_serving()`` once workers take messages; unless they
    run already, around the opening of the parts too (:meth:`running`).
    """

    counters: Counters
    shutdown: Shutdown
    metrics_addr: str | None = None
    #: Watchdog threshold; ``None`` or 0 turns the watchdog thread off.
    slow_callback_ms: float | None = DEFAULT_SLOW_CALLBACK_MS
    debug: bool = False
    #: ``--max-in-flight``, exported so that an alert can compare the in-flight gauge to it.
    max_in_flight: int | None = None
    #: SIGUSR1 dumps the task tree.
    task_dump: bool = True
    #: Under systemd (``Type=notify``): READY=1, STOPPING=1 and watchdog pings.
    systemd: NotifySettings | None = None
    #: ``--backend``, for ``mandrill_build_info``.
    backend: str | None = None
    #: Where the status page is served, when not on the metrics server.
    status_addr: str | None = None
    #: The status page's board: given once the ledger is open, when either address is set
    #: (the servers start before: until then the page answers 503).
    status: StatusBoard | None = None
    probe: LagProbe = field(init=False)
    health: ServiceHealth = field(init=False)
    #: True while :meth:`running` runs the probes (then ``serve()`` does not start them).
    started: bool = field(init=False, default=False)
    #: What the in-flight gauge reads when the probes run before ``serve()``, which points
    #: it at its holdings (:meth:`count_in_flight`).
    _in_flight: Callable[[], int] = field(init=False, default_factory=lambda: _none_in_flight)
    #: What the breaker gauge reads until ``serve()`` has a ledger (:meth:`watch_breaker`).
    _breaker_open: Callable[[], bool] = field(init=False, default_factory=lambda: _not_open)

    def __post_init__(self) -> None:
        self.probe = LagProbe(slow_callback_ms=self.slow_callback_ms)
        self.health = ServiceHealth(shutdown=self.shutdown, probe=self.probe)

    def count_in_flight(self, in_flight: Callable[[], int]) -> None:
        """Have the probes started by :meth:`running` read ``in_flight`` from now on."""
        self._in_flight = in_flight

    def watch_breaker(self, breaker_open: Callable[[], bool]) -> None:
        """Have the probes started by :meth:`running` read ``breaker_open`` (whether the
        fleet's restart-storm breaker is open, as the ledger last read it) from now on."""
        self._breaker_open = breaker_open

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int | None]:
        """Run the probes around the block, which gets the metrics server's port (if any):
        ``/healthz`` and ``/readyz`` answer while the parts open (a Pub/Sub that cannot be
        reached at start says so, not ready), serve and close. Raises what a probe raises
        as it starts (a port taken: ``ConfigError``)."""
        async with anyio.create_task_group() as group:
            port = None
            probes = self.probes(
                in_flight=lambda: self._in_flight(),
                breaker_open=lambda: self._breaker_open(),
            )
            for name, probe in probes:
                started = await group.start(probe, name=name)
                if name == METRICS_SERVER:
                    port = started
            self.started = True
            try:
                yield port
            finally:
                self.started = False
                group.cancel_scope.cancel()

    def probes(
        self, *, in_flight: Callable[[], int], breaker_open: Callable[[], bool] | None = None
    ) -> list[tuple[str, Callable[..., Any]]]:
        """``(task name, task)`` pairs, each to be started with ``root.start``;
        ``breaker_open`` says whether the fleet's restart-storm breaker is open (as the
        ledger last read it)."""
        found: list[tuple[str, Callable[..., Any]]] = [("lag probe", self.probe.run)]
        if self.task_dump:
            found.append(("task dump", dump_tasks_on_signal))
        if self.debug and self.slow_callback_ms:
            found.append(("slow steps", partial(watch_slow_steps, self.slow_callback_ms)))
        if self.metrics_addr is not None:
            found.append((
                METRICS_SERVER,
                metrics_task(self.metrics_addr, self.counters, in_flight=in_flight,
                             in_flight_limit=self.max_in_flight, health=self.health,
                             probe=self.probe, breaker_open=breaker_open, backend=self.backend,
                             status=self._board if self.status_addr is None else None),
            ))
        if self.status_addr is not None:
            found.append((
                "status server",
                partial(serve_http, self.status_addr, None, self.health, status=self._board,
                        flag="--status-addr"),
            ))
        if self.systemd is not None:
            notifier = SystemdNotifier(self.systemd, self.health, self.shutdown)
            found.append(("systemd notifier", notifier.run))
        return found

    def _board(self) -> StatusBoard | None:
        return self.status

    @property
    def wants_status(self) -> bool:
        """Whether a status page is to be served (``--status-addr`` or
        ``--metrics-addr``): else no board is built, and nothing of it runs."""
        return self.status_addr is not None or self.metrics_addr is not None

