"""One retry engine for every remote call: Pub/Sub, Compute Engine, notifications.

Exponential backoff with full jitter, bounded by total time and optionally by a number of
attempts; a wait the server asked for (``Retry-After``) is honoured, up to a bound. The
caller says which failures are worth retrying; anything else propagates at once,
unchanged, and so does cancellation. Waiting and the clock are anyio's, so a test's
trio ``MockClock`` drives them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import anyio

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Before retry ``n`` (from 0) wait a uniformly random time in
    ``[0, min(cap, initial * multiplier**n))`` (the full ceiling without ``jitter``); give
    up once ``attempts`` were made, or once the time spent plus the next wait would
    exceed ``total`` seconds. A failure whose answer asked for a longer wait (``Retry-After``)
    is waited for that long instead, up to ``max_server_wait`` (a server asking for an hour
    does not hold a daemon for one)."""

    initial: float = 0.1
    cap: float = 10.0
    total: float = 120.0
    multiplier: float = 2.0
    attempts: int | None = None
    jitter: bool = True
    max_server_wait: float = 60.0

    def __post_init__(self) -> None:
        if (
            not (0 < self.initial <= self.cap)
            or self.total < 0
            or self.max_server_wait < 0
            or self.multiplier < 1
            or (self.attempts is not None and self.attempts < 1)
        ):
            raise ValueError(f"invalid retry policy {self}")


class GaveUp(Exception):
    """A transient failure outlasted the policy; ``error`` is the last one."""

    def __init__(self, error: BaseException, attempts: int, spent: float) -> None:
        # The error's own text is the caller's to describe (some cannot even print it).
        super().__init__(
            f"gave up after {attempts} attempts in {spent:.1f} s: {type(error).__name__}"
        )
        self.error = error
        self.attempts = attempts
        self.spent = spent


def backoff_delays(
    policy: RetryPolicy, rand: Callable[[], float] = random.random
) -> Iterator[float]:
    """The (endless) waits before each retry under ``policy``; ``rand`` returns floats in
    ``[0, 1)`` (inject a fixed one to test)."""
    ceiling = policy.initial
    while True:
        yield rand() * ceiling if policy.jitter else ceiling
        ceiling = min(policy.cap, ceiling * policy.multiplier)


async def retry(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    transient: Callable[[Exception], bool],
    on_retry: Callable[[Exception, float], None] | None = None,
    budget: Callable[[], float] | None = None,
    server_wait: Callable[[Exception], float | None] | None = None,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
    clock: Callable[[], float] = anyio.current_time,
) -> T:
    """Await ``attempt()`` until it succeeds, retrying failures ``transient`` accepts.

    ``on_retry(error, delay)`` is told of each failure about to be retried. ``budget()``,
    asked after each failure, is how many seconds the retries may still go on (an outage's
    remaining time, shared by every call to a service): a wait never goes past it.
    ``server_wait(error)`` is how long the failed answer asked to wait (``Retry-After``), or
    ``None``: the wait is at least that, up to ``policy.max_server_wait``.

    Raises a non-transient failure at once, unchanged; raises :class:`GaveUp` (from the last
    failure) when the attempts are used up, the next wait would take the retries past
    ``policy.total`` (so the whole call can last ``total`` plus one attempt's own time), or
    no ``budget`` is left.
    Cancellation interrupts an attempt or a wait at once.
    """
    started = clock()
    delays = backoff_delays(policy, rand)
    limit = policy.attempts if policy.attempts is not None else math.inf
    attempts = 0
    while True:
        attempts += 1
        try:
            return await attempt()
        except Exception as exc:
            if not transient(exc):
                raise
            delay = next(delays)
            asked = server_wait(exc) if server_wait is not None else None
            if asked is not None:
                delay = max(delay, min(asked, policy.max_server_wait))
            spent = clock() - started
            left = budget() if budget is not None else math.inf
            if attempts >= limit or spent + delay > policy.total or left <= 0:
                raise GaveUp(exc, attempts, spent) from exc
            delay = min(delay, left)
            if on_retry is not None:
                on_retry(exc, delay)
        await sleep(delay)


__all__ = ["GaveUp", "RetryPolicy", "backoff_delays", "retry"]
