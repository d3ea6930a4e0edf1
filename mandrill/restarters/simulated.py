"""The talk's restarter: pretend to restart a host, taking a while and sometimes failing."""

from __future__ import annotations

import random

import anyio

from mandrill.errors import RestartFailed
from mandrill.message import Message


class SimulatedRestarter:
    """Sleeps a uniform random time in ``[0, max_latency]`` seconds, then fails with
    probability ``failure_rate`` or returns ``"simulated"``.

    Pass a seeded ``rng`` for a reproducible run. Raises ``ValueError`` at construction for
    a negative latency or a failure rate outside ``[0, 1]``.
    """

    def __init__(
        self,
        max_latency: float = 0.0,
        failure_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not max_latency >= 0:  # also refuses NaN
            raise ValueError(f"max_latency must be >= 0, not {max_latency}")
        if not 0 <= failure_rate <= 1:
            raise ValueError(f"failure_rate must be between 0 and 1, not {failure_rate}")
        self.max_latency = max_latency
        self.failure_rate = failure_rate
        self._rng = rng if rng is not None else random.Random()

    async def restart(self, message: Message) -> str:
        """Sleep (cancellable), then return ``"simulated"`` or raise :class:`RestartFailed`."""
        # Both draws happen before the sleep, so that with a seeded rng each call's latency
        # and fate depend only on the order in which calls start, not on how they interleave.
        latency = self._rng.uniform(0, self.max_latency)
        fails = self._rng.random() < self.failure_rate
        await anyio.sleep(latency)
        if fails:
            raise RestartFailed("simulated failure")
        return "simulated"
