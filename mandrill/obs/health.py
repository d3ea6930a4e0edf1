"""``/healthz`` and ``/readyz``: what they ask (:class:`Health`) and the daemon's answers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import anyio

if TYPE_CHECKING:
    from mandrill.obs.lag import LagProbe
    from mandrill.shutdown import Shutdown

#: ``/healthz`` fails when the lag probe has not woken up for this long past its interval.
LIVENESS_BOUND = 5.0


class Health(Protocol):
    """What ``/healthz`` and ``/readyz`` ask; each answer is ``(ok, reason)``."""

    def loop_alive(self) -> tuple[bool, str]: ...

    def ready(self) -> tuple[bool, str]: ...


@dataclass
class ServiceHealth:
    """Liveness from the lag probe, readiness from the service's parts.

    ``ready()`` is true once :meth:`set_serving` was called, while every check in
    ``checks`` (for example ``{"source": ..., "ledger": ...}``) finds no problem (returns
    ``None``; else the reason, which ``/readyz`` shows) and no shutdown has been
    requested. A check added while the service starts (:meth:`add_checks`: a source that
    cannot be reached yet) gives its reason before ``starting``. Checks run on the loop
    thread at each request: keep them to attribute reads.
    """

    shutdown: Shutdown | None = None
    probe: LagProbe | None = None
    checks: Mapping[str, Callable[[], str | None]] = field(default_factory=dict)
    liveness_bound: float = LIVENESS_BOUND
    serving: bool = False
    #: Made by the first waiter (an Event needs a running loop; this object may not).
    _serving_set: anyio.Event | None = field(default=None, init=False, repr=False)

    def set_serving(self, checks: Mapping[str, Callable[[], str | None]] | None = None) -> None:
        """Called by ``serve()`` once every part runs and workers take messages, with the
        readiness checks of its parts (added to ``checks``)."""
        self.add_checks(checks or {})
        self.serving = True
        if self._serving_set is not None:
            self._serving_set.set()

    async def wait_serving(self) -> None:
        """Return once :meth:`set_serving` was called (at once if it was already): then
        ``ready()`` may answer true (systemd's ``READY=1`` waits for it)."""
        if self.serving:
            return
        if self._serving_set is None:
            self._serving_set = anyio.Event()
        await self._serving_set.wait()

    def add_checks(self, checks: Mapping[str, Callable[[], str | None]]) -> None:
        """Add readiness checks, at any time (while the parts open, say)."""
        if checks:
            self.checks = {**self.checks, **checks}

    def loop_alive(self) -> tuple[bool, str]:
        if self.probe is None:
            return True, "ok"
        age = self.probe.beat_age()
        if self.probe.alive(self.liveness_bound):
            return True, "ok"
        return False, f"event loop lagging: last lag-probe beat {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        if self.shutdown is not None and self.shutdown.requested.is_set():
            return False, f"shutting down ({self.shutdown.reason or 'requested'})"
        for name, check in self.checks.items():
            problem = check()
            if problem is not None:
                return False, f"{name} not ready: {problem}"
        if not self.serving:
            return False, "starting"
        return True, "ready"
