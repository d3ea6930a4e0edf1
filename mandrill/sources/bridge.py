"""Run asyncio-only libraries (aiohttp, gcloud-aio) from either anyio backend.

On asyncio the coroutine is simply awaited. On trio, an asyncio event loop runs in one
thread of its own (started and joined by anyio's blocking portal); each call is handed to
it with ``asyncio.run_coroutine_threadsafe`` and trio is woken through its token when the
call has ended: one hop each way, no worker thread per call. A cancelled caller cancels the
call and waits for it to end (bounded), as it would await a task of its own.

Measured against the emulator (pull(1000) + ack, medians, tests/benchmarks/
bridge_candidates.py), relative to plain asyncio: this design ~0.83x; the same loop thread
reached through anyio's portal and a worker thread per call ~0.70x (a blocking hand-over
and a thread hop each way); trio-asyncio 0.72-1.0x but one loop sharing trio's thread, a
package with a history of breaking on upgrades. We chose the loop thread for its
isolation (asyncio's loop cannot stall trio's) and its stable dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import anyio
from anyio.from_thread import start_blocking_portal

T = TypeVar("T")
log = logging.getLogger(__name__)

#: How long stopping the asyncio thread may take at exit.
CLOSE_SECONDS = 5.0
#: How long a cancelled caller waits for its call to end on the asyncio thread.
CANCEL_SECONDS = 5.0

BACKENDS = ("asyncio", "trio")


class AsyncioBridge:
    """Calls asyncio coroutine functions from the current anyio backend.

    Objects those coroutines create (an ``aiohttp.ClientSession``) belong to the asyncio
    loop the bridge runs them on: create and close them through :meth:`call` too.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        if loop is not None:
            import trio

            self._token = trio.lowlevel.current_trio_token()

    @property
    def threaded(self) -> bool:
        return self._loop is not None

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``fn(*args)`` on the asyncio loop; cancelling the caller cancels the call,
        and the caller returns once the call has ended (at most :data:`CANCEL_SECONDS`)."""
        if self._loop is None:
            return await fn(*args)
        import trio

        loop, token = self._loop, self._token
        coroutine = cast(Coroutine[Any, Any, T], fn(*args))
        ended = trio.Event()
        outcome: list[tuple[bool, Any]] = []  # (returned, value or exception)
        # Touched on the asyncio thread only: the call's task once it runs, and whether
        # the caller gave up before it did.
        running: list[asyncio.Task[Any]] = []
        abandoned: list[bool] = []

        async def tracked() -> None:
            try:
                if abandoned:
                    coroutine.close()
                    raise asyncio.CancelledError
                running.append(cast("asyncio.Task[Any]", asyncio.current_task()))
                outcome.append((True, await coroutine))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                # trio may already have finished (a caller that waited no longer).
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(ended.set)

        def cancel() -> None:  # on the asyncio thread
            if running:
                running[0].cancel()
            else:
                abandoned.append(True)  # tracked() ends at its first step

        # run_coroutine_threadsafe starts the task in a copy of the caller's context, and
        # trio's context says "trio" to sniffio (anyio.run sets its context variable): then
        # tenacity (gcloud-aio-auth's token retries) and anyio would call trio's functions
        # on the asyncio thread. Scheduled from an empty context, the task's copy is empty
        # too, and sniffio finds the asyncio task that runs it. (Not a task of our own
        # making: run_coroutine_threadsafe is the one way in that the project allows; the
        # caller awaits what it starts, cancelled too.)
        contextvars.Context().run(asyncio.run_coroutine_threadsafe, tracked(), loop)
        try:
            await ended.wait()
        except BaseException:
            loop.call_soon_threadsafe(cancel)
            with anyio.move_on_after(CANCEL_SECONDS, shield=True) as scope:
                await ended.wait()
            if scope.cancelled_caught:
                log.warning("a cancelled asyncio call did not end within %.0fs; left to"
                            " the asyncio thread's shutdown", CANCEL_SECONDS)
            raise
        ((returned, value),) = outcome
        if returned:
            return cast(T, value)
        raise value


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
        loop = await anyio.to_thread.run_sync(portal.call, asyncio.get_running_loop)
        yield AsyncioBridge(loop)
    finally:
        # Joins the asyncio thread: bounded, so that a call stuck there cannot hold the
        # daemon's exit (the process does not wait for an abandoned thread either).
        with anyio.move_on_after(CLOSE_SECONDS, shield=True) as scope:
            await anyio.to_thread.run_sync(
                portal_cm.__exit__, None, None, None, abandon_on_cancel=True
            )
        if scope.cancelled_caught:
            log.warning("the asyncio thread did not stop within %.0fs; left behind", CLOSE_SECONDS)
