"""Run asyncio-only libraries (aiohttp, gcloud-aio) from either anyio backend.

On asyncio the coroutine is simply awaited. On trio, an asyncio event loop runs in one
thread of its own behind an anyio :class:`~anyio.from_thread.BlockingPortal`; each call is
scheduled there and awaited from trio through a worker thread. Measured against the
emulator this costs ~10 % of throughput, against ~30 % for trio-asyncio (DESIGN.md), and it
uses only anyio's public API and stock aiohttp.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

T = TypeVar("T")

#: Calls waiting on the asyncio thread at once; each holds one worker thread while it waits.
MAX_CONCURRENT_CALLS = 32

BACKENDS = ("asyncio", "trio")


class AsyncioBridge:
    """Calls asyncio coroutine functions from the current anyio backend.

    Objects those coroutines create (an ``aiohttp.ClientSession``) belong to the asyncio
    loop the bridge runs them on: create them through :meth:`call` too.
    """

    def __init__(self, portal: BlockingPortal | None) -> None:
        self._portal = portal
        self._limiter = anyio.CapacityLimiter(MAX_CONCURRENT_CALLS)

    @property
    def threaded(self) -> bool:
        return self._portal is not None

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``fn(*args)`` on the asyncio loop; cancelling the caller cancels the call."""
        if self._portal is None:
            return await fn(*args)
        future: Future[T] = self._portal.start_task_soon(fn, *args)
        try:
            return await anyio.to_thread.run_sync(
                future.result, abandon_on_cancel=True, limiter=self._limiter
            )
        except BaseException:
            future.cancel()
            raise


@contextlib.asynccontextmanager
async def open_asyncio_bridge(backend: str) -> AsyncIterator[AsyncioBridge]:
    """A bridge for ``backend``, the same value given to ``anyio.run``.

    On trio this starts (and at exit joins) the asyncio thread; joining waits for calls
    still scheduled there, so close clients through :meth:`AsyncioBridge.call` first.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "asyncio":
        yield AsyncioBridge(None)
        return
    portal_cm = start_blocking_portal("asyncio")
    portal = await anyio.to_thread.run_sync(portal_cm.__enter__)
    try:
        yield AsyncioBridge(portal)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(portal_cm.__exit__, None, None, None)
