"""Pub/Sub failures: :class:`PubSubError`, and the retries every Pub/Sub call goes through.

Failures are sorted in one place (:func:`mandrill.google_cloud.is_transient`): HTTP 408,
429 and 5xx, connection errors and timeouts are retried with exponential backoff and full
jitter for a bounded total time (:class:`~mandrill.retry.RetryPolicy`); anything else, and
a transient failure that outlasts the policy, raises :class:`PubSubError` (a
:class:`~mandrill.errors.SourceError`) with one line saying what failed and why.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import aiohttp
import anyio

from mandrill.errors import SourceError
from mandrill.google_cloud import describe_error, http_status, is_transient
from mandrill.retry import GaveUp, RetryPolicy, retry

T = TypeVar("T")

DEFAULT_RETRY: Final = RetryPolicy()


class PubSubError(SourceError):
    """A Pub/Sub call failed for good; ``status`` is the HTTP status, if there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _is_transport_failure(exc: Exception) -> bool:
    return isinstance(exc, aiohttp.ClientError | OSError) and is_transient(exc)


async def call_with_retries(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy = DEFAULT_RETRY,
    *,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
    clock: Callable[[], float] = anyio.current_time,
    on_transient_error: Callable[[str, BaseException, float], None] | None = None,
) -> T:
    """Await ``attempt()`` under ``policy`` (:func:`mandrill.retry.retry`), retrying the
    failures :func:`is_transient` accepts; ``on_transient_error(what, error, delay)`` is
    told of each one about to be retried.

    Raises :class:`PubSubError` (``"<what>: <why>"``) at once for a permanent transport
    failure, or when the retries outlast the policy. Exceptions that are no transport
    failure (bugs) propagate unchanged; cancellation interrupts an attempt or a wait at once.
    """

    def on_retry(error: Exception, delay: float) -> None:
        if on_transient_error is not None:
            on_transient_error(what, error, delay)

    try:
        return await retry(
            attempt,
            policy,
            transient=_is_transport_failure,
            on_retry=on_retry,
            rand=rand,
            sleep=sleep,
            clock=clock,
        )
    except GaveUp as exc:
        raise PubSubError(
            f"{what}: gave up after {exc.attempts} attempts in {exc.spent:.1f} s:"
            f" {describe_error(exc.error)}",
            status=http_status(exc.error),
        ) from exc.error
    except (aiohttp.ClientError, OSError) as exc:
        raise PubSubError(f"{what}: {describe_error(exc)}", status=http_status(exc)) from exc


__all__ = [
    "DEFAULT_RETRY",
    "PubSubError",
    "call_with_retries",
    "describe_error",
    "http_status",
    "is_transient",
]
