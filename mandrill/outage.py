"""An outage of a remote service as the calls to it see it (:class:`Outage`).

It begins with the first failed call and ends with the first call that succeeds. It is
logged once at each end, not once per failed attempt (a service down for an hour is two
lines, not a thousand); it tells the readiness probe why the service is down; and it says
how long the retries may still go on before the daemon gives up (its ``limit``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import anyio

log = logging.getLogger(__name__)


class Outage:
    """Whether ``service`` answers, as its calls report it (:meth:`failed`,
    :meth:`succeeded`); ``limit`` seconds of failing calls are to be outlasted, no more
    (``setting`` names the flag that set it, for the messages). Read and written on the
    event loop's thread only; ``clock`` is anyio's unless a test gives its own."""

    def __init__(
        self,
        service: str,
        *,
        limit: float = math.inf,
        setting: str = "",
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        if not limit > 0:
            raise ValueError(f"an outage limit must be > 0, not {limit}")
        self.service = service
        self.limit = limit
        self.setting = setting
        self._clock = clock
        #: When the first failure of this outage was reported; None while the service answers.
        self.since: float | None = None
        #: Failed attempts in this outage.
        self.failures = 0
        #: The last failure: what failed, and why.
        self.last = ""

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def failed(self, problem: str) -> None:
        """A call failed (``problem``: what, and why); the first failure begins the outage
        and is its one line in the log."""
        self.failures += 1
        self.last = problem
        if self.since is None:
            self.since = self._clock()
            log.warning(
                "%s unavailable: %s; retrying with backoff until it answers%s",
                self.service, problem, self._bounded(),
            )

    def succeeded(self) -> None:
        """A call succeeded: the outage, if any, is over (its other line in the log)."""
        if self.since is not None:
            log.warning(
                "%s recovered after %.1fs (%d failed attempts)",
                self.service, self.failing_for(), self.failures,
            )
            self.since = None
            self.failures = 0
            self.last = ""

    def failing_for(self) -> float:
        """Seconds since the outage began (0 while the service answers)."""
        return 0.0 if self.since is None else self._clock() - self.since

    def remaining(self) -> float:
        """Seconds the retries may still go on: the limit less the outage so far."""
        return self.limit - self.failing_for()

    def problem(self) -> str | None:
        """Why the service is unavailable, for readiness probes; ``None`` while it answers."""
        if self.since is None:
            return None
        return f"{self.last} (failing for {self.failing_for():.0f}s)"

    def past_limit(self) -> str:
        """The words for giving up: ``Pub/Sub unavailable for 61s (--source-outage-limit 1m)``."""
        limit = f"{self.setting} {self.limit:g}s" if self.setting else f"limit {self.limit:g}s"
        return f"{self.service} unavailable for {self.failing_for():.0f}s ({limit})"

    def _bounded(self) -> str:
        if math.isinf(self.limit):
            return ""
        setting = f", {self.setting}" if self.setting else ""
        return f" (for up to {self.limit:g}s{setting})"


__all__ = ["Outage"]
