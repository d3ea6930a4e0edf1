"""What ``run`` turns on to watch the daemon (:class:`Observability`): the lag probe, the
task dump, the slow-step watchdog and the metrics server: the probes ``serve()`` starts.

The pieces live beside it: :mod:`~mandrill.obs.collector` (the Prometheus view of the
counters), :mod:`~mandrill.obs.http` (the server), :mod:`~mandrill.obs.health` (the
probes' answers), :mod:`~mandrill.obs.address` (``--metrics-addr``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from mandrill.obs.collector import build_registry
from mandrill.obs.counters import Counters
from mandrill.obs.debug import watch_slow_steps
from mandrill.obs.health import Health, ServiceHealth
from mandrill.obs.http import serve_http
from mandrill.obs.lag import DEFAULT_SLOW_CALLBACK_MS, LagProbe
from mandrill.obs.taskdump import dump_tasks_on_signal

if TYPE_CHECKING:
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
) -> Callable[..., Any]:
    """A task for ``root.start``: a fresh registry over ``counters`` and its server."""
    registry = build_registry(counters, in_flight=in_flight, in_flight_limit=in_flight_limit,
                              probe=probe, health=health, breaker_open=breaker_open)
    return partial(serve_http, addr, registry, health)


@dataclass
class Observability:
    """Everything ``run`` turns on to watch the daemon, built once from the configuration.

    ``serve()`` starts :meth:`probes` in its outer task group (it owns what ``in_flight``
    counts) and calls ``health.set_serving()`` once workers take messages.
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
    probe: LagProbe = field(init=False)
    health: ServiceHealth = field(init=False)

    def __post_init__(self) -> None:
        self.probe = LagProbe(slow_callback_ms=self.slow_callback_ms)
        self.health = ServiceHealth(shutdown=self.shutdown, probe=self.probe)

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
                "metrics server",
                metrics_task(self.metrics_addr, self.counters, in_flight=in_flight,
                                in_flight_limit=self.max_in_flight, health=self.health,
                                probe=self.probe, breaker_open=breaker_open),
            ))
        return found

