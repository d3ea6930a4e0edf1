"""AsyncioBridge: calls run on asyncio, in asyncio's world, from either backend."""

from __future__ import annotations

import asyncio

import anyio
import pytest
import sniffio

from mandrill.sources import bridge as bridge_module
from mandrill.sources.bridge import open_asyncio_bridge


async def _running_library() -> tuple[str, bool]:
    await asyncio.sleep(0)
    return sniffio.current_async_library(), asyncio.current_task() is not None


async def test_bridged_calls_see_asyncio_as_the_running_library(backend_name: str) -> None:
    # On trio the call runs in the asyncio thread; libraries that ask sniffio which loop
    # runs them (tenacity in gcloud-aio-auth, anyio itself) must hear "asyncio" there.
    async with open_asyncio_bridge(backend_name) as bridge:
        assert await bridge.call(_running_library) == ("asyncio", True)


async def test_anyio_sleeps_on_asyncio_inside_a_bridged_call(backend_name: str) -> None:
    async with open_asyncio_bridge(backend_name) as bridge:
        await bridge.call(anyio.sleep, 0)


async def test_a_cancelled_call_returns_once_its_asyncio_side_has_ended(
    backend_name: str,
) -> None:
    """Whoever starts work awaits it: a caller cancelled mid-call gets control back only
    after the coroutine on asyncio has run its cleanup (on trio it runs in another thread,
    and cancelling it used to return at once, leaving the cleanup running unowned)."""
    cleaned_up = []

    async def slow_with_cleanup() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            with anyio.CancelScope(shield=True):  # a cleanup that takes time, as awaited
                await anyio.sleep(0.2)
            cleaned_up.append(True)

    async with open_asyncio_bridge(backend_name) as bridge:
        with anyio.move_on_after(0.1):
            await bridge.call(slow_with_cleanup)
        assert cleaned_up == [True]


async def test_a_call_that_ignores_cancellation_is_waited_for_a_bounded_time(
    backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_module, "CANCEL_SECONDS", 0.3)

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(3600)

    async with open_asyncio_bridge(backend_name) as bridge:
        if not bridge.threaded:
            return  # on asyncio the caller awaits the coroutine itself: no bound applies
        started = anyio.current_time()
        with anyio.move_on_after(0.1):
            await bridge.call(stubborn)
        assert 0.3 <= anyio.current_time() - started < 5


async def test_a_call_cancelled_before_it_began_ends_at_once(backend_name: str) -> None:
    """Cancelled before the asyncio side ran it: it never runs (or, if it had begun, is
    cancelled), and the caller is not held for the bound either way."""

    async def body() -> None:
        await asyncio.sleep(3600)

    async with open_asyncio_bridge(backend_name) as bridge:
        started = anyio.current_time()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await bridge.call(body)
        assert anyio.current_time() - started < bridge_module.CANCEL_SECONDS / 2
