"""Pub/Sub failures: :class:`PubSubError`, and the retries every Pub/Sub call goes through.

Failures are sorted in one place (:func:`mandrill.google_cloud.is_transient`): HTTP 408,
429 and 5xx, connection errors and timeouts are retried with exponential backoff and full
jitter for a bounded total time (:class:`~mandrill.retry.RetryPolicy`), or, for the daemon's
source, for as long as its :class:`~mandrill.outage.Outage` may last; anything else, and a
transient failure that outlasts the policy or the outage limit, raises :class:`PubSubError`
(a :class:`~mandrill.errors.SourceError`) with one line saying what failed and why.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import aiohttp
import anyio

from mandrill.errors import SourceError
from mandrill.google_cloud import describe_error, http_status, is_transient, retry_after
from mandrill.outage import Outage
from mandrill.retry import GaveUp, RetryPolicy, retry

T = TypeVar("T")

DEFAULT_RETRY: Final = RetryPolicy()
#: The daemon's source: retried as long as its outage may last (``--source-outage-limit``,
#: forever by default, as Google's own clients do), at most 10 s apart.
OUTAGE_RETRY: Final = RetryPolicy(total=math.inf)


class PubSubError(SourceError):
    """A Pub/Sub call failed for good; ``status`` is the HTTP status, if there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _is_transport_failure(exc: Exception) -> bool:
    return isinstance(exc, aiohttp.ClientError | OSError) and is_transient(exc)


def _reported(
    what: str, attempt: Callable[[], Awaitable[T]], outage: Outage
) -> Callable[[], Awaitable[T]]:
    """``attempt``, telling ``outage`` how it went."""

    async def reported() -> T:
        try:
            result = await attempt()
        except Exception as exc:
            if _is_transport_failure(exc):
                outage.failed(f"{what}: {describe_error(exc)}")
            raise
        outage.succeeded()
        return result

    return reported


async def call_with_retries(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy = DEFAULT_RETRY,
    *,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
    clock: Callable[[], float] = anyio.current_time,
    on_transient_error: Callable[[str, BaseException, float], None] | None = None,
    outage: Outage | None = None,
) -> T:
    """Await ``attempt()`` under ``policy`` (:func:`mandrill.retry.retry`), retrying the
    failures :func:`is_transient` accepts; ``on_transient_error(what, error, delay)`` is
    told of each one about to be retried. A wait an answer asked for (``Retry-After``, on a
    429 or a 503) is honoured, up to ``policy.max_server_wait`` and the outage's limit. With
    an ``outage``, each transient failure and each success is reported to it, and the
    retries stop once it has lasted its limit.

    Raises :class:`PubSubError` (``"<what>: <why>"``) at once for a permanent transport
    failure, or when the retries outlast the policy or the outage's limit. Exceptions that
    are no transport failure (bugs) propagate unchanged; cancellation interrupts an attempt
    or a wait at once.
    """

    def on_retry(error: Exception, delay: float) -> None:
        if on_transient_error is not None:
            on_transient_error(what, error, delay)

    try:
        return await retry(
            attempt if outage is None else _reported(what, attempt, outage),
            policy,
            transient=_is_transport_failure,
            on_retry=on_retry,
            budget=None if outage is None else outage.remaining,
            server_wait=retry_after,
            rand=rand,
            sleep=sleep,
            clock=clock,
        )
    except GaveUp as exc:
        if outage is not None and outage.remaining() <= 0:
            raise PubSubError(
                f"{what}: {outage.past_limit()}: {describe_error(exc.error)}",
                status=http_status(exc.error),
            ) from exc.error
        raise PubSubError(
            f"{what}: gave up after {exc.attempts} attempts in {exc.spent:.1f} s:"
            f" {describe_error(exc.error)}",
            status=http_status(exc.error),
        ) from exc.error
    except (aiohttp.ClientError, OSError) as exc:
        raise PubSubError(f"{what}: {describe_error(exc)}", status=http_status(exc)) from exc


__all__ = [
    "DEFAULT_RETRY",
    "OUTAGE_RETRY",
    "PubSubError",
    "call_with_retries",
    "describe_error",
    "http_status",
    "is_transient",
]
